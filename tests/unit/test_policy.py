"""certpilot.policy: a corpus of real certificates that each break one rule (and only that one), the
CA/B Forum maximum by issue date at every boundary, private profiles, scopes, waivers, ownership,
endpoint rules, the issuance gate's error, line-numbered refusals of bad policy files, and where the
policy in force comes from."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import pickle
import textwrap
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes, CertificatePublicKeyTypes
from cryptography.x509.oid import NameOID

from certpilot import policy as pol
from certpilot.alert_policy import PolicyFileError as AlertPolicyFileError
from certpilot.errors import PermanentError
from certpilot.policy import (DEFAULT_POLICY, ENDPOINT_RULES, REQUEST_RULES, RULES, EndpointFacts, Facts, Policy,
                              PolicyFileError, PolicyViolationError, Severity, Violation, Waiver, facts_of_certificate,
                              load_policy, parse_policy, parse_waiver_scope, policy_location)
from certpilot.settings import load_settings
from certpilot.x509info import describe_certificate

NOW = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.timezone.utc)
DAY = dt.timedelta(days=1)
SECOND = dt.timedelta(seconds=1)

# The corpus policy: the built-in rules, plus the ones that need configuring.
CORPUS_POLICY = textwrap.dedent("""\
    rules:
      wildcard: {allowed: false}
      allowed-issuers:
        domains:
          example.com: ["CN=Test Public CA,*", "acme-issuer/letsencrypt"]
    """)


def _name(common_name: str, org: str = "certpilot tests") -> x509.Name:
    """Its RFC 4514 form reads CN=...,O=... (the last RDN first)."""
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


@dataclasses.dataclass(frozen=True)
class Signer:
    name: x509.Name
    key: rsa.RSAPrivateKey


@pytest.fixture(scope="module")
def public_ca() -> Signer:
    return Signer(_name("Test Public CA"), rsa.generate_private_key(public_exponent=65537, key_size=2048))


@pytest.fixture(scope="module")
def foreign_ca() -> Signer:
    return Signer(_name("Foreign CA", "somebody else"), rsa.generate_private_key(public_exponent=65537, key_size=2048))


def _leaf(signer: Signer, names: list[str], *, not_before: dt.datetime = NOW - 10 * DAY, days: int = 90,
          key: CertificatePublicKeyTypes | None = None) -> x509.Certificate:
    """A leaf signed with SHA-256 by ``signer``, valid ``days`` days counted inclusively (the clean baseline:
    an EC P-256 key, 90 days)."""
    public_key = key if key is not None else ec.generate_private_key(ec.SECP256R1()).public_key()
    builder = (x509.CertificateBuilder().subject_name(_name(names[0])).issuer_name(signer.name)
               .public_key(public_key).serial_number(x509.random_serial_number())
               .not_valid_before(not_before).not_valid_after(not_before + days * DAY - SECOND)
               .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True))
    signing_key: CertificateIssuerPrivateKeyTypes = signer.key
    return builder.sign(signing_key, hashes.SHA256())


_SHA256_WITH_RSA = bytes.fromhex("06092a864886f70d01010b")  # DER of OID 1.2.840.113549.1.1.11
_SHA1_WITH_RSA = bytes.fromhex("06092a864886f70d010105")    # DER of OID 1.2.840.113549.1.1.5


def _resign_with_sha1(cert: x509.Certificate, signer: Signer) -> x509.Certificate:
    """``cert`` truly signed with SHA-1. cryptography 50 refuses to build one ("Hash algorithm sha1 not
    supported for signatures"), but its RSA keys still sign SHA-1 digests: the signature algorithm OID
    (sha256WithRSAEncryption -> sha1WithRSAEncryption, the same length) is swapped in the TBS part and the
    outer algorithm, and the TBS part signed again with PKCS#1 v1.5 over SHA-1."""
    der = cert.public_bytes(serialization.Encoding.DER)
    tbs = cert.tbs_certificate_bytes.replace(_SHA256_WITH_RSA, _SHA1_WITH_RSA)
    signature = signer.key.sign(tbs, padding.PKCS1v15(), hashes.SHA1())
    swapped = der.replace(_SHA256_WITH_RSA, _SHA1_WITH_RSA)
    assert swapped.endswith(cert.signature) and len(signature) == len(cert.signature)
    sha1 = x509.load_der_x509_certificate(swapped[:-len(signature)] + signature)
    signer.key.public_key().verify(sha1.signature, sha1.tbs_certificate_bytes, padding.PKCS1v15(), hashes.SHA1())
    return sha1


def _facts(cert: x509.Certificate, **known: Any) -> Facts:
    """The clean baseline's facts: owned, tagged, public, unmanaged."""
    defaults: dict[str, Any] = {"owner": "web", "tags": {"env": "prod"}, "public": True, "managed": False}
    return facts_of_certificate(cert, **{**defaults, **known})


def _rules(violations: list[Violation]) -> list[str]:
    return [v.rule for v in violations]


# ------------------------------------------------------------------------------------------ the corpus

def test_the_clean_baseline_breaks_no_rule(public_ca: Signer) -> None:
    policy = parse_policy(CORPUS_POLICY, "corpus.yaml")
    cert = _leaf(public_ca, ["www.example.com", "example.com"])
    assert policy.evaluate(_facts(cert), NOW) == []
    assert DEFAULT_POLICY.evaluate(_facts(cert), NOW) == []


@pytest.mark.parametrize("case", ["rsa-1024", "sha-1", "825-day public", "expired", "expiring unmanaged",
                                  "wildcard where denied", "foreign issuer for a domain", "no owner", "ed448 key"])
def test_each_certificate_of_the_corpus_is_flagged_with_its_rule_and_only_that(
        case: str, public_ca: Signer, foreign_ca: Signer) -> None:
    policy = parse_policy(CORPUS_POLICY, "corpus.yaml")
    known: dict[str, Any] = {}
    if case == "rsa-1024":
        cert = _leaf(public_ca, ["www.example.com"], key=rsa.generate_private_key(65537, 1024).public_key())
        rule, detail = "key-size", "RSA key of 1024 bits; policy requires at least 2048"
    elif case == "sha-1":
        cert = _resign_with_sha1(_leaf(public_ca, ["www.example.com"]), public_ca)
        rule, detail = "signature-algorithm", "signed with sha1WithRSAEncryption (SHA-1); policy denies SHA-1"
    elif case == "825-day public":
        cert = _leaf(public_ca, ["www.example.com"], not_before=dt.datetime(2026, 5, 1, tzinfo=dt.timezone.utc),
                     days=825)
        rule = "max-validity"
        detail = "valid 825 days, issued 2026-05-01; the CA/B Forum maximum on that date is 200 days"
    elif case == "expired":
        cert = _leaf(public_ca, ["www.example.com"], not_before=dt.datetime(2026, 2, 1, tzinfo=dt.timezone.utc),
                     days=117)  # to 2026-05-28 23:59:59
        rule, detail = "expired", "expired 2026-05-28 (3 days ago)"
    elif case == "expiring unmanaged":
        cert = _leaf(public_ca, ["www.example.com"], not_before=NOW - 80 * DAY, days=90)
        rule = "expiring"
        detail = "expires 2026-06-11 (in 9 days) and is not managed; policy flags unmanaged certificates 30 days ahead"
    elif case == "wildcard where denied":
        cert = _leaf(public_ca, ["*.example.com", "example.com"])
        rule, detail = "wildcard", "wildcard name *.example.com; policy allows no wildcard names"
    elif case == "foreign issuer for a domain":
        cert = _leaf(foreign_ca, ["shop.example.com", "www.example.org"])
        rule = "allowed-issuers"
        detail = ("issued by CN=Foreign CA,O=somebody else, not an allowed issuer for shop.example.com (under "
                  "example.com: policy allows CN=Test Public CA,*, acme-issuer/letsencrypt)")
    elif case == "no owner":
        cert = _leaf(public_ca, ["www.example.com"])
        known = {"owner": None}
        rule, detail = "owner-required", "no owner"
    else:
        cert = _leaf(public_ca, ["www.example.com"], key=ed448.Ed448PrivateKey.generate().public_key())
        rule = "key-algorithm"
        detail = "Ed448 key (ed448); policy allows rsa, ec-p256, ec-p384, ec-p521, ed25519, ml-dsa-44, ml-dsa-65, ml-dsa-87"
    violations = policy.evaluate(_facts(cert, **known), NOW)
    assert [(v.rule, v.detail) for v in violations] == [(rule, detail)]
    violation = violations[0]
    assert violation.fingerprint_sha256 == describe_certificate(cert).fingerprint_sha256
    assert violation.place == "" and violation.waiver_id is None
    assert violation.severity == policy.rule_severity(rule)
    assert violation.as_dict() == {"rule": rule, "fingerprint_sha256": violation.fingerprint_sha256,
                                   "severity": violation.severity.value, "detail": detail, "place": "",
                                   "waiver_id": None}


def test_a_managed_certificate_near_its_end_is_left_to_renewal(public_ca: Signer) -> None:
    cert = _leaf(public_ca, ["www.example.com"], not_before=NOW - 80 * DAY, days=90)
    assert DEFAULT_POLICY.evaluate(_facts(cert, managed=True), NOW) == []
    # an unmanaged one with a window of its own is flagged within that window only
    assert DEFAULT_POLICY.evaluate(_facts(cert, renew_before=5 * DAY), NOW) == []
    assert _rules(DEFAULT_POLICY.evaluate(_facts(cert, renew_before=15 * DAY), NOW)) == ["expiring"]


def test_a_ca_certificate_is_held_to_the_key_and_signature_rules_only(public_ca: Signer) -> None:
    key = rsa.generate_private_key(65537, 1024)
    start = dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc)
    ca = (x509.CertificateBuilder().subject_name(_name("Old Root")).issuer_name(_name("Old Root"))
          .public_key(key.public_key()).serial_number(1).not_valid_before(start)
          .not_valid_after(start + 3650 * DAY)
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(key, hashes.SHA256()))
    facts = facts_of_certificate(ca)  # self-signed: private, no owner, 10 years
    assert facts.is_ca and not facts.public and facts.owner is None
    assert _rules(DEFAULT_POLICY.evaluate(facts, NOW)) == ["key-size"]
    assert _rules(DEFAULT_POLICY.evaluate(dataclasses.replace(facts, is_ca=False), NOW)) == [
        "key-size", "max-validity", "owner-required"]


