"""The revoke-and-replace flow against a real Prefect server and a lab fleet (lab.fleet: one sshd fronting
nginx and haproxy instances, managed certificates of a private CA whose CRL and OCSP are served over
HTTP). What is checked is read where it shows: the certificate served on the wire, the inventory's rows
and audit trail, the OCSP responder in the old certificate's AIA.

- a dry run publishes the blast radius and changes nothing;
- a key-compromise run over three certificates: every target serves its new certificate, none shares
  a key with the old one, the old ones are revoked in the inventory and by OCSP;
- revoke_first: each old certificate is revoked before its replacement is issued (audit order);
- a replacement that fails verification is rolled back and not revoked; the run fails naming it, the
  others are done; run again once fixed, the campaign resumes and finishes;
- a scope that matches nothing: the dry run says so and completes, the real run fails saying so;
- killed (SIGKILL) at several points and run again: the campaign converges, no certificate is issued
  twice for one old certificate, none is revoked before its replacement is verified, no target mixed.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography import x509
from prefect.logging.handlers import APILogHandler
from prefect.settings import PREFECT_API_URL
from sqlmodel import col, func, select

from certpilot import audit, keystore, managed, propagation, targets
from certpilot.blast_radius import BlastRadius
from certpilot.database import read_session, write_session
from certpilot.models import AuditEvent, Certificate, PrivateKey, ReplacementItem, ReplacementRun, Target
from certpilot.replacing import CampaignReport, State
from certpilot.scope import Scope
from connectors.revocation import RevocationChecker, RevocationStatus, watch_revocation
from flows.revoke_and_replace import revoke_and_replace
from lab.fleet import Fleet
from tests.flows.fleet_fixtures import CA_NAME, inventory, make_fleet, ring  # noqa: F401 (fixtures)
from tests.flows.test_renew_flows import _artifacts, _flow_run, _logs, _task_runs
from tests.keyprobe import leaks

ROOT = Path(__file__).resolve().parents[2]
REAL = {"issuer": CA_NAME, "dry_run": False}
ACTOR = audit.Actor("test")


# ------------------------------------------------------------------------------------------ helpers

def _snapshot(engine: sa.Engine) -> tuple[Any, ...]:
    """Everything a dry run must leave alone: certificates and their status, targets, keys, the audit head."""
    with read_session(engine) as session:
        certificates = sorted(session.execute(sa.select(col(Certificate.fingerprint_sha256),
                                                        col(Certificate.status))).all())
        rows = sorted((t.name, t.desired_fingerprint, t.verified_fingerprint) for t in session.exec(select(Target)))
        head = session.exec(select(func.max(AuditEvent.seq))).one()
        campaigns = session.exec(select(func.count()).select_from(ReplacementRun)).one()
    return certificates, rows, head, campaigns


def _events(engine: sa.Engine, action: str) -> list[tuple[int, str, dict[str, Any]]]:
    with read_session(engine) as session:
        rows = session.exec(select(AuditEvent).where(AuditEvent.action == action).order_by(col(AuditEvent.seq))).all()
        return [(e.seq, e.object, json.loads(e.details)) for e in rows]


def _row(engine: sa.Engine, fingerprint: str) -> Certificate:
    with read_session(engine) as session:
        row = session.get(Certificate, fingerprint)
        assert row is not None
        return row


def _served_everywhere(fleet: Fleet) -> None:
    """No target mixed: every endpoint serves its managed certificate's newest certificate, on the wire."""
    assert fleet.not_serving_current() == []


def _seen_revoked(fleet: Fleet, fingerprint: str) -> bool:
    """Whether the OCSP responder in the certificate's own AIA and the CRL at its distribution point both
    say revoked, asked as a relying party would (connectors.revocation.watch_revocation)."""
    assert fleet.issuing is not None
    row = _row(fleet.engine, fingerprint)
    leaf = x509.load_der_x509_certificate(row.der)
    if row.revoked_at is None:  # not revoked in the inventory: what do the CA's CRL and OCSP say?
        with RevocationChecker(timeout=5) as checker:
            return checker.check(leaf, fleet.issuing).status is RevocationStatus.REVOKED
    seen = watch_revocation(leaf, fleet.issuing, row.revoked_at, timeout=10)
    assert seen.ocsp_url and seen.crl_url, seen.detail
    return seen.ocsp_seconds is not None and seen.crl_seconds is not None


