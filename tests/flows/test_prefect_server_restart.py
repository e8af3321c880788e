"""The Prefect server restarted in the middle of renew-due: the run finishes or fails loudly, a re-run
converges, and every managed certificate is renewed exactly once.

A Prefect server of the test's own (lab.prefect_server: its own port and SQLite database), an inventory
of the test's own with 30 due certificates of a private CA (lab.due_fleet). `certpilot renew --due` runs
the renew-due flow there in a child process (in-process batches: the run is not from a deployment);
tests/renewal_pauser.py holds every renewal from the 10th stored one on (certpilot.checkpoints) while
the server is stopped, lets them go on against the dead API, and the server is started again on the same
port and database. Then `certpilot renew --due` once more. Checked:

- the first run ends by itself within its deadline: it completed, or it failed with an error naming
  the Prefect API;
- the re-run completes and leaves nothing due;
- each managed certificate has exactly one new certificate (one active, one superseded) and exactly one
  `certificate.issued` audit event since the start; no renewal claim left held;
- the audit chain verifies.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

import pytest
import sqlalchemy as sa
from prefect import flow  # at import: Prefect sets up logging (the root's handlers, caplog's too) when first imported
from prefect.settings import PREFECT_API_URL, temporary_settings
from sqlmodel import col, select

from blocks.issuers import PrivateCABlock
from certpilot import audit, keystore, managed
from certpilot.database import get_engine, read_session
from certpilot.errors import ServiceUnavailableError, TransientError
from certpilot.models import AuditEvent
from certpilot.settings import load_settings
from lab.due_fleet import define_due, init_backdated_ca, not_renewed_once
from lab.fault_proxy import FaultProxy, Faults
from lab.prefect_server import PrefectServer

ROOT = Path(__file__).resolve().parents[2]
CA = "restart-ca"
FLEET = 30
PAUSE_AT = 10  # the renewal stored 10th (and every one after it) waits while the server is stopped
RUN_SECONDS = 150.0  # a run's deadline, the client's retries through the restart included


def _env(server: PrefectServer, home: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env.update({"PREFECT_API_URL": server.api_url, "PREFECT_HOME": str(home),
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    return env


def _wait(child: subprocess.Popen[bytes], log: Path) -> tuple[int, str]:
    try:
        code = child.wait(timeout=RUN_SECONDS)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait(timeout=10)
        raise AssertionError(f"renew-due hung: not ended {RUN_SECONDS:.0f} s after start:\n"
                             f"{log.read_text(errors='replace')[-4000:]}") from None
    return code, log.read_text(errors="replace")


def _renew_due(env: dict[str, str], log: Path, *pause: str) -> subprocess.Popen[bytes]:
    command = ["-m", "tests.renewal_pauser", *pause] if pause else ["-m", "cli"]
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, *command, "renew", "--due", "--json"], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT)


def _summary(output: str) -> dict[str, object]:
    start = output.index('{\n  "due"') if '{\n  "due"' in output else output.index('{"due"')
    summary: dict[str, object] = json.JSONDecoder().raw_decode(output[start:])[0]
    return summary


def _issued_since(engine: sa.Engine, head: int) -> int:
    with read_session(engine) as session:
        return len(session.exec(select(AuditEvent.seq).where(AuditEvent.action == "certificate.issued",
                                                             col(AuditEvent.seq) > head)).all())


def test_prefect_server_restarted_in_the_middle_of_renew_due(tmp_path: Path) -> None:
    engine: sa.Engine = get_engine()
    ring = keystore.load_key_ring(load_settings())
    actor = audit.Actor("test")
    init_backdated_ca(engine, ring, actor, CA)
    names = define_due(engine, ring, actor, CA, "restart", FLEET)
    with read_session(engine) as session:
        head = session.exec(select(sa.func.max(AuditEvent.seq))).one() or 0

    with PrefectServer(tmp_path / "prefect-server") as server:
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            PrivateCABlock.register_type_and_schema()
            PrivateCABlock(ca_name=CA).save(CA, overwrite=True)
        env = _env(server, tmp_path / "prefect-client")
        hold = tmp_path / "hold"
        hold.mkdir()
        first_log = tmp_path / "first.log"
        child = _renew_due(env, first_log, "stored", str(PAUSE_AT), str(hold))
        try:
            deadline = time.monotonic() + RUN_SECONDS
            while not (hold / "paused").exists():
                assert child.poll() is None, f"renew-due ended before its {PAUSE_AT}th renewal was stored:\n" \
                                             f"{first_log.read_text(errors='replace')[-4000:]}"
                assert time.monotonic() < deadline, first_log.read_text(errors="replace")[-4000:]
                time.sleep(0.1)
            server.stop()  # in the middle: renewals stored, the rest not yet, task runs open
            assert PAUSE_AT <= _issued_since(engine, head) < FLEET
            (hold / "go").touch()  # the held renewals go on against a server that is not there
            server.start()  # the same port and database
            code, said = _wait(child, first_log)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait(timeout=10)

        # The first run ended by itself: completed, or failed loudly naming the Prefect API.
        if code != 0:
            assert server.api_url in said or "Prefect API" in said, said[-4000:]
        first = _summary(said) if code == 0 else None

        second_log = tmp_path / "second.log"
        code, again = _wait(_renew_due(env, second_log), second_log)
        assert code == 0, again[-4000:]
        rerun = _summary(again)
        assert rerun["failed"] == 0, rerun
        if first is not None:
            assert (first["due"], first["renewed"], first["failed"]) == (FLEET, FLEET, 0), first
            assert rerun["due"] == 0, rerun

    # Exactly once each: one new certificate and one certificate.issued event per managed certificate.
    assert not_renewed_once(engine, names, head) == []
    with read_session(engine) as session:
        assert audit.verify(session).events == session.exec(select(sa.func.max(AuditEvent.seq))).one()
        due_now = managed.schedule(session, dt.datetime.now(dt.timezone.utc))
    assert not [r.managed.name for r in due_now if r.decision.due]


def test_issuer_slots_given_back_to_an_api_that_does_not_answer_only_warn(caplog: pytest.LogCaptureFixture) -> None:
    """Slots taken while the Prefect API answers and given back when it does not (the restart above, at the
    end of a batch): a warning naming the API and the limit, and the block's work stands."""
    from lab.ports import free_port
    from tasks.renewal import ensure_issuer_limits, hold_issuer_slots

    dead = f"http://127.0.0.1:{free_port()}/api"
    issuer = "private-ca/slots-restart"

    @flow(name="slots-given-back-without-api")
    def given_back_without_api() -> str:
        ensure_issuer_limits([issuer], 2)
        held = hold_issuer_slots({issuer: 2})
        held.__enter__()
        with temporary_settings({PREFECT_API_URL: dead}):
            held.__exit__(None, None, None)
        return "done"

    assert given_back_without_api() == "done"
    warned = [r.getMessage() for r in caplog.records if "could not give back" in r.getMessage()]
    assert len(warned) == 1 and f"the Prefect API at {dead} did not answer" in warned[0], warned
    assert "issuer-private-ca-slots-restart" in warned[0] and "lease ends (300 s)" in warned[0]


