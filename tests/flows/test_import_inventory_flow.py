"""The import-inventory flow against a real Prefect server: run history, audit links, the artifact,
and no private key byte in Prefect's database, result storage or logs."""

from __future__ import annotations

import asyncio
from pathlib import Path

import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization
from prefect.blocks.system import Secret
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId,
                                           LogFilter, LogFilterFlowRunId, TaskRunFilter)
from prefect.client.schemas.sorting import ArtifactSort
from prefect.logging.handlers import APILogHandler
from sqlmodel import select

from certpilot import audit
from certpilot.database import get_engine, read_session
from certpilot.models import AuditEvent, Certificate, PrivateKey
from certpilot.sample_estate import pem, write_estate
from flows.import_inventory import import_inventory
from tests.flows.test_renew_flows import _flow_run
from tests.keyprobe import leaks


async def _logs_and_artifact(flow_run_id):  # noqa: ANN001, ANN202
    async with get_client() as client:
        logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                                      limit=200)
        run_filter = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["expiry-report"])), flow_run_filter=run_filter,
            task_run_filter=TaskRunFilter(), sort=ArtifactSort.CREATED_DESC)
        run = await client.read_flow_run(flow_run_id)
    return "\n".join(log.message for log in logs), artifacts, run


def _estate_keys(root: Path) -> list:
    return [serialization.load_pem_private_key(p.read_bytes(), None) for p in sorted((root / "web-1").rglob("*.key"))]


def test_flow_imports_estate_records_its_run_and_leaks_no_key(tmp_path: Path, prefect_files) -> None:  # noqa: ANN001
    estate = write_estate(tmp_path / "estate")
    state = import_inventory(paths=[str(estate.root)], owner="team-web", import_keys=True, return_state=True)

    # The broken file fails the run loudly, after everything else was imported.
    assert state.is_failed()
    assert "1 of 48 file(s) could not be imported" in state.message
    assert "legacy.pem" in state.message and "no END line" in state.message
    run_id = state.state_details.flow_run_id

    with read_session(get_engine()) as session:
        assert session.exec(select(sa.func.count()).select_from(Certificate)).one() == estate.leaves + 2
        assert session.exec(select(sa.func.count()).select_from(PrivateKey)).one() == estate.leaves
        added = session.exec(select(AuditEvent).where(AuditEvent.action == "certificate.added")).all()
        assert len(added) == estate.leaves + 2
        assert {e.flow_run_id for e in added} == {str(run_id)}
        assert {e.actor for e in added} == {"prefect:import-inventory"}
        assert audit.verify(session).events > len(added)

    APILogHandler().flush()  # logs reach the server from a background worker
    logs, artifacts, run = asyncio.run(_logs_and_artifact(run_id))
    assert run.state.is_failed() and run.flow_id  # the run is in the server's history
    assert "import failed for" in logs and "legacy.pem" in logs
    assert artifacts and "expired" in artifacts[0].data and "svc00.example.test" in artifacts[0].data

    keys = _estate_keys(estate.root)
    assert len(keys) == estate.leaves
    haystacks = {"prefect logs": logs.encode(), "prefect state message": (state.message or "").encode(),
                 **prefect_files()}
    for where, data in haystacks.items():
        assert leaks(data, keys) == [], f"private key material found in {where}"


def test_flow_completes_with_a_summary_when_every_file_imports(tmp_path: Path) -> None:
    estate = write_estate(tmp_path / "estate")
    for broken in estate.broken:
        broken.unlink()
    result = import_inventory(paths=[str(estate.root)], tags={"env": "test"})
    summary = result.summary
    assert summary.failed == 0
    assert summary.certificates == estate.leaves + 2
    assert result.bands["expired"] == 1
    assert summary.failures == ()


def test_a_key_password_is_read_from_the_secret_block_the_run_names(tmp_path: Path, leaf) -> None:  # noqa: ANN001
    certificate, key = leaf
    (tmp_path / "site.crt").write_bytes(pem(certificate))
    (tmp_path / "site.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw-8f3a2c-of-the-key")))
    Secret(value="pw-8f3a2c-of-the-key").save("import-key-password", overwrite=True)
    secret = Secret.load("import-key-password")  # as the run form's block picker hands it over
    state = import_inventory(paths=[str(tmp_path)], import_keys=True, password_secret=secret, return_state=True)
    summary = state.result().summary
    assert (summary.failed, summary.certificates, summary.keys_stored) == (0, 1, 1)
    stored = _flow_run(state.state_details.flow_run_id).parameters["password_secret"]
    assert "pw-8f3a2c-of-the-key" not in str(stored)  # the run's recorded parameters hold no password


def test_an_unsaved_password_secret_fails_the_run_saying_why(tmp_path: Path) -> None:
    state = import_inventory(paths=[str(tmp_path)], import_keys=True, password_secret=Secret(value="not-saved"),
                             return_state=True)
    assert state.is_failed()
    assert "password_secret must be a saved Secret block" in (state.message or "")
    assert "not-saved" not in str(_flow_run(state.state_details.flow_run_id).parameters)
