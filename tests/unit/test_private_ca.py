"""The private CA's core: what it issues (linted by pkilint against the CA/B Forum Baseline
Requirements within their validity limit; each profile's own maximum, refused beyond it; cut and said at
the issuing CA's end), what it refuses, the signer that keeps its key, and the
root key's export and removal; the ``ca`` commands. Real keys and certificates throughout."""

from __future__ import annotations

import copy
import datetime as dt
import json
import os
import pickle
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, NameOID
from pkilint import finding_filter, loader
from pkilint.cabf import serverauth
from pkilint.pkix import certificate as pkix_certificate
from typer.testing import CliRunner

from certpilot import audit, ca, inventory, keystore
from cli.main import app
from certpilot.database import read_session, write_session
from certpilot.issuance import PROFILES, build_csr
from certpilot.models import AuditEvent, Certificate, CertificateAuthority, ManagedCertificate, PrivateKey
from certpilot.sample_estate import issue_leaf, make_ca
from certpilot.settings import load_settings
from certpilot.x509info import describe_certificate

UTC = dt.timezone.utc
BASE_URL = "http://pki.example.com"  # a public-looking host: pkilint flags internal names in AIA/CRL URLs
SQLITE_ONLY = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # where the database does not matter


def _ring() -> keystore.KeyRing:
    return keystore.load_key_ring(load_settings())


def _actor() -> audit.Actor:
    return audit.Actor("test")


def _p256() -> PrivateKeyTypes:
    return ec.generate_private_key(ec.SECP256R1())


def _init(engine: sa.Engine, name: str = "corp", now: dt.datetime | None = None) -> None:
    with write_session(engine) as session:
        ca.init_ca(session, _ring(), _actor(), name, BASE_URL, now=now)


def _signer(engine: sa.Engine, name: str = "corp") -> ca.CASigner:
    with read_session(engine) as session:
        return ca.open_signer(session, _ring(), name)


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def cabf_findings(cert: x509.Certificate) -> list[tuple[str, str]]:
    """pkilint's CA/B Forum serverAuth lint, in process (as `lint_cabf_serverauth_cert lint -d` runs it):
    (severity, code) of every finding, the validity period start taken from the certificate."""
    doc = loader.RFC5280CertificateDocumentLoader().load_der_document(cert.public_bytes(serialization.Encoding.DER), "leaf")
    cert_type = serverauth.determine_certificate_type(doc)
    validator = pkix_certificate.create_pkix_certificate_validator_container(
        serverauth.create_decoding_validators(), serverauth.create_validators(cert_type))
    results, _ = finding_filter.filter_results(serverauth.create_serverauth_finding_filters(cert_type),
                                               validator.validate(doc.root))
    return [(d.finding.severity.name, d.finding.code) for r in results for d in r.finding_descriptions]


def _errors(findings: list[tuple[str, str]]) -> list[str]:
    return [code for severity, code in findings if severity in ("ERROR", "FATAL")]


def _inclusive_days(cert: x509.Certificate) -> float:
    return (cert.not_valid_after_utc - cert.not_valid_before_utc + dt.timedelta(seconds=1)) / dt.timedelta(days=1)


# ------------------------------------------------------------------------------------------ the cap

@pytest.mark.parametrize(("day", "days"), [
    (dt.date(2025, 1, 1), 398), (dt.date(2026, 3, 14), 398), (dt.date(2026, 3, 15), 200),
    (dt.date(2027, 3, 14), 200), (dt.date(2027, 3, 15), 100), (dt.date(2029, 3, 14), 100),
    (dt.date(2029, 3, 15), 47), (dt.date(2040, 1, 1), 47),
    (dt.datetime(2026, 3, 14, 23, 59, 59, tzinfo=UTC), 398), (dt.datetime(2026, 3, 15, tzinfo=UTC), 200),
    (dt.datetime(2027, 3, 15, 0, 30, tzinfo=dt.timezone(dt.timedelta(hours=1))), 200),  # 2027-03-14 23:30 UTC
])
def test_max_validity_days_follows_sc081(day: dt.date, days: int) -> None:
    assert ca.max_validity_days(day) == days


def test_max_validity_days_refuses_naive_time() -> None:
    with pytest.raises(ValueError):
        ca.max_validity_days(dt.datetime(2027, 1, 1))


# ------------------------------------------------------------------------------------------ tls-server

