"""ACME wire details that need no server: the ARI CertID (RFC 9773) and Retry-After parsing."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from certpilot.errors import PermanentError
from connectors.acme_issuer import ari_cert_id, retry_after_seconds

NOW = dt.datetime(2026, 5, 1, tzinfo=dt.timezone.utc)


def _certificate(serial: int, key_identifier: bytes | None) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ari.test")])
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
               .serial_number(serial).not_valid_before(NOW).not_valid_after(NOW + dt.timedelta(days=90)))
    if key_identifier is not None:
        builder = builder.add_extension(x509.AuthorityKeyIdentifier(key_identifier, None, None), critical=False)
    return builder.sign(key, hashes.SHA256())


def test_cert_id_matches_the_rfc_9773_example() -> None:
    # RFC 9773 section 4.1: keyIdentifier 69:88:5B:6B:87:46:40:41:E1:B3:7B:84:7B:A0:AE:2C:DE:01:C8:D4 and
    # serial 00:87:65:43:21 (the DER INTEGER keeps its leading zero: the high bit is set).
    aki = bytes.fromhex("69885B6B87464041E1B37B847BA0AE2CDE01C8D4")
    assert ari_cert_id(_certificate(0x87654321, aki)) == "aYhba4dGQEHhs3uEe6CuLN4ByNQ.AIdlQyE"


@pytest.mark.parametrize(("serial", "encoded"), [(1, "AQ"), (0x7F, "fw"), (0x80, "AIA"), (0x0100, "AQA")])
def test_cert_id_serial_is_the_minimal_der_integer(serial: int, encoded: str) -> None:
    assert ari_cert_id(_certificate(serial, b"\x01")).split(".")[1] == encoded


def test_cert_id_needs_an_authority_key_identifier() -> None:
    with pytest.raises(PermanentError, match="authority key identifier"):
        ari_cert_id(_certificate(5, None))


def test_retry_after_seconds() -> None:
    assert retry_after_seconds("120") == 120.0
    assert retry_after_seconds(None) is None and retry_after_seconds("") is None
    assert retry_after_seconds("soon") is None
    assert retry_after_seconds("Fri, 01 May 2026 00:01:30 GMT", now=lambda: NOW) == 90.0
    assert retry_after_seconds("Thu, 30 Apr 2026 00:00:00 GMT", now=lambda: NOW) == 0.0  # past: at once
