"""Every field of a certificate that the inventory keeps, as one immutable record.

``describe_certificate`` describes every certificate that cryptography could load and whose
identity (names, serial, validity) can be read: optional fields it cannot read are left empty and
explained in ``notes``; unusual but legal encodings (a negative serial, a three-letter country,
unknown non-critical extensions, IDN and IP SANs) are described, not rejected. cryptography decodes
some fields only when they are read; a required one that fails then is a ParseError naming the
certificate and the field, never cryptography's own exception.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import warnings
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, mldsa, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import ExtensionOID

from certpilot.errors import ParseError

# What cryptography raises for input it cannot decode: a wrong value (ValueError, year 0 and other
# dates no datetime holds), a wrong type, a number out of range, an algorithm it lacks, and its x509
# errors that derive from Exception alone (a version other than v1 or v3, an extension twice).
VENDOR_ERRORS = (ValueError, TypeError, OverflowError, UnsupportedAlgorithm, x509.InvalidVersion,
                 x509.DuplicateExtension, x509.UnsupportedGeneralNameType)

_T = TypeVar("_T")
_KEY_USAGES = ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
               "key_agreement", "key_cert_sign", "crl_sign")


@dataclass(frozen=True)
class CertificateRecord:
    fingerprint_sha256: str
    subject: str
    issuer: str
    serial_hex: str
    not_before: dt.datetime
    not_after: dt.datetime
    sans: tuple[tuple[str, str], ...]  # (kind, value): DNS, IP, URI, email, dirName, other
    key_type: str
    key_size: int | None
    key_curve: str | None
    spki_sha256: str | None
    signature_algorithm: str
    is_ca: bool
    path_length: int | None
    key_usage: tuple[str, ...]
    extended_key_usage: tuple[str, ...]
    subject_key_id: str | None
    authority_key_id: str | None
    crl_urls: tuple[str, ...]
    ocsp_urls: tuple[str, ...]
    ca_issuer_urls: tuple[str, ...]
    self_signed: bool
    der: bytes = field(repr=False)
    notes: tuple[str, ...] = ()


def fingerprint_sha256(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def serial_hex(serial: int) -> str:
    """Lower-case hex, even length, '-' before a (non-conforming) negative serial."""
    digits = format(abs(serial), "x")
    digits = digits if len(digits) % 2 == 0 else "0" + digits
    return ("-" if serial < 0 else "") + digits


def spki_sha256(public_key: PublicKeyTypes) -> str:
    der = public_key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def describe_certificate(cert: x509.Certificate) -> CertificateRecord:
    """Every field the inventory keeps. Raises ParseError (without a source: the caller names the
    input) when the certificate's names, serial or validity cannot be read."""
    der = cert.public_bytes(serialization.Encoding.DER)
    fingerprint = hashlib.sha256(der).hexdigest()  # the same as cert.fingerprint(SHA256())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # negative serials, three-letter countries: described, not fatal
        return _describe(cert, der, fingerprint)


def _required(fingerprint: str, what: str, read: Callable[[], _T]) -> _T:
    try:
        return read()
    except VENDOR_ERRORS as exc:
        raise ParseError(f"certificate {fingerprint[:16]}: {what} cannot be read ({vendor_reason(exc)})") from None


def vendor_reason(exc: BaseException) -> str:
    """What a cryptography exception says, short (its first line, at most 200 characters); its class
    name when it says nothing. cryptography's messages never quote key material."""
    text = str(exc).splitlines()[0][:200] if str(exc).strip() else ""
    return text or type(exc).__name__


def _describe(cert: x509.Certificate, der: bytes, fingerprint: str) -> CertificateRecord:
    notes: list[str] = []
    serial = _required(fingerprint, "the serial number", lambda: cert.serial_number)
    if serial <= 0:
        notes.append("serial number is not positive (RFC 5280 requires a positive serial)")
    key_type, key_size, key_curve, spki = _describe_key(cert, notes)
    try:
        extensions = cert.extensions
    except VENDOR_ERRORS as exc:  # duplicate or malformed extension: keep the rest of the record
        notes.append(f"extensions could not be parsed: {vendor_reason(exc)}")
        extensions = x509.Extensions([])
    # One pass over the extensions (duplicates are refused when parsing, so each OID appears once).
    by_oid: dict[x509.ObjectIdentifier, Any] = {}
    for ext in extensions:
        value = ext.value
        if isinstance(value, x509.UnrecognizedExtension):
            notes.append(f"unrecognised {'critical' if ext.critical else 'non-critical'} extension {ext.oid.dotted_string}")
        by_oid.setdefault(ext.oid, value)
    basic = by_oid.get(ExtensionOID.BASIC_CONSTRAINTS)
    aki = by_oid.get(ExtensionOID.AUTHORITY_KEY_IDENTIFIER)
    ski = by_oid.get(ExtensionOID.SUBJECT_KEY_IDENTIFIER)
    aia = by_oid.get(ExtensionOID.AUTHORITY_INFORMATION_ACCESS)
    crl = by_oid.get(ExtensionOID.CRL_DISTRIBUTION_POINTS)
    eku = by_oid.get(ExtensionOID.EXTENDED_KEY_USAGE)
    # Each access builds the Name anew: fetch once.
    subject = _required(fingerprint, "the subject name", lambda: cert.subject)
    issuer = _required(fingerprint, "the issuer name", lambda: cert.issuer)
    not_before = _required(fingerprint, "the start of the validity period (not before)",
                           lambda: cert.not_valid_before_utc)
    not_after = _required(fingerprint, "the end of the validity period (not after)",
                          lambda: cert.not_valid_after_utc)
    return CertificateRecord(
        fingerprint_sha256=fingerprint,
        subject=_name(subject),
        issuer=_name(issuer),
        serial_hex=serial_hex(serial),
        not_before=not_before,
        not_after=not_after,
        sans=_sans(by_oid.get(ExtensionOID.SUBJECT_ALTERNATIVE_NAME)),
        key_type=key_type,
        key_size=key_size,
        key_curve=key_curve,
        spki_sha256=spki,
        signature_algorithm=_oid_name(_required(fingerprint, "the signature algorithm",
                                                lambda: cert.signature_algorithm_oid)),
        is_ca=bool(basic and basic.ca),
        path_length=basic.path_length if basic else None,
        key_usage=_key_usage(by_oid.get(ExtensionOID.KEY_USAGE)),
        extended_key_usage=tuple(_oid_name(o) for o in eku) if eku else (),
        subject_key_id=ski.digest.hex() if ski else None,
        authority_key_id=aki.key_identifier.hex() if aki and aki.key_identifier else None,
        crl_urls=tuple(n.value for dp in (crl or []) for n in (dp.full_name or [])
                       if isinstance(n, x509.UniformResourceIdentifier)),
        ocsp_urls=_access(aia, x509.AuthorityInformationAccessOID.OCSP),
        ca_issuer_urls=_access(aia, x509.AuthorityInformationAccessOID.CA_ISSUERS),
        self_signed=issuer == subject and _signed_by(cert, cert),  # is_issued_by(cert, cert), names fetched once
        der=der,
        notes=tuple(notes),
    )


