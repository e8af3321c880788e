"""The SLIs M1 to M10 (certpilot.sli) from known inputs, on SQLite and PostgreSQL, and
``certpilot report sli``.

Renewals are real (certpilot.renewing with a test issuer that really signs), revocations go through
certpilot's own CA, audit events are appended through certpilot.audit; the monitor's and the alerts'
rows (EndpointCheck, Alert) are inserted as those engineers' code writes them."""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from sqlmodel import select
from typer.testing import CliRunner

from certpilot import audit, ca, inventory, keystore, managed, propagation, renewing, sli
from certpilot.clock import utcnow
from certpilot.database import read_session, write_session
from certpilot.errors import InvalidOptionError, MasterKeyError, TransientError
from certpilot.issuance import build_csr
from certpilot.models import Alert, AuditEvent, Certificate, EndpointCheck
from certpilot.sample_estate import Authority, issue_leaf, make_ca
from certpilot.settings import load_settings
from certpilot.x509info import describe_certificate
from cli.main import app
from tests.sample_issuer import SampleIssuer

UTC = dt.timezone.utc
CLI = audit.Actor("cli:alice")
RUN = audit.Actor("prefect:renew-due", "6f1c1a52-0d8c-4b8e-9d1e-3f1f2a0b7c11")
WINDOW = dt.timedelta(days=30)


@pytest.fixture(scope="module")
def authority() -> Authority:
    return make_ca("SLI Test CA")


@pytest.fixture
def now() -> dt.datetime:
    return utcnow().replace(microsecond=0)


def ring() -> keystore.KeyRing:
    return keystore.load_key_ring(load_settings())


def report(engine: sa.Engine, now: dt.datetime, window: dt.timedelta = WINDOW) -> sli.SliReport:
    with read_session(engine) as session:
        return sli.compute(session, window, now)


def add_managed(engine: sa.Engine, *names: str) -> None:
    with write_session(engine) as session:
        for name in names:
            managed.add(session, managed.ManagedSpec(name=name, dns_names=(f"{name}.example.test",),
                                                     issuer="sample/ca", owner="platform"), CLI)


def renew(engine: sa.Engine, name: str, issuer: SampleIssuer, actor: audit.Actor, at: dt.datetime,
          key_ring: Any = ring) -> renewing.Renewal | renewing.RenewalError:
    try:
        return renewing.renew_one(engine, name, issuer, key_ring, actor, clock=lambda: at)
    except renewing.RenewalError as exc:
        return exc


def append(engine: sa.Engine, at: dt.datetime, *changes: audit.Change, actor: audit.Actor = CLI) -> None:
    with write_session(engine) as session:
        audit.append(session, actor, changes, at)


def check(place: str, at: dt.datetime, served: str | None, ok: bool, problems: tuple[str, ...] = (),
          revocation: str | None = "good", error: str | None = None) -> EndpointCheck:
    return EndpointCheck(place=place, checked_at=at, served_fingerprint=served, expected_fingerprint=served, ok=ok,
                         problems=list(problems), revocation=revocation, error=error, tls_version="TLSv1.3")


def alert(obj: str, severity: str, first_seen: dt.datetime, resolved_at: dt.datetime | None) -> Alert:
    return Alert(object=obj, condition="expiring", severity=severity, state="resolved" if resolved_at else "open",
                 summary=f"{obj} expires soon", first_seen=first_seen, last_seen=resolved_at or first_seen,
                 resolved_at=resolved_at)


# ------------------------------------------------------------------------------------ an empty inventory

def test_nothing_to_measure_gives_no_number_but_a_reason(engine: sa.Engine, now: dt.datetime) -> None:
    r = report(engine, now)
    assert [s.key for s in r.slis] == list(sli.KEYS)
    assert r.start == now - WINDOW and r.end == now
    for key in ("M1", "M2", "M3", "M4", "M5", "M6", "M7", "M8", "M10"):
        got = r.get(key)
        assert got.value is None and got.reason, key
        assert got.shown == "no data"
    assert r.get("M1").reason == "no place serving a certificate was checked in the window"
    assert r.get("M2").reason == "no renewal was attempted in the window"
    assert r.get("M10").reason == "no certificate was added, issued or revoked in the window (the chain of 0 events verifies)"
    assert r.get("M9").value == 0 and r.get("M9").details == (("page", 0), ("critical", 0), ("ticket", 0))
    with pytest.raises(InvalidOptionError, match="window must be a positive duration"):
        report(engine, now, dt.timedelta(0))


