"""The private CA's issuing key on a real PKCS#11 token (SoftHSM2): made there, sensitive and never
extractable, and every certificate, CRL and OCSP response signed there (verified by openssl and by
cryptography against the CA's certificates); a token that cannot be used refuses issuance and leaves
nothing written; the PIN is stored nowhere.

SoftHSM2 reads SOFTHSM2_CONF once per process, when its module is first loaded, and sees no token
created after that: one token directory and one token serve this module, each test with its own CA
(its own key on the token)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pkcs11
import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from pkcs11 import Attribute, ObjectClass
from pkcs11 import exceptions as p11
from sqlmodel import col, func, select
from typer.testing import CliRunner

from certpilot import audit, ca, keystore, token_keys
from certpilot.database import read_session, write_session
from certpilot.issuance import build_csr
from certpilot.models import AuditEvent, Certificate, CertificateAuthority, PrivateKey, TokenKey
from certpilot.settings import load_settings
from cli.main import app
from connectors import pkcs11_token
from connectors.http_service import CAResponder

MODULE = "/usr/lib/softhsm/libsofthsm2.so"
SQLITE_ONLY = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


@dataclass(frozen=True)
class SoftHsm:
    label: str
    pin: str


@pytest.fixture(scope="module")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHsm]:
    """A SoftHSM2 token in a temporary directory, SOFTHSM2_CONF pointing at it for this process."""
    if shutil.which("softhsm2-util") is None or not Path(MODULE).exists():
        pytest.fail("SoftHSM2 is not installed: apt-get install -y softhsm2 (scripts/setup.sh installs it)")
    home = tmp_path_factory.mktemp("softhsm")
    (home / "tokens").mkdir()
    conf = home / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {home / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    before = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    hsm = SoftHsm("certpilot-test", "pin-" + secrets.token_hex(8))
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", hsm.label, "--so-pin", "so-" + hsm.pin,
                    "--pin", hsm.pin], check=True, capture_output=True, timeout=30)
    try:
        yield hsm
    finally:
        if before is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = before


def _pin_file(path: Path, pin: str) -> Path:
    path.write_text(pin + "\n")
    path.chmod(0o600)
    return path


def _spec(hsm: SoftHsm, pin_file: Path) -> token_keys.TokenSpec:
    return token_keys.TokenSpec(MODULE, hsm.label, token_keys.PinSource(file=pin_file))


def _raw_session(hsm: SoftHsm) -> pkcs11.Session:
    """A session of the test's own on the token, straight through python-pkcs11 (in the process's login)."""
    token = pkcs11.lib(MODULE).get_token(token_label=hsm.label)
    try:
        return token.open(user_pin=hsm.pin, rw=True)
    except p11.UserAlreadyLoggedIn:
        return token.open(rw=True)


def _init(engine: sa.Engine, name: str, spec: token_keys.TokenSpec) -> None:
    with write_session(engine) as session:
        ca.init_ca(session, keystore.load_key_ring(load_settings()), audit.Actor("test"), name,
                   "http://pki.example.com", token=spec, tokens=pkcs11_token.open_token)


def _pem(path: Path, *certs: x509.Certificate) -> Path:
    path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs))
    return path


def _openssl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=30)


@SQLITE_ONLY
def test_the_issuing_key_is_on_the_token_and_signs_certificates_crls_and_ocsp(
        engine: sa.Engine, softhsm: SoftHsm, tmp_path: Path) -> None:
    spec = _spec(softhsm, _pin_file(tmp_path / "pin", softhsm.pin))
    _init(engine, "hsm", spec)
    with read_session(engine) as session:
        authority = ca.get_ca(session, "hsm")
        root, issuing = ca.ca_certificates(session, authority)
        row = session.get(TokenKey, authority.issuing_token_key_id)
        assert row is not None and authority.issuing_key_id is None
        key_id, row_label = row.key_id, row.key_label
        assert (row.made_on_token, row.extractable, row.token_label) == (True, False, softhsm.label)
        stored = session.exec(select(PrivateKey.spki_sha256)).all()  # the root only: the issuing key is not here
        assert len(stored) == 1 and row.spki_sha256 not in stored
        listed = token_keys.list_token_keys(session)
        assert [(k.ca, k.token_label, k.key_id, k.algorithm, k.extractable) for k in listed] == [
            ("hsm", softhsm.label, key_id, "ec-p256", False)]
        assert ca.list_cas(session)[0]["issuing_key_custody"] == f"pkcs11:{softhsm.label}"

    # On the token: a private key, sensitive, never extractable, made there; its value cannot be read.
    raw = _raw_session(softhsm)
    try:
        private = raw.get_key(object_class=ObjectClass.PRIVATE_KEY, id=bytes.fromhex(key_id))
        assert private[Attribute.SENSITIVE] and private[Attribute.ALWAYS_SENSITIVE]
        assert not private[Attribute.EXTRACTABLE] and private[Attribute.NEVER_EXTRACTABLE]
        assert private[Attribute.LOCAL]
        with pytest.raises(p11.AttributeSensitive):
            private[Attribute.VALUE]
    finally:
        raw.close()

    # A certificate: openssl verifies the chain, cryptography the signature.
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    with write_session(engine) as session:
        issued = ca.issue(session, keystore.load_key_ring(load_settings()), audit.Actor("test"), "hsm",
                          build_csr(leaf_key, ["app.example.com"]), "tls-server", tokens=pkcs11_token.open_token)
    leaf = issued.leaf
    leaf.verify_directly_issued_by(issuing)
    verified = _openssl("verify", "-CAfile", str(_pem(tmp_path / "root.pem", root)), "-untrusted",
                        str(_pem(tmp_path / "issuing.pem", issuing)), str(_pem(tmp_path / "leaf.pem", leaf)))
    assert verified.returncode == 0 and "leaf.pem: OK" in verified.stdout, verified.stdout + verified.stderr

    # A CRL listing it, after a revocation (signed on the token).
    with write_session(engine) as session:
        ca.revoke(session, keystore.load_key_ring(load_settings()), audit.Actor("test"), issued.leaf.fingerprint(
            hashes.SHA256()).hex(), x509.ReasonFlags.key_compromise, tokens=pkcs11_token.open_token)
        crl = x509.load_der_x509_crl(ca.get_ca(session, "hsm").crl_der or b"")
    assert crl.is_signature_valid(issuing.public_key())  # type: ignore[arg-type]
    assert crl.get_revoked_certificate_by_serial_number(leaf.serial_number) is not None
    (tmp_path / "crl.der").write_bytes(crl.public_bytes(serialization.Encoding.DER))
    crl_check = _openssl("crl", "-in", str(tmp_path / "crl.der"), "-inform", "DER", "-CAfile",
                         str(tmp_path / "issuing.pem"), "-noout")
    assert crl_check.returncode == 0 and "verify OK" in crl_check.stdout + crl_check.stderr, crl_check.stderr

    # An OCSP response: revoked, signed by the issuing key on the token.
    request = ocsp.OCSPRequestBuilder().add_certificate(leaf, issuing, hashes.SHA256()).build()
    with read_session(engine) as session:
        signer = ca.open_signer(session, keystore.load_key_ring(load_settings()), "hsm", tokens=pkcs11_token.open_token)
        response = ocsp.load_der_ocsp_response(ca.respond_ocsp(
            session, signer, request.public_bytes(serialization.Encoding.DER)))
    assert response.certificate_status == ocsp.OCSPCertStatus.REVOKED
    public = issuing.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey) and response.signature_hash_algorithm is not None
    public.verify(response.signature, response.tbs_response_bytes, ec.ECDSA(response.signature_hash_algorithm))
    with pytest.raises(TypeError, match="cannot be extracted"):
        signer._key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,  # noqa: SLF001
                                  serialization.NoEncryption())

    # certpilot serve's CA responder answers for it too: the CRL and OCSP, signed on the token.
    responder = CAResponder(engine, lambda: keystore.load_key_ring(load_settings()))
    try:
        served = responder.answer("POST", "/hsm/ocsp", request.public_bytes(serialization.Encoding.DER))
        assert served is not None and served.status == 200, served
        assert ocsp.load_der_ocsp_response(served.body).certificate_status == ocsp.OCSPCertStatus.REVOKED
        served_crl = responder.answer("GET", "/hsm/issuing.crl", None)
        assert served_crl is not None and served_crl.status == 200, served_crl
        assert x509.load_der_x509_crl(served_crl.body).is_signature_valid(public)
    finally:
        responder.close()

    # keys list names the key on the token and what uses it; no PIN.
    listed_keys = CliRunner().invoke(app, ["keys", "list", "--json"])
    assert listed_keys.exit_code == 0, listed_keys.output
    on_token = [k for k in json.loads(listed_keys.stdout) if k["store"] == "token"]
    assert [(k["ref"], k["algorithm"], k["curve"]) for k in on_token] == [
        (f"token:{softhsm.label}/{row_label}", "ec-p256", "secp256r1")]
    assert {"kind": "ca-issuing", "id": "hsm", "label": ""} in on_token[0]["used_by"]
    assert "not extractable" in on_token[0]["origin"] and softhsm.pin not in listed_keys.stdout

    # The PIN is stored nowhere: not in the inventory's file, not in the audit chain.
    engine.dispose()
    database = Path(engine.url.database or "")
    assert softhsm.pin.encode() not in database.read_bytes()
    with read_session(engine) as session:
        assert all(softhsm.pin not in str(e.details) for e in session.exec(select(AuditEvent)).all())


def _counts(engine: sa.Engine) -> tuple[int, int]:
    with read_session(engine) as session:
        return (session.exec(select(func.count()).select_from(Certificate)).one(),
                session.exec(select(func.count()).select_from(AuditEvent)).one())


@SQLITE_ONLY
def test_a_token_that_cannot_be_used_refuses_issuance_and_writes_nothing(
        engine: sa.Engine, softhsm: SoftHsm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pin_file = _pin_file(tmp_path / "pin", softhsm.pin)
    _init(engine, "hsm2", _spec(softhsm, pin_file))
    csr = tmp_path / "app.csr"
    csr.write_bytes(build_csr(ec.generate_private_key(ec.SECP256R1()), ["app.example.com"]).public_bytes(
        serialization.Encoding.PEM))
    runner = CliRunner()
    issue = ["ca", "issue", "hsm2", "--csr", str(csr), "--owner", "platform", "-o", str(tmp_path / "chain.pem")]

    _pin_file(pin_file, "not-the-pin")  # a wrong PIN
    before = _counts(engine)
    refused = runner.invoke(app, issue)
    assert refused.exit_code == 1, refused.output
    assert f"PKCS#11 token '{softhsm.label}'" in refused.output and "wrong PIN" in refused.output
    assert "not-the-pin" not in refused.output and softhsm.pin not in refused.output
    assert _counts(engine) == before and not (tmp_path / "chain.pem").exists()

    pin_file.chmod(0o644)  # a PIN file others can read
    refused = runner.invoke(app, issue)
    assert refused.exit_code == 1 and "readable by others" in refused.output and _counts(engine) == before

    _pin_file(pin_file, softhsm.pin)  # the right PIN again: it issues
    done = runner.invoke(app, issue)
    assert done.exit_code == 0, done.output
    after_one = _counts(engine)
    assert after_one[0] == before[0] + 1

    with read_session(engine) as session:  # the key removed from the token
        row = session.get(TokenKey, ca.get_ca(session, "hsm2").issuing_token_key_id)
        assert row is not None
        key_id = row.key_id
    raw = _raw_session(softhsm)
    try:
        for object_class in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
            raw.get_key(object_class=object_class, id=bytes.fromhex(key_id)).destroy()
    finally:
        raw.close()
    refused = runner.invoke(app, issue)
    assert refused.exit_code == 1 and f"no private key with CKA_ID {key_id}" in refused.output, refused.output
    assert _counts(engine) == after_one
    with read_session(engine) as session:  # no CRL was issued either: the CRL number did not move
        assert ca.get_ca(session, "hsm2").crl_number == 1

    # Token unavailable at creation: no module, no such token, an unset PIN variable; no CA is made.
    monkeypatch.delenv("CERTPILOT_TEST_PIN", raising=False)
    for flags, expected in (
            (["--pkcs11-module", str(tmp_path / "missing.so"), "--token-label", softhsm.label,
              "--pin-file", str(pin_file)], "cannot be loaded"),
            (["--pkcs11-module", MODULE, "--token-label", "absent", "--pin-file", str(pin_file)],
             "no token with this label"),
            (["--pkcs11-module", MODULE, "--token-label", softhsm.label, "--pin-env", "CERTPILOT_TEST_PIN"],
             "CERTPILOT_TEST_PIN is not set")):
        made = runner.invoke(app, ["ca", "init", "nope", "--base-url", "http://pki.example.com", *flags])
        assert made.exit_code == 1 and expected in made.output, made.output
        with read_session(engine) as session:
            nope = session.exec(select(CertificateAuthority).where(col(CertificateAuthority.name) == "nope")).first()
            assert nope is None
    assert stat.S_IMODE(pin_file.stat().st_mode) == 0o600

    monkeypatch.setenv("CERTPILOT_TEST_PIN", softhsm.pin)  # the same token by --pin-env: the variable's name is kept
    made = runner.invoke(app, ["ca", "init", "hsm3", "--base-url", "http://pki.example.com", "--pkcs11-module", MODULE,
                               "--token-label", softhsm.label, "--pin-env", "CERTPILOT_TEST_PIN"])
    assert made.exit_code == 0 and f"issuing key in pkcs11:{softhsm.label}" in made.output, made.output
    with read_session(engine) as session:
        row = session.get(TokenKey, ca.get_ca(session, "hsm3").issuing_token_key_id)
        assert row is not None and (row.pin_env, row.pin_file) == ("CERTPILOT_TEST_PIN", None)
