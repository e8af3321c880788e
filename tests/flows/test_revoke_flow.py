"""Revocation drill with the private CA served over HTTP, against a real Prefect server: the
revoke-certificate flow and `certpilot revoke` (which runs the flow when a Prefect API is configured)
revoke a certificate; `openssl ocsp` at the responder in its AIA says revoked, the CRL at its
distribution point lists it with the reason, the inventory row has status, reason and time, there is
exactly one certificate.revoked event, and the propagation is measured and recorded; revoking again
says when and why it was revoked first and records nothing; unknown certificates, a certificate no
issuer is known for, and an ACME CA that does not answer fail with a precise message and record
nothing; no private key byte reaches Prefect."""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography import x509
from prefect.logging.handlers import APILogHandler
from sqlmodel import col, select
from typer.testing import CliRunner

from blocks.issuers import AcmeIssuerBlock, PrivateCABlock
from certpilot import audit, history, inventory, keystore, managed, renewing
from certpilot.database import get_engine, read_session, write_session
from certpilot.models import AuditEvent, Certificate, PrivateKey
from certpilot.propagation import EVENT as VISIBLE
from certpilot.revoking import RevocationReport
from certpilot.sample_estate import issue_leaf, make_ca
from certpilot.settings import load_settings
from certpilot.x509info import describe_certificate
from cli.main import app
from flows.revoke import ReasonName, revoke_certificate
from lab.ports import free_port
from tasks.revocation import revoke_certificate_task
from tests.flows.test_renew_flows import _artifacts, _flow_run, _logs, _task_runs
from tests.keyprobe import leaks
from tests.private_ca_service import ServedCA, private_ca_served
from tests.revocation_drill import relying_party_view

CA_NAME = "drill"
NAME = "web.drill.test"
ACTOR = audit.Actor("test")


def _ring() -> keystore.KeyRing:
    return keystore.load_key_ring(load_settings())


@pytest.fixture(scope="module")
def block_types(prefect_server: None) -> None:
    PrivateCABlock.register_type_and_schema()
    AcmeIssuerBlock.register_type_and_schema()


@dataclass
class Drill:
    engine: sa.Engine
    ca: ServedCA
    workdir: Path

    def leaf(self, fingerprint: str) -> x509.Certificate:
        with read_session(self.engine) as session:
            row = session.get(Certificate, fingerprint)
            assert row is not None
            return x509.load_der_x509_certificate(row.der)

    def row(self, fingerprint: str) -> Certificate:
        with read_session(self.engine) as session:
            row = session.get(Certificate, fingerprint)
            assert row is not None
            return row

    def events(self, action: str, fingerprint: str) -> list[AuditEvent]:
        with read_session(self.engine) as session:
            return list(session.exec(select(AuditEvent).where(AuditEvent.action == action,
                                                              AuditEvent.object == f"certificate:{fingerprint}")).all())

    def seen(self, fingerprint: str, where: str) -> Any:
        return relying_party_view(self.leaf(fingerprint), self.ca.issuing, self.ca.root, self.workdir / where)


@pytest.fixture
def drill(block_types: None, certpilot_home: Path, tmp_path: Path) -> Iterator[Drill]:
    """CA "drill" served on a loopback port (its certificates' OCSP and CRL URLs point there), its issuer
    block saved, and managed certificate NAME with a certificate from it."""
    engine = get_engine()
    with private_ca_served(engine, CA_NAME) as served:
        PrivateCABlock(ca_name=CA_NAME).save(CA_NAME, overwrite=True)
        with write_session(engine) as session:
            managed.add(session, managed.ManagedSpec(name=NAME, dns_names=(NAME,), issuer=f"private-ca/{CA_NAME}",
                                                         owner="platform"), ACTOR)
        renewing.renew_one(engine, NAME, served.issuer, _ring, ACTOR)
        yield Drill(engine, served, tmp_path)


def _current(drill: Drill) -> str:
    with read_session(drill.engine) as session:
        row = managed.current_certificate(session, managed.get(session, NAME))
        assert row is not None
        return row.fingerprint_sha256


