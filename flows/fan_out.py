"""How a flow hands its work out as runs of another deployment, for the workers of a pool to share: one
way for every flow (renew-due's renew-batch runs, discover's discover-chunk runs).

``deployment_beside(name)`` says whether to: only a run started from a deployment (a work pool's
worker, or certpilot serve) fans out, and only when the deployment ``name`` exists beside it; a direct
call (tests, the CLI) does its work in its own process. ``run_all`` starts one run per parameter set
with prefect.deployments.run_deployment (a subflow of the caller, so the UI shows them under it), at
most ``at_once`` in flight, and waits for each to end: a run not started within ``start_seconds`` (no
worker polling the pool, every slot taken) is cancelled and said so. It never raises for a run; each
``Ended`` says how its run ended. Results stay where each run ran, so callers read what the runs did
from the inventory or the Prefect API, never from a worker's result storage.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from prefect import get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.runtime import deployment as deployment_context
from prefect.states import Cancelled

__all__ = ["Ended", "deployment_beside", "run_all"]

POLL_SECONDS = 1.0
START_SECONDS = 900.0


@dataclass(frozen=True)
class Ended:
    """How one run ended: ``why`` is empty when it completed."""

    run_id: UUID | None
    name: str
    why: str = ""

    @property
    def completed(self) -> bool:
        return not self.why


def deployment_beside(name: str) -> UUID | None:
    """The deployment ``name`` (``flow-name/deployment-name``) when this flow run was started from a
    deployment and that one exists too; else None, logging why when it is missing."""
    if deployment_context.get_id() is None:
        return None
    with get_client(sync_client=True) as client:
        try:
            return client.read_deployment_by_name(name).id
        except ObjectNotFound:
            get_run_logger().warning("no %s deployment: doing its work in this run's process", name)
            return None


def run_all(deployment: UUID, runs: Sequence[tuple[str, Mapping[str, Any]]], at_once: int,
            start_seconds: float = START_SECONDS, poll_seconds: float = POLL_SECONDS) -> list[Ended]:
    """One run of ``deployment`` per (run name, parameters) of ``runs``, ``at_once`` at most in flight;
    returns how each ended, in order."""
    ended: dict[int, Ended] = {}
    running: dict[UUID, tuple[int, float]] = {}  # run -> (its index, when it was created)
    waiting = list(range(len(runs)))
    with get_client(sync_client=True) as client:
        while waiting or running:
            while waiting and len(running) < max(1, at_once):
                index = waiting.pop(0)
                name, parameters = runs[index]
                try:
                    run = run_deployment(deployment, parameters=dict(parameters), timeout=0, as_subflow=True,
                                         flow_run_name=name)
                except Exception as exc:  # noqa: BLE001 - this run fails; the others go on
                    ended[index] = Ended(None, name, f"its run could not be created: {exc}")
                    continue
                assert isinstance(run, FlowRun)  # called from sync code: the run, not a coroutine
                running[run.id] = (index, time.monotonic())
            time.sleep(poll_seconds)
            for run_id, (index, created) in list(running.items()):
                name = runs[index][0]
                state = client.read_flow_run(run_id).state
                if state is not None and state.is_final():
                    del running[run_id]
                    ended[index] = Ended(run_id, name, "" if state.is_completed() else
                                         f"its run {name} ended {state.name}: {state.message or 'no message'}")
                elif (state is None or state.is_scheduled() or state.is_pending()) \
                        and time.monotonic() - created > start_seconds:
                    client.set_flow_run_state(run_id, Cancelled(message="not started in time"), force=True)
                    del running[run_id]
                    ended[index] = Ended(run_id, name, f"its run {name} did not start within {start_seconds:.0f} s "
                                                       "and was cancelled: is a worker polling the deployment's work "
                                                       "pool (or certpilot serve running with --limit 2 or more)?")
    return [ended[index] for index in range(len(runs))]
