"""The inventory's writer when its database goes away or is held by another writer, during an import
(certpilot.importer, what `certpilot inventory import` runs).

- PostgreSQL restarted in the middle of an import (a private cluster, lab.postgres: the shared server on
  5432 is never touched): the import carries on once the server is back (the batch is tried again) and
  every certificate is in; stopped for good: the remaining files fail naming the database; either way
  nothing is half-written (every certificate has its names, its location and its audit event, the audit
  chain verifies) and a re-run completes the import.
- SQLite held by another process's write transaction (BEGIN IMMEDIATE): each batch waits the busy timeout,
  then its files fail naming the database file and saying another writer holds it; nothing is written;
  once released, the import proceeds.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.serialization import Encoding
from sqlmodel import func, select

from certpilot import audit, database, importer
from certpilot.importer import FileResult, ImportOptions, import_paths
from certpilot.models import AuditEvent, Certificate, Location, SubjectAltName
from certpilot.sample_estate import mint_leaves
from lab.postgres import PostgresCluster

ACTOR = audit.Actor("test")


def _files(directory: Path, count: int) -> Path:
    directory.mkdir()
    for index, cert in enumerate(mint_leaves(count)):
        (directory / f"host{index:04d}.pem").write_bytes(cert.public_bytes(Encoding.PEM))
    return directory


def _whole(engine: sa.Engine) -> int:
    """The number of certificates, after checking none is half-written: each has its names, its location
    and its certificate.added event; the audit chain verifies."""
    with database.read_session(engine) as session:
        fingerprints = set(session.exec(select(Certificate.fingerprint_sha256)))
        with_names = set(session.exec(select(SubjectAltName.certificate_fingerprint).distinct()))
        placed = set(session.exec(select(Location.certificate_fingerprint).distinct()))
        added = {o.partition(":")[2] for o in session.exec(
            select(AuditEvent.object).where(AuditEvent.action == "certificate.added"))}
        assert fingerprints == with_names == placed == added
        assert audit.verify(session).events == (session.exec(select(func.max(AuditEvent.seq))).one() or 0)
    return len(fingerprints)


def _failed(report: importer.ImportReport) -> list[FileResult]:
    return [r for r in report.files if r.status == "failed"]


@pytest.fixture
def cluster() -> Iterator[PostgresCluster]:
    with PostgresCluster() as started:
        yield started


def test_postgres_restarted_then_stopped_in_the_middle_of_an_import(tmp_path: Path, cluster: PostgresCluster,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    engine = database.create_engine(cluster.url)
    database.upgrade(engine)
    files = _files(tmp_path / "certs", 400)
    options = ImportOptions(batch_size=20, parse_processes=0)
    written: list[float] = []
    restarted: list[tuple[float, float]] = []

    def restart_after_the_first_batch(result: FileResult | None) -> None:
        written.append(time.monotonic())
        if len(written) == options.batch_size:  # the first batch is in: down now, so the next one finds it down
            down = time.monotonic()
            cluster.stop()

            def start() -> None:
                cluster.start()
                restarted.append((down, time.monotonic()))
            threading.Timer(0.5, start).start()  # back in half a second, while the importer tries again

    report = import_paths(engine, [str(files)], options, ACTOR, on_file=restart_after_the_first_batch)

    [(down, up)] = restarted
    assert written[options.batch_size] > up  # the next batch was written once the server was back
    assert _failed(report) == [] and _whole(engine) == 400

    # Stopped for good in the middle of the next import: its remaining files fail, naming the database.
    monkeypatch.setattr(importer, "UNAVAILABLE_RETRY_SECONDS", (0.1, 0.2))
    more = _files(tmp_path / "more", 200)
    seen: list[FileResult | None] = []

    def stop_after_the_first_batch(result: FileResult | None) -> None:
        seen.append(result)
        if len(seen) == options.batch_size:
            cluster.stop()

    report = import_paths(engine, [str(more)], options, ACTOR, on_file=stop_after_the_first_batch)

    failed = _failed(report)
    assert failed and len(failed) < 200
    where = f"postgresql+psycopg://postgres@127.0.0.1:{cluster.port}/postgres"
    assert all(where in (r.error or "") and "did not answer or the connection was lost" in (r.error or "")
               for r in failed), failed[0].error
    cluster.start()
    assert _whole(engine) == 400 + 200 - len(failed)  # each batch all in or not at all
    again = import_paths(engine, [str(more)], options, ACTOR)
    assert _failed(again) == [] and _whole(engine) == 600
    engine.dispose()


HOLD = """
import sqlite3, sys
connection = sqlite3.connect(sys.argv[1], isolation_level=None)
connection.execute("BEGIN IMMEDIATE")
connection.execute("INSERT INTO audit_event (seq, at, actor, action, object, details, prev_hash, hash) "
                   "VALUES (-1, '2026-01-01 00:00:00', 'other', 'held', 'lock', '{}', '', '')")
print("holding", flush=True)
sys.stdin.readline()
connection.execute("ROLLBACK")
"""


def test_sqlite_locked_by_another_writer(tmp_path: Path) -> None:
    path = tmp_path / "inventory.db"
    engine = database.create_engine(f"sqlite:///{path}", busy_timeout=1.0)
    database.upgrade(engine)
    files = _files(tmp_path / "certs", 30)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"holding\n"
        started = time.monotonic()
        report = import_paths(engine, [str(files)], ImportOptions(batch_size=10, parse_processes=0), ACTOR)
        took = time.monotonic() - started
    finally:
        if holder.stdin is not None:
            holder.stdin.write(b"\n")
            holder.stdin.close()
        holder.wait(timeout=10)

    assert len(_failed(report)) == 30
    assert 3 * 1.0 <= took < 20  # three batches, each waiting its 1 s bound once
    for result in _failed(report):
        assert f"inventory database SQLite file {path} is locked: another writer holds it" in (result.error or "")
        assert "within 1 s" in (result.error or "")
    assert _whole(engine) == 0
    with database.read_session(engine) as session:  # the other writer's row was rolled back, not ours written
        assert session.exec(select(func.count()).select_from(AuditEvent)).one() == 0

    report = import_paths(engine, [str(files)], ImportOptions(batch_size=10, parse_processes=0), ACTOR)

    assert _failed(report) == [] and _whole(engine) == 30
    engine.dispose()
