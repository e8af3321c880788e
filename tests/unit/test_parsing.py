"""Parsing, with real keys and certificates: PEM blocks, every input format, every field of a
certificate record, chain building, and the key helpers."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import itertools
from dataclasses import dataclass, field

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, mldsa, rsa
from cryptography.hazmat.primitives.serialization import pkcs7, pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

from certpilot.chain import build_chain, find_leaves, order_chains
from certpilot.errors import ParseError, PasswordError
from certpilot.formats import load_bundle, load_certificate
from certpilot.keys import (KEY_ALGORITHMS, generate_private_key, key_algorithm, key_matches_certificate,
                            private_key_der, public_key_sha256)
from certpilot.pem import SECRET_LABELS, looks_like_pem, read_pem_blocks, to_pem
from certpilot.x509info import describe_certificate, fingerprint_sha256, is_issued_by, serial_hex, spki_sha256

ORG = "certpilot parsing"
PASSWORD = b"parsing-password"
PRIVATE_OID = "1.3.6.1.4.1.32473.1.1"  # under the documentation enterprise number (RFC 5612)
NOW = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def _name(cn: str, org: str = ORG) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, org), x509.NameAttribute(NameOID.COMMON_NAME, cn)])


@dataclass(frozen=True)
class Issuer:
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey = field(repr=False)


def _sign_alg(key: object) -> hashes.HashAlgorithm | None:
    if isinstance(key, ed25519.Ed25519PrivateKey | mldsa.MLDSA44PrivateKey | mldsa.MLDSA65PrivateKey
                  | mldsa.MLDSA87PrivateKey):
        return None
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1":
        return hashes.SHA384()
    return hashes.SHA256()


def make_cert(subject: x509.Name, key, *, issuer: Issuer | None = None,  # noqa: ANN001
              issuer_name: x509.Name | None = None, signer=None,  # noqa: ANN001
              ca: bool = False, path_length: int | None = None, serial: int | None = None,
              extensions: tuple[tuple[x509.ExtensionType, bool], ...] = (),
              not_before: dt.datetime | None = None, not_after: dt.datetime | None = None) -> x509.Certificate:
    """A certificate for ``key``: self-signed unless ``issuer`` is given; ``signer``/``issuer_name`` forge one."""
    signer = signer or (issuer.key if issuer else key)
    issuer_name = issuer_name or (issuer.certificate.subject if issuer else subject)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name).public_key(key.public_key())
               .serial_number(serial or x509.random_serial_number())
               .not_valid_before(not_before or NOW - dt.timedelta(days=1))
               .not_valid_after(not_after or NOW + dt.timedelta(days=90))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=True))
    if ca:
        usage = x509.KeyUsage(False, False, False, False, False, True, True, False, False)  # keyCertSign, cRLSign
        builder = builder.add_extension(usage, True)
        builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    if issuer:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key())
        builder = builder.add_extension(aki, False)
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical)
    return builder.sign(signer, _sign_alg(signer))


@dataclass(frozen=True)
class Pki:
    root: Issuer
    intermediate: Issuer
    leaf: x509.Certificate
    leaf_key: ec.EllipticCurvePrivateKey = field(repr=False)
    rsa_key: rsa.RSAPrivateKey = field(repr=False)


@pytest.fixture(scope="module")
def pki() -> Pki:
    root_key = ec.generate_private_key(ec.SECP384R1())
    root = Issuer(make_cert(_name("Parsing Root CA"), root_key, ca=True), root_key)
    inter_key = ec.generate_private_key(ec.SECP256R1())
    inter = Issuer(make_cert(_name("Parsing Issuing CA"), inter_key, issuer=root, ca=True, path_length=0), inter_key)
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = make_cert(_name("leaf.parsing.test"), leaf_key, issuer=inter)
    return Pki(root, inter, leaf, leaf_key, rsa.generate_private_key(public_exponent=65537, key_size=2048))


def pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def key_bytes(key, encoding=serialization.Encoding.PEM, fmt=serialization.PrivateFormat.PKCS8,  # noqa: ANN001
              password: bytes | None = None) -> bytes:
    encryption = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    return key.private_bytes(encoding, fmt, encryption)


def same_key(a, b) -> bool:  # noqa: ANN001
    return public_key_sha256(a) == public_key_sha256(b)


# ------------------------------------------------------------------------------------------ pem


def test_blocks_with_text_around_them_keep_order_lines_and_der(pki: Pki) -> None:
    data = (b"Certificate for leaf.parsing.test\n" + pem(pki.leaf) + b"\n\nIssued by:\n"
            + pem(pki.intermediate.certificate) + b"-- end --\n")
    blocks = read_pem_blocks(data)
    assert [b.label for b in blocks] == ["CERTIFICATE", "CERTIFICATE"]
    leaf_lines = pem(pki.leaf).count(b"\n")
    assert [b.line for b in blocks] == [2, 2 + leaf_lines + 3]
    assert [b.der for b in blocks] == [der(pki.leaf), der(pki.intermediate.certificate)]
    assert blocks[0].text == pem(pki.leaf).decode()
    assert not blocks[0].is_secret
    assert "der" not in repr(blocks[0]) and "text" not in repr(blocks[0])


@pytest.mark.parametrize("newline", [b"\r\n", b"\r"], ids=["crlf", "cr"])
def test_other_line_ends_read_the_same(pki: Pki, newline: bytes) -> None:
    data = b"intro\n" + pem(pki.leaf, pki.intermediate.certificate)
    expected = [(b.label, b.line, b.der) for b in read_pem_blocks(data)]
    assert [(b.label, b.line, b.der) for b in read_pem_blocks(data.replace(b"\n", newline))] == expected
    assert len(expected) == 2


def test_rfc1421_headers_are_skipped_and_kept_in_the_text(pki: Pki) -> None:
    data = key_bytes(pki.leaf_key, fmt=serialization.PrivateFormat.TraditionalOpenSSL, password=PASSWORD)
    lines = data.decode().splitlines()
    assert lines[1].startswith("Proc-Type: 4,ENCRYPTED") and lines[2].startswith("DEK-Info: ")
    (block,) = read_pem_blocks(data)
    assert block.label == "EC PRIVATE KEY" and block.is_secret and block.line == 1
    body = "".join(line for line in lines[3:-1] if line)
    assert block.der == base64.b64decode(body)
    assert "Proc-Type: 4,ENCRYPTED" in block.text
    bundle = load_bundle(data, password=PASSWORD)
    assert same_key(bundle.private_keys[0], pki.leaf_key)
    with pytest.raises(PasswordError,
                       match=r"^PEM block 'EC PRIVATE KEY' at line 1 is encrypted: a password is needed$"):
        load_bundle(data)
    with pytest.raises(PasswordError,
                       match=r"^PEM block 'EC PRIVATE KEY' at line 1: wrong password, or the key is damaged$"):
        load_bundle(data, password=b"wrong")


def _cert_body(pki: Pki) -> list[str]:
    return pem(pki.leaf).decode().splitlines()[1:-1]


@pytest.mark.parametrize("shape, expected", [
    ("truncated", "PEM block 'CERTIFICATE' at line 3 has no END line (truncated?)"),
    ("nested", "PEM block 'CERTIFICATE' at line 3 has no END line before the next BEGIN at line 8 (truncated?)"),
    ("mismatched", "PEM block 'CERTIFICATE' at line 3 ends with END 'X509 CRL' at line"),
    ("empty", "PEM block 'CERTIFICATE' at line 3 is empty"),
    ("bad-character", "PEM block 'CERTIFICATE' at line 3 is not valid base64 (invalid character '*')"),
    ("bad-padding", "PEM block 'CERTIFICATE' at line 3 is not valid base64 (wrong length or padding)"),
])
def test_errors_name_the_block_and_its_line(pki: Pki, shape: str, expected: str) -> None:
    body = _cert_body(pki)
    begin, end = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"
    lines = {
        "truncated": [begin, *body[:4]],
        "nested": [begin, *body[:4], begin, *body, end],
        "mismatched": [begin, *body, "-----END X509 CRL-----"],
        "empty": [begin, end],
        "bad-character": [begin, body[0][:5] + "*" + body[0][6:], *body[1:], end],
        "bad-padding": [begin, *body, "A", end],  # one character more than a whole number of quanta
    }[shape]
    data = ("first line\n\n" + "\n".join(lines) + "\n").encode()
    with pytest.raises(ParseError) as info:
        read_pem_blocks(data, "bundle.pem")
    assert expected in info.value.detail
    assert info.value.source == "bundle.pem" and str(info.value) == f"bundle.pem: {info.value.detail}"
    assert not any(chunk in str(info.value) for chunk in body if len(chunk) > 8)


def test_a_secret_block_error_does_not_quote_the_key(pki: Pki) -> None:
    lines = key_bytes(pki.leaf_key).decode().splitlines()
    lines[2] = lines[2][:7] + "#" + lines[2][8:]
    with pytest.raises(ParseError) as info:
        load_bundle("\n".join(lines).encode(), source="key.pem")
    assert info.value.detail == "PEM block 'PRIVATE KEY' at line 1 is not valid base64 (invalid character '#')"
    assert "PRIVATE KEY" in SECRET_LABELS


def test_looks_like_pem_and_to_pem(pki: Pki) -> None:
    assert looks_like_pem(pem(pki.leaf)) and looks_like_pem(b"junk\n-----BEGIN X-----")
    assert not looks_like_pem(der(pki.leaf)) and not looks_like_pem(b"BEGIN CERTIFICATE")
    assert to_pem("CERTIFICATE", der(pki.leaf)).encode() == pem(pki.leaf)  # byte for byte as OpenSSL writes it
    assert read_pem_blocks(b"no blocks here\n") == []


# ------------------------------------------------------------------------------------------ formats


def test_pem_bundle(pki: Pki) -> None:
    bundle = load_bundle(pem(pki.leaf, pki.intermediate.certificate) + key_bytes(pki.leaf_key))
    assert bundle.format == "pem" and bundle.certificates == (pki.leaf, pki.intermediate.certificate)
    assert len(bundle.private_keys) == 1 and same_key(bundle.private_keys[0], pki.leaf_key)
    assert bundle.notes == () and not bundle.is_empty
    assert "private_keys" not in repr(bundle)


def test_der_certificate(pki: Pki) -> None:
    bundle = load_bundle(der(pki.leaf))
    assert (bundle.format, bundle.certificates, bundle.private_keys) == ("der", (pki.leaf,), ())
    assert load_certificate(der(pki.leaf)) == pki.leaf == load_certificate(pem(pki.leaf))


@pytest.mark.parametrize("encoding, fmt", [(serialization.Encoding.DER, "pkcs7"), (serialization.Encoding.PEM, "pem")])
def test_pkcs7(pki: Pki, encoding: serialization.Encoding, fmt: str) -> None:
    certs = [pki.leaf, pki.intermediate.certificate, pki.root.certificate]
    data = pkcs7.serialize_certificates(certs, encoding)
    bundle = load_bundle(data)
    assert bundle.format == fmt
    assert sorted(map(fingerprint_sha256, bundle.certificates)) == sorted(map(fingerprint_sha256, certs))


def test_pkcs7_block_of_garbage(pki: Pki) -> None:
    data = to_pem("PKCS7", b"\x30\x03\x02\x01\x01").encode()
    with pytest.raises(ParseError, match=r"PEM block 'PKCS7' at line 1 is not a valid PKCS#7 certificate bundle"):
        load_bundle(data)


def test_pkcs12_with_password(pki: Pki) -> None:
    data = pkcs12.serialize_key_and_certificates(b"leaf", pki.leaf_key, pki.leaf, [pki.intermediate.certificate],
                                                 serialization.BestAvailableEncryption(PASSWORD))
    bundle = load_bundle(data, password=PASSWORD)
    assert bundle.format == "pkcs12" and bundle.certificates == (pki.leaf, pki.intermediate.certificate)
    assert same_key(bundle.private_keys[0], pki.leaf_key)
    with pytest.raises(PasswordError, match=r"^PKCS#12 file is password-protected: a password is needed$"):
        load_bundle(data)
    with pytest.raises(PasswordError) as info:
        load_bundle(data, password=b"wrong", source="leaf.p12")
    assert info.value.detail == "PKCS#12 file: wrong password, or the file is damaged"
    assert isinstance(info.value, ParseError) and info.value.source == "leaf.p12"


def test_pkcs12_without_password_reads_with_or_without_one(pki: Pki) -> None:
    data = pkcs12.serialize_key_and_certificates(None, pki.leaf_key, pki.leaf, None, serialization.NoEncryption())
    for password in (None, PASSWORD):  # an import's password is for the files that need one
        bundle = load_bundle(data, password=password)
        assert bundle.format == "pkcs12" and bundle.certificates == (pki.leaf,)
        assert same_key(bundle.private_keys[0], pki.leaf_key)


@pytest.mark.parametrize("fmt, label", [
    (serialization.PrivateFormat.PKCS8, "PRIVATE KEY"),
    (serialization.PrivateFormat.TraditionalOpenSSL, "RSA PRIVATE KEY"),
])
def test_pem_rsa_keys(pki: Pki, fmt: serialization.PrivateFormat, label: str) -> None:
    data = key_bytes(pki.rsa_key, fmt=fmt)
    assert data.startswith(f"-----BEGIN {label}-----".encode())
    for password in (None, PASSWORD):  # a plain key reads the same when an import has a password
        bundle = load_bundle(data, password=password)
        assert bundle.certificates == () and same_key(bundle.private_keys[0], pki.rsa_key)


def test_pem_ec_traditional_and_encrypted_pkcs8_keys(pki: Pki) -> None:
    traditional = key_bytes(pki.leaf_key, fmt=serialization.PrivateFormat.TraditionalOpenSSL)
    assert traditional.startswith(b"-----BEGIN EC PRIVATE KEY-----")
    assert same_key(load_bundle(traditional).private_keys[0], pki.leaf_key)
    encrypted = key_bytes(pki.leaf_key, password=PASSWORD)
    assert encrypted.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert same_key(load_bundle(encrypted, password=PASSWORD).private_keys[0], pki.leaf_key)
    with pytest.raises(PasswordError, match=r"^PEM block 'ENCRYPTED PRIVATE KEY' at line 1 is encrypted"):
        load_bundle(encrypted)
    with pytest.raises(PasswordError, match=r"^PEM block 'ENCRYPTED PRIVATE KEY' at line 1: wrong password"):
        load_bundle(encrypted, password=b"wrong")


def test_pem_key_block_of_garbage(pki: Pki) -> None:
    garbage = to_pem("PRIVATE KEY", b"\x30\x03\x02\x01\x00")
    with pytest.raises(ParseError) as info:
        load_bundle(garbage.encode())
    assert info.value.detail.startswith("PEM block 'PRIVATE KEY' at line 1 is not a valid private key (")
    assert "MAMCAQA" not in info.value.detail  # the block's base64


def test_der_keys(pki: Pki) -> None:
    plain = key_bytes(pki.leaf_key, serialization.Encoding.DER)
    for password in (None, PASSWORD):
        bundle = load_bundle(plain, password=password)
        assert bundle.format == "der-key" and same_key(bundle.private_keys[0], pki.leaf_key)
    encrypted = key_bytes(pki.leaf_key, serialization.Encoding.DER, password=PASSWORD)
    assert same_key(load_bundle(encrypted, password=PASSWORD).private_keys[0], pki.leaf_key)
    with pytest.raises(PasswordError, match=r"^DER private key is encrypted: a password is needed$"):
        load_bundle(encrypted)


@pytest.mark.parametrize("label", ["X509 CERTIFICATE", "TRUSTED CERTIFICATE"])
def test_other_certificate_labels(pki: Pki, label: str) -> None:
    trailer = bytes.fromhex("300c300a06082b06010505070301") if label == "TRUSTED CERTIFICATE" else b""
    bundle = load_bundle(to_pem(label, der(pki.leaf) + trailer).encode())
    assert bundle.certificates == (pki.leaf,)


def test_ignored_blocks_are_noted_not_failed(pki: Pki) -> None:
    csr = (x509.CertificateSigningRequestBuilder().subject_name(_name("csr.parsing.test"))
           .sign(pki.leaf_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    public = pki.leaf_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                    serialization.PublicFormat.SubjectPublicKeyInfo)
    data = csr + b"\n" + public + to_pem("WIDGET DATA", b"\x01\x02").encode()
    bundle = load_bundle(data, source="misc.pem")
    lines = [1, csr.count(b"\n") + 2, csr.count(b"\n") + 2 + public.count(b"\n")]
    assert bundle.notes == (f"ignored PEM block 'CERTIFICATE REQUEST' at line {lines[0]}",
                            f"ignored PEM block 'PUBLIC KEY' at line {lines[1]}",
                            f"ignored unknown PEM block 'WIDGET DATA' at line {lines[2]}")
    assert bundle.is_empty
    with pytest.raises(ParseError, match=r"^misc.pem: expected one certificate, found 0$"):
        load_certificate(data, source="misc.pem")


def test_load_certificate_wants_exactly_one(pki: Pki) -> None:
    with pytest.raises(ParseError, match=r"expected one certificate, found 2"):
        load_certificate(pem(pki.leaf, pki.root.certificate))


@pytest.mark.parametrize("data, expected", [
    (b"", "empty input"),
    (b" \r\n\t\n", "empty input"),
    (b"\x89PNG\r\n\x1a\n\x00\x00",
     "not a certificate, key or bundle: neither PEM nor DER (starts with 89 50 4e 47 0d 0a 1a 0a)"),
    (b"\x30\x03\x02\x01\x05", "DER data is not a certificate, PKCS#7, PKCS#12 or private key (as a certificate: "),
], ids=["empty", "whitespace", "png", "der-garbage"])
def test_bad_input(data: bytes, expected: str) -> None:
    with pytest.raises(ParseError) as info:
        load_bundle(data, source="in")
    assert info.value.detail.startswith(expected) and info.value.source == "in"


# ------------------------------------------------------------------------------------------ x509info


@pytest.fixture(scope="module")
def full(pki: Pki) -> x509.Certificate:
    """A leaf with every field x509info reads: an RSA-2048 key, issued by the EC intermediate."""
    key = pki.rsa_key
    sans = x509.SubjectAlternativeName([
        x509.DNSName("full.parsing.test"),
        x509.IPAddress(ipaddress.ip_address("192.0.2.1")),
        x509.IPAddress(ipaddress.ip_address("2001:db8::1")),
        x509.UniformResourceIdentifier("https://full.parsing.test/"),
        x509.RFC822Name("admin@parsing.test"),
        x509.DirectoryName(_name("directory")),
        x509.RegisteredID(ObjectIdentifier("1.3.6.1.4.1.32473.9")),
        x509.OtherName(ObjectIdentifier("1.3.6.1.4.1.311.20.2.3"), b"\x0c\x05user1"),
    ])
    subject = x509.Name([x509.NameAttribute(NameOID.COUNTRY_NAME, "NL"),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORG),
                         x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Web, and more"),
                         x509.NameAttribute(NameOID.COMMON_NAME, "full.parsing.test")])
    extensions = (
        (sans, False),
        (x509.KeyUsage(True, False, True, False, False, False, False, False, False), True),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), False),
        (x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False),
        (x509.CRLDistributionPoints([x509.DistributionPoint(
            [x509.UniformResourceIdentifier("http://crl.parsing.test/issuing.crl")], None, None, None)]), False),
        (x509.AuthorityInformationAccess([
            x509.AccessDescription(x509.AuthorityInformationAccessOID.OCSP,
                                   x509.UniformResourceIdentifier("http://ocsp.parsing.test")),
            x509.AccessDescription(x509.AuthorityInformationAccessOID.CA_ISSUERS,
                                   x509.UniformResourceIdentifier("http://pki.parsing.test/issuing.cer"))]), False),
    )
    return make_cert(subject, key, issuer=pki.intermediate, serial=0x0123_4567_89AB_CDEF_42, extensions=extensions,
                     not_before=dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc),
                     not_after=dt.datetime(2026, 2, 3, 4, 5, 6, tzinfo=dt.timezone.utc))


def test_describe_every_field(pki: Pki, full: x509.Certificate) -> None:
    record = describe_certificate(full)
    public_der = pki.rsa_key.public_key().public_bytes(serialization.Encoding.DER,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo)
    assert record.fingerprint_sha256 == hashlib.sha256(der(full)).hexdigest()
    assert record.subject == r"CN=full.parsing.test,OU=Web\, and more,O=certpilot parsing,C=NL"
    assert record.issuer == "CN=Parsing Issuing CA,O=certpilot parsing"
    assert record.serial_hex == "0123456789abcdef42"
    assert record.not_before == dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    assert record.not_after == dt.datetime(2026, 2, 3, 4, 5, 6, tzinfo=dt.timezone.utc)
    assert record.not_before.tzinfo == dt.timezone.utc and record.not_after.tzinfo == dt.timezone.utc
    assert record.sans == (("DNS", "full.parsing.test"), ("IP", "192.0.2.1"), ("IP", "2001:db8::1"),
                           ("URI", "https://full.parsing.test/"), ("email", "admin@parsing.test"),
                           ("dirName", "CN=directory,O=certpilot parsing"),
                           ("registeredID", "1.3.6.1.4.1.32473.9"), ("otherName", "1.3.6.1.4.1.311.20.2.3"))
    assert (record.key_type, record.key_size, record.key_curve) == ("RSA", 2048, None)
    assert record.spki_sha256 == hashlib.sha256(public_der).hexdigest() == public_key_sha256(pki.rsa_key)
    assert record.signature_algorithm == "ecdsa-with-SHA256"
    assert (record.is_ca, record.path_length) == (False, None)
    assert record.key_usage == ("digital_signature", "key_encipherment")
    assert record.extended_key_usage == ("serverAuth", "clientAuth")
    assert record.subject_key_id == hashlib.sha1(pki.rsa_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.PKCS1)).hexdigest()
    assert record.authority_key_id == describe_certificate(pki.intermediate.certificate).subject_key_id
    assert record.crl_urls == ("http://crl.parsing.test/issuing.crl",)
    assert record.ocsp_urls == ("http://ocsp.parsing.test",)
    assert record.ca_issuer_urls == ("http://pki.parsing.test/issuing.cer",)
    assert record.self_signed is False
    assert record.der == der(full)
    assert record.notes == ()
    assert "der=" not in repr(record)


def test_describe_certificate_authorities(pki: Pki) -> None:
    root = describe_certificate(pki.root.certificate)
    inter = describe_certificate(pki.intermediate.certificate)
    assert (root.is_ca, root.path_length, root.self_signed, root.authority_key_id) == (True, None, True, None)
    assert (inter.is_ca, inter.path_length, inter.self_signed) == (True, 0, False)
    assert inter.authority_key_id == root.subject_key_id is not None
    assert root.key_usage == inter.key_usage == ("key_cert_sign", "crl_sign")
    assert root.signature_algorithm == inter.signature_algorithm == "ecdsa-with-SHA384"
    assert (root.crl_urls, root.ocsp_urls, root.ca_issuer_urls, root.sans, root.extended_key_usage) == ((),) * 5


@pytest.mark.parametrize("make_key, expected", [
    (lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
     ("RSA", 2048, None, "sha256WithRSAEncryption")),
    (lambda: ec.generate_private_key(ec.SECP256R1()), ("EC", 256, "secp256r1", "ecdsa-with-SHA256")),
    (lambda: ec.generate_private_key(ec.SECP384R1()), ("EC", 384, "secp384r1", "ecdsa-with-SHA384")),
    (ed25519.Ed25519PrivateKey.generate, ("Ed25519", 256, None, "ed25519")),
], ids=["rsa-2048", "ec-p256", "ec-p384", "ed25519"])
def test_key_types(make_key, expected: tuple) -> None:  # noqa: ANN001
    key = make_key()
    record = describe_certificate(make_cert(_name("key.parsing.test"), key))
    assert (record.key_type, record.key_size, record.key_curve, record.signature_algorithm) == expected
    assert record.self_signed and record.spki_sha256 == public_key_sha256(key)


def test_key_agreement_usages(pki: Pki) -> None:
    usage = x509.KeyUsage(False, False, False, False, True, False, False, True, False)  # key_agreement, encipher_only
    cert = make_cert(_name("agree.parsing.test"), pki.leaf_key, issuer=pki.intermediate, extensions=((usage, True),))
    assert describe_certificate(cert).key_usage == ("key_agreement", "encipher_only")


def _negative_serial_certificate() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    data = der(make_cert(_name("negative.parsing.test"), key, serial=0x05))
    tag = bytes.fromhex("a003020102" "020105")  # version v3, then INTEGER 5
    assert data.count(tag) == 1
    return data.replace(tag, bytes.fromhex("a003020102" "0201fb"))  # INTEGER -5; the signature no longer verifies


def test_negative_serial_is_described_with_a_note() -> None:
    cert = load_certificate(_negative_serial_certificate())  # no warning escapes (warnings are errors here)
    record = describe_certificate(cert)
    assert record.serial_hex == "-05"
    assert record.notes == ("serial number is not positive (RFC 5280 requires a positive serial)",)
    assert record.self_signed is False  # the patched certificate's signature does not verify


@pytest.mark.parametrize("critical", [False, True])
def test_unknown_extension_is_noted(pki: Pki, critical: bool) -> None:
    extension = x509.UnrecognizedExtension(ObjectIdentifier(PRIVATE_OID), b"\x05\x00")
    cert = make_cert(_name("unknown.parsing.test"), pki.leaf_key, issuer=pki.intermediate,
                     extensions=((extension, critical),))
    record = describe_certificate(cert)
    kind = "critical" if critical else "non-critical"
    assert record.notes == (f"unrecognised {kind} extension {PRIVATE_OID}",)
    assert record.subject == "CN=unknown.parsing.test,O=certpilot parsing"


@pytest.mark.parametrize("value, expected", [(1, "01"), (0xFF, "ff"), (0x100, "0100"), (0, "00"), (-5, "-05"),
                                             (-0x1234, "-1234")])
def test_serial_hex(value: int, expected: str) -> None:
    assert serial_hex(value) == expected


# ------------------------------------------------------------------------------------------ chain


def _fps(chain: list[x509.Certificate]) -> list[str]:
    return [fingerprint_sha256(c) for c in chain]


def test_shuffled_input_rebuilds_the_chain(pki: Pki) -> None:
    expected = _fps([pki.leaf, pki.intermediate.certificate, pki.root.certificate])
    for order in itertools.permutations([pki.root.certificate, pki.leaf, pki.intermediate.certificate]):
        assert [_fps(c) for c in order_chains(list(order))] == [expected]
        assert _fps(build_chain(pki.leaf, list(order))) == expected
    duplicated = [pki.intermediate.certificate, pki.leaf, pki.leaf, pki.intermediate.certificate]
    assert [_fps(c) for c in order_chains(duplicated)] == [expected[:2]]


def test_a_look_alike_issuer_is_not_linked(pki: Pki) -> None:
    inter_name = pki.intermediate.certificate.subject
    impostor_key = ec.generate_private_key(ec.SECP256R1())
    # Same subject as the real intermediate, issued in the root's name, but signed by another key.
    impostor = make_cert(inter_name, impostor_key, issuer_name=pki.root.certificate.subject,
                         signer=impostor_key, ca=True)
    assert impostor.subject == pki.intermediate.certificate.subject
    assert not is_issued_by(pki.leaf, impostor) and not is_issued_by(impostor, pki.root.certificate)
    assert build_chain(pki.leaf, [impostor, pki.root.certificate]) == [pki.leaf]
    expected = [pki.leaf, pki.intermediate.certificate, pki.root.certificate]
    assert build_chain(pki.leaf, [impostor, pki.intermediate.certificate, pki.root.certificate]) == expected
    chains = order_chains([pki.leaf, impostor, pki.root.certificate])
    assert [_fps(c) for c in chains] == [_fps([pki.leaf]), _fps([impostor]), _fps([pki.root.certificate])]
    # And the other way round: a leaf that names the real intermediate but was signed by another key.
    forged = make_cert(_name("forged.parsing.test"), impostor_key, issuer_name=inter_name, signer=impostor_key)
    assert build_chain(forged, [pki.intermediate.certificate, pki.root.certificate]) == [forged]
    assert describe_certificate(forged).self_signed is False


def test_two_chains_in_one_bundle(pki: Pki) -> None:
    other_key = ec.generate_private_key(ec.SECP256R1())
    other_ca = Issuer(make_cert(_name("Other CA"), other_key, ca=True), other_key)
    other_leaf = make_cert(_name("other.parsing.test"), ec.generate_private_key(ec.SECP256R1()), issuer=other_ca)
    pool = [other_ca.certificate, pki.intermediate.certificate, other_leaf, pki.leaf]
    assert sorted(_fps(c) for c in order_chains(pool)) == sorted(
        [_fps([other_leaf, other_ca.certificate]), _fps([pki.leaf, pki.intermediate.certificate])])
    assert _fps(find_leaves(pool)) == _fps([other_leaf, pki.leaf])


def test_cross_signed_loop_ends(pki: Pki) -> None:
    x_key, y_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    x_name, y_name = _name("Cross X"), _name("Cross Y")
    x_by_y = make_cert(x_name, x_key, issuer_name=y_name, signer=y_key, ca=True)
    y_by_x = make_cert(y_name, y_key, issuer_name=x_name, signer=x_key, ca=True)
    leaf = make_cert(_name("cross.parsing.test"), pki.leaf_key, issuer_name=x_name, signer=x_key)
    assert build_chain(leaf, [y_by_x, x_by_y]) == [leaf, x_by_y, y_by_x]
    assert [_fps(c) for c in order_chains([y_by_x, leaf, x_by_y])] == [_fps([leaf, x_by_y, y_by_x])]


# ------------------------------------------------------------------------------------------ keys


def test_key_matches_certificate(pki: Pki, full: x509.Certificate) -> None:
    assert key_matches_certificate(pki.leaf_key, pki.leaf)
    assert key_matches_certificate(pki.rsa_key, full)
    assert not key_matches_certificate(pki.intermediate.key, pki.leaf)
    assert not key_matches_certificate(ec.generate_private_key(ec.SECP256R1()), pki.leaf)
    assert not key_matches_certificate(ed25519.Ed25519PrivateKey.generate(), full)
    assert public_key_sha256(pki.leaf_key) == spki_sha256(pki.leaf.public_key())


_EXPECTED_KEYS = {
    "rsa-2048": (rsa.RSAPrivateKey, 2048), "rsa-3072": (rsa.RSAPrivateKey, 3072), "rsa-4096": (rsa.RSAPrivateKey, 4096),
    "ec-p256": (ec.EllipticCurvePrivateKey, "secp256r1"), "ec-p384": (ec.EllipticCurvePrivateKey, "secp384r1"),
    "ed25519": (ed25519.Ed25519PrivateKey, None), "ml-dsa-44": (mldsa.MLDSA44PrivateKey, None),
    "ml-dsa-65": (mldsa.MLDSA65PrivateKey, None), "ml-dsa-87": (mldsa.MLDSA87PrivateKey, None),
}


@pytest.mark.parametrize("algorithm", KEY_ALGORITHMS)
def test_generate_private_key(algorithm: str) -> None:
    assert set(_EXPECTED_KEYS) == set(KEY_ALGORITHMS)
    key = generate_private_key(algorithm)  # each algorithm once: rsa-4096 is generated only here
    kind, detail = _EXPECTED_KEYS[algorithm]
    assert isinstance(key, kind)
    if isinstance(key, rsa.RSAPrivateKey):
        assert key.key_size == detail and key.private_numbers().public_numbers.e == 65537
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        assert key.curve.name == detail
    assert key_algorithm(key) == algorithm
    restored = serialization.load_der_private_key(private_key_der(key), password=None)
    assert same_key(restored, key)
    cert = make_cert(_name(f"{algorithm}.parsing.test"), key)
    assert key_matches_certificate(key, cert)


@pytest.mark.parametrize("algorithm", ["rsa-1024", "rsa-2047", "dsa-2048", "ec-p521", "ED25519", ""])
def test_generate_private_key_refuses_unknown_algorithms(algorithm: str) -> None:
    with pytest.raises(ValueError, match=r"unknown key algorithm .*; choose one of rsa-2048, rsa-3072"):
        generate_private_key(algorithm)


def test_encrypted_der_key_with_the_wrong_password_is_a_password_error() -> None:
    from certpilot.errors import PasswordError
    from certpilot.formats import load_bundle
    from certpilot.keys import generate_private_key

    key = generate_private_key("ec-p256")
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                            serialization.BestAvailableEncryption(b"right"))
    with pytest.raises(PasswordError, match="wrong password"):
        load_bundle(der, password=b"wrong")
    assert len(load_bundle(der, password=b"right").private_keys) == 1