def test_the_flow_revokes_records_once_and_measures_propagation(drill: Drill, prefect_files: Any) -> None:
    fingerprint = _current(drill)
    assert "good" in drill.seen(fingerprint, "before").ocsp_text

    state = revoke_certificate(certificate=NAME, reason="key-compromise", return_state=True)

    assert state.is_completed(), state.message
    report: RevocationReport = state.result()
    outcome = report.outcome
    assert (outcome.fingerprint_sha256, outcome.managed, outcome.reason, outcome.already, outcome.signed_with) == (
        fingerprint, NAME, "key-compromise", False, "ca")
    view = drill.seen(fingerprint, "after")
    assert "leaf.pem: revoked" in view.ocsp_text and "Reason: keyCompromise" in view.ocsp_text
    assert "Response verify OK" in view.ocsp_text
    assert view.crl_reason == x509.ReasonFlags.key_compromise
    row = drill.row(fingerprint)
    assert (row.status, row.revocation_reason, row.revoked_at) == ("revoked", "keyCompromise", outcome.revoked_at)
    assert row.revoked_at is not None and view.crl_entry is not None
    assert view.crl_entry.revocation_date_utc == row.revoked_at.replace(microsecond=0)
    assert len(drill.events("certificate.revoked", fingerprint)) == 1
    # Propagation: both the CRL and OCSP were seen saying revoked, and recorded once.
    propagation = report.propagation
    assert propagation is not None and propagation.seconds is not None, propagation
    assert propagation.crl_seconds is not None and propagation.ocsp_seconds is not None
    [visible] = drill.events(VISIBLE, fingerprint)
    assert json.loads(visible.details)["seconds"] == round(propagation.seconds, 3)
    # The run is the certificate's: tagged with it, and its history artifact lists the revocation.
    run_id = state.state_details.flow_run_id
    assert managed.certificate_tag(NAME) in _flow_run(run_id).tags
    [artifact] = _artifacts(run_id, history.artifact_key(NAME))
    assert "certificate.revoked" in str(artifact.data) and VISIBLE in str(artifact.data)
    assert f"revoked {fingerprint}" in _logs(run_id)

    again = revoke_certificate(certificate=NAME, reason="superseded", return_state=True)

    assert again.is_completed(), again.message
    repeat = again.result().outcome
    assert (repeat.already, repeat.reason, repeat.revoked_at, repeat.fingerprint_sha256) == (
        True, "key-compromise", outcome.revoked_at, fingerprint)
    assert len(drill.events("certificate.revoked", fingerprint)) == 1 and len(drill.events(VISIBLE, fingerprint)) == 1
    assert "already revoked on" in _logs(again.state_details.flow_run_id)

    # No private key byte anywhere in Prefect: results, runs, task runs, logs, artifacts, its database and storage.
    with read_session(drill.engine) as session:
        rows = session.exec(select(PrivateKey).where(col(PrivateKey.destroyed_at).is_(None))).all()
        keys = [keystore.load_private_key(session, keystore.KeyRef(r.id), _ring()) for r in rows]
    assert len(keys) >= 3  # the CA's two and the certificate's
    haystacks: dict[str, bytes] = {"result": json.dumps(report.as_dict()).encode() + pickle.dumps(report)}
    for done in (state, again):
        run = done.state_details.flow_run_id
        haystacks[f"flow run {run}"] = _flow_run(run).model_dump_json().encode()
        haystacks[f"logs {run}"] = _logs(run).encode()
        for t in _task_runs(run):
            haystacks[f"task run {t.name}"] = t.model_dump_json().encode()
        for a in _artifacts(run, history.artifact_key(NAME)):
            haystacks[f"artifact {run}"] = str(a.data).encode()
    APILogHandler().flush()
    haystacks.update(prefect_files())
    for where, data in haystacks.items():
        assert leaks(data, keys) == [], f"private key material found in {where}"


def _cli(*args: str) -> Any:
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "250"})


