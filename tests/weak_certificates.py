"""Real certificates with the keys and signatures reports look at (RSA-1024, SHA-1, EC curves, Ed25519,
ML-DSA), signed by a real CA, and a way to put them in the inventory as discovery would (certpilot.inventory
upsert: the certificate, where it was seen, its owner)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes, CertificatePublicKeyTypes
from cryptography.x509.oid import NameOID

from certpilot import audit, inventory
from certpilot.database import write_session
from certpilot.x509info import describe_certificate, fingerprint_sha256

DAY = dt.timedelta(days=1)
DISCOVERY = audit.Actor("prefect:discover", "0b6c3f5e-7d0e-4f3a-9a55-2d4a8c1e9f01")


def name(common_name: str, org: str = "certpilot tests") -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


@dataclass(frozen=True)
class Signer:
    """A CA: its name, key and (self-signed) certificate."""

    name: x509.Name
    key: CertificateIssuerPrivateKeyTypes
    certificate: x509.Certificate

    @classmethod
    def make(cls, common_name: str, key: CertificateIssuerPrivateKeyTypes | None = None, now: dt.datetime | None = None,
             org: str = "certpilot tests") -> Signer:
        now = now or dt.datetime.now(dt.timezone.utc)
        key = key or rsa.generate_private_key(public_exponent=65537, key_size=2048)
        subject = name(common_name, org)
        algorithm = None if _is_pure(key) else hashes.SHA256()
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - 400 * DAY)
                .not_valid_after(now + 3650 * DAY)
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(key, algorithm))
        return cls(subject, key, cert)

    def leaf(self, names: Sequence[str], not_after: dt.datetime, *, key: CertificatePublicKeyTypes | None = None,
             days: int = 90) -> x509.Certificate:
        """A leaf for ``names`` (an EC P-256 key unless given) expiring at ``not_after``, signed with SHA-256
        (or the CA key's own algorithm: Ed25519, ML-DSA)."""
        public_key = key if key is not None else ec.generate_private_key(ec.SECP256R1()).public_key()
        return (x509.CertificateBuilder().subject_name(name(names[0])).issuer_name(self.name)
                .public_key(public_key).serial_number(x509.random_serial_number())
                .not_valid_before(not_after - days * DAY).not_valid_after(not_after)
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .sign(self.key, None if _is_pure(self.key) else hashes.SHA256()))


def _is_pure(key: CertificateIssuerPrivateKeyTypes) -> bool:
    """Keys that sign without a separate hash (Ed25519, Ed448, ML-DSA)."""
    return not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey))


_SHA256_WITH_RSA = bytes.fromhex("06092a864886f70d01010b")  # DER of OID 1.2.840.113549.1.1.11
_SHA1_WITH_RSA = bytes.fromhex("06092a864886f70d010105")    # DER of OID 1.2.840.113549.1.1.5


def resign_with_sha1(cert: x509.Certificate, signer: Signer) -> x509.Certificate:
    """``cert`` (signed by ``signer``'s RSA key with SHA-256) truly signed with SHA-1. cryptography 50 refuses
    to build one, but its RSA keys still sign SHA-1 digests: the OID (the same length) is swapped in the TBS
    part and the outer algorithm, and the TBS part signed again with PKCS#1 v1.5 over SHA-1."""
    assert isinstance(signer.key, rsa.RSAPrivateKey)
    der = cert.public_bytes(serialization.Encoding.DER)
    tbs = cert.tbs_certificate_bytes.replace(_SHA256_WITH_RSA, _SHA1_WITH_RSA)
    signature = signer.key.sign(tbs, padding.PKCS1v15(), hashes.SHA1())
    swapped = der.replace(_SHA256_WITH_RSA, _SHA1_WITH_RSA)
    assert swapped.endswith(cert.signature) and len(signature) == len(cert.signature)
    sha1 = x509.load_der_x509_certificate(swapped[:-len(signature)] + signature)
    signer.key.public_key().verify(sha1.signature, sha1.tbs_certificate_bytes, padding.PKCS1v15(), hashes.SHA1())
    return sha1


def add(engine: sa.Engine, cert: x509.Certificate, *, locators: Sequence[str] = (), source: str = "tls-scan:lab",
        owner: str | None = None, now: dt.datetime | None = None) -> str:
    """Put ``cert`` in the inventory as seen at ``locators`` (none: imported), with ``owner``; its fingerprint."""
    record = describe_certificate(cert)
    observations = [inventory.Observation(record, locator, source) for locator in locators] or [
        inventory.Observation(record, None, "import")]
    with write_session(engine) as session:
        inventory.upsert(session, observations, DISCOVERY, owner=owner, now=now)
    return fingerprint_sha256(cert)
