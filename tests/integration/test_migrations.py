"""The migrations build exactly the schema the models describe, on SQLite and on PostgreSQL, and
every process starting against a fresh database finds it migrated once."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator

import psycopg
import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlmodel import SQLModel

import certpilot.models  # noqa: F401
from certpilot import database
from tests.conftest import PG_ADMIN_URL


def test_migrated_schema_matches_the_models(engine: sa.Engine) -> None:
    assert database.current_revision(engine) == database.head_revision()
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        differences = compare_metadata(context, SQLModel.metadata)
    assert differences == [], f"models and migrations differ: {differences}"


def test_upgrade_is_idempotent(engine: sa.Engine) -> None:
    database.upgrade(engine)
    database.upgrade(engine)
    with engine.connect() as conn:
        versions = conn.exec_driver_sql("SELECT version_num FROM alembic_version").all()
    assert versions == [(database.head_revision(),)]


def _fill(conn: sa.Connection, table: sa.Table, **given: object) -> None:
    """One row of ``table`` as the schema of that revision has it: ``given`` values, the rest of the columns
    that need one filled by their type."""
    row = dict(given)
    for column in table.columns:
        if column.name in row or column.nullable or column.server_default is not None or column.autoincrement is True:
            continue
        kind = column.type.python_type if not isinstance(column.type, sa.JSON) else dict
        row[column.name] = {str: f"{table.name}-{column.name}"[: getattr(column.type, "length", None) or 64],
                            int: 1, bool: False, dict: {}, bytes: b"\x00",
                            dt.datetime: dt.datetime(2026, 1, 1)}.get(kind, "x")
    conn.execute(table.insert().values(**row))


@pytest.fixture
def new_database_url(database_url: str) -> Iterator[str]:
    """An empty database of the same backend as ``database_url`` (the session's PostgreSQL database is at
    head already): a new SQLite file, or a new PostgreSQL database dropped afterwards."""
    if database_url.startswith("sqlite"):
        yield database_url
        return
    name = f"certpilot_migrate_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=10) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_an_inventory_in_use_upgrades_from_the_policy_schema(new_database_url: str) -> None:
    """Rows that refer to the tables later migrations rebuild (on SQLite, a table that cannot be ALTERed is
    copied, dropped and renamed): a managed certificate with its certificates and target, a private CA with
    its keys and certificates. Upgraded from 0008 to head, every row and reference is still there."""
    engine = database.create_engine(new_database_url)
    try:
        config = database._alembic_config(engine)  # noqa: SLF001 - the migrations up to a given revision
        command.upgrade(config, "0008")
        metadata = sa.MetaData()
        metadata.reflect(engine)
        t = metadata.tables
        with engine.begin() as conn:
            _fill(conn, t["private_key"], id="key-1")
            _fill(conn, t["private_key"], id="key-2")
            _fill(conn, t["managed_certificate"], id=1, name="www.example.com")
            for fp in ("b" * 64, "c" * 64):  # the CA's root and issuing certificates
                _fill(conn, t["certificate"], fingerprint_sha256=fp)
            _fill(conn, t["certificate"], fingerprint_sha256="a" * 64, managed_certificate_id=1,
                  issuer_fingerprint="c" * 64)
            _fill(conn, t["target"], id=1, managed_certificate_id=1, name="web1")
            _fill(conn, t["certificate_authority"], name="corp", root_key_id="key-1", issuing_key_id="key-2",
                  root_fingerprint="b" * 64, issuing_fingerprint="c" * 64)
        database.upgrade(engine)
        assert database.current_revision(engine) == database.head_revision()
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT fingerprint_sha256 FROM certificate WHERE managed_certificate_id = 1"
                                        ).all() == [("a" * 64,)]
            assert conn.exec_driver_sql("SELECT name, managed_certificate_id FROM target").all() == [("web1", 1)]
            assert conn.exec_driver_sql("SELECT name FROM managed_certificate").all() == [("www.example.com",)]
            assert conn.exec_driver_sql("SELECT issuing_key_id FROM certificate_authority").all() == [("key-2",)]
            if conn.dialect.name == "sqlite":
                assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1  # enforced again afterwards
                assert conn.exec_driver_sql("PRAGMA foreign_key_check").all() == []
    finally:
        engine.dispose()
