"""ML-DSA (FIPS 204) private CAs: an ML-DSA root and issuing CA, ML-DSA leaves from a CSR and from a
managed certificate's renewal, recorded and parsed like any other, their keys sealed in the keystore,
CRLs and OCSP responses signed with ML-DSA, chains verified with cryptography (OpenSSL 3.0 here knows
no ML-DSA); the crypto inventory and the policy count them; ACME issuers are refused an ML-DSA key."""

from __future__ import annotations

import datetime as dt
import socket
from pathlib import Path

import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, mldsa
from cryptography.x509 import ocsp, verification
from sqlmodel import col, select
from typer.testing import CliRunner

from certpilot import audit, ca, keystore, managed, renewing
from certpilot.crypto_inventory import crypto_inventory
from certpilot.database import read_session, write_session
from certpilot.errors import PermanentError
from certpilot.issuance import build_csr
from certpilot.keys import generate_private_key, key_algorithm, private_key_der
from certpilot.models import Certificate, PrivateKey
from certpilot.policy import facts_of_certificate, parse_policy
from certpilot.settings import load_settings
from cli.main import app
from connectors.acme_issuer import AcmeIssuer
from connectors.challenges import Http01Responder
from connectors.private_ca import PrivateCAIssuer

SQLITE_ONLY = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
ALLOW_ML_DSA = """rules:
  key-algorithm: {allowed: [rsa, ec-p256, ec-p384, ec-p521, ed25519, ml-dsa-44, ml-dsa-65, ml-dsa-87]}
"""


def _ring() -> keystore.KeyRing:
    return keystore.load_key_ring(load_settings())


def _verify_chain(leaf: x509.Certificate, issuing: x509.Certificate, root: x509.Certificate) -> None:
    leaf.verify_directly_issued_by(issuing)
    issuing.verify_directly_issued_by(root)
    root.verify_directly_issued_by(root)


@SQLITE_ONLY
def test_an_ml_dsa_ca_signs_leaves_crls_and_ocsp_that_cryptography_verifies(
        engine: sa.Engine, certpilot_home: Path, tmp_path: Path) -> None:
    (certpilot_home / "policy.yaml").write_text(ALLOW_ML_DSA)
    runner = CliRunner()
    made = runner.invoke(app, ["ca", "init", "pq", "--base-url", "http://pki.example.com", "--algorithm", "ml-dsa-65"])
    assert made.exit_code == 0 and "ml-dsa-65; issuing key in keystore" in made.output, made.output
    leaf_key = mldsa.MLDSA65PrivateKey.generate()
    csr = tmp_path / "svc.csr"
    csr.write_bytes(build_csr(leaf_key, ["svc.corp.example"]).public_bytes(serialization.Encoding.PEM))
    issued = runner.invoke(app, ["ca", "issue", "pq", "--csr", str(csr), "--owner", "platform",
                                 "-o", str(tmp_path / "chain.pem")])
    assert issued.exit_code == 0, issued.output
    leaf, issuing_in_chain = x509.load_pem_x509_certificates((tmp_path / "chain.pem").read_bytes())

    with read_session(engine) as session:
        authority = ca.get_ca(session, "pq")
        root, issuing = ca.ca_certificates(session, authority)
        assert issuing == issuing_in_chain
        _verify_chain(leaf, issuing, root)
        verifier = (verification.PolicyBuilder().store(verification.Store([root]))  # RFC 5280 path validation
                    .build_server_verifier(verification.DNSName("svc.corp.example")))
        assert verifier.verify(leaf, [issuing]) == [leaf, issuing, root]
        rows = {r.fingerprint_sha256: r for r in session.exec(select(Certificate)).all()}
        for cert in (root, issuing, leaf):  # recorded and parsed like any other
            row = rows[cert.fingerprint(hashes.SHA256()).hex()]
            assert (row.key_type, row.signature_algorithm) == ("ML-DSA-65", "ML-DSA-65")
        # both CA keys sealed in the keystore: ML-DSA, and no plaintext seed in the rows
        keys = session.exec(select(PrivateKey)).all()
        assert sorted(k.algorithm for k in keys) == ["ml-dsa-65", "ml-dsa-65"]
        assert authority.issuing_key_id is not None
        issuing_key = keystore.load_private_key(session, keystore.KeyRef(authority.issuing_key_id), _ring())
        assert key_algorithm(issuing_key) == "ml-dsa-65"
        assert issuing_key.public_key() == issuing.public_key()
        sealed = next(k for k in keys if k.id == authority.issuing_key_id)
        assert sealed.ciphertext is not None and private_key_der(issuing_key)[-32:] not in sealed.ciphertext
        info = ca.list_cas(session)[0]
        assert (info["algorithm"], info["issuing_key_custody"]) == ("ml-dsa-65", "keystore")

    # The crypto inventory counts them post-quantum; the policy names their algorithm.
    now = dt.datetime.now(dt.timezone.utc)
    with read_session(engine) as session:
        leaves = crypto_inventory(session, now)
        everything = crypto_inventory(session, now, include_ca=True)
    assert everything.keys.get("ML-DSA-65") == 3 and everything.signatures.get("ML-DSA-65") == 3
    assert everything.pq.post_quantum == 3 and everything.pq.classical == 0
    assert leaves.pq.post_quantum == 1 and leaves.certificates[0].quantum == "post-quantum"
    classical_only = parse_policy("rules:\n  key-algorithm: {allowed: [rsa, ec-p256]}\n")
    refused = [v for v in classical_only.evaluate(facts_of_certificate(leaf), now) if v.rule == "key-algorithm"]
    assert refused and "ml-dsa-65" in refused[0].detail
    allowing = parse_policy(ALLOW_ML_DSA)
    assert not [v for v in allowing.evaluate(facts_of_certificate(leaf), now) if v.rule == "key-algorithm"]

    revoked = runner.invoke(app, ["ca", "revoke", leaf.fingerprint(hashes.SHA256()).hex(), "--reason", "superseded"])
    assert revoked.exit_code == 0, revoked.output
    with read_session(engine) as session:
        crl = x509.load_der_x509_crl(ca.get_ca(session, "pq").crl_der or b"")
        request = ocsp.OCSPRequestBuilder().add_certificate(leaf, issuing, hashes.SHA256()).build()
        signer = ca.open_signer(session, _ring(), "pq")
        response = ocsp.load_der_ocsp_response(ca.respond_ocsp(
            session, signer, request.public_bytes(serialization.Encoding.DER)))
    public = issuing.public_key()
    assert isinstance(public, mldsa.MLDSA65PublicKey)
    assert crl.is_signature_valid(public) and crl.get_revoked_certificate_by_serial_number(leaf.serial_number)
    assert response.certificate_status == ocsp.OCSPCertStatus.REVOKED
    public.verify(response.signature, response.tbs_response_bytes)  # raises when it does not verify
    assert response.signature_algorithm_oid.dotted_string == "2.16.840.1.101.3.4.3.18"  # id-ml-dsa-65

