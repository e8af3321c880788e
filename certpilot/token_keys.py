"""CA keys held in a PKCS#11 token (an HSM, or SoftHSM2): made there, never extractable, signing there.

The core does not talk to the token: it names one (``TokenSpec``: the PKCS#11 module, the token's label
and where its PIN comes from, never the PIN itself) and asks a ``TokenOpener`` for a ``KeyToken``, the
small role connectors.pkcs11_token plays. ``TokenECKey`` makes a key on a token look like any EC
private key to cryptography: its ``sign()`` hashes in Python and has the token sign the digest, so the
CA's certificates, CRLs and OCSP responses are signed on the token by the same code that signs with a
key from the keystore. A ``TokenKey`` row records which key (token, label, CKA_ID) and how it was
found at creation (made on the token, not extractable); ``list_token_keys`` lists them for
`certpilot keys list`. No network here, and no PKCS#11.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, Protocol

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils
from cryptography.utils import Buffer
from sqlmodel import Session, col, select

from certpilot.errors import PermanentError
from certpilot.models import CertificateAuthority, TokenKey

__all__ = ["KeyToken", "PinSource", "TokenECKey", "TokenError", "TokenKeyInfo", "TokenKeyListing", "TokenOpener",
           "TokenSpec", "list_token_keys", "open_token_key", "spec_of"]

CURVES: dict[str, ec.EllipticCurve] = {"secp256r1": ec.SECP256R1(), "secp384r1": ec.SECP384R1()}


class TokenError(PermanentError):
    """A PKCS#11 token that cannot do what was asked: its module missing, the token not present, a
    wrong PIN, the key not found, a failed operation. ``token`` names it, ``failure`` says what failed.
    Permanent: retrying a wrong PIN locks a token."""

    def __init__(self, token: str, failure: str) -> None:
        super().__init__(f"PKCS#11 token {token!r}: {failure}")
        self.token = token
        self.failure = failure


@dataclass(frozen=True)
class PinSource:
    """Where a token's user PIN is read when the token is opened: an environment variable or a file
    (mode 0600). The PIN itself is never stored, shown or logged."""

    env: str | None = None
    file: Path | None = None

    def __post_init__(self) -> None:
        if (self.env is None) == (self.file is None):
            raise ValueError("give the PIN's environment variable or its file, one of them")

    def __str__(self) -> str:
        return f"environment variable {self.env}" if self.env else f"PIN file {self.file}"


@dataclass(frozen=True)
class TokenSpec:
    """A token to open: its PKCS#11 module (a shared library path), its label, where its PIN is."""

    module: str
    token_label: str
    pin: PinSource


@dataclass(frozen=True)
class TokenKeyInfo:
    """A key pair made on a token: its CKA_ID (hex), its label, its public key, and its attributes as
    the token reported them after making it."""

    key_id: str
    label: str
    public_key: ec.EllipticCurvePublicKey
    made_on_token: bool  # CKA_LOCAL
    sensitive: bool  # CKA_SENSITIVE
    extractable: bool  # CKA_EXTRACTABLE


class KeyToken(Protocol):
    """An open, logged-in token (connectors.pkcs11_token.Pkcs11Token)."""

    label: str

    def generate_ec_key(self, label: str, curve: str) -> TokenKeyInfo:
        """Make an EC key pair (``curve``: a key of CURVES) on the token, sensitive and not extractable."""
        ...

    def public_key(self, key_id: str) -> ec.EllipticCurvePublicKey:
        """The public key of the pair with CKA_ID ``key_id``; TokenError when the token has no such key."""
        ...

    def sign_digest(self, key_id: str, digest: bytes) -> bytes:
        """An ECDSA signature (DER) of ``digest`` by private key ``key_id``, made on the token."""
        ...

    def destroy_key(self, key_id: str) -> None:
        """Remove key pair ``key_id`` from the token (a CA whose creation failed)."""
        ...


TokenOpener = Callable[[TokenSpec], KeyToken]


def spec_of(row: TokenKey) -> TokenSpec:
    pin = PinSource(env=row.pin_env) if row.pin_env else PinSource(file=Path(row.pin_file or ""))
    return TokenSpec(row.module, row.token_label, pin)


