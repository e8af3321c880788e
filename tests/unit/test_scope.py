"""The scope of a revocation campaign on a real inventory (SQLite and PostgreSQL): each criterion, AND across
criteria and OR within a list, refused input, and what would be done with each certificate and why."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlmodel import col

from certpilot import audit, ca, inventory, keystore, managed, renewing, targets
from certpilot.database import read_session, write_session
from certpilot.errors import NotFoundError, PermanentError
from certpilot.issuance import IssuedCertificate, build_csr
from certpilot.managed import ManagedSpec
from certpilot.models import Certificate, ManagedCertificate
from certpilot.sample_estate import Authority, issue_leaf
from certpilot.scope import Action, InScope, Scope, resolve
from certpilot.settings import load_settings
from certpilot.x509info import describe_certificate, spki_sha256

ACTOR = audit.Actor("test")
NOW = dt.datetime.now(dt.timezone.utc)


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


@dataclass(frozen=True)
class Estate:
    """shop (private CA corp): v1 superseded and revoked, v2 superseded, v3 current with a target; api (an ACME
    block; signed by the test CA): current, its key shared with the unmanaged legacy-api certificate; plain
    (unmanaged, issued by corp, seen on the wire); old (unmanaged, expired); archive (a retired managed one)."""

    shop: tuple[str, str, str]
    api: str
    legacy_api: str
    plain: str
    old: str
    archive: str
    corp_issuing: str
    corp_subject: str
    api_spki: str


def _issue(session, ring, row: ManagedCertificate, *, ca_name: str | None = None, authority: Authority | None = None,
           key: ec.EllipticCurvePrivateKey | None = None, at: dt.datetime | None = None) -> str:
    key = key or ec.generate_private_key(ec.SECP256R1())
    ref = keystore.find_key(session, spki_sha256(key.public_key())) or keystore.store_private_key(
        session, key, ring, ACTOR, "generated")
    if ca_name is not None:
        issued = ca.sign(session, ring, ca_name, build_csr(key, row.dns_names), "tls-server", now=at)
    else:
        assert authority is not None
        leaf, _ = issue_leaf(authority, list(row.dns_names), NOW + dt.timedelta(days=60), key=key)
        issued = IssuedCertificate((_der(leaf), _der(authority.certificate)))
    return renewing.record_issued(session, row, issued, ref, ACTOR).fingerprint_sha256


@pytest.fixture
def estate(engine: sa.Engine, ca: tuple[Authority, Authority]) -> Estate:
    from certpilot import ca as private_ca

    ring = keystore.load_key_ring(load_settings())
    test_ca = ca[1]
    with write_session(engine) as session:
        corp = private_ca.init_ca(session, ring, ACTOR, "corp", "http://127.0.0.1:9/pki")
        shop = managed.add(session, ManagedSpec("shop", ("shop.example.com", "www.shop.example.com"), "private-ca/corp",
                                                owner="shop-team", tags={"env": "prod"}), ACTOR)
        v1, v2, v3 = (_issue(session, ring, shop, ca_name="corp", at=dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=i))
                         for i in range(3))
        shop_fps = (v1, v2, v3)
        targets.add(session, "shop", "nginx-1", "ssh-nginx", "ssh-host/web-1",
                    {"certificate_path": "/etc/ssl/shop.pem", "key_path": "/etc/ssl/shop.key"}, ACTOR)
        api = managed.add(session, ManagedSpec("api", ("api.example.org",), "acme-issuer/le", owner="api-team"), ACTOR)
        api_key = ec.generate_private_key(ec.SECP256R1())
        api_fp = _issue(session, ring, api, authority=test_ca, key=api_key)
        archive = managed.add(session, ManagedSpec("archive", ("archive.example.net",), "acme-issuer/le",
                                                   owner="archive-team"), ACTOR)
        archive_fp = _issue(session, ring, archive, authority=test_ca)
        session.execute(sa.update(ManagedCertificate).where(col(ManagedCertificate.name) == "archive")
                        .values(status="retired"))
        legacy, _ = issue_leaf(test_ca, ["legacy-api.example.org"], NOW + dt.timedelta(days=20), key=api_key)
        old, _ = issue_leaf(test_ca, ["old.example.com"], NOW - dt.timedelta(days=2))
        plain_key = ec.generate_private_key(ec.SECP256R1())
        plain = x509.load_der_x509_certificate(private_ca.issue(
            session, ring, ACTOR, "corp", build_csr(plain_key, ["plain.example.com", "xn--bcher-kva.example.com"]),
            "tls-server").chain_der[0])
        inventory.upsert(session, [
            inventory.Observation(describe_certificate(legacy), "ssh://legacy/etc/ssl/api.pem", "ssh:legacy"),
            inventory.Observation(describe_certificate(old), "tls://127.0.0.1:6443", "tls-scan:lab"),
            inventory.Observation(describe_certificate(plain), "tls://127.0.0.1:7443?sni=plain.example.com",
                                  "tls-scan:lab")], ACTOR, owner="web-team", tags={"env": "staging"})
        private_ca.revoke(session, ring, ACTOR, shop_fps[0], x509.ReasonFlags.superseded)
        issuing = session.get(Certificate, corp.issuing_fingerprint)
        assert issuing is not None
        corp_subject = issuing.subject
    return Estate(shop_fps, api_fp, describe_certificate(legacy).fingerprint_sha256,
                  describe_certificate(plain).fingerprint_sha256, describe_certificate(old).fingerprint_sha256,
                  archive_fp, corp.issuing_fingerprint, corp_subject, spki_sha256(api_key.public_key()))


def _resolve(engine: sa.Engine, scope: Scope, **kwargs: object) -> list[InScope]:
    with read_session(engine) as session:
        return resolve(session, scope, **kwargs)  # type: ignore[arg-type]


def _fps(items: list[InScope]) -> set[str]:
    return {i.fingerprint_sha256 for i in items}


# ------------------------------------------------------------------------------------------- criteria

def test_each_criterion_on_its_own(engine: sa.Engine, estate: Estate) -> None:
    shop = set(estate.shop)
    with read_session(engine) as session:
        plain_serial = inventory.resolve(session, estate.plain).serial_hex
    colon_serial = ":".join(plain_serial[i:i + 2] for i in range(0, len(plain_serial), 2)).upper()
    cases = {
        Scope(names=("shop",)): shop,
        Scope(fingerprints=(estate.api[:12].upper(),)): {estate.api},
        Scope(serials=(colon_serial,)): {estate.plain},
        Scope(issuer="corp"): shop | {estate.plain},
        Scope(issuer="private-ca/corp"): shop,  # an issuer block: the certificates of the managed ones using it
        Scope(issuer=estate.corp_issuing): shop | {estate.plain},
        Scope(issuer=estate.corp_subject): shop | {estate.plain},
        Scope(public_key=estate.api_spki): {estate.api, estate.legacy_api},
        Scope(public_key=estate.api): {estate.api, estate.legacy_api},  # a certificate whose key it is
        Scope(dns_name="WWW.Shop.Example.com."): shop,
        Scope(dns_name="Bücher.example.com"): {estate.plain},  # IDN: stored as its A-label
        Scope(domain_suffix="example.com"): shop | {estate.plain, estate.old},
        Scope(domain_suffix="shop.example.com"): shop,
        Scope(owner="shop-team"): shop,  # the managed certificate's owner
        Scope(owner="web-team"): {estate.legacy_api, estate.old, estate.plain},  # the certificate's own
        Scope(tag="env=prod"): shop,
        Scope(tag="env=staging"): {estate.legacy_api, estate.old, estate.plain},
        Scope(tag="env"): shop | {estate.legacy_api, estate.old, estate.plain},
    }
    for scope, expected in cases.items():
        assert _fps(_resolve(engine, scope)) == expected, scope.describe()


def test_criteria_and_lists_combine_and_within_or_across(engine: sa.Engine, estate: Estate) -> None:
    assert _fps(_resolve(engine, Scope(names=("shop", "api")))) == set(estate.shop) | {estate.api}
    assert _fps(_resolve(engine, Scope(names=("shop",), dns_name="api.example.org"))) == set()
    assert _fps(_resolve(engine, Scope(domain_suffix="example.com", owner="web-team"))) == {estate.old, estate.plain}
    assert _fps(_resolve(engine, Scope(issuer="corp", fingerprints=(estate.plain, estate.api)))) == {estate.plain}
    both = Scope.parse(["name=api,shop", "suffix=example.org"])
    assert _fps(_resolve(engine, both)) == {estate.api}


def test_an_empty_scope_and_names_that_match_nothing_are_refused(engine: sa.Engine, estate: Estate) -> None:
    with read_session(engine) as session:
        with pytest.raises(PermanentError, match="name at least one criterion"):
            resolve(session, Scope())
        with pytest.raises(NotFoundError, match="'nosuch'"):
            resolve(session, Scope(names=("shop", "nosuch")))
        with pytest.raises(NotFoundError, match="serial 0bad1dea"):
            resolve(session, Scope(serials=("0B:AD:1D:EA",)))
        with pytest.raises(NotFoundError, match="deadbeefdeadbeef"):
            resolve(session, Scope(fingerprints=("deadbeefdeadbeef",)))
        with pytest.raises(NotFoundError, match="issuer 'CN=Nobody'"):
            resolve(session, Scope(issuer="CN=Nobody"))
        with pytest.raises(NotFoundError, match="public key"):
            resolve(session, Scope(public_key="ab" * 32))
    # A query criterion that matches nothing is an empty scope, not an error: the caller says so.
    assert _resolve(engine, Scope(domain_suffix="nowhere.test")) == []


def test_parse_reads_cli_items_and_refuses_bad_ones() -> None:
    scope = Scope.parse(["name=web", "name=api,db", "serial=0A:1b", "suffix=*.Example.COM", "tag=team=pay",
                         "public-key=" + "AB:" * 31 + "AB", "owner= payments "])
    assert scope.names == ("api", "db", "web") and scope.serials == ("0a1b",)
    assert scope.domain_suffix == "example.com" and scope.tag == "team=pay" and scope.owner == "payments"
    assert scope.public_key == "ab" * 32
    same = Scope(names=("db", "web", "api", "web"), serials=("a1b",), domain_suffix="example.com", tag="team=pay",
                 public_key="ab" * 32, owner="payments")
    assert same.key() == scope.key() and len(scope.key()) == 64
    assert Scope(names=("web",)).key() != Scope(names=("api",)).key()
    assert Scope.parse(["dns=www.example.com"]).as_dict()["dns_name"] == "www.example.com"
    for item, message in [("colour=red", "key one of"), ("name", "key one of"), ("issuer=", "has no value"),
                          ("fingerprint=xyz12345", "fingerprint 'xyz12345'"),
                          ("fingerprint=abcdef1", "8 to 64 hex digits"), ("serial=0xZZ", "serial '0xZZ'"),
                          ("dns=bad_name.example", "dns 'bad_name.example'"), ("tag==x", "names no key"),
                          ("public-key=abc", "public key 'abc'")]:
        with pytest.raises(PermanentError, match=message):
            Scope.parse([item])
    with pytest.raises(PermanentError, match="owner given twice"):
        Scope.parse(["owner=a", "owner=b"])
    assert Scope().is_empty() and not Scope(owner="x").is_empty()


# -------------------------------------------------------------------------------------------- actions

def test_what_would_be_done_with_each_certificate_and_why(engine: sa.Engine, estate: Estate) -> None:
    items = _resolve(engine, Scope(tag="env"))
    items += _resolve(engine, Scope(names=("api", "archive")))
    by_fp = {i.fingerprint_sha256: i for i in items}
    v1, v2, v3 = (by_fp[fp] for fp in estate.shop)
    assert (v3.action, v3.current, v3.managed, v3.issuer) == (Action.REPLACE, True, "shop", "private-ca/corp")
    assert "current certificate of 'shop'" in v3.why and "1 target(s)" in v3.why
    assert [(t.name, t.kind) for t in v3.targets] == [("nginx-1", "ssh-nginx")]
    assert (v2.action, v2.current, v2.status) == (Action.REVOKE, False, "superseded") and "superseded" in v2.why
    assert (v1.action, v1.status) == (Action.NOTHING, "revoked") and "revoked already" in v1.why
    plain = by_fp[estate.plain]
    assert plain.action is Action.CANNOT and plain.managed is None and plain.issuer is None
    assert f"certpilot managed adopt {estate.plain} --name NAME --issuer BLOCK" in plain.why
    assert "private CA 'corp'" in plain.why
    assert [(loc.locator, loc.source, loc.ghost) for loc in plain.locations] == [
        ("tls://127.0.0.1:7443?sni=plain.example.com", "tls-scan:lab", False)]
    assert plain.dns_names == ("plain.example.com", "xn--bcher-kva.example.com") and plain.owner == "web-team"
    old = by_fp[estate.old]
    assert (old.action, old.status) == (Action.NOTHING, "expired") and old.why.startswith("expired on")
    archive = by_fp[estate.archive]
    assert archive.action is Action.REVOKE and "'archive' is retired" in archive.why
    assert (by_fp[estate.api].action, by_fp[estate.api].owner) == (Action.REPLACE, "api-team")
    assert v3.owner == "shop-team" and v3.tags == {"env": "prod"} and v3.spki_sha256 and v3.as_dict()["action"] == "replace"


def test_replace_first_by_name_then_the_rest(engine: sa.Engine, estate: Estate) -> None:
    items = _resolve(engine, Scope(fingerprints=(estate.old, estate.plain, estate.shop[1], estate.shop[2],
                                                 estate.api)))
    assert [(i.action, i.label) for i in items] == [
        (Action.REPLACE, "api"), (Action.REPLACE, "shop"), (Action.REVOKE, "shop"),
        (Action.CANNOT, "plain.example.com"), (Action.NOTHING, "old.example.com")]


def test_an_issuer_that_does_not_load_cannot_reissue_or_revoke(engine: sa.Engine, estate: Estate) -> None:
    items = {i.fingerprint_sha256: i for i in _resolve(engine, Scope(names=("shop", "api")),
                                                       available_issuers={"private-ca/corp"})}
    api = items[estate.api]
    assert api.action is Action.CANNOT and "'acme-issuer/le'" in api.why and "not available" in api.why
    assert items[estate.shop[2]].action is Action.REPLACE and items[estate.shop[1]].action is Action.REVOKE


def test_a_revoked_current_certificate_is_still_replaced(engine: sa.Engine, estate: Estate) -> None:
    ring = keystore.load_key_ring(load_settings())
    with write_session(engine) as session:
        ca.revoke(session, ring, ACTOR, estate.shop[2], x509.ReasonFlags.key_compromise)
    [current] = [i for i in _resolve(engine, Scope(names=("shop",))) if i.current]
    assert current.fingerprint_sha256 == estate.shop[2] and current.action is Action.REPLACE
    assert current.status == "revoked" and "revoked already" in current.why and "(key-compromise)" in current.why


def test_a_ca_compromise_takes_everything_the_issuer_signed(engine: sa.Engine, estate: Estate) -> None:
    items = _resolve(engine, Scope(issuer="corp"))
    assert {i.issuer_dn for i in items} == {estate.corp_subject}
    assert [(i.action, i.label) for i in items] == [
        (Action.REPLACE, "shop"), (Action.REVOKE, "shop"), (Action.CANNOT, "plain.example.com"),
        (Action.NOTHING, "shop")]


def test_a_key_compromise_takes_every_certificate_with_the_key(engine: sa.Engine, estate: Estate) -> None:
    items = _resolve(engine, Scope(public_key=estate.legacy_api))
    assert {(i.fingerprint_sha256, i.action) for i in items} == {(estate.api, Action.REPLACE),
                                                                 (estate.legacy_api, Action.CANNOT)}
    assert {i.spki_sha256 for i in items} == {estate.api_spki}
    legacy = next(i for i in items if i.fingerprint_sha256 == estate.legacy_api)
    assert [loc.locator for loc in legacy.locations] == ["ssh://legacy/etc/ssl/api.pem"]
