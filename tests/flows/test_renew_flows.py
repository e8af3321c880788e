"""The renewal flows against a real Prefect server and the real private CA: runs named and tagged
after the certificate, one task run per certificate in renew-due, failures reported after doing all
that could be done, retries for transient errors only, and no private key byte anywhere in Prefect."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
import sqlalchemy as sa
from cryptography import x509
from prefect import tags
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterTags,
    LogFilter,
    LogFilterFlowRunId,
    TaskRunFilter,
)
from prefect.client.schemas.sorting import ArtifactSort, FlowRunSort, TaskRunSort
from prefect.logging.handlers import APILogHandler
from sqlmodel import select
from typer.testing import CliRunner

from blocks.issuers import AcmeIssuerBlock, PrivateCABlock
from certpilot import audit, ca, inventory, keystore, managed, renewing
from certpilot.database import get_engine, read_session, write_session
from certpilot.keys import key_matches_certificate
from certpilot.models import AuditEvent, Certificate, ManagedCertificate, PrivateKey, RenewalClaim
from certpilot.settings import load_settings
from flows.renew import renew_certificate, renew_due
from tasks.renewal import configure_retries, limit_name
from tests.flows.issuers import TestIssuerBlock, attempts, most_at_once
from tests.keyprobe import leaks

CA_NAME = "test-ca"
ISSUER = f"private-ca/{CA_NAME}"
ACTOR = audit.Actor("test")


# ------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="session")
def issuer_block_types(prefect_server: None) -> Iterator[None]:
    for block in (PrivateCABlock, AcmeIssuerBlock, TestIssuerBlock):
        block.register_type_and_schema()
    delays = configure_retries(0.01)  # tiny backoff: a retry still really waits, briefly
    assert max(delays) < 0.1
    yield
    configure_retries(5)


def _ring() -> keystore.KeyRing:
    return keystore.load_key_ring(load_settings())


@pytest.fixture
def pki(issuer_block_types: None, certpilot_home: Path) -> sa.Engine:
    """A fresh inventory with a private CA, and the issuer block that names it."""
    engine = get_engine()
    with write_session(engine) as session:
        ca.init_ca(session, _ring(), ACTOR, CA_NAME, "http://127.0.0.1:8888",  # old enough to backdate leaves
                   now=dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=60))
    PrivateCABlock(ca_name=CA_NAME).save(CA_NAME, overwrite=True)
    return engine


def _add(engine: sa.Engine, name: str, issuer: str = ISSUER, **kw: Any) -> None:
    kw.setdefault("owner", "platform")
    spec = managed.ManagedSpec(name=name, dns_names=kw.pop("dns", (f"{name}.example.test",)), issuer=issuer, **kw)
    with write_session(engine) as session:
        managed.add(session, spec, ACTOR)


def _seed(engine: sa.Engine, name: str, age_days: int, validity_days: int = 30) -> str:
    """Give ``name`` a certificate from the private CA issued ``age_days`` ago. Returns its fingerprint."""
    plan = renewing.plan(engine, name)
    ref = renewing.new_key(engine, plan, _ring, ACTOR)
    csr = renewing.new_csr(engine, plan, ref, _ring).csr
    with write_session(engine) as session:
        issued = ca.sign(session, _ring(), CA_NAME, csr, "tls-server", validity_days=validity_days,
                         now=dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=age_days))
        row = managed.get(session, name)
        return renewing.record_issued(session, row, issued, ref, ACTOR).fingerprint_sha256


def _current(engine: sa.Engine, name: str) -> Certificate | None:
    with read_session(engine) as session:
        return managed.current_certificate(session, managed.get(session, name))


def _row(engine: sa.Engine, name: str) -> ManagedCertificate:
    with read_session(engine) as session:
        return managed.get(session, name)


def _api(coro_fn: Any) -> Any:
    async def run() -> Any:
        async with get_client() as client:
            return await coro_fn(client)
    return asyncio.run(run())


def _flow_run(run_id: UUID) -> Any:
    return _api(lambda c: c.read_flow_run(run_id))


def _task_runs(run_id: UUID) -> list[Any]:
    return _api(lambda c: c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])),
                                           task_run_filter=TaskRunFilter(), sort=TaskRunSort.EXPECTED_START_TIME_DESC,
                                           limit=200))


def _settled_task_runs(run_id: UUID, names: set[str], seconds: float = 20.0) -> dict[str, Any]:
    """The flow run's task runs by name, once those ``names`` show a final state (the API records task runs
    from events, a moment behind the run), or whatever it shows after ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        runs = {t.name: t for t in _task_runs(run_id)}
        if time.monotonic() > deadline or all(n in runs and runs[n].state and runs[n].state.is_final()
                                              for n in names):
            return runs
        time.sleep(0.2)


