"""The monitor flow: watch the estate and tell the right person once.

Every endpoint location and every target is checked on the wire (or, for a store, read back through its
deployer): what is served against what should be, the chain complete to a trust anchor, the host name,
the TLS version, the days left, the revocation status (CRL first, then OCSP); the certificates served are
evaluated against the policy and each place against its endpoint rules (violations stored per certificate
and per place). Certificates that nothing serves any more are listed apart and raise no expiry alert.
Then the silent stalls: renewals that failed or are overdue, renewal and deploy runs stuck beyond their
deadline, discovery sources that stopped completing, CAs and SSH hosts that do not answer. Everything
found becomes de-duplicated alerts (tasks.alerting.raise_alerts); the ``monitor`` artifact shows what was
served against what was expected, the ``sli``, ``executive-view`` and ``on-call`` artifacts the service
level indicators and the two views; once a day, after the alert policy's digest time, each owner gets the
digest of their ticket-level alerts.

Places are probed in batches (a task run per batch, not per endpoint). A part that could not run (a
batch, the services, Prefect's API, the policy) is named in the artifact, its alerts are neither raised
nor resolved, and the run fails after doing everything else.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from prefect import flow, get_run_logger
from prefect.futures import PrefectFuture

from certpilot.errors import PermanentError, redact
from certpilot.monitoring import Observed, Reachability
from flows.runners import thread_pool
from flows.settling import settle
from tasks.alerting import AlertSummary, raise_alerts, send_digest
from tasks.history import audit_head, publish_certificate_history
from tasks.monitoring import (
    MonitorPlan,
    check_services,
    evaluate_checks,
    plan_checks,
    probe_places,
    probe_timeout,
    publish_monitor_report,
    read_back_targets,
    read_unfinished_runs,
    source_interval,
)
from tasks.reporting import publish_reports

STUCK_AFTER_MINUTES = {"renew-due": 120.0, "renew-certificate": 30.0, "deploy-certificate": 30.0}
HISTORY_ARTIFACTS = 100  # managed certificates given a history artifact per run
FLOW_TIMEOUT = 840  # seconds: a run ends before the next one (every 15 minutes) is due


@dataclass(frozen=True)
class MonitorSummary:
    """What one monitor run checked and what it told."""

    places: int
    ok: int
    unreachable: int
    findings: int
    not_served: int
    alerts: AlertSummary
    failures: tuple[str, ...] = ()
    violations: int = 0  # policy violations not waived that this run found (certificates served, places)


class MonitorIncomplete(PermanentError):
    """Parts of a monitor run could not run; everything else was checked and told."""

    def __init__(self, failures: tuple[str, ...]) -> None:
        self.failures = failures
        super().__init__(f"{len(failures)} part(s) of the monitor run failed: " + "; ".join(failures))

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.failures,))


@flow(name="monitor", task_runner=thread_pool(4), timeout_seconds=FLOW_TIMEOUT,
      description=__doc__.split("\n\n")[1])
def monitor(trust_bundle_pem: str | None = None, use_system_trust: bool = True, probe_timeout_seconds: float = 5.0,
            concurrency: int = 200, batch_size: int = 1000, service_timeout_seconds: float = 5.0,
            renewal_grace_hours: float = 2.0, source_interval_hours: float | None = None,
            stuck_after_minutes: dict[str, float] | None = None) -> MonitorSummary:
    """Check every place and every silent stall, raise and resolve alerts.

    Args:
        trust_bundle_pem: CA certificates (PEM) that served chains may lead to, besides the private CAs'
            roots, the tls-scan blocks' trust bundles and (if use_system_trust) the system's roots.
        use_system_trust: Also trust the system's root certificates.
        probe_timeout_seconds: The most each handshake and each CRL or OCSP fetch may take.
        concurrency: Handshakes at once.
        batch_size: Places probed per task run.
        service_timeout_seconds: The most a CA or SSH host may take to answer.
        renewal_grace_hours: A managed certificate due for longer than this without a successful renewal
            is overdue.
        source_interval_hours: A discovery source whose last complete run is older than two of these is
            stale (empty: the discover deployment's schedule).
        stuck_after_minutes: Per flow name, how long a run may stay Pending, Running or Late before it is
            stuck (empty: renew-due 120, renew-certificate 30, deploy-certificate 30).
    """
    log = get_run_logger()
    deadlines = {name: dt.timedelta(minutes=m) for name, m in (stuck_after_minutes or STUCK_AFTER_MINUTES).items()}
    failures: list[str] = []
    failed: list[str] = []

    plan: MonitorPlan = plan_checks(trust_bundle_pem, use_system_trust)
    wire = plan.on_the_wire
    size = max(1, batch_size)
    batches = [wire[i:i + size] for i in range(0, len(wire), size)]
    probes = [probe_places.with_options(
        task_run_name=f"probe-places-{i + 1}-of-{len(batches)}",
        timeout_seconds=probe_timeout(len(batch), concurrency, probe_timeout_seconds)).submit(
        batch, plan.anchors, plan.trust, probe_timeout_seconds, concurrency) for i, batch in enumerate(batches)]
    read_back = read_back_targets.submit(plan.read_back) if plan.read_back else None
    services = check_services.submit(service_timeout_seconds)
    runs = read_unfinished_runs.submit(sorted(deadlines))
    interval = source_interval.submit(source_interval_hours)

    def outcome(future: PrefectFuture[Any], part: str, what: str) -> Any:
        """The task's result, or None when it failed (the part and why are noted)."""
        settled = settle(future)
        if settled.error is None:
            return settled.value
        failed.append(part)
        failures.append(f"{what}: {redact(settled.error)}")
        return None

    observed: list[Observed] = list(plan.unchecked)
    reachability: list[Reachability] = []
    for i, future in enumerate(probes):
        probed = outcome(future, "places", f"probe batch {i + 1} of {len(batches)}")
        if probed is not None:
            observed += probed.observed
            reachability += probed.unanswered
    if read_back is not None:
        observed += outcome(read_back, "places", "reading back the store targets") or []
    reachability += outcome(services, "services", "checking CAs and SSH hosts") or []
    unfinished = outcome(runs, "runs", "reading unfinished runs from Prefect") or []
    every = outcome(interval, "sources", "reading the discover deployment's schedule")

    report = evaluate_checks(list(plan.places), observed, reachability, unfinished, deadlines, every,
                             dt.timedelta(hours=renewal_grace_hours), sorted(set(failed)), failures)
    head = audit_head()
    told = raise_alerts(list(report.findings), report.scope)
    # The managed certificates whose alerts opened, escalated or resolved: their history artifacts.
    history = publish_certificate_history(None, head, limit=HISTORY_ARTIFACTS, return_state=True)
    if not history.is_completed():
        log.warning("the certificates' history artifacts were not published: %s", history.message)
    publish_monitor_report(report)
    send_digest()  # today's digest of ticket-level alerts, once, after the policy's digest time
    publish_reports()
    checks = report.evaluation.checks
    summary = MonitorSummary(len(checks), sum(1 for c in checks if c.ok), sum(1 for c in checks if c.error),
                             len(report.findings), len(report.evaluation.not_served), told, report.failures,
                             sum(report.violations.values()))
    log.info("monitor: %d place(s), %d ok, %d unreachable; %d finding(s); %d not served any more; alerts: %d "
             "opened, %d escalated, %d resolved", summary.places, summary.ok, summary.unreachable, summary.findings,
             summary.not_served, told.opened, told.escalated, told.resolved)
    if report.failures:
        for failure in report.failures:
            log.error("MONITOR CHECK FAILED: %s", failure)
        raise MonitorIncomplete(report.failures)
    return summary
