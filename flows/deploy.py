"""The deploy-certificate flow: serve a managed certificate on every one of its targets.

A canary target first; then the rest in waves of ``concurrency``. Every target is reconciled before
it is changed (one already serving the certificate is only verified), deployed and verified on the
wire or by API read-back. If any target fails, no further wave starts, every target this run changed
is rolled back (the failed one rolls itself back), the previous certificate is proven served again,
and the run fails with a report of what happened where (artifact ``deployment-<name>``).

A killed run rolls nothing back; the targets' desired and verified fingerprints let the next run of
this flow (or of renew-certificate) bring the fleet to one state.

The run, and each of its task runs, is tagged ``certificate:<name>``; its audit events are the
artifact ``certificate-<name>``. With ``dry_run`` it only says what it would do (certpilot.dry_run).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, cast

from prefect import flow, get_run_logger
from prefect.futures import PrefectFuture
from pydantic import Field

from certpilot.dry_run import DeploymentPreview
from certpilot.managed import certificate_tag
from certpilot.rollout import (
    MAX_CONCURRENCY,
    DeploymentFailed,
    DeploymentReport,
    DeployStep,
    Outcome,
    Step,
    deploy_everywhere,
)
from flows.runners import thread_pool
from flows.settling import settle
from flows.tagging import tag_flow_run
from tasks.deployment import (
    deploy_target,
    plan_deployment,
    preview_deployment,
    publish_deployment_report,
    rollback_target,
)
from tasks.history import audit_head, publish_certificate_history


def _submit(step: Step) -> PrefectFuture[Outcome]:
    if isinstance(step, DeployStep):
        return deploy_target.with_options(task_run_name=f"deploy-{step.name}-{step.target}").submit(
            step.name, step.target, step.fingerprint)
    return rollback_target.with_options(task_run_name=f"rollback-{step.name}-{step.target}").submit(
        step.name, step.target, step.receipt)


def run_as_tasks(steps: Sequence[Step]) -> list[Outcome | BaseException]:
    """The flow's seam for deploy_everywhere: each step a task run, all at once, each settled."""
    settled = [settle(future) for future in [_submit(step) for step in steps]]
    return [cast(Outcome, s.value) if s.error is None else s.error for s in settled]


@flow(name="deploy-certificate", flow_run_name="deploy-{name}", task_runner=thread_pool(MAX_CONCURRENCY),
      description=__doc__.split("\n\n")[1], timeout_seconds=2 * 3600)
def deploy_certificate(name: str, fingerprint: str | None = None, canary: str | None = None,
                       concurrency: Annotated[int, Field(ge=1, le=MAX_CONCURRENCY)] = 4,
                       dry_run: bool = False) -> DeploymentReport | DeploymentPreview:
    """Deploy a managed certificate to all its targets, the canary first, and verify it there.

    Args:
        name: The managed certificate.
        fingerprint: Deploy this certificate of it (SHA-256, hex) instead of its current one.
        canary: The target deployed and verified first, alone (default: the first by name).
        concurrency: Targets deployed at once after the canary.
        dry_run: Only say what the run would do, target by target, from the inventory's records: nothing changes.
    """
    tag_flow_run(certificate_tag(name))
    if dry_run:
        preview = preview_deployment(name, fingerprint, canary, concurrency)
        for line in preview.lines():
            get_run_logger().info("%s", line)
        return preview
    head = audit_head()
    try:
        plan = plan_deployment(name, fingerprint)
        report = deploy_everywhere(plan, run_as_tasks, canary=canary, concurrency=concurrency, log=get_run_logger())
        if plan.targets:
            publish_deployment_report(report)
    finally:
        history = publish_certificate_history([name], head, whole_run=True, return_state=True)
        if not history.is_completed():
            get_run_logger().warning("%s's history artifact was not published: %s", name, history.message)
    if report.failed:
        raise DeploymentFailed(report)
    return report