def _logs(run_id: UUID) -> str:
    APILogHandler().flush()
    logs = _api(lambda c: c.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])),
                                      limit=200))
    return "\n".join(log.message for log in logs)


def _artifacts(run_id: UUID, key: str) -> list[Any]:
    return _api(lambda c: c.read_artifacts(
        artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])), task_run_filter=TaskRunFilter(),
        sort=ArtifactSort.CREATED_DESC))


def _runs_tagged(tag: str) -> list[Any]:
    return _api(lambda c: c.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[tag])),
                                           sort=FlowRunSort.START_TIME_DESC))


def x509_of(cert: Certificate) -> Any:
    return x509.load_der_x509_certificate(cert.der)


def _events(engine: sa.Engine, action: str) -> list[AuditEvent]:
    with read_session(engine) as session:
        return list(session.exec(select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.seq)).all())


# ------------------------------------------------------------------------------- renew-certificate

def test_renew_certificate_end_to_end_with_the_private_ca(pki: sa.Engine) -> None:
    _add(pki, "web-1", dns=("web-1.example.test", "www.web-1.example.test"), ip_addresses=("10.0.0.7",),
         owner="team-web", tags={"env": "prod"})

    # Started plainly, as a deployment run would be: the flow tags its own run.
    first = renew_certificate(name="web-1", return_state=True)
    assert first.is_completed(), first.message
    first_fp = first.result().renewal.fingerprint_sha256
    # Started inside prefect.tags(...): the run is created with the tag.
    with tags("certificate:web-1", "manual"):
        second = renew_certificate(name="web-1", return_state=True)
    assert second.is_completed(), second.message
    renewal = second.result().renewal
    run_ids = [first.state_details.flow_run_id, second.state_details.flow_run_id]

    for run_id in run_ids:
        run = _flow_run(run_id)
        assert run.name == "renew-web-1"
        assert "certificate:web-1" in run.tags
        names = {t.name for t in _task_runs(run_id)}
        assert {"plan-web-1", "generate-key-web-1", "build-csr-web-1", "issue-web-1", "store-web-1"} <= names
    assert "manual" in _flow_run(run_ids[1]).tags
    assert {r.id for r in _runs_tagged("certificate:web-1")} == set(run_ids)  # its history is one filter away

    # The inventory: the new certificate is current, carries its key and names, replaces the first.
    current = _current(pki, "web-1")
    assert current is not None and current.fingerprint_sha256 == renewal.fingerprint_sha256
    assert current.replaces_fingerprint == first_fp and renewal.replaces == first_fp
    assert current.owner == "team-web" and current.tags == {"env": "prod"}
    with read_session(pki) as session:
        old = session.get(Certificate, first_fp)
        assert old is not None and old.status == "superseded"
        key_row = session.exec(select(PrivateKey).where(PrivateKey.spki_sha256 == current.spki_sha256)).one()
        key = keystore.load_private_key(session, keystore.KeyRef(key_row.id), _ring())
        assert renewal.key_ref == f"key:{key_row.id}"
        shown = managed.uncovered_names(x509_of(current), managed.get(session, "web-1"))
        assert shown == []
        assert audit.verify(session).events > 0
    assert key_matches_certificate(key, x509_of(current))
    assert _row(pki, "web-1").last_error is None

    # Audit: each run's events carry its flow run id; one certificate.issued event per issuance (the
    # private CA only signs; the store step records it).
    issued = [(json.loads(e.details), e.flow_run_id, e.actor, e.object) for e in _events(pki, "certificate.issued")]
    assert [(d["managed"], run) for d, run, _, _ in issued] == [("web-1", str(r)) for r in run_ids]
    assert [o for _, _, _, o in issued] == [f"certificate:{first_fp}", f"certificate:{renewal.fingerprint_sha256}"]
    assert {actor for _, _, actor, _ in issued} == {"prefect:renew-certificate"}
    superseded = _events(pki, "certificate.superseded")
    assert [(e.object, e.flow_run_id) for e in superseded] == [(f"certificate:{first_fp}", str(run_ids[1]))]
    stored = [e for e in _events(pki, "key.stored") if e.flow_run_id]
    assert [e.flow_run_id for e in stored] == [str(r) for r in run_ids]
    assert "renewed web-1" in _logs(run_ids[1])



