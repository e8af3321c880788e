"""Each certificate's history one filter away, read back through the Prefect API as the UI reads it:
its runs' task runs tagged ``certificate:<name>``, and per run an artifact ``certificate-<name>``
listing the audit events the run recorded about it (the same as the inventory's audit trail)."""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.client.schemas.sorting import ArtifactSort
from sqlmodel import select

from certpilot.database import read_session
from certpilot.models import AuditEvent
from flows.renew import renew_certificate, renew_due
from tests.flows.test_renew_flows import _add, _artifacts, _task_runs
from tests.flows.test_renew_flows import issuer_block_types, pki  # noqa: F401 (fixtures)


def _events_of_run(engine: sa.Engine, run_id: Any) -> list[AuditEvent]:
    with read_session(engine) as session:
        return list(session.exec(select(AuditEvent).where(AuditEvent.flow_run_id == str(run_id))
                                 .order_by(AuditEvent.seq)).all())


def _history(key: str) -> list[Any]:
    """Every version of an artifact key, newest first: what the UI's artifact page shows as its history."""
    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                     sort=ArtifactSort.CREATED_DESC)


def test_renew_certificate_leaves_tagged_task_runs_and_its_audit_events(pki: sa.Engine) -> None:
    _add(pki, "hist-1", key_algorithm="ec-p256")
    first = renew_certificate(name="hist-1", return_state=True)
    assert first.is_completed(), first.message
    second = renew_certificate(name="hist-1", return_state=True)
    assert second.is_completed(), second.message
    run_id = second.state_details.flow_run_id
    renewal = second.result().renewal

    runs = {t.name: t for t in _task_runs(run_id)}
    steps = ("plan-hist-1", "generate-key-hist-1", "build-csr-hist-1", "issue-hist-1", "store-hist-1")
    for step in steps:  # each step's task run, filterable by the certificate's tag like the flow run
        assert "certificate:hist-1" in runs[step].tags, step

    [artifact] = _artifacts(run_id, "certificate-hist-1")
    events = _events_of_run(pki, run_id)
    assert {e.action for e in events} >= {"key.stored", "certificate.issued", "certificate.superseded"}
    for event in events:  # every audit event of the run, as the inventory holds it
        assert f"| {event.seq} |" in artifact.data and event.action in artifact.data
    assert f"certificate:{renewal.fingerprint_sha256}" in artifact.data
    assert f"{len(events)} audit event(s) in this run" in artifact.data
    assert "# hist-1: what renew-certificate run 'renew-hist-1' did" in artifact.data
    assert [a.flow_run_id for a in _history("certificate-hist-1")] == [run_id, first.state_details.flow_run_id]


def test_a_failed_renewal_is_in_the_history_with_why(pki: sa.Engine) -> None:
    _add(pki, "hist-bad", key_algorithm="ed25519")  # the private CA refuses Ed25519 for tls-server
    state = renew_certificate(name="hist-bad", return_state=True)
    assert state.is_failed()
    run_id = state.state_details.flow_run_id
    [artifact] = _artifacts(run_id, "certificate-hist-bad")
    assert "renewal.failed" in artifact.data and "managed:hist-bad" in artifact.data
    assert "key.destroyed" in artifact.data  # the key made for the refused order, shredded: part of this run
    failed = [t for t in _task_runs(run_id) if t.name == "issue-hist-bad"]
    assert failed and failed[0].state.is_failed() and "certificate:hist-bad" in failed[0].tags


def test_renew_due_gives_each_certificate_its_own_history(pki: sa.Engine) -> None:
    for name in ("due-a", "due-b"):
        _add(pki, name)
    _add(pki, "due-bad", key_algorithm="ed25519")
    state = renew_due(return_state=True)
    assert state.is_failed()  # due-bad
    run_id = state.state_details.flow_run_id
    events = _events_of_run(pki, run_id)
    issued = {json.loads(e.details)["managed"]: e.object for e in events if e.action == "certificate.issued"}
    assert set(issued) == {"due-a", "due-b"}

    pages = {name: _artifacts(run_id, f"certificate-{name}") for name in ("due-a", "due-b", "due-bad")}
    assert all(len(found) == 1 for found in pages.values()), pages
    a, b, bad = (pages[n][0].data for n in ("due-a", "due-b", "due-bad"))
    assert issued["due-a"] in a and issued["due-b"] not in a
    assert issued["due-b"] in b and issued["due-a"] not in b
    assert "renewal.failed" in bad and "renewal.failed" not in a
    renew_runs = [t for t in _task_runs(run_id) if t.name.startswith("renew-due-")]
    assert {t.name for t in renew_runs} == {"renew-due-a", "renew-due-b", "renew-due-bad"}
    assert all(f"certificate:{t.name.removeprefix('renew-')}" in t.tags for t in renew_runs)
