"""The policy where certificates come in and are watched, on SQLite and PostgreSQL: imports give owners by
the ownership rules and store violations (an RSA-1024 certificate shows key-size in `inventory show`);
discovery by a real TLS scan of loopback servers gives owners and stores the endpoint rules per place;
the monitor's real probes store an endpoint violation per place and clear it when the place is fixed;
`inventory list`, `status`, the expiry report and /metrics show them."""

from __future__ import annotations

import datetime as dt
import json
import logging
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from prometheus_client.parser import text_string_to_metric_families
from sqlmodel import select
from typer.testing import CliRunner, Result

from certpilot import audit, keystore, managed, metrics, monitoring, renewing, violations
from certpilot.database import read_session, write_session
from certpilot.discovery import record
from certpilot.importer import ImportOptions, import_paths
from certpilot.issuance import IssuedCertificate
from certpilot.models import AuditEvent, Certificate, PolicyViolation
from certpilot.policy import RULES, load_policy
from certpilot.sample_estate import Authority, issue_leaf, pem
from certpilot.settings import load_settings
from cli.main import app
from connectors.endpoint_probe import probe
from connectors.tls_scan import TlsScanSource
from tests.integration.tls.conftest import SwitchingServer
from tests.unit.test_metrics import promtool_check

ACTOR = audit.Actor("test")
UTC = dt.timezone.utc
OWNERSHIP = """
ownership:
  - match: {domain: shop.example.test}
    owner: shop
  - match: {source: "import"}
    owner: imports
"""