# ------------------------------------------------------------------------------------------ max-validity

@pytest.mark.parametrize(("issued", "maximum"), [
    ("2026-03-14", 398), ("2026-03-15", 200), ("2027-03-14", 200), ("2027-03-15", 100), ("2029-03-14", 100),
    ("2029-03-15", 47), ("2031-01-01", 47)])
def test_max_validity_of_a_public_certificate_is_the_cabf_maximum_on_its_issue_date(
        issued: str, maximum: int, public_ca: Signer) -> None:
    baseline = _facts(_leaf(public_ca, ["www.example.com"]))
    start = dt.datetime.fromisoformat(issued).replace(tzinfo=dt.timezone.utc)
    at_most = dataclasses.replace(baseline, not_before=start, not_after=start + maximum * DAY - SECOND)
    assert DEFAULT_POLICY.evaluate(at_most, start) == []
    over = dataclasses.replace(at_most, not_after=at_most.not_after + SECOND)  # one second over, counted inclusively
    [violation] = DEFAULT_POLICY.evaluate(over, start)
    assert violation.rule == "max-validity" and violation.severity == Severity.MEDIUM
    assert violation.detail == (f"valid {maximum} days and 1 second, issued {issued}; the CA/B Forum maximum on "
                                f"that date is {maximum} days")
    a_day_over = dataclasses.replace(at_most, not_after=at_most.not_after + DAY)
    [violation] = DEFAULT_POLICY.evaluate(a_day_over, start)
    assert violation.detail == (f"valid {maximum + 1} days, issued {issued}; the CA/B Forum maximum on that date "
                                f"is {maximum} days")


