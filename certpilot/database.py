"""The inventory database: engines, migrations and write transactions.

SQLite (the embedded default) runs in WAL mode with a busy timeout and takes its write lock when a
write transaction begins (BEGIN IMMEDIATE), so concurrent writers queue instead of failing. PostgreSQL
write transactions take one advisory lock first. Both serialise writers, which keeps the audit hash
chain linear; readers are never blocked.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import event
from sqlmodel import Session

from certpilot.errors import PermanentError, TransientError
from certpilot.settings import Settings, load_settings

__all__ = ["InventoryBusyError", "InventoryUnavailableError", "SQLITE_BUSY_SECONDS", "checkpoint", "create_engine",
           "current_revision", "dispose_engines", "get_engine", "head_revision", "read_session", "upgrade",
           "where", "write_session"]

SQLITE_BUSY_SECONDS = 60.0  # how long a SQLite writer waits for another writer's lock before it fails
_MIGRATIONS = Path(__file__).with_name("migrations")
_WRITE_LOCK_ID = 0x63657274  # "cert": the one advisory lock every PostgreSQL writer takes
_engines: dict[str, sa.Engine] = {}
# SQLite's page cache is 2 MiB by default. Every certificate inserted touches a page in each of a
# dozen indexes keyed by fingerprint-like random values, so with the default cache a batch of 1,000
# spilled dirty pages to the WAL mid-transaction and re-read them, and an import slowed to a crawl as
# the inventory grew (1,400/s at 200,000 certificates; 3,100/s with these settings). The cache is a
# ceiling, not an allocation. Checkpoints every 20,000 WAL pages (80 MiB) rather than 1,000: fewer
# fsyncs, and a page rewritten by several batches is copied back once.
_SQLITE_TUNING = ("cache_size=-131072", "wal_autocheckpoint=20000")


class InventoryBusyError(TransientError):
    """Another writer held the inventory database's write lock for longer than this writer waits."""


class InventoryUnavailableError(TransientError):
    """The inventory database did not answer, or the connection to it was lost (a restart, say)."""


class MigrationError(PermanentError):
    """The inventory's schema could not be upgraded; nothing was changed."""


_busy_seconds: weakref.WeakKeyDictionary[sa.Engine, float] = weakref.WeakKeyDictionary()


def where(engine: sa.Engine) -> str:
    """The inventory database an engine writes to, for messages: the SQLite file, or the URL without its password."""
    if engine.dialect.name == "sqlite":
        return f"SQLite file {engine.url.database}"
    return engine.url.render_as_string(hide_password=True)


def create_engine(url: str, *, busy_timeout: float = SQLITE_BUSY_SECONDS) -> sa.Engine:
    """A new engine for ``url``, with certpilot's per-backend settings. ``busy_timeout``: how long a
    SQLite writer waits for another writer's lock (then InventoryBusyError)."""
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    if url.startswith("sqlite"):
        path = sa.engine.make_url(url).database
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"timeout": busy_timeout})
        _configure_sqlite(engine, busy_timeout)
        _busy_seconds[engine] = busy_timeout
        return engine
    # No server-side prepared statements (psycopg prepares a query after 5 runs on a connection): PostgreSQL
    # then plans it generically after 5 more, and the generic plan of an IN list of 500 parameters (how the
    # inventory reads in batches) tests every row against every parameter instead of a hash of them. Found
    # as the policy's facts read (locations by certificate) going from 5 ms to 400 ms a batch during a
    # 50,000-certificate import (bench/import_inventory.py: 478/s instead of about 1,700/s).
    return sa.create_engine(url, pool_pre_ping=True, connect_args={"connect_timeout": 10, "prepare_threshold": None})


