"""/metrics (certpilot.metrics.render) on SQLite and PostgreSQL, read back with prometheus-client's own
parser and checked by promtool: real certificates in the inventory (the session's test CA, a sample
issuer that really signs, certpilot's private CA), real renewals, failures, targets and alerts."""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client.parser import text_string_to_metric_families

from certpilot import alerts, audit, ca, inventory, keystore, managed, metrics, propagation, renewing, sli, targets
from certpilot.database import read_session, write_session
from certpilot.errors import PermanentError
from certpilot.issuance import build_csr
from certpilot.models import AuditEvent, Certificate, EndpointCheck, Location, ManagedCertificate, SourceRun
from certpilot.sample_estate import Authority, issue_leaf
from certpilot.settings import load_settings
from certpilot.x509info import describe_certificate, fingerprint_sha256
from tests.sample_issuer import SampleIssuer

ACTOR = audit.Actor("test")
UTC = dt.timezone.utc
Labels = dict[str, str]


def promtool_check(text: bytes) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is not installed: bash scripts/setup.sh --servers (Debian package prometheus)"
    done = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=60)
    assert done.returncode == 0 and not done.stdout.strip() and not done.stderr.strip(), \
        f"promtool check metrics: exit {done.returncode}\n{done.stdout.decode()}{done.stderr.decode()}"


def samples(text: bytes) -> dict[str, list[tuple[Labels, float]]]:
    """Every sample by its name (counters with _total), as prometheus-client parses the text."""
    out: dict[str, list[tuple[Labels, float]]] = {}
    for family in text_string_to_metric_families(text.decode("utf-8")):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return out


def one(found: dict[str, list[tuple[Labels, float]]], metric: str, /, **labels: str) -> tuple[Labels, float]:
    matching = [(l, v) for l, v in found.get(metric, []) if all(l.get(k) == want for k, want in labels.items())]
    assert len(matching) == 1, f"{metric}{labels}: {len(matching)} series: {found.get(metric)}"
    return matching[0]


def add_seen(engine: sa.Engine, cert: x509.Certificate, locator: str | None = "tls://leaf.example.test:443",
             owner: str | None = None) -> str:
    with write_session(engine) as session:
        inventory.upsert(session, [inventory.Observation(describe_certificate(cert), locator, "tls-scan:lab")], ACTOR,
                         owner=owner)
    return fingerprint_sha256(cert)


def leaf_named(authority: Authority, subject: x509.Name, not_after: dt.datetime) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(authority.certificate.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(not_after - dt.timedelta(days=90)).not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("odd.example.test")]), critical=False)
            .sign(authority.key, hashes.SHA256()))  # type: ignore[arg-type]


def ring() -> keystore.KeyRing:
    return keystore.load_key_ring(load_settings())


def add_managed(engine: sa.Engine, name: str, owner: str | None = "platform") -> None:
    """A managed certificate; ``owner`` None: a row from before owners were required (managed.add refuses it)."""
    with write_session(engine) as session:
        if owner is None:
            session.add(ManagedCertificate(name=name, dns_names=[f"{name}.example.test"], issuer="sample/ca",
                                           use_ari=False, created_at=dt.datetime.now(dt.timezone.utc)))
            return
        managed.add(session, managed.ManagedSpec(name=name, dns_names=(f"{name}.example.test",), issuer="sample/ca",
                                                 owner=owner, use_ari=False), ACTOR)


def renew(engine: sa.Engine, name: str, authority: Authority, error: BaseException | None = None) -> None:
    renewing.renew_one(engine, name, SampleIssuer(authority, error=error), ring, ACTOR)


@pytest.fixture
def pki(ca: tuple[Authority, Authority]) -> Authority:
    return ca[1]


# ------------------------------------------------------------------ per certificate: x509 exporter