@pytest.mark.parametrize(("profile", "maximum"), [("tls-server", 825), ("tls-client", 1095), (None, 825)])
def test_max_validity_of_a_private_certificate_is_its_profiles_maximum(
        profile: str | None, maximum: int, public_ca: Signer) -> None:
    baseline = _facts(_leaf(public_ca, ["www.example.com"]), public=False, profile=profile)
    start = NOW
    at_most = dataclasses.replace(baseline, not_before=start, not_after=start + maximum * DAY - SECOND)
    assert DEFAULT_POLICY.evaluate(at_most, start) == []
    over = dataclasses.replace(at_most, not_after=at_most.not_after + DAY)
    [violation] = DEFAULT_POLICY.evaluate(over, start)
    assert violation.detail == (f"valid {maximum + 1} days, issued 2026-06-01; private profile "
                                f"{profile or 'tls-server'} allows at most {maximum} days")


def test_max_validity_days_replace_the_built_in_maximum(public_ca: Signer) -> None:
    policy = parse_policy("rules:\n  max-validity: {days: 30, severity: high}\n", "p.yaml")
    [violation] = policy.evaluate(_facts(_leaf(public_ca, ["www.example.com"], days=31), managed=True), NOW)
    assert (violation.rule, violation.severity) == ("max-validity", Severity.HIGH)
    assert violation.detail == "valid 31 days, issued 2026-05-22; policy allows at most 30 days"
    assert policy.evaluate(_facts(_leaf(public_ca, ["www.example.com"], days=30), managed=True), NOW) == []


# ------------------------------------------------------------------------------------------ other rules

