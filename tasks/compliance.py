"""The compliance artifacts: ``publish_compliance`` builds the per-owner compliance report
(certpilot.compliance) and publishes it as a markdown artifact, ``compliance``, and the rows of its CSV
as a table artifact, ``compliance-table`` (the same columns as ``certpilot report compliance --csv``)."""

from __future__ import annotations

import csv
import datetime as dt
import io
from dataclasses import dataclass

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from certpilot.clock import utcnow
from certpilot.compliance import DEFAULT_WINDOW, compliance_markdown, compliance_report
from certpilot.database import get_engine, read_session
from tasks.reporting import as_window

__all__ = ["PublishedCompliance", "publish_compliance"]


@dataclass(frozen=True)
class PublishedCompliance:
    """What the artifacts showed, in numbers: owners, certificates, open and waived violations, waivers."""

    owners: int
    certificates: int
    open_violations: int
    waived_violations: int
    waivers: int


@task(name="publish-compliance", task_run_name="publish-compliance", timeout_seconds=600)
def publish_compliance(window: dt.timedelta | str = DEFAULT_WINDOW) -> PublishedCompliance:
    """Publish the compliance report over ``window`` (renewals, M7 and M2) as the ``compliance`` markdown
    artifact and its CSV rows as the ``compliance-table`` table artifact."""
    span = as_window(window)
    with read_session(get_engine()) as session:
        report = compliance_report(session, utcnow(), span)
    create_markdown_artifact(key="compliance", markdown=compliance_markdown(report),
                             description="Per owner: certificates, violations by rule, waivers, M7 and M2")
    rows = list(csv.DictReader(io.StringIO(report.to_csv())))
    create_table_artifact(table=rows, key="compliance-table",
                          description="The compliance report's CSV: one row per owner")
    return PublishedCompliance(len(report.owners), sum(o.certificates for o in report.owners),
                               sum(o.open_violations for o in report.owners),
                               sum(o.waived_violations for o in report.owners), len(report.waivers))
