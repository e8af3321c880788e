"""One Prefect test harness (a real Prefect server on a temporary SQLite database) per test session,
with flow heartbeats off: they cost about 1 s per short flow run."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, PREFECT_LOCAL_STORAGE_PATH, temporary_settings
from prefect.testing.utilities import prefect_test_harness


@pytest.fixture(scope="session")
def prefect_storage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("prefect-storage")


@pytest.fixture(scope="session", autouse=True)
def prefect_server(prefect_storage: Path) -> Iterator[None]:
    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None, PREFECT_LOCAL_STORAGE_PATH: prefect_storage}):
        with prefect_test_harness(server_startup_timeout=60):
            yield
