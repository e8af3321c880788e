"""Beyond one machine: the deployments of prefect.yaml on a Prefect process work pool, as the README tells
an operator to run them: `prefect work-pool create`, `prefect deploy` from the checkout (prefect.yaml,
`--pool`), `prefect worker start`; the worker executes a run to Completed and stops on SIGINT. Two workers
on one pool share renew-due's renew-batch runs, and each certificate is renewed once; and discover's
discover-chunk runs of a range scanned in chunks."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (DeploymentFilter, DeploymentFilterId, FlowRunFilter, FlowRunFilterId,
                                            TaskRunFilter, TaskRunFilterName)
from prefect.client.schemas.objects import FlowRun
from prefect.settings import PREFECT_API_URL, temporary_settings
from sqlmodel import select

from blocks.tls_scan import TlsScanBlock
from certpilot import audit, database, keystore, managed
from certpilot.database import read_session
from certpilot.discovery import record
from certpilot.models import AuditEvent, Location, SourceRun
from connectors.tls_scan import TlsScanSource
from lab import tls_farm
from certpilot.settings import load_settings
from lab.due_fleet import define_due, init_backdated_ca, not_renewed_once
from lab.prefect_server import PrefectServer

ROOT = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).parent / "prefect")
POOL = "certpilot-test-pool"
RUN_SECONDS = 240  # a run through the workers: about 16 s on a quiet machine, once past 100 s on an overloaded one


@pytest.fixture
def operator_env(scheduling_prefect_server: PrefectServer, tmp_path: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PREFECT_", "CERTPILOT_"))}
    env.update({"PREFECT_API_URL": scheduling_prefect_server.api_url, "PREFECT_HOME": str(tmp_path / "prefect"),
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "CERTPILOT_HOME": str(tmp_path / "certpilot")})
    return env


@pytest.fixture
def client(scheduling_prefect_server: PrefectServer) -> Iterator[SyncPrefectClient]:
    with temporary_settings({PREFECT_API_URL: scheduling_prefect_server.api_url}):
        with get_client(sync_client=True) as api:
            yield api


def _prefect(*args: str, env: dict[str, str]) -> str:
    run = subprocess.run([PREFECT, "--no-prompt", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120, check=False)
    assert run.returncode == 0, f"prefect {' '.join(args)} exited {run.returncode}:\n{run.stdout}\n{run.stderr}"
    return run.stdout


def test_a_worker_runs_a_deployment_of_prefect_yaml(operator_env: dict[str, str], client: SyncPrefectClient,
                                                    tmp_path: Path) -> None:
    _prefect("work-pool", "create", POOL, "--type", "process", env=operator_env)
    try:
        # CERTPILOT_PROJECT_DIR is left unset here: the pull step's template is then resolved on each worker.
        _prefect("deploy", "--name", "renew-due", "--pool", POOL, env=operator_env)
        deployment = client.read_deployment_by_name("renew-due/renew-due")
        assert deployment.work_pool_name == POOL and deployment.entrypoint == "flows/renew.py:renew_due"
        assert deployment.pull_steps == [{"prefect.deployments.steps.set_working_directory": {
            "directory": "{{ $CERTPILOT_PROJECT_DIR }}"}}]

        worker_env = {**operator_env, "CERTPILOT_PROJECT_DIR": str(ROOT), "PREFECT_WORKER_QUERY_SECONDS": "1"}
        log = tmp_path / "worker.log"
        with open(log, "wb") as out:
            worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", POOL, "--type", "process"],
                                      cwd=tmp_path, env=worker_env, stdout=out, stderr=subprocess.STDOUT)
        try:
            run = client.create_flow_run_from_deployment(deployment.id)
            deadline = time.monotonic() + 60
            while not (state := client.read_flow_run(run.id).state) or not state.is_final():
                assert worker.poll() is None, f"the worker exited with {worker.returncode}:\n{log.read_text()}"
                assert time.monotonic() < deadline, f"run still {state.name if state else None}:\n{log.read_text()}"
                time.sleep(0.5)
            assert state.is_completed(), f"{state}\n{log.read_text()}"
            assert client.read_flow_run(run.id).work_pool_name == POOL
            assert "0 managed certificate(s) due for renewal" in log.read_text()
        finally:
            started = time.monotonic()
            worker.send_signal(signal.SIGINT)  # a process worker ignores SIGTERM
            try:
                worker.wait(timeout=20)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait(timeout=10)
                raise AssertionError(f"the worker did not stop on SIGINT:\n{log.read_text()}") from None
        assert time.monotonic() - started < 20
    finally:
        for deployment in client.read_deployments():
            if deployment.work_pool_name == POOL:
                client.delete_deployment(deployment.id)
        client.delete_work_pool(POOL)


# ------------------------------------------------------------------------- two workers, one pool

FLEET = 12  # due certificates: four renew-batch runs of three
CA = "pool"
YAML_POOL = "certpilot"  # the pool prefect.yaml names: `prefect deploy` of several deployments ignores --pool
SHARED = ("renew-due", "renew-batch", "discover", "discover-chunk")


@dataclass
class TwoWorkers:
    """Two process workers on one pool (each --limit 2: the one that runs the parent run cannot take every
    child), the deployments that fan out deployed there, and the inventory they share (PostgreSQL) with
    its master key (a CERTPILOT_HOME of its own)."""

    database_url: str
    home: Path
    logs: list[Path]
    workers: list[subprocess.Popen[bytes]]

    def use(self, monkeypatch: pytest.MonkeyPatch) -> sa.Engine:
        """This test's inventory and master key are the workers'."""
        monkeypatch.setenv("CERTPILOT_DATABASE_URL", self.database_url)
        monkeypatch.setenv("CERTPILOT_HOME", str(self.home))
        return database.get_engine()

    def run(self, client: SyncPrefectClient, deployment: str, parameters: dict[str, object]) -> FlowRun:
        """A run of ``deployment`` to its end (the workers alive throughout), within RUN_SECONDS."""
        run = client.create_flow_run_from_deployment(client.read_deployment_by_name(deployment).id,
                                                     parameters=parameters)
        deadline = time.monotonic() + RUN_SECONDS
        while not (state := client.read_flow_run(run.id).state) or not state.is_final():
            for worker, log in zip(self.workers, self.logs):
                assert worker.poll() is None, f"a worker exited with {worker.returncode}:\n{log.read_text()}"
            assert time.monotonic() < deadline, (f"{deployment} still {state.name if state else None}:\n"
                                                 + "\n".join(log.read_text()[-3000:] for log in self.logs))
            time.sleep(0.5)
        assert state.is_completed(), f"{state}\n" + "\n".join(log.read_text()[-5000:] for log in self.logs)
        return client.read_flow_run(run.id)

    def children(self, client: SyncPrefectClient, deployment: str, since: dt.datetime) -> list[FlowRun]:
        """The runs of ``deployment``, each shown Completed, each executed by one of the two workers, both
        having executed some, each in a process of its own. Both workers may reach for a run: the server
        lets one have it (the other logs "Aborted submission"), and that one logs it was submitted."""
        batch = client.read_deployment_by_name(deployment)
        runs = [r for r in client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(
            any_=[batch.id]))) if r.created is not None and r.created >= since]  # this test's (the server is shared)
        assert runs and all(r.state and r.state.is_completed() for r in runs), runs
        texts = [log.read_text() for log in self.logs]
        ran = [{r.id for r in runs if f"Flow run '{r.name}' submitted to infrastructure" in text} for text in texts]
        assert ran[0] and ran[1] and not ran[0] & ran[1] and len(ran[0] | ran[1]) == len(runs), ran
        assert len({r.infrastructure_pid for r in runs}) == len(runs)
        return runs


@pytest.fixture(scope="module")
def two_workers(scheduling_prefect_server: PrefectServer, tmp_path_factory: pytest.TempPathFactory,
                ) -> Iterator[TwoWorkers]:
    import psycopg

    from tests.conftest import PG_ADMIN_URL

    work = tmp_path_factory.mktemp("two-workers")
    name = f"certpilot_pool_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=10) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PREFECT_", "CERTPILOT_"))}
    env.update({"PREFECT_API_URL": scheduling_prefect_server.api_url, "PREFECT_HOME": str(work / "prefect"),
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "CERTPILOT_HOME": str(work / "certpilot"),
                "CERTPILOT_DATABASE_URL": url, "CERTPILOT_PROJECT_DIR": str(ROOT), "PREFECT_WORKER_QUERY_SECONDS": "1"})
    workers: list[subprocess.Popen[bytes]] = []
    logs = [work / "worker-a.log", work / "worker-b.log"]
    _prefect("work-pool", "create", YAML_POOL, "--type", "process", env=env)
    try:
        _prefect("deploy", *(arg for d in SHARED for arg in ("--name", d)), env=env)
        for log in logs:
            with open(log, "wb") as out:
                workers.append(subprocess.Popen([PREFECT, "worker", "start", "--pool", YAML_POOL, "--type", "process",
                                                 "--name", log.stem, "--limit", "2"], cwd=work, env=env, stdout=out,
                                                stderr=subprocess.STDOUT))
        yield TwoWorkers(url, work / "certpilot", logs, workers)
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGINT)  # a process worker ignores SIGTERM
        for worker in workers:
            try:
                worker.wait(timeout=20)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait(timeout=10)
        with temporary_settings({PREFECT_API_URL: scheduling_prefect_server.api_url}):
            with get_client(sync_client=True) as api:
                for deployment in api.read_deployments():
                    if deployment.work_pool_name == YAML_POOL:
                        api.delete_deployment(deployment.id)
                api.delete_work_pool(YAML_POOL)
        database.dispose_engines()
        with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.postgres
def test_two_workers_share_renew_due_and_renew_each_certificate_once(
        two_workers: TwoWorkers, client: SyncPrefectClient, scheduling_prefect_server: PrefectServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from blocks.issuers import PrivateCABlock

    engine = two_workers.use(monkeypatch)
    ring = keystore.load_key_ring(load_settings())  # the master key file the workers read too
    actor = audit.Actor("test")
    init_backdated_ca(engine, ring, actor, CA)
    names = define_due(engine, ring, actor, CA, "pool", FLEET)
    with temporary_settings({PREFECT_API_URL: scheduling_prefect_server.api_url}):
        PrivateCABlock.register_type_and_schema()
        PrivateCABlock(ca_name=CA).save(CA, overwrite=True)
    started = dt.datetime.now(dt.timezone.utc)
    with read_session(engine) as session:
        head = session.exec(select(sa.func.max(AuditEvent.seq))).one() or 0

    two_workers.run(client, "renew-due/renew-due", {"batch_size": 3, "batches_at_once": 4})
    batches = two_workers.children(client, "renew-batch/renew-batch", started)
    assert len(batches) == FLEET // 3
    # Every certificate has its own task run, named and tagged after it, in a batch run.
    records = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[b.id for b in batches])),
                                    task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="renew-pool-")))
    assert sorted(r.name for r in records) == sorted(f"renew-{n}" for n in names)
    assert all(f"certificate:{r.name.removeprefix('renew-')}" in r.tags for r in records)

    # The inventory: one new certificate per managed certificate, one certificate.issued event each.
    assert not_renewed_once(engine, names, head) == []


@pytest.mark.postgres
def test_two_workers_share_a_range_scan_in_chunks(two_workers: TwoWorkers, client: SyncPrefectClient,
                                                  scheduling_prefect_server: PrefectServer,
                                                  monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """127.0.0.0/28 in chunks of 4 addresses: four discover-chunk runs shared by the workers; every server
    in the range found, seen by the discover run; a place of the source outside the range turns ghost."""
    engine = two_workers.use(monkeypatch)
    with ExitStack() as stack:
        first = stack.enter_context(tls_farm.TlsFarm.run(tmp_path / "a", tls_farm.plan(1), host="127.0.0.2"))
        port = first.endpoints[0].port
        farms = [first] + [stack.enter_context(tls_farm.TlsFarm.run(tmp_path / h, tls_farm.plan(1), host=h,
                                                                     base_port=port, ca=first.ca))
                           for h in ("127.0.0.7", "127.0.0.13", "127.0.0.20")]
        assert {f.endpoints[0].port for f in farms} == {port}, "the farms' port is taken on another address"
        # A place of the source seen before (127.0.0.20, outside the range now scanned).
        record(engine, TlsScanSource("range", [f"127.0.0.20:{port}"], timeout=1.0), audit.Actor("test"))
        with temporary_settings({PREFECT_API_URL: scheduling_prefect_server.api_url}):
            TlsScanBlock.register_type_and_schema()
            TlsScanBlock(targets=[f"127.0.0.0/28:{port}"], timeout_seconds=1.0, chunk_addresses=4).save(
                "range", overwrite=True)
        started = dt.datetime.now(dt.timezone.utc)
        run = two_workers.run(client, "discover/discover", {"sources": ["tls-scan/range"]})
    chunks = two_workers.children(client, "discover-chunk/discover-chunk", started)
    assert sorted(tuple(c.parameters["targets"]) for c in chunks) == [
        (f"127.0.0.1-127.0.0.3:{port}",), (f"127.0.0.12-127.0.0.14:{port}",), (f"127.0.0.4-127.0.0.7:{port}",),
        (f"127.0.0.8-127.0.0.11:{port}",)]
    with read_session(engine) as session:
        places = {loc.locator: loc for loc in session.exec(select(Location).where(Location.source == "tls-scan:range"))}
        source_run = session.get(SourceRun, "tls-scan:range")
    found = {f"tls://127.0.0.{n}:{port}" for n in (2, 7, 13)}
    assert set(places) == found | {f"tls://127.0.0.20:{port}"}
    assert all(places[p].seen_by_run == str(run.id) and not places[p].ghost for p in found)
    assert places[f"tls://127.0.0.20:{port}"].ghost  # flagged by the discover run once every chunk was recorded
    assert source_run is not None and source_run.last_completed_at is not None and source_run.flow_run_id == str(run.id)