def test_tags_and_name_patterns(public_ca: Signer) -> None:
    policy = parse_policy(textwrap.dedent("""\
        rules:
          tags-required: {tags: [env, cost-centre]}
          san-allowed: {patterns: ["*.example.com", "example.com", "10.*"]}
          san-denied: {patterns: ["*.internal.example.com"]}
        """), "names.yaml")
    cert = _leaf(public_ca, ["www.example.com", "db.internal.example.com", "www.example.net"])
    found = {v.rule: v.detail for v in policy.evaluate(_facts(cert), NOW)}
    assert found == {
        "tags-required": "missing tag cost-centre; policy requires env, cost-centre",
        "san-allowed": "name www.example.net not allowed; policy allows *.example.com, example.com, 10.*",
        "san-denied": "denied name db.internal.example.com (pattern *.internal.example.com)"}
    clean = _leaf(public_ca, ["www.example.com"])
    assert policy.evaluate(_facts(clean, tags={"env": "prod", "cost-centre": "42"}), NOW) == []


def test_requests_are_held_to_the_request_rules_only(public_ca: Signer) -> None:
    policy = parse_policy(CORPUS_POLICY + "  tags-required: {tags: [env]}\n", "gate.yaml")
    facts = dataclasses.replace(_facts(_leaf(public_ca, ["*.example.com"], key=rsa.generate_private_key(
        65537, 1024).public_key())), fingerprint_sha256=None, signature_algorithm=None, owner=None, tags={},
        issuer="acme-issuer/other", issuer_names=("acme-issuer/other",), not_before=NOW,
        not_after=NOW + 400 * DAY - SECOND)
    violations = policy.evaluate_request(facts, NOW)
    assert _rules(violations) == ["key-size", "max-validity", "owner-required", "tags-required", "allowed-issuers",
                                  "wildcard"]
    assert set(_rules(violations)) <= REQUEST_RULES and all(v.fingerprint_sha256 is None for v in violations)
    error = PolicyViolationError("managed certificate www", violations[:2])
    assert str(error) == ("policy refuses managed certificate www: key-size: RSA key of 1024 bits; policy requires "
                          "at least 2048; max-validity: asks for 400 days on 2026-06-01; the CA/B Forum maximum "
                          "on that date is 200 days")
    assert isinstance(error, PermanentError)
    # whole days, whether the request's end is the last second of the last day or the first of the next
    for end in (NOW + 200 * DAY, NOW + 200 * DAY - SECOND):
        assert "max-validity" not in _rules(policy.evaluate_request(dataclasses.replace(facts, not_after=end), NOW))
    copy = pickle.loads(pickle.dumps(error))
    assert str(copy) == str(error) and copy.violations == tuple(violations[:2]) and copy.what == error.what


def test_endpoint_rules_are_about_the_place(public_ca: Signer) -> None:
    facts = _facts(_leaf(public_ca, ["www.example.com"]))
    place = "tls://10.0.0.5:443?sni=shop.example.com"
    seen = EndpointFacts(place, facts, "TLSv1", chain_complete=False, hostname_matches=False)
    violations = DEFAULT_POLICY.evaluate_endpoint(seen, NOW)
    assert [(v.rule, v.detail) for v in violations] == [
        ("tls-min-version", "served with TLSv1 (policy minimum TLSv1.2)"),
        ("chain-complete", "the chain served is incomplete: it does not lead to a trusted root (an intermediate "
                           "is missing)"),
        ("hostname-match", "the certificate served does not cover shop.example.com")]
    assert {v.place for v in violations} == {place} and set(_rules(violations)) == ENDPOINT_RULES
    assert DEFAULT_POLICY.evaluate_endpoint(EndpointFacts(place, facts, "TLSv1.3", True, True), NOW) == []
    assert DEFAULT_POLICY.evaluate_endpoint(EndpointFacts(place, facts, None, None, None), NOW) == []
    assert not set(_rules(DEFAULT_POLICY.evaluate(facts, NOW))) & ENDPOINT_RULES
    strict = parse_policy("rules:\n  tls-min-version: {minimum: TLSv1.3}\n  hostname-match: off\n", "tls.yaml")
    assert [(v.rule, v.detail) for v in strict.evaluate_endpoint(seen, NOW)][::2] == [
        ("tls-min-version", "served with TLSv1 (policy minimum TLSv1.3)")]
    assert "hostname-match" not in _rules(strict.evaluate_endpoint(seen, NOW))


# ------------------------------------------------------------------------------------------ scopes

SCOPED = textwrap.dedent("""\
    rules:
      expiring: off
    scopes:
      - name: internal
        match: {issuer: private}
        rules:
          max-validity: {days: 30, severity: low}
          owner-required: off
      - name: payments
        match: {owner: payments, domain: pay.example.com}
        rules:
          key-size: {rsa: 4096}
      - name: payments-prod
        match: {tag: "env=prod", owner: payments}
        rules:
          key-size: {severity: critical}
    issuers:
      private: ["CN=Corp Issuing CA*"]
    """)