# ------------------------------------------------------------------------------------------ dry run

def test_dry_run_publishes_the_blast_radius_and_changes_nothing(make_fleet: Callable[..., Fleet]) -> None:
    fleet = make_fleet(certificates=3, nginx=1, haproxy=1)
    before, served = _snapshot(fleet.engine), fleet.served()

    state = revoke_and_replace(issuer=CA_NAME, return_state=True)  # dry_run is the default

    assert state.is_completed(), state.message
    assert "DRY RUN, nothing changed: 3 certificate(s) in scope: 3 to replace" in (state.message or "")
    radius = state.result()
    assert isinstance(radius, BlastRadius) and len(radius.items) == 3
    run_id = state.state_details.flow_run_id
    [artifact] = _artifacts(run_id, "blast-radius")
    for site in fleet.sites:
        assert site.managed in artifact.data and site.instance in artifact.data
    run = _flow_run(run_id)
    assert run.name == f"revoke-and-replace-issuer={CA_NAME}-dry-run"
    assert {f"certificate:{s.managed}" for s in fleet.sites} <= set(run.tags)
    assert _snapshot(fleet.engine) == before and fleet.served() == served


def test_a_scope_that_matches_nothing(make_fleet: Callable[..., Fleet]) -> None:
    fleet = make_fleet(certificates=1, nginx=1, haproxy=0)
    before = _snapshot(fleet.engine)
    dry = revoke_and_replace(domain_suffix="nowhere.test", return_state=True)
    assert dry.is_completed(), dry.message
    assert "nothing matched the scope suffix=nowhere.test" in (dry.message or "")
    real = revoke_and_replace(domain_suffix="nowhere.test", dry_run=False, return_state=True)
    assert real.is_failed()
    assert "nothing matched the scope suffix=nowhere.test" in (real.message or "")
    assert _snapshot(fleet.engine) == before


# ------------------------------------------------------------------------------------------ real runs

def test_key_compromise_replaces_everywhere_then_revokes(make_fleet: Callable[..., Fleet]) -> None:
    fleet = make_fleet(certificates=3, nginx=1, haproxy=1, replicas=2)  # each served by an nginx and a haproxy
    old = fleet.current()

    state = revoke_and_replace(**REAL, return_state=True)

    assert state.is_completed(), state.message
    report = state.result()
    assert isinstance(report, CampaignReport) and report.ok
    new = fleet.current()
    assert set(new) == set(old) and not set(new.values()) & set(old.values())
    _served_everywhere(fleet)
    for name, fingerprint in old.items():
        was, now = _row(fleet.engine, fingerprint), _row(fleet.engine, new[name])
        assert (was.status, was.revocation_reason) == ("revoked", "keyCompromise")
        assert now.spki_sha256 != was.spki_sha256  # a new key, never the compromised one
        assert now.replaces_fingerprint == fingerprint
        assert _seen_revoked(fleet, fingerprint) and not _seen_revoked(fleet, new[name])
    assert {r.item.state for r in report.items} == {State.DONE}
    assert all(r.verified == r.targets == 2 for r in report.items)
    run_id = state.state_details.flow_run_id
    runs = {t.name: t for t in _task_runs(run_id)}
    for name in old:
        assert f"certificate:{name}" in runs[f"replace-{name}"].tags
        assert _artifacts(run_id, f"certificate-{name}")
    [artifact] = _artifacts(run_id, "revoke-and-replace")
    assert "# Revoke-and-replace: done" in artifact.data and all(fp[:16] in artifact.data for fp in old.values())
    assert "canary" in _logs(run_id)
    # Each revocation watched as a relying party would (its CRL and its OCSP responder) and recorded once (M6).
    with read_session(fleet.engine) as session:
        seen = propagation.measurements(session, list(old.values()))
    assert sorted(seen) == sorted(old.values()) and all(m.seconds is not None and m.seconds < 10 for m in seen.values())