@pytest.fixture(autouse=True)
def wide(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # tables whole, not cut to 80 columns


def cli(*args: str) -> Result:
    return CliRunner().invoke(app, list(args))


def _fp(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def _write_policy(home: Path, text: str) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / "policy.yaml").write_text(text)


def _stored(engine: sa.Engine) -> set[tuple[str, str, str]]:
    """(certificate fingerprint, place, rule) of every violation not waived."""
    with read_session(engine) as session:
        return {(v.certificate_fingerprint, v.place, v.rule) for v in session.exec(select(PolicyViolation))
                if v.waiver_id is None}


def _owner(engine: sa.Engine, fingerprint: str) -> str | None:
    with read_session(engine) as session:
        row = session.get(Certificate, fingerprint)
        assert row is not None
        return row.owner


def _server_context(directory: Path, chain: list[x509.Certificate], key: Any, *,
                    max_version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    stem = _fp(chain[0])[:12]
    cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
    cert_path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    if max_version is not None:
        context.maximum_version = max_version
    return context


@pytest.fixture
def weak_import(engine: sa.Engine, ca: tuple[Authority, Authority], certpilot_home: Path,
                tmp_path: Path) -> x509.Certificate:
    """An RSA-1024 certificate and a sound one, imported with a policy whose ownership rules give both an owner."""
    _write_policy(certpilot_home, OWNERSHIP)
    soon = dt.datetime.now(UTC) + dt.timedelta(days=60)
    weak, _ = issue_leaf(ca[1], ["weak.example.test"], soon, key=rsa.generate_private_key(65537, 1024))
    sound, _ = issue_leaf(ca[1], ["sound.example.test"], soon)
    (tmp_path / "weak.pem").write_bytes(pem(weak, ca[1].certificate))
    (tmp_path / "sound.pem").write_bytes(pem(sound))
    result = cli("inventory", "import", str(tmp_path / "weak.pem"), str(tmp_path / "sound.pem"), "--json")
    assert result.exit_code == 0, result.output
    policy = json.loads(result.stdout)["policy"]
    assert policy == {"source": str(certpilot_home / "policy.yaml"), "owners_assigned": 2, "violations": 1,
                      "violations_by_rule": {"key-size": 1}, "violations_waived": 0, "error": None}
    return weak


def test_an_imported_rsa_1024_certificate_shows_key_size_and_only_that(engine: sa.Engine, weak_import: x509.Certificate,
                                                                       ca: tuple[Authority, Authority]) -> None:
    fp = _fp(weak_import)
    shown = json.loads(cli("inventory", "show", fp, "--json").stdout)
    assert shown["owner"] == "imports"  # the ownership rule matching the source "import"
    assert [(v["rule"], v["fingerprint_sha256"], v["severity"], v["place"], v["waiver_id"])
            for v in shown["violations"]] == [("key-size", fp, "high", "", None)]
    assert "1024" in shown["violations"][0]["detail"] and "2048" in shown["violations"][0]["detail"]
    text = cli("inventory", "show", fp)
    assert "key-size [high]" in " ".join(text.stdout.split())

    # Only the weak leaf violates; the CA certificate of its chain is not an owner's business.
    assert _stored(engine) == {(fp, "", "key-size")}
    listed = json.loads(cli("inventory", "list", "--violating", "--json").stdout)
    assert [r["fingerprint_sha256"] for r in listed] == [fp]
    assert [v["rule"] for v in listed[0]["violations"]] == ["key-size"]
    assert json.loads(cli("inventory", "list", "--rule", "expired", "--json").stdout) == []
    assert [r["fingerprint_sha256"] for r in json.loads(cli("inventory", "list", "--rule", "key-size",
                                                             "--json").stdout)] == [fp]
    bad = cli("inventory", "list", "--rule", "key-sise")
    assert bad.exit_code == 2 and "unknown rule 'key-sise'" in bad.output
    table = " ".join(cli("inventory", "list", "--violating").stdout.split())
    assert "violations" in table and "key-size" in table

    # The ownership rules are audited, one event per batch.
    with read_session(engine) as session:
        assigned = session.exec(select(AuditEvent).where(AuditEvent.action == "certificate.owner_assigned")).all()
    assert len(assigned) == 1

    # The expiry report lists it with its violation, in --json and in its table.
    report = json.loads(cli("report", "expiry", "--json").stdout)
    weak_row = next(r for r in report["soonest"] if r["fingerprint_sha256"] == fp)
    assert [v["rule"] for v in weak_row["violations"]] == ["key-size"]
    assert "key-size" in cli("report", "expiry").stdout


def test_a_waived_violation_is_shown_as_waived_and_not_counted(engine: sa.Engine, weak_import: x509.Certificate) -> None:
    fp = _fp(weak_import)
    now = dt.datetime.now(UTC)
    with write_session(engine) as session:
        waiver = violations.grant_waiver(session, "key-size", f"certificate={fp[:16]}", "legacy appliance",
                                         "ciso@example.test", now + dt.timedelta(days=30), ACTOR, now)
        violations.evaluate_certificates(session, load_policy(), ACTOR, [fp], now)
    shown = json.loads(cli("inventory", "show", fp, "--json").stdout)
    assert [(v["rule"], v["waiver_id"], v["waived_by"]) for v in shown["violations"]] == [
        ("key-size", waiver.id, "ciso@example.test")]
    assert json.loads(cli("inventory", "list", "--violating", "--json").stdout) == []
    found = _samples(metrics.render(engine, now))
    assert found["certpilot_policy_violations"]["key-size"] == 0


def _samples(text: bytes) -> dict[str, dict[str, float]]:
    """Each family's samples by their first label's value ("" for none)."""
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            out.setdefault(sample.name, {})[next(iter(sample.labels.values()), "")] = sample.value
    return out


def test_metrics_gauge_per_rule_and_unowned(engine: sa.Engine, ca: tuple[Authority, Authority],
                                            certpilot_home: Path, tmp_path: Path) -> None:
    _write_policy(certpilot_home, "rules:\n  wildcard: {allowed: false}\n")
    soon = dt.datetime.now(UTC) + dt.timedelta(days=60)
    weak, _ = issue_leaf(ca[1], ["*.weak.example.test"], soon, key=rsa.generate_private_key(65537, 1024))
    other, _ = issue_leaf(ca[1], ["other.example.test"], soon)
    owned, _ = issue_leaf(ca[1], ["owned.example.test"], soon)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "weak.pem").write_bytes(pem(weak, ca[1].certificate))
    (tmp_path / "a" / "other.pem").write_bytes(pem(other))
    (tmp_path / "owned.pem").write_bytes(pem(owned))
    policy = load_policy()
    report = import_paths(engine, [str(tmp_path / "a")], ImportOptions(), ACTOR, policy=policy)
    import_paths(engine, [str(tmp_path / "owned.pem")], ImportOptions(owner="web"), ACTOR, policy=policy)
    summary = report.summary()
    assert (summary.owners_assigned, summary.violations) == (0, 4)
    assert summary.violations_by_rule == {"key-size": 1, "owner-required": 2, "wildcard": 1}

    text = metrics.render(engine, dt.datetime.now(UTC))
    promtool_check(text)
    found = _samples(text)
    gauge = found["certpilot_policy_violations"]
    assert set(gauge) == set(RULES)  # every rule, 0 included
    assert {rule: n for rule, n in gauge.items() if n} == {"key-size": 1, "owner-required": 2, "wildcard": 1}
    assert found["certpilot_certificates_unowned"][""] == 2  # the two leaves without owner; not the CA


# ------------------------------------------------------------------------------------------ discovery

@pytest.fixture
def served(ca: tuple[Authority, Authority], tmp_path: Path) -> Iterator[tuple[SwitchingServer, SwitchingServer,
                                                                                x509.Certificate, x509.Certificate]]:
    """Two TLS servers offering TLS 1.2 at most, full chains: shop.example.test, and a stray certificate."""
    soon = dt.datetime.now(UTC) + dt.timedelta(days=60)
    shop, shop_key = issue_leaf(ca[1], ["shop.example.test"], soon)
    stray, stray_key = issue_leaf(ca[1], ["stray.other.test"], soon)
    contexts = [_server_context(tmp_path, [cert, ca[1].certificate], key, max_version=ssl.TLSVersion.TLSv1_2)
                for cert, key in ((shop, shop_key), (stray, stray_key))]
    with SwitchingServer(lambda _n: contexts[0]) as one, SwitchingServer(lambda _n: contexts[1]) as two:
        yield one, two, shop, stray


def test_discovery_assigns_owners_and_stores_endpoint_rules_per_place(
        engine: sa.Engine, ca: tuple[Authority, Authority], certpilot_home: Path,
        served: tuple[SwitchingServer, SwitchingServer, x509.Certificate, x509.Certificate]) -> None:
    one, two, shop, stray = served
    _write_policy(certpilot_home, OWNERSHIP.replace('source: "import"', 'source: "ssh:*"')
                  + "rules:\n  tls-min-version: {minimum: TLSv1.3}\n")
    source = TlsScanSource("lab", [f"127.0.0.1:{one.port}", f"127.0.0.1:{two.port}"], sni=["shop.example.test"],
                           timeout=3.0, trust=[ca[0].certificate])
    report = record(engine, source, audit.Actor("test", "run-1"), policy=load_policy()).summary()
    assert report.policy_error is None
    assert report.owners_assigned == 1
    shop_place = f"tls://127.0.0.1:{one.port}?sni=shop.example.test"
    stray_place = f"tls://127.0.0.1:{two.port}?sni=shop.example.test"

    assert _owner(engine, _fp(shop)) == "shop"
    assert _owner(engine, _fp(stray)) is None  # no rule matches it (the ssh rule is for another source)
    unowned = json.loads(cli("inventory", "list", "--unowned", "--json").stdout)
    assert [r["fingerprint_sha256"] for r in unowned] == [_fp(stray)]  # CA certificates are not listed

    assert _stored(engine) == {
        (_fp(shop), shop_place, "tls-min-version"),
        (_fp(stray), "", "owner-required"),
        (_fp(stray), stray_place, "tls-min-version"),
        (_fp(stray), stray_place, "hostname-match"),  # it was reached as shop.example.test
    }
    assert report.violations == 4 and report.violations_by_rule == {"hostname-match": 1, "owner-required": 1,
                                                                   "tls-min-version": 2}
    shown = json.loads(cli("inventory", "show", _fp(shop), "--json").stdout)
    [seen] = shown["violations"]
    assert (seen["rule"], seen["place"]) == ("tls-min-version", shop_place)
    assert "TLSv1.2" in seen["detail"] and "TLSv1.3" in seen["detail"]

    # The same scan again: nothing new is assigned, the violations are the same rows.
    again = record(engine, source, audit.Actor("test", "run-2"), policy=load_policy()).summary()
    assert again.owners_assigned == 0 and len(_stored(engine)) == 4

    # The stray endpoint is gone from the scan: its location is a ghost, and what was wrong there is history
    # (the certificate's own violation stays: it is still in the inventory).
    shrunk = TlsScanSource("lab", [f"127.0.0.1:{one.port}"], sni=["shop.example.test"], timeout=3.0,
                           trust=[ca[0].certificate])
    gone = record(engine, shrunk, audit.Actor("test", "run-3"), policy=load_policy()).summary()
    assert gone.ghosts == 1
    assert _stored(engine) == {(_fp(shop), shop_place, "tls-min-version"), (_fp(stray), "", "owner-required")}


def test_endpoint_facts_from_what_a_scan_recorded(ca: tuple[Authority, Authority]) -> None:
    from certpilot.discovery import endpoint_facts
    from certpilot.policy import facts_of_certificate

    cert, _ = issue_leaf(ca[1], ["a.example.test"], dt.datetime.now(UTC) + dt.timedelta(days=9))
    facts = facts_of_certificate(cert)
    place = "tls://127.0.0.1:443?sni=a.example.test"
    missing = {"tls_version": "TLSv1.3", "verified": False, "hostname_matches": False,
               "verify_reason": "unable to get local issuer certificate: CN=X is neither presented nor trusted"}
    found = endpoint_facts(place, facts, missing)
    assert found is not None and (found.tls_version, found.chain_complete, found.hostname_matches) == (
        "TLSv1.3", False, False)
    untrusted = endpoint_facts(place, facts, {"tls_version": "TLSv1.2", "verified": False,
                                              "verify_reason": "no trust anchors configured"})
    assert untrusted is not None and (untrusted.chain_complete, untrusted.hostname_matches) == (None, None)
    assert endpoint_facts("ssh://web/etc/a.pem", facts, {"format": "pem"}) is None
    assert endpoint_facts(place, None, missing) is None


def test_a_policy_that_does_not_load_leaves_discovery_recorded_and_says_why(
        engine: sa.Engine, ca: tuple[Authority, Authority], certpilot_home: Path,
        served: tuple[SwitchingServer, SwitchingServer, x509.Certificate, x509.Certificate]) -> None:
    from tasks.discovery import _policy

    one, _two, shop, _stray = served
    _write_policy(certpilot_home, "rules:\n  key-size: {rsa: lots}\n")
    policy, error = _policy(load_settings(), logging.getLogger("test"))
    assert policy is None and error is not None and "policy.yaml:2: rule key-size" in error
    source = TlsScanSource("lab", [f"127.0.0.1:{one.port}"], timeout=3.0)
    report = record(engine, source, ACTOR, policy=policy, policy_error=error).summary()
    assert report.places == 1 and report.policy_error == error
    assert _owner(engine, _fp(shop)) is None and _stored(engine) == set()


# ------------------------------------------------------------------------------------------- monitor

def test_monitor_stores_an_endpoint_violation_per_place_and_clears_it_when_fixed(
        engine: sa.Engine, ca: tuple[Authority, Authority], certpilot_home: Path, tmp_path: Path) -> None:
    _write_policy(certpilot_home, "rules:\n  tls-min-version: {minimum: TLSv1.3}\n"
                  "ownership:\n  - {match: {domain: example.test}, owner: web}\n")
    cert, key = issue_leaf(ca[1], ["mon.example.test"], dt.datetime.now(UTC) + dt.timedelta(days=60))
    chain = [cert, ca[1].certificate]
    old = _server_context(tmp_path, chain, key, max_version=ssl.TLSVersion.TLSv1_2)
    new = _server_context(tmp_path, chain, key)
    mode = {"context": old}
    with SwitchingServer(lambda _n: mode["context"]) as server:
        locator = f"tls://127.0.0.1:{server.port}?sni=mon.example.test"
        source = TlsScanSource("lab", [f"127.0.0.1:{server.port}"], sni=["mon.example.test"], trust=[ca[0].certificate])
        record(engine, source, ACTOR, policy=load_policy())
        places = [monitoring.location_place(locator)]

        def run() -> tuple[violations.EvaluationSummary, violations.EvaluationSummary]:
            observed = probe(places, anchors=[ca[0].certificate], timeout=3.0).observed
            with write_session(engine) as session:
                return monitoring.apply_policy(session, load_policy(), places, observed, ACTOR, dt.datetime.now(UTC))

        with write_session(engine) as session:  # what discovery stored is not what the monitor judges
            session.execute(sa.delete(PolicyViolation))
        certificates, endpoints = run()
        assert (certificates.violations, endpoints.violations) == (0, 1)
        assert _stored(engine) == {(_fp(cert), locator, "tls-min-version")}

        mode["context"] = new  # the place now offers TLS 1.3
        certificates, endpoints = run()
        assert (certificates.evaluated, endpoints.violations) == (1, 0)
        assert _stored(engine) == set()


def test_the_monitor_task_names_a_policy_it_cannot_load(engine: sa.Engine, certpilot_home: Path) -> None:
    from tasks.monitoring import evaluate_policy

    _write_policy(certpilot_home, "rules:\n  nonsense-rule: {}\n")
    found, problem = evaluate_policy([], [], dt.datetime.now(UTC), logging.getLogger("test"))
    assert found == {} and problem is not None and "applying the policy" in problem and "policy.yaml:2:" in problem


# -------------------------------------------------------------------------------------------- status

def test_status_shows_the_managed_certificates_violations(engine: sa.Engine, ca: tuple[Authority, Authority],
                                                          certpilot_home: Path) -> None:
    cert, key = issue_leaf(ca[1], ["web.example.test"], dt.datetime.now(UTC) + dt.timedelta(days=60),
                           key=rsa.generate_private_key(65537, 1024))
    der = [c.public_bytes(serialization.Encoding.DER) for c in (cert, ca[1].certificate)]
    with write_session(engine) as session:
        row = managed.add(session, managed.ManagedSpec("web", ("web.example.test",), "private-ca/corp",
                                                       owner="web"), ACTOR)
        ref = keystore.store_private_key(session, key, keystore.load_key_ring(load_settings()), ACTOR, "generated")
        renewing.record_issued(session, row, IssuedCertificate((der[0], der[1])), ref, ACTOR)
        violations.evaluate_certificates(session, load_policy(), ACTOR, [_fp(cert)])
    status = json.loads(cli("status", "web", "--json").stdout)
    assert [(v["rule"], v["fingerprint_sha256"], v["severity"]) for v in status["violations"]] == [
        ("key-size", _fp(cert), "high")]
    text = " ".join(cli("status", "web").stdout.split())
    assert "policy 1 violation(s)" in text and "key-size [high]" in text

