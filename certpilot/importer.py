"""Importing certificates (and, when asked, their keys) from files, directories and stdin.

Each file is a unit: it is parsed whole before anything of it is written, so a bad file writes
nothing and never stops the files beside it: whatever fails in reading, parsing, describing or
key matching one file (or in writing it) is that file's error, never the import's. A directory walk
reads regular files only (a FIFO, socket or device is that path's error, never opened), and a
directory it cannot list is that directory's error. Parsed files are written in batches of about
``batch_size`` certificates per transaction. A private key is stored (encrypted) only with
``import_keys`` and only when it belongs to a certificate of the import or of the inventory.

Given a ``policy`` (certpilot.policy), each batch's certificates are then given an owner by its
ownership rules (those without one) and evaluated against its rules, in a transaction of their own
right after the batch's: the violations are stored (certpilot.violations) and the report counts them.
Should that fail, the certificates stay imported and the report says why the policy was not applied.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime as dt
import gc
import itertools
import multiprocessing
import os
import stat
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeAlias

import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from sqlmodel import Session, SQLModel, col

from certpilot import audit, keystore, violations
from certpilot.database import InventoryUnavailableError, write_session
from certpilot.errors import (CertpilotError, InvalidOptionError, KeyMismatchError, ParseError, TransientError,
                              redact)
from certpilot.formats import load_bundle
from certpilot.inventory import Observation, upsert
from certpilot.keys import public_key_sha256
from certpilot.models import Certificate
from certpilot.pem import looks_like_pem
from certpilot.policy import Policy
from certpilot.violations import EvaluationSummary
from certpilot.x509info import VENDOR_ERRORS, CertificateRecord, describe_certificate, vendor_reason

# Files a directory walk considers; a file named on the command line is always read.
CERTIFICATE_SUFFIXES = frozenset({".pem", ".crt", ".cer", ".cert", ".der", ".p7b", ".p7c", ".p7", ".p12",
                                  ".pfx", ".key", ".chain", ".bundle", ".ca-bundle", ".fullchain"})
DEFAULT_MAX_BYTES = 16 * 1024 * 1024
STDIN = "-"
# Large imports parse in worker processes while this process writes: an import of at least
# _POOL_MIN_FILES files, on a machine with more than one CPU. Files go out in chunks of _POOL_CHUNK,
# at most _POOL_AHEAD chunks per worker in flight, so parsed files never pile up in memory.
_POOL_MIN_FILES = 2000
_POOL_CHUNK = 250
_POOL_AHEAD = 4
_POOL_MAX_PROCESSES = 8
# A batch whose database did not answer or dropped the connection (a PostgreSQL restart, a failover) is
# tried again after each of these pauses (about 15 s in all), then its files fail naming the database.
UNAVAILABLE_RETRY_SECONDS = (0.5, 1.0, 2.0, 4.0, 8.0)


@dataclass(frozen=True)
class ImportOptions:
    owner: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    password: bytes | None = field(default=None, repr=False)
    import_keys: bool = False
    max_bytes: int = DEFAULT_MAX_BYTES
    source: str = "import"
    batch_size: int = 1000
    parse_processes: int | None = None  # worker processes that parse large imports; None: one per CPU but one; 0: none

    def __post_init__(self) -> None:
        if isinstance(self.max_bytes, bool) or not isinstance(self.max_bytes, int) or self.max_bytes <= 0:
            raise InvalidOptionError("max_bytes", self.max_bytes, "a positive number of bytes")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size <= 0:
            raise InvalidOptionError("batch_size", self.batch_size, "a positive number of certificates")


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
class ImportFailure:
    """A file that could not be imported, and why (certpilot's own message: no secret in it)."""

    source: str
    error: str


@dataclass
class PolicyTally:
    """What the policy did to an import's certificates: owners assigned by its ownership rules,
    violations found (not waived, per rule), waived ones, and the first error that kept a batch (or a
    certificate) from being evaluated (None: everything was)."""

    owners_assigned: int = 0
    violations: int = 0
    waived: int = 0
    by_rule: dict[str, int] = field(default_factory=dict)
    error: str | None = None

    def add(self, owners: int, summary: EvaluationSummary) -> None:
        self.owners_assigned += owners
        self.violations += summary.violations
        self.waived += summary.waived
        for rule, count in summary.by_rule.items():
            if count:
                self.by_rule[rule] = self.by_rule.get(rule, 0) + count


@dataclass(frozen=True)
class ImportSummary:
    """What an import did, in counts, and each file that failed: public facts only. ``policy_applied``:
    whether a policy was given; ``violations_by_rule`` counts the violations not waived."""

    files: int
    failed: int
    certificates: int
    new_certificates: int
    keys_stored: int
    failures: tuple[ImportFailure, ...] = ()
    policy_applied: bool = False
    owners_assigned: int = 0
    violations: int = 0
    violations_waived: int = 0
    violations_by_rule: dict[str, int] = field(default_factory=dict)
    policy_error: str | None = None

    def as_dict(self) -> dict[str, int]:
        """The counts (the CLI's --json lists each file, failed ones with their error, beside them)."""
        return {"files": self.files, "failed": self.failed, "certificates": self.certificates,
                "new_certificates": self.new_certificates, "keys_stored": self.keys_stored}

    def policy_as_dict(self) -> dict[str, Any] | None:
        """What the policy did (None when none was applied): owners assigned, violations not waived (in all
        and per rule), waived ones, and why it was not applied to every batch (None when it was)."""
        if not self.policy_applied:
            return None
        return {"owners_assigned": self.owners_assigned, "violations": self.violations,
                "violations_by_rule": dict(self.violations_by_rule), "violations_waived": self.violations_waived,
                "error": self.policy_error}


@dataclass(frozen=True)
class ImportReport:
    files: tuple[FileResult, ...]
    policy: PolicyTally | None = None  # None: no policy was applied

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

    def summary(self) -> ImportSummary:
        failures = tuple(ImportFailure(f.source, f.error or "failed") for f in self.files if f.status == "failed")
        summary = ImportSummary(len(self.files), self.failed, self.certificates, self.new_certificates,
                                self.keys_stored, failures)
        if self.policy is None:
            return summary
        return replace(summary, policy_applied=True, owners_assigned=self.policy.owners_assigned,
                       violations=self.policy.violations, violations_waived=self.policy.waived,
                       violations_by_rule=dict(sorted(self.policy.by_rule.items())), policy_error=self.policy.error)


@dataclass
class _ParsedFile:
    source: str
    locator: str | None
    records: list[CertificateRecord]
    keys: list[PrivateKeyTypes] = field(repr=False)  # each paired with a record of this file, or key-only
    notes: list[str]


def iter_files(paths: Sequence[str]) -> Iterator[tuple[str, str | None]]:
    """(path, error) for every file to read: named files as given, directories walked for certificate
    files. A path that is not a regular file, or a directory that cannot be listed, comes with its error."""
    for raw in paths:
        if raw == STDIN:
            yield STDIN, None
            continue
        try:
            mode = os.stat(raw).st_mode
        except OSError as exc:
            yield raw, "no such file or directory" if isinstance(exc, FileNotFoundError) else f"cannot read: {exc.strerror}"
            continue
        if stat.S_ISDIR(mode):
            yield from _walk(raw)
        elif stat.S_ISREG(mode):
            yield raw, None
        else:
            yield raw, f"not a regular file or directory ({_kind(mode)})"


def _walk(top: str) -> Iterator[tuple[str, str | None]]:
    """The certificate files under ``top``, depth first in name order, with a stack rather than
    recursion (no depth is too deep). Symbolic links to directories are not followed; a link to a
    regular file is read. Entries are stat'ed, never opened: a FIFO would block an open."""
    pending = [top]
    while pending:
        directory = pending.pop()
        try:
            with os.scandir(directory) as listing:
                entries = sorted(listing, key=lambda entry: entry.name)
        except OSError as exc:
            yield directory, f"directory cannot be listed: {exc.strerror}"
            continue
        subdirectories = []
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    subdirectories.append(entry.path)
                    continue
            except OSError as exc:
                yield entry.path, f"cannot read: {exc.strerror}"
                continue
            if Path(entry.name).suffix.lower() not in CERTIFICATE_SUFFIXES:
                continue
            try:
                mode = entry.stat(follow_symlinks=True).st_mode
            except OSError as exc:
                what = "a symbolic link to nothing" if isinstance(exc, FileNotFoundError) else exc.strerror
                yield entry.path, f"cannot read: {what}"
                continue
            yield entry.path, None if stat.S_ISREG(mode) else f"not a regular file ({_kind(mode)}): not read"
        pending.extend(reversed(subdirectories))


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "an unknown file type"


def read_input(source: str, max_bytes: int, stdin: Callable[[int], bytes] | None = None) -> bytes:
    if source == STDIN:
        if stdin is None:
            raise ParseError("no standard input to read", source)
        data = stdin(max_bytes + 1)
    else:
        try:
            # Non-blocking: a path that became a FIFO since the walk must not hang the open; then
            # only a regular file is read.
            descriptor = os.open(source, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
            with open(descriptor, "rb") as handle:
                status = os.fstat(handle.fileno())
                if not stat.S_ISREG(status.st_mode):
                    raise ParseError(f"not a regular file ({_kind(status.st_mode)}): not read", source)
                size = status.st_size
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
    records = []
    for cert in bundle.certificates:
        try:
            records.append(describe_certificate(cert))
        except ParseError as exc:
            raise ParseError(exc.detail, source) from None
        _check_fits(records[-1], source)
    notes = list(bundle.notes) + [f"certificate {r.fingerprint_sha256[:16]}: {n}" for r in records for n in r.notes]
    certificate_keys = {r.spki_sha256 for r in records}
    for number, key in enumerate(bundle.private_keys, start=1):
        try:
            spki = public_key_sha256(key)
        except VENDOR_ERRORS as exc:
            raise ParseError(f"private key {number}: its public key cannot be read ({vendor_reason(exc)})",
                             source) from None
        if records and spki not in certificate_keys:
            raise KeyMismatchError(spki, [r.fingerprint_sha256 for r in records])
    if bundle.is_empty:
        notes.append("no certificate or private key in this file")
    locator = None if source == STDIN else _file_uri(source, resolved_dirs)
    return _ParsedFile(source, locator, records, list(bundle.private_keys), notes)


def _string_limits(table: sa.Table) -> tuple[tuple[str, int], ...]:
    """(column name, maximum length) for each of ``table``'s columns that has one."""
    limits = []
    for column in table.columns:
        length = getattr(column.type, "length", None)  # String's, and sqlmodel's AutoString's
        if isinstance(length, int):
            limits.append((column.name, length))
    return tuple(limits)


# The inventory's limits on what a certificate record holds (the certificate table's string columns).
_FIELD_LIMITS = _string_limits(SQLModel.metadata.tables[Certificate.__tablename__])
_FIELD_NAMES = {"serial_hex": "serial number", "key_type": "key type", "key_curve": "key curve",
                "signature_algorithm": "signature algorithm", "subject_key_id": "subject key identifier",
                "authority_key_id": "authority key identifier"}


def _check_fits(record: CertificateRecord, source: str) -> None:
    """A field longer than the inventory keeps is this file's error (checked here, not left to the
    database: SQLite would keep it whole, PostgreSQL refuse it and with it the whole batch)."""
    for name, limit in _FIELD_LIMITS:
        value = getattr(record, name, None)
        if isinstance(value, str) and len(value) > limit:
            unit = "hex digits" if name in {"serial_hex", "subject_key_id", "authority_key_id"} else "characters"
            raise ParseError(f"certificate {record.fingerprint_sha256[:16]}: its {_FIELD_NAMES.get(name, name)} is "
                             f"{len(value):,} {unit}, more than the {limit:,} the inventory keeps", source)


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
    path = os.path.join(real, name)
    if os.name != "posix":
        return Path(path).as_uri()
    # What PurePosixPath.as_uri does for a normalised absolute path (realpath's output plus a name).
    return "file://" + urllib.parse.quote_from_bytes(os.fsencode(path))


_Chunk: TypeAlias = list[tuple[str, str | None]]  # (source, error) pairs, as iter_files yields them
_Outcome: TypeAlias = _ParsedFile | ParseError | KeyMismatchError | None  # None: not read (see the error)


def _parse_here(source: str, options: ImportOptions, stdin: Callable[[int], bytes] | None,
                resolved_dirs: dict[str, str]) -> _ParsedFile | ParseError | KeyMismatchError:
    try:
        return parse_file(read_input(source, options.max_bytes, stdin), source, options, resolved_dirs=resolved_dirs)
    except (ParseError, KeyMismatchError) as exc:
        return exc
    except Exception as exc:  # noqa: BLE001 - whatever else one file raises is that file's error
        return ParseError(f"cannot be parsed: unexpected {redact(exc)}", source)


def _parsed_files(files: Iterator[tuple[str, str | None]], options: ImportOptions,
                  stdin: Callable[[int], bytes] | None,
                  resolved_dirs: dict[str, str]) -> Iterator[tuple[str, str | None, _Outcome]]:
    """(source, error, parsed file or its parse error) for each file, in order.

    A large import is parsed in worker processes; whatever a worker does not return (stdin, a file
    with a private key or in a format a password may concern, any failure) is parsed here, by the same
    code, so the outcome never depends on where a file was parsed.
    """
    head = list(itertools.islice(files, _POOL_MIN_FILES))
    processes = _parse_processes(options) if len(head) >= _POOL_MIN_FILES else 0
    pool = _start_pool(processes) if processes else None
    everything = itertools.chain(head, files)
    if pool is None:
        for source, error in everything:
            yield source, error, None if error else _parse_here(source, options, stdin, resolved_dirs)
        return
    in_flight: deque[tuple[_Chunk, concurrent.futures.Future[list[_ParsedFile | None]] | None]] = deque()
    broken = False

    def drain_one() -> Iterator[tuple[str, str | None, _Outcome]]:
        nonlocal broken
        chunk, future = in_flight.popleft()
        parsed: list[_ParsedFile | None] = [None] * len(chunk)
        if future is not None:
            try:
                parsed = future.result()
            except Exception:  # a worker died or could not start: parse here from now on  # noqa: BLE001
                broken = True
        for (source, error), done in zip(chunk, parsed):
            yield source, error, None if error else (done or _parse_here(source, options, stdin, resolved_dirs))

    try:
        for chunk in _chunks_of(everything, _POOL_CHUNK):
            future = None
            if not broken:
                try:
                    future = pool.submit(_parse_chunk, chunk, options.max_bytes)
                except Exception:  # noqa: BLE001 - the pool is broken: parse here
                    broken = True
            in_flight.append((chunk, future))
            while len(in_flight) > _POOL_AHEAD * processes or (in_flight and in_flight[0][1] is None):
                yield from drain_one()
        while in_flight:
            yield from drain_one()
    finally:
        for _chunk, future in in_flight:
            if future is not None:
                future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


def _chunks_of(items: Iterable[tuple[str, str | None]], size: int) -> Iterator[list[tuple[str, str | None]]]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _parse_processes(options: ImportOptions) -> int:
    if options.parse_processes is not None:
        return max(0, options.parse_processes)
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return min(cpus - 1, _POOL_MAX_PROCESSES) if cpus > 1 else 0  # one CPU is this process's, writing


def _start_pool(processes: int) -> concurrent.futures.ProcessPoolExecutor | None:
    """Worker processes for parsing, or None where processes cannot be started.

    Forked from this process when it runs a single thread (quick, and safe: a worker touches nothing
    but files and cryptography, never an inherited database connection, and leaves with os._exit);
    from a fork server otherwise, as forking a process with other threads running can deadlock.
    """
    methods = multiprocessing.get_all_start_methods()
    method = "fork" if "fork" in methods and threading.active_count() == 1 else "forkserver"
    if method not in methods:
        method = "spawn"
    try:
        context = multiprocessing.get_context(method)
        return concurrent.futures.ProcessPoolExecutor(processes, mp_context=context,
                                                      initializer=_init_parse_worker)
    except (OSError, ValueError, NotImplementedError):
        return None


_worker_dirs: dict[str, str] = {}


def _init_parse_worker() -> None:
    _worker_dirs.clear()


def _parse_chunk(chunk: list[tuple[str, str | None]], max_bytes: int) -> list[_ParsedFile | None]:
    """In a worker process: each file of ``chunk`` parsed, or None where the importing process must
    parse it itself. Only certificates are taken here (no keys: they never cross a process boundary,
    and no password: a file whose outcome could depend on one is left to the importing process)."""
    out: list[_ParsedFile | None] = []
    no_password = ImportOptions(max_bytes=max_bytes)
    for source, error in chunk:
        parsed = None
        if not error and source != STDIN:
            try:
                data = read_input(source, max_bytes)
                if _password_free(data):
                    parsed = parse_file(data, source, no_password, resolved_dirs=_worker_dirs)
                    if parsed.keys or not parsed.records:
                        parsed = None
            except Exception:  # noqa: BLE001 - the importing process parses it and reports the error
                parsed = None
        out.append(parsed)
    return out


def _password_free(data: bytes) -> bool:
    """PEM without private key blocks: input whose parse cannot depend on a password (binary input,
    which may be PKCS#12 or a DER key, is left to the importing process)."""
    if looks_like_pem(data):
        return b"PRIVATE KEY-----" not in data and b"Proc-Type:" not in data
    return False


@contextlib.contextmanager
def _older_objects_frozen() -> Iterator[None]:
    """Exclude the objects that existed before the import from the garbage collector's full passes
    while it runs (gc.freeze): an import creates objects by the million, each full pass would walk
    every module-level object of SQLAlchemy, cryptography and the rest again, and that was a quarter
    of the importing process's time. Nothing is lost: reference counting frees as always, and the
    frozen objects are collectable again afterwards."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def import_paths(engine: sa.Engine, paths: Sequence[str], options: ImportOptions, actor: audit.Actor, *,
                 key_ring: Callable[[], keystore.KeyRing] | None = None,
                 stdin: Callable[[int], bytes] | None = None,
                 on_file: Callable[[FileResult | None], None] | None = None,
                 now: dt.datetime | None = None, policy: Policy | None = None) -> ImportReport:
    """Import every file under ``paths``. ``on_file`` is called once per file read (for progress bars).
    With ``policy``, each batch's certificates get owners by its ownership rules and are evaluated."""
    results: dict[str, FileResult] = {}
    tally = PolicyTally() if policy is not None else None
    evaluated: set[str] = set()  # certificates this import evaluated already (one may be in several files)
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
            written = _write_batch(engine, pending, options, actor, ring, now)
            for result in written:
                finish(result)
            if policy is not None and tally is not None:
                fresh = [fp for r in written if r.status == "imported" for fp in r.certificates if fp not in evaluated]
                evaluated.update(fresh)
                _apply_policy(engine, policy, list(dict.fromkeys(fresh)), actor, now, tally,
                              ownership=options.owner is None)
        pending, pending_certs = [], 0

    with _older_objects_frozen():
        for source, error, outcome in _parsed_files(iter_files(paths), options, stdin, resolved_dirs):
            order.append(source)
            if error or outcome is None:  # not read (None comes with an error saying why)
                finish(FileResult(source, "failed", error=error))
                continue
            if isinstance(outcome, (ParseError, KeyMismatchError)):
                detail = outcome.detail if isinstance(outcome, ParseError) else str(outcome)
                finish(FileResult(source, "failed", error=detail))
                continue
            parsed = outcome
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
    return ImportReport(tuple(results[s] for s in dict.fromkeys(order) if s in results), tally)


def _apply_policy(engine: sa.Engine, policy: Policy, fingerprints: list[str], actor: audit.Actor,
                  now: dt.datetime | None, tally: PolicyTally, *, ownership: bool = True) -> None:
    """Ownership rules (unless ``ownership`` is false: an import with an owner gives every certificate
    that one), then the rules, for certificates just written; a failure is noted in ``tally`` (the first
    one) and leaves them imported."""
    if not fingerprints:
        return
    try:
        with write_session(engine) as session:
            owners, summary = violations.own_and_evaluate(session, policy, actor, fingerprints, now, ownership=ownership)
    except (CertpilotError, sa.exc.SQLAlchemyError) as exc:
        if tally.error is None:
            tally.error = (f"policy not applied to {len(fingerprints)} certificate(s): {exc.__class__.__name__}: "
                           f"{(str(exc).splitlines() or [''])[0][:300]}")
        return
    tally.add(owners, summary)
    if summary.errors and tally.error is None:
        tally.error = f"{len(summary.errors)} certificate(s) not evaluated: " + "; ".join(summary.errors[:3])


def _write_batch(engine: sa.Engine, batch: list[_ParsedFile], options: ImportOptions, actor: audit.Actor,
                 ring: Callable[[], keystore.KeyRing], now: dt.datetime | None) -> list[FileResult]:
    """One transaction for the batch (all of it written, or none). A database that did not answer or lost
    the connection is tried again (UNAVAILABLE_RETRY_SECONDS); should the batch fail for a reason other than
    a busy or unavailable database, each file is written on its own, so that a file the database refuses
    fails alone."""
    observations = [Observation(r, p.locator, options.source) for p in batch for r in p.records]
    try:
        for pause in (*UNAVAILABLE_RETRY_SECONDS, None):
            try:
                with write_session(engine) as session:
                    outcome = upsert(session, observations, actor, owner=options.owner, tags=options.tags, now=now)
                    stored: dict[str, int] = {}
                    if options.import_keys:
                        for parsed in batch:
                            stored[parsed.source] = _store_keys(session, parsed.keys, ring, actor, now)
                break
            except InventoryUnavailableError:
                if pause is None:
                    raise
                time.sleep(pause)
    except (CertpilotError, sa.exc.SQLAlchemyError, *VENDOR_ERRORS) as exc:
        if len(batch) > 1 and not isinstance(exc, TransientError):
            return [result for parsed in batch for result in _write_batch(engine, [parsed], options, actor, ring, now)]
        message = f"not written: {exc.__class__.__name__}: {(str(exc).splitlines() or [''])[0][:300]}"
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
                known = session.execute(sa.select(col(Certificate.fingerprint_sha256))
                                        .where(col(Certificate.spki_sha256) == spki).limit(1)).first()
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