def test_a_seen_certificate_and_a_managed_one_with_their_labels(engine: sa.Engine, pki: Authority, leaf: Any) -> None:
    cert, _key = leaf
    seen = add_seen(engine, cert, owner="payments")
    add_managed(engine, "web", owner="team-web")
    renew(engine, "web", pki)
    with read_session(engine) as session:
        row = managed.get(session, "web")
        current = managed.current_certificate(session, row)
        [scheduled] = managed.schedule(session)
    assert current is not None

    text = metrics.render(engine)
    promtool_check(text)
    found = samples(text)
    labels, not_after = one(found, "x509_cert_not_after", fingerprint=seen)
    assert labels == {"fingerprint": seen, "subject_CN": "leaf.example.test", "subject_O": "certpilot sample estate",
                      "issuer_CN": "Test Issuing CA", "issuer_O": "certpilot sample estate",
                      "serial_number": str(cert.serial_number), "owner": "payments", "managed": "false"}
    assert not_after == int(cert.not_valid_after_utc.timestamp())
    assert one(found, "x509_cert_not_before", fingerprint=seen)[1] == int(cert.not_valid_before_utc.timestamp())
    assert one(found, "x509_cert_expired", fingerprint=seen)[1] == 0

    labels, not_after = one(found, "x509_cert_not_after", fingerprint=current.fingerprint_sha256)
    assert labels["managed"] == "true" and labels["owner"] == "team-web"
    assert labels["subject_CN"] == "web.example.test" and labels["serial_number"] == str(int(current.serial_hex, 16))
    assert not_after == int(current.not_after.timestamp())

    # cert-manager's view of the managed certificate
    manager = {"name": "web", "namespace": "team-web", "issuer_kind": "sample", "issuer_name": "ca",
               "issuer_group": "certpilot"}
    labels, expiration = one(found, "certmanager_certificate_expiration_timestamp_seconds", name="web")
    assert labels == manager and expiration == int(current.not_after.timestamp())
    renewal_at = one(found, "certmanager_certificate_renewal_timestamp_seconds", name="web")[1]
    assert not scheduled.decision.due and renewal_at == int(scheduled.decision.renew_at.timestamp())  # renew-due's time
    assert {l["condition"]: v for l, v in found["certmanager_certificate_ready_status"]} == \
        {"True": 1, "False": 0, "Unknown": 0}

    # the renewal, with the latency renewing.issue measured, in certpilot's own families
    assert one(found, "certpilot_renewals_total", result="success")[1] == 1
    assert one(found, "certpilot_renewals_total", result="failure")[1] == 0
    assert one(found, "certpilot_certificates_issued_total")[1] == 1
    assert one(found, "certpilot_issuance_duration_seconds_count")[1] == 1
    assert one(found, "certpilot_issuance_duration_seconds_bucket", le="+Inf")[1] == 1
    # the issuing CA's certificate came with the issued chain: in the inventory, but no series of its own
    assert one(found, "certpilot_certificates", status="active")[1] == 3
    assert len(found["x509_cert_not_after"]) == 2
    assert one(found, "certpilot_managed_certificates", status="active")[1] == 1


def test_expired_flag_follows_the_time_asked_for(engine: sa.Engine, pki: Authority) -> None:
    now = dt.datetime.now(UTC).replace(microsecond=0)
    soon, _ = issue_leaf(pki, ["soon.example.test"], now + dt.timedelta(days=2))
    gone, _ = issue_leaf(pki, ["gone.example.test"], now - dt.timedelta(days=3))
    fp_soon, fp_gone = add_seen(engine, soon, "tls://soon.example.test:443"), add_seen(engine, gone, None)

    found = samples(metrics.render(engine, now))
    assert one(found, "x509_cert_expired", fingerprint=fp_soon)[1] == 0
    assert one(found, "x509_cert_expired", fingerprint=fp_gone)[1] == 1  # no location: still in service
    later = samples(metrics.render(engine, now + dt.timedelta(days=3)))
    assert one(later, "x509_cert_expired", fingerprint=fp_soon)[1] == 1


