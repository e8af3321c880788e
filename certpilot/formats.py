"""Reading certificates and private keys from whatever an operator has: PEM (bundles, text between
blocks, CRLF), DER, PKCS#7 (.p7b, PEM or DER), PKCS#12 (with or without a password) and private keys
in PEM, PKCS#8, encrypted PKCS#8 and the traditional OpenSSL forms.

The format is told by content, never by file name. Every failure is a ParseError that says what and
where, and never quotes key material.
"""

from __future__ import annotations

import base64
import binascii
import re
import warnings
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.serialization import pkcs7, pkcs12

from certpilot.errors import ParseError, PasswordError
from certpilot.pem import looks_like_pem, read_pem_blocks
from certpilot.x509info import VENDOR_ERRORS, vendor_reason

_CERT_LABELS = {"CERTIFICATE", "X509 CERTIFICATE", "TRUSTED CERTIFICATE"}
_PKCS7_LABELS = {"PKCS7", "CMS", "PKCS #7 SIGNED DATA"}
_KEY_LABELS = {"PRIVATE KEY", "ENCRYPTED PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY", "DSA PRIVATE KEY"}
_IGNORED_LABELS = {"CERTIFICATE REQUEST", "NEW CERTIFICATE REQUEST", "X509 CRL", "PUBLIC KEY",
                   "RSA PUBLIC KEY", "EC PARAMETERS", "DH PARAMETERS", "X9.42 DH PARAMETERS"}

# The common case, only CERTIFICATE blocks and nothing else, is read by _fast_pem_certificates; any
# other input (or any failure there) goes through read_pem_blocks, which gives the precise errors.
_FAST_PEM = re.compile(
    rb"(?:-----BEGIN CERTIFICATE-----\r?\n(?:[A-Za-z0-9+/=]+\r?\n)+-----END CERTIFICATE-----(?:\r?\n)*)+")
_FAST_BLOCK = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n((?:[A-Za-z0-9+/=]+\r?\n)+)-----END CERTIFICATE-----")

# DER prefixes: PFX is SEQUENCE { INTEGER 3, ContentInfo { OID pkcs7-data ...
_OID_PKCS7_DATA = bytes.fromhex("06092a864886f70d010701")
_OID_PKCS7_SIGNED = bytes.fromhex("06092a864886f70d010702")
_OID_PBES2 = bytes.fromhex("06092a864886f70d01050d")  # EncryptedPrivateKeyInfo's usual algorithm


@dataclass(frozen=True)
class Bundle:
    """What one input held. Keys stay in memory only: they are left out of repr."""

    certificates: tuple[x509.Certificate, ...]
    private_keys: tuple[PrivateKeyTypes, ...] = field(default=(), repr=False)
    notes: tuple[str, ...] = ()
    format: str = "unknown"

    @property
    def is_empty(self) -> bool:
        return not self.certificates and not self.private_keys


def load_bundle(data: bytes, *, source: str | None = None, password: bytes | None = None) -> Bundle:
    """Parse ``data`` in whichever supported format it is in."""
    if not data.strip():
        raise ParseError("empty input", source)
    try:
        if looks_like_pem(data):
            return _load_pem(data, source, password)
        return _load_binary(data, source, password)
    except VENDOR_ERRORS as exc:  # each reader translates what it expects; this is the backstop
        raise ParseError(f"cannot be read: {type(exc).__name__} from the X.509 library ({_safe(exc)})",
                         source) from None


def load_certificate(data: bytes, source: str | None = None) -> x509.Certificate:
    """Exactly one certificate, PEM or DER."""
    bundle = load_bundle(data, source=source)
    if len(bundle.certificates) != 1:
        raise ParseError(f"expected one certificate, found {len(bundle.certificates)}", source)
    return bundle.certificates[0]


def _load_pem(data: bytes, source: str | None, password: bytes | None) -> Bundle:
    fast = _fast_pem_certificates(data)
    if fast is not None:
        return Bundle(tuple(fast), (), (), "pem")
    certs: list[x509.Certificate] = []
    keys: list[PrivateKeyTypes] = []
    notes: list[str] = []
    for block in read_pem_blocks(data, source):
        where = f"PEM block {block.label!r} at line {block.line}"
        if block.label in _CERT_LABELS:
            certs.append(_der_certificate(_first_tlv(block.der), source, where))
        elif block.label in _PKCS7_LABELS:
            certs.extend(_pkcs7(block.der, source, where))
        elif block.label in _KEY_LABELS:
            keys.append(_pem_key(block.text.encode("ascii"), source, where, password))
        elif block.label in _IGNORED_LABELS:
            notes.append(f"ignored {where}")
        else:
            notes.append(f"ignored unknown {where}")
    return Bundle(tuple(certs), tuple(keys), tuple(notes), "pem")


def _fast_pem_certificates(data: bytes) -> list[x509.Certificate] | None:
    """The certificates of input made only of well-formed CERTIFICATE blocks (what _load_pem would
    return for it), or None for anything else, including any block that does not decode or load."""
    if _FAST_PEM.fullmatch(data) is None:
        return None
    certs = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # negative serials: described, not fatal
            for match in _FAST_BLOCK.finditer(data):
                der = base64.b64decode(match.group(1).replace(b"\r", b"").replace(b"\n", b""), validate=True)
                certs.append(x509.load_der_x509_certificate(_first_tlv(der)))
    except (binascii.Error, *VENDOR_ERRORS):
        return None
    return certs