def _configure_sqlite(engine: sa.Engine, busy_timeout: float) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):  # noqa: ANN001, ANN202
        dbapi_connection.isolation_level = None  # let the "begin" hook below issue BEGIN itself
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
        _enable_wal(cursor)
        for pragma in ("foreign_keys=ON", "secure_delete=ON", "synchronous=NORMAL") + _SQLITE_TUNING:
            cursor.execute(f"PRAGMA {pragma}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):  # noqa: ANN001, ANN202
        immediate = conn.get_execution_options().get("certpilot_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _enable_wal(cursor, attempts: int = 200) -> None:  # noqa: ANN001 - a sqlite3 cursor
    """Switch to WAL. Converting a new file needs an exclusive lock, and SQLite can answer "locked"
    there without waiting on the busy handler when several processes open the file at once: retry,
    bounded (about 10 s)."""
    for attempt in range(attempts):
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == attempts - 1:
                raise
            time.sleep(0.05)


def get_engine(settings: Settings | None = None) -> sa.Engine:
    """The engine for the configured inventory, migrated to the latest schema. One per URL per process."""
    settings = settings or load_settings()
    url = settings.database_url
    if url not in _engines:
        engine = create_engine(url)
        upgrade(engine)
        if url.startswith("sqlite") and settings.is_embedded_database:
            db_path = sa.engine.make_url(url).database
            if db_path and os.path.exists(db_path):
                os.chmod(db_path, 0o600)
        _engines[url] = engine
    return _engines[url]


def dispose_engines() -> None:
    for engine in _engines.values():
        engine.dispose()
    _engines.clear()


def _alembic_config(engine: sa.Engine) -> Config:
    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    config.attributes["engine"] = engine
    return config


def head_revision() -> str | None:
    return ScriptDirectory(str(_MIGRATIONS)).get_current_head()


def current_revision(engine: sa.Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: sa.Engine) -> None:
    """Migrate to the latest schema, if needed. Concurrent processes upgrade one at a time."""
    head = head_revision()
    if current_revision(engine) == head:
        return
    if engine.dialect.name == "sqlite":
        # BEGIN IMMEDIATE first, then re-check and migrate on that connection: concurrent first uses
        # of a new file queue for the write lock instead of failing with "database is locked".
        with engine.execution_options(certpilot_write=True).connect() as conn:
            # A migration that changes a table SQLite cannot ALTER rebuilds it (batch mode: copy, drop the old
            # one, rename): with foreign keys enforced, dropping a table other rows refer to fails, so every
            # inventory in use could not be upgraded. They are off for the migration (set outside the
            # transaction: SQLite ignores the pragma inside one) and every reference is checked before commit.
            raw = conn.connection.driver_connection
            assert raw is not None
            raw.execute("PRAGMA foreign_keys=OFF")
            try:
                if MigrationContext.configure(conn).get_current_revision() != head:
                    config = _alembic_config(engine)
                    config.attributes["connection"] = conn
                    command.upgrade(config, "head")
                    broken = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                    if broken:
                        conn.rollback()
                        table, rowid, parent, _ = broken[0]
                        raise MigrationError(f"{where(engine)}: upgrading the schema would leave {len(broken)} "
                                             f"row(s) referring to rows that do not exist (first: {table} row "
                                             f"{rowid} -> {parent}); nothing was changed")
                conn.commit()
            finally:
                raw.execute("PRAGMA foreign_keys=ON")
        return
    with engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql(f"SELECT pg_advisory_lock({_WRITE_LOCK_ID + 1})")
        try:
            if current_revision(engine) != head:
                command.upgrade(_alembic_config(engine), "head")
        finally:
            if conn.dialect.name == "postgresql":
                conn.exec_driver_sql(f"SELECT pg_advisory_unlock({_WRITE_LOCK_ID + 1})")
                conn.commit()


@contextlib.contextmanager
def read_session(engine: sa.Engine) -> Iterator[Session]:
    with Session(engine, expire_on_commit=False) as session:
        yield session


@contextlib.contextmanager
def write_session(engine: sa.Engine) -> Iterator[Session]:
    """One serialised write transaction: committed on success, rolled back on any error (so nothing of it
    is written). A lock another writer holds for longer than the busy timeout (SQLite) or a serialisation
    failure: InventoryBusyError; a PostgreSQL server that cannot be reached or a connection lost (a
    restart): InventoryUnavailableError. Both transient, both naming the database."""
    bound = engine.execution_options(certpilot_write=True)
    try:
        with Session(bound, expire_on_commit=False) as session:
            if engine.dialect.name == "postgresql":
                session.execute(sa.text(f"SELECT pg_advisory_xact_lock({_WRITE_LOCK_ID})"))
            else:
                session.connection()  # BEGIN IMMEDIATE now, not at the first write
            yield session
            session.commit()
    except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
        text = str(exc.orig).lower()
        if "locked" in text:
            raise InventoryBusyError(
                f"inventory database {where(engine)} is locked: another writer holds it and did not release it "
                f"within {_busy_seconds.get(engine, SQLITE_BUSY_SECONDS):g} s; nothing of this transaction was "
                f"written ({exc.orig})") from exc
        if "could not serialize" in text:
            raise InventoryBusyError(f"inventory database {where(engine)} busy: {exc.orig}") from exc
        if engine.dialect.name == "postgresql":
            first = (str(exc.orig).strip().splitlines() or [""])[0][:300]
            raise InventoryUnavailableError(f"inventory database {where(engine)} did not answer or the connection "
                                            f"was lost: {first}") from exc
        raise


def checkpoint(engine: sa.Engine) -> None:
    """SQLite: move the WAL into the database file and truncate it, so that erased rows (with
    secure_delete zeroing their pages) leave no copy in the -wal file. No-op elsewhere."""
    if engine.dialect.name == "sqlite":
        with engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