@SQLITE_ONLY
def test_tls_server_certificate_passes_pkilint(engine: sa.Engine, tmp_path: Path) -> None:
    _init(engine)
    signer = _signer(engine)
    cert = signer.sign(build_csr(_p256(), ["www.example.com", "example.com"]), "tls-server")
    path = tmp_path / "leaf.pem"
    path.write_bytes(_pem(cert))
    lint = subprocess.run([str(Path(sys.executable).with_name("lint_cabf_serverauth_cert")), "lint", "-d", "-o",
                           "-s", "ERROR", str(path)], capture_output=True, text=True, timeout=60, check=False)
    assert lint.stderr.strip() == "DV-FINAL-CERTIFICATE"
    assert lint.returncode == 0, lint.stdout  # the exit status is the number of findings at ERROR or above
    assert _errors(cabf_findings(cert)) == []


@SQLITE_ONLY
@pytest.mark.parametrize(("issued_at", "cabf"), [
    (dt.datetime(2026, 3, 14, 0, 0, tzinfo=UTC), 398),
    (dt.datetime(2026, 3, 15, 0, 0, tzinfo=UTC), 200),
    (dt.datetime(2027, 3, 14, 23, 59, 59, tzinfo=UTC), 200),
    (dt.datetime(2027, 3, 15, 0, 0, tzinfo=UTC), 100),
    (dt.datetime(2029, 3, 15, 0, 0, tzinfo=UTC), 47),
])
def test_within_the_cabf_maximum_a_server_certificate_passes_the_lint_and_beyond_it_claims_no_dv_policy(
        engine: sa.Engine, issued_at: dt.datetime, cabf: int) -> None:
    """The CA/B Forum maximum of the issue date binds publicly trusted certificates, not the private
    CA's: up to it, a tls-server certificate carries the DV policy and passes pkilint; longer (up to the
    profile's maximum) it is issued as asked, without claiming the Baseline Requirements' policy."""
    _init(engine, now=dt.datetime(2026, 1, 1, tzinfo=UTC))
    signer = _signer(engine)
    csr = build_csr(_p256(), ["api.example.com"])
    within = signer.sign(csr, "tls-server", validity_days=cabf, now=issued_at)
    assert within.not_valid_before_utc == issued_at
    assert _inclusive_days(within) == cabf  # 00:00:00 to 23:59:59 N days later is N days, as the BRs count
    assert _errors(cabf_findings(within)) == []
    assert _policies(within) == ["2.23.140.1.2.1"]
    longer = signer.sign(csr, "tls-server", validity_days=500, now=issued_at)
    assert _inclusive_days(longer) == 500  # not cut to the CA/B Forum maximum, silently or otherwise
    assert _policies(longer) == []
    default = signer.sign(csr, "tls-server", now=issued_at)
    assert _inclusive_days(default) == ca.CA_PROFILES["tls-server"].default_days == 90
    assert _policies(default) == (["2.23.140.1.2.1"] if 90 <= cabf else [])


def _policies(cert: x509.Certificate) -> list[str]:
    try:
        policies = cert.extensions.get_extension_for_class(x509.CertificatePolicies).value
    except x509.ExtensionNotFound:
        return []
    return [p.policy_identifier.dotted_string for p in policies]


def test_the_profiles_are_the_managed_profiles_with_their_own_limits() -> None:
    assert tuple(ca.CA_PROFILES) == PROFILES  # what a managed certificate may ask for, each stated here
    for profile in ca.CA_PROFILES.values():
        assert 1 <= profile.default_days <= profile.max_days and profile.why
    assert ca.CA_PROFILES["tls-server"].max_days > ca.max_validity_days(dt.date(2026, 3, 15))  # not the CA/B limit
    assert ca.CA_PROFILES["tls-server"].extended_key_usage == (ExtendedKeyUsageOID.SERVER_AUTH,)
    assert ca.CA_PROFILES["tls-client"].extended_key_usage == (ExtendedKeyUsageOID.CLIENT_AUTH,)


@SQLITE_ONLY
@pytest.mark.parametrize("profile", ["tls-server", "tls-client"])
def test_a_request_over_the_profiles_maximum_is_refused_and_at_it_is_granted(engine: sa.Engine, profile: str) -> None:
    _init(engine)
    maximum = ca.CA_PROFILES[profile].max_days
    csr = build_csr(_p256(), ["long.example.com"])
    with pytest.raises(ca.CertificateRequestError,
                       match=f"validity of {maximum + 1} days is over profile {profile}'s maximum of {maximum} days"), \
            write_session(engine) as session:
        ca.issue(session, _ring(), _actor(), "corp", csr, profile, validity_days=maximum + 1)
    with write_session(engine) as session:
        issued = ca.issue(session, _ring(), _actor(), "corp", csr, profile, validity_days=maximum)
    assert _inclusive_days(issued.leaf) == maximum and issued.notes == ()
    with read_session(engine) as session:  # the refused one left nothing behind
        leaves = session.execute(sa.select(sa.func.count()).select_from(Certificate)
                                 .where(Certificate.is_ca.is_(False))).scalar_one()
    assert leaves == 1


