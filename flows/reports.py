"""The reports flow: the policy's reports as artifacts, once a day.

Publish the 47-day readiness forecast (forecast), the riskiest certificates and the crypto inventory (risk,
crypto-inventory) and the per-owner compliance report (compliance, compliance-table). Each report is a task
run of its own: one that fails does not stop the others, and the run fails naming it.

The monitor flow publishes the operational views (sli, executive-view, on-call) every 15 minutes; these
change slowly and the forecast reads every managed certificate's schedule, so they run daily.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from prefect import flow, get_run_logger
from prefect.futures import PrefectFuture

from certpilot import forecast as forecasting
from certpilot.errors import PermanentError, redact
from flows.runners import thread_pool
from flows.settling import settle
from tasks.compliance import PublishedCompliance, publish_compliance
from tasks.forecast import PublishedForecast, publish_forecast
from tasks.risk import DEFAULT_LISTED, PublishedRisk, publish_risk


@dataclass(frozen=True)
class ReportsSummary:
    """What each report showed in numbers (None: that report failed)."""

    forecast: PublishedForecast | None
    risk: PublishedRisk | None
    compliance: PublishedCompliance | None


class ReportsIncomplete(PermanentError):
    """Some reports could not be published; the others were."""

    def __init__(self, failures: tuple[str, ...]) -> None:
        self.failures = failures
        super().__init__(f"{len(failures)} report(s) were not published: " + "; ".join(failures))

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.failures,))


@flow(name="reports", task_runner=thread_pool(3), timeout_seconds=1800, description=__doc__.split("\n\n")[1])
def reports(until: dt.date = forecasting.DEFAULT_UNTIL, risk_listed: int = DEFAULT_LISTED,
            compliance_window: str = "30d") -> ReportsSummary:
    """Publish the forecast, risk, crypto-inventory and compliance artifacts.

    Args:
        until: The last day the forecast projects renewals to.
        risk_listed: How many of the riskiest certificates the risk artifact lists.
        compliance_window: The span the compliance report counts renewals over (such as 30d).
    """
    futures: dict[str, PrefectFuture[Any]] = {"forecast": publish_forecast.submit(until), "risk": publish_risk.submit(risk_listed),
               "compliance": publish_compliance.submit(compliance_window)}
    settled = {name: settle(future) for name, future in futures.items()}
    failures = tuple(f"{name}: {redact(s.error)}" for name, s in settled.items() if s.error is not None)
    summary = ReportsSummary(settled["forecast"].value, settled["risk"].value, settled["compliance"].value)
    log = get_run_logger()
    if failures:
        for failure in failures:
            log.error("REPORT NOT PUBLISHED: %s", failure)
        raise ReportsIncomplete(failures)
    log.info("reports published: forecast, risk, crypto-inventory, compliance")
    return summary