def test_scopes_refine_the_rules_for_the_certificates_they_match(public_ca: Signer) -> None:
    policy = parse_policy(SCOPED, "scoped.yaml")
    cert = _leaf(public_ca, ["pay.example.com"], key=rsa.generate_private_key(65537, 2048).public_key())
    # public, owned by web: the top-level rules
    assert policy.evaluate(_facts(cert), NOW) == []
    assert _rules(policy.evaluate(_facts(cert, owner=None), NOW)) == ["owner-required"]
    # private: max-validity 30 days at low severity, no owner needed
    [private] = policy.evaluate(_facts(cert, public=False, owner=None), NOW)
    assert (private.rule, private.severity, private.detail) == (
        "max-validity", Severity.LOW, "valid 90 days, issued 2026-05-22; policy allows at most 30 days")
    # payments: RSA 4096 required; a later matching scope raises the severity and keeps the bits
    [payments] = policy.evaluate(_facts(cert, owner="payments", tags={"env": "dev"}), NOW)
    assert (payments.severity, payments.detail) == (Severity.HIGH,
                                                    "RSA key of 2048 bits; policy requires at least 4096")
    [prod] = policy.evaluate(_facts(cert, owner="payments"), NOW)
    assert (prod.severity, prod.detail) == (Severity.CRITICAL, "RSA key of 2048 bits; policy requires at least 4096")
    # the domain criterion: payments' other domains keep 2048
    other = _leaf(public_ca, ["www.example.com"], key=rsa.generate_private_key(65537, 2048).public_key())
    assert policy.evaluate(_facts(other, owner="payments", tags={}), NOW) == []
    assert policy.rule_severity("key-size") == Severity.HIGH  # the top level's
    assert policy.scopes_for(_facts(cert, owner="payments")) == ("payments", "payments-prod")


def test_a_scope_can_allow_what_the_top_level_denies(public_ca: Signer) -> None:
    policy = parse_policy(textwrap.dedent("""\
        rules:
          wildcard: {allowed: false}
        scopes:
          - name: legacy
            match: {domain: legacy.example.com}
            rules:
              wildcard: {allowed: true}
        """), "wild.yaml")
    assert _rules(policy.evaluate(_facts(_leaf(public_ca, ["*.example.com"])), NOW)) == ["wildcard"]
    assert policy.evaluate(_facts(_leaf(public_ca, ["*.legacy.example.com"])), NOW) == []


def test_public_or_private_by_private_ca_self_signature_or_issuer_pattern() -> None:
    policy = parse_policy(SCOPED, "scoped.yaml")
    assert policy.is_public("CN=R11,O=Let's Encrypt,C=US", private_ca=False, self_signed=False)
    assert not policy.is_public("CN=Corp Issuing CA 2,O=Example", private_ca=False, self_signed=False)
    assert not policy.is_public("cn=corp issuing ca 2", private_ca=False, self_signed=False)  # DNs: any case
    assert not policy.is_public("CN=R11,O=Let's Encrypt,C=US", private_ca=True, self_signed=False)
    assert not policy.is_public("CN=R11,O=Let's Encrypt,C=US", private_ca=False, self_signed=True)
    assert DEFAULT_POLICY.is_public("CN=Corp Issuing CA 2", private_ca=False, self_signed=False)


# ------------------------------------------------------------------------------------------ waivers

def test_a_waiver_covers_until_it_expires_and_then_says_so(public_ca: Signer) -> None:
    cert = _leaf(public_ca, ["www.example.com"])
    facts = _facts(cert, owner=None, managed_name="www")
    fingerprint = describe_certificate(cert).fingerprint_sha256
    waiver = Waiver(7, "owner-required", "domain=example.com", "owner being hired", "ciso", NOW + DAY)
    [waived] = DEFAULT_POLICY.evaluate(facts, NOW, [waiver])
    assert (waived.rule, waived.waiver_id, waived.detail) == ("owner-required", 7, "no owner")
    later = NOW + 2 * DAY
    [lapsed] = DEFAULT_POLICY.evaluate(facts, later, [waiver])
    assert lapsed.waiver_id is None and lapsed.detail == "no owner (waiver 7 expired 2026-06-02)"
    assert waiver.expired(later) and not waiver.expired(NOW)
    # a second, unexpired waiver still covers it
    renewed = Waiver(8, "owner-required", f"certificate={fingerprint[:12].upper()}", "still hiring", "ciso",
                     NOW + 30 * DAY)
    assert DEFAULT_POLICY.evaluate(facts, later, [waiver, renewed])[0].waiver_id == 8
    # scope terms must all match; another rule is not covered
    for scope in ("owner=web", "domain=example.org", "tag:env=dev", "certificate=other",
                  "domain=example.com,tag:env=dev"):
        assert DEFAULT_POLICY.evaluate(facts, NOW, [dataclasses.replace(waiver, scope=scope)])[0].waiver_id is None
    for scope in ("*", "certificate=www", "tag:env=prod,domain=www.example.com", f"certificate={fingerprint}"):
        assert DEFAULT_POLICY.evaluate(facts, NOW, [dataclasses.replace(waiver, scope=scope)])[0].waiver_id == 7
    other_rule = dataclasses.replace(waiver, rule="key-size")
    assert DEFAULT_POLICY.evaluate(facts, NOW, [other_rule])[0].waiver_id is None


