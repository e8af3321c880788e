"""The monitor's core: what is served against what should be, which alert each problem is, the certificates
that nothing serves any more, the silent stalls; pure functions of the time, and the inventory reads and
writes they need (SQLite and PostgreSQL)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlmodel import select

from certpilot import audit, inventory, keystore, managed, monitoring, renewing
from certpilot.alerts import Bands, Condition, Finding, Severity
from certpilot.database import read_session, write_session
from certpilot.issuance import IssuedCertificate
from certpilot.managed import CurrentCertificate, ManagedSpec, Scheduled
from certpilot.models import EndpointCheck, Location, ManagedCertificate, SourceRun
from certpilot.monitoring import KnownCertificate, Observed, Place, RunState, ServedCertificate
from certpilot.renewal import RenewalDecision
from certpilot.sample_estate import Authority, issue_leaf
from certpilot.settings import load_settings
from certpilot.x509info import describe_certificate

NOW = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.timezone.utc)
A, B, C, D = ("a" * 64, "b" * 64, "c" * 64, "d" * 64)


def known(fp: str, days: float, locations: list[tuple[str, bool]], status: str = "active", *,
          managed_name: str | None = None, owner: str | None = "payments") -> KnownCertificate:
    return KnownCertificate(fp, managed_name or f"{fp[:4]}.example.test", f"CN={fp[:4]}.example.test",
                            NOW + dt.timedelta(days=days), status, owner, {"env": "prod"}, managed_name,
                            (f"{fp[:4]}.example.test",), tuple(locations))


def served(fp: str, days: float) -> ServedCertificate:
    name = f"{fp[:4]}.example.test"
    return ServedCertificate(fp, f"CN={name}", NOW + dt.timedelta(days=days), (name,))


def by_key(findings: Sequence[Finding]) -> dict[tuple[str, str], Finding]:
    return {(f.object, f.condition.value): f for f in findings}


def test_one_certificate_at_three_places_of_three_sources_is_one_alert() -> None:
    places = [Place("tls://10.0.0.1:443", "10.0.0.1", 443), Place("tls://10.0.0.2:443", "10.0.0.2", 443)]
    cert = known(A, 3, [("tls://10.0.0.1:443", False), ("tls://10.0.0.2:443", False), ("ssh://web1/etc/a.pem", False)])
    observed = [Observed(p.place, served(A, 3), tls_version="TLSv1.3") for p in places]
    result = monitoring.evaluate(places, observed, {A: cert}, NOW)
    assert [(f.object, f.condition, f.severity) for f in result.findings] == [
        (f"certificate:{A}", Condition.EXPIRING, Severity.CRITICAL)]
    finding = result.findings[0]
    assert finding.owner == "payments" and finding.tags == {"env": "prod"}
    assert finding.details["served_at"] == ["ssh://web1/etc/a.pem", "tls://10.0.0.1:443", "tls://10.0.0.2:443"]
    assert finding.details["not_after"] == "2026-06-04T12:00:00Z"
    assert finding.details["certificate"] == "aaaa.example.test"
    assert [(c.place, c.ok, c.problems) for c in result.checks] == [
        ("tls://10.0.0.1:443", True, ("expiring",)), ("tls://10.0.0.2:443", True, ("expiring",))]
    assert result.not_served == ()


def test_ghosts_and_superseded_certificates_are_shown_apart_without_expiry_alert() -> None:
    certs = {A: known(A, 2, [("tls://10.0.0.9:443", True), ("ssh://old/a.pem", True)]),
             B: known(B, 1, [("ssh://web1/etc/b.pem", False)], status="superseded", managed_name="shop"),
             C: known(C, 60, [("aws-acm://eu-west-1/arn:c", False)])}
    result = monitoring.evaluate([], [], certs, NOW)
    assert result.findings == ()
    assert {(n.fingerprint, n.why) for n in result.not_served} == {
        (A, "every location is a ghost (not seen again by its source)"), (B, "superseded by its managed replacement")}


def test_each_place_problem_is_its_own_alert_about_the_place() -> None:
    places = [Place("tls://10.0.0.1:443?sni=shop.test", "10.0.0.1", 443, "shop.test", "shop.test", expected=B,
                    managed="shop", owner="shop-team"),
              Place("tls://10.0.0.2:443", "10.0.0.2", 443), Place("tls://10.0.0.3:443", "10.0.0.3", 443),
              Place("tls://10.0.0.4:443", "10.0.0.4", 443)]
    certs = {A: known(A, 200, [(p.place, False) for p in places[:3]], status="superseded", managed_name="shop"),
             D: known(D, 200, [("tls://10.0.0.4:443", False)])}
    observed = [Observed(places[0].place, served(A, 200), tls_version="TLSv1.2",
                         hostname_problem="leaf matches no name shop.test"),
                Observed(places[1].place, served(A, 200), tls_version="TLSv1.1"),
                Observed(places[2].place, served(A, 200), tls_version="TLSv1.3",
                         chain_problem="chain incomplete: no intermediate for issuer CN=X"),
                Observed(places[3].place, error="10.0.0.4:443: connection refused (nothing listening)")]
    result = monitoring.evaluate(places, observed, certs, NOW)
    found = {(f.object, f.condition.value, f.severity.value) for f in result.findings}
    assert found == {("place:tls://10.0.0.1:443?sni=shop.test", "wrong-certificate", "critical"),
                     ("place:tls://10.0.0.1:443?sni=shop.test", "hostname-mismatch", "critical"),
                     ("place:tls://10.0.0.2:443", "weak-tls", "ticket"),
                     ("place:tls://10.0.0.3:443", "chain-incomplete", "critical"),
                     ("place:tls://10.0.0.4:443", "unreachable", "critical")}
    wrong = by_key(result.findings)[("place:tls://10.0.0.1:443?sni=shop.test", "wrong-certificate")]
    assert (wrong.owner, wrong.details["expected"], wrong.details["fingerprint"]) == ("shop-team", B, A)
    refused = {c.place: c for c in result.checks}["tls://10.0.0.4:443"]
    assert not refused.ok and (refused.error or "").startswith("10.0.0.4:443")
    assert all(not c.ok for c in result.checks)
    # A superseded certificate seen on the wire is served (and judged); the unreachable place's certificate
    # is still served as far as the inventory knows: neither is "not served any more".
    assert result.not_served == ()


def test_expired_and_revoked_served_page_and_a_place_that_changed_no_longer_serves_the_old_one() -> None:
    places = [Place("tls://10.0.0.1:443", "10.0.0.1", 443), Place("tls://10.0.0.2:443", "10.0.0.2", 443)]
    certs = {A: known(A, -1, [("tls://10.0.0.1:443", False)]), B: known(B, 90, [("tls://10.0.0.2:443", False)]),
             C: known(C, 5, [("tls://10.0.0.2:443", False)])}
    observed = [Observed(places[0].place, served(A, -1), tls_version="TLSv1.3"),
                Observed(places[1].place, served(B, 90), tls_version="TLSv1.3", revocation="revoked",
                         revocation_detail="revoked on 2026-05-30 (key_compromise), per the CRL of http://ca/x.crl")]
    result = monitoring.evaluate(places, observed, certs, NOW)
    found = by_key(result.findings)
    assert set(found) == {(f"certificate:{A}", "expired"), (f"certificate:{B}", "revoked-served")}
    assert found[(f"certificate:{A}", "expired")].severity is Severity.PAGE
    assert "key_compromise" in found[(f"certificate:{B}", "revoked-served")].summary
    assert [(n.fingerprint, n.why) for n in result.not_served] == [(C, "its places now serve another certificate")]
    assert {c.place: c.problems for c in result.checks} == {"tls://10.0.0.1:443": ("expired",),
                                                           "tls://10.0.0.2:443": ("revoked-served",)}


def test_a_certificate_served_that_the_inventory_does_not_know_is_judged_by_what_was_seen() -> None:
    place = Place("target:shop/web", "10.0.0.1", 443, managed="shop", target="web", expected=B, owner="shop-team")
    result = monitoring.evaluate([place], [Observed(place.place, served(C, 2), tls_version="TLSv1.3")], {}, NOW,
                                 Bands(critical_days=1, warning_days=3))
    found = by_key(result.findings)
    assert set(found) == {("place:target:shop/web", "wrong-certificate"), (f"certificate:{C}", "expiring")}
    expiring = found[(f"certificate:{C}", "expiring")]
    assert expiring.severity is Severity.TICKET and expiring.owner == "shop-team"


def _scheduled(name: str, *, due_since: dt.datetime | None, days_left: float | None, error: str | None = None,
               ) -> Scheduled:
    row = ManagedCertificate(name=name, dns_names=[f"{name}.test"], issuer="private-ca/corp", owner="ops",
                             tags={"env": "prod"}, last_error=error, created_at=NOW - dt.timedelta(days=100))
    current = None if days_left is None else CurrentCertificate(
        A, "01", NOW - dt.timedelta(days=60), NOW + dt.timedelta(days=days_left))
    decision = RenewalDecision(due_since is not None, due_since or NOW + dt.timedelta(days=5), "due (test)")
    return Scheduled(row, current, decision)


def test_failed_renewals_by_time_left_and_overdue_ones_after_a_grace() -> None:
    schedule = [_scheduled("soon", due_since=NOW - dt.timedelta(days=3), days_left=0.3, error="issue: CA refused"),
                _scheduled("later", due_since=NOW - dt.timedelta(days=3), days_left=10, error="issue: CA down"),
                _scheduled("overdue", due_since=NOW - dt.timedelta(hours=5), days_left=2),
                _scheduled("just-due", due_since=NOW - dt.timedelta(minutes=30), days_left=20),
                _scheduled("fine", due_since=None, days_left=50)]
    found = {(f.object, f.condition.value, f.severity.value) for f in
             monitoring.renewal_findings(schedule, NOW, dt.timedelta(hours=2))}
    assert found == {("managed:soon", "renewal-failed", "page"), ("managed:later", "renewal-failed", "ticket"),
                     ("managed:overdue", "renewal-overdue", "critical")}


def test_stale_sources_and_stuck_runs() -> None:
    runs = [SourceRun(source="tls-scan:fresh", block="tls-scan/fresh",
                      last_completed_at=NOW - dt.timedelta(hours=7), last_failed_at=None, last_error=None),
            SourceRun(source="tls-scan:stale", block=None, last_completed_at=NOW - dt.timedelta(hours=13),
                      last_failed_at=NOW, last_error="timed out"),
            SourceRun(source="ssh:never", block=None, last_completed_at=None, last_failed_at=NOW,
                      last_error="host key refused"),
            SourceRun(source="ssh:first", block=None, last_completed_at=None, last_failed_at=None,
                      last_error=None)]
    stale = monitoring.stale_sources(runs, dt.timedelta(hours=6), NOW)
    assert {(f.object, f.severity.value) for f in stale} == {("source:tls-scan:stale", "ticket"),
                                                            ("source:ssh:never", "ticket")}
    assert "timed out" in by_key(stale)[("source:tls-scan:stale", "source-stale")].summary

    states = [RunState("1", "brave-fox", "renew-due", "Running", NOW - dt.timedelta(hours=3), ()),
              RunState("2", "calm-owl", "renew-certificate", "Late", NOW - dt.timedelta(minutes=45),
                       ("certificate:shop",)),
              RunState("3", "kind-elk", "deploy-certificate", "Pending", NOW - dt.timedelta(minutes=5), ()),
              RunState("4", "odd-bee", "discover", "Running", NOW - dt.timedelta(days=1), ())]
    deadlines = {"renew-due": dt.timedelta(hours=2), "renew-certificate": dt.timedelta(minutes=30),
                 "deploy-certificate": dt.timedelta(minutes=30)}
    stuck = monitoring.stuck_runs(states, deadlines, NOW, {"shop": ("shop-team", {"env": "prod"})})
    assert {(f.object, f.owner) for f in stuck} == {("flow-run:1", None), ("flow-run:2", "shop-team")}
    assert all(f.condition is Condition.RUN_STUCK and f.severity is Severity.CRITICAL for f in stuck)


def test_a_part_that_failed_leaves_its_conditions_out_of_the_scope() -> None:
    everything = monitoring.monitor_scope()
    assert Condition.UNREACHABLE in everything.conditions and everything.objects is None
    assert Condition.POLICY_VIOLATION not in everything.conditions and Condition.REVOKED not in everything.conditions
    without_services = monitoring.monitor_scope(["services"])
    assert Condition.UNREACHABLE not in without_services.conditions
    assert Condition.EXPIRING in without_services.conditions
    without_places = monitoring.monitor_scope(["places", "runs"])
    assert not (without_places.conditions & (monitoring.CERTIFICATE_CONDITIONS | monitoring.PLACE_CONDITIONS))
    assert Condition.RUN_STUCK not in without_places.conditions and Condition.SOURCE_STALE in without_places.conditions


# ------------------------------------------------------------------------------------ on the inventory

def _ring() -> keystore.KeyRing:
    return keystore.load_key_ring(load_settings())


def test_places_known_certificates_and_checks_on_the_inventory(engine: sa.Engine,
                                                              ca: tuple[Authority, Authority]) -> None:
    actor = audit.Actor("test")
    issuing = ca[1]
    unmanaged, _ = issue_leaf(issuing, ["plain.example.test"], NOW + dt.timedelta(days=40))
    with write_session(engine) as session:
        row = managed.add(session, ManagedSpec("shop", ("shop.example.test",), "private-ca/corp", owner="shop-team",
                                               tags={"env": "prod"}), actor)
        certs = []
        for _ in range(2):  # the old one, then its replacement (the old one is superseded)
            key = ec.generate_private_key(ec.SECP256R1())
            ref = keystore.store_private_key(session, key, _ring(), actor, "generated")
            in_80_days = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=80)
            leaf, _ = issue_leaf(issuing, ["shop.example.test"], in_80_days, key=key)
            der = tuple(c.public_bytes(serialization.Encoding.DER) for c in (leaf, issuing.certificate))
            renewing.record_issued(session, row, IssuedCertificate(der), ref, actor)
            certs.append(describe_certificate(leaf))
        old, new = certs
        plain = describe_certificate(unmanaged)
        inventory.upsert(session, [inventory.Observation(old, "tls://127.0.0.1:8443?sni=shop.example.test",
                                                         "tls-scan:a"),
                                   inventory.Observation(plain, "tls://[::1]:9443", "tls-scan:a"),
                                   inventory.Observation(plain, "tls://127.0.0.1:7443", "tls-scan:a"),
                                   inventory.Observation(old, "ssh://web1/etc/shop.pem", "ssh:web1")], actor)
        session.execute(sa.update(Location).where(Location.locator == "tls://127.0.0.1:7443").values(ghost=True))
        schedule = managed.schedule(session)
        found = {p.place: p for p in monitoring.places(session, schedule)}
        known = monitoring.known_certificates(session)
    assert set(found) == {"tls://127.0.0.1:8443?sni=shop.example.test", "tls://[::1]:9443"}  # no ghost
    shop = found["tls://127.0.0.1:8443?sni=shop.example.test"]
    assert (shop.host, shop.port, shop.sni, shop.hostname, shop.expected, shop.managed, shop.owner) == (
        "127.0.0.1", 8443, "shop.example.test", "shop.example.test", new.fingerprint_sha256, "shop", "shop-team")
    v6 = found["tls://[::1]:9443"]
    assert (v6.host, v6.port, v6.sni, v6.hostname, v6.expected) == ("::1", 9443, None, None, None)
    assert known[old.fingerprint_sha256].status == "superseded" and known[old.fingerprint_sha256].name == "shop"
    assert known[old.fingerprint_sha256].owner == "shop-team"
    assert new.fingerprint_sha256 not in known  # no location: not a certificate anyone serves
    assert known[unmanaged.fingerprint(hashes.SHA256()).hex()].locations == (
        ("tls://127.0.0.1:7443", True), ("tls://[::1]:9443", False))

    result = monitoring.evaluate(list(found.values()), [
        Observed(shop.place, ServedCertificate(new.fingerprint_sha256, new.subject, new.not_after),
                 tls_version="TLSv1.3"),
        Observed(v6.place, error="refused")], known, dt.datetime.now(dt.timezone.utc))
    with write_session(engine) as session:
        monitoring.record_checks(session, result.checks, NOW, "run-1")
    with write_session(engine) as session:
        monitoring.record_checks(session, result.checks[:1], NOW + dt.timedelta(minutes=15), "run-2")
    with read_session(engine) as session:
        rows = session.exec(select(EndpointCheck)).all()
    assert [(r.place, r.served_fingerprint, r.ok, r.flow_run_id) for r in rows] == [
        (shop.place, new.fingerprint_sha256, True, "run-2")]  # one row per place, replaced; places gone go


def test_parse_tls_locator() -> None:
    assert monitoring.parse_tls_locator("tls://h.example:8443?sni=x.example") == ("h.example", 8443, "x.example")
    assert monitoring.parse_tls_locator("tls://[2001:db8::1]:443") == ("2001:db8::1", 443, None)
    with pytest.raises(ValueError, match="not a tls:// locator"):
        monitoring.parse_tls_locator("ssh://web1/etc/x.pem")