def test_only_certificates_in_service_have_series(engine: sa.Engine, pki: Authority) -> None:
    """Not a CA of someone else's chain, not one seen only at ghost locations, not a revoked one; but
    certpilot's own CA certificates, whose expiry is the operator's."""
    now = dt.datetime.now(UTC)
    live, _ = issue_leaf(pki, ["live.example.test"], now + dt.timedelta(days=40))
    ghost, _ = issue_leaf(pki, ["ghost.example.test"], now + dt.timedelta(days=40))
    fp_live = add_seen(engine, live, "tls://live.example.test:443")
    fp_ghost = add_seen(engine, ghost, "tls://ghost.example.test:443")
    add_seen(engine, ghost, "tls://ghost-2.example.test:443")
    fp_chain_ca = add_seen(engine, pki.certificate, "tls://live.example.test:443")  # served in a chain
    with write_session(engine) as session:
        session.execute(sa.update(Location).where(Location.certificate_fingerprint == fp_ghost).values(ghost=True))
        authority = ca.init_ca(session, ring(), ACTOR, "internal", "http://127.0.0.1:8080")
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "revoked.example.test")]))
           .add_extension(x509.SubjectAlternativeName([x509.DNSName("revoked.example.test")]), critical=False)
           .sign(key, hashes.SHA256()))
    with write_session(engine) as session:
        issued = ca.issue(session, ring(), ACTOR, "internal", csr, "tls-server")
        fp_revoked = fingerprint_sha256(issued.leaf)
        ca.revoke(session, ring(), ACTOR, fp_revoked, x509.ReasonFlags.key_compromise, ca_name="internal")

    text = metrics.render(engine)
    promtool_check(text)
    found = samples(text)
    in_service = {l["fingerprint"] for l, _ in found["x509_cert_not_after"]}
    assert in_service == {fp_live, authority.root_fingerprint, authority.issuing_fingerprint}
    assert fp_ghost not in in_service and fp_chain_ca not in in_service and fp_revoked not in in_service
    root = one(found, "x509_cert_not_after", fingerprint=authority.root_fingerprint)[0]
    assert root["subject_CN"] == root["issuer_CN"] and root["managed"] == "false"
    # the revocation reached a CRL in the same transaction: propagation took no time
    assert one(found, "certpilot_revocation_propagation_seconds", ca="internal")[1] == 0
    with read_session(engine) as session:
        row = ca.get_ca(session, "internal")
    assert row.crl_next_update is not None
    assert one(found, "x509_crl_next_update", ca="internal")[1] == row.crl_next_update.timestamp()
    assert one(found, "certpilot_certificates_issued_total")[1] == 1  # the CA's issuance, not a renewal
    assert one(found, "certpilot_renewals_total", result="success")[1] == 0


def test_revocation_propagation_is_the_relying_partys_measurement_when_there_is_one(engine: sa.Engine) -> None:
    now = dt.datetime.now(UTC).replace(microsecond=0)
    key = ec.generate_private_key(ec.SECP256R1())
    with write_session(engine) as session:
        ca.init_ca(session, ring(), ACTOR, "internal", "http://127.0.0.1:8080", now=now - dt.timedelta(hours=2))
        issued = [ca.issue(session, ring(), ACTOR, "internal", build_csr(key, [f"p{i}.example.test"]), "tls-server",
                           now=now - dt.timedelta(hours=1)).leaf for i in range(2)]
        first, latest = (fingerprint_sha256(c) for c in issued)
        ca.revoke(session, ring(), ACTOR, first, x509.ReasonFlags.superseded, now=now - dt.timedelta(minutes=20))
        ca.revoke(session, ring(), ACTOR, latest, x509.ReasonFlags.key_compromise, now=now - dt.timedelta(minutes=10))
    found = samples(metrics.render(engine, now))
    assert one(found, "certpilot_revocation_propagation_seconds", ca="internal")[1] == 0  # in a CRL at once

    def watched(seconds: float | None) -> propagation.Propagation:
        return propagation.Propagation("http://127.0.0.1:8080/internal/issuing.crl",
                                       "http://127.0.0.1:8080/internal/ocsp", seconds, seconds, seconds, "")

    with write_session(engine) as session:  # an older revocation's measurement is not the latest's
        propagation.record_propagation(session, first, watched(9.0), ACTOR, now=now - dt.timedelta(minutes=9))
    assert one(samples(metrics.render(engine, now)), "certpilot_revocation_propagation_seconds", ca="internal")[1] == 0
    with write_session(engine) as session:
        propagation.record_propagation(session, latest, watched(1.25), ACTOR, now=now - dt.timedelta(minutes=9))
    text = metrics.render(engine, now)
    promtool_check(text)
    assert one(samples(text), "certpilot_revocation_propagation_seconds", ca="internal")[1] == 1.25
    with write_session(engine) as session:  # watched again, not seen within the watch: the time so far
        propagation.record_propagation(session, latest, watched(None), ACTOR, now=now - dt.timedelta(minutes=8))
    found = samples(metrics.render(engine, now))
    assert one(found, "certpilot_revocation_propagation_seconds", ca="internal")[1] == 600