def test_a_waiver_for_an_endpoint_rule_names_the_place(public_ca: Signer) -> None:
    facts = _facts(_leaf(public_ca, ["www.example.com"]))
    seen = EndpointFacts("tls://old.example.com:443", facts, "TLSv1.1", True, True)
    waiver = Waiver(3, "tls-min-version", "place=tls://old.example.com:*", "legacy clients", "cto", NOW + DAY)
    [violation] = DEFAULT_POLICY.evaluate_endpoint(seen, NOW, [waiver])
    assert violation.waiver_id == 3
    elsewhere = dataclasses.replace(seen, place="tls://new.example.com:443")
    assert DEFAULT_POLICY.evaluate_endpoint(elsewhere, NOW, [waiver])[0].waiver_id is None


@pytest.mark.parametrize(("scope", "problem"), [
    ("", "waiver scope is empty"),
    ("owner", "'owner' is not key=value"),
    ("team=x", "unknown term 'team'"),
    ("tag:=x", "names no tag"),
    ("domain=*.example.com", "domain '*.example.com'"),
    ("owner=a,*", "'*' stands alone"),
])
def test_a_bad_waiver_scope_is_refused_naming_the_part(scope: str, problem: str) -> None:
    with pytest.raises(PermanentError, match=problem.replace("*", r"\*").replace(".", r"\.")):
        parse_waiver_scope(scope)
    with pytest.raises(PermanentError):
        Waiver(1, "owner-required", scope, "r", "a", NOW)


def test_a_waiver_names_a_real_rule() -> None:
    with pytest.raises(PermanentError, match="unknown rule 'owner'"):
        Waiver(1, "owner", "*", "r", "a", NOW)


# ------------------------------------------------------------------------------------------ ownership

def test_ownership_rules_first_match_wins(public_ca: Signer) -> None:
    policy = parse_policy(textwrap.dedent("""\
        ownership:
          - match: {domain: pay.example.com}
            owner: payments
          - match: {locator: "ssh://web-*", source: "ssh:*"}
            owner: web
          - match: {tag: "team=storage"}
            owner: storage
          - owner: platform
        """), "owners.yaml")
    pay = _facts(_leaf(public_ca, ["api.pay.example.com"]), owner=None,
                 locators=("ssh://web-1/etc/ssl/pay.pem",), sources=("ssh:web",))
    assert policy.owner_for(pay) == "payments"
    web = _facts(_leaf(public_ca, ["www.example.com"]), owner=None, locators=("ssh://web-1/etc/ssl/www.pem",),
                 sources=("ssh:web",), tags={"team": "storage"})
    assert policy.owner_for(web) == "web"
    scanned = dataclasses.replace(web, sources=("tls-scan:lab",))  # the locator alone is not enough
    assert policy.owner_for(scanned) == "storage"
    assert policy.owner_for(dataclasses.replace(scanned, tags={})) == "platform"
    assert [r.line for r in policy.ownership] == [2, 4, 6, 8]
    assert DEFAULT_POLICY.owner_for(pay) is None


# ------------------------------------------------------------------------------------------ the file

def test_a_full_policy_parses_and_describes_itself() -> None:
    text = pol.__doc__.split("```yaml\n")[1].split("```")[0]  # the module's own example
    policy = parse_policy(text, "example.yaml")
    described = policy.describe()
    json.dumps(described)
    assert described["source"] == "example.yaml" and described["sha256"] == policy.sha256
    assert list(described["rules"]) == list(RULES)
    assert described["rules"]["key-size"] == {"enabled": True, "severity": "critical", "about": "certificate",
                                             "settings": {"rsa": 3072, "ec": 256, "dsa": 2048}}
    assert described["rules"]["hostname-match"]["enabled"] is False
    assert described["rules"]["allowed-issuers"]["settings"]["domains"] == {
        "example.com": ["acme-issuer/letsencrypt", "CN=R1?,O=Let's Encrypt,C=US"], "corp.example": ["private-ca/*"]}
    assert [s["name"] for s in described["scopes"]] == ["internal", "payments"]
    assert described["scopes"][0]["rules"]["tags-required"] == {"enabled": False}
    assert described["issuers"]["private"] == ["CN=Corp Issuing CA*", "*,O=Example Internal,*"]
    line = next(n for n, row in enumerate(text.splitlines(), 1) if row.startswith("  - owner: platform"))
    assert described["ownership"][2] == {"owner": "platform", "match": {}, "line": line}
    assert pickle.loads(pickle.dumps(policy)) == policy
    default = DEFAULT_POLICY.describe()
    assert {rule for rule, r in default["rules"].items() if not r["enabled"]} == {
        "tags-required", "allowed-issuers", "san-allowed", "san-denied", "wildcard"}
    assert pickle.loads(pickle.dumps(DEFAULT_POLICY)) is DEFAULT_POLICY


