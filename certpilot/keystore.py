"""Private keys at rest.

Envelope encryption: each key's PKCS#8 DER is sealed with AES-256-GCM under its own random data key,
and the data key is sealed under the operator's master key (CERTPILOT_MASTER_KEY, a key file, or by
default a file of mode 0600 created in CERTPILOT_HOME). Both seals are bound to the key's id, so a
ciphertext cannot be moved to another row. Rotating the master key re-seals only the data keys.
Destroying a key erases its ciphertext and data key (crypto-shredding; SQLite runs with
secure_delete so the freed pages are zeroed too).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlmodel import Session, col, select

from certpilot import audit
from certpilot.clock import utcnow
from certpilot.errors import MasterKeyError, NotFoundError
from certpilot.keys import key_algorithm, private_key_der, public_key_sha256
from certpilot.models import PrivateKey
from certpilot.settings import Settings

_NONCE = 12


@dataclass(frozen=True)
class MasterKey:
    secret: bytes = field(repr=False)

    @property
    def id(self) -> str:
        return hashlib.sha256(b"certpilot master key id\0" + self.secret).hexdigest()[:16]

    def encoded(self) -> str:
        return base64.urlsafe_b64encode(self.secret).decode("ascii")


@dataclass(frozen=True)
class KeyRing:
    """The master key new keys are sealed with, and any other key a stored row may still name."""

    primary: MasterKey
    others: tuple[MasterKey, ...] = ()

    def find(self, master_key_id: str) -> MasterKey:
        for key in (self.primary, *self.others):
            if key.id == master_key_id:
                return key
        raise MasterKeyError(f"a stored key was sealed with master key {master_key_id}, but the configured "
                             f"master key is {self.primary.id}: configure the master key it was sealed with")


@dataclass(frozen=True)
class KeyRef:
    """How tasks, flows and other rows refer to a private key: by id, never by value."""

    id: str

    def __str__(self) -> str:
        return f"key:{self.id}"


def generate_master_key() -> MasterKey:
    return MasterKey(AESGCM.generate_key(bit_length=256))


def parse_master_key(text: str, where: str) -> MasterKey:
    try:
        secret = base64.urlsafe_b64decode(text.strip().encode("ascii"))
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise MasterKeyError(f"{where} is not URL-safe base64") from None
    if len(secret) != 32:
        raise MasterKeyError(f"{where} must hold 32 bytes in URL-safe base64, not {len(secret)}")
    return MasterKey(secret)


def write_master_key_file(path: Path, key: MasterKey) -> None:
    """Create ``path`` with mode 0600, complete or not at all; never overwrite an existing key file
    (FileExistsError). Written beside it first and linked into place, so no reader sees it half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(key.encoded() + "\n")
        os.link(staging, path)  # atomic, and fails if path exists
    finally:
        os.unlink(staging)


def read_master_key_file(path: Path) -> MasterKey:
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise MasterKeyError(f"master key file {path} is readable by others (mode {mode:04o}): chmod 600 it")
    return parse_master_key(path.read_text(), f"master key file {path}")


def pending_key_file(settings: Settings) -> Path:
    return settings.master_key_file.with_name(settings.master_key_file.name + ".next")


def load_key_ring(settings: Settings, announce: Callable[[str], None] | None = None) -> KeyRing:
    """The configured master key. With none configured, the embedded default creates one and says so."""
    if settings.master_key:
        primary = parse_master_key(settings.master_key, "CERTPILOT_MASTER_KEY")
    elif settings.master_key_file.exists():
        primary = read_master_key_file(settings.master_key_file)
    elif settings.master_key_file_is_default:
        primary = generate_master_key()
        try:
            write_master_key_file(settings.master_key_file, primary)
        except FileExistsError:  # another process created it first: use that one
            primary = read_master_key_file(settings.master_key_file)
        else:
            if announce:
                announce(f"created master key file {settings.master_key_file} (mode 0600). Back it up: stored "
                         "private keys cannot be decrypted without it. Set CERTPILOT_MASTER_KEY or "
                         "CERTPILOT_MASTER_KEY_FILE to provide your own.")
    else:
        raise MasterKeyError(f"CERTPILOT_MASTER_KEY_FILE names {settings.master_key_file}, which does not exist")
    pending = pending_key_file(settings)
    others = (read_master_key_file(pending),) if pending.exists() else ()
    return KeyRing(primary, others)


def _seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    nonce = os.urandom(_NONCE)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def _open(key: bytes, sealed: bytes, aad: bytes) -> bytes:
    return AESGCM(key).decrypt(sealed[:_NONCE], sealed[_NONCE:], aad)


def _aad(key_id: str, master_key_id: str | None = None) -> bytes:
    return f"certpilot private key {key_id} {master_key_id or ''}".encode("ascii")


def find_key(session: Session, spki_sha256: str) -> KeyRef | None:
    row = session.exec(select(PrivateKey.id).where(col(PrivateKey.spki_sha256) == spki_sha256,
                                                   col(PrivateKey.destroyed_at).is_(None))).first()
    return KeyRef(row) if row else None