def test_label_sets_kept_between_renders_follow_owner_changes_and_removals(engine: sa.Engine, pki: Authority) -> None:
    """Each certificate's label set is kept from one render to the next; a new owner, or a certificate
    that left service, shows in the next render all the same."""
    now = dt.datetime.now(UTC)
    first, _ = issue_leaf(pki, ["first.example.test"], now + dt.timedelta(days=40))
    second, _ = issue_leaf(pki, ["second.example.test"], now + dt.timedelta(days=50))
    fp_first = add_seen(engine, first, "tls://first.example.test:443", owner="team-a")
    fp_second = add_seen(engine, second, "tls://second.example.test:443")
    before = samples(metrics.render(engine, now))
    assert one(before, "x509_cert_not_after", fingerprint=fp_first)[0]["owner"] == "team-a"
    with write_session(engine) as session:
        session.execute(sa.update(Certificate).where(Certificate.fingerprint_sha256 == fp_first)
                        .values(owner="team-b"))
        session.execute(sa.update(Certificate).where(Certificate.fingerprint_sha256 == fp_second)
                        .values(status="superseded"))
    after = samples(metrics.render(engine, now))
    assert one(after, "x509_cert_not_after", fingerprint=fp_first)[0]["owner"] == "team-b"
    assert one(after, "x509_cert_expired", fingerprint=fp_first)[0]["owner"] == "team-b"
    assert fp_second not in {l["fingerprint"] for l, _ in after["x509_cert_not_after"]}
    assert one(after, "x509_cert_not_after", fingerprint=fp_first)[1] == first.not_valid_after_utc.timestamp()


# ------------------------------------------------------------- per managed certificate: cert-manager

def test_ready_status_false_after_a_failed_renewal_or_a_failing_target(engine: sa.Engine, pki: Authority) -> None:
    for name in ("failing", "deploying", "fine", "new"):
        add_managed(engine, name, owner=None if name == "new" else "platform")  # new: never renewed, no owner
    for name in ("failing", "deploying", "fine"):
        renew(engine, name, pki)
    with pytest.raises(PermanentError):
        renew(engine, "failing", pki, error=PermanentError("the CA refused the order"))
    with write_session(engine) as session:
        target = targets.add(session, "deploying", "nginx-1", "ssh-nginx", "ssh-host/web-1",
                             {"certificate_path": "/etc/ssl/web.pem", "key_path": "/etc/ssl/web.key"}, ACTOR)
        targets.record_failed(session, target, "verify: a different certificate is served", ACTOR)

    text = metrics.render(engine)
    promtool_check(text)
    found = samples(text)
    ready = {(l["name"], l["condition"]): v for l, v in found["certmanager_certificate_ready_status"]}
    assert {name: next(c for c in metrics.READY_CONDITIONS if ready[(name, c)] == 1)
            for name in ("failing", "deploying", "fine", "new")} == \
        {"failing": "False", "deploying": "False", "fine": "True", "new": "Unknown"}
    assert sum(ready.values()) == 4  # one condition each
    # the failed renewal kept the certificate in service: it still has its expiry
    assert one(found, "certmanager_certificate_expiration_timestamp_seconds", name="failing")[1] > 0
    assert one(found, "certmanager_certificate_expiration_timestamp_seconds", name="new")[1] == 0
    assert one(found, "certmanager_certificate_renewal_timestamp_seconds", name="new")[1] == 0
    assert one(found, "certmanager_certificate_expiration_timestamp_seconds", name="new")[0]["namespace"] == \
        metrics.DEFAULT_NAMESPACE
    assert one(found, "certpilot_renewals_total", result="failure")[1] == 1
    assert one(found, "certpilot_renewals_total", result="success")[1] == 3
    assert one(found, "certpilot_deployments_total", result="failed")[1] == 1
    assert one(found, "certpilot_deployments_total", result="deployed")[1] == 0


# ------------------------------------------------------------------------------- certpilot_* state

