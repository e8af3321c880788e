"""Deployment tasks: thin retryable units over certpilot.rollout and the connector blocks.

Each target names a block document (``block-type-slug/document-name``) whose ``deployer()`` builds
the connector for it. The deploy-target task reconciles, deploys and verifies one target and rolls it
back itself if its verification fails; the flow rolls back the targets other tasks changed.

Secrets: the private key is unsealed inside the deployer's write, from the keystore, never a task
argument or result. Receipts (task results) hold file names, ARNs and fingerprints only. Errors
leaving a task carry certpilot's own messages (see certpilot.rollout.safe).
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.blocks.core import Block

import blocks.aws  # noqa: F401  (registers the connector block types, so Block.load finds them)
import blocks.azure  # noqa: F401
import blocks.ssh  # noqa: F401
import blocks.targets  # noqa: F401
from certpilot import keystore, rollout, targets
from certpilot.database import get_engine, read_session
from certpilot.deployment import Deployer, Receipt
from certpilot.errors import NotFoundError
from certpilot.settings import load_settings
from tasks.inventory import retry_transient_only, run_actor

RETRIES = 2


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
    block = Block.load(target.block)
    key_ring = lambda: keystore.load_key_ring(settings)  # noqa: E731
    return target, block.deployer(target.name, target.kind, dict(target.settings),  # type: ignore[attr-defined]
                                  lookup=targets.lookup(engine, name, key_ring))


@task(name="plan-deployment")
def plan_deployment(name: str, fingerprint: str | None) -> dict[str, Any]:
    """Which certificate goes to which targets (public facts)."""
    with read_session(get_engine()) as session:
        plan = targets.plan(session, name, fingerprint)
    return {"name": plan.name, "fingerprint": plan.fingerprint, "targets": plan.targets}


@task(name="deploy-target", retries=RETRIES, retry_delay_seconds=[2, 10], retry_condition_fn=retry_transient_only)
def deploy_target(name: str, target_name: str, fingerprint: str) -> dict[str, Any]:
    """Bring one target to serve ``fingerprint``: reconcile, deploy, verify (rolled back here if that fails)."""
    logger = get_run_logger()
    settings = load_settings()
    engine = get_engine(settings)
    target, deployer = deployer_for(name, target_name)

    def bundle():  # noqa: ANN202
        found = targets.bundle(engine, name, fingerprint, lambda: keystore.load_key_ring(settings))
        if found is None:
            raise NotFoundError(f"the key of certificate {fingerprint[:16]} is not in the keystore: cannot deploy it")
        return found

    try:
        outcome = rollout.bring_to(engine, target, deployer, bundle, fingerprint, run_actor())
    except rollout.TargetFailed as exc:
        logger.error("target %s: %s: %s", target_name, exc.outcome.action, exc.outcome.detail)
        raise
    finally:
        close(deployer)
    logger.info("target %s: %s (%s)", target_name, outcome.action, outcome.detail)
    return outcome.as_dict()


@task(name="rollback-target", retries=RETRIES, retry_delay_seconds=[2, 10], retry_condition_fn=retry_transient_only)
def rollback_target(name: str, target_name: str, receipt: dict[str, Any]) -> dict[str, Any]:
    """Undo what this run's deploy changed on one target and prove the previous certificate is served."""
    target, deployer = deployer_for(name, target_name)
    try:
        outcome = rollout.roll_back(get_engine(), target, deployer, Receipt.from_dict(receipt), run_actor())
    finally:
        close(deployer)
    (get_run_logger().warning if outcome.action == "rolled-back" else get_run_logger().error)(
        "target %s: %s (%s)", target_name, outcome.action, outcome.detail)
    return outcome.as_dict()


@task(name="publish-deployment-report")
def publish_deployment_report(name: str, markdown: str) -> None:
    key = "deployment-" + "".join(c if c.isalnum() else "-" for c in name.lower())
    create_markdown_artifact(key=key[:100], markdown=markdown, description=f"Deployment of {name}: outcome per target")