def test_renew_certificate_refused_keeps_the_old_certificate_and_says_so(pki: sa.Engine) -> None:
    _add(pki, "api-1")
    kept = _seed(pki, "api-1", age_days=25)
    TestIssuerBlock(ca_name=CA_NAME, refuse="policy forbids this name").save("refuser-1", overwrite=True)
    with write_session(pki) as session:  # the operator points it at an issuer that refuses
        session.execute(sa.update(ManagedCertificate).where(ManagedCertificate.name == "api-1")
                        .values(issuer="test-issuer/refuser-1"))
    state = renew_certificate(name="api-1", return_state=True)

    assert state.is_failed()
    assert "renewal of 'api-1' failed at step 'issue' (issuer test-issuer/refuser-1)" in state.message
    assert "policy forbids this name" in state.message
    assert f"certificate {kept[:16]} stays in service" in state.message
    run_id = state.state_details.flow_run_id
    assert "RENEWAL FAILED" in _logs(run_id)
    issue_run = next(t for t in _task_runs(run_id) if t.name == "issue-api-1")
    assert issue_run.state.is_failed() and issue_run.run_count == 1  # permanent: not retried
    current = _current(pki, "api-1")
    assert current is not None and current.fingerprint_sha256 == kept and current.status == "active"
    row = _row(pki, "api-1")
    assert row.last_error and row.last_error.startswith("issue: ") and "policy forbids" in row.last_error
    failed = _events(pki, "renewal.failed")
    assert len(failed) == 1 and failed[0].flow_run_id == str(run_id)
    assert json.loads(failed[0].details)["kept"] == kept
    destroyed = _events(pki, "key.destroyed")  # the key made for the refused order is shredded
    assert len(destroyed) == 1 and destroyed[0].flow_run_id == str(run_id)


def _issued_by_ca(engine: sa.Engine) -> int:
    with read_session(engine) as session:
        return int(next(i for i in ca.list_cas(session) if i["name"] == CA_NAME)["issued"])


