"""Beyond one machine: the deployments of prefect.yaml on a Prefect process work pool, as the README tells
an operator to run them: `prefect work-pool create`, `prefect deploy` from the checkout (prefect.yaml,
`--pool`), `prefect worker start`; the worker executes a run to Completed and stops on SIGINT."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.settings import PREFECT_API_URL, temporary_settings

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
