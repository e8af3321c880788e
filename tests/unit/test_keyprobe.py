"""The leak probe used by the secrecy tests must find a key wherever it is planted."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization

from certpilot.keys import KEY_ALGORITHMS, generate_private_key
from tests.keyprobe import leaks


@pytest.mark.parametrize("algorithm", [a for a in KEY_ALGORITHMS if a != "rsa-4096"])
def test_probe_finds_a_planted_key_in_every_encoding(algorithm: str) -> None:
    key = generate_private_key(algorithm)
    other = generate_private_key("ec-p256")
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption()) if algorithm.startswith(("rsa-", "ec-")) else \
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    assert leaks(b"log line: " + der + b" end", [key])
    assert leaks(b"..." + der[5:] + b"...", [key])  # a raw secret number is found without its DER wrapper
    assert leaks(pem, [key])
    assert leaks(b"" + pem + der, [key])
    assert leaks(b"nothing to see here" * 100, [key, other]) == []
