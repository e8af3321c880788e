"""Private keys at rest.

Envelope encryption: each key's PKCS#8 DER is sealed with AES-256-GCM under its own random data key,
and the data key is sealed under the operator's master key (CERTPILOT_MASTER_KEY, a key file, or by
default a file of mode 0600 created in CERTPILOT_HOME). Both seals are bound to the key's id, so a
ciphertext cannot be moved to another row. Rotating the master key re-seals only the data keys.
Destroying a key erases its ciphertext and data key (crypto-shredding; SQLite runs with
secure_delete so the freed pages are zeroed too).

With CERTPILOT_MASTER_KEY_KMS the master key is itself an envelope key of a key management service
(AWS KMS): a 32-byte data key that KMS generates, kept on disk only as its KMS ciphertext (a small JSON
file of mode 0600 beside where the key file would be, ``master.key.kms`` by default) and decrypted by
KMS each time the key ring loads, so the plaintext master key lives only in memory. The core does no
network: it calls a ``KeyManagementService`` it is given (connectors.kms.AwsKms), and the layers above
load the ring through connectors.kms.load_key_ring. KMS calls happen before anything is written, so a
KMS that does not answer or refuses fails the load or the rotation and changes nothing.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import os
import uuid
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import sqlalchemy as sa

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlmodel import Session, col, select

from certpilot import audit
from certpilot.clock import utcnow
from certpilot.errors import MasterKeyError, NotFoundError, ServiceError, TransientError
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
    _create_private_file(path, key.encoded() + "\n")


def _create_private_file(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.link(staging, path)  # atomic, and fails if path exists
    finally:
        os.unlink(staging)


def _read_private_file(path: Path, what: str) -> str:
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise MasterKeyError(f"{what} {path} is readable by others (mode {mode:04o}): chmod 600 it")
    return path.read_text()


def read_master_key_file(path: Path) -> MasterKey:
    return parse_master_key(_read_private_file(path, "master key file"), f"master key file {path}")


def pending_key_file(settings: Settings) -> Path:
    return settings.master_key_file.with_name(settings.master_key_file.name + ".next")


def load_key_ring(settings: Settings, announce: Callable[[str], None] | None = None,
                  kms: KeyManagementService | None = None) -> KeyRing:
    """The configured master key. With none configured, the embedded default creates one and says so.

    With CERTPILOT_MASTER_KEY_KMS the master key is opened by ``kms`` (required then; the layers above
    the core call connectors.kms.load_key_ring, which builds it from the settings)."""
    if settings.master_key_kms:
        return _kms_key_ring(settings, _required(settings, kms), announce, rotating=False)
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


# ------------------------------------------------------------------------------------------ master key in a KMS

KMS_CONTEXT = {"certpilot": "master key"}  # the encryption context every KMS call binds the master key to
_KMS_FILE_FORMAT = "certpilot kms-wrapped master key 1"


class MasterKeyUnavailableError(TransientError):
    """The key management service that holds the master key did not answer (not reached, timed out,
    throttled, failing): the key ring cannot load now, and nothing was changed. Worth retrying."""


@dataclass(frozen=True)
class KmsDataKey:
    """What KMS GenerateDataKey returns: the plaintext (memory only), its ciphertext under the KMS key,
    and that KMS key's ARN (the key the ciphertext names, whatever alias was asked for)."""

    plaintext: bytes = field(repr=False)
    ciphertext: bytes
    kms_key_arn: str


class KeyManagementService(Protocol):
    """A KMS that keeps the master key as an envelope key (connectors.kms.AwsKms for AWS KMS).

    Failures are certpilot.errors.ServiceUnavailableError (transient: not reached, timed out, throttled,
    5xx) or ServiceRefusedError (permanent: access denied, key disabled, deleted or unknown, a ciphertext
    it does not take), each naming the KMS key and the failure, never a key's bytes."""

    def generate_data_key(self, kms_key_id: str, context: dict[str, str]) -> KmsDataKey: ...

    def decrypt(self, kms_key_id: str, ciphertext: bytes, context: dict[str, str]) -> bytes: ...


@dataclass(frozen=True)
class KmsKeyFile:
    """The content of a ``master.key.kms`` file: the master key's KMS ciphertext, the ARN of the KMS key
    that opens it, and the master key's id (so it can be named without asking KMS). No plaintext."""

    kms_key_arn: str
    master_key_id: str
    ciphertext: bytes = field(repr=False)

    def text(self) -> str:
        return json.dumps({"format": _KMS_FILE_FORMAT, "kms_key_arn": self.kms_key_arn,
                           "master_key_id": self.master_key_id,
                           "ciphertext": base64.b64encode(self.ciphertext).decode("ascii")}, indent=1) + "\n"


def kms_key_file(settings: Settings) -> Path:
    """Where the KMS-wrapped master key is kept: the master key file's place with ``.kms`` added."""
    return settings.master_key_file.with_name(settings.master_key_file.name + ".kms")


def pending_kms_key_file(settings: Settings) -> Path:
    place = kms_key_file(settings)
    return place.with_name(place.name + ".next")