def test_renew_certificate_while_another_run_renews_it_fails_at_once_and_issues_nothing(pki: sa.Engine) -> None:
    """renew-certificate takes the renewal claim renew-due's batches take: while another run (here a live
    process of this host) holds it, the run fails naming that run and nothing is asked of the CA; once
    that holder is gone, the next run takes the claim over, renews, and gives it back."""
    _add(pki, "api-held")
    kept = _seed(pki, "api-held", age_days=25)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    holder = f"process:{socket.gethostname()}:{other.pid}"
    try:
        assert renewing.claim(pki, "api-held", holder) is None
        issued = _issued_by_ca(pki)
        state = renew_certificate(name="api-held", return_state=True)

        assert state.is_failed()
        assert f"api-held is being renewed by {holder} now: not renewed again by this run" in state.message
        assert _issued_by_ca(pki) == issued
        assert _current(pki, "api-held").fingerprint_sha256 == kept  # type: ignore[union-attr]
        assert _row(pki, "api-held").last_error is None  # nothing failed about the certificate itself
        with read_session(pki) as session:
            assert [c.holder for c in session.exec(select(RenewalClaim))] == [holder]  # not taken, not released
    finally:
        other.kill()
        other.wait()

    state = renew_certificate(name="api-held", return_state=True)

    assert state.is_completed(), state.message
    assert _issued_by_ca(pki) == issued + 1
    assert _current(pki, "api-held").fingerprint_sha256 != kept  # type: ignore[union-attr]
    with read_session(pki) as session:
        assert session.exec(select(RenewalClaim)).all() == []


def test_the_policy_gate_fails_a_renewal_before_its_issuer_is_asked(pki: sa.Engine, certpilot_home: Path) -> None:
    """renew-certificate's check-policy task and renew-due's task run per certificate refuse a request the
    policy in force (here the home's policy.yaml) refuses: failed at step policy, not retried, no key made,
    the private CA asked for nothing; a certificate the policy accepts renews in the same run."""
    (certpilot_home / "policy.yaml").write_text("rules:\n  san-denied: {patterns: ['*.denied.example.test']}\n")
    _add(pki, "gated", dns=("gated.denied.example.test",))
    _add(pki, "fine")
    kept = _seed(pki, "gated", age_days=25)
    issued, keys = _issued_by_ca(pki), len(_events(pki, "key.stored"))

    state = renew_certificate(name="gated", return_state=True)

    assert state.is_failed()
    assert "renewal of 'gated' failed at step 'policy' (issuer private-ca/test-ca): policy refuses managed " \
           "certificate 'gated': san-denied: denied name gated.denied.example.test" in (state.message or "")
    assert f"certificate {kept[:16]} stays in service" in (state.message or "")
    runs = _settled_task_runs(state.state_details.flow_run_id, {"check-policy-gated"})
    assert runs["check-policy-gated"].state.is_failed() and runs["check-policy-gated"].run_count == 1
    assert "generate-key-gated" not in runs and "issue-gated" not in runs
    assert _row(pki, "gated").last_error.startswith("policy: policy refuses")  # type: ignore[union-attr]
    assert _issued_by_ca(pki) == issued and len(_events(pki, "key.stored")) == keys

    due = renew_due(return_state=True)  # both due: gated (25 days of 30) and fine (none yet)

    assert due.is_failed()
    assert "1 of 2 renewal(s) failed, the certificates in service were kept (1 renewed)" in (due.message or "")
    assert "gated at policy (private-ca/test-ca): policy refuses managed certificate 'gated'" in (due.message or "")
    assert _issued_by_ca(pki) == issued + 1 and _current(pki, "fine") is not None
    assert _current(pki, "gated").fingerprint_sha256 == kept  # type: ignore[union-attr]


def test_renew_certificate_retries_a_busy_issuer(pki: sa.Engine) -> None:
    TestIssuerBlock(ca_name=CA_NAME, busy_times=2).save("busy-twice", overwrite=True)
    attempts["test-issuer/busy-twice"] = 0
    _add(pki, "db-1", issuer="test-issuer/busy-twice")
    state = renew_certificate(name="db-1", return_state=True)
    assert state.is_completed(), state.message
    issue_run = next(t for t in _task_runs(state.state_details.flow_run_id) if t.name == "issue-db-1")
    assert issue_run.run_count == 3 and attempts["test-issuer/busy-twice"] == 3
    assert _current(pki, "db-1") is not None


# ------------------------------------------------------------------------------------------ renew-due