@SQLITE_ONLY
def test_pkilint_counts_one_second_more_as_too_long(engine: sa.Engine) -> None:
    """The control for the test above: the same certificate one second longer is an error."""
    _init(engine, now=dt.datetime(2026, 1, 1, tzinfo=UTC))
    cert = _signer(engine).sign(build_csr(_p256(), ["api.example.com"]), "tls-server", validity_days=200,
                                now=dt.datetime(2026, 3, 15, tzinfo=UTC))
    longer = x509.CertificateBuilder(cert.issuer, cert.subject, cert.public_key(), cert.serial_number,  # type: ignore[arg-type]
                                     cert.not_valid_before_utc, cert.not_valid_after_utc + dt.timedelta(seconds=1),
                                     list(cert.extensions)).sign(_p256(), hashes.SHA256())  # type: ignore[arg-type]
    assert _errors(cabf_findings(longer)) == ["cabf.serverauth.certificate_validity_period_exceeds_200_days"]


@SQLITE_ONLY
def test_tls_server_profile(engine: sa.Engine, tmp_path: Path) -> None:
    _init(engine)
    signer = _signer(engine)
    key = _p256()
    csr = build_csr(key, ["WWW.Example.com", "example.com"], ["192.0.2.7"])
    cert = signer.sign(csr, "tls-server")
    ext = cert.extensions
    assert list(ext.get_extension_for_class(x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert [p.policy_identifier.dotted_string for p in ext.get_extension_for_class(x509.CertificatePolicies).value] \
        == ["2.23.140.1.2.1"]
    assert ext.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName) \
        == ["www.example.com", "example.com"]
    assert [str(ip) for ip in ext.get_extension_for_class(x509.SubjectAlternativeName).value
            .get_values_for_type(x509.IPAddress)] == ["192.0.2.7"]
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "www.example.com"
    basic = ext.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and not basic.value.ca
    usage = ext.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and not usage.value.key_cert_sign
    aia = {d.access_method: d.access_location.value for d in ext.get_extension_for_class(x509.AuthorityInformationAccess).value}
    assert aia == {AuthorityInformationAccessOID.OCSP: f"{BASE_URL}/corp/ocsp",
                   AuthorityInformationAccessOID.CA_ISSUERS: f"{BASE_URL}/corp/issuing.crt"}
    crl_dp = ext.get_extension_for_class(x509.CRLDistributionPoints).value
    assert [n.value for dp in crl_dp for n in dp.full_name] == [f"{BASE_URL}/corp/issuing.crl"]
    assert ext.get_extension_for_class(x509.SubjectKeyIdentifier).value == \
        x509.SubjectKeyIdentifier.from_public_key(key.public_key())  # type: ignore[arg-type]
    assert ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier == \
        signer.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    cert.verify_directly_issued_by(signer.certificate)
    serials = {signer.sign(csr, "tls-server").serial_number for _ in range(50)} | {cert.serial_number}
    assert len(serials) == 51 and all(0 < s < 2**128 for s in serials)
    assert max(s.bit_length() for s in serials) > 120  # random over 128 bits, not a counter
    (tmp_path / "chain.pem").write_bytes(_pem(signer.root))
    (tmp_path / "issuing.pem").write_bytes(_pem(signer.certificate))
    (tmp_path / "leaf.pem").write_bytes(_pem(cert))
    for purpose, ok in (("sslserver", True), ("sslclient", False)):
        run = subprocess.run(["openssl", "verify", "-CAfile", "chain.pem", "-untrusted", "issuing.pem",
                              "-purpose", purpose, "leaf.pem"], cwd=tmp_path, capture_output=True, text=True,
                             timeout=30, check=False)
        assert (run.returncode == 0) is ok, run.stdout + run.stderr


@SQLITE_ONLY
def test_tls_client_profile(engine: sa.Engine, tmp_path: Path) -> None:
    _init(engine)
    signer = _signer(engine)
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "billing-worker")]))
           .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier("spiffe://corp/billing"),
                                                       x509.DNSName("billing.internal")]), critical=False)
           .sign(_p256(), hashes.SHA256()))  # type: ignore[arg-type]
    cert = signer.sign(csr, "tls-client")
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.CertificatePolicies)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "billing.internal"
    (tmp_path / "root.pem").write_bytes(_pem(signer.root))
    (tmp_path / "issuing.pem").write_bytes(_pem(signer.certificate))
    (tmp_path / "leaf.pem").write_bytes(_pem(cert))
    for purpose, ok in (("sslclient", True), ("sslserver", False)):
        run = subprocess.run(["openssl", "verify", "-CAfile", "root.pem", "-untrusted", "issuing.pem",
                              "-purpose", purpose, "leaf.pem"], cwd=tmp_path, capture_output=True, text=True,
                             timeout=30, check=False)
        assert (run.returncode == 0) is ok, run.stdout + run.stderr
    with pytest.raises(ca.CertificateRequestError, match="tls-server certificates carry only"):
        signer.sign(csr, "tls-server")  # a URI SAN has no place in a TLS server certificate


