"""A PKCS#11 token (an HSM, or SoftHSM2) holding a private CA's key: certpilot.token_keys.KeyToken.

``open_token(spec)`` loads the module, finds the token by its label (a slot's number changes, its
label does not), reads the PIN from where the spec says (an environment variable, or a file that only
its owner may read) and logs in. Keys are made on the token as EC key pairs, CKA_SENSITIVE and not
CKA_EXTRACTABLE; ``sign_digest`` signs a digest with raw CKM_ECDSA (what SoftHSM2 offers) and returns
the DER signature cryptography expects (the token's r || s encoded as an ECDSA-Sig-Value). Every PKCS#11
failure becomes a certpilot.token_keys.TokenError naming the token and what failed; the PIN is never part
of a message or a repr.

PKCS#11 keeps the login per process, not per session: a second login to a logged-in token is refused
(CKR_USER_ALREADY_LOGGED_IN). So a second ``open_token`` of a token this process is logged in to opens
a session in that login, after checking that its PIN is the one the login used (compared as a salted
digest kept for the purpose; the PIN itself is not kept). No Prefect here.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import threading
from pathlib import Path
from typing import Any

import pkcs11
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as p11
from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters

from certpilot.token_keys import CURVES, PinSource, TokenError, TokenKeyInfo, TokenSpec

__all__ = ["Pkcs11Token", "open_token", "read_pin"]

MAX_PIN_BYTES = 256
_SALT = secrets.token_bytes(16)
_logins: dict[tuple[str, str], bytes] = {}  # (module, token label) -> salted digest of the PIN of this process's login
_logins_lock = threading.Lock()


def read_pin(source: PinSource, token: str) -> str:
    """The PIN from ``source``: an environment variable that is set and not empty, or a file of mode
    0600 (or stricter) whose first line is the PIN. TokenError (naming the token and the source, never
    the PIN) otherwise."""
    if source.env is not None:
        value = os.environ.get(source.env, "")
        if not value:
            raise TokenError(token, f"the PIN's environment variable {source.env} is not set")
        return value
    path = Path(source.file or "")
    try:
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise TokenError(token, f"PIN file {path} is readable by others (mode {mode:04o}): chmod 600 it")
        text = path.read_text(encoding="utf-8")[:MAX_PIN_BYTES]
    except OSError as exc:
        raise TokenError(token, f"PIN file {path} cannot be read: {exc.strerror or type(exc).__name__}") from None
    pin = text.splitlines()[0].strip() if text.strip() else ""
    if not pin:
        raise TokenError(token, f"PIN file {path} is empty")
    return pin


def _load(module: str, token: str) -> Any:
    try:
        return pkcs11.lib(module)
    except (p11.PKCS11Error, OSError) as exc:
        detail = str(exc).strip() or type(exc).__name__
        raise TokenError(token, f"PKCS#11 module {module} cannot be loaded ({detail})") from None


class Pkcs11Token:
    """One logged-in session on a token; thread-safe (one operation at a time, as PKCS#11 sessions need)."""

    def __init__(self, spec: TokenSpec, session: Any) -> None:
        self.label = spec.token_label
        self.module = spec.module
        self._session = session
        self._lock = threading.Lock()
        self._keys: dict[str, Any] = {}  # CKA_ID -> private key object, found once (a search costs a millisecond)

    def __repr__(self) -> str:
        return f"Pkcs11Token(label={self.label!r}, module={self.module!r})"

    def __reduce_ex__(self, protocol: object) -> Any:
        raise TypeError("an open PKCS#11 session cannot be pickled")

    def close(self) -> None:
        with self._lock:
            if self._session is not None:
                try:
                    self._session.close()
                except p11.PKCS11Error:
                    pass
                self._session = None

    def __del__(self) -> None:
        self.close()

    def _failed(self, doing: str, exc: BaseException) -> TokenError:
        if isinstance(exc, p11.DeviceRemoved | p11.TokenNotPresent | p11.SessionHandleInvalid | p11.SessionClosed):
            return TokenError(self.label, f"the token was removed or its session lost while {doing}")
        return TokenError(self.label, f"{doing} failed: {type(exc).__name__} {str(exc).strip()}".rstrip())

    def _private(self, key_id: str) -> Any:
        key = self._keys.get(key_id)
        if key is not None:
            return key
        try:
            key = self._keys[key_id] = self._session.get_key(object_class=ObjectClass.PRIVATE_KEY,
                                                             id=bytes.fromhex(key_id))
        except p11.NoSuchKey:
            raise TokenError(self.label, f"no private key with CKA_ID {key_id} on the token") from None
        except p11.PKCS11Error as exc:
            raise self._failed("finding the key", exc) from None
        return key

    def generate_ec_key(self, label: str, curve: str) -> TokenKeyInfo:
        if curve not in CURVES:
            raise TokenError(self.label, f"curve {curve} is not one certpilot makes on a token ({', '.join(CURVES)})")
        key_id = secrets.token_bytes(16)
        with self._lock:
            try:
                params = self._session.create_domain_parameters(
                    KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters(curve)}, local=True)
                public, private = params.generate_keypair(
                    store=True, label=label, id=key_id,
                    private_template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                                      Attribute.SIGN: True, Attribute.PRIVATE: True})
                made_on_token = bool(private[Attribute.LOCAL])
                sensitive = bool(private[Attribute.SENSITIVE])
                extractable = bool(private[Attribute.EXTRACTABLE])
                der = encode_ec_public_key(public)
            except p11.PKCS11Error as exc:
                raise self._failed(f"making an EC {curve} key", exc) from None
        public_key = serialization.load_der_public_key(der)
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
        info = TokenKeyInfo(key_id.hex(), label, public_key, made_on_token, sensitive, extractable)
        if extractable or not sensitive:
            self.destroy_key(info.key_id)
            raise TokenError(self.label, "the token made a key that is extractable or not sensitive: refused")
        return info

    def public_key(self, key_id: str) -> ec.EllipticCurvePublicKey:
        with self._lock:
            self._private(key_id)  # the private key is there, not only its public half
            try:
                public = self._session.get_key(object_class=ObjectClass.PUBLIC_KEY, id=bytes.fromhex(key_id))
                der = encode_ec_public_key(public)
            except p11.NoSuchKey:
                raise TokenError(self.label, f"no public key with CKA_ID {key_id} on the token") from None
            except p11.PKCS11Error as exc:
                raise self._failed("reading a public key", exc) from None
        key = serialization.load_der_public_key(der)
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise TokenError(self.label, f"key {key_id} is not an EC key")
        return key

    def sign_digest(self, key_id: str, digest: bytes) -> bytes:
        with self._lock:
            if self._session is None:
                raise TokenError(self.label, "the session was closed")
            private = self._private(key_id)
            try:
                raw = private.sign(digest, mechanism=Mechanism.ECDSA)
            except p11.PKCS11Error as exc:
                self._keys.pop(key_id, None)
                raise self._failed("signing", exc) from None
        half = len(raw) // 2  # r || s, each as long as the curve's order
        return encode_dss_signature(int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big"))

    def destroy_key(self, key_id: str) -> None:
        with self._lock:
            self._keys.pop(key_id, None)
            for object_class in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
                try:
                    self._session.get_key(object_class=object_class, id=bytes.fromhex(key_id)).destroy()
                except p11.NoSuchKey:
                    continue
                except p11.PKCS11Error as exc:
                    raise self._failed("removing a key", exc) from None


def _pin_digest(pin: str) -> bytes:
    return hashlib.sha256(_SALT + pin.encode("utf-8")).digest()


def open_token(spec: TokenSpec) -> Pkcs11Token:
    """Open and log in to the token ``spec`` names (certpilot.token_keys.TokenOpener)."""
    library = _load(spec.module, spec.token_label)
    try:
        token = library.get_token(token_label=spec.token_label)
    except p11.NoSuchToken:
        raise TokenError(spec.token_label, f"no token with this label in {spec.module} (removed, or never "
                                           "initialised)") from None
    except p11.PKCS11Error as exc:
        raise TokenError(spec.token_label, f"the token cannot be found: {type(exc).__name__}") from None
    pin = read_pin(spec.pin, spec.token_label)
    digest, where = _pin_digest(pin), (spec.module, spec.token_label)
    with _logins_lock:
        try:
            session = token.open(user_pin=pin, rw=True)
        except p11.UserAlreadyLoggedIn:
            known = _logins.get(where)
            if known is None or not hmac.compare_digest(known, digest):
                raise TokenError(spec.token_label, f"wrong PIN (from {spec.pin}): not the one this process logged "
                                                   "in with") from None
            session = token.open(rw=True)
        except (p11.PinIncorrect, p11.PinInvalid, p11.PinLenRange):
            raise TokenError(spec.token_label, f"wrong PIN (from {spec.pin})") from None
        except p11.PinLocked:
            raise TokenError(spec.token_label, "the user PIN is locked: the security officer must unlock it") from None
        except p11.PKCS11Error as exc:
            raise TokenError(spec.token_label, f"logging in failed: {type(exc).__name__}") from None
        _logins[where] = digest
    return Pkcs11Token(spec, session)

