"""Byte patterns that would betray a private key: its encodings and its raw secret number."""

from __future__ import annotations

import base64

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, mldsa, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes


def key_needles(key: PrivateKeyTypes) -> dict[str, bytes]:
    """Named byte strings, any one of which found somewhere means the key leaked there.

    Base64 slices stay inside the first 64-character line, so they match line-wrapped PEM too.
    """
    pkcs8 = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    needles = {"pkcs8-der": pkcs8, "pkcs8-base64": base64.b64encode(pkcs8)[16:60],
               "pem-body-line": pem.splitlines()[2]}
    if isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        traditional = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL,
                                        serialization.NoEncryption())
        needles["traditional-der"] = traditional
        needles["traditional-base64"] = base64.b64encode(traditional)[16:60]
    if isinstance(key, ec.EllipticCurvePrivateKey):
        value = key.private_numbers().private_value
        needles["ec-scalar"] = value.to_bytes((key.curve.key_size + 7) // 8, "big")
        needles["ec-scalar-hex"] = format(value, "x").encode()
    elif isinstance(key, rsa.RSAPrivateKey):
        d = key.private_numbers().d
        needles["rsa-d"] = d.to_bytes((d.bit_length() + 7) // 8, "big")
    elif isinstance(key, mldsa.MLDSA44PrivateKey | mldsa.MLDSA65PrivateKey | mldsa.MLDSA87PrivateKey):
        needles["ml-dsa-seed"] = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                                   serialization.NoEncryption())  # the 32-byte seed: the whole key
    elif isinstance(key, ed25519.Ed25519PrivateKey):
        needles["ed25519-raw"] = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                                   serialization.NoEncryption())
    return needles


def leaks(haystack: bytes, keys: list[PrivateKeyTypes]) -> list[str]:
    """The names of the needles of ``keys`` found in ``haystack``."""
    return [f"key {i} {name}" for i, key in enumerate(keys) for name, needle in key_needles(key).items()
            if needle in haystack]