def _issued_for(engine: sa.Engine, old: str) -> list[str]:
    """The certificates recorded as replacing ``old``."""
    with read_session(engine) as session:
        return list(session.exec(select(Certificate.fingerprint_sha256).where(Certificate.replaces_fingerprint == old)))


def test_revoke_first_revokes_before_the_replacement_is_issued(make_fleet: Callable[..., Fleet]) -> None:
    fleet = make_fleet(certificates=2, nginx=1, haproxy=1)
    old = fleet.current()

    report = revoke_and_replace(**REAL, revoke_first=True, reason="superseded")

    assert isinstance(report, CampaignReport) and report.ok and report.campaign.revoke_first
    revoked = {obj.partition(":")[2]: seq for seq, obj, _ in _events(fleet.engine, "certificate.revoked")}
    issued = {details["replaces"]: seq for seq, _, details in _events(fleet.engine, "certificate.issued")
              if details.get("replaces")}
    for name, fingerprint in old.items():
        assert revoked[fingerprint] < issued[fingerprint], name  # revoked first, then its replacement issued
        assert _row(fleet.engine, fingerprint).revocation_reason == "superseded"
        assert _issued_for(fleet.engine, fingerprint) == [fleet.current()[name]]
    _served_everywhere(fleet)


def test_a_replacement_that_fails_verification_is_not_revoked(make_fleet: Callable[..., Fleet]) -> None:
    fleet = make_fleet(certificates=3, nginx=1, haproxy=1)
    old = fleet.current()
    broken = fleet.sites[2]  # cert-0002 on nginx00: verified against cert-0000's site, which serves another certificate
    decoy = fleet.endpoint(fleet.sites[0])[1]
    with write_session(fleet.engine) as session:
        row = targets.get_target(session, broken.managed, broken.instance)
        good = dict(row.settings)
        targets.configure(session, broken.managed, broken.instance, row.kind, row.block or "",
                          {**good, "verify_port": decoy, "verify_timeout": 1.5}, ACTOR)

    state = revoke_and_replace(**REAL, return_state=True)

    assert state.is_failed()
    message = state.message or ""
    assert f"1 replacement(s) failed" in message and f"{broken.managed} ({old[broken.managed][:16]})" in message
    assert "verify" in message
    failed = _row(fleet.engine, old[broken.managed])
    assert failed.status != "revoked" and not _seen_revoked(fleet, old[broken.managed])
    served = {site.managed: fp for site, fp in fleet.served().items()}
    assert served[broken.managed] == old[broken.managed]  # rolled back: the old certificate still served
    for name in old:
        if name != broken.managed:
            assert _row(fleet.engine, old[name]).status == "revoked" and served[name] == fleet.current()[name]
    with read_session(fleet.engine) as session:
        items = {i.managed: i for i in session.exec(select(ReplacementItem))}
        assert session.exec(select(ReplacementRun.status)).one() == "failed"
    assert items[broken.managed].state == State.FAILED and "verify" in (items[broken.managed].error or "")
    [artifact] = _artifacts(state.state_details.flow_run_id, "revoke-and-replace")
    assert "# Revoke-and-replace: FAILED" in artifact.data and "| failed |" in artifact.data

    # Fixed, and run again: the campaign resumes where it failed, with the certificate already issued for it.
    issued_before = _issued_for(fleet.engine, old[broken.managed])
    with write_session(fleet.engine) as session:
        row = targets.get_target(session, broken.managed, broken.instance)
        targets.configure(session, broken.managed, broken.instance, row.kind, row.block or "", good, ACTOR)
    again = revoke_and_replace(**REAL)
    assert isinstance(again, CampaignReport) and again.ok and again.campaign.resumed
    assert again.campaign.id == items[broken.managed].run_id
    assert _issued_for(fleet.engine, old[broken.managed]) == issued_before  # not issued a second time
    assert _row(fleet.engine, old[broken.managed]).status == "revoked"
    _served_everywhere(fleet)