# ------------------------------------------------------------------------------------ renewals (M2, M4, M5, M7)

def test_three_of_four_renewals_succeeded_is_75_percent(engine: sa.Engine, authority: Authority,
                                                        now: dt.datetime) -> None:
    add_managed(engine, "a", "b", "c", "d", "old")
    ok, broken = SampleIssuer(authority), SampleIssuer(authority, error=TransientError("CA busy (503)"))
    assert isinstance(renew(engine, "a", ok, RUN, now - dt.timedelta(days=3)), renewing.Renewal)
    assert isinstance(renew(engine, "b", ok, RUN, now - dt.timedelta(days=2)), renewing.Renewal)
    assert isinstance(renew(engine, "c", ok, CLI, now - dt.timedelta(days=1)), renewing.Renewal)
    assert isinstance(renew(engine, "d", broken, RUN, now - dt.timedelta(hours=5)), renewing.RenewalError)
    # outside the 30-day window: not counted
    assert isinstance(renew(engine, "old", ok, CLI, now - dt.timedelta(days=40)), renewing.Renewal)
    assert isinstance(renew(engine, "old", broken, CLI, now - dt.timedelta(days=35)), renewing.RenewalError)

    r = report(engine, now)
    m2 = r.get("M2")
    assert (m2.value, m2.numerator, m2.denominator, m2.unit) == (75.0, 3, 4, "percent")
    assert m2.detail("failed") == 1 and m2.shown == "75.0 %" and m2.ratio == "3 of 4"
    m7 = r.get("M7")  # two by a flow run, one at the CLI
    assert (m7.numerator, m7.denominator, m7.detail("manual")) == (2, 3, 1)
    assert m7.value == pytest.approx(200 / 3)
    m4 = r.get("M4")  # the issuer is timed by the renewal itself
    assert m4.detail("samples") == 3 and m4.value is not None and 0 <= m4.value < 5
    m5 = r.get("M5")  # four keys stored in the window (the failed attempt's too), no key-store step failed
    assert (m5.value, m5.numerator, m5.denominator) == (100.0, 4, 4)
    assert r.get("M10").value == 100.0 and r.get("M10").detail("chain_verified") is True

    with read_session(engine) as session:
        issued = session.exec(select(AuditEvent).where(AuditEvent.action == "certificate.issued")
                              .order_by(AuditEvent.seq)).all()
        assert audit.verify(session).events > 0
    measured = [json.loads(e.details)["issuance_seconds"] for e in issued]
    assert len(measured) == 4 and all(isinstance(v, float) and 0 <= v < 5 for v in measured)
    # a longer window takes in the old ones
    assert report(engine, now, dt.timedelta(days=60)).get("M2").ratio == "4 of 6"


def test_key_store_failures_lower_its_availability(engine: sa.Engine, authority: Authority, now: dt.datetime) -> None:
    add_managed(engine, "a", "b")
    issuer = SampleIssuer(authority)

    def locked_key_store() -> keystore.KeyRing:
        raise MasterKeyError("the master key file is unreadable")

    assert isinstance(renew(engine, "a", issuer, RUN, now - dt.timedelta(days=1)), renewing.Renewal)
    failed = renew(engine, "b", issuer, RUN, now - dt.timedelta(hours=1), key_ring=locked_key_store)
    assert isinstance(failed, renewing.RenewalError) and failed.step == renewing.Step.KEY
    m5 = report(engine, now).get("M5")
    assert (m5.value, m5.numerator, m5.denominator, m5.detail("failed")) == (50.0, 1, 2, 1)
    assert report(engine, now).get("M2").ratio == "1 of 2"


