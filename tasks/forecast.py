"""The forecast task: the 47-day readiness forecast as the ``forecast`` markdown artifact.

``publish_forecast`` reads each ACME issuer block's directory (Let's Encrypt's decides the kind of issuer and
its published rate limits; a block that cannot be read falls back to the inventory's ACME account), runs
certpilot.forecast.forecast to ``until``, draws the chart (certpilot.charts.forecast_png) inline as a data URI
(the Prefect UI shows it with no other server), publishes the artifact and returns a small public record.
When the chart cannot be drawn the artifact goes out without it and says why. Everything shown is public:
issuer block names, DNS names, counts and times (certpilot.forecast escapes what it shows).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from blocks.issuers import acme_directory_urls
from certpilot import forecast as forecasting
from certpilot.database import get_engine, read_session
from certpilot.errors import InvalidOptionError, redact

__all__ = ["ARTIFACT_KEY", "PublishedForecast", "publish_forecast"]

ARTIFACT_KEY = "forecast"


@dataclass(frozen=True)
class PublishedForecast:
    """What the forecast artifact showed, in numbers: to when; how many issuers (unmanaged groups included),
    certificates and renewals (as scheduled, managed only); limits exceeded as scheduled and with renewals
    spread; the busiest week of any issuer and its renewals; whether the chart was drawn."""

    until: dt.date
    issuers: int
    certificates: int
    renewals: int
    exceedances: int
    spread_exceedances: int
    peak_week: dt.date | None
    peak_week_renewals: int
    chart: bool


def as_date(value: dt.date | str) -> dt.date:
    """``until`` given as a date or as text such as ``2029-12-31``."""
    if isinstance(value, dt.date):
        return value
    try:
        return dt.date.fromisoformat(value)
    except ValueError as exc:
        raise InvalidOptionError("until", value, "a date such as 2029-12-31") from exc


@task(name="publish-forecast", task_run_name="publish-forecast", timeout_seconds=600)
def publish_forecast(until: dt.date | str = forecasting.DEFAULT_UNTIL) -> PublishedForecast:
    """Forecast every renewal to ``until`` and publish it (artifact key: forecast)."""
    last_day = as_date(until)
    engine = get_engine()
    with read_session(engine) as session:
        names = forecasting.managed_issuers(session)
    directories = acme_directory_urls(names, lambda problem: get_run_logger().warning(
        "%s: its ACME directory comes from the inventory's accounts", problem))
    with read_session(engine) as session:
        report = forecasting.forecast(session, until=last_day, directories=directories)
    chart: bytes | None = None
    try:
        from certpilot.charts import forecast_png

        chart = forecast_png(report)
    except Exception as exc:  # noqa: BLE001 - the forecast goes out without its chart, saying why
        get_run_logger().warning("the forecast's chart could not be drawn: %s", redact(exc))
    markdown = forecasting.forecast_markdown(report, chart)
    if chart is None:
        markdown += "\n\n(The chart could not be drawn this time: see the run's logs.)"
    create_markdown_artifact(key=ARTIFACT_KEY, markdown=markdown,
                             description=f"Renewals per issuer and week to {last_day.isoformat()} under the shrinking "
                                         "lifetimes, against each issuer's rate limits")
    busiest = max(report.issuers, key=lambda f: f.scheduled.peak_week_renewals, default=None)
    return PublishedForecast(last_day, len(report.issuers), sum(f.certificates for f in report.issuers),
                             sum(report.totals_per_year().values()), len(report.exceedances),
                             sum(len(f.spread.exceedances) for f in report.issuers),
                             busiest.scheduled.peak_week if busiest else None,
                             busiest.scheduled.peak_week_renewals if busiest else 0, chart is not None)
