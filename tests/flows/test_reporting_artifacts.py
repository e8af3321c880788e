"""The operators' artifacts against a real Prefect server: a small flow publishes the SLIs (``sli``), the
executive view (``executive-view``, with its chart inline) and the on-call view (``on-call``); the
test reads them back through the API and checks what they say, and that no key is in them.

The estate is real: renewals through certpilot.renewing with a test issuer that really signs (one
failing), certificates expiring within 6, 24, 60 and 100 hours, a revocation by certpilot's own
CA, a target whose desired certificate is not yet verified; the monitor's and the alerts' rows
(EndpointCheck, Alert) are inserted as their code writes them."""

from __future__ import annotations

import base64
import datetime as dt
import re
import struct
from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from prefect import flow
from sqlmodel import select

from certpilot import audit, ca, inventory, keystore, managed, renewing, targets
from certpilot.clock import utcnow
from certpilot.database import get_engine, read_session, write_session
from certpilot.errors import InvalidOptionError, TransientError
from certpilot.issuance import build_csr
from certpilot.models import Alert, EndpointCheck, PrivateKey
from certpilot.sample_estate import issue_leaf, make_ca
from certpilot.settings import load_settings
from certpilot.x509info import describe_certificate
from tasks.reporting import PublishedReports, publish_reports
from tests.flows.test_renew_flows import _artifacts
from tests.keyprobe import leaks
from tests.sample_issuer import SampleIssuer

RUN = audit.Actor("prefect:renew-due", "0b9f5a8e-58a4-4f3c-a0c9-7d0f5a2f6e10")
NGINX = {"certificate_path": "/etc/nginx/web.crt", "key_path": "/etc/nginx/web.key"}
HOSTILE = "<img src=x onerror=alert(1)> | **bold** [link](http://example.test)"


@flow(name="publish-reports")
def reports_flow() -> PublishedReports:
    return publish_reports("30d")


def ring() -> keystore.KeyRing:
    return keystore.load_key_ring(load_settings())


@dataclass(frozen=True)
class Estate:
    engine: sa.Engine
    now: dt.datetime
    expiring: dict[str, str]  # name -> fingerprint
    revoked_serial: str
    renewed: dict[str, str]  # managed name -> fingerprint


@pytest.fixture
def estate(certpilot_home: Any) -> Estate:
    engine = get_engine()
    now = utcnow()
    authority = make_ca("Reporting Test CA")
    with write_session(engine) as session:
        for name in ("api", "shop", "mail", "vpn"):
            managed.add(session, managed.ManagedSpec(name=name, dns_names=(f"{name}.example.test",),
                                                     issuer="sample/ca", owner="team-web"), RUN)
    renewed = {}
    for name, days in (("api", 3.5), ("shop", 2.5), ("mail", 1.5)):
        renewed[name] = renewing.renew_one(engine, name, SampleIssuer(authority), ring, RUN,
                                           clock=lambda d=days: now - dt.timedelta(days=d)).fingerprint_sha256
    with pytest.raises(renewing.RenewalError):
        renewing.renew_one(engine, "vpn", SampleIssuer(authority, error=TransientError("CA busy (503)")), ring, RUN,
                           clock=lambda: now)
    expiring = {}
    with write_session(engine) as session:
        for name, hours in (("soon6", 5), ("soon24", 20), ("soon72", 60), ("later", 100)):
            cert, _ = issue_leaf(authority, [f"{name}.example.test"], now + dt.timedelta(hours=hours))
            expiring[name] = cert.fingerprint(hashes.SHA256()).hex()
            inventory.upsert(session, [inventory.Observation(describe_certificate(cert),
                                                             f"tls://{name}.example.test:443", "tls-scan:lab")], RUN)
        target = targets.add(session, "api", "web1", "ssh-nginx", "ssh-host/web", NGINX, RUN)
        targets.set_desired(session, target, renewed["api"], RUN)
        ca.init_ca(session, ring(), RUN, "corp", "http://127.0.0.1:8080", now=now - dt.timedelta(days=5))
        leaf = ca.issue(session, ring(), RUN, "corp", build_csr(ec.generate_private_key(ec.SECP256R1()),
                                                                ["gone.example.test"]), "tls-server").leaf
        ca.revoke(session, ring(), RUN, leaf.fingerprint(hashes.SHA256()).hex(), x509.ReasonFlags.key_compromise)
        session.add_all([
            EndpointCheck(place="tls://api.example.test:443", checked_at=now, served_fingerprint=renewed["api"],
                          expected_fingerprint=renewed["api"], ok=True, revocation="good"),
            EndpointCheck(place="tls://soon6.example.test:443", checked_at=now, served_fingerprint=expiring["soon6"],
                          ok=False, problems=["chain-incomplete"], revocation="good"),
            Alert(object=f"certificate:{expiring['soon6']}", condition="expiring", severity="page", state="open",
                  summary=HOSTILE, owner="team-web", first_seen=now - dt.timedelta(hours=1), last_seen=now),
            Alert(object="managed:shop", condition="renewal-failed", severity="critical", state="resolved",
                  summary="renewal of shop failed", first_seen=now - dt.timedelta(hours=5),
                  last_seen=now - dt.timedelta(hours=2), resolved_at=now - dt.timedelta(hours=2)),
        ])
    return Estate(engine, now, expiring, describe_certificate(leaf).serial_hex, renewed)


