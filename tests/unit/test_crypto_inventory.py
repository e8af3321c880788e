"""The crypto inventory (certpilot.crypto_inventory) over a real inventory: certificates generated here
with the keys and signatures it counts (RSA-1024, SHA-1 truly signed, EC P-256 and P-384, Ed25519,
ML-DSA-65), managed ones renewed through certpilot.renewing, one issued by certpilot's own CA; and
``certpilot report crypto``."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, mldsa, rsa
from typer.testing import CliRunner

from certpilot import audit, ca, keystore, managed, renewing
from certpilot.clock import utcnow
from certpilot.crypto_inventory import (ACME_ALTERNATIVE, EXTERNAL_ALTERNATIVE, SELF_SIGNED_ALTERNATIVE,
                                        CryptoInventory, crypto_inventory, crypto_markdown, ml_dsa_support)
from certpilot.database import read_session, write_session
from certpilot.sample_estate import Authority, make_ca
from certpilot.settings import load_settings
from certpilot.x509info import describe_certificate
from cli.main import app
from tests.sample_issuer import SampleIssuer
from tests.weak_certificates import DAY, Signer, add, resign_with_sha1

CLI = audit.Actor("cli:alice")
RUN = audit.Actor("prefect:renew-due", "6f1c1a52-0d8c-4b8e-9d1e-3f1f2a0b7c11")


@pytest.fixture(scope="module")
def public_ca() -> Signer:
    return Signer.make("Test Public CA")


@pytest.fixture(scope="module")
def authority() -> Authority:
    return make_ca("Sample ACME CA")


@dataclass(frozen=True)
class Estate:
    now: dt.datetime
    weak_rsa: str
    sha1: str
    api: str
    db: str
    edge: str
    pq: str
    expired: str
    shop: str
    intranet: str
    lab_leaf: str
    public_issuer: str


def ring() -> keystore.KeyRing:
    return keystore.load_key_ring(load_settings())


def managed_current(engine: sa.Engine, name: str) -> str:
    with read_session(engine) as session:
        current = managed.current_certificate(session, managed.get(session, name))
        assert current is not None
        return current.fingerprint_sha256


@pytest.fixture
def estate(engine: sa.Engine, public_ca: Signer, authority: Authority) -> Estate:
    now = utcnow().replace(microsecond=0)
    rsa_1024 = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    weak_rsa = add(engine, public_ca.leaf(["old.example.com"], now + 60 * DAY, key=rsa_1024.public_key()),
                   locators=["tls://old.example.com:443"], owner="web")
    sha1 = add(engine, resign_with_sha1(public_ca.leaf(["legacy.example.com"], now + 100 * DAY), public_ca),
               locators=["tls://legacy.example.com:443", "ssh://web1/etc/ssl/legacy.pem"], owner="web")
    api = add(engine, public_ca.leaf(["api.example.com"], now + 80 * DAY), owner="api")
    db = add(engine, public_ca.leaf(["db.example.com"], now + 81 * DAY,
                                    key=ec.generate_private_key(ec.SECP384R1()).public_key()))
    edge = add(engine, public_ca.leaf(["edge.example.com"], now + 82 * DAY,
                                      key=ed25519.Ed25519PrivateKey.generate().public_key()), owner="api")
    pq_ca = Signer.make("PQ Lab CA", key=mldsa.MLDSA65PrivateKey.generate())
    pq = add(engine, pq_ca.leaf(["pq.lab.example"], now + 83 * DAY,
                                key=mldsa.MLDSA65PrivateKey.generate().public_key()), owner="lab")
    expired = add(engine, public_ca.leaf(["gone.example.com"], now - 2 * DAY, key=rsa_1024.public_key()), owner="web")
    add(engine, public_ca.certificate)  # a CA certificate: counted only with include_ca
    # managed certificates, issued through the renewal code: one from an ACME CA, one from the private CA "lab-ca"
    with write_session(engine) as session:
        managed.add(session, managed.ManagedSpec(name="shop", dns_names=("shop.example.com",),
                                                 issuer="acme-issuer/letsencrypt", owner="shop"), CLI)
        managed.add(session, managed.ManagedSpec(name="intranet", dns_names=("intranet.corp.example",),
                                                 issuer="private-ca/lab-ca", owner="it"), CLI)
        ca.init_ca(session, ring(), CLI, "lab-ca", "http://127.0.0.1:8099")
    for name in ("shop", "intranet"):
        renewing.renew_one(engine, name, SampleIssuer(authority), ring, RUN)
    # and one leaf the private CA issued from a CSR (`certpilot ca issue --csr`), managed by nobody
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "printer.corp.example")]))
           .add_extension(x509.SubjectAlternativeName([x509.DNSName("printer.corp.example")]), critical=False)
           .sign(key, hashes.SHA256()))
    with write_session(engine) as session:
        issued = ca.issue(session, ring(), CLI, "lab-ca", csr, "tls-server")
    lab_leaf = describe_certificate(issued.leaf).fingerprint_sha256
    return Estate(now, weak_rsa, sha1, api, db, edge, pq, expired, managed_current(engine, "shop"),
                  managed_current(engine, "intranet"), lab_leaf,
                  describe_certificate(public_ca.certificate).subject)


def inventory(engine: sa.Engine, now: dt.datetime, **options: Any) -> CryptoInventory:
    with read_session(engine) as session:
        return crypto_inventory(session, now, **options)


def test_counts_by_key_and_signature_with_the_weak_ones_flagged(engine: sa.Engine, estate: Estate) -> None:
    found = inventory(engine, estate.now)
    in_service = {estate.weak_rsa, estate.sha1, estate.api, estate.db, estate.edge, estate.pq, estate.shop,
                  estate.intranet, estate.lab_leaf}
    assert {c.fingerprint_sha256 for c in found.certificates} == in_service  # not the expired one, not the CAs
    assert list(found.keys.items()) == [("EC-secp256r1", 5), ("EC-secp384r1", 1), ("Ed25519", 1), ("ML-DSA-65", 1),
                                        ("RSA-1024", 1)]
    assert list(found.signatures.items()) == [("RSA-SHA256", 4), ("ECDSA-SHA256", 3), ("ML-DSA-65", 1),
                                              ("RSA-SHA1", 1)]
    assert found.weak_keys == {"RSA-1024"} and found.weak_signatures == {"RSA-SHA1"}
    weak = {c.fingerprint_sha256: c for c in found.weak}
    assert list(weak) == [estate.weak_rsa, estate.sha1]  # soonest expiry first
    assert weak[estate.weak_rsa].weaknesses == ("RSA key of 1024 bits, under 2048",)
    assert weak[estate.sha1].weaknesses == (
        "signed with sha1WithRSAEncryption: SHA-1 collisions are practical (SHAttered, 2017)",)
    sha1 = weak[estate.sha1]
    assert (sha1.name, sha1.key, sha1.signature, sha1.owner, sha1.places) == (
        "legacy.example.com", "EC-secp256r1", "RSA-SHA1", "web",
        ("tls://legacy.example.com:443", "ssh://web1/etc/ssl/legacy.pem"))
    as_dict = found.as_dict()
    assert as_dict["certificates"] == 9
    assert {"key": "RSA-1024", "count": 1, "weak": True} in as_dict["keys"]
    assert {"signature": "RSA-SHA1", "count": 1, "weak": True} in as_dict["signatures"]
    assert [w["fingerprint_sha256"] for w in as_dict["weak"]] == [estate.weak_rsa, estate.sha1]


def test_which_certificates_still_use_rsa_1024_or_sha1(engine: sa.Engine, estate: Estate) -> None:
    found = inventory(engine, estate.now)

    def chosen(**criteria: Any) -> list[str]:
        return [c.fingerprint_sha256 for c in found.select(**criteria)]

    for key in ("RSA-1024", "rsa-1024", "RSA_1024", "RSA"):
        assert chosen(key=key) == [estate.weak_rsa]
    for signature in ("sha1", "SHA-1", "RSA-SHA1", "sha1WithRSAEncryption"):
        assert chosen(signature=signature) == [estate.sha1]
    assert chosen(key="EC-secp256r1", signature="sha1") == [estate.sha1]  # every criterion must match
    assert chosen(key="Ed25519") == [estate.edge]
    assert chosen(weak=True, key="Ed25519") == []
    assert chosen(signature="ML-DSA-65") == [estate.pq]
    assert chosen(key="RSA-512") == [] and chosen(signature="md5") == []


def test_post_quantum_readiness_per_issuer_and_owner(engine: sa.Engine, estate: Estate) -> None:
    pq = inventory(engine, estate.now).pq
    support = ml_dsa_support()
    assert (pq.classical, pq.post_quantum, pq.unknown) == (8, 1, 0)
    issuers = {i.issuer: i for i in pq.issuers}
    assert list(issuers) == [estate.public_issuer, "private-ca/lab-ca", "acme-issuer/letsencrypt"]  # most first
    public = issuers[estate.public_issuer]
    assert (public.kind, public.certificates, public.alternative) == ("external", 5, EXTERNAL_ALTERNATIVE)
    assert public.keys == {"EC-secp256r1": 2, "EC-secp384r1": 1, "Ed25519": 1, "RSA-1024": 1}
    # the managed certificate of private-ca/lab-ca and the leaf the CA "lab-ca" issued from a CSR: one issuer
    private = issuers["private-ca/lab-ca"]
    assert (private.kind, private.certificates, private.keys) == ("private-ca", 2, {"EC-secp256r1": 2})
    assert private.alternative == support.private_ca_alternative
    acme = issuers["acme-issuer/letsencrypt"]
    assert (acme.kind, acme.certificates, acme.alternative) == ("acme", 1, ACME_ALTERNATIVE)
    owners = {o.owner: o for o in pq.owners}
    assert {o: owners[o].certificates for o in owners} == {"web": 2, "api": 2, "(no owner)": 2, "it": 1, "shop": 1}
    assert owners["(no owner)"].issuers == {estate.public_issuer: 1, "private-ca/lab-ca": 1}
    assert "lab" not in owners  # its only certificate is ML-DSA already


def test_ml_dsa_support_is_tried_with_the_installed_cryptography() -> None:
    support = ml_dsa_support()
    version = importlib.metadata.version("cryptography")
    assert support.cryptography_version == version
    assert support.available and support.algorithms == ("ML-DSA-44", "ML-DSA-65", "ML-DSA-87")
    assert support.private_ca_alternative == (
        f"can sign ML-DSA-44/ML-DSA-65/ML-DSA-87 with cryptography {version}: "
        "`certpilot ca init NAME --algorithm ml-dsa-65`, leaves with --key-algorithm ml-dsa-65")


def test_ca_certificates_only_when_asked(engine: sa.Engine, estate: Estate) -> None:
    leaves = inventory(engine, estate.now)
    everything = inventory(engine, estate.now, include_ca=True)
    cas = [c for c in everything.certificates if c.fingerprint_sha256 not in
           {x.fingerprint_sha256 for x in leaves.certificates}]
    # the public CA, the sample ACME CA (the chain of the renewals), lab-ca's root and issuing certificates
    assert len(cas) == 4
    by_name = {c.name: c for c in cas}
    assert by_name["Test Public CA"].issuer_kind == "self-signed"
    assert by_name["Test Public CA"].key == "RSA-2048"
    self_signed = next(i for i in everything.pq.issuers if i.issuer == "self-signed")
    assert self_signed.alternative == SELF_SIGNED_ALTERNATIVE and self_signed.certificates == 3  # three roots


def test_the_markdown_escapes_what_it_shows(engine: sa.Engine, public_ca: Signer) -> None:
    now = utcnow()
    rsa_1024 = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    add(engine, public_ca.leaf(["odd.example.com"], now + 30 * DAY, key=rsa_1024.public_key()),
        owner="ops|<b>team</b>")
    markdown = crypto_markdown(inventory(engine, now))
    assert "ops\\|&lt;b&gt;team&lt;/b&gt;" in markdown and "<b>" not in markdown
    assert "| RSA-1024 | 1 | weak |" in markdown
    assert "## Weak certificates (1)" in markdown and "RSA key of 1024 bits, under 2048" in markdown
    assert "## Post-quantum readiness" in markdown and "1 certificates use a classical key" in markdown


def test_an_empty_inventory(engine: sa.Engine) -> None:
    found = inventory(engine, utcnow())
    assert (found.certificates, found.keys, found.signatures, found.pq.classical) == ((), {}, {}, 0)
    assert "None: no RSA key under 2048 bits" in crypto_markdown(found)


# ------------------------------------------------------------------------------------ the CLI

def cli(*args: str) -> Any:
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "250"})


def test_cli_report_crypto_weak_json(estate: Estate) -> None:
    result = cli("report", "crypto", "--weak", "--json")
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    assert got["filters"] == {"weak": True, "key": None, "signature": None} and got["count"] == 2
    rows = {c["fingerprint_sha256"]: c for c in got["certificates"]}
    assert list(rows) == [estate.weak_rsa, estate.sha1]
    assert {k: rows[estate.weak_rsa][k] for k in ("name", "key", "signature_algorithm", "owner", "places")} == {
        "name": "old.example.com", "key": "RSA-1024", "signature_algorithm": "sha256WithRSAEncryption",
        "owner": "web", "places": ["tls://old.example.com:443"]}
    assert rows[estate.sha1]["signature"] == "RSA-SHA1"


def test_cli_report_crypto_filters(estate: Estate) -> None:
    by_key = json.loads(cli("report", "crypto", "--key", "RSA-1024", "--json").stdout)
    assert [c["fingerprint_sha256"] for c in by_key["certificates"]] == [estate.weak_rsa]
    by_signature = json.loads(cli("report", "crypto", "--signature", "sha1", "--json").stdout)
    assert [c["fingerprint_sha256"] for c in by_signature["certificates"]] == [estate.sha1]
    text = cli("report", "crypto", "--signature", "sha1")
    assert text.exit_code == 0 and "legacy.example.com" in text.stdout and estate.sha1[:16] in text.stdout
    assert "1 certificate" in text.stdout and "SHA-1 collisions are practical" in text.stdout
    none = cli("report", "crypto", "--key", "RSA-512")
    assert none.exit_code == 0 and "0 certificates" in none.stdout
    assert "no certificate in service has the key 'RSA-512'" in none.stderr and "RSA-1024" in none.stderr


def test_cli_report_crypto_whole_inventory(estate: Estate) -> None:
    got = json.loads(cli("report", "crypto", "--json").stdout)
    assert got["certificates"] == 9 and got["post_quantum"]["to_reissue"] == 8
    assert [i["issuer"] for i in got["post_quantum"]["issuers"]][1:] == ["private-ca/lab-ca", "acme-issuer/letsencrypt"]
    text = cli("report", "crypto")
    assert text.exit_code == 0, text.output
    assert "RSA-1024" in text.stdout and "8 certificates use a classical key" in text.stdout
    assert ACME_ALTERNATIVE in text.stdout