def test_issuance_latency_percentiles_from_the_audit_trail(engine: sa.Engine, now: dt.datetime) -> None:
    for i, seconds in enumerate((1.0, 2.0, 3.0, 4.0, 10.0)):
        append(engine, now - dt.timedelta(hours=i + 1), audit.Change("certificate.issued", f"certificate:{i:064x}", {
            "managed": f"m{i}", "issuance_seconds": seconds}), actor=RUN)
    append(engine, now - dt.timedelta(days=31), audit.Change("certificate.issued", f"certificate:{9:064x}", {
        "managed": "old", "issuance_seconds": 500.0}))
    append(engine, now - dt.timedelta(hours=1), audit.Change("certificate.issued", f"certificate:{8:064x}", {
        "ca": "corp", "profile": "tls-server"}))  # `ca issue` from a CSR: not timed, not a rotation
    r = report(engine, now)
    m4 = r.get("M4")
    assert m4.value == 3.0 and m4.detail("p90_seconds") == pytest.approx(7.6) and m4.detail("samples") == 5
    assert m4.shown == "3 s"
    assert r.get("M7").ratio == "5 of 5" and r.get("M2").ratio == "5 of 5"


# ------------------------------------------------------------------------------------ endpoint checks (M1, M8)

def test_served_certificates_valid_and_chain_errors(engine: sa.Engine, authority: Authority, now: dt.datetime) -> None:
    good, _ = issue_leaf(authority, ["good.example.test"], now + dt.timedelta(days=60))
    expired, _ = issue_leaf(authority, ["expired.example.test"], now - dt.timedelta(days=2))
    fp = {name: cert.fingerprint(hashes.SHA256()).hex() for name, cert in (("good", good), ("expired", expired))}
    with write_session(engine) as session:
        inventory.upsert(session, [inventory.Observation(describe_certificate(c), None, "import")
                                   for c in (good, expired)], CLI, now=now - dt.timedelta(days=100))
        session.add_all([
            check("tls://a.example.test:443", now - dt.timedelta(minutes=5), fp["good"], ok=True),
            check("tls://b.example.test:443", now - dt.timedelta(minutes=5), fp["good"], ok=False,
                  problems=("revoked-served",), revocation="revoked"),
            check("tls://c.example.test:443", now - dt.timedelta(minutes=5), fp["expired"], ok=True),
            check("tls://d.example.test:443", now - dt.timedelta(minutes=5), fp["good"], ok=False,
                  problems=("chain-incomplete",)),
            check("tls://e.example.test:443", now - dt.timedelta(minutes=5), None, ok=False, revocation=None,
                  error="connection refused"),
            check("target:web/nginx", now - dt.timedelta(days=31), fp["good"], ok=False,
                  problems=("chain-incomplete",)),  # checked before the window
        ])
    r = report(engine, now)
    m1 = r.get("M1")  # a, of a b c d (e served nothing)
    assert (m1.value, m1.numerator, m1.denominator) == (25.0, 1, 4)
    assert (m1.detail("revoked"), m1.detail("expired"), m1.detail("unreachable")) == (1, 1, 1)
    m8 = r.get("M8")
    assert (m8.value, m8.numerator, m8.denominator, m8.detail("share_percent")) == (1.0, 1, 4, 25.0)
    assert m8.unit == "count" and m8.detail("places_checked") == 5
    assert report(engine, now, dt.timedelta(days=60)).get("M8").value == 2.0


# ------------------------------------------------------------------------------------ alerts (M3, M9)

def test_time_to_repair_and_incidents_by_severity(engine: sa.Engine, now: dt.datetime) -> None:
    h = dt.timedelta(hours=1)
    with write_session(engine) as session:
        session.add_all([
            alert("certificate:a", "page", now - 10 * h, now - 9 * h),  # repaired in 1 h
            alert("certificate:b", "critical", now - 10 * h, now - 7 * h),  # 3 h
            alert("certificate:c", "critical", now - 10 * h, now - 5 * h),  # 5 h
            alert("certificate:d", "ticket", now - 10 * h, now - 8 * h),  # a ticket: not an incident to repair
            alert("certificate:e", "page", now - 2 * h, None),  # still open
            alert("certificate:f", "critical", now - 40 * 24 * h, now - 39 * 24 * h),  # all before the window
        ])
    r = report(engine, now)
    m3 = r.get("M3")
    assert m3.value == 3 * 3600 and m3.detail("p90_seconds") == pytest.approx(4.6 * 3600)
    assert m3.detail("incidents") == 3 and m3.shown == "3.0 h"
    m9 = r.get("M9")
    assert m9.value == 5 and m9.details == (("page", 2), ("critical", 2), ("ticket", 1))