def test_renew_due_one_task_run_per_certificate_and_a_report_naming_the_failures(pki: sa.Engine) -> None:
    TestIssuerBlock(ca_name=CA_NAME, refuse="name not allowed by policy").save("refuser-2", overwrite=True)
    TestIssuerBlock(ca_name=CA_NAME, busy_times=1).save("busy-once", overwrite=True)
    attempts["test-issuer/busy-once"] = 0
    for name in ("svc-1", "svc-2", "svc-3", "svc-old", "svc-fresh"):
        _add(pki, name)
    _add(pki, "svc-ed", key_algorithm="ed25519")  # the private CA refuses Ed25519 for tls-server
    _add(pki, "svc-refused", issuer="test-issuer/refuser-2")
    _add(pki, "svc-busy", issuer="test-issuer/busy-once")
    _add(pki, "svc-orphan", issuer="private-ca/no-such-block")
    old = _seed(pki, "svc-old", age_days=25)  # 30-day certificate, 25 days old: due
    refused_kept = _seed(pki, "svc-refused", age_days=25)
    fresh = _seed(pki, "svc-fresh", age_days=0)  # not due
    due_names = {"svc-1", "svc-2", "svc-3", "svc-old", "svc-ed", "svc-refused", "svc-busy", "svc-orphan"}
    failing = {"svc-ed", "svc-refused", "svc-orphan"}

    state = renew_due(return_state=True)

    assert state.is_failed()
    message = state.message or ""
    assert "3 of 8 renewal(s) failed, the certificates in service were kept (5 renewed)" in message
    assert "svc-ed at issue (private-ca/test-ca)" in message and "Ed25519" in message
    assert "svc-refused at issue (test-issuer/refuser-2)" in message and "name not allowed by policy" in message
    assert "svc-orphan at issue (private-ca/no-such-block)" in message
    run_id = state.state_details.flow_run_id

    renew_runs = [t for t in _task_runs(run_id) if t.task_key.startswith("renew")]
    assert sorted(t.name for t in renew_runs) == sorted(f"renew-{n}" for n in due_names)
    for t in renew_runs:
        name = t.name.removeprefix("renew-")
        assert f"certificate:{name}" in t.tags
        assert t.state.is_failed() == (name in failing), (name, t.state)
    by_name = {t.name: t for t in renew_runs}
    assert by_name["renew-svc-busy"].run_count == 2  # transient: retried, then renewed
    assert by_name["renew-svc-refused"].run_count == 1 and by_name["renew-svc-ed"].run_count == 1  # permanent: not

    for name in due_names - failing:
        current = _current(pki, name)
        assert current is not None and _row(pki, name).last_error is None, name
    assert _current(pki, "svc-old").replaces_fingerprint == old  # type: ignore[union-attr]
    assert _current(pki, "svc-fresh").fingerprint_sha256 == fresh  # type: ignore[union-attr]
    assert _current(pki, "svc-refused").fingerprint_sha256 == refused_kept  # type: ignore[union-attr]
    assert _current(pki, "svc-ed") is None
    assert _row(pki, "svc-orphan").last_error.startswith("issue: ")  # type: ignore[union-attr]

    logs = _logs(run_id)
    assert f"RENEWAL FAILED: svc-refused at step issue (issuer test-issuer/refuser-2): " in logs
    assert f"certificate {refused_kept[:16]} stays in service" in logs
    [artifact] = _artifacts(run_id, "renewals")
    assert "**8** due: **5** renewed, **3** failed" in artifact.data
    for name in due_names:
        assert f"| {name} |" in artifact.data
    assert "svc-fresh" not in artifact.data

    # Every issuer's orders went through its concurrency limit, created for it.
    limits = _api(lambda c: c.read_global_concurrency_limits())
    assert {limit_name(ISSUER), limit_name("test-issuer/busy-once")} <= {lim.name for lim in limits}

    # A second run finds nothing left to do but the failures.
    again = renew_due(return_state=True)
    assert again.is_failed() and "3 of 3 renewal(s) failed" in (again.message or "")