def test_open_alerts_by_severity_sources_and_endpoint_checks(engine: sa.Engine) -> None:
    now = dt.datetime.now(UTC)
    findings = [alerts.Finding(f"certificate:{n:064x}", alerts.Condition.EXPIRING, severity, "expires soon")
                for n, severity in enumerate([alerts.Severity.PAGE, alerts.Severity.TICKET, alerts.Severity.TICKET])]
    findings.append(alerts.Finding("source:tls-scan:lab", alerts.Condition.SOURCE_STALE, alerts.Severity.TICKET,
                                   "tls-scan:lab has not completed a run for 13 hours"))
    gone = alerts.Finding("certificate:" + "f" * 64, alerts.Condition.EXPIRED, alerts.Severity.PAGE, "expired")
    with write_session(engine) as session:
        alerts.observe(session, [gone], alerts.Scope(frozenset({alerts.Condition.EXPIRED})), now)
        alerts.observe(session, [], alerts.Scope(frozenset({alerts.Condition.EXPIRED})), now)  # resolves it
        alerts.observe(session, findings, alerts.Scope(frozenset({alerts.Condition.EXPIRING})), now)
        session.add(SourceRun(source="tls-scan:lab", last_started_at=now, last_completed_at=now - dt.timedelta(hours=13)))
        session.add(SourceRun(source="ssh:hosts", last_started_at=now))
        session.add(EndpointCheck(place="tls://a.example.test:443", checked_at=now, ok=True))
        session.add(EndpointCheck(place="tls://b.example.test:443", checked_at=now, ok=False,
                                  problems=["expiring", "chain-incomplete"]))
        session.add(EndpointCheck(place="tls://c.example.test:443", checked_at=now, ok=False, served_fingerprint="c" * 64,
                                  problems=["revoked-served", "expiring"], revocation="revoked"))
        session.add(EndpointCheck(place="tls://d.example.test:443", checked_at=now, ok=False, error="timed out after 5 s",
                                  problems=["unreachable"]))

    text = metrics.render(engine, now)
    promtool_check(text)
    found = samples(text)
    open_alerts: dict[str, float] = {}
    for labels, value in found["certpilot_alerts_open"]:
        open_alerts[labels["severity"]] = open_alerts.get(labels["severity"], 0) + value
    assert open_alerts == {"page": 1, "ticket": 3}  # the resolved one is not counted
    assert one(found, "certpilot_source_last_success_timestamp_seconds", source="tls-scan:lab")[1] == \
        pytest.approx((now - dt.timedelta(hours=13)).timestamp(), abs=1e-3)
    assert one(found, "certpilot_source_last_success_timestamp_seconds", source="ssh:hosts")[1] == 0
    assert {l["result"]: v for l, v in found["certpilot_endpoint_checks"]} == {"ok": 1, "problem": 2, "error": 1}
    assert {l["condition"]: v for l, v in found["certpilot_endpoint_problems"]} == \
        {"expiring": 2, "chain-incomplete": 1, "revoked-served": 1, "unreachable": 1}
    assert found["certpilot_revoked_certificate_served"] == [
        ({"place": "tls://c.example.test:443", "fingerprint": "c" * 64}, 1)]


# ------------------------------------------------------------------------------------ label values

ODD = 'Ops "blue" team\\west\nnight shift'


@pytest.mark.parametrize("value", [ODD, "Example, Inc.", "a+b;c<d>e=f", "#hash", " padded ", "Zürich €", "x\x00y"])
def test_name_values_come_back_as_written(value: str) -> None:
    name = x509.Name([x509.NameAttribute(NameOID.COUNTRY_NAME, "CH"), x509.NameAttribute(NameOID.ORGANIZATION_NAME, value),
                      x509.NameAttribute(NameOID.COMMON_NAME, value)])
    dn = name.rfc4514_string()  # as the inventory stores it
    assert metrics.common_name_and_organisation(dn) == (value, value)
    assert metrics.name_attributes(dn) == {"CN": value, "O": value, "C": "CH"}


def test_multi_valued_and_missing_attributes() -> None:
    name = x509.Name([x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Org"),
                                                      x509.NameAttribute(NameOID.COMMON_NAME, "both")])])
    assert metrics.common_name_and_organisation(name.rfc4514_string()) == ("both", "Org")
    only_ou = x509.Name([x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Unit")])
    assert metrics.common_name_and_organisation(only_ou.rfc4514_string()) == ("", "")


def test_label_values_with_quotes_backslashes_and_newlines(engine: sa.Engine, pki: Authority) -> None:
    now = dt.datetime.now(UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, ODD),
                         x509.NameAttribute(NameOID.COMMON_NAME, 'odd "name"\\x')])
    fp = add_seen(engine, leaf_named(pki, subject, now + dt.timedelta(days=20)), owner=ODD)
    add_managed(engine, "odd", owner=ODD)

    text = metrics.render(engine, now)
    promtool_check(text)
    assert b'owner="Ops \\"blue\\" team\\\\west\\nnight shift"' in text  # the escapes, as written
    found = samples(text)
    labels = one(found, "x509_cert_not_after", fingerprint=fp)[0]
    assert (labels["owner"], labels["subject_O"], labels["subject_CN"]) == (ODD, ODD, 'odd "name"\\x')
    assert one(found, "certmanager_certificate_ready_status", name="odd", condition="Unknown")[0]["namespace"] == ODD


