"""The bad-input corpus: malformed and hostile inputs, and tricky-but-legal ones, written fresh.

``build_corpus(directory)`` writes one file per case into ``directory`` and returns a ``Case`` for
each, saying what reading that file must give: an error (a substring of the precise ParseError or
KeyMismatchError message) or a parse (the certificates by fingerprint, the private keys, fields and
notes to check). Every certificate and key is generated anew on each call; no key is ever checked in.

Passwords: every case is read with ``Case.password`` (the corpus password unless it says otherwise);
a directory import of the whole corpus uses the corpus password for every file, and a case whose
error differs there says so in ``import_error``.

Run ``python tests/corpus/build.py DIR`` to write the corpus by hand.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import os
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes, PrivateKeyTypes
from cryptography.hazmat.primitives.serialization import pkcs7, pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

from certpilot.importer import DEFAULT_MAX_BYTES

CORPUS_PASSWORD = b"corpus-password"
OTHER_PASSWORD = b"some-other-password"
ORG = "certpilot corpus"
# Under 1.3.6.1.4.1.32473, the private enterprise number reserved for documentation (RFC 5612).
PRIVATE_OID = "1.3.6.1.4.1.32473.1.1"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class Case:
    """One corpus file and what reading it must give."""

    name: str
    error: str | None = None  # a substring of the error message when read with ``password``
    password: bytes | None = field(default=CORPUS_PASSWORD, repr=False)
    import_error: str | None = None  # the error in a directory import with CORPUS_PASSWORD, when different
    # Fingerprints of the certificates in the file, in file order. For a bad file: certificates that
    # must NOT reach the inventory (each is in no other corpus file).
    certificates: tuple[str, ...] = ()
    keys: int = 0
    fields: tuple[tuple[str, str, object], ...] = ()  # (fingerprint, CertificateRecord attribute, value)
    notes: tuple[str, ...] = ()  # each a substring of some note of the parse
    chain: tuple[str, ...] = ()  # the one chain order_chains must rebuild, leaf first

    @property
    def failed(self) -> bool:
        return self.error is not None

    @property
    def expected_import_error(self) -> str | None:
        return self.import_error or self.error

    @property
    def status(self) -> str:
        """The importer's status for this file (keys are not imported, so a key-only file is skipped)."""
        if self.failed:
            return "failed"
        return "imported" if self.certificates else "skipped"


# ------------------------------------------------------------------------------------------ the PKI

def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORG),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def subject_string(common_name: str) -> str:
    """How x509info describes a corpus name (RFC 4514: most specific first)."""
    return f"CN={common_name},O={ORG}"


@dataclass(frozen=True)
class Authority:
    certificate: x509.Certificate
    key: CertificateIssuerPrivateKeyTypes = field(repr=False)


class Pki:
    """A root and an intermediate, and leaves issued by the intermediate on demand."""

    def __init__(self) -> None:
        self.now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
        root_key = ec.generate_private_key(ec.SECP384R1())
        root = self._ca("Corpus Root CA", root_key, None, None)
        self.root = Authority(root, root_key)
        inter_key = ec.generate_private_key(ec.SECP256R1())
        self.intermediate = Authority(self._ca("Corpus Issuing CA", inter_key, self.root, 0), inter_key)

    def _ca(self, cn: str, key: ec.EllipticCurvePrivateKey, parent: Authority | None,
            path_length: int | None) -> x509.Certificate:
        issuer = parent.certificate.subject if parent else _name(cn)
        signer = parent.key if parent else key
        builder = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(issuer)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(self.now - dt.timedelta(days=1))
                   .not_valid_after(self.now + dt.timedelta(days=3650))
                   .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
        if parent:
            aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(parent.key.public_key())  # type: ignore[arg-type]
            builder = builder.add_extension(aki, critical=False)
        return builder.sign(signer, hashes.SHA256())

    def leaf(self, cn: str, *, key: PrivateKeyTypes | None = None, sans: list[x509.GeneralName] | None = None,
             extensions: tuple[tuple[x509.ExtensionType, bool], ...] = (), serial: int | None = None,
             self_signed: bool = False) -> tuple[x509.Certificate, PrivateKeyTypes]:
        key = key or ec.generate_private_key(ec.SECP256R1())
        signer = key if self_signed else self.intermediate.key
        builder = (x509.CertificateBuilder().subject_name(_name(cn))
                   .issuer_name(_name(cn) if self_signed else self.intermediate.certificate.subject)
                   .public_key(key.public_key())  # type: ignore[arg-type]
                   .serial_number(serial or x509.random_serial_number())
                   .not_valid_before(self.now - dt.timedelta(days=1))
                   .not_valid_after(self.now + dt.timedelta(days=90))
                   .add_extension(x509.SubjectAlternativeName(sans or [x509.DNSName(cn)]), critical=False)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        algorithm = None if isinstance(signer, ed25519.Ed25519PrivateKey) else hashes.SHA256()
        return builder.sign(signer, algorithm), key  # type: ignore[arg-type]


def fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def pem(*certs: x509.Certificate) -> str:
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode("ascii") for c in certs)


