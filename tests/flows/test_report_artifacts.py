"""The reports flow on a real Prefect server: the forecast, risk, crypto-inventory and compliance artifacts
(tasks.forecast, tasks.risk, tasks.compliance), read back from the API."""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric import rsa

from certpilot import audit, violations
from certpilot.clock import utcnow
from certpilot.database import write_session
from certpilot.policy import DEFAULT_POLICY
from flows.reports import reports
from tests.flows.test_renew_flows import _artifacts
from tests.weak_certificates import DAY, Signer, add

pytestmark = pytest.mark.prefect


def test_the_report_tasks_publish_their_artifacts(engine: sa.Engine, prefect_server: None) -> None:
    now = utcnow()
    ca = Signer.make("Test Public CA")
    weak = add(engine, ca.leaf(["old.example.com"], now + 5 * DAY,
                               key=rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()),
               locators=["tls://old.example.com:443"], owner="web|<b>ops</b>")
    add(engine, ca.leaf(["api.example.com"], now + 60 * DAY), owner="api")
    with write_session(engine) as session:
        violations.evaluate_certificates(session, DEFAULT_POLICY, audit.Actor("cli:alice"), now=now)

    state = reports(until=(now + 400 * DAY).date(), risk_listed=10, return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    risk, compliance, forecast = summary.risk, summary.compliance, summary.forecast
    assert (risk.scored, risk.certificates, risk.weak, risk.to_reissue) == (2, 2, 1, 2)
    assert risk.riskiest[0][0] == weak
    assert (compliance.owners, compliance.certificates, compliance.open_violations) == (2, 2, 2)  # key-size, expiring

    run = state.state_details.flow_run_id
    markdown = _artifacts(run, "risk")[0].data
    assert weak[:16] in markdown and "weak key: RSA key of 1024 bits" in markdown
    assert "<b>" not in markdown and "web\\|&lt;b&gt;ops&lt;/b&gt;" in markdown
    crypto = _artifacts(run, "crypto-inventory")[0].data
    assert "| RSA-1024 | 1 | weak |" in crypto and "## Post-quantum readiness" in crypto
    per_owner = _artifacts(run, "compliance")[0].data
    assert "| api | 1 | 0 | 1 (100 %) | none | none | none | no data | no data |" in per_owner
    assert "| web\\|&lt;b&gt;ops&lt;/b&gt; | 1 | 0 | 0 (0 %) | key-size: 1, expiring: 1 |" in per_owner
    table = _artifacts(run, "compliance-table")[0].data
    rows = json.loads(table) if isinstance(table, str) else table
    assert [row["owner"] for row in rows] == ["api", "web|<b>ops</b>"]
    assert rows[1]["open:key-size"] == "1" and rows[1]["open:expiring"] == "1"
    assert forecast is not None and forecast.until == (now + 400 * DAY).date()
    assert (forecast.certificates, forecast.renewals) == (2, 0)  # two unmanaged; renewals count managed ones only
    projected = _artifacts(run, "forecast")[0].data
    assert "unmanaged: " in projected and "renewed by hand" in projected
    assert forecast.chart == ("data:image/png;base64," in projected)