def test_render_is_one_pass_of_set_based_reads(engine: sa.Engine, pki: Authority) -> None:
    """However many certificates, render reads the inventory with the same few statements."""
    statements: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    now = dt.datetime.now(UTC)
    made: list[str] = []

    def grow(n: int) -> None:  # certificates, managed certificates and audit events
        for i in range(n):
            name = f"n{len(made)}"
            made.append(name)
            add_seen(engine, issue_leaf(pki, [f"{name}.example.test"], now + dt.timedelta(days=9 + i))[0],
                     f"tls://{name}.example.test:443")
            add_managed(engine, name)

    grow(1)
    metrics.render(engine, now)
    listen: Callable[..., None] = sa.event.listen
    listen(engine, "before_cursor_execute", count)
    try:
        grow(1)
        statements.clear()
        metrics.render(engine, now)
        few = len(statements)
        grow(6)
        statements.clear()
        text = metrics.render(engine, now)
    finally:
        sa.event.remove(engine, "before_cursor_execute", count)
    assert len(statements) == few
    assert len(samples(text)["x509_cert_not_after"]) == 8


def test_sli_gauges_when_a_report_is_given(engine: sa.Engine, pki: Authority) -> None:
    add_managed(engine, "web")
    renew(engine, "web", pki)
    now = dt.datetime.now(UTC)
    with read_session(engine) as session:
        report = sli.compute(session, dt.timedelta(days=30), now)

    assert not any(n.startswith("certpilot_sli_") for n in samples(metrics.render(engine, now)))  # none unless given
    text = metrics.render(engine, now, sli=report)
    promtool_check(text)
    found = samples(text)
    gauges = {l["sli"]: (name, v) for name, series in found.items() if name.startswith("certpilot_sli_")
              for l, v in series}
    measured = {s.key: s for s in report.slis if s.value is not None}
    assert set(gauges) == set(measured) and "M2" in gauges and "M4" in gauges
    assert gauges["M2"] == ("certpilot_sli_renewal_success_ratio", 1.0)  # 100 % as a ratio
    assert gauges["M4"] == ("certpilot_sli_issuance_latency_seconds", measured["M4"].value)
    assert {l["window_seconds"] for l, _ in found["certpilot_sli_renewal_success_ratio"]} == {"2592000"}


def test_counters_read_only_what_the_audit_trail_appended_since_the_last_render(engine: sa.Engine,
                                                                                pki: Authority) -> None:
    add_managed(engine, "web")
    renew(engine, "web", pki)
    first = samples(metrics.render(engine))
    renew(engine, "web", pki)
    with pytest.raises(PermanentError):
        renew(engine, "web", pki, error=PermanentError("the CA refused the order"))
    then = samples(metrics.render(engine))
    assert [one(f, "certpilot_renewals_total", result="success")[1] for f in (first, then)] == [1, 2]
    assert one(then, "certpilot_renewals_total", result="failure")[1] == 1
    assert one(then, "certpilot_issuance_duration_seconds_count")[1] == 2
    assert one(then, "certpilot_issuance_duration_seconds_sum")[1] > one(first, "certpilot_issuance_duration_seconds_sum")[1]
    assert one(then, "certpilot_issuance_duration_seconds_bucket", le="+Inf")[1] == 2

    # The same engine over a rebuilt trail (the event last read is not there as it was): counted afresh.
    with write_session(engine) as session:
        session.execute(sa.delete(AuditEvent))
        audit.append(session, ACTOR, [audit.Change("renewal.failed", "managed:web", {"step": "issue"})])
    rebuilt = samples(metrics.render(engine))
    assert one(rebuilt, "certpilot_renewals_total", result="success")[1] == 0
    assert one(rebuilt, "certpilot_renewals_total", result="failure")[1] == 1
    assert one(rebuilt, "certpilot_issuance_duration_seconds_count")[1] == 0