# ------------------------------------------------------------------------------------ revocation (M6)

def test_revocation_propagation_to_the_next_crl(engine: sa.Engine, now: dt.datetime) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    t0 = now - dt.timedelta(days=1)
    with write_session(engine) as session:
        ca.init_ca(session, ring(), CLI, "corp", "http://127.0.0.1:8080", now=t0 - dt.timedelta(days=1))
        leaves = [ca.issue(session, ring(), CLI, "corp", build_csr(key, [f"r{i}.example.test"]), "tls-server",
                           now=t0).leaf for i in range(2)]
    fps = [leaf.fingerprint(hashes.SHA256()).hex() for leaf in leaves]
    with write_session(engine) as session:  # revoked and published in one go: 0 s
        ca.revoke(session, ring(), CLI, fps[0], x509.ReasonFlags.key_compromise, now=t0)
    # revoked, its CRL published ten minutes later (as when the first publication failed)
    append(engine, t0 + dt.timedelta(hours=1), audit.Change("certificate.revoked", f"certificate:{fps[1]}",
                                                             {"ca": "corp", "reason": "superseded"}))
    m6 = report(engine, now).get("M6")  # the second is in no CRL yet: it counts with its age, 23 hours
    assert m6.value == (now - t0 - dt.timedelta(hours=1)).total_seconds() and m6.detail("pending") == 1
    with write_session(engine) as session:
        ca.publish_crl(session, ring(), CLI, "corp", now=t0 + dt.timedelta(hours=1, minutes=10))
    append(engine, t0 + dt.timedelta(hours=2), audit.Change("certificate.revoked", f"certificate:{'f' * 64}",
                                                             {"ca": "acme/letsencrypt", "reason": "superseded"}))
    m6 = report(engine, now).get("M6")
    assert m6.value == 600 and m6.detail("median_seconds") == 300
    assert (m6.detail("revocations"), m6.detail("pending"), m6.detail("untracked")) == (2, 0, 1)


def test_revocation_propagation_none_and_pending(engine: sa.Engine, now: dt.datetime) -> None:
    append(engine, now - dt.timedelta(hours=3), audit.Change("certificate.revoked", f"certificate:{'e' * 64}",
                                                              {"ca": "acme/letsencrypt"}))
    m6 = report(engine, now).get("M6")
    assert m6.value is None and m6.reason == ("1 revocation(s) in the window, none by a certpilot CA "
                                              "(no CRL of its own to follow)")
    with write_session(engine) as session:
        ca.init_ca(session, ring(), CLI, "corp", "http://127.0.0.1:8080", now=now - dt.timedelta(days=2))
    append(engine, now - dt.timedelta(hours=2), audit.Change("certificate.revoked", f"certificate:{'d' * 64}",
                                                              {"ca": "corp"}))
    m6 = report(engine, now).get("M6")  # no CRL since: at least two hours and counting
    assert m6.value == 7200 and m6.detail("pending") == 1 and m6.shown == "2.0 h"


def watched(seconds: float | None, crl: float | None, ocsp: float | None) -> propagation.Propagation:
    """What connectors.revocation.watch_revocation returns (the watch itself is tested over HTTP in
    tests/integration/test_revocation_propagation.py)."""
    return propagation.Propagation("http://127.0.0.1:8080/corp/issuing.crl", "http://127.0.0.1:8080/corp/ocsp",
                                   crl, ocsp, seconds, "seen" if seconds is not None else "not seen")


