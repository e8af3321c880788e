"""Shared fixtures: a private CERTPILOT_HOME per test, inventories on SQLite and on the real
PostgreSQL server (127.0.0.1:5432, a throwaway database per test session), and a small real PKI."""

from __future__ import annotations

import datetime as dt
import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from sqlmodel import SQLModel

from certpilot import database
from certpilot.sample_estate import Authority, issue_leaf, make_ca

PG_ADMIN_URL = os.environ.get("CERTPILOT_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture(autouse=True)
def certpilot_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Every test gets its own home, database and master key; nothing from the environment leaks in."""
    home = tmp_path / "certpilot-home"
    for name in ("CERTPILOT_DATABASE_URL", "CERTPILOT_MASTER_KEY", "CERTPILOT_MASTER_KEY_FILE", "CERTPILOT_ACTOR",
                 "CERTPILOT_POLICY", "CERTPILOT_MASTER_KEY_KMS", "CERTPILOT_MASTER_KEY_KMS_REGION",
                 "CERTPILOT_MASTER_KEY_KMS_ENDPOINT_URL", "CERTPILOT_MASTER_KEY_KMS_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CERTPILOT_HOME", str(home))
    yield home
    database.dispose_engines()


@pytest.fixture
def no_prefect_api(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No Prefect API configured, as for a user without a server: not in the environment, and not from
    the flows' session harness either, which stays in force for the rest of the session once started."""
    monkeypatch.setenv("PREFECT_API_URL", "")
    if "prefect.settings" not in sys.modules:
        yield
        return
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: None}):
        yield


@pytest.fixture(scope="session")
def pg_database_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, dropped afterwards."""
    name = f"certpilot_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=10) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    yield url
    database.dispose_engines()
    with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=10) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _empty(engine: sa.Engine) -> None:
    tables = [t.name for t in reversed(SQLModel.metadata.sorted_tables)]
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.exec_driver_sql("TRUNCATE " + ", ".join(tables) + " CASCADE")
        else:
            for table in tables:
                conn.exec_driver_sql(f"DELETE FROM {table}")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, certpilot_home: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The inventory URL, once for the embedded SQLite default and once for PostgreSQL; set in the environment."""
    if request.param == "sqlite":
        url = f"sqlite:///{certpilot_home / 'inventory.db'}"
    else:
        url = request.getfixturevalue("pg_database_url")
    monkeypatch.setenv("CERTPILOT_DATABASE_URL", url)
    return url


@pytest.fixture
def engine(database_url: str) -> Iterator[sa.Engine]:
    """A migrated, empty inventory on each backend."""
    eng = database.get_engine()
    _empty(eng)
    yield eng
    database.dispose_engines()


@pytest.fixture(scope="session")
def ca() -> tuple[Authority, Authority]:
    """A root and an issuing intermediate (real keys, generated once per session)."""
    root = make_ca("Test Root CA")
    return root, make_ca("Test Issuing CA", parent=root)


@pytest.fixture
def leaf(ca: tuple[Authority, Authority]):  # noqa: ANN201
    """A fresh leaf certificate and its key, 30 days from expiry."""
    return issue_leaf(ca[1], ["leaf.example.test", "www.leaf.example.test"],
                      dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=30))