def _limit(issuer: str, slots: int) -> None:
    """Issuer ``issuer``'s concurrency limit, with ``slots`` slots."""
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
    from prefect.exceptions import ObjectAlreadyExists

    async def make(client: Any) -> None:
        try:
            await client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=limit_name(issuer), limit=slots))
        except ObjectAlreadyExists:
            await client.update_global_concurrency_limit(limit_name(issuer), GlobalConcurrencyLimitUpdate(limit=slots))
    _api(make)


def test_renew_due_throttles_each_issuer_by_its_own_slots(pki: sa.Engine) -> None:
    """Two issuers, limits of one and two slots, each order held a while: renew-due gives each issuer at
    most its own slots of orders at once (the slots the flow holds, handed to its task runs), and its
    outcomes come back as typed records."""
    for name, slots in (("one-slot", 1), ("two-slots", 2)):
        TestIssuerBlock(ca_name=CA_NAME, hold_seconds=0.4).save(name, overwrite=True)
        _limit(f"test-issuer/{name}", slots)
        most_at_once[f"test-issuer/{name}"] = 0
        for i in range(5):
            _add(pki, f"{name}-{i}", issuer=f"test-issuer/{name}")

    state = renew_due(return_state=True)

    assert state.is_completed(), state.message
    summary = state.result()
    assert isinstance(summary, renewing.RenewDueSummary)
    assert (summary.due, summary.renewed, summary.failed, summary.failures) == (10, 10, 0, ())
    assert most_at_once["test-issuer/one-slot"] == 1
    assert most_at_once["test-issuer/two-slots"] == 2
    renew_runs = [t for t in _task_runs(state.state_details.flow_run_id) if t.task_key.startswith("renew")]
    assert sorted(t.name for t in renew_runs) == sorted(f"renew-{n}-{i}" for n in ("one-slot", "two-slots")
                                                         for i in range(5))
    assert all(f"certificate:{t.name.removeprefix('renew-')}" in t.tags for t in renew_runs)
    # An issuer holding a semaphore is a task input Prefect does not try to hash (no cache policy).
    assert "cache key" not in _logs(state.state_details.flow_run_id)


# ------------------------------------------------------------------------------------------ secrecy

def test_no_private_key_byte_reaches_prefect(pki: sa.Engine, prefect_files) -> None:  # noqa: ANN001
    """THE proof: after renewals (one of them failing), no byte of any generated key is in Prefect's
    database files, result storage, logs, artifacts, or any flow or task run's parameters and state."""
    _add(pki, "k-1")
    _add(pki, "k-2", key_algorithm="rsa-2048")
    _add(pki, "k-3", key_algorithm="ec-p384")
    _add(pki, "k-bad", key_algorithm="ed25519")
    one = renew_certificate(name="k-1", return_state=True)
    assert one.is_completed(), one.message
    due = renew_due(return_state=True)
    assert due.is_failed()
    run_ids = [one.state_details.flow_run_id, due.state_details.flow_run_id]

    with read_session(pki) as session:  # every live key this renewal work generated
        rows = session.exec(select(PrivateKey).where(PrivateKey.origin == "generated",
                                                     PrivateKey.destroyed_at.is_(None))).all()  # type: ignore[union-attr]
        keys = [keystore.load_private_key(session, keystore.KeyRef(r.id), _ring()) for r in rows]
    assert len(keys) >= 5  # the CA's two and three renewals; the refused key was destroyed

    haystacks: dict[str, bytes] = {}
    for run_id in run_ids:
        run = _flow_run(run_id)
        haystacks[f"flow run {run_id}"] = run.model_dump_json().encode()
        haystacks[f"logs {run_id}"] = _logs(run_id).encode()
        for t in _task_runs(run_id):
            haystacks[f"task run {t.name}"] = t.model_dump_json().encode()
        for artifact in _artifacts(run_id, "renewals"):
            haystacks[f"artifact {artifact.key}"] = str(artifact.data).encode()
    haystacks["state messages"] = f"{one.message} {due.message}".encode()
    haystacks["results"] = json.dumps(one.result().as_dict(), default=str).encode()
    APILogHandler().flush()
    haystacks.update(prefect_files())
    for where, data in haystacks.items():
        assert leaks(data, keys) == [], f"private key material found in {where}"


