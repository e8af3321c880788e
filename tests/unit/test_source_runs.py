"""Each discovery source's runs are recorded (started, completed, failed with why), so that the monitor
sees a source that stopped completing."""

from __future__ import annotations

import datetime as dt

import pytest
import sqlalchemy as sa

from certpilot import audit
from certpilot.database import read_session
from certpilot.discovery import record
from certpilot.models import SourceRun
from certpilot.sample_estate import Authority
from tests.unit.test_discovery_record import ListSource, _endpoints

T0 = dt.datetime(2026, 5, 1, 12, 0, tzinfo=dt.timezone.utc)


def _row(engine: sa.Engine, source: str) -> SourceRun:
    with read_session(engine) as session:
        row = session.get(SourceRun, source)
        assert row is not None
        return row


def test_a_complete_run_then_a_failed_one(engine: sa.Engine, ca: tuple[Authority, Authority]) -> None:
    found = [f for f, _ in _endpoints(ca, 3)]
    clock = iter([T0, T0 + dt.timedelta(seconds=1), T0 + dt.timedelta(seconds=2), T0 + dt.timedelta(seconds=3)])
    record(engine, ListSource("tls-scan:lab", found), audit.Actor("test", "run-1"), now=lambda: next(clock),
           block="tls-scan/lab")
    row = _row(engine, "tls-scan:lab")
    assert (row.block, row.flow_run_id, row.last_error, row.last_failed_at) == ("tls-scan/lab", "run-1", None, None)
    assert row.last_started_at == T0 and row.last_completed_at is not None and row.last_completed_at > T0

    later = T0 + dt.timedelta(hours=6)
    password = "hunter2-" + "A" * 130  # a long secret-looking run in the error: redact() withholds the message
    failing = ListSource("tls-scan:lab", found)

    def broken():  # noqa: ANN202 - the source fails part-way with an error whose text must not be kept
        yield found[0]
        raise ConnectionError(f"source went away {password}")

    failing.discover = broken  # type: ignore[method-assign]
    with pytest.raises(ConnectionError):
        record(engine, failing, audit.Actor("test", "run-2"), now=lambda: later)
    row = _row(engine, "tls-scan:lab")
    assert row.last_started_at == later and row.last_failed_at == later and row.flow_run_id == "run-2"
    assert row.last_completed_at is not None and row.last_completed_at < later  # the last complete run stays
    assert row.block == "tls-scan/lab"  # kept when a caller does not name it
    assert row.last_error is not None and "ConnectionError" in row.last_error and password not in row.last_error

    record(engine, ListSource("tls-scan:lab", found), audit.Actor("test", "run-3"), now=lambda: later)
    row = _row(engine, "tls-scan:lab")
    assert (row.last_completed_at, row.last_error) == (later, None)
