"""Retirement tasks: thin units over certpilot.retiring and the target blocks.

``run_step`` builds the target's deployer from its block (tasks.deployment.deployer_for) and does one
step of a retirement there (remove, restore or purge, certpilot.retiring.apply); ``revoker`` revokes a
certificate of the managed certificate with its issuer block (certpilot.revoking.revoke). They are plain
functions: the retire-target and revoke-retired tasks wrap them for the retire and restore-retired
flows, and the CLI calls them directly when there is no Prefect API.

Each task run is tagged ``certificate:<name>`` (its ``name`` parameter). Secrets: no task takes or
returns a key; removals name backup files, vault names and ARNs only; errors leave redacted.
"""

from __future__ import annotations

from cryptography import x509
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from certpilot import audit, managed, retiring, revoking
from certpilot.ca import parse_reason
from certpilot.database import get_engine, read_session
from certpilot.history import artifact_key
from certpilot.issuance import Issuer
from certpilot.retiring import RetirementReport, Revoked, TargetOutcome, TargetStep
from certpilot.rollout import Log
from tasks.deployment import RETRY_DELAYS, TARGET_TIMEOUT_SECONDS, close, deployer_for
from tasks.history import tag_with_certificate
from tasks.inventory import retry_transient_only, run_actor
from tasks.renewal import key_ring, load_issuer


def run_step(step: TargetStep, actor: audit.Actor, log: Log) -> TargetOutcome:
    """Do one retirement step on one target through its deployer. Raises retiring.StepFailed with the outcome."""
    target, deployer = deployer_for(step.name, step.target)
    try:
        outcome = retiring.apply(get_engine(), target, deployer, step, actor)
    finally:
        close(deployer)
    log.info("target %s: %s done (%s)", step.target, step.step, outcome.detail)
    return outcome


def revoker(name: str, actor: audit.Actor) -> retiring.Revoke:
    """Revokes a certificate of managed certificate ``name`` with its issuer block (loaded at the first
    revocation, once)."""
    loaded: list[Issuer] = []

    def revoke(fingerprint: str, reason: x509.ReasonFlags) -> Revoked:
        engine, ring = get_engine(), key_ring()
        if not loaded:
            with read_session(engine) as session:
                issuer = managed.get(session, name).issuer
            loaded.append(load_issuer(issuer, engine, ring, actor))
        outcome = revoking.revoke(engine, fingerprint, reason, loaded[0], ring, actor)
        return Revoked(outcome.fingerprint_sha256, True, outcome.reason, outcome.already,
                       f"by {outcome.issuer} at {outcome.revoked_at:%Y-%m-%d %H:%M:%S} UTC")

    return revoke


@task(name="retire-target", retries=len(RETRY_DELAYS), retry_delay_seconds=RETRY_DELAYS,
      retry_condition_fn=retry_transient_only, on_running=[tag_with_certificate], cache_policy=NO_CACHE,
      timeout_seconds=TARGET_TIMEOUT_SECONDS)
def retire_target(name: str, step: TargetStep) -> TargetOutcome:
    """One target's step of a retirement: remove (restorable), restore, or purge."""
    return run_step(step, run_actor(), get_run_logger())


@task(name="revoke-retired", retries=len(RETRY_DELAYS), retry_delay_seconds=RETRY_DELAYS,
      retry_condition_fn=retry_transient_only, on_running=[tag_with_certificate], cache_policy=NO_CACHE,
      timeout_seconds=600)
def revoke_retired(name: str, fingerprint: str, reason: str) -> Revoked:
    """Revoke one certificate of a managed certificate being retired, with its issuer."""
    return revoker(name, run_actor())(fingerprint, parse_reason(reason))


def report_markdown(report: RetirementReport) -> str:
    """The retirement report artifact: what each target, revocation and key came to, and what is next."""
    lines = [f"# {report.action.capitalize()} of {report.name}", "", f"**{report.name} is {report.status}**: "
             f"{report.next_step()}.", "", "| target | kind | step | outcome | certificate | detail |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {o.target} | {o.kind} | {o.step} | {'done' if o.ok else 'FAILED'} | {(o.fingerprint or '-')[:16]} | "
              f"{o.detail.replace('|', '/')} |" for o in report.targets]
    if report.revocations:
        lines += ["", "| certificate | revoked | reason | detail |", "|---|---|---|---|"]
        lines += [f"| {r.fingerprint[:16]} | {'already' if r.already else 'yes' if r.ok else 'NO'} | {r.reason} | "
                  f"{r.detail.replace('|', '/')} |" for r in report.revocations]
    if report.keys:
        lines += ["", "| key | destroyed | detail |", "|---|---|---|"]
        lines += [f"| {k.key} | {'yes' if k.destroyed else 'no'} | {k.detail} |" for k in report.keys]
    lines += [f"- FAILED: {p}" for p in report.problems]
    return "\n".join(lines)


@task(name="publish-retirement-report", timeout_seconds=120)
def publish_retirement_report(report: RetirementReport) -> None:
    create_markdown_artifact(key=artifact_key(report.name, "retirement"), markdown=report_markdown(report),
                             description=f"{report.action} of {report.name}: outcome per target")