# ------------------------------------------------------------------------------------------ CLI

def test_cli_renew_runs_the_flows(pki: sa.Engine) -> None:
    from cli.main import app

    _add(pki, "cli-1")
    _add(pki, "cli-2")
    runner = CliRunner()
    result = runner.invoke(app, ["renew", "cli-1"])
    assert result.exit_code == 0, result.output
    assert "renewed cli-1" in result.output
    [run] = _runs_tagged("certificate:cli-1")
    assert run.name == "renew-cli-1" and run.state.is_completed()

    result = runner.invoke(app, ["renew", "--due", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "cli-2" in result.output and "cli-1" not in result.output

    result = runner.invoke(app, ["renew", "--due"])
    assert result.exit_code == 0, result.output
    assert "1 renewed, 0 failed" in result.output
    assert _current(pki, "cli-2") is not None

    _add(pki, "cli-bad", key_algorithm="ed25519")
    result = runner.invoke(app, ["renew", "cli-bad"])
    assert result.exit_code == 1
    assert "failed at step 'issue'" in result.output


# ------------------------------------------------------------------------------------------ ACME

@pytest.fixture(scope="module")
def acme_ca(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, int]]:
    """pebble (30-day certificates) resolving through challtestsrv, validating http-01 on a free port
    where the ACME block's shared responder will listen."""
    from blocks.issuers import _shared_http01_responder
    from tests.integration.acme_servers import ChallTestSrv, Pebble, free_port

    work = tmp_path_factory.mktemp("acme-flow")
    port = free_port()
    with ChallTestSrv.start(work / "dns") as dns, \
            Pebble.start(work / "pebble", dns=dns, http_port=port, validity_seconds=30 * 86400) as pebble:
        yield pebble, port
    _shared_http01_responder("127.0.0.1", port).stop()


def test_acme_renewal_through_the_flows(pki: sa.Engine, acme_ca: tuple[Any, int]) -> None:
    from certpilot.models import AcmeAccount
    from tests.integration.acme_servers import verified_chain

    pebble, port = acme_ca
    AcmeIssuerBlock(directory_url=pebble.directory_url, ca_bundle=str(pebble.ca_bundle), http01_address="127.0.0.1",
                    http01_port=port, contact=["mailto:pki@certpilot.test"]).save("pebble", overwrite=True)
    _add(pki, "shop", issuer="acme-issuer/pebble", dns=("shop.certpilot.test", "www.shop.certpilot.test"))

    first = renew_certificate(name="shop", return_state=True)
    assert first.is_completed(), first.message
    issued_first = _current(pki, "shop")  # read from the inventory: a returned state's data is not always kept
    assert issued_first is not None
    due = renew_due(within_days=25, return_state=True)  # a 30-day certificate is due within 25 days
    assert due.is_completed(), due.message
    assert due.result().renewed == 1

    current = _current(pki, "shop")
    assert current is not None and current.replaces_fingerprint == issued_first.fingerprint_sha256
    with read_session(pki) as session:
        chain = [x509.load_der_x509_certificate(c.der) for c in inventory.chain_of(session, current)]
        [account] = session.exec(select(AcmeAccount)).all()
    assert account.name == "acme-issuer/pebble" and account.directory_url == pebble.directory_url
    verified_chain(chain, pebble.roots()[0], "www.shop.certpilot.test")
    [run] = [t for t in _task_runs(due.state_details.flow_run_id) if t.name == "renew-shop"]
    assert "certificate:shop" in run.tags and run.state.is_completed()