def test_no_key_byte_reaches_prefect(make_fleet: Callable[..., Fleet],
                                     prefect_files: Callable[[], dict[str, bytes]]) -> None:
    """After a real run (one replacement failing verification, so its error travels too): no private key,
    old or new, in the flow run, its task runs, logs, artifacts, state message, result, Prefect's database
    or its result storage."""
    fleet = make_fleet(certificates=2, nginx=1, haproxy=1)
    broken = fleet.sites[1]
    with write_session(fleet.engine) as session:
        row = targets.get_target(session, broken.managed, broken.instance)
        targets.configure(session, broken.managed, broken.instance, row.kind, row.block or "",
                          {**row.settings, "verify_port": fleet.endpoint(fleet.sites[0])[1], "verify_timeout": 1},
                          ACTOR)
    state = revoke_and_replace(**REAL, return_state=True)
    assert state.is_failed()
    with read_session(fleet.engine) as session:
        keys = [keystore.load_private_key(session, keystore.KeyRef(r.id), ring())
                for r in session.exec(select(PrivateKey).where(col(PrivateKey.destroyed_at).is_(None)))]
    assert len(keys) >= 2 + 2 + 2  # the CA's two, the two old certificates' and the two new ones'
    run_id = state.state_details.flow_run_id
    haystacks: dict[str, bytes] = {"state message": (state.message or "").encode(),
                                   "failure": pickle.dumps(state.result(raise_on_failure=False)),
                                   "flow run": _flow_run(run_id).model_dump_json().encode(),
                                   "logs": _logs(run_id).encode()}
    for task_run in _task_runs(run_id):
        haystacks[f"task run {task_run.name}"] = task_run.model_dump_json().encode()
    for key in ("revoke-and-replace", *(f"certificate-{name}" for name in fleet.current())):
        for artifact in _artifacts(run_id, key):
            haystacks[f"artifact {key}"] = str(artifact.data).encode()
    APILogHandler().flush()
    haystacks.update(prefect_files())
    for where, data in haystacks.items():
        assert leaks(data, keys) == [], f"private key material found in {where}"


# ------------------------------------------------------------------------------------------ kills

def _kill_at(state: str, nth: int, parameters: dict[str, Any]) -> None:
    """Run the flow in a child process that SIGKILLs itself right after the nth time an item reaches ``state``."""
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    child = subprocess.run([sys.executable, "-m", "tests.replacement_killer", state, str(nth), json.dumps(parameters)],
                           cwd=ROOT, env=env, capture_output=True, timeout=180)
    assert child.returncode == -9, child.stderr.decode(errors="replace")[-3000:]


def _head(engine: sa.Engine) -> int:
    with read_session(engine) as session:
        return session.exec(select(func.max(AuditEvent.seq))).one() or 0


@pytest.mark.parametrize(("state", "nth"), [("key", 1), ("deployed", 1), ("issued", 2), ("revoked", 2)],
                         ids=["after-the-canary-key", "after-the-canary-deploy", "after-an-issue", "after-a-revoke"])