def store_private_key(session: Session, key: PrivateKeyTypes, ring: KeyRing, actor: audit.Actor,
                      origin: str, now: dt.datetime | None = None) -> KeyRef:
    """Seal and store ``key`` (once: a key already stored is found by its public key)."""
    spki = public_key_sha256(key)
    existing = find_key(session, spki)
    if existing:
        return existing
    now = now or utcnow()
    key_id = uuid.uuid4().hex
    data_key = AESGCM.generate_key(bit_length=256)
    row = PrivateKey(id=key_id, algorithm=key_algorithm(key), spki_sha256=spki, origin=origin,
                     master_key_id=ring.primary.id,
                     ciphertext=_seal(data_key, private_key_der(key), _aad(key_id)),
                     wrapped_data_key=_seal(ring.primary.secret, data_key, _aad(key_id, ring.primary.id)),
                     created_at=now)
    session.add(row)
    session.flush()
    audit.append(session, actor, [audit.Change("key.stored", f"key:{key_id}",
                                               {"algorithm": row.algorithm, "spki_sha256": spki, "origin": origin})], now)
    return KeyRef(key_id)


def load_private_key(session: Session, ref: KeyRef, ring: KeyRing) -> PrivateKeyTypes:
    """Decrypt one key. Call it only in the function that uses the key, and let the key go after."""
    row = session.get(PrivateKey, ref.id)
    if row is None:
        raise NotFoundError(f"no private key {ref}")
    if row.destroyed_at is not None or row.ciphertext is None or row.wrapped_data_key is None:
        raise NotFoundError(f"private key {ref} was destroyed at {row.destroyed_at:%Y-%m-%d %H:%M:%S} UTC")
    master = ring.find(row.master_key_id or "")
    try:
        data_key = _open(master.secret, row.wrapped_data_key, _aad(row.id, row.master_key_id))
        der = _open(data_key, row.ciphertext, _aad(row.id))
    except Exception:  # InvalidTag: never say more than that it failed
        raise MasterKeyError(f"private key {ref} failed authentication: wrong master key or altered row") from None
    return serialization.load_der_private_key(der, password=None)


def destroy_private_key(session: Session, ref: KeyRef, actor: audit.Actor, now: dt.datetime | None = None) -> None:
    row = session.get(PrivateKey, ref.id)
    if row is None:
        raise NotFoundError(f"no private key {ref}")
    if row.destroyed_at is not None:
        return
    now = now or utcnow()
    row.ciphertext = None
    row.wrapped_data_key = None
    row.destroyed_at = now
    session.add(row)
    session.flush()
    audit.append(session, actor, [audit.Change("key.destroyed", str(ref), {"spki_sha256": row.spki_sha256})], now)


def rewrap_all(session: Session, ring: KeyRing, new: MasterKey, actor: audit.Actor) -> int:
    """Re-seal every live key's data key under ``new``. Returns how many keys were re-sealed."""
    rows = session.exec(select(PrivateKey).where(col(PrivateKey.destroyed_at).is_(None))).all()
    count = 0
    for row in rows:
        if row.master_key_id == new.id or row.wrapped_data_key is None:
            continue
        old = ring.find(row.master_key_id or "")
        try:
            data_key = _open(old.secret, row.wrapped_data_key, _aad(row.id, row.master_key_id))
        except Exception:
            raise MasterKeyError(f"private key key:{row.id} failed authentication during rotation") from None
        row.wrapped_data_key = _seal(new.secret, data_key, _aad(row.id, new.id))
        row.master_key_id = new.id
        session.add(row)
        count += 1
    session.flush()
    audit.append(session, actor, [audit.Change("master_key.rotated", f"master_key:{new.id}",
                                               {"from": ring.primary.id, "to": new.id, "keys": count})])
    return count


@dataclass(frozen=True)
class Rotation:
    old_id: str
    new_id: str
    keys: int
    key_file: Path


def rotate_master_key(engine: sa.Engine, settings: Settings, actor: audit.Actor,
                      new_key_file: Path | None = None) -> Rotation:
    """Generate a new master key, re-seal every stored key under it, then put it in place.

    With a key file (the default), the new key is written beside it as ``<file>.next`` (mode 0600),
    every data key is re-sealed in one transaction, and only then does ``.next`` replace the file.
    A crash in between loses nothing: the ring reads ``.next`` too, and the next rotation finishes.
    With CERTPILOT_MASTER_KEY in the environment, ``new_key_file`` is required; the operator then
    points CERTPILOT_MASTER_KEY or CERTPILOT_MASTER_KEY_FILE at the new key.
    """
    from certpilot.database import write_session

    ring = load_key_ring(settings)
    if settings.master_key:
        if new_key_file is None:
            raise MasterKeyError("the master key comes from CERTPILOT_MASTER_KEY: give --new-key-file PATH "
                                 "for the new key, then update the environment")
        new = generate_master_key()
        write_master_key_file(new_key_file, new)
        staged, final = new_key_file, new_key_file
    else:
        staged, final = pending_key_file(settings), settings.master_key_file
        new = ring.others[0] if ring.others else generate_master_key()  # finish an interrupted rotation
        if not ring.others:
            write_master_key_file(staged, new)
    with write_session(engine) as session:
        count = rewrap_all(session, ring, new, actor)
    if staged != final:
        os.replace(staged, final)
    return Rotation(ring.primary.id, new.id, count, final)


def shred(engine: sa.Engine, ref: KeyRef, actor: audit.Actor) -> None:
    """Destroy a key and leave no copy of its sealed bytes in the database's files."""
    from certpilot.database import checkpoint, write_session

    with write_session(engine) as session:
        destroy_private_key(session, ref, actor)
    checkpoint(engine)