def key_pem(key: PrivateKeyTypes, fmt: serialization.PrivateFormat = serialization.PrivateFormat.PKCS8,
            password: bytes | None = None) -> str:
    encryption = (serialization.BestAvailableEncryption(password) if password
                  else serialization.NoEncryption())
    return key.private_bytes(serialization.Encoding.PEM, fmt, encryption).decode("ascii")


def pem_block(label: str, data: bytes) -> str:
    encoded = base64.b64encode(data).decode("ascii")
    return (f"-----BEGIN {label}-----\n" + "\n".join(encoded[i:i + 64] for i in range(0, len(encoded), 64))
            + f"\n-----END {label}-----\n")


def line_of(text: str, needle: str, occurrence: int = 1) -> int:
    """The 1-based line on which the ``occurrence``-th ``needle`` starts."""
    index = -1
    for _ in range(occurrence):
        index = text.index(needle, index + 1)
    return text.count("\n", 0, index) + 1


def with_negative_serial(cert: x509.Certificate) -> bytes:
    """``cert`` (serial 0x05) re-encoded with serial -5 (0xfb). Its signature no longer verifies,
    which parsing does not mind: cryptography refuses to build a negative serial, so we patch it."""
    data = der(cert)
    before = bytes.fromhex("a003020102" "020105")  # [0] { INTEGER 2 } (v3), then INTEGER 5
    assert data.count(before) == 1, "serial 5 not found where expected"
    return data.replace(before, bytes.fromhex("a003020102" "0201fb"))


def _pi_bits(bits: int) -> int:
    """floor(pi * 2**bits), by Machin's formula in integers (64 guard bits)."""
    scale = 1 << (bits + 64)

    def arctan_inverse(x: int) -> int:
        total, term, k, sign = 0, scale // x, 1, 1
        while term:
            total += sign * (term // k)
            term //= x * x
            k += 2
            sign = -sign
        return total

    return (16 * arctan_inverse(5) - 4 * arctan_inverse(239)) >> 64


def _der_length(length: int) -> bytes:
    if length < 0x80:
        return bytes([length])
    octets = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(octets)]) + octets


