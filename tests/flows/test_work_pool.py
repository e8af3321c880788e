"""Beyond one machine: the deployments of prefect.yaml on a Prefect process work pool, as the README tells
an operator to run them: `prefect work-pool create`, `prefect deploy` from the checkout (prefect.yaml,
`--pool`), `prefect worker start`; the worker executes a run to Completed and stops on SIGINT. Two workers
on one pool share renew-due's renew-batch runs, and each certificate is renewed once."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (DeploymentFilter, DeploymentFilterId, FlowRunFilter, FlowRunFilterId,
                                            TaskRunFilter, TaskRunFilterName)
from prefect.settings import PREFECT_API_URL, temporary_settings
from sqlmodel import select

from certpilot import audit, database, keystore, managed
from certpilot.database import read_session
from certpilot.models import AuditEvent, Certificate
from certpilot.settings import load_settings
from lab.due_fleet import define_due, init_backdated_ca
from lab.prefect_server import PrefectServer

ROOT = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).parent / "prefect")
POOL = "certpilot-test-pool"


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


@pytest.fixture
def fleet_database() -> Iterator[str]:
    """An inventory of its own on the real PostgreSQL, which both workers and this test share; dropped after."""
    import psycopg

    from tests.conftest import PG_ADMIN_URL

    name = f"certpilot_pool_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=10) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    database.dispose_engines()
    with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=10) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _start_worker(name: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:  # --limit 2: the one that runs renew-due too cannot take every batch
        return subprocess.Popen([PREFECT, "worker", "start", "--pool", YAML_POOL, "--type", "process", "--name", name,
                                 "--limit", "2"], cwd=log.parent, env=env, stdout=out, stderr=subprocess.STDOUT)


def _stop(worker: subprocess.Popen[bytes]) -> None:
    worker.send_signal(signal.SIGINT)
    try:
        worker.wait(timeout=20)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait(timeout=10)


@pytest.mark.postgres
def test_two_workers_share_renew_due_and_renew_each_certificate_once(
        operator_env: dict[str, str], client: SyncPrefectClient, fleet_database: str, certpilot_home: Path,
        scheduling_prefect_server: PrefectServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from blocks.issuers import PrivateCABlock

    monkeypatch.setenv("CERTPILOT_DATABASE_URL", fleet_database)
    engine = database.get_engine()
    ring = keystore.load_key_ring(load_settings())  # the master key file in CERTPILOT_HOME, which the workers share
    actor = audit.Actor("test")
    init_backdated_ca(engine, ring, actor, CA)
    names = define_due(engine, ring, actor, CA, "pool", FLEET)
    with temporary_settings({PREFECT_API_URL: scheduling_prefect_server.api_url}):
        PrivateCABlock.register_type_and_schema()
        PrivateCABlock(ca_name=CA).save(CA, overwrite=True)
    started = dt.datetime.now(dt.timezone.utc)

    env = {**operator_env, "CERTPILOT_HOME": str(certpilot_home), "CERTPILOT_DATABASE_URL": fleet_database,
           "CERTPILOT_PROJECT_DIR": str(ROOT), "PREFECT_WORKER_QUERY_SECONDS": "1"}
    _prefect("work-pool", "create", YAML_POOL, "--type", "process", env=operator_env)
    workers: list[subprocess.Popen[bytes]] = []
    try:
        _prefect("deploy", "--name", "renew-due", "--name", "renew-batch", env=operator_env)
        logs = [tmp_path / "worker-a.log", tmp_path / "worker-b.log"]
        workers = [_start_worker("worker-a", env, logs[0]), _start_worker("worker-b", env, logs[1])]
        parent = client.read_deployment_by_name("renew-due/renew-due")
        batch = client.read_deployment_by_name("renew-batch/renew-batch")
        run = client.create_flow_run_from_deployment(parent.id, parameters={"batch_size": 3, "batches_at_once": 4})
        deadline = time.monotonic() + 100
        while not (state := client.read_flow_run(run.id).state) or not state.is_final():
            for worker, log in zip(workers, logs):
                assert worker.poll() is None, f"a worker exited with {worker.returncode}:\n{log.read_text()}"
            assert time.monotonic() < deadline, (f"renew-due still {state.name if state else None}:\n"
                                                 + "\n".join(log.read_text()[-3000:] for log in logs))
            time.sleep(0.5)
        texts = [log.read_text() for log in logs]
        assert state.is_completed(), f"{state}\n" + "\n".join(texts)

        batches = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[batch.id])))
        assert len(batches) == FLEET // 3 and all(b.state and b.state.is_completed() for b in batches), batches
        # Each worker executed some of the batches, each in its own process. Both may reach for a run: the
        # server lets one have it (the other logs "Aborted submission"), which then logs it was submitted.
        ran = [{b.id for b in batches if f"Flow run '{b.name}' submitted to infrastructure" in text} for text in texts]
        assert ran[0] and ran[1] and not ran[0] & ran[1] and len(ran[0] | ran[1]) == len(batches), ran
        assert len({b.infrastructure_pid for b in batches}) == len(batches)
        # Every certificate has its own task run, named and tagged after it, in a batch run.
        records = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[b.id for b in batches])),
                                        task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="renew-pool-")))
        assert sorted(r.name for r in records) == sorted(f"renew-{n}" for n in names)
        assert all(f"certificate:{r.name.removeprefix('renew-')}" in r.tags for r in records)
    finally:
        for worker in workers:
            _stop(worker)
        for deployment in client.read_deployments():
            if deployment.work_pool_name == YAML_POOL:
                client.delete_deployment(deployment.id)
        client.delete_work_pool(YAML_POOL)

    # The inventory: one new certificate per managed certificate, one certificate.issued event each.
    with read_session(engine) as session:
        for name in names:
            row = managed.get(session, name)
            statuses = sorted(c.status for c in session.exec(select(Certificate).where(
                Certificate.managed_certificate_id == row.id)))
            assert statuses == ["active", "superseded"], (name, statuses)
        issued = session.exec(select(AuditEvent).where(AuditEvent.action == "certificate.issued",
                                                       AuditEvent.at >= started)).all()
    assert sorted(json.loads(e.details)["managed"] for e in issued) == sorted(names)
