"""Importing certificates (and, when asked, their keys) from files, directories and stdin.

Each file is a unit: it is parsed whole before anything of it is written, so a bad file writes
nothing and never stops the files beside it. Parsed files are written in batches of about
``batch_size`` certificates per transaction. A private key is stored (encrypted) only with
``import_keys`` and only when it belongs to a certificate of the import or of the inventory.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from sqlmodel import Session

from certpilot import audit, keystore
from certpilot.database import write_session
from certpilot.errors import CertpilotError, KeyMismatchError, ParseError
from certpilot.formats import load_bundle
from certpilot.inventory import Observation, upsert
from certpilot.keys import public_key_sha256
from certpilot.models import Certificate
from certpilot.x509info import CertificateRecord, describe_certificate

# Files a directory walk considers; a file named on the command line is always read.
CERTIFICATE_SUFFIXES = frozenset({".pem", ".crt", ".cer", ".cert", ".der", ".p7b", ".p7c", ".p7", ".p12",
                                  ".pfx", ".key", ".chain", ".bundle", ".ca-bundle", ".fullchain"})
DEFAULT_MAX_BYTES = 16 * 1024 * 1024
STDIN = "-"


@dataclass(frozen=True)
class ImportOptions:
    owner: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    password: bytes | None = field(default=None, repr=False)
    import_keys: bool = False
    max_bytes: int = DEFAULT_MAX_BYTES
    source: str = "import"
    batch_size: int = 1000


@dataclass(frozen=True)
class FileResult:
    source: str
    status: str  # imported, skipped, failed
    certificates: tuple[str, ...] = ()  # fingerprints found
    new_certificates: int = 0
    keys_found: int = 0
    keys_stored: int = 0
    error: str | None = None
    notes: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, object]:
        return {"source": self.source, "status": self.status, "certificates": list(self.certificates),
                "new_certificates": self.new_certificates, "keys_found": self.keys_found,
                "keys_stored": self.keys_stored, "error": self.error, "notes": list(self.notes)}


@dataclass(frozen=True)
class ImportReport:
    files: tuple[FileResult, ...]

    @property
    def failed(self) -> int:
        return sum(f.status == "failed" for f in self.files)

    @property
    def certificates(self) -> int:
        return len({fp for f in self.files for fp in f.certificates})

    @property
    def new_certificates(self) -> int:
        return sum(f.new_certificates for f in self.files)

    @property
    def keys_stored(self) -> int:
        return sum(f.keys_stored for f in self.files)

    def summary(self) -> dict[str, int]:
        return {"files": len(self.files), "failed": self.failed, "certificates": self.certificates,
                "new_certificates": self.new_certificates, "keys_stored": self.keys_stored}


@dataclass
class _ParsedFile:
    source: str
    locator: str | None
    records: list[CertificateRecord]
    keys: list[PrivateKeyTypes] = field(repr=False)  # each paired with a record of this file, or key-only
    notes: list[str]


def iter_files(paths: Sequence[str]) -> Iterator[tuple[str, str | None]]:
    """(path, error) for every file to read: named files as given, directories walked for certificate files."""
    for raw in paths:
        if raw == STDIN:
            yield STDIN, None
            continue
        path = Path(raw)
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    if Path(name).suffix.lower() in CERTIFICATE_SUFFIXES:
                        yield os.path.join(root, name), None
        elif path.is_file():
            yield raw, None
        elif path.exists():
            yield raw, "not a regular file or directory"
        else:
            yield raw, "no such file or directory"


def read_input(source: str, max_bytes: int, stdin: Callable[[int], bytes] | None = None) -> bytes:
    if source == STDIN:
        if stdin is None:
            raise ParseError("no standard input to read", source)
        data = stdin(max_bytes + 1)
    else:
        try:
            with open(source, "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                if size > max_bytes:
                    raise ParseError(f"file is {size:,} bytes, more than the {max_bytes:,}-byte limit", source)
                # Ask for what stat reported (asking for max_bytes allocates that much), then for the
                # rest in case the file grew since.
                data = handle.read(size + 1)
                if len(data) > size:
                    data += handle.read(max_bytes + 1 - len(data))
        except OSError as exc:
            raise ParseError(f"cannot read: {exc.strerror}", source) from None
    if len(data) > max_bytes:
        raise ParseError(f"input is more than the {max_bytes:,}-byte limit", source)
    return data


def parse_file(data: bytes, source: str, options: ImportOptions, *,
               resolved_dirs: dict[str, str] | None = None) -> _ParsedFile:
    """Parse one file whole. Raises ParseError or KeyMismatchError; never returns half a file."""
    bundle = load_bundle(data, source=source, password=options.password)
    records = [describe_certificate(c) for c in bundle.certificates]
    notes = list(bundle.notes) + [f"certificate {r.fingerprint_sha256[:16]}: {n}" for r in records for n in r.notes]
    certificate_keys = {r.spki_sha256 for r in records}
    for key in bundle.private_keys:
        spki = public_key_sha256(key)
        if records and spki not in certificate_keys:
            raise KeyMismatchError(spki, [r.fingerprint_sha256 for r in records])
    if bundle.is_empty:
        notes.append("no certificate or private key in this file")
    locator = None if source == STDIN else _file_uri(source, resolved_dirs)
    return _ParsedFile(source, locator, records, list(bundle.private_keys), notes)


def _file_uri(source: str, resolved_dirs: dict[str, str] | None = None) -> str:
    """``Path(source).resolve().as_uri()``; with ``resolved_dirs`` (one import's cache), each directory
    is resolved once rather than once per file (only the file itself is checked for a symlink)."""
    directory, name = os.path.split(source)
    if resolved_dirs is None or not name or name in (".", "..") or os.path.islink(source):
        return Path(source).resolve().as_uri()
    directory = directory or "."
    real = resolved_dirs.get(directory)
    if real is None:
        real = resolved_dirs[directory] = os.path.realpath(directory)
    return Path(os.path.join(real, name)).as_uri()


def import_paths(engine: sa.Engine, paths: Sequence[str], options: ImportOptions, actor: audit.Actor, *,
                 key_ring: Callable[[], keystore.KeyRing] | None = None,
                 stdin: Callable[[int], bytes] | None = None,
                 on_file: Callable[[FileResult | None], None] | None = None,
                 now: dt.datetime | None = None) -> ImportReport:
    """Import every file under ``paths``. ``on_file`` is called once per file read (for progress bars)."""
    results: dict[str, FileResult] = {}
    order: list[str] = []
    pending: list[_ParsedFile] = []
    key_only: list[_ParsedFile] = []
    pending_certs = 0
    ring_cache: list[keystore.KeyRing] = []
    resolved_dirs: dict[str, str] = {}  # directory -> its real path, for this import only

    def ring() -> keystore.KeyRing:
        if not ring_cache:
            if key_ring is None:
                raise CertpilotError("storing keys needs a master key, and none was provided")
            ring_cache.append(key_ring())
        return ring_cache[0]

    def finish(result: FileResult) -> None:
        results[result.source] = result
        if on_file:
            on_file(result)

    def flush() -> None:
        nonlocal pending, pending_certs
        if pending:
            for result in _write_batch(engine, pending, options, actor, ring, now):
                finish(result)
        pending, pending_certs = [], 0

    for source, error in iter_files(paths):
        order.append(source)
        if error:
            finish(FileResult(source, "failed", error=error))
            continue
        try:
            parsed = parse_file(read_input(source, options.max_bytes, stdin), source, options, resolved_dirs=resolved_dirs)
        except (ParseError, KeyMismatchError) as exc:
            detail = exc.detail if isinstance(exc, ParseError) else str(exc)
            finish(FileResult(source, "failed", error=detail))
            continue
        if not parsed.records:
            if parsed.keys:
                key_only.append(parsed)  # paired once every certificate of the import is in
            else:
                finish(FileResult(source, "skipped", notes=tuple(parsed.notes)))
            continue
        pending.append(parsed)
        pending_certs += len(parsed.records)
        if pending_certs >= options.batch_size:
            flush()
    flush()
    for parsed in key_only:
        finish(_store_key_only(engine, parsed, options, actor, ring, now))
    return ImportReport(tuple(results[s] for s in dict.fromkeys(order) if s in results))


def _write_batch(engine: sa.Engine, batch: list[_ParsedFile], options: ImportOptions, actor: audit.Actor,
                 ring: Callable[[], keystore.KeyRing], now: dt.datetime | None) -> list[FileResult]:
    observations = [Observation(r, p.locator, options.source) for p in batch for r in p.records]
    try:
        with write_session(engine) as session:
            outcome = upsert(session, observations, actor, owner=options.owner, tags=options.tags, now=now)
            stored: dict[str, int] = {}
            if options.import_keys:
                for parsed in batch:
                    stored[parsed.source] = _store_keys(session, parsed.keys, ring, actor, now)
    except (CertpilotError, sa.exc.SQLAlchemyError) as exc:
        message = f"not written: {exc.__class__.__name__}: {str(exc).splitlines()[0][:300]}"
        return [FileResult(p.source, "failed", error=message) for p in batch]
    claimed: set[str] = set()
    results = []
    for parsed in batch:
        fps = tuple(dict.fromkeys(r.fingerprint_sha256 for r in parsed.records))
        new = [fp for fp in fps if fp in outcome.new and fp not in claimed]
        claimed.update(new)
        notes = list(parsed.notes)
        if parsed.keys and not options.import_keys:
            notes.append(f"{len(parsed.keys)} private key(s) found and not stored (import with --import-keys to store them encrypted)")
        results.append(FileResult(parsed.source, "imported", fps, len(new), len(parsed.keys),
                                  stored.get(parsed.source, 0), notes=tuple(notes)))
    return results


def _store_keys(session: Session, keys: list[PrivateKeyTypes], ring: Callable[[], keystore.KeyRing],
                actor: audit.Actor, now: dt.datetime | None) -> int:
    """Store each key not stored yet; returns how many were new (the same key often sits in several files)."""
    new = 0
    for key in keys:
        if keystore.find_key(session, public_key_sha256(key)) is None:
            keystore.store_private_key(session, key, ring(), actor, "imported", now)
            new += 1
    return new


def _store_key_only(engine: sa.Engine, parsed: _ParsedFile, options: ImportOptions, actor: audit.Actor,
                    ring: Callable[[], keystore.KeyRing], now: dt.datetime | None) -> FileResult:
    """A file holding only keys: stored when asked to and when each belongs to a known certificate."""
    result = FileResult(parsed.source, "imported", keys_found=len(parsed.keys), notes=tuple(parsed.notes))
    if not options.import_keys:
        return replace(result, status="skipped", notes=result.notes + (
            f"{len(parsed.keys)} private key(s) found and not stored (import with --import-keys to store them encrypted)",))
    try:
        with write_session(engine) as session:
            orphans = []
            for key in parsed.keys:
                spki = public_key_sha256(key)
                known = session.execute(sa.select(Certificate.fingerprint_sha256)
                                        .where(Certificate.spki_sha256 == spki).limit(1)).first()
                if known is None:
                    orphans.append(spki)
            paired = [k for k in parsed.keys if public_key_sha256(k) not in orphans]
            stored = _store_keys(session, paired, ring, actor, now)
    except (CertpilotError, sa.exc.SQLAlchemyError) as exc:
        return replace(result, status="failed", error=f"not written: {str(exc).splitlines()[0][:300]}")
    if orphans:
        return replace(result, status="failed", keys_stored=stored, error=(
            f"{len(orphans)} private key(s) belong to no certificate in this import or the inventory "
            f"(public key sha256 {', '.join(s[:16] for s in orphans)}); not stored"))
    return replace(result, keys_stored=stored)
