"""Private key generation and the checks that tie a key to a certificate.

Functions here take and return key objects in memory; nothing here serialises a key in the clear
except ``private_key_der``, which exists for the keystore's encryption and for explicit exports.
"""

from __future__ import annotations

import typing

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes, PrivateKeyTypes

from certpilot.x509info import spki_sha256

KEY_ALGORITHMS = ("rsa-2048", "rsa-3072", "rsa-4096", "ec-p256", "ec-p384", "ed25519")


def generate_private_key(algorithm: str) -> PrivateKeyTypes:
    if algorithm.startswith("rsa-") and algorithm in KEY_ALGORITHMS:
        return rsa.generate_private_key(public_exponent=65537, key_size=int(algorithm[4:]))
    if algorithm == "ec-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if algorithm == "ec-p384":
        return ec.generate_private_key(ec.SECP384R1())
    if algorithm == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"unknown key algorithm {algorithm!r}; choose one of {', '.join(KEY_ALGORITHMS)}")


def key_algorithm(key: PrivateKeyTypes) -> str:
    """The name generate_private_key would use for this key, or a descriptive name for others."""
    if isinstance(key, rsa.RSAPrivateKey):
        return f"rsa-{key.key_size}"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return {"secp256r1": "ec-p256", "secp384r1": "ec-p384"}.get(key.curve.name, f"ec-{key.curve.name}")
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "ed25519"
    return type(key).__name__.replace("PrivateKey", "").lower()


def public_key_sha256(key: PrivateKeyTypes) -> str:
    """SHA-256 of the key's SubjectPublicKeyInfo: the same value a certificate of this key records."""
    return spki_sha256(key.public_key())


def key_matches_certificate(key: PrivateKeyTypes, cert: x509.Certificate) -> bool:
    """THE key-to-certificate match: the key's SubjectPublicKeyInfo is the certificate's. False for a
    key or certificate whose public key cannot be compared (an unsupported algorithm)."""
    try:
        return public_key_sha256(key) == spki_sha256(cert.public_key())
    except (ValueError, TypeError):
        return False


_SIGNING_KEY_CLASSES = typing.get_args(CertificateIssuerPrivateKeyTypes)  # those of the installed cryptography


def can_sign_certificates(key: PrivateKeyTypes) -> typing.TypeGuard[CertificateIssuerPrivateKeyTypes]:
    """Whether ``key`` is of a kind that signs certificates and CSRs (not DH, X25519, X448 or ML-KEM)."""
    return isinstance(key, _SIGNING_KEY_CLASSES)


def private_key_der(key: PrivateKeyTypes) -> bytes:
    """Unencrypted PKCS#8 DER. Callers must encrypt it or hand it only to an explicit export."""
    return key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