def write_kms_key_file(path: Path, wrapped: KmsKeyFile) -> None:
    """Create ``path`` (mode 0600), complete or not at all, never over an existing file (FileExistsError)."""
    _create_private_file(path, wrapped.text())


def read_kms_key_file(path: Path) -> KmsKeyFile:
    text = _read_private_file(path, "KMS master key file")
    try:
        data = json.loads(text)
        if data.get("format") != _KMS_FILE_FORMAT:
            raise ValueError(f"format {data.get('format')!r}")
        return KmsKeyFile(str(data["kms_key_arn"]), str(data["master_key_id"]),
                          base64.b64decode(data["ciphertext"], validate=True))
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as exc:
        raise MasterKeyError(f"KMS master key file {path} is not readable: {type(exc).__name__}") from None


def _kms_failure(exc: ServiceError, kms_key: str, what: str) -> Exception:
    if isinstance(exc, TransientError):
        return MasterKeyUnavailableError(f"cannot {what}: KMS key {kms_key} did not answer, and nothing was "
                                         f"changed: {exc}")
    return MasterKeyError(f"cannot {what}: KMS key {kms_key} refused, and nothing was changed: {exc}")


def new_kms_master_key(kms: KeyManagementService, kms_key_id: str) -> tuple[MasterKey, KmsKeyFile]:
    """A new master key generated by KMS under ``kms_key_id``, and the file content that keeps it."""
    try:
        data_key = kms.generate_data_key(kms_key_id, dict(KMS_CONTEXT))
    except ServiceError as exc:
        raise _kms_failure(exc, kms_key_id, "generate a new master key") from exc
    if len(data_key.plaintext) != 32:
        raise MasterKeyError(f"KMS key {kms_key_id} returned a data key of {len(data_key.plaintext)} bytes, not 32")
    key = MasterKey(data_key.plaintext)
    return key, KmsKeyFile(data_key.kms_key_arn, key.id, data_key.ciphertext)


def open_kms_key_file(path: Path, kms: KeyManagementService) -> MasterKey:
    """The master key kept in ``path``, decrypted by KMS (into memory only)."""
    wrapped = read_kms_key_file(path)
    try:
        secret = kms.decrypt(wrapped.kms_key_arn, wrapped.ciphertext, dict(KMS_CONTEXT))
    except ServiceError as exc:
        raise _kms_failure(exc, wrapped.kms_key_arn, f"open the master key in {path}") from exc
    key = MasterKey(secret)
    if len(secret) != 32 or key.id != wrapped.master_key_id:
        raise MasterKeyError(f"KMS master key file {path}: KMS key {wrapped.kms_key_arn} opened it, but not to "
                             f"master key {wrapped.master_key_id}: the file was altered")
    return key


def _required(settings: Settings, kms: KeyManagementService | None) -> KeyManagementService:
    if kms is None:
        raise MasterKeyError(f"CERTPILOT_MASTER_KEY_KMS names KMS key {settings.master_key_kms}, but the key ring "
                             "was loaded without a KMS client (load it with connectors.kms.load_key_ring)")
    return kms


def _legacy_key(settings: Settings) -> tuple[MasterKey, str] | None:
    """The master key that CERTPILOT_MASTER_KEY or the master key file holds, if any, and where."""
    if settings.master_key:
        return parse_master_key(settings.master_key, "CERTPILOT_MASTER_KEY"), "CERTPILOT_MASTER_KEY"
    if settings.master_key_file.exists():
        return read_master_key_file(settings.master_key_file), f"master key file {settings.master_key_file}"
    return None


def _kms_key_ring(settings: Settings, kms: KeyManagementService, announce: Callable[[str], None] | None,
                  rotating: bool) -> KeyRing:
    """The ring when the master key is in KMS. Primary: the key in ``master.key.kms``; before the first
    rotation into KMS has finished, the key it is moving from (CERTPILOT_MASTER_KEY or the key file).
    Others: a rotation's pending key (``master.key.kms.next``), which an interrupted rotation left."""
    place, staged = kms_key_file(settings), pending_kms_key_file(settings)
    kms_key = settings.master_key_kms or ""
    if place.exists():
        primary = open_kms_key_file(place, kms)
    elif (legacy := _legacy_key(settings)) is not None:
        primary, where = legacy
        if not rotating and not staged.exists():
            raise MasterKeyError(f"CERTPILOT_MASTER_KEY_KMS names KMS key {kms_key}, but the master key is still "
                                 f"the one in {where} (id {primary.id}) and {place} does not exist: run "
                                 "`certpilot keys rotate-master` to move the master key into KMS")
    elif settings.master_key_file_is_default:
        primary, wrapped = new_kms_master_key(kms, kms_key)
        try:
            write_kms_key_file(place, wrapped)
        except FileExistsError:  # another process created it first: use that one
            primary = open_kms_key_file(place, kms)
        else:
            if announce:
                announce(f"created master key {primary.id} with KMS key {wrapped.kms_key_arn}, kept as its KMS "
                         f"ciphertext in {place} (mode 0600). Back the file up: stored private keys cannot be "
                         "decrypted without it and without Decrypt permission on the KMS key.")
    else:
        raise MasterKeyError(f"CERTPILOT_MASTER_KEY_KMS names KMS key {kms_key}, but {place} (the KMS master key "
                             "file beside CERTPILOT_MASTER_KEY_FILE) does not exist")
    others = (open_kms_key_file(staged, kms),) if staged.exists() else ()
    return KeyRing(primary, others)


