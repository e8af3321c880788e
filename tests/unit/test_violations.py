"""certpilot.violations on SQLite and PostgreSQL: facts read from a real inventory (real certificates
upserted, a real private CA), violations stored per certificate and per place, first_seen kept and fixed
ones dropped, waivers granted, covering, expiring and revoked with their audit events in a verified chain,
ownership rules applied, and the issuance gate."""

from __future__ import annotations

import datetime as dt
import json
import textwrap
from collections.abc import Sequence
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from sqlmodel import Session, col, select

from certpilot import audit, ca, inventory, keystore, managed, violations
from certpilot.database import read_session, write_session
from certpilot.errors import InvalidOptionError, NotFoundError
from certpilot.models import AuditEvent, Certificate, Location, ManagedCertificate, PolicyViolation
from certpilot.policy import DEFAULT_POLICY, EndpointFacts, PolicyViolationError, parse_policy
from certpilot.sample_estate import Authority
from certpilot.settings import load_settings
from certpilot.x509info import describe_certificate

NOW = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
DAY = dt.timedelta(days=1)
ACTOR = audit.Actor("test:alice")
_SHA256_WITH_RSA = bytes.fromhex("06092a864886f70d01010b")  # DER of OID 1.2.840.113549.1.1.11
_SHA1_WITH_RSA = bytes.fromhex("06092a864886f70d010105")    # DER of OID 1.2.840.113549.1.1.5


# ------------------------------------------------------------------------------------------ certificates

@pytest.fixture(scope="module")
def public_ca() -> Authority:
    """A CA that is not certpilot's, with an RSA key (so that it can sign with SHA-1 too)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Public Test Trust"),
                      x509.NameAttribute(NameOID.COMMON_NAME, "Public Test CA R1")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(NOW - 400 * DAY)
            .not_valid_after(NOW + 3650 * DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return Authority(cert, key)


def leaf(signer: Authority, names: Sequence[str], *, key: Any = None, start: dt.datetime | None = None,
         days: int = 90, ips: Sequence[str] = (), uris: Sequence[str] = (), self_signed: bool = False,
         client: bool = False) -> x509.Certificate:
    """A leaf valid ``days`` days (inclusive) from ``start`` (10 days ago by default)."""
    import ipaddress

    key = key or ec.generate_private_key(ec.SECP256R1())
    start = start or NOW - 10 * DAY
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0] if names else "leaf")])
    general: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    general += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    general += [x509.UniformResourceIdentifier(u) for u in uris]
    builder = (x509.CertificateBuilder().subject_name(subject)
               .issuer_name(subject if self_signed else signer.certificate.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(start + days * DAY - dt.timedelta(seconds=1))
               .add_extension(x509.SubjectAlternativeName(general), critical=False)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH if client
                                                     else ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))
    if not self_signed:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.key.public_key()), critical=False)
    signing: CertificateIssuerPrivateKeyTypes = key if self_signed else signer.key
    return builder.sign(signing, hashes.SHA256())


def resign_with_sha1(cert: x509.Certificate, signer: Authority) -> x509.Certificate:
    """``cert`` truly signed with SHA-1 (cryptography 50 will not build one): the signature algorithm OID
    is swapped, the same length, in the TBS part and the outer algorithm, and the TBS part signed again
    with PKCS#1 v1.5 over SHA-1 by the RSA CA key."""
    assert isinstance(signer.key, rsa.RSAPrivateKey)
    der = cert.public_bytes(serialization.Encoding.DER)
    tbs = cert.tbs_certificate_bytes.replace(_SHA256_WITH_RSA, _SHA1_WITH_RSA)
    signature = signer.key.sign(tbs, padding.PKCS1v15(), hashes.SHA1())
    swapped = der.replace(_SHA256_WITH_RSA, _SHA1_WITH_RSA)
    assert swapped.endswith(cert.signature) and len(signature) == len(cert.signature)
    sha1 = x509.load_der_x509_certificate(swapped[:-len(signature)] + signature)
    signer.key.public_key().verify(sha1.signature, sha1.tbs_certificate_bytes, padding.PKCS1v15(), hashes.SHA1())
    return sha1


