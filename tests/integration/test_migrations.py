"""The migrations build exactly the schema the models describe, on SQLite and on PostgreSQL, and
every process starting against a fresh database finds it migrated once."""

from __future__ import annotations

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlmodel import SQLModel

import certpilot.models  # noqa: F401
from certpilot import database


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
