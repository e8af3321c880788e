"""Retiring a managed certificate through the retire and restore-retired flows, against a real Prefect
server, a real sshd, two nginx and one haproxy target (lab.fleet): the files moved aside then gone, what each
server serves on the wire, the certificate served again after a restore, then a confirmed retirement that
revokes it and crypto-shreds its key; and `certpilot target remove`."""

from __future__ import annotations

import json
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from typer.testing import CliRunner

from blocks.issuers import PrivateCABlock
from certpilot import audit, keystore, managed, renewing, retiring, targets
from certpilot.database import read_session, write_session
from certpilot.errors import PermanentError
from certpilot.models import AuditEvent, Certificate, PrivateKey
from certpilot.settings import load_settings
from cli.main import app
from connectors.ssh_deploy import RETIRED_SUFFIX
from flows.retire import restore_retired, retire
from lab.fleet import Fleet
from lab.sshd import openssh_public_line
from tests.flows.test_renew_flows import _artifacts, _logs, _task_runs
from tests.keyprobe import leaks

NAME = "cert-0000"
ACTOR = audit.Actor("test")


def _ring() -> keystore.KeyRing:
    return keystore.load_key_ring(load_settings())


@pytest.fixture
def fleet(engine: sa.Engine, tmp_path: Path) -> Iterator[Fleet]:
    """One managed certificate served by two nginx instances and one haproxy (its runtime API) behind one sshd;
    nginx00's target has a remove_command that takes the site out of nginx's configuration and reloads, and
    a restore_command that puts it back."""
    with Fleet(tmp_path / "fleet", engine, _ring, certificates=1, nginx=2, haproxy=1, replicas=3) as built:
        built.save_block()
        PrivateCABlock.register_type_and_schema()
        PrivateCABlock(ca_name=built.ca_name).save(built.ca_name, overwrite=True)
        nginx = built.nginx["nginx00"]
        serving = nginx.conf.with_name("nginx.conf.serving")
        serving.write_text(nginx.conf.read_text())
        sites, nginx.sites = nginx.sites, {}
        nginx.write_config()  # the same nginx without the site
        retired = nginx.conf.with_name("nginx.conf.retired")
        retired.write_text(nginx.conf.read_text())
        nginx.sites = sites
        nginx.conf.write_text(serving.read_text())
        with write_session(engine) as session:
            row = targets.get_target(session, NAME, "nginx00")
            targets.configure(session, NAME, "nginx00", row.kind, row.block or "", {
                **row.settings, "remove_command": f"cp {shlex.quote(str(retired))} {shlex.quote(str(nginx.conf))} && "
                                                  f"{nginx.reload_command}",
                "restore_command": f"cp {shlex.quote(str(serving))} {shlex.quote(str(nginx.conf))}"}, ACTOR)
        yield built


def _files(fleet: Fleet) -> dict[str, list[Path]]:
    """The certificate and key files of each target, as they are on disk now."""
    site = fleet.sites_of(NAME)[0].server_name
    n0, n1, h = fleet.nginx["nginx00"].site(site), fleet.nginx["nginx01"].site(site), fleet.haproxy["haproxy00"]
    return {"nginx00": [n0.certificate_path, n0.key_path], "nginx01": [n1.certificate_path, n1.key_path],
            "haproxy00": [h.pem_path]}


def _served(fleet: Fleet) -> dict[str, str | None]:
    return {site.instance: fp for site, fp in fleet.served(fleet.sites_of(NAME), timeout=3).items()}


