"""Private key generation and the checks that tie a key to a certificate.

Functions here take and return key objects in memory; nothing here serialises a key in the clear
except ``private_key_der``, which exists for the keystore's encryption and for explicit exports.
"""

from __future__ import annotations

import typing

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, mldsa, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes, CertificatePublicKeyTypes
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from certpilot.x509info import spki_sha256

ML_DSA_ALGORITHMS = ("ml-dsa-44", "ml-dsa-65", "ml-dsa-87")  # FIPS 204; private CAs only (no public CA, no ACME)
KEY_ALGORITHMS = ("rsa-2048", "rsa-3072", "rsa-4096", "ec-p256", "ec-p384", "ed25519", *ML_DSA_ALGORITHMS)
_ML_DSA_KEYS: dict[str, type[mldsa.MLDSA44PrivateKey | mldsa.MLDSA65PrivateKey | mldsa.MLDSA87PrivateKey]] = {
    "ml-dsa-44": mldsa.MLDSA44PrivateKey, "ml-dsa-65": mldsa.MLDSA65PrivateKey, "ml-dsa-87": mldsa.MLDSA87PrivateKey}
_ML_DSA_PUBLIC = {mldsa.MLDSA44PublicKey: "ml-dsa-44", mldsa.MLDSA65PublicKey: "ml-dsa-65",
                  mldsa.MLDSA87PublicKey: "ml-dsa-87"}


def generate_private_key(algorithm: str) -> PrivateKeyTypes:
    if algorithm.startswith("rsa-") and algorithm in KEY_ALGORITHMS:
        return rsa.generate_private_key(public_exponent=65537, key_size=int(algorithm[4:]))
    if algorithm == "ec-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if algorithm == "ec-p384":
        return ec.generate_private_key(ec.SECP384R1())
    if algorithm == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if algorithm in _ML_DSA_KEYS:
        return _ML_DSA_KEYS[algorithm].generate()
    raise ValueError(f"unknown key algorithm {algorithm!r}; choose one of {', '.join(KEY_ALGORITHMS)}")


def key_algorithm(key: PrivateKeyTypes) -> str:
    """The name generate_private_key would use for this key, or a descriptive name for others."""
    if isinstance(key, rsa.RSAPrivateKey):
        return f"rsa-{key.key_size}"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return {"secp256r1": "ec-p256", "secp384r1": "ec-p384"}.get(key.curve.name, f"ec-{key.curve.name}")
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "ed25519"
    ml_dsa = ml_dsa_algorithm(key.public_key())
    if ml_dsa is not None:
        return ml_dsa
    return type(key).__name__.replace("PrivateKey", "").lower()


def ml_dsa_algorithm(public_key: CertificatePublicKeyTypes | object) -> str | None:
    """``ml-dsa-44``, ``ml-dsa-65`` or ``ml-dsa-87`` for an ML-DSA public key; None for any other key."""
    return next((name for cls, name in _ML_DSA_PUBLIC.items() if isinstance(public_key, cls)), None)


def signature_hash(key: PrivateKeyTypes) -> hashes.SHA256 | hashes.SHA384 | None:
    """The hash to sign with ``key``: None for the algorithms that hash internally (Ed25519, Ed448,
    ML-DSA), SHA-384 for an EC key over 256 bits, else SHA-256."""
    if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey) or ml_dsa_algorithm(key.public_key()):
        return None
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.key_size > 256:
        return hashes.SHA384()
    return hashes.SHA256()


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
