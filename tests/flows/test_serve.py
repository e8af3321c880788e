"""`certpilot serve` as an operator runs it, against a real Prefect server with its scheduler (the
session harness's server has none): every deployment of prefect.yaml appears with its schedule, a
schedule fires and the served process executes the run, a run created through the API executes,
SIGTERM stops it cleanly, and a second start picks up the run that came while it was down."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import pytest
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId
from prefect.client.schemas.schedules import CronSchedule
from prefect.settings import PREFECT_API_URL, temporary_settings

from sqlmodel import select

from certpilot import audit, database, keystore, managed
from certpilot.database import read_session
from certpilot.models import Certificate
from certpilot.settings import load_settings
from deployments import DEPLOYMENTS, load_flow
from lab.due_fleet import define_due, init_backdated_ca
from lab.ports import free_port
from lab.prefect_server import PrefectServer


class Served:
    """One `certpilot serve` process, started from a directory that is not the checkout."""

    def __init__(self, env: dict[str, str], workdir: Path, port: int) -> None:
        self.env, self.workdir, self.port = env, workdir, port
        self.log = workdir / f"serve-{time.monotonic_ns()}.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "cli", "serve", "--listen", f"127.0.0.1:{port}"],
                                            env=env, cwd=workdir, stdout=log, stderr=subprocess.STDOUT)

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_serving(self, timeout: float = 60) -> None:
        """Until its deployments are registered and its listener answers."""
        deadline = time.monotonic() + timeout
        while f"serving {len(DEPLOYMENTS)} deployments" not in self.output or not self._healthy():
            assert self.process.poll() is None, f"certpilot serve exited with {self.process.returncode}:\n{self.output}"
            assert time.monotonic() < deadline, f"certpilot serve did not start within {timeout} s:\n{self.output}"
            time.sleep(0.2)

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> tuple[int, float]:
        """(exit code, seconds it took) after ``sig``."""
        started = time.monotonic()
        self.process.send_signal(sig)
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
            raise AssertionError(f"certpilot serve did not stop within {timeout} s of {sig}:\n{self.output}") from None
        return code, time.monotonic() - started


@pytest.fixture(scope="module")
def serve_env(scheduling_prefect_server: PrefectServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment of an operator's shell: the Prefect API, a certpilot home, a fast runner poll."""
    home = tmp_path_factory.mktemp("serve")
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PREFECT_", "CERTPILOT_"))}
    env.update({"PREFECT_API_URL": scheduling_prefect_server.api_url, "PREFECT_HOME": str(home / "prefect"),
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_RUNNER_POLL_FREQUENCY": "1",
                "CERTPILOT_HOME": str(home / "certpilot")})
    return env


@pytest.fixture(scope="module")
def served(serve_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    process = Served(serve_env, tmp_path_factory.mktemp("serve-cwd"), free_port())
    try:
        process.wait_serving()
        yield process
    finally:
        if process.process.poll() is None:
            process.stop()


@pytest.fixture
def client(scheduling_prefect_server: PrefectServer) -> Iterator[SyncPrefectClient]:
    with temporary_settings({PREFECT_API_URL: scheduling_prefect_server.api_url}):
        with get_client(sync_client=True) as api:
            yield api


def _deployment_id(client: SyncPrefectClient, name: str) -> UUID:
    return client.read_deployment_by_name(f"{name}/{name}").id


def _wait_final(client: SyncPrefectClient, run_id: UUID, served: Served, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        run = client.read_flow_run(run_id)
        if run.state is not None and run.state.is_final():
            return run
        assert time.monotonic() < deadline, (f"flow run {run_id} still {run.state.name if run.state else None} "
                                             f"after {timeout} s:\n{served.output[-4000:]}")
        time.sleep(0.5)


def test_every_deployment_appears_with_its_schedule_and_the_listener_answers(served: Served,
                                                                            client: SyncPrefectClient) -> None:
    for spec in DEPLOYMENTS:
        deployment = client.read_deployment_by_name(f"{load_flow(spec.entrypoint).name}/{spec.name}")
        crons = [s.schedule.cron for s in deployment.schedules if isinstance(s.schedule, CronSchedule) and s.active]
        assert crons == ([spec.cron] if spec.cron else []), spec.name
        path, _, function = spec.entrypoint.partition(":")  # flows/renew.py:renew_due -> flows.renew.renew_due
        assert deployment.entrypoint == f"{path.removesuffix('.py').replace('/', '.')}.{function}"
        assert sorted(deployment.tags) == sorted(spec.tags) and not deployment.paused
        limit = deployment.global_concurrency_limit
        assert (limit.limit if limit is not None else None) == spec.concurrency_limit, spec.name
    assert httpx.get(f"http://127.0.0.1:{served.port}/metrics", timeout=10).status_code == 200
    assert "Prefect automations" in served.output  # applied, or the reason they were not


def test_a_near_schedule_fires_and_the_served_process_runs_it(served: Served, client: SyncPrefectClient) -> None:
    """Fails when the scheduler stops producing runs (as with SQLAlchemy 2.1 under Prefect 3.8.8)."""
    deployment_id = _deployment_id(client, "renew-due")
    at = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=12)).replace(microsecond=0)
    cron = f"{at.minute} {at.hour} {at.day} {at.month} * {at.second}"  # once, at that second (croniter's 6th field)
    schedule, = client.create_deployment_schedules(deployment_id, [(CronSchedule(cron=cron, timezone="UTC"), True)])
    try:
        deadline = time.monotonic() + 45
        while True:
            runs = [run for run in client.read_flow_runs(flow_run_filter=FlowRunFilter(
                deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id])))
                if run.expected_start_time == at]
            if runs:
                break
            assert time.monotonic() < deadline, "the scheduler made no run for a schedule 12 s ahead"
            time.sleep(0.5)
        run, = runs
        assert run.auto_scheduled and run.created_by is not None and run.created_by.type == "SCHEDULE"
        finished = _wait_final(client, run.id, served)
        assert finished.state.is_completed(), finished.state
        assert finished.start_time is not None and finished.start_time >= at - dt.timedelta(seconds=15)
        assert "0 managed certificate(s) due for renewal" in served.output
    finally:
        client.delete_deployment_schedule(deployment_id, schedule.id)