@contextmanager
def _through_proxy(issuer: str) -> Iterator[FaultProxy]:
    """A fault proxy (HTTP mode, per request) before the session's Prefect server, made the API of this
    thread; ``issuer``'s concurrency limit created through it (the client has reached the API once)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    from tasks.renewal import limit_name

    upstream = httpx.URL(str(PREFECT_API_URL.value()))
    with FaultProxy(upstream=(upstream.host, upstream.port or 80), mode="http", seed=3, timeout=60) as proxy:
        with temporary_settings({PREFECT_API_URL: f"{proxy.url}/api"}):
            with get_client(sync_client=True) as client:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=limit_name(issuer), limit=1))
            yield proxy


def test_issuer_slots_asked_of_an_api_that_stopped_answering_fail_within_the_wait() -> None:
    """The Prefect API stops answering (it accepts and is silent) just as a batch takes its issuer slots: the
    batch fails after the wait, with a transient error naming the API and the limit (Prefect's own client
    retries alone took about 7 minutes)."""
    from tasks.renewal import hold_issuer_slots

    issuer = "private-ca/slots-black-hole"
    with _through_proxy(issuer) as proxy:
        api = f"{proxy.url}/api"
        proxy.set_faults(Faults(black_hole=1.0))
        started = time.monotonic()
        with pytest.raises(ServiceUnavailableError) as failed:
            with hold_issuer_slots({issuer: 1}, api_wait=3):
                pytest.fail("slots taken from an API that does not answer")
        waited = time.monotonic() - started
    assert 2.5 <= waited < 15, waited
    assert isinstance(failed.value, TransientError)
    assert str(failed.value).startswith(f"the Prefect API at {api} did not answer within 3 s when taking 1 slot(s) "
                                        "of concurrency limit issuer-private-ca-slots-black-hole"), str(failed.value)
    assert proxy.stats.injected["black_hole"] >= 1


def test_issuer_slots_held_by_another_run_are_waited_for_beyond_the_api_wait() -> None:
    """Slots another run holds are not an API that does not answer: the second batch waits for them (the
    API answers 423 at once), past its API wait, and takes them when they are given back."""
    from tasks.renewal import hold_issuer_slots

    issuer = "private-ca/slots-held"
    with _through_proxy(issuer):
        first = hold_issuer_slots({issuer: 1}, api_wait=1)
        first.__enter__()
        timer = threading.Timer(3.0, first.__exit__, (None, None, None))
        timer.start()
        started = time.monotonic()
        try:
            with hold_issuer_slots({issuer: 1}, api_wait=1) as slots:
                waited = time.monotonic() - started
                assert not timer.is_alive()  # taken only once the first run gave them back
                assert slots[issuer].acquire(blocking=False)
        finally:
            timer.join()
    assert waited >= 2.5, waited
