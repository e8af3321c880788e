"""The retire and restore-retired flows: the last step of a managed certificate's lifecycle, and its undo.

retire takes the certificate off every target (each target a task run; what was taken is kept, so it
can be restored), marks the managed certificate retiring and stops its renewals; with ``confirm`` it
then purges what was kept, revokes its certificates that are still valid (with ``revoke``), crypto-shreds
its keys (with ``destroy_key``) and marks it retired. Run it again with ``confirm`` to finish a
retirement begun earlier. restore-retired puts every target back and proves the certificate served again,
until the retirement is confirmed. See certpilot.retiring.

A target that fails does not stop the others; the run fails naming it, and running it again takes up
only what is left. The run and its task runs are tagged ``certificate:<name>``; the report is the
artifact ``retirement-<name>``, its audit events the artifact ``certificate-<name>``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, cast

from cryptography import x509
from prefect import flow, get_run_logger
from prefect.futures import PrefectFuture

from certpilot import retiring
from certpilot.ca import reason_name
from certpilot.database import get_engine
from certpilot.managed import certificate_tag
from certpilot.retiring import RetirementFailed, RetirementReport, Revoked, TargetOutcome, TargetStep
from certpilot.rollout import MAX_CONCURRENCY
from flows.runners import thread_pool
from flows.settling import settle
from flows.tagging import tag_flow_run
from tasks.history import audit_head, publish_certificate_history
from tasks.inventory import run_actor
from tasks.retirement import publish_retirement_report, retire_target, revoke_retired

RevocationReason = Literal["unspecified", "key-compromise", "affiliation-changed", "superseded",
                           "cessation-of-operation", "privilege-withdrawn"]


def _submit(step: TargetStep) -> PrefectFuture[TargetOutcome]:
    return retire_target.with_options(task_run_name=f"{step.step}-{step.name}-{step.target}").submit(step.name, step)


def run_as_tasks(steps: Sequence[TargetStep]) -> list[TargetOutcome | BaseException]:
    """The flows' seam for certpilot.retiring: each target's step a task run, all at once, each settled."""
    settled = [settle(future) for future in [_submit(step) for step in steps]]
    return [cast(TargetOutcome, s.value) if s.error is None else s.error for s in settled]


def _revoke_as_task(name: str) -> retiring.Revoke:
    def revoke(fingerprint: str, reason: x509.ReasonFlags) -> Revoked:
        return revoke_retired.with_options(task_run_name=f"revoke-{fingerprint[:16]}")(
            name, fingerprint, reason_name(reason) or reason.value)
    return revoke


def _finish(report: RetirementReport, name: str, head: int) -> RetirementReport:
    log = get_run_logger()
    for line in report.lines():
        log.info("%s", line)
    publish_retirement_report(report)
    history = publish_certificate_history([name], head, whole_run=True, return_state=True)
    if not history.is_completed():
        log.warning("%s's history artifact was not published: %s", name, history.message)
    if report.failed:
        raise RetirementFailed(report)
    return report


@flow(name="retire", flow_run_name="retire-{name}", task_runner=thread_pool(MAX_CONCURRENCY),
      description=__doc__.split("\n\n")[1], timeout_seconds=3600)
def retire(name: str, revoke: RevocationReason | None = None, destroy_key: bool = False,
           confirm: bool = False) -> RetirementReport:
    """Retire a managed certificate: take it off every target (restorable), then, with confirm, make it final.

    Args:
        name: The managed certificate to retire.
        revoke: Revoke its certificates that are still valid, for this reason, when the retirement is confirmed.
        destroy_key: Crypto-shred every key of it when the retirement is confirmed (cannot be undone).
        confirm: Confirm the retirement (now, or one begun earlier): purge what the targets' removals kept,
            revoke and destroy keys if asked, and mark it retired. Nothing can be restored after.
    """
    tag_flow_run(certificate_tag(name))
    head = audit_head()
    report = retiring.retire(get_engine(), name, run_as_tasks, run_actor(), revoke=revoke, destroy_key=destroy_key,
                             confirm_now=confirm, revoker=_revoke_as_task(name), log=get_run_logger())
    return _finish(report, name, head)


@flow(name="restore-retired", flow_run_name="restore-{name}", task_runner=thread_pool(MAX_CONCURRENCY),
      description="Put a managed certificate that is being retired back on every target, proven served, "
                  "and make it active again (until its retirement is confirmed).", timeout_seconds=3600)
def restore_retired(name: str) -> RetirementReport:
    """Undo the first step of a retirement.

    Args:
        name: The managed certificate being retired.
    """
    tag_flow_run(certificate_tag(name))
    head = audit_head()
    report = retiring.restore(get_engine(), name, run_as_tasks, run_actor(), log=get_run_logger())
    return _finish(report, name, head)
