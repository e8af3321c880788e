"""Exporting a certificate: PEM, DER, PKCS#12 or JSON. The private key is included only when asked,
and every export that includes it is an audit event."""

from __future__ import annotations

import json
import typing
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.serialization import pkcs12
from sqlmodel import Session

from certpilot import audit, inventory, keystore
from certpilot.errors import NotFoundError, PermanentError

FORMATS = ("pem", "der", "pkcs12", "json")


def _fits_pkcs12(key: PrivateKeyTypes) -> typing.TypeGuard[pkcs12.PKCS12PrivateKeyTypes]:
    return isinstance(key, typing.get_args(pkcs12.PKCS12PrivateKeyTypes))


@dataclass(frozen=True)
class ExportRequest:
    ident: str
    format: str = "pem"
    include_chain: bool = True
    include_key: bool = False
    password: bytes | None = None  # for PKCS#12 and for an encrypted PEM key


def export_certificate(session: Session, request: ExportRequest, actor: audit.Actor,
                       ring: keystore.KeyRing | None = None) -> bytes:
    if request.format not in FORMATS:
        raise PermanentError(f"unknown format {request.format!r}; choose one of {', '.join(FORMATS)}")
    if request.include_key and request.format in ("der", "json"):
        raise PermanentError(f"a private key cannot go in {request.format}: use pem or pkcs12")
    cert_row = inventory.resolve(session, request.ident)
    if request.format == "json":
        return (json.dumps(inventory.show(session, cert_row.fingerprint_sha256), indent=2) + "\n").encode()
    chain_rows = inventory.chain_of(session, cert_row) if request.include_chain else [cert_row]
    certs = [x509.load_der_x509_certificate(row.der) for row in chain_rows]
    if request.format == "der":
        return cert_row.der
    key = None
    if request.include_key:
        ref = keystore.find_key(session, cert_row.spki_sha256 or "")
        if ref is None:
            raise NotFoundError(f"the inventory holds no private key for certificate {cert_row.fingerprint_sha256[:16]}")
        if ring is None:
            raise PermanentError("exporting a private key needs the master key")
        key = keystore.load_private_key(session, ref, ring)
        audit.append(session, actor, [audit.Change("certificate.exported_with_key", f"certificate:{cert_row.fingerprint_sha256}",
                                                   {"key": str(ref), "format": request.format,
                                                    "encrypted": request.password is not None})])
    if request.format == "pkcs12":
        encryption = (serialization.BestAvailableEncryption(request.password) if request.password
                      else serialization.NoEncryption())
        name = cert_row.subject.encode()[:64]
        if key is not None and not _fits_pkcs12(key):  # refused with pkcs12's own error
            raise TypeError("Key must be RSA, DSA, EllipticCurve, ED25519, or ED448 private key, or None.")
        return pkcs12.serialize_key_and_certificates(name, key, certs[0], certs[1:] or None, encryption)
    out = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)
    if key is not None:
        encryption = (serialization.BestAvailableEncryption(request.password) if request.password
                      else serialization.NoEncryption())
        out += key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    return out