def test_killed_then_run_again_converges(make_fleet: Callable[..., Fleet], state: str, nth: int) -> None:
    # The killed run's issuer slots stay leased after the kill (flows.revoke_and_replace.ISSUER_LEASE_SECONDS):
    # each run takes 2 of the issuer's 4, so the run started after it finds two free. An issuer (a CA) of
    # this test's own, so that no slot leased by another test's killed run is in the way.
    ca_name = f"kill-{state}"
    fleet = make_fleet(certificates=3, nginx=1, haproxy=1, ca_name=ca_name)
    parameters = {"issuer": ca_name, "dry_run": False, "concurrency": 2}
    old = fleet.current()
    head = _head(fleet.engine)

    _kill_at(state, nth, parameters)
    with read_session(fleet.engine) as session:
        reached = [i.state for i in session.exec(select(ReplacementItem))]
    assert state in reached or (state == "revoked" and "done" in reached), reached

    report = revoke_and_replace(**parameters)

    assert isinstance(report, CampaignReport) and report.ok and report.campaign.resumed
    assert {r.item.state for r in report.items} == {State.DONE}
    new = fleet.current()
    with read_session(fleet.engine) as session:
        events = session.exec(select(AuditEvent).where(AuditEvent.seq > head).order_by(col(AuditEvent.seq))).all()
    keys = [e for e in events if e.action == "key.stored"]
    assert len(keys) == len(old)  # one new key per certificate, made once: reused after the kill
    for name, fingerprint in old.items():
        # Issued once for each old certificate, however often the run was started.
        assert _issued_for(fleet.engine, fingerprint) == [new[name]]
        issued = [e for e in events
                  if e.action == "certificate.issued" and json.loads(e.details).get("replaces") == fingerprint]
        assert len(issued) == 1
        # Revoked only after its replacement was proven served on its target.
        revoked = [e.seq for e in events
                   if e.action == "certificate.revoked" and e.object == f"certificate:{fingerprint}"]
        verified = [e.seq for e in events if e.action == "target.verified" and e.object.startswith(f"target:{name}/")
                    and json.loads(e.details)["fingerprint"] == new[name]]
        assert len(revoked) == 1 and verified and min(verified) < revoked[0], name
        assert _row(fleet.engine, fingerprint).status == "revoked"
    # No target left mixed: each serves its managed certificate's newest certificate, as recorded.
    _served_everywhere(fleet)
    with read_session(fleet.engine) as session:
        rows = {managed.get(session, s.managed).name: targets.get_target(session, s.managed, s.instance)
                for s in fleet.sites}
    assert {name: (t.desired_fingerprint, t.verified_fingerprint) for name, t in rows.items()} == \
        {name: (fp, fp) for name, fp in new.items()}


# ------------------------------------------------------------------------------------------ the CLI

def test_cli_dry_run_then_real_run(make_fleet: Callable[..., Fleet]) -> None:
    from typer.testing import CliRunner

    from cli.main import app

    fleet = make_fleet(certificates=2, nginx=1, haproxy=1)
    old = fleet.current()
    dry = CliRunner().invoke(app, ["revoke-and-replace", "--scope", f"issuer={CA_NAME}"])
    assert dry.exit_code == 0, dry.output
    assert dry.output.startswith("DRY RUN: nothing was changed") and "2 to replace" in dry.output
    assert fleet.current() == old

    nothing = CliRunner().invoke(app, ["revoke-and-replace", "--scope", "suffix=nowhere.test", "--no-dry-run"])
    assert nothing.exit_code == 1 and "nothing matched the scope suffix=nowhere.test" in nothing.output

    real = CliRunner().invoke(app, ["revoke-and-replace", "--scope", f"issuer={CA_NAME}", "--no-dry-run",
                                    "--reason", "superseded", "--concurrency", "2", "--json"])
    assert real.exit_code == 0, real.output
    report = json.loads(real.output)
    assert report["totals"]["replaced"] == 2 and report["reason"] == "superseded"
    assert {i["old_fingerprint"] for i in report["items"]} == set(old.values())
    _served_everywhere(fleet)


def test_the_cli_path_without_a_prefect_api(make_fleet: Callable[..., Fleet]) -> None:
    """What `certpilot revoke-and-replace --no-dry-run` runs when no Prefect API is configured: the same
    campaign in this process, a thread per certificate (here called directly; the blocks are read from the
    test's Prefect server)."""
    from cli.replace import directly

    fleet = make_fleet(certificates=3, nginx=1, haproxy=1)
    old = fleet.current()
    scope = Scope(issuer=CA_NAME)
    radius = directly(scope, "key-compromise", False, True, 4)
    assert isinstance(radius, BlastRadius) and radius.counts["replace"] == 3 and fleet.current() == old

    report = directly(scope, "key-compromise", False, False, 4)

    assert isinstance(report, CampaignReport) and report.ok and report.exposure is not None
    assert len(report.exposure.clean) == 3
    assert all(_row(fleet.engine, fp).status == "revoked" for fp in old.values())
    _served_everywhere(fleet)
