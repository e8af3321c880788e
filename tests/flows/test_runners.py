"""The flows' task runner: tasks run in a bounded pool, and the run logs keep what matters."""

from __future__ import annotations

from prefect import flow, get_run_logger, task

from flows.runners import thread_pool
from tests.flows.test_renew_flows import _logs


@task(timeout_seconds=30)
def _careful() -> int:
    get_run_logger().warning("the warning that matters")
    return 1


@flow(task_runner=thread_pool(2))
def _pooled() -> int:
    return sum(f.result() for f in [_careful.submit(), _careful.submit()])


def test_prefects_thread_timeout_notice_is_not_repeated_in_every_task_runs_log() -> None:
    state = _pooled(return_state=True)
    assert state.result() == 2
    logs = _logs(state.state_details.flow_run_id)
    assert logs.count("the warning that matters") == 2
    assert "running in a worker thread" not in logs
