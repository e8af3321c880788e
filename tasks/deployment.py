"""Deployment tasks: thin retryable units over certpilot.rollout and the connector blocks.

Each target names a block document (``block-type-slug/document-name``) whose ``deployer()`` builds
the connector for it. ``deploy_one`` reconciles, deploys and verifies one target and rolls it back
itself if its verification fails; ``roll_back_one`` undoes what a run changed on one target. They are
plain functions: the deploy-target and rollback-target tasks wrap them for the deploy-certificate
flow, and the CLI calls them directly when there is no Prefect API.

Each of the deploy-target, rollback-target and plan-deployment task runs is tagged
``certificate:<name>`` (tasks.history.tag_with_certificate), like the flow run. ``preview`` says what
a run would do (the dry run) from the inventory's records, loading each target's block to check it
exists, changing nothing.

Secrets: the private key is unsealed inside the deployer's write, from the keystore, never a task
argument or result. Receipts and outcomes (task results) hold file names, ARNs and fingerprints only.
Errors leaving a task carry messages that certpilot.errors.redact lets through.
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

import blocks.aws  # noqa: F401  (registers the connector block types, so load_block finds them)
import blocks.azure  # noqa: F401
import blocks.ssh  # noqa: F401
from blocks.loading import load_block
from blocks.targets import build_deployer
from certpilot import audit, rollout, targets
from certpilot.database import get_engine, read_session
from certpilot.deployment import DeployBundle, Deployer, Receipt
from certpilot.errors import NotFoundError, redact
from certpilot.history import artifact_key
from certpilot.dry_run import DeploymentPreview, TargetPreview
from certpilot.rollout import Action, DeploymentPlan, DeploymentReport, Log, Outcome
from certpilot.settings import load_settings
from connectors import kms
from tasks.history import tag_with_certificate
from tasks.inventory import retry_transient_only, run_actor

RETRY_DELAYS: list[float] = [2, 10]  # seconds before the first and the second retry of a target's step
# One target's deploy, verify and rollback: each SSH command, API call and handshake has its own, shorter,
# timeout (the connection blocks'); this bounds the whole step, verification polling included.
TARGET_TIMEOUT_SECONDS = 900


def close(connector: Any) -> None:
    """Close a source's or deployer's connection, when it holds one."""
    closer = getattr(connector, "close", None)
    if callable(closer):
        closer()


def deployer_for(name: str, target_name: str) -> tuple[Any, Deployer]:
    """The target's row and a deployer built from its block and settings."""
    settings = load_settings()
    engine = get_engine(settings)
    with read_session(engine) as session:
        target = targets.get_target(session, name, target_name)
    if not target.block:
        raise NotFoundError(f"target {target_name} of {name} names no block")
    block = load_block(target.block)  # a connection or deployment-target block
    key_ring = kms.key_ring_loader(settings)
    return target, build_deployer(block, target.name, target.kind, dict(target.settings),
                                  lookup=targets.lookup(engine, name, key_ring))


def plan(name: str, fingerprint: str | None) -> DeploymentPlan:
    """Which certificate goes to which targets (public facts)."""
    with read_session(get_engine()) as session:
        return rollout.plan(session, name, fingerprint)


def deploy_one(name: str, target_name: str, fingerprint: str, actor: audit.Actor, log: Log) -> Outcome:
    """Bring one target to serve ``fingerprint``: reconcile, deploy, verify (rolled back here if that
    fails). Raises rollout.TargetFailed with the outcome."""
    settings = load_settings()
    engine = get_engine(settings)
    target, deployer = deployer_for(name, target_name)

    def bundle() -> DeployBundle:
        found = targets.bundle(engine, name, fingerprint, kms.key_ring_loader(settings))
        if found is None:
            raise NotFoundError(f"the key of certificate {fingerprint[:16]} is not in the keystore: cannot deploy it")
        return found

    try:
        outcome = rollout.bring_to(engine, target, deployer, bundle, fingerprint, actor)
    except rollout.TargetFailed as exc:
        log.error("target %s: %s: %s", target_name, exc.outcome.action, exc.outcome.detail)
        raise
    finally:
        close(deployer)
    log.info("target %s: %s (%s)", target_name, outcome.action, outcome.detail)
    return outcome