def _status(fleet: Fleet) -> str:
    with read_session(fleet.engine) as session:
        return managed.get(session, NAME).status


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_retire_restore_then_confirm_on_real_targets(fleet: Fleet, certpilot_home: Path) -> None:
    fingerprint = fleet.current()[NAME]
    files = _files(fleet)
    contents = {path: path.read_bytes() for paths in files.values() for path in paths}
    assert set(_served(fleet).values()) == {fingerprint}

    # First step: every target taken off, the files kept aside, renewal stopped.
    state = retire(NAME, revoke="cessation-of-operation", destroy_key=True, return_state=True)
    assert state.is_completed(), state.message
    report = state.result()
    assert report.status == retiring.RETIRING and {(o.target, o.step, o.ok) for o in report.targets} == {
        ("nginx00", "remove", True), ("nginx01", "remove", True), ("haproxy00", "remove", True)}
    for path, data in contents.items():
        kept = path.with_name(path.name + RETIRED_SUFFIX)
        assert not path.exists() and kept.read_bytes() == data
    assert (files["nginx00"][1].with_name(files["nginx00"][1].name + RETIRED_SUFFIX).stat().st_mode & 0o777) == 0o600
    removals = {o.target: o.removal for o in report.targets}
    assert removals["nginx00"].served is False  # its remove_command took the site out and reloaded
    assert removals["nginx01"].served is True and "nginx was not reloaded" in removals["nginx01"].note
    assert removals["haproxy00"].served is True and "runtime API did not drop it" in removals["haproxy00"].note
    served = _served(fleet)
    assert served["nginx00"] is None and served["nginx01"] == served["haproxy00"] == fingerprint
    assert _status(fleet) == retiring.RETIRING
    with read_session(fleet.engine) as session:
        assert NAME not in [s.managed.name for s in managed.schedule(session)]
        assert {t.name: t.desired_fingerprint for t in targets.list_targets(session, NAME)} == dict.fromkeys(files)
    with pytest.raises(PermanentError, match="being retired"):
        renewing.plan(fleet.engine, NAME)
    artifact = _artifacts(state.state_details.flow_run_id, "retirement-cert-0000")[0].data
    assert "restorable until confirmed" in artifact and "| nginx01 | ssh-nginx | remove | done |" in artifact

    # Restore: every file back, the certificate proven served again (nginx00 serves it again on the wire).
    state = restore_retired(NAME, return_state=True)
    assert state.is_completed(), state.message
    assert state.result().status == retiring.ACTIVE and _status(fleet) == retiring.ACTIVE
    assert all(path.read_bytes() == data for path, data in contents.items())
    assert not any(p.name.endswith(RETIRED_SUFFIX) for paths in files.values() for p in paths[0].parent.iterdir())
    assert set(_served(fleet).values()) == {fingerprint}
    with read_session(fleet.engine) as session:
        assert {(t.desired_fingerprint, t.verified_fingerprint) for t in targets.list_targets(session, NAME)} == {
            (fingerprint, fingerprint)}

    # Retire again and confirm at once (through the CLI, which runs the flow): purged, revoked, key shredded.
    with read_session(fleet.engine) as session:
        key_id = keystore.find_key(session, session.get(Certificate, fingerprint).spki_sha256).id
        sealed = session.get(PrivateKey, key_id).ciphertext
    result = CliRunner().invoke(app, ["managed", "retire", NAME, "--revoke", "cessation-of-operation",
                                      "--destroy-key", "--confirm", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["status"] == "retired" and not report["failed"]
    assert [(r["fingerprint"], r["ok"], r["reason"]) for r in report["revocations"]] == [
        (fingerprint, True, "cessation-of-operation")]
    assert report["keys"] == [{"key": f"key:{key_id}", "destroyed": True,
                               "detail": "crypto-shredded: ciphertext and data key erased"}]
    assert sorted((o["target"], o["step"]) for o in report["targets"]) == sorted(
        [(t, s) for t in files for s in ("remove", "purge")])
    for path in contents:
        assert not path.exists() and not path.with_name(path.name + RETIRED_SUFFIX).exists()
    with read_session(fleet.engine) as session:
        row = session.get(PrivateKey, key_id)
        assert row.destroyed_at is not None and row.ciphertext is None and row.wrapped_data_key is None
        cert = session.get(Certificate, fingerprint)
        assert (cert.status, cert.revocation_reason) == ("revoked", "cessationOfOperation")
        assert managed.get(session, NAME).status == "retired"
        assert NAME not in [s.managed.name for s in managed.schedule(session)]
        assert NAME not in {p.managed for p in _places(session)}
        actions = [e.action for e in session.exec(sa.select(AuditEvent).where(
            AuditEvent.object == f"managed:{NAME}")).scalars()]  # type: ignore[call-overload]
    assert actions[-4:] == ["managed.restored", "managed.retiring", "managed.retirement_confirmed", "managed.retired"]
    database = certpilot_home / "inventory.db"
    for path in (database, database.with_name("inventory.db-wal")):
        if path.exists():
            assert sealed not in path.read_bytes(), f"the shredded key's ciphertext is still in {path.name}"
    result = CliRunner().invoke(app, ["managed", "restore", NAME])
    assert result.exit_code == 1 and "retired, not being retired" in result.output
    with pytest.raises(PermanentError, match="is retired"):
        renewing.plan(fleet.engine, NAME)
    result = CliRunner().invoke(app, ["deploy", NAME])
    assert result.exit_code == 1 and "is retired" in result.output


def _places(session: Any) -> list[Any]:
    from certpilot import monitoring

    return monitoring.places(session, managed.schedule(session))


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_target_remove_clears_one_target_and_deletes_its_record(fleet: Fleet) -> None:
    files = _files(fleet)
    result = CliRunner().invoke(app, ["target", "remove", NAME, "nginx01", "--json"])
    assert result.exit_code == 0, result.output
    removed = json.loads(result.output)
    assert removed["deleted"] and removed["fingerprint"] == fleet.current()[NAME]
    assert "nginx was not reloaded" in removed["detail"]
    for path in files["nginx01"]:
        assert not path.exists() and not path.with_name(path.name + RETIRED_SUFFIX).exists()
    result = CliRunner().invoke(app, ["target", "remove", NAME, "haproxy00", "--keep-files"])
    assert result.exit_code == 0, result.output
    assert files["haproxy00"][0].exists()
    with read_session(fleet.engine) as session:
        assert [t.name for t in targets.list_targets(session, NAME)] == ["nginx00"]
        deleted = {e.object: json.loads(e.details) for e in session.exec(sa.select(AuditEvent).where(
            AuditEvent.action == "target.deleted")).scalars()}  # type: ignore[call-overload]
    assert deleted[f"target:{NAME}/nginx01"]["removal"]["fingerprint"] == fleet.current()[NAME]
    assert deleted[f"target:{NAME}/haproxy00"]["kept_files"] is True
    result = CliRunner().invoke(app, ["target", "remove", NAME, "nginx01"])
    assert result.exit_code == 1 and "no target named nginx01" in result.output


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_one_unreachable_target_does_not_stop_the_others_and_no_key_reaches_prefect(
        fleet: Fleet, prefect_files: Any) -> None:
    fingerprint = fleet.current()[NAME]
    host = fleet.host_block()  # haproxy00 through a block that trusts another host key: refused, permanently
    host.known_hosts = f"[{fleet.sshd.host}]:{fleet.sshd.port} " + openssh_public_line(
        ed25519.Ed25519PrivateKey.generate())
    host.save("impostor", overwrite=True)
    with write_session(fleet.engine) as session:
        row = targets.get_target(session, NAME, "haproxy00")
        targets.configure(session, NAME, "haproxy00", row.kind, "ssh-host/impostor", row.settings, ACTOR)
    state = retire(NAME, return_state=True)
    assert state.is_failed() and "haproxy00: remove" in state.message and "host key" in state.message.lower()
    outcomes = {o.target: o for o in state.result(raise_on_failure=False).report.targets}
    assert outcomes["nginx00"].ok and outcomes["nginx01"].ok and not outcomes["haproxy00"].ok
    assert _status(fleet) == retiring.RETIRING
    with write_session(fleet.engine) as session:
        targets.configure(session, NAME, "haproxy00", row.kind, f"ssh-host/{fleet.block}", row.settings, ACTOR)
    again = retire(NAME)  # takes up only what is left
    assert [(o.target, o.step, o.ok) for o in again.targets] == [("haproxy00", "remove", True)]
    restored = restore_retired(NAME)
    assert restored.status == retiring.ACTIVE and set(_served(fleet).values()) == {fingerprint}

    with read_session(fleet.engine) as session:
        ref = keystore.find_key(session, session.get(Certificate, fingerprint).spki_sha256)
        key = keystore.load_private_key(session, ref, _ring())
    haystacks: dict[str, bytes] = {}
    for run in (state,):
        run_id = run.state_details.flow_run_id
        haystacks[f"logs {run_id}"] = _logs(run_id).encode()
        for task_run in _task_runs(run_id):
            haystacks[f"task run {task_run.name}"] = task_run.model_dump_json().encode()
    haystacks.update(prefect_files())
    for where, data in haystacks.items():
        assert leaks(data, [key]) == [], f"private key material found in {where}"
    assert key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()) not in json.dumps(restored.as_dict()).encode()