class TokenECKey(ec.EllipticCurvePrivateKey):
    """An EC private key that stays on a token: cryptography calls ``sign()``, which hashes the data in
    Python (or takes a Prehashed digest) and has the token sign the digest (raw CKM_ECDSA). Nothing of
    the private key is ever here: ``private_bytes`` and ``private_numbers`` refuse, and the object can be
    neither pickled nor copied (it holds the logged-in token)."""

    __slots__ = ("_token", "_key_id", "_public")

    def __init__(self, token: KeyToken, key_id: str, public_key: ec.EllipticCurvePublicKey) -> None:
        self._token = token
        self._key_id = key_id
        self._public = public_key

    def __repr__(self) -> str:
        return f"TokenECKey(token={self._token.label!r}, key_id={self._key_id!r}, curve={self.curve.name})"

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._public.curve

    @property
    def key_size(self) -> int:
        return self._public.curve.key_size

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public

    def sign(self, data: Buffer, signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        if not isinstance(signature_algorithm, ec.ECDSA):
            raise TypeError("a token key signs with ECDSA only")
        algorithm = signature_algorithm.algorithm
        if isinstance(algorithm, utils.Prehashed):
            digest = bytes(data)
        else:
            h = hashes.Hash(algorithm)
            h.update(data)
            digest = h.finalize()
        return self._token.sign_digest(self._key_id, digest)

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        raise TypeError("a CA key on a token signs; it does no key exchange")

    def private_numbers(self) -> NoReturn:
        raise TypeError(f"the key is on PKCS#11 token {self._token.label!r} and cannot be extracted")

    def private_bytes(self, encoding: serialization.Encoding, format: serialization.PrivateFormat,
                      encryption_algorithm: serialization.KeySerializationEncryption) -> NoReturn:
        raise TypeError(f"the key is on PKCS#11 token {self._token.label!r} and cannot be extracted")

    def __copy__(self) -> NoReturn:
        raise TypeError("a token key cannot be copied")

    def __deepcopy__(self, memo: dict[int, object]) -> NoReturn:
        raise TypeError("a token key cannot be copied")

    def __reduce_ex__(self, protocol: object) -> NoReturn:
        raise TypeError("a token key cannot be pickled")


def open_token_key(session: Session, token_key_id: str, tokens: TokenOpener | None, owner: str) -> TokenECKey:
    """The key recorded as TokenKey ``token_key_id`` (``owner`` says whose, for messages), on its
    token opened by ``tokens``: TokenError when there is no opener, or the token cannot be opened or
    has no such key."""
    row = session.get(TokenKey, token_key_id)
    if row is None:
        raise PermanentError(f"{owner}: its key record token_key:{token_key_id} is missing from the inventory")
    if tokens is None:
        raise TokenError(row.token_label, f"{owner}'s key {row.key_label} is on this token, and this command was "
                                          "not given a PKCS#11 connector to reach it")
    token = tokens(spec_of(row))
    return TokenECKey(token, row.key_id, token.public_key(row.key_id))


@dataclass(frozen=True)
class TokenKeyListing:
    """A CA key held in a token, for `certpilot keys list`: where it lives and what it is, never a secret."""

    ca: str
    role: str  # issuing
    token_label: str
    module: str
    key_label: str
    key_id: str
    algorithm: str
    made_on_token: bool
    extractable: bool
    created_at: dt.datetime
    spki_sha256: str


def list_token_keys(session: Session) -> list[TokenKeyListing]:
    """Every CA key held in a token, by CA name; the attributes as the token reported them at creation."""
    rows = session.exec(select(CertificateAuthority.name, TokenKey)
                        .join(TokenKey, col(TokenKey.id) == col(CertificateAuthority.issuing_token_key_id))
                        .order_by(CertificateAuthority.name)).all()
    return [TokenKeyListing(name, "issuing", key.token_label, key.module, key.key_label, key.key_id, key.algorithm,
                            key.made_on_token, key.extractable, key.created_at, key.spki_sha256)
            for name, key in rows]