def roll_back_one(name: str, target_name: str, receipt: Receipt, actor: audit.Actor, log: Log) -> Outcome:
    """Undo what this run's deploy changed on one target and prove the previous certificate is served."""
    target, deployer = deployer_for(name, target_name)
    try:
        outcome = rollout.roll_back(get_engine(), target, deployer, receipt, actor)
    finally:
        close(deployer)
    (log.warning if outcome.action is Action.ROLLED_BACK else log.error)(
        "target %s: %s (%s)", target_name, outcome.action, outcome.detail)
    return outcome


def preview(name: str, fingerprint: str | None, canary: str | None, concurrency: int) -> DeploymentPreview:
    """What a deploy run would do, wave by wave, from the inventory's records; each target's block is
    loaded to check that it exists (nothing is connected to, nothing changes)."""
    found = plan(name, fingerprint)
    with read_session(get_engine()) as session:
        rows = {t.name: t for t in targets.list_targets(session, name)}
    problems: dict[str, str | None] = {}
    for block in sorted({t.block for t in rows.values() if t.block}):
        try:
            load_block(block)
            problems[block] = None
        except Exception as exc:  # noqa: BLE001 - the dry run reports it, as the run would fail on it
            problems[block] = redact(exc)

    def target(planned: rollout.PlannedTarget) -> TargetPreview:
        block = rows[planned.name].block
        problem = problems[block] if block else "the target names no block"
        return TargetPreview(planned.name, planned.kind, block, planned.verified, problem)

    return DeploymentPreview(found, tuple(tuple(target(t) for t in wave)
                                          for wave in rollout.waves(found, canary, concurrency)))


@task(name="plan-deployment", on_running=[tag_with_certificate], timeout_seconds=120)
def plan_deployment(name: str, fingerprint: str | None) -> DeploymentPlan:
    """Which certificate goes to which targets (public facts)."""
    return plan(name, fingerprint)


@task(name="preview-deployment", on_running=[tag_with_certificate], timeout_seconds=300)
def preview_deployment(name: str, fingerprint: str | None, canary: str | None, concurrency: int) -> DeploymentPreview:
    """What a deploy run would do (its dry run), published as an artifact of the run; changes nothing."""
    found = preview(name, fingerprint, canary, concurrency)
    create_markdown_artifact(markdown="\n".join(found.lines()),
                             description=f"Dry run: what deploying {name} would do")
    return found


@task(name="deploy-target", retries=len(RETRY_DELAYS), retry_delay_seconds=RETRY_DELAYS,
      retry_condition_fn=retry_transient_only, on_running=[tag_with_certificate], timeout_seconds=TARGET_TIMEOUT_SECONDS)
def deploy_target(name: str, target_name: str, fingerprint: str) -> Outcome:
    """Bring one target to serve ``fingerprint``: reconcile, deploy, verify (rolled back here if that fails)."""
    return deploy_one(name, target_name, fingerprint, run_actor(), get_run_logger())


@task(name="rollback-target", retries=len(RETRY_DELAYS), retry_delay_seconds=RETRY_DELAYS,
      retry_condition_fn=retry_transient_only, on_running=[tag_with_certificate], timeout_seconds=TARGET_TIMEOUT_SECONDS)
def rollback_target(name: str, target_name: str, receipt: Receipt) -> Outcome:
    """Undo what this run's deploy changed on one target and prove the previous certificate is served."""
    return roll_back_one(name, target_name, receipt, run_actor(), get_run_logger())


def report_markdown(report: DeploymentReport) -> str:
    """The deployment report artifact: the run's verdict, then one row per target."""
    head = "FAILED: every changed target was rolled back" if report.failed else "all targets serve it"
    lines = [f"# Deployment of {report.name}", "", f"Certificate `{report.fingerprint[:16]}`: {head}.", "",
             "| target | kind | outcome | serving | detail |", "|---|---|---|---|---|"]
    for o in report.outcomes:
        lines.append(f"| {o.target} | {o.kind} | {o.action} | {(o.fingerprint or '?')[:16]} | "
                     f"{o.detail.replace('|', '/')} |")
    lines += [f"| {t} | | not attempted | | stopped after a failure |" for t in report.not_attempted]
    return "\n".join(lines)


@task(name="publish-deployment-report", timeout_seconds=120)
def publish_deployment_report(report: DeploymentReport) -> None:
    create_markdown_artifact(key=artifact_key(report.name, "deployment"), markdown=report_markdown(report),
                             description=f"Deployment of {report.name}: outcome per target")