def _der_integer(value: int) -> bytes:
    octets = value.to_bytes(value.bit_length() // 8 + 1, "big")  # room for the sign bit
    return b"\x02" + _der_length(len(octets)) + octets


MODP_2048_PRIME = 2**2048 - 2**1984 - 1 + 2**64 * (_pi_bits(1918) + 124476)  # RFC 3526, group 14


def dh_parameters_der() -> bytes:
    """PKCS#3 DHParameter { prime, generator 2 } for the 2048-bit MODP group of RFC 3526, encoded by
    hand: generating a safe prime takes seconds, and cryptography deprecates its finite-field DH API."""
    body = _der_integer(MODP_2048_PRIME) + _der_integer(2)
    return b"\x30" + _der_length(len(body)) + body


def trust_aux() -> bytes:
    """OpenSSL's X509_CERT_AUX as a TRUSTED CERTIFICATE carries it: trust serverAuth, alias "corpus"."""
    server_auth = bytes.fromhex("06082b06010505070301")
    trust = b"\x30" + bytes([len(server_auth)]) + server_auth
    alias = b"\x0c\x06corpus"
    body = trust + alias
    return b"\x30" + bytes([len(body)]) + body


# ------------------------------------------------------------------------------------------ the cases

Builder = Callable[[Path, Pki], Case]
_BUILDERS: dict[str, Builder] = {}


def _case(name: str) -> Callable[[Builder], Builder]:
    def register(builder: Builder) -> Builder:
        _BUILDERS[name] = builder
        return builder
    return register


def _write(path: Path, data: str | bytes) -> None:
    path.write_bytes(data.encode("latin-1") if isinstance(data, str) else data)


# --- malformed and hostile

@_case("truncated.pem")
def _truncated(path: Path, pki: Pki) -> Case:
    first, _ = pki.leaf("truncated-first.corpus.test")
    second, _ = pki.leaf("truncated-second.corpus.test")
    whole = pem(second)
    text = pem(first) + whole[: len(whole) // 2]  # a copy cut off mid-way: BEGIN, no END
    _write(path, text)
    line = line_of(text, "-----BEGIN", 2)
    return Case(path.name, f"PEM block 'CERTIFICATE' at line {line} has no END line (truncated?)",
                certificates=(fingerprint(first), fingerprint(second)))


@_case("bad-base64.pem")
def _bad_base64(path: Path, pki: Pki) -> Case:
    good, _ = pki.leaf("bad-base64-good.corpus.test")
    spoiled, _ = pki.leaf("bad-base64-spoiled.corpus.test")
    lines = pem(spoiled).splitlines(keepends=True)
    lines[3] = lines[3][:10] + "!" + lines[3][11:]
    text = "Two certificates:\n\n" + pem(good) + "\n" + "".join(lines)
    _write(path, text)
    line = line_of(text, "-----BEGIN", 2)
    return Case(path.name, f"PEM block 'CERTIFICATE' at line {line} is not valid base64 (invalid character '!')",
                certificates=(fingerprint(good), fingerprint(spoiled)))


@_case("der-garbage-in-pem.pem")
def _der_garbage_in_pem(path: Path, pki: Pki) -> Case:
    good, _ = pki.leaf("garbage-neighbour.corpus.test")
    garbage = b"\x04\x40" + random.Random(7).randbytes(64)  # valid base64 of DER that is no certificate
    text = pem(good) + "and this one is broken:\n" + pem_block("CERTIFICATE", garbage)
    _write(path, text)
    line = line_of(text, "-----BEGIN", 2)
    return Case(path.name, f"PEM block 'CERTIFICATE' at line {line} is not a valid X.509 certificate",
                certificates=(fingerprint(good),))


@_case("der-garbage.der")
def _der_garbage(path: Path, pki: Pki) -> Case:
    body = random.Random(11).randbytes(300)
    _write(path, b"\x30\x82" + len(body).to_bytes(2, "big") + body)  # a SEQUENCE header, then noise
    return Case(path.name, "DER data is not a certificate, PKCS#7, PKCS#12 or private key (as a certificate: ")


@_case("junk.crt")
def _junk(path: Path, pki: Pki) -> Case:
    _write(path, PNG_SIGNATURE + random.Random(13).randbytes(2048))  # an image saved as .crt
    return Case(path.name,
                "not a certificate, key or bundle: neither PEM nor DER (starts with 89 50 4e 47 0d 0a 1a 0a)")


@_case("empty.pem")
def _empty(path: Path, pki: Pki) -> Case:
    _write(path, b"")
    return Case(path.name, "empty input")


@_case("whitespace.pem")
def _whitespace(path: Path, pki: Pki) -> Case:
    _write(path, b"  \n\t\r\n\n   \r\n")
    return Case(path.name, "empty input")


@_case("huge.pem")
def _huge(path: Path, pki: Pki) -> Case:
    with open(path, "wb") as handle:  # sparse: one byte over the limit, no disk used
        handle.truncate(DEFAULT_MAX_BYTES + 1)
    return Case(path.name, f"file is {DEFAULT_MAX_BYTES + 1:,} bytes, more than the {DEFAULT_MAX_BYTES:,}-byte limit")


@_case("wrong-password.p12")
def _p12_wrong_password(path: Path, pki: Pki) -> Case:
    cert, key = pki.leaf("p12-wrong-password.corpus.test")
    _write(path, pkcs12.serialize_key_and_certificates(b"corpus", key, cert, None,  # type: ignore[arg-type]
                                                       serialization.BestAvailableEncryption(OTHER_PASSWORD)))
    return Case(path.name, "PKCS#12 file: wrong password, or the file is damaged", certificates=(fingerprint(cert),))


@_case("no-password.p12")
def _p12_no_password(path: Path, pki: Pki) -> Case:
    cert, key = pki.leaf("p12-no-password.corpus.test")
    _write(path, pkcs12.serialize_key_and_certificates(b"corpus", key, cert, None,  # type: ignore[arg-type]
                                                       serialization.BestAvailableEncryption(OTHER_PASSWORD)))
    return Case(path.name, "PKCS#12 file is password-protected: a password is needed", password=None,
                import_error="PKCS#12 file: wrong password, or the file is damaged", certificates=(fingerprint(cert),))


@_case("encrypted-key-no-password.pem")
def _encrypted_key_no_password(path: Path, pki: Pki) -> Case:
    cert, key = pki.leaf("encrypted-no-password.corpus.test")
    text = pem(cert) + key_pem(key, password=OTHER_PASSWORD)
    _write(path, text)
    line = line_of(text, "-----BEGIN ENCRYPTED PRIVATE KEY")
    return Case(path.name, f"PEM block 'ENCRYPTED PRIVATE KEY' at line {line} is encrypted: a password is needed",
                password=None,
                import_error=f"PEM block 'ENCRYPTED PRIVATE KEY' at line {line}: wrong password, or the key is damaged",
                certificates=(fingerprint(cert),))


@_case("key-mismatch.pem")
def _key_mismatch(path: Path, pki: Pki) -> Case:
    cert, _ = pki.leaf("key-mismatch.corpus.test")
    other = ec.generate_private_key(ec.SECP256R1())
    _write(path, pem(cert) + key_pem(other))
    return Case(path.name, f"matches none of the certificates given with it ({fingerprint(cert)[:16]})",
                certificates=(fingerprint(cert),))


# --- tricky but legal

@_case("bundle-crlf.pem")
def _bundle_crlf(path: Path, pki: Pki) -> Case:
    cert, _ = pki.leaf("bundle.corpus.test")
    inter = pki.intermediate.certificate
    text = ("Subject: bundle.corpus.test\n" + pem(cert) + "\nIssuer: Corpus Issuing CA\n(from the CA's portal)\n"
            + pem(inter) + "end of bundle\n")
    _write(path, text.replace("\n", "\r\n"))
    fp = fingerprint(cert)
    return Case(path.name, certificates=(fp, fingerprint(inter)), fields=(
        (fp, "subject", subject_string("bundle.corpus.test")),
        (fp, "issuer", subject_string("Corpus Issuing CA")),
        (fp, "sans", (("DNS", "bundle.corpus.test"),)),
        (fingerprint(inter), "is_ca", True),
    ))


@_case("shuffled-chain.pem")
def _shuffled_chain(path: Path, pki: Pki) -> Case:
    cert, _ = pki.leaf("shuffled.corpus.test")
    root, inter = pki.root.certificate, pki.intermediate.certificate
    _write(path, pem(root, cert, inter))
    return Case(path.name, certificates=(fingerprint(root), fingerprint(cert), fingerprint(inter)),
                chain=(fingerprint(cert), fingerprint(inter), fingerprint(root)),
                fields=((fingerprint(root), "self_signed", True), (fingerprint(cert), "self_signed", False)))


@_case("leaf.der")
def _der_certificate(path: Path, pki: Pki) -> Case:
    cert, _ = pki.leaf("der.corpus.test")
    _write(path, der(cert))
    return Case(path.name, certificates=(fingerprint(cert),),
                fields=((fingerprint(cert), "subject", subject_string("der.corpus.test")),))


@_case("chain-der.p7b")
def _p7b_der(path: Path, pki: Pki) -> Case:
    cert, _ = pki.leaf("p7b-der.corpus.test")
    certs = [cert, pki.intermediate.certificate, pki.root.certificate]
    _write(path, pkcs7.serialize_certificates(certs, serialization.Encoding.DER))
    fps = tuple(fingerprint(c) for c in certs)
    return Case(path.name, certificates=fps, chain=fps)


@_case("chain-pem.p7b")
def _p7b_pem(path: Path, pki: Pki) -> Case:
    cert, _ = pki.leaf("p7b-pem.corpus.test")
    certs = [cert, pki.intermediate.certificate]
    _write(path, pkcs7.serialize_certificates(certs, serialization.Encoding.PEM))
    return Case(path.name, certificates=tuple(fingerprint(c) for c in certs))


@_case("bundle.p12")
def _p12(path: Path, pki: Pki) -> Case:
    cert, key = pki.leaf("p12.corpus.test")
    cas = [pki.intermediate.certificate, pki.root.certificate]
    _write(path, pkcs12.serialize_key_and_certificates(b"corpus", key, cert, cas,  # type: ignore[arg-type]
                                                       serialization.BestAvailableEncryption(CORPUS_PASSWORD)))
    return Case(path.name, certificates=tuple(fingerprint(c) for c in [cert, *cas]), keys=1,
                chain=tuple(fingerprint(c) for c in [cert, *cas]))


@_case("rsa-traditional.pem")
def _rsa_traditional(path: Path, pki: Pki) -> Case:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert, _ = pki.leaf("rsa.corpus.test", key=key)
    _write(path, pem(cert) + key_pem(key, serialization.PrivateFormat.TraditionalOpenSSL))
    fp = fingerprint(cert)
    return Case(path.name, certificates=(fp,), keys=1,
                fields=((fp, "key_type", "RSA"), (fp, "key_size", 2048), (fp, "key_curve", None)))


@_case("ec-traditional.key")
def _ec_traditional(path: Path, pki: Pki) -> Case:
    key = ec.generate_private_key(ec.SECP384R1())
    text = key_pem(key, serialization.PrivateFormat.TraditionalOpenSSL)
    assert text.startswith("-----BEGIN EC PRIVATE KEY-----")
    _write(path, text)
    return Case(path.name, keys=1)  # a key alone: found, not imported (no --import-keys)


@_case("pkcs8.pem")
def _pkcs8(path: Path, pki: Pki) -> Case:
    key = ec.generate_private_key(ec.SECP384R1())
    cert, _ = pki.leaf("pkcs8.corpus.test", key=key)
    _write(path, pem(cert) + key_pem(key))
    fp = fingerprint(cert)
    return Case(path.name, certificates=(fp,), keys=1,
                fields=((fp, "key_type", "EC"), (fp, "key_size", 384), (fp, "key_curve", "secp384r1")))


@_case("encrypted-pkcs8.pem")
def _encrypted_pkcs8(path: Path, pki: Pki) -> Case:
    key = ed25519.Ed25519PrivateKey.generate()
    cert, _ = pki.leaf("encrypted-pkcs8.corpus.test", key=key)
    text = key_pem(key, password=CORPUS_PASSWORD) + pem(cert)
    assert text.startswith("-----BEGIN ENCRYPTED PRIVATE KEY-----")
    _write(path, text)
    fp = fingerprint(cert)
    return Case(path.name, certificates=(fp,), keys=1, fields=((fp, "key_type", "Ed25519"),))


@_case("negative-serial.pem")
def _negative_serial(path: Path, pki: Pki) -> Case:
    cert, _ = pki.leaf("negative-serial.corpus.test", serial=0x05, self_signed=True)
    patched = with_negative_serial(cert)
    _write(path, pem_block("CERTIFICATE", patched))
    fp = hashlib.sha256(patched).hexdigest()
    return Case(path.name, certificates=(fp,), notes=("serial number is not positive",),
                fields=((fp, "serial_hex", "-05"), (fp, "self_signed", False)))  # the patch broke the signature


@_case("unknown-extension.pem")
def _unknown_extension(path: Path, pki: Pki) -> Case:
    extension = x509.UnrecognizedExtension(ObjectIdentifier(PRIVATE_OID), b"\x0c\x05hello")
    cert, _ = pki.leaf("unknown-extension.corpus.test", extensions=((extension, False),))
    _write(path, pem(cert))
    return Case(path.name, certificates=(fingerprint(cert),),
                notes=(f"unrecognised non-critical extension {PRIVATE_OID}",))


@_case("idn-san.pem")
def _idn_san(path: Path, pki: Pki) -> Case:
    names = ["xn--bcher-kva.example", "www.xn--bcher-kva.example"]
    cert, _ = pki.leaf(names[0], sans=[x509.DNSName(n) for n in names])
    _write(path, pem(cert))
    fp = fingerprint(cert)
    return Case(path.name, certificates=(fp,), fields=((fp, "sans", tuple(("DNS", n) for n in names)),))


@_case("ip-san.pem")
def _ip_san(path: Path, pki: Pki) -> Case:
    sans = [x509.DNSName("ip.corpus.test"), x509.IPAddress(ipaddress.ip_address("192.0.2.10")),
            x509.IPAddress(ipaddress.ip_address("2001:db8::10"))]
    cert, _ = pki.leaf("ip.corpus.test", sans=sans)
    _write(path, pem(cert))
    fp = fingerprint(cert)
    return Case(path.name, certificates=(fp,), fields=(
        (fp, "sans", (("DNS", "ip.corpus.test"), ("IP", "192.0.2.10"), ("IP", "2001:db8::10"))),))


@_case("uri-email-san.pem")
def _uri_email_san(path: Path, pki: Pki) -> Case:
    sans = [x509.UniformResourceIdentifier("https://service.corpus.test/api"), x509.RFC822Name("ops@corpus.test")]
    cert, _ = pki.leaf("uri-email.corpus.test", sans=sans)
    _write(path, pem(cert))
    fp = fingerprint(cert)
    return Case(path.name, certificates=(fp,), fields=(
        (fp, "sans", (("URI", "https://service.corpus.test/api"), ("email", "ops@corpus.test"))),))


@_case("request.pem")
def _csr(path: Path, pki: Pki) -> Case:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(_name("csr.corpus.test")).sign(key, hashes.SHA256())
    _write(path, csr.public_bytes(serialization.Encoding.PEM))
    return Case(path.name, notes=("ignored PEM block 'CERTIFICATE REQUEST' at line 1",
                                  "no certificate or private key in this file"))


@_case("dhparams.pem")
def _dh_parameters(path: Path, pki: Pki) -> Case:
    _write(path, pem_block("DH PARAMETERS", dh_parameters_der()))
    return Case(path.name, notes=("ignored PEM block 'DH PARAMETERS' at line 1",
                                  "no certificate or private key in this file"))


@_case("trusted.pem")
def _trusted(path: Path, pki: Pki) -> Case:
    cert, _ = pki.leaf("trusted.corpus.test")
    _write(path, pem_block("TRUSTED CERTIFICATE", der(cert) + trust_aux()))
    fp = fingerprint(cert)
    return Case(path.name, certificates=(fp,), fields=((fp, "subject", subject_string("trusted.corpus.test")),))


# --- loaded by cryptography, then failing (or warning) when a field is read

def _leaf_der(pki: Pki, cn: str, *, not_after: dt.datetime | None = None,
              extra_name: x509.NameAttribute | None = None) -> bytes:
    """A leaf's DER, built here (not by Pki.leaf) where the surgery needs a date or a name it will patch."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([*_name(cn), *([extra_name] if extra_name else [])])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(pki.intermediate.certificate.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(pki.now - dt.timedelta(days=1))
            .not_valid_after(not_after or pki.now + dt.timedelta(days=90))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(cn)]), critical=False)
            .sign(pki.intermediate.key, hashes.SHA256()))
    return der(cert)


def _patched(data: bytes, old: bytes, new: bytes) -> bytes:
    """``data`` with its one ``old`` replaced by ``new`` of the same length (the signature no longer
    verifies, which loading does not check)."""
    assert data.count(old) == 1 and len(old) == len(new), old
    return data.replace(old, new)


def _tlv(tag: int, body: bytes) -> bytes:
    return bytes([tag]) + _der_length(len(body)) + body


def with_serial(data: bytes, serial: bytes) -> bytes:
    """A certificate's DER with its serial's contents replaced by ``serial`` (any length: the
    TBSCertificate and Certificate lengths are re-encoded around it)."""
    def contents(at: int) -> tuple[int, int]:  # (offset, length) of the contents of the TLV at ``at``
        first = data[at + 1]
        if first < 0x80:
            return at + 2, first
        count = first & 0x7F
        return at + 2 + count, int.from_bytes(data[at + 2:at + 2 + count], "big")
    body, body_length = contents(0)
    tbs, tbs_length = contents(body)
    version = data[tbs:tbs + 5]
    assert version == bytes.fromhex("a003020102"), "a v3 certificate"
    old_serial, old_length = contents(tbs + 5)
    new_tbs = version + _tlv(0x02, serial) + data[old_serial + old_length:tbs + tbs_length]
    return _tlv(0x30, _tlv(0x30, new_tbs) + data[tbs + tbs_length:body + body_length])


@_case("unreadable-issuer.der")
def _unreadable_issuer(path: Path, pki: Pki) -> Case:
    data = _leaf_der(pki, "unreadable-issuer.corpus.test")
    # The issuer's common name is a UTF8String; 0xff is never UTF-8. cryptography loads the
    # certificate and raises (ValueError) only when the issuer is read.
    data = _patched(data, b"Corpus Issuing CA", b"\xfforpus Issuing CA")
    _write(path, data)
    return Case(path.name, "the issuer name cannot be read", certificates=(hashlib.sha256(data).hexdigest(),))


@_case("year-zero.pem")
def _year_zero(path: Path, pki: Pki) -> Case:
    far = dt.datetime(2100, 1, 1, tzinfo=dt.timezone.utc)  # after 2049: a GeneralizedTime, four-digit year
    data = _patched(_leaf_der(pki, "year-zero.corpus.test", not_after=far), b"21000101000000Z", b"00000101000000Z")
    _write(path, pem_block("CERTIFICATE", data))  # year 0000: loads, then no datetime can hold it
    return Case(path.name, "the end of the validity period (not after) cannot be read",
                certificates=(hashlib.sha256(data).hexdigest(),))


@_case("year-zero-in-chain.p7b")
def _year_zero_in_chain(path: Path, pki: Pki) -> Case:
    good, _ = pki.leaf("year-zero-neighbour.corpus.test")
    far = dt.datetime(2100, 1, 1, tzinfo=dt.timezone.utc)
    bad = _patched(_leaf_der(pki, "year-zero-p7b.corpus.test", not_after=far), b"21000101000000Z", b"00000101000000Z")
    signed_data = (_tlv(0x02, b"\x01") + _tlv(0x31, b"") + _tlv(0x30, bytes.fromhex("06092a864886f70d010701"))
                   + _tlv(0xA0, der(good) + bad) + _tlv(0x31, b""))
    _write(path, _tlv(0x30, bytes.fromhex("06092a864886f70d010702") + _tlv(0xA0, _tlv(0x30, signed_data))))
    return Case(path.name, "the end of the validity period (not after) cannot be read",
                certificates=(fingerprint(good), hashlib.sha256(bad).hexdigest()))


@_case("oversized-serial.der")
def _oversized_serial(path: Path, pki: Pki) -> Case:
    # 100 octets (RFC 5280 allows 20); cryptography loads it, the inventory keeps 65 (130 hex digits).
    data = with_serial(_leaf_der(pki, "oversized-serial.corpus.test"), b"\x01" + bytes(99))
    _write(path, data)
    return Case(path.name, "serial number is 200 hex digits, more than the 130 the inventory keeps",
                certificates=(hashlib.sha256(data).hexdigest(),))


@_case("three-letter-country.pem")
def _three_letter_country(path: Path, pki: Pki) -> Case:
    # countryName must be two letters; a CA that wrote three makes cryptography warn when the
    # subject is read (an exception where warnings are errors). Legal enough to keep.
    organization = x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "XYZ")
    data = _leaf_der(pki, "three-letter-country.corpus.test", extra_name=organization)
    data = _patched(data, bytes.fromhex("060355040b0c0358595a"), bytes.fromhex("06035504060c0358595a"))
    _write(path, pem_block("CERTIFICATE", data))
    fp = hashlib.sha256(data).hexdigest()
    return Case(path.name, certificates=(fp,),
                fields=((fp, "subject", "C=XYZ," + subject_string("three-letter-country.corpus.test")),))


CASE_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def build_corpus(directory: Path) -> list[Case]:
    """Write every case into ``directory`` (created) and return them, in CASE_NAMES order."""
    directory.mkdir(parents=True, exist_ok=True)
    pki = Pki()
    cases = []
    for name, builder in _BUILDERS.items():
        case = builder(directory / name, pki)
        assert case.name == name
        cases.append(case)
    return cases


def write_fuzz_seeds(directory: Path) -> list[Path]:
    """The fuzz tests' seeds (tests/corpus/fuzz/seeds): one valid input per format the parsers read,
    certificates only (no private key is ever checked in; the fuzz tests add key-bearing seeds made
    at run time). Written once and committed, so that a crasher found from them replays."""
    directory.mkdir(parents=True, exist_ok=True)
    pki = Pki()
    leaf, _ = pki.leaf("seed.fuzz.test", sans=[x509.DNSName("seed.fuzz.test"),
                                               x509.IPAddress(ipaddress.ip_address("192.0.2.7")),
                                               x509.UniformResourceIdentifier("https://seed.fuzz.test/")])
    chain = [leaf, pki.intermediate.certificate, pki.root.certificate]
    seeds = {
        "leaf.der": der(leaf),
        "chain.pem": ("leaf:\n" + pem(*chain)).encode("ascii"),
        "chain-crlf.pem": pem(leaf, pki.intermediate.certificate).replace("\n", "\r\n").encode("ascii"),
        "chain-der.p7b": pkcs7.serialize_certificates(chain, serialization.Encoding.DER),
        "chain-pem.p7b": pkcs7.serialize_certificates(chain[:2], serialization.Encoding.PEM),
        "certificates-only.p12": pkcs12.serialize_key_and_certificates(
            b"seed", None, None, chain, serialization.NoEncryption()),
        "trusted.pem": pem_block("TRUSTED CERTIFICATE", der(leaf) + trust_aux()).encode("ascii"),
        "negative-serial.der": with_negative_serial(pki.leaf("negative.fuzz.test", serial=0x05, self_signed=True)[0]),
    }
    written = []
    for name, data in seeds.items():
        (directory / name).write_bytes(data)
        written.append(directory / name)
    return written


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "corpus")
    for built in build_corpus(target):
        print(f"{built.status:8} {built.name}")
    print(f"written to {os.path.abspath(target)}")