def _load_binary(data: bytes, source: str | None, password: bytes | None) -> Bundle:
    if data[:1] != b"\x30":
        shown = data[:8].hex(" ")
        raise ParseError(f"not a certificate, key or bundle: neither PEM nor DER (starts with {shown})", source)
    head = data[:64]
    if _is_pkcs12(head):
        return _pkcs12(data, source, password)
    if _OID_PKCS7_SIGNED in head[:24]:
        return Bundle(tuple(_pkcs7(data, source, "DER PKCS#7")), format="pkcs7")
    errors = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # negative serials: described, not fatal
            cert = x509.load_der_x509_certificate(data)
        return Bundle((cert,), format="der")
    except VENDOR_ERRORS as exc:
        errors.append(f"as a certificate: {_safe(exc)}")
    try:
        key = serialization.load_der_private_key(data, password=password)
        return Bundle((), (key,), format="der-key")
    except TypeError:
        if password is None:
            raise PasswordError("DER private key is encrypted: a password is needed", source) from None
        return _load_binary(data, source, None)  # not encrypted: the password is for the inputs that are
    except (ValueError, UnsupportedAlgorithm, OverflowError) as exc:
        if password is not None and _OID_PBES2 in head[:32]:
            raise PasswordError("encrypted DER private key: wrong password, or the key is damaged", source) from None
        errors.append(f"as a private key: {_safe(exc)}")
    raise ParseError("DER data is not a certificate, PKCS#7, PKCS#12 or private key ("
                     + "; ".join(errors) + ")", source)


def _der_certificate(der: bytes, source: str | None, where: str) -> x509.Certificate:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # negative serials: described, not fatal
            return x509.load_der_x509_certificate(der)
    except VENDOR_ERRORS as exc:
        raise ParseError(f"{where} is not a valid X.509 certificate ({_safe(exc)})", source) from None


def _pkcs7(der: bytes, source: str | None, where: str) -> list[x509.Certificate]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pkcs7.load_der_pkcs7_certificates(der)
    except VENDOR_ERRORS as exc:
        raise ParseError(f"{where} is not a valid PKCS#7 certificate bundle ({_safe(exc)})", source) from None


def _pem_key(pem: bytes, source: str | None, where: str, password: bytes | None) -> PrivateKeyTypes:
    try:
        return serialization.load_pem_private_key(pem, password=password)
    except TypeError:
        if password is None:
            raise PasswordError(f"{where} is encrypted: a password is needed", source) from None
        return _pem_key(pem, source, where, None)  # not encrypted: the password is for the inputs that are
    except (ValueError, OverflowError) as exc:
        if password is not None and ("ENCRYPTED" in where or b"Proc-Type" in pem):
            raise PasswordError(f"{where}: wrong password, or the key is damaged", source) from None
        raise ParseError(f"{where} is not a valid private key ({_safe(exc)})", source) from None
    except UnsupportedAlgorithm as exc:
        raise ParseError(f"{where} uses an unsupported algorithm ({_safe(exc)})", source) from None


def _pkcs12(data: bytes, source: str | None, password: bytes | None) -> Bundle:
    attempts = [password, None, b""] if password is not None else [None, b""]  # a plain file needs none
    for attempt in attempts:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loaded = pkcs12.load_pkcs12(data, attempt)
        except ValueError:
            continue
        except (TypeError, OverflowError, UnsupportedAlgorithm) as exc:
            raise ParseError(f"PKCS#12 file cannot be read ({_safe(exc)})", source) from None
        certs = ([loaded.cert.certificate] if loaded.cert else []) + [c.certificate for c in loaded.additional_certs]
        keys = (loaded.key,) if loaded.key is not None else ()
        return Bundle(tuple(certs), keys, format="pkcs12")
    if password is None:
        raise PasswordError("PKCS#12 file is password-protected: a password is needed", source)
    raise PasswordError("PKCS#12 file: wrong password, or the file is damaged", source)


def _is_pkcs12(head: bytes) -> bool:
    """PFX ::= SEQUENCE { version INTEGER (3), authSafe ContentInfo (pkcs7-data), ... }."""
    inner = _skip_header(head)
    return inner is not None and head[inner:inner + 3] == b"\x02\x01\x03" and _OID_PKCS7_DATA in head[inner:inner + 24]


def _skip_header(der: bytes) -> int | None:
    """Offset of the contents of the first DER TLV, or None if the header is malformed."""
    if len(der) < 2:
        return None
    first = der[1]
    if first < 0x80:
        return 2
    count = first & 0x7F
    return 2 + count if 0 < count <= 4 and len(der) >= 2 + count else None


def _first_tlv(der: bytes) -> bytes:
    """The first DER element: a TRUSTED CERTIFICATE block carries OpenSSL trust data after it."""
    offset = _skip_header(der)
    if offset is None:
        return der
    first = der[1]
    length = first if first < 0x80 else int.from_bytes(der[2:offset], "big")
    return der[: offset + length] if offset + length <= len(der) else der


def _safe(exc: Exception) -> str:
    """An exception text short enough to show and free of key material (cryptography's are)."""
    return vendor_reason(exc)