def is_issued_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    """True when ``parent``'s subject is ``child``'s issuer and ``parent``'s key signed ``child``."""
    try:
        if child.issuer != parent.subject:
            return False
    except VENDOR_ERRORS:  # a name cryptography cannot decode links nothing
        return False
    return _signed_by(child, parent)


def _signed_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(parent)
    except (*VENDOR_ERRORS, InvalidSignature):
        return False
    return True


def _describe_key(cert: x509.Certificate, notes: list[str]) -> tuple[str, int | None, str | None, str | None]:
    try:
        key = cert.public_key()
        spki = spki_sha256(key)
    except VENDOR_ERRORS as exc:
        notes.append(f"public key not readable: {vendor_reason(exc)}")
        return "unknown", None, None, None
    if isinstance(key, rsa.RSAPublicKey):
        described: tuple[str, int | None, str | None] = ("RSA", key.key_size, None)
    elif isinstance(key, ec.EllipticCurvePublicKey):
        described = ("EC", key.key_size, key.curve.name)
    elif isinstance(key, ed25519.Ed25519PublicKey):
        described = ("Ed25519", 256, None)
    elif isinstance(key, ed448.Ed448PublicKey):
        described = ("Ed448", 456, None)
    elif isinstance(key, dsa.DSAPublicKey):
        described = ("DSA", key.key_size, None)
    elif isinstance(key, mldsa.MLDSA44PublicKey):  # FIPS 204 names a parameter set, not a key size
        described = ("ML-DSA-44", None, None)
    elif isinstance(key, mldsa.MLDSA65PublicKey):
        described = ("ML-DSA-65", None, None)
    elif isinstance(key, mldsa.MLDSA87PublicKey):
        described = ("ML-DSA-87", None, None)
    else:
        described = (type(key).__name__, None, None)
    return (*described, spki)


def _name(name: x509.Name) -> str:
    try:
        return name.rfc4514_string()
    except VENDOR_ERRORS:
        return repr(name)


def _oid_name(oid: x509.ObjectIdentifier) -> str:
    name = getattr(oid, "_name", "Unknown OID")
    return oid.dotted_string if name == "Unknown OID" else name


def _sans(ext: x509.SubjectAlternativeName | None) -> tuple[tuple[str, str], ...]:
    if ext is None:
        return ()
    out: list[tuple[str, str]] = []
    for general in ext:
        if isinstance(general, x509.DNSName):
            out.append(("DNS", general.value))
        elif isinstance(general, x509.IPAddress):
            out.append(("IP", str(general.value)))
        elif isinstance(general, x509.UniformResourceIdentifier):
            out.append(("URI", general.value))
        elif isinstance(general, x509.RFC822Name):
            out.append(("email", general.value))
        elif isinstance(general, x509.DirectoryName):
            out.append(("dirName", _name(general.value)))
        elif isinstance(general, x509.RegisteredID):
            out.append(("registeredID", general.value.dotted_string))
        elif isinstance(general, x509.OtherName):
            out.append(("otherName", general.type_id.dotted_string))
    return tuple(out)


def _key_usage(ku: x509.KeyUsage | None) -> tuple[str, ...]:
    if ku is None:
        return ()
    usages = [name for name in _KEY_USAGES if getattr(ku, name)]
    if ku.key_agreement:
        usages += [name for name in ("encipher_only", "decipher_only") if getattr(ku, name)]
    return tuple(usages)


def _access(aia: x509.AuthorityInformationAccess | None, method: x509.ObjectIdentifier) -> tuple[str, ...]:
    if aia is None:
        return ()
    return tuple(d.access_location.value for d in aia
                 if d.access_method == method and isinstance(d.access_location, x509.UniformResourceIdentifier))