def test_revocation_propagation_measured_by_a_relying_party_comes_first(engine: sa.Engine, now: dt.datetime) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    t0 = now - dt.timedelta(days=1)
    with write_session(engine) as session:
        ca.init_ca(session, ring(), CLI, "corp", "http://127.0.0.1:8080", now=t0 - dt.timedelta(days=1))
        leaves = [ca.issue(session, ring(), CLI, "corp", build_csr(key, [f"w{i}.example.test"]), "tls-server",
                           now=t0).leaf for i in range(3)]
    fps = [leaf.fingerprint(hashes.SHA256()).hex() for leaf in leaves]
    with write_session(engine) as session:  # each revocation is in a CRL at once: 0 s by CRL publication
        for fp in fps:
            ca.revoke(session, ring(), CLI, fp, x509.ReasonFlags.key_compromise, now=t0)
    with write_session(engine) as session:  # the relying party saw the first after 2.5 s
        propagation.record_propagation(session, fps[0], watched(2.5, 0.4, 2.5), CLI, now=t0 + dt.timedelta(seconds=3))
    m6 = report(engine, now).get("M6")
    assert m6.value == 2.5
    assert (m6.detail("measured"), m6.detail("by_crl_publication"), m6.detail("not_seen")) == (1, 2, 0)
    assert "revocation_visible" in m6.definition and "ca.crl_issued" in m6.definition and "for 1" in m6.definition

    with write_session(engine) as session:  # the others measured too: the definition names only the watch
        propagation.record_propagation(session, fps[1], watched(0.2, 0.2, 0.1), CLI, now=t0 + dt.timedelta(seconds=3))
        propagation.record_propagation(session, fps[2], watched(1.0, 1.0, 0.5), CLI, now=t0 + dt.timedelta(seconds=3))
    m6 = report(engine, now).get("M6")
    assert m6.value == 2.5 and m6.detail("median_seconds") == 1.0
    assert (m6.detail("measured"), m6.detail("by_crl_publication")) == (3, 0)
    assert "revocation_visible" in m6.definition and "ca.crl_issued" not in m6.definition

    # a watch that ended before both said revoked: not known to be visible, counted with its age
    with write_session(engine) as session:
        propagation.record_propagation(session, fps[1], watched(None, 0.2, None), CLI, now=t0 + dt.timedelta(minutes=1))
    m6 = report(engine, now).get("M6")
    assert m6.value == (now - t0).total_seconds() and m6.detail("not_seen") == 1


def test_an_acme_revocation_is_tracked_once_measured(engine: sa.Engine, now: dt.datetime) -> None:
    fp = "c" * 64
    append(engine, now - dt.timedelta(hours=1), audit.Change("certificate.revoked", f"certificate:{fp}",
                                                              {"ca": "acme/letsencrypt"}))
    assert report(engine, now).get("M6").detail("untracked") == 1
    with write_session(engine) as session:
        propagation.record_propagation(session, fp, watched(4.0, 4.0, 1.5), CLI, now=now - dt.timedelta(minutes=59))
    m6 = report(engine, now).get("M6")
    assert m6.value == 4.0 and (m6.detail("measured"), m6.detail("untracked")) == (1, 0)
    # a measurement before the revocation (of an earlier watch) does not count for it
    append(engine, now - dt.timedelta(minutes=30), audit.Change("certificate.revoked", f"certificate:{fp}",
                                                                {"ca": "acme/letsencrypt"}))
    m6 = report(engine, now).get("M6")
    assert (m6.detail("measured"), m6.detail("untracked")) == (1, 1)


# ------------------------------------------------------------------------------------ audit completeness (M10)

def test_audit_completeness_names_what_has_no_event(engine: sa.Engine, authority: Authority,
                                                    now: dt.datetime) -> None:
    add_managed(engine, "web")
    assert isinstance(renew(engine, "web", SampleIssuer(authority), RUN, now - dt.timedelta(days=1)), renewing.Renewal)
    m10 = report(engine, now).get("M10")
    # the leaf and the CA certificate added, the leaf issued
    assert (m10.value, m10.numerator, m10.denominator, m10.detail("missing")) == (100.0, 3, 3, 0)
    stray, _ = issue_leaf(authority, ["stray.example.test"], now + dt.timedelta(days=30))
    record = describe_certificate(stray)
    with write_session(engine) as session:  # written behind the audit trail's back
        session.add(Certificate(fingerprint_sha256=record.fingerprint_sha256, subject=record.subject,
                                issuer=record.issuer, serial_hex=record.serial_hex, not_before=record.not_before,
                                not_after=record.not_after, key_type=record.key_type, signature_algorithm="x",
                                der=record.der, created_at=now - dt.timedelta(hours=1), status="revoked",
                                revoked_at=now - dt.timedelta(minutes=30)))
    m10 = report(engine, now).get("M10")
    assert (m10.numerator, m10.denominator, m10.detail("missing")) == (3, 5, 2)
    assert m10.value == 60.0 and m10.detail("chain_verified") is True
    assert m10.detail("missing_examples") == (f"certificate.added certificate:{record.fingerprint_sha256[:16]}; "
                                              f"certificate.revoked certificate:{record.fingerprint_sha256[:16]}")