@dataclass(frozen=True)
class MasterKeySource:
    """Where a master key lives, named without opening it (no KMS call)."""

    id: str
    kind: str  # "environment", "file" or "kms"
    where: str  # CERTPILOT_MASTER_KEY, the key file's path, or the ARN of the KMS key that opens it
    file: Path | None = None  # the file that keeps it: the key itself, or its KMS ciphertext
    pending: bool = False  # a rotation's new key, not yet put in place

    def __str__(self) -> str:
        text = {"environment": f"environment {self.where}", "file": f"file {self.where}",
                "kms": f"KMS key {self.where} (ciphertext in {self.file})"}.get(self.kind, self.where)
        return text + (", pending rotation" if self.pending else "")


def master_key_sources(settings: Settings) -> tuple[MasterKeySource, ...]:
    """Every master key this configuration can name and where it lives: the KMS files (and a pending
    one), CERTPILOT_MASTER_KEY or the key file, and a file rotation's pending key. Read locally only."""
    sources = []
    for path, pending in ((kms_key_file(settings), False), (pending_kms_key_file(settings), True)):
        if path.exists():
            wrapped = read_kms_key_file(path)
            sources.append(MasterKeySource(wrapped.master_key_id, "kms", wrapped.kms_key_arn, path, pending))
    if settings.master_key:
        env = parse_master_key(settings.master_key, "CERTPILOT_MASTER_KEY")
        sources.append(MasterKeySource(env.id, "environment", "CERTPILOT_MASTER_KEY"))
    elif settings.master_key_file.exists():
        key_file = settings.master_key_file
        sources.append(MasterKeySource(read_master_key_file(key_file).id, "file", str(key_file), key_file))
    pending_file = pending_key_file(settings)
    if pending_file.exists():
        sources.append(MasterKeySource(read_master_key_file(pending_file).id, "file", str(pending_file),
                                       pending_file, pending=True))
    return tuple(sources)


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
    kms_key_arn: str | None = None  # the KMS key that holds the new master key, when it is in KMS
    retired: str | None = None  # where the master key moved into KMS was (its file or CERTPILOT_MASTER_KEY)


def rotate_master_key(engine: sa.Engine, settings: Settings, actor: audit.Actor,
                      new_key_file: Path | None = None, kms: KeyManagementService | None = None) -> Rotation:
    """Generate a new master key, re-seal every stored key under it, then put it in place.

    With a key file (the default), the new key is written beside it as ``<file>.next`` (mode 0600),
    every data key is re-sealed in one transaction, and only then does ``.next`` replace the file.
    A crash in between loses nothing: the ring reads ``.next`` too, and the next rotation finishes.
    With CERTPILOT_MASTER_KEY in the environment, ``new_key_file`` is required; the operator then
    points CERTPILOT_MASTER_KEY or CERTPILOT_MASTER_KEY_FILE at the new key.

    With CERTPILOT_MASTER_KEY_KMS (``kms`` required), the new master key is a new KMS data key under
    the KMS key it names, and the same dance runs with ``master.key.kms.next`` and ``master.key.kms``:
    from a file or environment key into KMS, or from one KMS data key (or KMS key) to another.
    """
    from certpilot.database import write_session

    if settings.master_key_kms:
        if new_key_file is not None:
            raise MasterKeyError(f"the master key goes into KMS key {settings.master_key_kms}, its ciphertext into "
                                 f"{kms_key_file(settings)}: a new key file is not used (leave out --new-key-file)")
        return _rotate_into_kms(engine, settings, actor, _required(settings, kms))
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


def _rotate_into_kms(engine: sa.Engine, settings: Settings, actor: audit.Actor,
                     kms: KeyManagementService) -> Rotation:
    from certpilot.database import write_session

    place, staged = kms_key_file(settings), pending_kms_key_file(settings)
    ring = _kms_key_ring(settings, kms, None, rotating=True)  # every KMS call is made before anything is written
    legacy = None if place.exists() else _legacy_key(settings)
    if ring.others:  # finish an interrupted rotation
        new, arn = ring.others[0], read_kms_key_file(staged).kms_key_arn
    else:
        new, wrapped = new_kms_master_key(kms, settings.master_key_kms or "")
        write_kms_key_file(staged, wrapped)
        arn = wrapped.kms_key_arn
    with write_session(engine) as session:
        count = rewrap_all(session, ring, new, actor)
    os.replace(staged, place)
    return Rotation(ring.primary.id, new.id, count, place, arn, legacy[1] if legacy else None)


def shred(engine: sa.Engine, ref: KeyRef, actor: audit.Actor) -> None:
    """Destroy a key and leave no copy of its sealed bytes in the database's files."""
    from certpilot.database import checkpoint, write_session

    with write_session(engine) as session:
        destroy_private_key(session, ref, actor)
    checkpoint(engine)
