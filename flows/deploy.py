"""The deploy-certificate flow: serve a managed certificate on every one of its targets.

A canary target first; then the rest in waves of ``concurrency``. Every target is reconciled before
it is changed (one already serving the certificate is only verified), deployed and verified on the
wire or by API read-back. If any target fails, no further wave starts, every target this run changed
is rolled back (the failed one rolls itself back), the previous certificate is proven served again,
and the run fails with a report of what happened where (artifact ``deployment-<name>``).

A killed run rolls nothing back; the targets' desired and verified fingerprints let the next run of
this flow (or of renew-certificate) bring the fleet to one state.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.futures import wait
from prefect.task_runners import ThreadPoolTaskRunner

from certpilot.errors import PermanentError
from certpilot.rollout import Outcome, Report, TargetFailed, safe
from flows.tagging import tag_flow_run
from tasks.deployment import deploy_target, plan_deployment, publish_deployment_report, rollback_target
from certpilot.managed import certificate_tag

MAX_CONCURRENCY = 16  # the task runner's bound; a run's ``concurrency`` is at most this


def _outcome(target: dict[str, Any], future: Any) -> Outcome:
    if future.state.is_completed():
        return Outcome(**future.result())
    try:
        exc = future.result(raise_on_failure=False)
    except Exception as raised:  # a crashed run may have no exception to give back
        exc = raised
    if isinstance(exc, TargetFailed):
        return exc.outcome
    reason = safe(exc) if isinstance(exc, BaseException) else (future.state.message or future.state.name)
    return Outcome(target["name"], target["kind"], "failed", None, reason)


@flow(name="deploy-certificate", flow_run_name="deploy-{name}",
      task_runner=ThreadPoolTaskRunner(max_workers=MAX_CONCURRENCY), description=__doc__.split("\n\n")[1])
def deploy_certificate(name: str, fingerprint: str | None = None, canary: str | None = None,
                       concurrency: int = 4) -> dict[str, Any]:
    """Deploy managed certificate ``name`` (its current certificate, or ``fingerprint``) to all its
    targets: ``canary`` (default: the first by name) first, then ``concurrency`` at a time."""
    logger = get_run_logger()
    tag_flow_run(certificate_tag(name))
    plan = plan_deployment(name, fingerprint)
    fp = plan["fingerprint"]
    pending = list(plan["targets"])
    report = Report(name, fp)
    if not pending:
        logger.warning("managed certificate %s has no targets: nothing to deploy", name)
        return report.summary()
    if canary is not None:
        if canary not in [t["name"] for t in pending]:
            raise PermanentError(f"canary {canary!r} is not a target of {name}")
        pending.sort(key=lambda t: t["name"] != canary)
    size = max(1, min(concurrency, MAX_CONCURRENCY))
    waves = [pending[:1]] + [pending[i:i + size] for i in range(1, len(pending), size)]
    for index, wave in enumerate(waves):
        if report.failed:
            report.not_attempted += [t["name"] for t in wave]
            continue
        futures = [deploy_target.with_options(task_run_name=f"deploy-{name}-{t['name']}")
                   .submit(name, t["name"], fp) for t in wave]
        wait(futures)
        report.outcomes += [_outcome(t, f) for t, f in zip(wave, futures)]
        if index == 0 and not report.failed:
            logger.info("canary %s serves %s", wave[0]["name"], fp[:16])
    culprits = [o.target for o in report.outcomes if o.action not in ("deployed", "already-served")]
    if report.failed:  # undo every target this run changed (a failed target has undone itself)
        changed = [o for o in report.outcomes if o.receipt]
        futures = [rollback_target.with_options(task_run_name=f"rollback-{name}-{o.target}")
                   .submit(name, o.target, o.receipt) for o in reversed(changed)]
        wait(futures)
        rolled = {o.target: _outcome({"name": o.target, "kind": o.kind}, f) for o, f in zip(reversed(changed), futures)}
        report.outcomes = [rolled.get(o.target, o) for o in report.outcomes]
    publish_deployment_report(name, report.markdown())
    if report.failed:
        bad = [o for o in report.outcomes if o.action == "rollback-failed"]
        for o in report.outcomes:
            if o.target in culprits:
                logger.error("DEPLOYMENT FAILED at %s (%s): %s: %s", o.target, o.kind, o.action, o.detail)
            elif o.action != "already-served":
                logger.warning("%s (%s): %s: %s", o.target, o.kind, o.action, o.detail)
        shown = "; ".join(f"{o.target}: {o.action}: {o.detail}" for o in report.outcomes if o.target in culprits)
        state = ("every changed target was rolled back" if not bad
                 else f"{len(bad)} target(s) could not be rolled back: see the report")
        raise PermanentError(f"deployment of {name} ({fp[:16]}) failed; {state}: {shown}")
    logger.info("%s (%s) is served on all %d target(s)", name, fp[:16], len(report.outcomes))
    return report.summary()