def fp(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def put(session: Session, cert: x509.Certificate, *places: tuple[str, str], owner: str | None = None,
        tags: dict[str, str] | None = None, now: dt.datetime = NOW) -> str:
    """Upsert ``cert`` into the inventory, seen at each (locator, source) of ``places`` (none: no location)."""
    record = describe_certificate(cert)
    observations = [inventory.Observation(record, locator, source) for locator, source in places] or \
        [inventory.Observation(record, None, "import")]
    inventory.upsert(session, observations, ACTOR, owner=owner, tags=tags, now=now)
    return record.fingerprint_sha256


def ring() -> keystore.KeyRing:
    return keystore.load_key_ring(load_settings())


def csr_for(names: Sequence[str], key: Any = None) -> x509.CertificateSigningRequest:
    key = key or ec.generate_private_key(ec.SECP256R1())
    return (x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
            .sign(key, hashes.SHA256()))


def rows(session: Session) -> dict[tuple[str, str, str], PolicyViolation]:
    return {(r.certificate_fingerprint, r.place, r.rule): r for r in session.exec(select(PolicyViolation)).all()}


def events(session: Session, action: str) -> list[AuditEvent]:
    return list(session.exec(select(AuditEvent).where(AuditEvent.action == action).order_by(col(AuditEvent.seq))))


# ------------------------------------------------------------------------------------------ facts

def test_facts_come_from_the_inventory(engine: sa.Engine, public_ca: Authority) -> None:
    web = leaf(public_ca, ["WWW.Example.com", "*.example.com"], ips=["192.0.2.7"],
               uris=["spiffe://prod.example/ns/api/sa/web"])
    selfie = leaf(public_ca, ["selfie.example.com"], self_signed=True)
    with write_session(engine) as session:
        put(session, public_ca.certificate)
        web_fp = put(session, web, ("tls://www.example.com:443?sni=www.example.com", "tls-scan:lab"),
                     ("ssh://web-1/etc/ssl/www.pem", "ssh:web"), owner="web", tags={"env": "prod"})
        selfie_fp = put(session, selfie)
        session.execute(sa.update(Location).where(col(Location.locator) == "ssh://web-1/etc/ssl/www.pem")
                        .values(ghost=True))
        authority = ca.init_ca(session, ring(), ACTOR, "Corp_CA", "http://pki.corp.test", now=NOW - DAY)
        private_fp = fp(ca.issue(session, ring(), ACTOR, authority.name, csr_for(["app.corp.test"]), "tls-client",
                                 validity_days=365, now=NOW).leaf)
    with read_session(engine) as session:
        facts = {f.fingerprint_sha256: f for f in violations.facts_for(session, DEFAULT_POLICY, now=NOW)}
        assert set(facts) == {web_fp, selfie_fp, private_fp}  # every active leaf, no CA certificate
        w = facts[web_fp]
        assert (w.dns_names, w.ip_addresses, w.uris) == (("*.example.com", "www.example.com"), ("192.0.2.7",),
                                                          ("spiffe://prod.example/ns/api/sa/web",))
        assert (w.key_type, w.key_size, w.key_curve, w.signature_algorithm) == ("EC", 256, "secp256r1",
                                                                              "sha256WithRSAEncryption")
        assert (w.public, w.issuer, w.issuer_names) == (True, "CN=Public Test CA R1,O=Public Test Trust",
                                                        ("CN=Public Test CA R1,O=Public Test Trust",))
        assert (w.owner, dict(w.tags), w.managed, w.profile, w.renew_before) == ("web", {"env": "prod"}, False,
                                                                                 None, None)
        # the ghost location is not where it is seen any more
        assert (w.sources, w.locators) == (("tls-scan:lab",), ("tls://www.example.com:443?sni=www.example.com",))
        assert facts[selfie_fp].public is False
        private = facts[private_fp]
        # chains to the certpilot CA through its issuing certificate; named as its issuer block is
        assert private.public is False and private.issuer_names[1:] == ("private-ca/corp-ca",)
        assert private.profile == "tls-client"  # clientAuth only, from a private CA
        # the policy's private issuer patterns make a foreign CA private too
        policy = parse_policy('issuers:\n  private: ["CN=Public Test CA*"]\n', "p.yaml")
        assert violations.facts_for(session, policy, [web_fp], NOW)[0].public is False
        # explicit fingerprints: in that order, unknown ones left out, CA certificates described
        root = fp(public_ca.certificate)
        listed = violations.facts_for(session, DEFAULT_POLICY, [selfie_fp, "0" * 64, root, web_fp], NOW)
        assert [f.fingerprint_sha256 for f in listed] == [selfie_fp, root, web_fp] and listed[1].is_ca


def test_managed_certificates_lend_owner_tags_profile_issuer_and_renewal_window(engine: sa.Engine,
                                                                                 public_ca: Authority) -> None:
    cert = leaf(public_ca, ["shop.example.com"], days=90)
    with write_session(engine) as session:
        definition = managed.add(session, managed.ManagedSpec(
            "shop", ("shop.example.com",), "acme-issuer/letsencrypt", owner="payments", tags={"team": "pay"},
            renew_before_days=20), ACTOR, NOW)
        shop_fp = put(session, cert, tags={"env": "prod"})
        session.execute(sa.update(Certificate).where(col(Certificate.fingerprint_sha256) == shop_fp)
                        .values(managed_certificate_id=definition.id))
    with read_session(engine) as session:
        (facts,) = violations.facts_for(session, DEFAULT_POLICY, [shop_fp], NOW)
    assert (facts.owner, dict(facts.tags), facts.managed, facts.managed_name) == (
        "payments", {"team": "pay", "env": "prod"}, True, "shop")
    assert facts.issuer_names == ("CN=Public Test CA R1,O=Public Test Trust", "acme-issuer/letsencrypt")
    assert facts.profile == "tls-server"
    # renewed at two thirds of its 90 days (earlier than 20 days before expiry), up to 5% earlier (jitter)
    assert facts.renew_before is not None and 30 * DAY - dt.timedelta(minutes=1) <= facts.renew_before <= 34.5 * DAY


# ------------------------------------------------------------------------------------------ storing

def test_evaluation_stores_each_rule_broken_keeps_first_seen_and_drops_fixed(engine: sa.Engine,
                                                                             public_ca: Authority) -> None:
    weak_key = leaf(public_ca, ["weak.example.com"], key=rsa.generate_private_key(public_exponent=65537, key_size=1024))
    sha1 = resign_with_sha1(leaf(public_ca, ["legacy.example.com"],
                                 key=rsa.generate_private_key(public_exponent=65537, key_size=2048)), public_ca)
    long_lived = leaf(public_ca, ["long.example.com"], days=825)
    expired = leaf(public_ca, ["old.example.com"], start=NOW - 40 * DAY, days=30)
    unowned = leaf(public_ca, ["nobody.example.com"])
    clean = leaf(public_ca, ["clean.example.com"])
    with write_session(engine) as session:
        fps = {name: put(session, cert, owner="web") for name, cert in (
            ("weak", weak_key), ("sha1", sha1), ("long", long_lived), ("expired", expired), ("clean", clean))}
        fps["unowned"] = put(session, unowned)
        summary = violations.evaluate_certificates(session, DEFAULT_POLICY, ACTOR, now=NOW)
    assert (summary.evaluated, summary.violations, summary.waived, summary.expired_waivers) == (6, 5, 0, ())
    assert summary.by_rule == {"key-size": 1, "signature-algorithm": 1, "max-validity": 1, "expired": 1,
                               "owner-required": 1}
    with read_session(engine) as session:
        stored = rows(session)
    assert {(fp_, rule) for fp_, _, rule in stored} == {
        (fps["weak"], "key-size"), (fps["sha1"], "signature-algorithm"), (fps["long"], "max-validity"),
        (fps["expired"], "expired"), (fps["unowned"], "owner-required")}
    weak = stored[(fps["weak"], "", "key-size")]
    assert (weak.severity, weak.waiver_id, weak.first_seen, weak.last_seen) == ("high", None, NOW, NOW)
    assert "1024" in weak.detail and "2048" in weak.detail

    later = NOW + dt.timedelta(hours=1)
    with write_session(engine) as session:
        put(session, unowned, owner="web", now=later)  # the owner is given: owner-required is fixed
        session.execute(sa.update(Certificate).where(col(Certificate.fingerprint_sha256) == fps["long"])
                        .values(status="superseded"))  # no longer active: not evaluated, its rows dropped
        summary = violations.evaluate_certificates(session, DEFAULT_POLICY, ACTOR, now=later)
    assert (summary.evaluated, summary.violations) == (5, 3)
    with read_session(engine) as session:
        stored = rows(session)
    assert set(stored) == {(fps["weak"], "", "key-size"), (fps["sha1"], "", "signature-algorithm"),
                           (fps["expired"], "", "expired")}
    assert all((r.first_seen, r.last_seen) == (NOW, later) for r in stored.values())

    # a batch (import, discovery) evaluates its own certificates only
    with write_session(engine) as session:
        summary = violations.evaluate_certificates(session, DEFAULT_POLICY, ACTOR, [fps["clean"], fps["weak"]],
                                                   now=later + DAY)
    assert (summary.evaluated, summary.violations, summary.by_rule) == (2, 1, {"key-size": 1})
    with read_session(engine) as session:
        stored = rows(session)
        assert stored[(fps["weak"], "", "key-size")].last_seen == later + DAY
        assert stored[(fps["sha1"], "", "signature-algorithm")].last_seen == later
        assert violations.open_counts_by_rule(session) == {
            **{rule: 0 for rule in violations.RULES}, "key-size": 1, "signature-algorithm": 1, "expired": 1}
        found = violations.stored_violations(session, [fps["weak"], fps["clean"]])
    assert list(found) == [fps["weak"]] and found[fps["weak"]][0].as_dict() == {
        "rule": "key-size", "fingerprint_sha256": fps["weak"], "severity": "high", "detail": weak.detail,
        "place": "", "waiver_id": None}


def test_endpoint_rules_are_stored_per_place(engine: sa.Engine, public_ca: Authority) -> None:
    cert = leaf(public_ca, ["api.example.com"])
    one, two = "tls://api.example.com:443?sni=api.example.com", "tls://10.0.0.9:8443?sni=api.example.com"
    with write_session(engine) as session:
        api = put(session, cert, (one, "tls-scan:lab"), (two, "tls-scan:lab"))
        (facts,) = violations.facts_for(session, DEFAULT_POLICY, [api], NOW)
        summary = violations.evaluate_endpoints(session, DEFAULT_POLICY, [
            EndpointFacts(one, facts, "TLSv1", True, True), EndpointFacts(two, facts, "TLSv1.3", False, True)],
            ACTOR, NOW)
        violations.evaluate_certificates(session, DEFAULT_POLICY, ACTOR, now=NOW)  # leaves the places' rows
    assert (summary.evaluated, summary.violations, summary.by_rule) == (2, 2, {"tls-min-version": 1,
                                                                               "chain-complete": 1})
    with read_session(engine) as session:
        assert set(rows(session)) == {(api, one, "tls-min-version"), (api, two, "chain-complete"),
                                      (api, "", "owner-required")}
    later = NOW + DAY
    with write_session(engine) as session:  # the first place now speaks TLS 1.3; the second still lacks its chain
        violations.evaluate_endpoints(session, DEFAULT_POLICY, [
            EndpointFacts(one, facts, "TLSv1.3", True, True), EndpointFacts(two, facts, "TLSv1.3", False, True)],
            ACTOR, later)
    with read_session(engine) as session:
        stored = rows(session)
        by_place = {v.place: v.rule for v in violations.stored_violations(session, [api])[api]}
    assert set(stored) == {(api, two, "chain-complete"), (api, "", "owner-required")}
    assert (stored[(api, two, "chain-complete")].first_seen, stored[(api, two, "chain-complete")].last_seen) == (NOW,
                                                                                                                later)
    assert by_place == {two: "chain-complete", "": "owner-required"}


# ------------------------------------------------------------------------------------------ waivers

def test_waivers_cover_expire_once_and_are_revoked_with_audit_events(engine: sa.Engine,
                                                                     public_ca: Authority) -> None:
    weak = leaf(public_ca, ["weak.example.com"], key=rsa.generate_private_key(public_exponent=65537, key_size=1024))
    with write_session(engine) as session:
        weak_fp = put(session, weak, owner="web")
        violations.evaluate_certificates(session, DEFAULT_POLICY, ACTOR, now=NOW)
        waiver = violations.grant_waiver(session, "key-size", f"certificate={weak_fp[:12]}", "HSM cannot do 2048 yet",
                                         "ciso", NOW + DAY, ACTOR, NOW)
    with read_session(engine) as session:  # applied to the stored violation at once
        assert rows(session)[(weak_fp, "", "key-size")].waiver_id == waiver.id
        assert violations.open_counts_by_rule(session)["key-size"] == 0
        assert violations.stored_violations(session, include_waived=False) == {}
        assert [w.id for w in violations.active_waivers(session, NOW)] == [waiver.id]
    with write_session(engine) as session:
        summary = violations.evaluate_certificates(session, DEFAULT_POLICY, ACTOR, now=NOW + dt.timedelta(hours=1))
    assert (summary.violations, summary.waived, summary.by_rule) == (0, 1, {})

    # expired: the next evaluation of anything (here: of no place at all) records it, audited once, and what
    # it waived is no longer waived; the certificate's own next evaluation says which waiver lapsed
    with write_session(engine) as session:
        summary = violations.evaluate_endpoints(session, DEFAULT_POLICY, [], ACTOR, NOW + 2 * DAY)
        assert summary.expired_waivers == (waiver.id,)
        assert rows(session)[(weak_fp, "", "key-size")].waiver_id is None
        summary = violations.evaluate_certificates(session, DEFAULT_POLICY, ACTOR, now=NOW + 3 * DAY)
    assert (summary.expired_waivers, summary.violations, summary.waived) == ((), 1, 0)
    with read_session(engine) as session:
        row = rows(session)[(weak_fp, "", "key-size")]
        assert row.waiver_id is None and f"waiver {waiver.id} expired" in row.detail
        expired = events(session, "policy.waiver_expired")
        assert [(e.object, e.actor) for e in expired] == [(f"policy-waiver:{waiver.id}", "test:alice")]
        assert {k: json.loads(expired[0].details)[k] for k in ("rule", "violations_unwaived")} == {
            "rule": "key-size", "violations_unwaived": 1}
        assert violations.list_waivers(session, now=NOW + 3 * DAY) == []
        assert [w.id for w in violations.list_waivers(session, include_inactive=True, now=NOW + 3 * DAY)] == [waiver.id]

    with write_session(engine) as session:  # a second waiver, by owner, and a third by domain; both revoked
        second = violations.grant_waiver(session, "key-size", "owner=web,domain=example.com", "migration", "ciso",
                                         NOW + 30 * DAY, audit.Actor("test:bob"), NOW + 3 * DAY)
        assert rows(session)[(weak_fp, "", "key-size")].waiver_id == second.id
        third = violations.grant_waiver(session, "key-size", "domain=weak.example.com", "same", "ciso",
                                        NOW + 30 * DAY, audit.Actor("test:bob"), NOW + 3 * DAY)
        violations.revoke_waiver(session, second.id, audit.Actor("test:carol"), NOW + 4 * DAY)
        assert rows(session)[(weak_fp, "", "key-size")].waiver_id == third.id  # still covered, by the third
        again = violations.revoke_waiver(session, second.id, audit.Actor("test:dave"), NOW + 5 * DAY)
        assert (again.revoked_by, again.revoked_at) == ("test:carol", NOW + 4 * DAY)
        violations.revoke_waiver(session, third.id, audit.Actor("test:carol"), NOW + 5 * DAY)
        assert rows(session)[(weak_fp, "", "key-size")].waiver_id is None
        with pytest.raises(NotFoundError, match="no policy waiver with id 999"):
            violations.revoke_waiver(session, 999, ACTOR)
    with read_session(engine) as session:
        granted = events(session, "policy.waiver_granted")
        assert [(e.actor, e.object) for e in granted] == [("test:alice", f"policy-waiver:{waiver.id}"),
                                                          ("test:bob", f"policy-waiver:{second.id}"),
                                                          ("test:bob", f"policy-waiver:{third.id}")]
        assert json.loads(granted[0].details) == {
            "rule": "key-size", "scope": f"certificate={weak_fp[:12]}", "reason": "HSM cannot do 2048 yet",
            "approver": "ciso", "expires_at": (NOW + DAY).isoformat().replace("+00:00", "Z"), "violations_waived": 1}
        assert [(e.actor, e.object) for e in events(session, "policy.waiver_revoked")] == [
            ("test:carol", f"policy-waiver:{second.id}"), ("test:carol", f"policy-waiver:{third.id}")]
        revoked = events(session, "policy.waiver_revoked")
        assert [json.loads(e.details)["violations_unwaived"] for e in revoked] == [1, 1]
        audit.verify(session)


@pytest.mark.parametrize(("rule", "scope", "reason", "approver", "expires", "message"), [
    ("key-length", "*", "r", "a", DAY, "RULE must be one of key-size"),
    ("key-size", "colour=red", "r", "a", DAY, "--scope must be a waiver scope: unknown term 'colour'"),
    ("key-size", "*", " ", "a", DAY, "--reason must be a non-empty reason"),
    ("key-size", "*", "r", "", DAY, "--approver must be the name of who approved it"),
    ("key-size", "*", "r", "a", -DAY, "--expires must be in the future"),
])
def test_a_waiver_is_checked_before_it_is_granted(engine: sa.Engine, rule: str, scope: str, reason: str,
                                                  approver: str, expires: dt.timedelta, message: str) -> None:
    with write_session(engine) as session, pytest.raises(InvalidOptionError, match=message):
        violations.grant_waiver(session, rule, scope, reason, approver, NOW + expires, ACTOR, NOW)
    with read_session(engine) as session:
        assert violations.list_waivers(session, include_inactive=True) == []
        assert events(session, "policy.waiver_granted") == []


# ------------------------------------------------------------------------------------------ ownership

OWNERSHIP = textwrap.dedent("""\
    ownership:
      - match: {domain: pay.example.com}
        owner: payments
      - match: {locator: "ssh://web-*"}
        owner: web
      - match: {source: "tls-scan:*"}
        owner: edge
    """)


def test_ownership_rules_first_match_wins_and_never_replace_an_owner(engine: sa.Engine, public_ca: Authority) -> None:
    policy = parse_policy(OWNERSHIP, "ownership.yaml")
    certs = {name: leaf(public_ca, [dns]) for name, dns in (
        ("pay", "checkout.pay.example.com"), ("web", "www.example.com"), ("owned", "blog.example.com"),
        ("nobody", "other.example.org"), ("managed", "shop.example.com"), ("ghost", "gone.example.com"))}
    with write_session(engine) as session:
        fps = {
            "pay": put(session, certs["pay"], ("ssh://web-1/etc/ssl/pay.pem", "ssh:web")),  # rules 1 and 2: the first
            "web": put(session, certs["web"], ("ssh://web-2/etc/ssl/www.pem", "ssh:web")),
            "owned": put(session, certs["owned"], ("ssh://web-3/etc/ssl/blog.pem", "ssh:web"), owner="ops"),
            "nobody": put(session, certs["nobody"], ("file:///srv/other.pem", "import")),
            "managed": put(session, certs["managed"], ("tls://shop.example.com:443", "tls-scan:lab")),
            "ghost": put(session, certs["ghost"], ("tls://gone.example.com:443", "tls-scan:lab")),
        }
        definition = managed.add(session, managed.ManagedSpec("shop", ("shop.example.com",), "acme-issuer/le",
                                                              owner="shop-team"), ACTOR, NOW)
        session.execute(sa.update(Certificate).where(col(Certificate.fingerprint_sha256) == fps["managed"])
                        .values(managed_certificate_id=definition.id))
        session.execute(sa.update(Location).where(col(Location.locator) == "tls://gone.example.com:443")
                        .values(ghost=True))  # seen nowhere now: no rule matches it
        assigned = violations.apply_ownership(session, policy, ACTOR, now=NOW)
    assert assigned == 2
    with read_session(engine) as session:
        owners = dict(session.execute(sa.select(Certificate.fingerprint_sha256, Certificate.owner)
                                      .where(col(Certificate.is_ca).is_(False))).all())
        (event,) = events(session, "certificate.owner_assigned")
    assert {name: owners[fps[name]] for name in fps} == {"pay": "payments", "web": "web", "owned": "ops",
                                                         "nobody": None, "managed": None, "ghost": None}
    assert (event.actor, event.object) == ("test:alice", "policy:ownership.yaml")
    assert json.loads(event.details)["owners"] == {"payments": [fps["pay"]], "web": [fps["web"]]}
    with write_session(engine) as session:  # again: nothing left to assign, nothing audited
        assert violations.apply_ownership(session, policy, ACTOR, now=NOW) == 0
        assert violations.apply_ownership(session, policy, ACTOR, [fps["nobody"], fps["owned"]], now=NOW) == 0
        assert violations.apply_ownership(session, DEFAULT_POLICY, ACTOR, now=NOW) == 0  # no rules at all
        assert len(events(session, "certificate.owner_assigned")) == 1


# ------------------------------------------------------------------------------------------ the gate

GATE_POLICY = textwrap.dedent("""\
    rules:
      key-size: {rsa: 3072}
      wildcard: {allowed: false}
    """)


def test_the_gate_refuses_a_request_naming_the_rule_unless_waived(engine: sa.Engine) -> None:
    policy = parse_policy(GATE_POLICY, "gate.yaml")
    wanted = ManagedCertificate(name="api", dns_names=["API.example.com"], issuer="acme-issuer/letsencrypt",
                                key_algorithm="rsa-2048", owner="web", tags={"env": "prod"})
    with write_session(engine) as session:
        facts = violations.request_facts(session, wanted, policy, NOW)
        assert (facts.fingerprint_sha256, facts.dns_names, facts.key_type, facts.key_size, facts.public) == (
            None, ("api.example.com",), "RSA", 2048, True)
        assert facts.not_after - facts.not_before == 90 * DAY - dt.timedelta(seconds=1)  # an ACME CA's default
        refusal = r"policy refuses managed certificate 'api': key-size: "
        with pytest.raises(PolicyViolationError, match=refusal) as refused:
            violations.gate(session, policy, facts, "managed certificate 'api'", NOW)
        assert [v.rule for v in refused.value.violations] == ["key-size"]
        # a renewal with a bigger key passes
        violations.gate(session, policy, violations.request_facts(session, wanted, policy, NOW, "rsa-4096"), "api", NOW)
        # an expired waiver does not apply; one in force does
        violations.grant_waiver(session, "key-size", "certificate=api", "legacy client", "ciso", NOW + DAY, ACTOR, NOW)
        violations.gate(session, policy, facts, "managed certificate 'api'", NOW)
        with pytest.raises(PolicyViolationError, match="key-size"):
            violations.gate(session, policy, facts, "managed certificate 'api'", NOW + 2 * DAY)

        long_request = ManagedCertificate(name="long", dns_names=["long.example.com"], issuer="acme-issuer/le",
                                          validity_days=398, owner="web")
        with pytest.raises(PolicyViolationError, match="max-validity"):
            violations.gate(session, policy, violations.request_facts(session, long_request, policy, NOW), "long", NOW)

        ca.init_ca(session, ring(), ACTOR, "lab-ca", "http://pki.lab.test", now=NOW - DAY)
        internal = ManagedCertificate(name="intranet", dns_names=["intranet.lab.test"], issuer="private-ca/lab-ca",
                                      owner="it")
        facts = violations.request_facts(session, internal, policy, NOW)
        assert facts.public is False and facts.issuer_names == ("private-ca/lab-ca", "CN=lab-ca Issuing CA 1,O=lab-ca")
        assert facts.not_after - facts.not_before == 90 * DAY - dt.timedelta(seconds=1)  # the profile's default
        violations.gate(session, policy, facts, "intranet", NOW)

    wildcard = csr_for(["*.corp.test"], rsa.generate_private_key(public_exponent=65537, key_size=1024))
    facts = violations.csr_facts(wildcard, "private-ca/lab-ca", "tls-server", 30, None, {}, NOW)
    assert (facts.dns_names, facts.key_type, facts.key_size, facts.public, facts.owner) == (
        ("*.corp.test",), "RSA", 1024, False, None)
    with read_session(engine) as session, pytest.raises(PolicyViolationError) as refused:
        violations.gate(session, policy, facts, "the CSR", NOW)
    assert sorted(v.rule for v in refused.value.violations) == ["key-size", "owner-required", "wildcard"]
    assert str(refused.value).startswith("policy refuses the CSR: ")