@pytest.mark.parametrize(("text", "line", "problem"), [
    ("rules: [\n", 2, "not valid YAML"),
    ("- a list\n", 1, "the policy must be a mapping"),
    ("rules: {}\ncolour: red\n", 2, "unknown key 'colour' in the policy"),
    ("rules:\n  key-size: {rsa: 2048}\n  key-sizes: {rsa: 3072}\n", 3,
     "unknown rule 'key-sizes': the rules are " + ", ".join(RULES)),
    ("rules:\n  key-size:\n    rsa: 3072\n    rsaa: 4096\n", 4, "unknown key 'rsaa' in rule key-size"),
    ("rules:\n  key-size:\n    rsa: big\n", 3, "rule key-size's rsa must be a whole number, not 'big'"),
    ("rules:\n  expired: {severity: urgent}\n", 2, "severity 'urgent' is not one of low, medium, high, critical"),
    ("rules:\n  wildcard: {allowed: sometimes}\n", 2, "rule wildcard's allowed must be true or false"),
    ("rules:\n  expiring: 30\n", 2, "rule expiring must be off, on, or a mapping"),
    ("rules:\n  key-algorithm: {allowed: [rsa, ec-p999x, rsa-pss]}\n", 2, "unknown key algorithm 'rsa-pss'"),
    ("rules:\n  signature-algorithm: {denied: [sha256]}\n", 2, "unknown hash 'sha256'"),
    ("rules:\n  tls-min-version: {minimum: TLSv2}\n", 2, "'TLSv2' is not a TLS version"),
    ("rules:\n  tags-required: on\n", 2, "rule tags-required is on but has no tags"),
    ("rules:\n  san-denied:\n    patterns: ['*.local', 'bad[glob']\n", 3, "'bad[glob' has a '[' with no closing ']'"),
    ("rules:\n  san-allowed:\n    patterns: ['a b.example.com']\n", 3, "has white space"),
    ("rules:\n  san-allowed: {patterns: []}\n", 2, "must list at least one pattern"),
    ("rules:\n  allowed-issuers:\n    domains:\n      '*.example.com': [x]\n", 4,
     "not a DNS domain: a wildcard is not allowed here (a domain covers every name under it"),
    ("rules:\n  key-size: {rsa: 0}\n", 2, "rule key-size's rsa must be at least 1, not 0"),
    ("rules:\n  expired: on\n  expired: off\n", 3, "'expired' given twice in rules"),
    ("scopes:\n  - name: a\n    match: {issuer: internal}\n    rules: {expired: off}\n", 3,
     "scope 'a''s issuer 'internal' must be public or private"),
    ("scopes:\n  - name: a\n    match: {team: x}\n    rules: {expired: off}\n", 3,
     "unknown key 'team' in scope 'a''s match"),
    ("scopes:\n  - name: a\n    match: {}\n    rules: {expired: off}\n", 3, "scope 'a''s match needs issuer, owner"),
    ("scopes:\n  - name: a\n    match: {tag: prod}\n    rules: {expired: off}\n", 3, "tag 'prod' must be key=value"),
    ("scopes:\n  - name: a\n    match: {owner: x}\n    rules: {}\n", 4, "scope 'a''s rules are empty"),
    ("scopes:\n  - name: a\n    match: {owner: x}\n", 2, "scope 1 needs 'rules'"),
    ("scopes:\n  - name: a\n    match: {owner: x}\n    rules:\n      tags-required: {severity: high}\n", 5,
     "rule tags-required in scope 'a' is on but has no tags"),
    ("scopes:\n  - name: a\n    match: {owner: x}\n    rules:\n      max-validity: {dayz: 3}\n", 5,
     "unknown key 'dayz' in rule max-validity in scope 'a': expected"),
    ("scopes:\n  - name: a\n    match: {owner: x}\n    rules: {expired: off}\n  - name: a\n    match: {owner: y}\n"
     "    rules: {expired: off}\n", 5, "scope name 'a' given twice"),
    ("issuers:\n  public: [x]\n", 2, "unknown key 'public' in issuers"),
    ("issuers:\n  private: 'CN=Corp*'\n", 2, "issuers' private must be a list"),
    ("ownership:\n  - match: {domain: example.com}\n", 2, "ownership rule 1 needs 'owner'"),
    ("ownership:\n  - owner: a\n  - match: {}\n    owner: b\n", 3, "ownership rule 2's match needs domain"),
    ("ownership:\n  - owner: a\n    match: {domain: 'exa mple.com'}\n", 3, "ownership rule 1's domain 'exa mple.com'"),
])
def test_a_malformed_policy_is_refused_naming_the_line_and_the_problem(text: str, line: int, problem: str) -> None:
    with pytest.raises(PolicyFileError) as raised:
        parse_policy(text, "/etc/certpilot/policy.yaml")
    assert raised.value.source == "/etc/certpilot/policy.yaml" and raised.value.line == line, str(raised.value)
    assert problem in raised.value.problem, str(raised.value)
    assert str(raised.value).startswith(f"/etc/certpilot/policy.yaml:{line}: ")
    assert isinstance(raised.value, AlertPolicyFileError)  # one error class for every policy file