def test_a_broken_chain_makes_audit_completeness_zero(engine: sa.Engine, now: dt.datetime) -> None:
    for i in range(3):
        append(engine, now - dt.timedelta(hours=i), audit.Change("key.stored", f"key:{i}", {}))
    with write_session(engine) as session:
        session.execute(sa.update(AuditEvent).where(AuditEvent.seq == 2).values(details='{"forged":true}'))
    m10 = report(engine, now).get("M10")
    assert m10.value == 0.0 and m10.detail("chain_verified") is False
    assert m10.detail("chain_error") == "audit chain broken at event 2: its contents do not match its hash (altered)"


# ------------------------------------------------------------------------------------ percentile, shown

def test_percentile_interpolates_between_ranks() -> None:
    assert sli.percentile([5.0], 0.9) == 5.0
    assert sli.percentile([4.0, 1.0, 3.0, 2.0], 0.5) == 2.5
    assert sli.percentile([1.0, 2.0, 3.0, 4.0, 10.0], 0.9) == pytest.approx(7.6)
    with pytest.raises(ValueError):
        sli.percentile([], 0.5)
    assert [sli.shown_seconds(s) for s in (0, 0.25, 90, 600, 7200, 3 * 86400)] == [
        "0 ms", "250 ms", "90 s", "10.0 min", "2.0 h", "3.0 d"]


# ------------------------------------------------------------------------------------ the CLI

def cli(*args: str) -> Any:
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})


@pytest.fixture
def renewed(engine: sa.Engine, authority: Authority) -> Iterator[None]:
    add_managed(engine, "a", "b", "c", "d")
    now = utcnow()
    for name, when in (("a", 3), ("b", 2), ("c", 1)):
        renew(engine, name, SampleIssuer(authority), RUN, now - dt.timedelta(days=when))
    renew(engine, "d", SampleIssuer(authority, error=TransientError("CA busy")), CLI, now - dt.timedelta(hours=1))
    yield


def test_cli_report_sli_json(renewed: None) -> None:
    result = cli("report", "sli", "--window", "30d", "--json")
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    assert got["window_seconds"] == 30 * 86400
    by_key = {s["key"]: s for s in got["slis"]}
    assert list(by_key) == list(sli.KEYS)
    assert by_key["M2"] | {"definition": None} == {
        "key": "M2", "name": "renewal success rate", "value": 75.0, "unit": "percent", "numerator": 3,
        "denominator": 4, "reason": None, "details": {"failed": 1}, "definition": None}
    assert by_key["M1"]["value"] is None
    assert by_key["M1"]["reason"] == "no place serving a certificate was checked in the window"
    assert by_key["M7"]["numerator"] == 3 and by_key["M10"]["value"] == 100.0


def test_cli_report_sli_text_and_window(renewed: None) -> None:
    result = cli("report", "sli")
    assert result.exit_code == 0, result.output
    cells = [[c.strip() for c in line.split("│")] for line in result.stdout.splitlines() if re.match(r"^M\d+ ", line)]
    rows = {row[0]: row[1:] for row in cells}
    assert list(rows) == list(sli.KEYS)
    assert rows["M2"] == ["renewal success rate", "75.0 %", "3 of 4", "failed: 1"]
    assert rows["M1"] == ["served certificates valid", "no data", "", "no place serving a certificate was checked in "
                          "the window"]
    narrow = json.loads(cli("report", "sli", "--window", "36h", "--json").stdout)
    assert next(s for s in narrow["slis"] if s["key"] == "M2")["numerator"] == 1  # only c, a day ago


@pytest.mark.parametrize("window", ["soon", "0d", ""])
def test_cli_report_sli_refuses_a_bad_window(engine: sa.Engine, window: str) -> None:
    result = cli("report", "sli", "--window", window, "--json")
    assert result.exit_code == 2
    assert "--window" in json.loads(result.stdout)["error"]