def test_a_run_created_through_the_api_executes(served: Served, client: SyncPrefectClient) -> None:
    run = client.create_flow_run_from_deployment(_deployment_id(client, "renew-due"), parameters={"within_days": 1.0})
    finished = _wait_final(client, run.id, served, timeout=40)
    assert finished.state.is_completed(), finished.state
    assert finished.parameters == {"within_days": 1.0}


def test_renew_due_hands_its_batches_to_served_renew_batch_runs(served: Served, serve_env: dict[str, str],
                                                                 client: SyncPrefectClient,
                                                                 scheduling_prefect_server: PrefectServer,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """One machine: the served renew-due fans out to the served renew-batch deployment as on a work pool."""
    from blocks.issuers import PrivateCABlock

    monkeypatch.setenv("CERTPILOT_HOME", serve_env["CERTPILOT_HOME"])  # the served runs' inventory and master key
    engine = database.get_engine()
    ring = keystore.load_key_ring(load_settings())
    init_backdated_ca(engine, ring, audit.Actor("test"), "served")
    names = define_due(engine, ring, audit.Actor("test"), "served", "served", 4)
    with temporary_settings({PREFECT_API_URL: scheduling_prefect_server.api_url}):
        PrivateCABlock.register_type_and_schema()
        PrivateCABlock(ca_name="served").save("served", overwrite=True)
    run = client.create_flow_run_from_deployment(_deployment_id(client, "renew-due"), parameters={"batch_size": 2})
    finished = _wait_final(client, run.id, served, timeout=90)
    assert finished.state.is_completed(), f"{finished.state}\n{served.output[-4000:]}"
    batches = [r for r in client.read_flow_runs(flow_run_filter=FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(
        any_=[_deployment_id(client, "renew-batch")]))) if r.start_time and r.start_time >= finished.start_time]
    assert sorted(r.name for r in batches) == ["renew-batch-1-of-2", "renew-batch-2-of-2"]
    assert all(r.state and r.state.is_completed() for r in batches)
    with read_session(engine) as session:
        for name in names:  # renewed once each: the one seeded superseded, one new active
            row = managed.get(session, name)
            assert sorted(c.status for c in session.exec(select(Certificate).where(
                Certificate.managed_certificate_id == row.id))) == ["active", "superseded"], name


def test_serve_needs_a_prefect_api_and_says_so(serve_env: dict[str, str], tmp_path: Path) -> None:
    for api_url, expected in (("", "set PREFECT_API_URL"), (f"http://127.0.0.1:{free_port()}/api", "does not answer")):
        started = time.monotonic()
        run = subprocess.run([sys.executable, "-m", "cli", "serve", "--no-http"], env={**serve_env, "PREFECT_API_URL": api_url},
                             cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False)
        assert run.returncode == 1 and expected in run.stderr, run.stderr
        assert time.monotonic() - started < 30 and "Traceback" not in run.stderr


def test_sigterm_stops_it_cleanly_and_the_next_start_picks_up(serve_env: dict[str, str], client: SyncPrefectClient,
                                                               served: Served, tmp_path: Path) -> None:
    code, took = served.stop(signal.SIGTERM)
    assert code == 0 and took < 10, served.output
    assert "stopping (signal received)" in served.output and "Traceback" not in served.output
    deployment_id = _deployment_id(client, "renew-due")
    assert not client.read_deployment(deployment_id).paused  # schedules keep running while it is down

    waiting = client.create_flow_run_from_deployment(deployment_id)  # comes while nothing serves
    time.sleep(3)
    assert client.read_flow_run(waiting.id).state.is_scheduled()

    again = Served(serve_env, tmp_path, free_port())
    try:
        again.wait_serving()
        finished = _wait_final(client, waiting.id, again, timeout=40)
        assert finished.state.is_completed(), finished.state
    finally:
        code, took = again.stop(signal.SIGINT)
    assert code == 0 and took < 10, again.output