# ------------------------------------------------------------------------------------------ refusals

def _csr_without_san(key: PrivateKeyTypes) -> x509.CertificateSigningRequest:
    return (x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "www.example.com")]))
            .sign(key, hashes.SHA256()))  # type: ignore[arg-type]


def _csr_with_bad_signature() -> x509.CertificateSigningRequest:
    der = bytearray(build_csr(_p256(), ["www.example.com"]).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # the last byte of the signature's s value
    csr = x509.load_der_x509_csr(bytes(der))
    assert not csr.is_signature_valid
    return csr


@pytest.mark.parametrize(("make_csr", "profile", "message"), [
    (lambda: _csr_without_san(_p256()), "tls-server", "the CSR has no subjectAltName"),
    (_csr_with_bad_signature, "tls-server", "the CSR's signature does not verify"),
    (lambda: build_csr(rsa.generate_private_key(65537, 1024), ["www.example.com"]), "tls-server",
     "RSA key of 1024 bits"),
    (lambda: build_csr(ec.generate_private_key(ec.SECP256K1()), ["www.example.com"]), "tls-server", "EC curve secp256k1"),
    (lambda: build_csr(_p256(), ["bad_name.example.com"]), "tls-server", "is not a valid DNS name"),
    (lambda: build_csr(_p256(), ["www.example.com"]), "code-signing", "unknown profile"),
])
def test_refused_requests_issue_nothing(engine: sa.Engine, make_csr, profile: str, message: str) -> None:  # noqa: ANN001
    _init(engine)
    csr = make_csr()
    with write_session(engine) as session:
        before = session.execute(sa.select(sa.func.count()).select_from(Certificate)).scalar_one()
    with pytest.raises(ca.CertificateRequestError, match=message), write_session(engine) as session:
        ca.issue(session, _ring(), _actor(), "corp", csr, profile)
    with read_session(engine) as session:
        assert session.execute(sa.select(sa.func.count()).select_from(Certificate)).scalar_one() == before == 2


@SQLITE_ONLY
def test_validity_never_outlives_the_issuing_ca_and_the_cut_is_said(engine: sa.Engine) -> None:
    _init(engine, now=dt.datetime(2026, 1, 1, tzinfo=UTC))
    signer = _signer(engine)
    end = signer.certificate.not_valid_after_utc
    cert, validity = signer.sign_planned(build_csr(_p256(), ["late.example.com"]), "tls-server",
                                         now=end - dt.timedelta(days=3))
    assert cert.not_valid_after_utc == end
    assert validity.note is not None and validity.note.startswith(
        f"capped at the issuing CA's expiry {end:%Y-%m-%d %H:%M:%S} UTC: 3.0 of the 90 days asked for")
    with write_session(engine) as session:  # `ca issue` returns the note and records it with the issuance
        issued = ca.issue(session, _ring(), _actor(), "corp", build_csr(_p256(), ["late2.example.com"]), "tls-client",
                          validity_days=30, now=end - dt.timedelta(days=10))
    assert issued.leaf.not_valid_after_utc == end and len(issued.notes) == 1 and "10.0 of the 30 days" in issued.notes[0]
    with read_session(engine) as session:
        event = session.execute(sa.select(AuditEvent).where(AuditEvent.action == "certificate.issued")).scalars().one()
    assert json.loads(event.details)["notes"] == list(issued.notes)
    with read_session(engine) as session:
        unchanged = ca.sign(session, _ring(), "corp", build_csr(_p256(), ["early.example.com"]), "tls-server",
                            now=end - dt.timedelta(days=200))
    assert unchanged.notes == () and _inclusive_days(unchanged.leaf) == 90
    with pytest.raises(ca.PermanentError, match="not valid at"):
        signer.sign(build_csr(_p256(), ["later.example.com"]), "tls-server", now=end + dt.timedelta(seconds=1))


def test_ca_names_and_urls_are_checked(engine: sa.Engine) -> None:
    _init(engine)
    for name, url, message in (("corp", BASE_URL, "already exists"), ("bad/name", BASE_URL, "CA name"),
                               ("other", "https://pki.example.com", "plain http://"),
                               ("other", "ftp://pki.example.com", "plain http://")):
        with pytest.raises(ca.PermanentError, match=message), write_session(engine) as session:
            ca.init_ca(session, _ring(), _actor(), name, url)


def test_revoke_refuses_what_the_ca_did_not_issue(engine: sa.Engine) -> None:
    _init(engine)
    _init(engine, "other")
    stranger_ca = make_ca("Stranger CA")
    stranger, _ = issue_leaf(stranger_ca, ["stranger.example.com"], dt.datetime.now(UTC) + dt.timedelta(days=30))
    with write_session(engine) as session:
        inventory.upsert(session, [inventory.Observation(describe_certificate(c), None, "import")
                                   for c in (stranger_ca.certificate, stranger)], _actor())
        corp = ca.get_ca(session, "corp")
        ours = ca.issue(session, _ring(), _actor(), "other", build_csr(_p256(), ["x.example.com"]), "tls-server").leaf
    cases = [(stranger.fingerprint(hashes.SHA256()).hex(), None, "was not issued by a certpilot private CA"),
             (corp.root_fingerprint, None, "is a certificate of CA corp"),
             (corp.issuing_fingerprint, None, "is a certificate of CA corp"),
             (ours.fingerprint(hashes.SHA256()).hex(), "corp", "was issued by CA other, not corp")]
    for fingerprint, ca_name, message in cases:
        with pytest.raises(ca.PermanentError, match=message), write_session(engine) as session:
            ca.revoke(session, _ring(), _actor(), fingerprint, x509.ReasonFlags.key_compromise, ca_name=ca_name)
    with pytest.raises(ca.PermanentError, match="not allowed for subscriber"), write_session(engine) as session:
        ca.revoke(session, _ring(), _actor(), ours.fingerprint(hashes.SHA256()).hex(), x509.ReasonFlags.certificate_hold)
    with read_session(engine) as session:
        assert session.execute(sa.select(sa.func.count()).select_from(Certificate)
                               .where(Certificate.status == "revoked")).scalar_one() == 0


# ------------------------------------------------------------------------------------------ the signer

@SQLITE_ONLY
def test_signer_keeps_its_key(engine: sa.Engine) -> None:
    _init(engine)
    signer = _signer(engine)
    with read_session(engine) as session:
        key = keystore.load_private_key(session, keystore.KeyRef(ca.get_ca(session, "corp").issuing_key_id), _ring())
    secret = format(key.private_numbers().private_value, "x")  # type: ignore[union-attr]
    assert "corp" in repr(signer) and secret not in repr(signer).lower()
    for attempt in (pickle.dumps, copy.copy, copy.deepcopy):
        with pytest.raises(TypeError, match="cannot be pickled"):
            attempt(signer)  # type: ignore[operator]
    public = {name: getattr(signer, name) for name in dir(signer) if not name.startswith("_")}
    assert not any(isinstance(value, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) for value in public.values())
    assert not hasattr(signer, "__dict__")  # nothing can be hung on it either


# ------------------------------------------------------------------------------------------ the root key

def test_root_key_export_and_removal(engine: sa.Engine, tmp_path: Path) -> None:
    _init(engine)
    with read_session(engine) as session:
        row = ca.get_ca(session, "corp")
        root_key_id = row.root_key_id
        root_cert, _ = ca.ca_certificates(session, row)
    target = tmp_path / "corp-root.pem"
    result = CliRunner().invoke(app, ["ca", "export-root-key", "corp", "-o", str(target), "--plaintext-key"])
    assert result.exit_code == 0, result.output
    assert "PRIVATE KEY" not in result.output
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    exported = target.read_bytes()
    key = serialization.load_pem_private_key(exported, None)
    assert key.public_key().public_numbers() == root_cert.public_key().public_numbers()  # type: ignore[union-attr]
    assert x509.load_pem_x509_certificate(exported) == root_cert
    again = CliRunner().invoke(app, ["ca", "export-root-key", "corp", "-o", str(target)])
    assert again.exit_code == 1 and "refusing to overwrite" in again.output
    assert target.read_bytes() == exported

    encrypted = tmp_path / "corp-root-encrypted.pem"
    (tmp_path / "pass").write_text("correct horse\n")
    result = CliRunner().invoke(app, ["ca", "export-root-key", "corp", "-o", str(encrypted),
                                      "--password-file", str(tmp_path / "pass")])
    assert result.exit_code == 0, result.output
    assert b"ENCRYPTED PRIVATE KEY" in encrypted.read_bytes()
    assert serialization.load_pem_private_key(encrypted.read_bytes(), b"correct horse").public_key().public_numbers() \
        == root_cert.public_key().public_numbers()  # type: ignore[union-attr]

    with read_session(engine) as session:
        events = session.execute(sa.select(AuditEvent).where(AuditEvent.action == "ca.root_key_exported")).scalars().all()
    assert [json.loads(e.details)["encrypted"] for e in events] == [False, True]
    assert {e.object for e in events} == {"ca:corp"}

    refused = CliRunner().invoke(app, ["ca", "remove-root-key", "corp"])
    assert refused.exit_code == 2
    result = CliRunner().invoke(app, ["ca", "remove-root-key", "corp", "--yes"])
    assert result.exit_code == 0, result.output
    assert "warning" not in result.output  # an export was recorded
    with read_session(engine) as session:
        assert ca.get_ca(session, "corp").root_key_id is None
        shredded = session.get(PrivateKey, root_key_id)
        assert shredded.destroyed_at is not None and shredded.ciphertext is None and shredded.wrapped_data_key is None
        assert session.execute(sa.select(AuditEvent).where(AuditEvent.action == "ca.root_key_removed")).first()
        audit.verify(session)
    assert CliRunner().invoke(app, ["ca", "remove-root-key", "corp", "--yes"]).output.startswith(
        "CA corp's root key was already removed")
    gone = CliRunner().invoke(app, ["ca", "export-root-key", "corp", "-o", str(tmp_path / "again.pem")])
    assert gone.exit_code == 1 and "removed from the inventory" in gone.stderr
    assert not (tmp_path / "again.pem").exists()

    # The intermediate carries on: issuance and CRLs need only the issuing key.
    with write_session(engine) as session:
        issued = ca.issue(session, _ring(), _actor(), "corp", build_csr(_p256(), ["after.example.com"]), "tls-server")
        crl = ca.publish_crl(session, _ring(), _actor(), "corp")
    issued.leaf.verify_directly_issued_by(issued.chain[1])
    assert crl.is_signature_valid(issued.chain[1].public_key())  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ the commands

def test_ca_commands(engine: sa.Engine, tmp_path: Path) -> None:
    runner = CliRunner()
    outputs = []

    def cli(*args: str) -> str:
        result = runner.invoke(app, list(args))
        assert result.exit_code == 0, (args, result.output, result.exception)
        outputs.append(result.output)  # stdout and stderr
        return result.stdout

    init = json.loads(cli("ca", "init", "corp", "--base-url", "http://pki.example.com:8180/", "--json"))
    assert init["urls"]["ocsp"] == "http://pki.example.com:8180/corp/ocsp" and init["root_key"] == "online"
    key = _p256()
    (tmp_path / "req.pem").write_bytes(build_csr(key, ["svc.example.com"]).public_bytes(serialization.Encoding.PEM))
    (tmp_path / "req.der").write_bytes(build_csr(key, ["svc2.example.com"]).public_bytes(serialization.Encoding.DER))
    cli("ca", "issue", "corp", "--csr", str(tmp_path / "req.pem"), "--profile", "tls-server", "-o", str(tmp_path / "svc.pem"),
        "--owner", "platform")
    chain = x509.load_pem_x509_certificates((tmp_path / "svc.pem").read_bytes())
    assert len(chain) == 2 and chain[1].fingerprint(hashes.SHA256()).hex() == init["issuing_fingerprint"]
    leaf = chain[0]
    stdout_chain = cli("ca", "issue", "corp", "--csr", str(tmp_path / "req.der"), "--profile", "tls-client", "--days", "30",
                       "--owner", "platform")
    client = x509.load_pem_x509_certificates(stdout_chain.encode())[0]
    assert _inclusive_days(client) == 30
    listed = json.loads(cli("ca", "list", "--json"))
    assert [(c["name"], c["issued"], c["revoked"], c["crl_number"]) for c in listed] == [("corp", 2, 0, 1)]
    with read_session(engine) as session:  # `ca issue` records what it issues, once
        issued = session.execute(sa.select(AuditEvent.object).where(AuditEvent.action == "certificate.issued")).scalars()
        assert sorted(issued) == sorted(f"certificate:{c.fingerprint(hashes.SHA256()).hex()}" for c in (leaf, client))

    fp = leaf.fingerprint(hashes.SHA256()).hex()
    revoked = json.loads(cli("ca", "revoke", fp[:12], "--reason", "key-compromise", "--json"))
    assert revoked == {"fingerprint_sha256": fp, "serial": format(leaf.serial_number, "x").zfill(len(revoked["serial"])),
                       "ca": "corp", "reason": "key-compromise", "revoked_at": revoked["revoked_at"], "crl_number": 2,
                       "already_revoked": False}
    cli("ca", "crl", "corp", "-o", str(tmp_path / "corp.crl"))
    crl = x509.load_der_x509_crl((tmp_path / "corp.crl").read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(leaf.serial_number) is not None
    cli("ca", "crl", "corp", "--refresh", "--format", "pem", "-o", str(tmp_path / "corp.crl.pem"))
    assert x509.load_pem_x509_crl((tmp_path / "corp.crl.pem").read_bytes()).extensions.get_extension_for_class(
        x509.CRLNumber).value.crl_number == 3
    with write_session(engine) as session:  # the CRL nears its nextUpdate: `ca crl` reissues it first
        session.execute(sa.update(CertificateAuthority).values(crl_next_update=dt.datetime.now(UTC) + dt.timedelta(hours=1)))
    cli("ca", "crl", "corp", "-o", str(tmp_path / "corp.crl"))
    reissued = x509.load_der_x509_crl((tmp_path / "corp.crl").read_bytes())
    assert reissued.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 4
    assert reissued.get_revoked_certificate_by_serial_number(leaf.serial_number) is not None
    table = cli("ca", "list")
    assert "corp" in table and "1 CA(s)" in table
    with read_session(engine) as session:
        row = session.get(Certificate, fp)
        assert (row.status, row.revocation_reason) == ("revoked", "keyCompromise")
        assert session.execute(sa.select(CertificateAuthority)).scalars().one().crl_number == 4
    assert not any("PRIVATE KEY" in text for text in outputs)

    bad_reason = runner.invoke(app, ["ca", "revoke", fp, "--reason", "on-a-whim"])
    assert bad_reason.exit_code == 2 and "'on-a-whim' is not one of 'unspecified', 'key-compromise'" in bad_reason.stderr


@SQLITE_ONLY
def test_ca_command_errors_are_clear(engine: sa.Engine, tmp_path: Path) -> None:
    """Through ``main``, as an operator sees it: one line, exit status 1, no traceback."""
    _init(engine)
    env = {**os.environ, "COLUMNS": "200"}
    (tmp_path / "nosan.pem").write_bytes(_csr_without_san(_p256()).public_bytes(serialization.Encoding.PEM))
    (tmp_path / "junk.csr").write_bytes(b"not a CSR")
    (tmp_path / "good.pem").write_bytes(build_csr(_p256(), ["long.example.com"]).public_bytes(serialization.Encoding.PEM))
    owned = ("--owner", "platform")
    cases = {("ca", "issue", "nope", "--csr", str(tmp_path / "nosan.pem"), *owned): "no CA named 'nope' (there are: corp)",
             ("ca", "issue", "corp", "--csr", str(tmp_path / "good.pem"), "--days", "900", *owned):  # the policy first
                 "max-validity: asks for 900 days on ",
             ("ca", "issue", "corp", "--csr", str(tmp_path / "good.pem"), "--days", "900"):
                 "private profile tls-server allows at most 825 days; owner-required: no owner",
             ("ca", "issue", "corp", "--csr", str(tmp_path / "nosan.pem"), *owned): "the CSR has no subjectAltName",
             ("ca", "issue", "corp", "--csr", str(tmp_path / "junk.csr")): "is not a CSR in PEM or DER"}
    running = {args: subprocess.Popen([sys.executable, "-m", "cli", *args], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=env) for args in cases}
    for args, process in running.items():
        stdout, stderr = process.communicate(timeout=60)
        assert process.returncode == 1, stderr
        assert cases[args] in " ".join(stderr.split()) and "Traceback" not in stderr
        assert stdout == ""


@SQLITE_ONLY
def test_ca_profiles_and_issue_as_long_as_the_profile_allows(engine: sa.Engine, tmp_path: Path) -> None:
    """`ca profiles` states each profile's limits; `ca issue --days 730` gets 730 days (it got 200, the
    CA/B Forum maximum, without a word); at the issuing CA's end the cut is printed."""
    runner = CliRunner()
    shown = json.loads(runner.invoke(app, ["ca", "profiles", "--json"]).stdout)
    assert shown == [p.as_dict() for p in ca.CA_PROFILES.values()]
    assert [(p["name"], p["extended_key_usage"], p["default_days"], p["max_days"]) for p in shown] == [
        ("tls-server", ["serverAuth"], 90, 825), ("tls-client", ["clientAuth"], 365, 1095),
        ("mtls", ["serverAuth", "clientAuth"], 90, 825)]
    table = runner.invoke(app, ["ca", "profiles"])
    assert table.exit_code == 0 and "tls-server" in table.stdout and "825" in table.stdout and "Apple" in table.stdout

    _init(engine)
    (tmp_path / "req.pem").write_bytes(build_csr(_p256(), ["two-years.example.com"]).public_bytes(serialization.Encoding.PEM))
    result = runner.invoke(app, ["ca", "issue", "corp", "--csr", str(tmp_path / "req.pem"), "--days", "730", "--json",
                                 "--owner", "platform"])
    assert result.exit_code == 0, result.output
    issued = json.loads(result.stdout)
    assert _inclusive_days(x509.load_pem_x509_certificates(issued["chain_pem"].encode())[0]) == 730
    assert issued["notes"] == []

    with write_session(engine) as session:  # a CA whose issuing certificate ends in about six days
        ca.init_ca(session, _ring(), _actor(), "old", BASE_URL,
                   now=dt.datetime.now(UTC) - ca.ISSUING_VALIDITY + dt.timedelta(days=6))
    result = runner.invoke(app, ["ca", "issue", "old", "--csr", str(tmp_path / "req.pem"), "-o", str(tmp_path / "c.pem"),
                                 "--owner", "platform"])
    assert result.exit_code == 0, result.output
    leaf, issuing = x509.load_pem_x509_certificates((tmp_path / "c.pem").read_bytes())
    assert leaf.not_valid_after_utc == issuing.not_valid_after_utc
    assert "note: capped at the issuing CA's expiry" in " ".join(result.stderr.split())
    assert "of the 90 days asked for" in " ".join(result.stderr.split())


def test_a_managed_certificate_over_its_profiles_maximum_is_refused_at_the_policy_step(engine: sa.Engine) -> None:
    """The policy's max-validity (a private CA's profile maximum) refuses it before the CA is asked."""
    from certpilot import managed, renewing
    from connectors.private_ca import PrivateCAIssuer

    _init(engine)
    with write_session(engine) as session:
        managed.add(session, managed.ManagedSpec(name="archive", dns_names=("archive.example.com",),
                                                 issuer="private-ca/corp", validity_days=900,
                                                 owner="platform"), _actor())
    issuer = PrivateCAIssuer(engine, "corp", _ring)
    with pytest.raises(renewing.PermanentRenewalError) as caught:
        renewing.renew_one(engine, "archive", issuer, _ring, _actor())
    assert caught.value.step is renewing.Step.POLICY
    assert ("policy refuses managed certificate 'archive': max-validity: asks for 900 days on "
            in str(caught.value)) and "private profile tls-server allows at most 825 days" in str(caught.value)
    with read_session(engine) as session:
        row = managed.get(session, "archive")
        assert row.last_error is not None and row.last_error.startswith("policy: ")
        assert "allows at most 825 days" in row.last_error
        assert session.execute(sa.select(sa.func.count()).select_from(Certificate)
                               .where(Certificate.is_ca.is_(False))).scalar_one() == 0  # nothing was signed
    with write_session(engine) as session:  # within the maximum it renews, as long as it asked
        session.execute(sa.update(ManagedCertificate).where(ManagedCertificate.name == "archive")
                        .values(validity_days=800))
    renewed = renewing.renew_one(engine, "archive", issuer, _ring, _actor())
    assert (renewed.not_after - dt.datetime.now(UTC)) > dt.timedelta(days=799)


@SQLITE_ONLY
def test_a_renewal_cut_at_the_issuing_cas_expiry_records_the_note(engine: sa.Engine) -> None:
    from certpilot import managed, renewing
    from connectors.private_ca import PrivateCAIssuer

    _init(engine, now=dt.datetime.now(UTC) - ca.ISSUING_VALIDITY + dt.timedelta(days=20))
    with write_session(engine) as session:
        managed.add(session, managed.ManagedSpec(name="late", dns_names=("late.example.com",),
                                                 issuer="private-ca/corp", validity_days=30,
                                                 renew_before_days=5, owner="platform"), _actor())
    renewed = renewing.renew_one(engine, "late", PrivateCAIssuer(engine, "corp", _ring), _ring, _actor())
    with read_session(engine) as session:
        issuing = ca.ca_certificates(session, ca.get_ca(session, "corp"))[1]
        event = session.execute(sa.select(AuditEvent).where(AuditEvent.action == "certificate.issued")).scalars().one()
    assert renewed.not_after == issuing.not_valid_after_utc
    notes = json.loads(event.details)["notes"]
    assert len(notes) == 1 and notes[0].startswith("capped at the issuing CA's expiry") and "of the 30 days" in notes[0]