def test_cli_revokes_an_unmanaged_certificate_with_its_cas_block(drill: Drill) -> None:
    issued = drill.ca.issue("api.drill.test")  # recorded in the inventory, managed by nothing
    fingerprint = describe_certificate(issued.leaf).fingerprint_sha256

    result = _cli("revoke", fingerprint[:12], "--reason", "superseded", "--json")

    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert (printed["fingerprint_sha256"], printed["reason"], printed["already_revoked"], printed["managed"]) == (
        fingerprint, "superseded", False, None)
    assert printed["propagation"]["seconds"] is not None
    view = drill.seen(fingerprint, "cli")
    assert "leaf.pem: revoked" in view.ocsp_text and "Reason: superseded" in view.ocsp_text
    assert view.crl_reason == x509.ReasonFlags.superseded
    row = drill.row(fingerprint)
    assert (row.status, row.revocation_reason, inventory.iso(row.revoked_at)) == (
        "revoked", "superseded", printed["revoked_at"])
    assert len(drill.events("certificate.revoked", fingerprint)) == 1

    repeat = _cli("revoke", f"serial:{issued.leaf.serial_number:x}", "--reason", "key-compromise")

    assert repeat.exit_code == 0, repeat.output
    assert f"was already revoked on {printed['revoked_at']} (reason superseded)" in repeat.stdout
    assert "nothing changed" in repeat.stdout
    assert len(drill.events("certificate.revoked", fingerprint)) == 1 and len(drill.events(VISIBLE, fingerprint)) == 1


def test_unknown_certificates_fail_with_what_was_looked_for(drill: Drill) -> None:
    before = len(_all_events(drill.engine))
    cases = {("no-such-certificate",): "no managed certificate named 'no-such-certificate'",
             ("0123456789abcdef",): "no certificate with fingerprint '0123456789abcdef'",
             ("serial:0badc0de",): "no certificate with serial number 0badc0de",
             ("abc",): "at least 8 hex digits"}
    for (ident,), message in cases.items():
        result = _cli("revoke", ident, "--reason", "superseded", "--json")
        assert result.exit_code == 1, (ident, result.output)
        assert message in json.loads(result.stdout)["error"], (ident, result.stdout)
        assert "Traceback" not in result.output
    bad = _cli("revoke", NAME, "--reason", "on-a-whim")
    assert bad.exit_code == 2 and "key-compromise" in bad.output
    assert len(_all_events(drill.engine)) == before


def _all_events(engine: sa.Engine) -> list[AuditEvent]:
    with read_session(engine) as session:
        return list(session.exec(select(AuditEvent)).all())


def test_no_issuer_known_and_an_acme_ca_that_does_not_answer_record_nothing(drill: Drill,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(revoke_certificate_task, "retry_delay_seconds", [0.01, 0.01])  # it retries a CA's failure
    outside = make_ca("Outside CA")
    leaf, _ = issue_leaf(outside, ["outside.drill.test"], drill.ca.issuing.not_valid_after_utc)
    with write_session(drill.engine) as session:
        inventory.upsert(session, [inventory.Observation(describe_certificate(c), None, "test")
                                   for c in (outside.certificate, leaf)], ACTOR)
    fingerprint = describe_certificate(leaf).fingerprint_sha256
    before = len(_all_events(drill.engine))

    unknown = _cli("revoke", fingerprint, "--reason", "superseded")
    assert unknown.exit_code == 1
    assert "is not managed and was not issued by a certpilot private CA" in unknown.output
    assert "--issuer" in unknown.output

    port = free_port()  # nothing listens there
    AcmeIssuerBlock(directory_url=f"https://127.0.0.1:{port}/dir", http01_address="127.0.0.1", http01_port=0,
                    timeout_seconds=3).save("dead-acme", overwrite=True)
    dead = _cli("revoke", fingerprint, "--reason", "key-compromise", "--issuer", "acme-issuer/dead-acme")

    assert dead.exit_code == 1, dead.output
    assert "acme-issuer/dead-acme" in dead.output and f"127.0.0.1:{port}" in dead.output
    assert "Traceback" not in dead.output
    row = drill.row(fingerprint)
    assert (row.status, row.revoked_at, row.revocation_reason) == ("active", None, None)
    assert [e.action for e in _all_events(drill.engine)[before:]] == []


def test_reason_choices_are_the_cas() -> None:
    from typing import get_args

    from certpilot.ca import REASONS

    assert list(get_args(ReasonName)) == list(REASONS)
