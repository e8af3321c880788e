"""A freshly generated sample estate: a small CA, leaf certificates with a spread of expiry dates,
the same certificates copied to several hosts' directories, and one broken file.

Used by the main job, the tests and the benchmarks. Every certificate and key is generated anew on
each call; nothing here is a fixture checked into the repository.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes, PrivateKeyTypes
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from certpilot.clock import utcnow

# Days from now to each leaf's expiry: already expired, inside every alert band, and comfortable.
EXPIRY_SPREAD_DAYS = (-12, 2, 6, 13, 24, 45, 80, 150, 190)


@dataclass(frozen=True)
class Authority:
    certificate: x509.Certificate
    key: CertificateIssuerPrivateKeyTypes = field(repr=False)


def _name(common_name: str, org: str = "certpilot sample estate") -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(common_name: str, parent: Authority | None = None, now: dt.datetime | None = None,
            days: int = 3650) -> Authority:
    now = now or utcnow()
    key = ec.generate_private_key(ec.SECP384R1())
    issuer_cert = parent.certificate if parent else None
    subject = _name(common_name)
    builder = (x509.CertificateBuilder().subject_name(subject)
               .issuer_name(issuer_cert.subject if issuer_cert else subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=True, path_length=None if parent is None else 0), critical=True)
               .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    if parent:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(parent.key.public_key()), critical=False)
    signer = parent.key if parent else key
    return Authority(builder.sign(signer, hashes.SHA384()), key)


def issue_leaf(ca: Authority, dns_names: list[str], not_after: dt.datetime, now: dt.datetime | None = None,
               key: CertificateIssuerPrivateKeyTypes | None = None,
               lifetime_days: int = 90) -> tuple[x509.Certificate, CertificateIssuerPrivateKeyTypes]:
    now = now or utcnow()
    key = key or ec.generate_private_key(ec.SECP256R1())
    not_before = min(now, not_after) - dt.timedelta(days=lifetime_days)
    cert = (x509.CertificateBuilder().subject_name(_name(dns_names[0])).issuer_name(ca.certificate.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in dns_names]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
            .sign(ca.key, hashes.SHA256()))
    return cert, key


def pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def key_pem(key: PrivateKeyTypes) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, mode)


@dataclass(frozen=True)
class Estate:
    root: Path
    leaves: int
    files: int
    broken: tuple[Path, ...]


def write_estate(root: Path, now: dt.datetime | None = None) -> Estate:
    """Write a sample estate under ``root``: hosts with nginx and haproxy directories, shared certificates."""
    now = now or utcnow()
    ca_root = make_ca("Sample Root CA", now=now)
    issuing = make_ca("Sample Issuing CA", parent=ca_root, now=now, days=1825)
    files = 0
    for index, days in enumerate(EXPIRY_SPREAD_DAYS):
        service = f"svc{index:02d}"
        names = [f"{service}.example.test", f"www.{service}.example.test"]
        cert, key = issue_leaf(issuing, names, now + dt.timedelta(days=days), now=now)
        # The same certificate lives on two web hosts (a duplicate across locations) ...
        for host in ("web-1", "web-2"):
            _write(root / host / "etc/nginx/ssl" / f"{service}.fullchain.pem", pem(cert, issuing.certificate))
            _write(root / host / "etc/nginx/ssl" / f"{service}.key", key_pem(key), 0o600)
            files += 2
        # ... and on the load balancer as one combined file (certificate, chain, key), haproxy style.
        _write(root / "lb-1/etc/haproxy/certs" / f"{service}.pem", pem(cert, issuing.certificate) + key_pem(key), 0o600)
        files += 1
    _write(root / "pki/ca/root.der", ca_root.certificate.public_bytes(serialization.Encoding.DER))
    _write(root / "pki/ca/chain.p7b", pkcs7.serialize_certificates(
        [issuing.certificate, ca_root.certificate], serialization.Encoding.DER))
    files += 2
    broken = root / "web-2/etc/nginx/ssl/legacy.pem"
    text = pem(issue_leaf(issuing, ["legacy.example.test"], now + dt.timedelta(days=30), now=now)[0])
    _write(broken, text[: len(text) // 2])  # truncated mid-way, as a failed copy leaves it
    files += 1
    return Estate(root, len(EXPIRY_SPREAD_DAYS), files, (broken,))


def mint_leaves(count: int, now: dt.datetime | None = None, spread_days: tuple[int, int] = (-30, 400),
                ca: Authority | None = None) -> Iterator[x509.Certificate]:
    """``count`` distinct leaf certificates with expiries spread evenly over ``spread_days`` from now."""
    now = now or utcnow()
    ca = ca or make_ca("Bench Issuing CA", now=now)
    low, high = spread_days
    for index in range(count):
        offset = low + (high - low) * (index / max(count - 1, 1))
        yield issue_leaf(ca, [f"host{index}.bench.test"], now + dt.timedelta(days=offset), now=now)[0]
