"""Reporting tasks: the operators' artifacts.

``publish_reports`` (the monitor flow runs it after each run) computes the SLIs once and publishes:

- the SLIs M1 to M10 over a window, artifact ``sli``;
- the executive view (artifact ``executive-view``: fleet size, served certificates
  valid, renewal success, incidents, and a chart of the window's trend) and the on-call view
  (artifact ``on-call``: what expires within 72, 24 and 6 hours, open PAGE and CRITICAL alerts,
  failing renewals, recent revocations, deployments in progress).

The chart is a PNG drawn by certpilot.charts and put inline in the markdown as a data URI, which the
Prefect UI shows with no other server and no Internet; when it cannot be drawn the view is published
without it and says why. Everything shown is public (certpilot.views escapes what it shows).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from certpilot import sli, views
from certpilot.clock import utcnow
from certpilot.database import get_engine, read_session
from certpilot.errors import InvalidOptionError, redact
from certpilot.timespan import parse_timespan

__all__ = ["DEFAULT_WINDOW", "PublishedReports", "publish_reports"]

DEFAULT_WINDOW = dt.timedelta(days=30)
RECENT_REVOCATIONS = dt.timedelta(days=7)


def as_window(window: dt.timedelta | str) -> dt.timedelta:
    """A window given as a duration or as text such as ``30d``."""
    if isinstance(window, dt.timedelta):
        return window
    try:
        return parse_timespan(window)
    except ValueError as exc:
        raise InvalidOptionError("window", window, "a duration such as 30d, 12h or 2w") from exc


@dataclass(frozen=True)
class PublishedReports:
    """What the reports showed, in numbers: the SLIs; certificates in service, how many expire within
    each of the on-call horizons (hours), failing renewals, deployments in progress; whether the chart
    was drawn."""

    sli: sli.SliReport
    certificates: int
    expiring: tuple[tuple[int, int], ...]
    failing_renewals: int
    deployments_in_progress: int
    chart: bool


@task(name="publish-reports", task_run_name="publish-reports", timeout_seconds=600)
def publish_reports(window: dt.timedelta | str = DEFAULT_WINDOW,
                    recent: dt.timedelta | str = RECENT_REVOCATIONS) -> PublishedReports:
    """Compute M1 to M10 over ``window`` up to now, once, and publish them (artifact key: sli), the
    executive view over the same window (executive-view) and the on-call view with the revocations of
    the last ``recent`` (on-call)."""
    span, recent_span = as_window(window), as_window(recent)
    now = utcnow()
    with read_session(get_engine()) as session:
        report = sli.compute(session, span, now)
        executive = views.executive_view(session, report)
        on_call = views.on_call_view(session, now, recent_span)
    create_markdown_artifact(key="sli", markdown=views.sli_markdown(report),
                             description="The service level indicators M1-M10 over the window")
    chart: bytes | None = None
    try:
        from certpilot.charts import trend_png

        chart = trend_png(executive)
    except Exception as exc:  # noqa: BLE001 - the view goes out without its chart, saying why
        get_run_logger().warning("the executive view's chart could not be drawn: %s", redact(exc))
    markdown = views.executive_markdown(executive, chart)
    if chart is None:
        markdown += "\n\n(The trend chart could not be drawn this time: see the run's logs.)"
    create_markdown_artifact(key="executive-view", markdown=markdown,
                             description="Certificates at a glance: fleet, validity, renewals, incidents, trend")
    create_markdown_artifact(key="on-call", markdown=views.on_call_markdown(on_call),
                             description="What needs someone now: expiring within 72/24/6 hours, alerts, "
                                         "failing renewals, revocations, deployments in progress")
    return PublishedReports(report, executive.certificates, on_call.expiring, len(on_call.failing_renewals),
                            len(on_call.deployments), chart is not None)