def test_an_empty_file_is_refused_and_an_empty_mapping_is_the_default() -> None:
    with pytest.raises(PolicyFileError, match="empty file"):
        parse_policy("# nothing yet\n", "policy.yaml")
    policy = parse_policy("{}\n", "policy.yaml")
    assert policy.rules == DEFAULT_POLICY.rules and policy.sha256 is not None and policy.source == "policy.yaml"


# ------------------------------------------------------------------------------------------ loading

def test_the_policy_in_force_comes_from_the_home_a_file_or_a_block(tmp_path: Path) -> None:
    home = tmp_path / "home"
    settings = load_settings({"CERTPILOT_HOME": str(home)})
    assert settings.policy is None and policy_location(settings) == str(home / "policy.yaml")
    assert load_policy(settings) is DEFAULT_POLICY
    home.mkdir()
    (home / "policy.yaml").write_text("rules:\n  expiring: {days: 14}\n")
    from_home = load_policy(settings)
    assert from_home.source == str(home / "policy.yaml") and from_home.rules["expiring"].options["days"] == 14

    other = tmp_path / "strict.yaml"
    other.write_text("rules:\n  owner-required: {severity: critical}\n")
    settings = load_settings({"CERTPILOT_HOME": str(home), "CERTPILOT_POLICY": str(other)})
    assert policy_location(settings) == str(other)
    assert load_policy(settings).rule_severity("owner-required") == Severity.CRITICAL

    missing = load_settings({"CERTPILOT_HOME": str(home), "CERTPILOT_POLICY": str(tmp_path / "nope.yaml")})
    with pytest.raises(PermanentError, match=f"policy file {tmp_path / 'nope.yaml'} \\(CERTPILOT_POLICY\\) does not"):
        load_policy(missing)

    other.write_text("rules:\n  owner-requird: {}\n")
    with pytest.raises(PolicyFileError, match=f"^{other}:2: unknown rule 'owner-requird'"):
        load_policy(settings)

    block = load_settings({"CERTPILOT_HOME": str(home), "CERTPILOT_POLICY": "block:prod"})
    assert policy_location(block) == "block:prod"
    blocks = {"prod": "rules:\n  wildcard: {allowed: false}\n"}
    from_block = load_policy(block, blocks.__getitem__)
    assert from_block.source == "block:prod" and from_block.rules["wildcard"].enabled
    with pytest.raises(PermanentError, match="policy block 'prod'.*no Prefect block reader"):
        load_policy(block)
    with pytest.raises(PermanentError, match="policy block 'staging' \\(CERTPILOT_POLICY\\) cannot be read: KeyError"):
        load_policy(load_settings({"CERTPILOT_HOME": str(home), "CERTPILOT_POLICY": "block:staging"}),
                    blocks.__getitem__)
    blocks["prod"] = "rules:\n  wildcard: {allowed: maybe}\n"
    with pytest.raises(PolicyFileError, match="^block:prod:2: rule wildcard's allowed must be true or false"):
        load_policy(block, blocks.__getitem__)


def test_severities_rank_in_order() -> None:
    assert [Severity.rank(s) for s in (Severity.LOW, Severity.MEDIUM, Severity.HIGH, Severity.CRITICAL)] == [0, 1, 2, 3]
    assert max(Severity, key=Severity.rank) == Severity.CRITICAL and Severity("high").rank() == 2


def test_a_policy_needs_every_rule() -> None:
    with pytest.raises(ValueError):
        Policy("x", None, None, rules={})
