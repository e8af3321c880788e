"""One Prefect test harness (a real Prefect server on a temporary SQLite database) per test session,
with flow heartbeats off: they cost about 1 s per short flow run."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from prefect.settings import (PREFECT_FLOWS_HEARTBEAT_FREQUENCY, PREFECT_LOCAL_STORAGE_PATH,
                              PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings)
from prefect.testing.utilities import prefect_test_harness

from lab.prefect_server import PrefectServer


@pytest.fixture(scope="session")
def prefect_storage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("prefect-storage")


@pytest.fixture(scope="session", autouse=True)
def prefect_server(prefect_storage: Path) -> Iterator[None]:
    # Analytics off: the server's telemetry service would call out beyond loopback.
    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None, PREFECT_LOCAL_STORAGE_PATH: prefect_storage,
                             PREFECT_SERVER_ANALYTICS_ENABLED: False}):
        with prefect_test_harness(server_startup_timeout=60):
            yield


@pytest.fixture
def prefect_files(prefect_storage: Path):  # noqa: ANN201 - returns a reader
    """Reads the Prefect server's database files and result storage: {path: bytes}. The database
    must exist and be non-empty, so a wrong path cannot make a leak check pass vacuously."""
    import sqlalchemy as sa
    from prefect.settings import PREFECT_SERVER_DATABASE_CONNECTION_URL

    def read() -> dict[str, bytes]:
        database = Path(sa.engine.make_url(PREFECT_SERVER_DATABASE_CONNECTION_URL.value()).database)
        assert database.stat().st_size > 0
        paths = [database, *database.parent.glob(database.name + "-*"), *prefect_storage.rglob("*")]
        return {str(path): path.read_bytes() for path in paths if path.is_file()}

    return read


@pytest.fixture(scope="session")
def scheduling_prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """A real `prefect server start` on loopback, with the scheduler (the harness above runs none), started
    once per session when a test asks for it (about 11 s); its scheduler loop every 2 s instead of 60; with
    its UI, which test_console_ui.py loads in a headless browser."""
    with PrefectServer(tmp_path_factory.mktemp("prefect-server"), ui=True, scheduler_loop_seconds=2) as server:
        yield server
