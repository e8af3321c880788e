"""Each managed certificate's history in the Prefect UI: an artifact per run keyed ``certificate-<name>``
listing the audit events the run recorded about it (certpilot.history), so the Artifacts page shows
its history across runs; and the task-run tag ``certificate:<name>`` (``tag_with_certificate``).

Cost, measured on the test session's SQLite-backed Prefect server (bench/certificate_history.py, 400
of each, on 2 shared cores): an artifact is one API write, 18 to 35 ms until the API shows it, against
43 to 70 ms for each task run renew-due already pays per certificate. So a run publishes one per
certificate up to ``MAX_ARTIFACTS`` (the failures first: about 9 to 18 s of writes at most) and its
own report covers the rest; discovery, whose runs see thousands of certificates, publishes one only
for the managed certificates whose records the run changed (a new place, a ghost...), up to
flows.discover.HISTORY_ARTIFACTS.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run, task_run

from certpilot import history
from certpilot.database import get_engine, read_session
from certpilot.managed import certificate_tag

MAX_ARTIFACTS = 500  # per run


def audit_head() -> int:
    """The audit trail's head now: a flow reads it when it starts, to find its own events later."""
    with read_session(get_engine()) as session:
        return history.audit_head(session)


def _run_label() -> str:
    return f"{flow_run.get_flow_name() or 'a flow'} run '{flow_run.get_name() or flow_run.get_id()}'"


@task(name="publish-certificate-history", cache_policy=NO_CACHE, timeout_seconds=600)
def publish_certificate_history(names: Sequence[str] | None, after_seq: int, whole_run: bool = False,
                                limit: int = MAX_ARTIFACTS) -> list[str]:
    """One artifact ``certificate-<name>`` per managed certificate this flow run recorded audit events
    about since event ``after_seq``: each of ``names`` (in that order, so a caller lists the failures
    first), or every one the run touched (None). At most ``limit``; returns the names published."""
    run_id = flow_run.get_id()
    if run_id is None:
        raise RuntimeError("publish_certificate_history runs in a flow run only")
    with read_session(get_engine()) as session:
        found = history.run_history(session, str(run_id), after_seq, names, whole_run=whole_run)
    order = list(names) if names is not None else sorted(found)
    published = order[:max(0, limit)]
    label = _run_label()
    for name in published:
        events = found.get(name, ())
        create_markdown_artifact(key=history.artifact_key(name), markdown=history.history_markdown(name, events, label),
                                 description=f"{name}: {len(events)} audit event(s) in {label}")
    if len(order) > len(published):
        get_run_logger().info("history artifacts for %d certificate(s); %d more are in this run's report only",
                              len(published), len(order) - len(published))
    return published


def _certificate_of(parameters: dict[str, Any]) -> str | None:
    """The managed certificate a task run works on: its ``name`` parameter, or the name of the step
    record it is given (``plan``: a RenewalPlan, ``failure``: a Failure)."""
    name = parameters.get("name")
    if isinstance(name, str):
        return name
    for record in (parameters.get("plan"), parameters.get("failure")):
        named = getattr(record, "name", None)
        if isinstance(named, str):
            return named
    return None


def tag_with_certificate(task: Any, run: Any, state: Any) -> None:
    """An on_running state hook for tasks that work on one managed certificate (a ``name`` parameter, or
    a ``plan`` or ``failure`` record of a renewal step): it tags the task run ``certificate:<name>``.

    Prefect 3.8.8 has no API to change a task run's tags once it exists (PATCH /task_runs/{id} takes a
    name only), and a tag given at submission (``prefect.tags``, ``with_options``) makes the task engine
    ask the server for a tag concurrency slot before every run: on a SQLite-backed server that write
    fails with 503 under load and the client backs off, which made renew-due of 50 certificates take
    27 s instead of 8 (bench/renew_due.py --quick). A tag added here, after that request, reaches the
    server with the run's next state (Completed, Failed or AwaitingRetry) and is filterable like any
    other; only a tag concurrency limit on it would not apply (none is used)."""
    name = _certificate_of(task_run.get_parameters())
    if name is None:
        raise TypeError(f"tag_with_certificate: task {task.name!r} names no certificate to tag its run with")
    tag = certificate_tag(name)
    if tag not in run.tags:
        run.tags = [*run.tags, tag]