def stored_keys(engine: sa.Engine) -> list[PrivateKeyTypes]:
    with read_session(engine) as session:
        rows = session.exec(select(PrivateKey).where(PrivateKey.destroyed_at.is_(None))).all()  # type: ignore[union-attr]
        return [keystore.load_private_key(session, keystore.KeyRef(row.id), ring()) for row in rows]


def section(markdown: str, heading: str) -> str:
    """The text under ``## heading`` up to the next heading."""
    match = re.search(rf"^## {re.escape(heading)}.*?$(.*?)(?=^## |\Z)", markdown, re.S | re.M)
    assert match, f"no section {heading!r} in:\n{markdown}"
    return match.group(1)


def test_a_flow_publishes_the_sli_executive_and_on_call_artifacts(estate: Estate) -> None:
    state = reports_flow(return_state=True)
    assert state.is_completed(), state.message
    published = state.result()
    assert published.expiring == ((6, 1), (24, 2), (72, 3)) and published.chart
    assert (published.certificates, published.failing_renewals, published.deployments_in_progress) == (7, 1, 1)
    run_id = state.state_details.flow_run_id

    [sli_artifact] = _artifacts(run_id, "sli")
    text = sli_artifact.data
    assert sli_artifact.type == "markdown" and text.startswith("# Service level indicators, 30.0 d window")
    assert "| M1 | served certificates valid | 50.0 % | 1 of 2 |" in text
    assert "| M2 | renewal success rate | 75.0 % | 3 of 4 | failed: 1 |" in text
    assert "| M3 | time to repair a certificate incident | 3.0 h |  | p90\\_seconds: 3.0 h, incidents: 1 |" in text
    assert "| M6 | revocation propagation time | 0 ms |" in text  # the CA published its CRL at once
    assert "| M7 | share of automated rotations | 100.0 % | 3 of 3 | manual: 0 |" in text
    assert "| M8 | chain validation errors | 1 | 1 of 2 | share\\_percent: 50.0 %, places\\_checked: 2 |" in text
    assert "| M9 | certificate incidents | 2 |  | page: 1, critical: 1, ticket: 0 |" in text
    assert "| M10 | audit completeness | 100.0 % |" in text
    assert "| M5 | key store availability | 100.0 % |" in text and "| M4 | issuance latency |" in text

    [executive] = _artifacts(run_id, "executive-view")
    text = executive.data
    assert "| certificates in service | 7 |" in text and "| managed certificates | 4 |" in text
    assert "| places certificates are seen | 4 |" in text and "| deployment targets | 1 |" in text
    assert "| served certificates valid (M1) | 50.0 % (1 of 2) |" in text
    assert "| renewal success (M2) | 75.0 % (3 of 4) |" in text
    assert "| open alerts | page: 1, critical: 0, ticket: 0 |" in text
    [uri] = re.findall(r"!\[Renewals and incidents per day[^\]]*\]\((data:image/png;base64,[A-Za-z0-9+/=]+)\)", text)
    png = base64.b64decode(uri.split(",", 1)[1])
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) < 80_000
    assert struct.unpack(">II", png[16:24]) == (720, 230)  # 10 x 3.2 inches at 72 dpi
    trend = section(text, "Trend")
    days: dict[str, list[int]] = {}  # UTC day -> renewed, failed, incidents
    for at, column in [(estate.now - dt.timedelta(days=d), 0) for d in (3.5, 2.5, 1.5)] + [
            (estate.now, 1), (estate.now - dt.timedelta(hours=1), 2), (estate.now - dt.timedelta(hours=5), 2)]:
        days.setdefault(f"{at:%Y-%m-%d}", [0, 0, 0])[column] += 1
    assert [line for line in trend.splitlines() if re.match(r"^\| \d{4}-", line)] == [
        f"| {day} | {renewed} | {failed} | {incidents} |" for day, (renewed, failed, incidents) in sorted(days.items())]
    assert "| week from | certificates expiring |" in section(text, "Expiring ahead")

    [on_call] = _artifacts(run_id, "on-call")
    text = on_call.data
    assert "**1** expire within 6 h · **2** expire within 24 h · **3** expire within 72 h" in text
    soon = section(text, "Expiring within 72 hours")
    assert [n for n in ("soon6", "soon24", "soon72", "later") if f"{n}.example.test" in soon] == [
        "soon6", "soon24", "soon72"]
    assert estate.expiring["soon6"][:16] in soon
    alerts = section(text, "Open PAGE and CRITICAL alerts")
    assert "&lt;img src=x onerror=alert(1)&gt; \\| \\*\\*bold\\*\\* \\[link\\](http://example.test)" in alerts
    assert "<img" not in text and "renewal of shop failed" not in alerts  # escaped; the resolved one is gone
    failing = section(text, "Failing renewals")
    assert "| vpn | team-web |" in failing and "issue: CA busy (503)" in failing
    revocations = section(text, "Revocations since")
    assert "| corp |" in revocations and estate.revoked_serial in revocations.lower()
    assert "| keyCompromise |" in revocations
    deployments = section(text, "Deployments in progress")
    assert f"| api | web1 | ssh-nginx | {estate.renewed['api'][:16]} | never |" in deployments

    everything = "\n".join(a.data for a in (sli_artifact, executive, on_call)).encode()
    assert b"PRIVATE KEY" not in everything and b"-----BEGIN" not in everything
    keys = stored_keys(estate.engine)
    assert len(keys) >= 4 and leaks(everything, keys) == []


def test_a_window_that_is_not_a_duration_is_refused_by_name() -> None:
    with pytest.raises(InvalidOptionError, match="window must be a duration such as 30d, 12h or 2w, not 'soon'"):
        publish_reports.fn("soon")