@SQLITE_ONLY
def test_managed_ml_dsa_certificates_come_from_a_private_ca_only(engine: sa.Engine) -> None:
    actor = audit.Actor("test")
    with write_session(engine) as session:
        ca.init_ca(session, _ring(), actor, "pq87", "http://pki.example.com", algorithm="ml-dsa-87")
        managed.add(session, managed.ManagedSpec(name="svc", dns_names=("svc.corp.example",), issuer="private-ca/pq87",
                                                 key_algorithm="ml-dsa-44", owner="platform"), actor)
        with pytest.raises(PermanentError, match="no ACME or public CA issues ML-DSA"):
            managed.add(session, managed.ManagedSpec(name="web", dns_names=("web.example.com",),
                                                     issuer="acme-issuer/letsencrypt", key_algorithm="ml-dsa-65",
                                                     owner="web"), actor)
    renewal = renewing.renew_one(engine, "svc", PrivateCAIssuer(engine, "pq87", _ring), _ring, actor,
                                 policy=parse_policy(ALLOW_ML_DSA))
    with read_session(engine) as session:
        row = session.get(Certificate, renewal.fingerprint_sha256)
        assert row is not None and (row.key_type, row.signature_algorithm) == ("ML-DSA-44", "ML-DSA-87")
        leaf = x509.load_der_x509_certificate(row.der)
        root, issuing = ca.ca_certificates(session, ca.get_ca(session, "pq87"))
        key_row = session.exec(select(PrivateKey).where(col(PrivateKey.id) == renewal.key_ref.removeprefix("key:"))).one()
        key = keystore.load_private_key(session, keystore.KeyRef(key_row.id), _ring())
    _verify_chain(leaf, issuing, root)
    assert key_row.algorithm == "ml-dsa-44" and key.public_key() == leaf.public_key()
    with pytest.raises(PermanentError, match="PKCS#11 token is EC P-256"):
        with write_session(engine) as session:
            ca.init_ca(session, _ring(), actor, "nope", "http://pki.example.com", algorithm="ml-dsa-65",
                       token=object())  # type: ignore[arg-type]


def test_ml_dsa_keys_and_csrs() -> None:
    for name in ("ml-dsa-44", "ml-dsa-65", "ml-dsa-87"):
        key = generate_private_key(name)
        assert key_algorithm(key) == name
        csr = build_csr(key, ["a.corp.example"])
        assert csr.is_signature_valid and csr.public_key() == key.public_key()
    assert key_algorithm(ec.generate_private_key(ec.SECP256R1())) == "ec-p256"


def test_an_acme_issuer_refuses_an_ml_dsa_key_before_contacting_the_ca(engine: sa.Engine) -> None:
    with socket.socket() as listener:  # the "CA": a socket that would see any connection
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        port = listener.getsockname()[1]
        issuer = AcmeIssuer(engine, "le", f"http://127.0.0.1:{port}/dir",
                            key_ring=keystore.load_key_ring(load_settings()), solver=Http01Responder(port=0), timeout=2)
        with pytest.raises(PermanentError, match="ml-dsa-65, which no ACME or public CA certifies"):
            issuer.issue(build_csr(mldsa.MLDSA65PrivateKey.generate(), ["a.example.com"]), "tls-server")
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody connected
