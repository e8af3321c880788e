"""The deploy-certificate flow against a real Prefect server, a real sshd and five real nginx targets:
canary first, every certificate proven on the wire; one target failing verification rolls back every
target the run changed; a run killed mid-fleet (SIGKILL) leaves a mixed fleet that the next run brings
to one state; renew-certificate deploys what it renews."""

from __future__ import annotations

import datetime as dt
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from prefect.logging.handlers import APILogHandler
from prefect.settings import PREFECT_API_URL
from sqlmodel import select
from typer.testing import CliRunner

from blocks.issuers import PrivateCABlock
from blocks.ssh import SshHostBlock
from blocks.targets import DeploymentTargetBlock, build_deployer
from certpilot import audit, keystore, managed, renewing, targets
from certpilot import ca as ca_module
from certpilot.database import get_engine, read_session, write_session
from certpilot.errors import PermanentError
from certpilot.keys import key_matches_certificate
from certpilot.models import Certificate, PrivateKey
from certpilot.rollout import Action, DeploymentReport
from certpilot.sample_estate import Authority, issue_leaf, key_pem, pem
from certpilot.settings import load_settings
from cli.main import app
from connectors.private_ca import PrivateCAIssuer
from connectors.tls_verify import fetch_chain
from flows.deploy import deploy_certificate
from flows.renew import renew_certificate, renew_due
from lab.nginx import NginxInstance
from lab.sshd import SshServer
from tests.flows.test_renew_flows import _artifacts, _flow_run, _logs, _task_runs
from tests.keyprobe import leaks

NAME = "www.fleet.test"
CA_NAME = "fleet-ca"
ACTOR = audit.Actor("test")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ssh_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
    with SshServer(tmp_path_factory.mktemp("sshd")) as server:
        yield server


@pytest.fixture(scope="module")
def block_types(prefect_server: None) -> None:
    SshHostBlock.register_type_and_schema()
    PrivateCABlock.register_type_and_schema()


def _ring() -> keystore.KeyRing:
    return keystore.load_key_ring(load_settings())


def _renew(engine: sa.Engine) -> str:
    """A new certificate for NAME from the private CA (no Prefect); its fingerprint."""
    return renewing.renew_one(engine, NAME, PrivateCAIssuer(engine, CA_NAME, _ring, actor=ACTOR), _ring,
                             ACTOR).fingerprint_sha256


class Fleet:
    def __init__(self, engine: sa.Engine, nginx: list[NginxInstance], decoy: NginxInstance) -> None:
        self.engine, self.nginx, self.decoy = engine, nginx, decoy
        self.names = [f"web{i + 1}" for i in range(len(nginx))]

    def served(self) -> list[str]:
        """The leaf each target serves on the wire, by handshake."""
        return [fetch_chain("127.0.0.1", n.site(NAME).port, sni=NAME, timeout=5).fingerprint for n in self.nginx]

    def pairs_match(self) -> bool:
        """Every target's certificate and key files on disk belong together, and the key is 0600."""
        for n in self.nginx:
            site = n.site(NAME)
            cert = x509.load_pem_x509_certificates(site.certificate_path.read_bytes())[0]
            key = serialization.load_pem_private_key(site.key_path.read_bytes(), None)
            if not key_matches_certificate(key, cert) or site.key_path.stat().st_mode & 0o777 != 0o600:
                return False
        return True

    def misdirect(self, target: str, timeout: float) -> None:
        """Make ``target`` verify against the decoy, which keeps serving something else: whatever is
        deployed there is never proven served, and verification fails after ``timeout`` seconds."""
        with write_session(self.engine) as session:
            row = targets.get_target(session, NAME, target)
            targets.configure(session, NAME, target, row.kind, row.block or "",
                              {**row.settings, "verify_port": self.decoy.site(NAME).port, "verify_timeout": timeout},
                              ACTOR)

    def rows(self) -> dict[str, tuple[str | None, str | None]]:
        with read_session(self.engine) as session:
            return {t.name: (t.desired_fingerprint, t.verified_fingerprint) for t in targets.list_targets(session, NAME)}


@pytest.fixture
def fleet(ssh_host: SshServer, block_types: None, certpilot_home: Path, ca: tuple[Authority, Authority],
          tmp_path: Path) -> Iterator[Fleet]:
    """A private CA and managed certificate NAME in a fresh inventory; five nginx targets behind one sshd,
    each serving an old certificate from another CA, and a decoy nginx that no deploy touches."""
    engine = get_engine()
    with write_session(engine) as session:
        authority = ca_module.init_ca(session, _ring(), ACTOR, CA_NAME, "http://127.0.0.1:8888")
        root_der = session.get(Certificate, authority.root_fingerprint).der
        managed.add(session, managed.ManagedSpec(name=NAME, dns_names=(NAME,), issuer=f"private-ca/{CA_NAME}",
                                                 validity_days=30, owner="platform"), ACTOR)
    trust = pem(x509.load_der_x509_certificate(root_der), ca[0].certificate).decode()
    old, old_key = issue_leaf(ca[1], [NAME], dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=5))
    pair = (pem(old, ca[1].certificate), key_pem(old_key))
    nginx = []
    prefix = ssh_host.home / tmp_path.name
    for i in range(6):
        nginx.append(NginxInstance(prefix / f"nginx{i + 1}", [NAME], user=ssh_host.user, pairs={NAME: pair}).start())
    SshHostBlock(address=ssh_host.host, port=ssh_host.port, user=ssh_host.user, private_key=ssh_host.client_private_key,
                 known_hosts=ssh_host.known_hosts_line).save("fleet", overwrite=True)
    PrivateCABlock(ca_name=CA_NAME).save(CA_NAME, overwrite=True)
    with write_session(engine) as session:
        for i, n in enumerate(nginx[:5]):
            targets.add(session, NAME, f"web{i + 1}", "ssh-nginx", "ssh-host/fleet",
                        {**n.deploy_settings(NAME), "verify_trust": trust, "verify_timeout": 5}, ACTOR)
    try:
        yield Fleet(engine, nginx[:5], nginx[5])
    finally:
        for n in nginx:
            n.stop()


def test_canary_first_then_all_verified_on_the_wire(fleet: Fleet) -> None:
    old = set(fleet.served())
    new = _renew(fleet.engine)
    state = deploy_certificate(NAME, concurrency=2, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert isinstance(result, DeploymentReport)
    assert [o.target for o in result.outcomes][0] == "web1"  # the canary, alone in the first wave
    assert {o.action for o in result.outcomes} == {Action.DEPLOYED}
    assert fleet.served() == [new] * 5 and new not in old
    assert fleet.rows() == {name: (new, new) for name in fleet.names}
    assert fleet.pairs_match()
    run = _flow_run(state.state_details.flow_run_id)
    assert run.name == f"deploy-{NAME}" and f"certificate:{NAME}" in run.tags
    report = _artifacts(run.id, "deployment-www-fleet-test")
    assert report and "all targets serve it" in report[0].data
    # Run again: nothing to change, each target only verified where it stands.
    again = deploy_certificate(NAME)
    assert {o.action for o in again.outcomes} == {Action.ALREADY_SERVED}


def test_one_of_five_failing_verification_rolls_back_every_changed_target(fleet: Fleet) -> None:
    old = fleet.served()
    # web5's verification looks at the decoy, which keeps serving something else: deployed, never proven.
    fleet.misdirect("web5", timeout=1.5)
    new = _renew(fleet.engine)
    state = deploy_certificate(NAME, concurrency=2, return_state=True)
    assert state.is_failed()
    assert "web5" in state.message and "every changed target was rolled back" in state.message
    assert fleet.served() == old  # the previous certificate is served everywhere again
    assert fleet.pairs_match()
    rows = fleet.rows()
    assert all(verified != new for _, verified in rows.values())
    run_id = state.state_details.flow_run_id
    report = _artifacts(run_id, "deployment-www-fleet-test")[0].data
    assert report.count("| rolled-back |") == 5, report
    assert "DEPLOYMENT FAILED at web5" in _logs(run_id)
    with read_session(fleet.engine) as session:
        failed = targets.get_target(session, NAME, "web5").last_error
    assert failed and "verify" in failed


def test_killed_mid_fleet_then_the_next_run_converges(fleet: Fleet) -> None:
    first = _renew(fleet.engine)
    assert deploy_certificate(NAME).fingerprint == first
    second = _renew(fleet.engine)
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    code = ("import sys; from flows.deploy import deploy_certificate; "
            f"deploy_certificate({NAME!r}, concurrency=1)")
    child = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    deadline = time.monotonic() + 90
    try:
        while time.monotonic() < deadline:  # kill it once two targets are proven serving the new certificate
            if sum(verified == second for _, verified in fleet.rows().values()) >= 2:
                break
            assert child.poll() is None, child.stderr.read().decode(errors="replace")[-2000:] if child.stderr else ""
            time.sleep(0.02)
        else:
            pytest.fail("the deploy run never got two targets verified")
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
        if child.stderr:
            child.stderr.close()
    served = fleet.served()
    assert second in served and first in served  # a mixed fleet: the kill rolled nothing back
    assert fleet.pairs_match()  # but never a certificate with another certificate's key
    result = deploy_certificate(NAME)
    assert fleet.served() == [second] * 5
    assert fleet.pairs_match()
    assert fleet.rows() == {name: (second, second) for name in fleet.names}
    actions = {o.target: o.action for o in result.outcomes}
    assert Action.ALREADY_SERVED in actions.values() and Action.DEPLOYED in actions.values(), actions


def test_renew_certificate_deploys_and_verifies(fleet: Fleet) -> None:
    state = renew_certificate(NAME, return_state=True)
    assert state.is_completed(), state.message
    renewal = state.result()
    new = renewal.renewal.fingerprint_sha256
    assert renewal.deployment is not None and renewal.deployment.fingerprint == new
    assert fleet.served() == [new] * 5
    assert fleet.rows() == {name: (new, new) for name in fleet.names}


def test_no_key_byte_reaches_prefect(fleet: Fleet, prefect_files: Any) -> None:
    """After a deploy and a failed, rolled-back deploy: no key material in runs, task runs, logs,
    artifacts, state messages, results, Prefect's database or its result storage."""
    _renew(fleet.engine)
    ok = deploy_certificate(NAME, return_state=True)
    fleet.misdirect("web3", timeout=1.0)
    _renew(fleet.engine)
    failed = deploy_certificate(NAME, return_state=True)
    assert ok.is_completed() and failed.is_failed()
    with read_session(fleet.engine) as session:
        rows = session.exec(select(PrivateKey).where(PrivateKey.destroyed_at.is_(None))).all()  # type: ignore[union-attr]
        keys = [keystore.load_private_key(session, keystore.KeyRef(r.id), _ring()) for r in rows]
    assert len(keys) >= 4  # the CA's two and the two leaves'
    haystacks: dict[str, bytes] = {"state messages": f"{ok.message} {failed.message}".encode(),
                                   "result": json.dumps(ok.result().as_dict()).encode() + pickle.dumps(ok.result()),
                                   "failure": pickle.dumps(failed.result(raise_on_failure=False))}
    for state in (ok, failed):
        run_id = state.state_details.flow_run_id
        haystacks[f"flow run {run_id}"] = _flow_run(run_id).model_dump_json().encode()
        haystacks[f"logs {run_id}"] = _logs(run_id).encode()
        for t in _task_runs(run_id):
            haystacks[f"task run {t.name}"] = t.model_dump_json().encode()
        for artifact in _artifacts(run_id, "deployment-www-fleet-test"):
            haystacks[f"artifact {run_id}"] = str(artifact.data).encode()
    APILogHandler().flush()
    haystacks.update(prefect_files())
    for where, data in haystacks.items():
        assert leaks(data, keys) == [], f"private key material found in {where}"


def test_cli_deploy_and_target_list(fleet: Fleet) -> None:
    new = _renew(fleet.engine)
    result = CliRunner().invoke(app, ["deploy", NAME, "--canary", "web3", "--concurrency", "4"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0].startswith("web3 ")  # the canary went first
    assert f"{NAME} ({new[:16]}) is served on 5 target(s)" in result.output
    listed = json.loads(CliRunner().invoke(app, ["target", "list", NAME, "--json"]).output)
    assert {(r["desired"], r["verified"]) for r in listed} == {(new, new)}
    assert fleet.served() == [new] * 5


def test_renew_due_deploys_what_it_renews(fleet: Fleet) -> None:
    old = fleet.served()
    summary = renew_due()  # NAME has no certificate yet: due
    assert (summary.due, summary.renewed, summary.failed) == (1, 1, 0)
    new = fleet.rows()["web1"][1]
    assert new is not None and new not in old
    assert fleet.served() == [new] * 5


def test_renew_due_reports_a_failed_deployment(fleet: Fleet) -> None:
    old = fleet.served()
    fleet.misdirect("web2", timeout=1.0)
    state = renew_due(return_state=True)
    assert state.is_failed()
    assert f"{NAME} at deploy" in state.message and "not deployed" in state.message
    assert fleet.served() == old  # renewed, but every target still serves the previous certificate


def test_target_settings_from_a_deployment_target_block(fleet: Fleet) -> None:
    """A target whose block is a DeploymentTargetBlock: kind, connection and settings come from it."""
    DeploymentTargetBlock.register_type_and_schema()
    with write_session(fleet.engine) as session:
        web4 = targets.get_target(session, NAME, "web4")
        settings = dict(web4.settings)
        targets.configure(session, NAME, "web4", "ssh-nginx", "deployment-target/fleet-web4",
                          {"verify_timeout": 5}, ACTOR)  # the row's own settings override the block's
    DeploymentTargetBlock(kind="ssh-nginx", connection=SshHostBlock.load("fleet"),
                          settings={**settings, "verify_timeout": 0.001}).save("fleet-web4", overwrite=True)
    new = _renew(fleet.engine)
    result = deploy_certificate(NAME)
    assert {o.target: o.action for o in result.outcomes}["web4"] == Action.DEPLOYED
    assert fleet.served() == [new] * 5
    loaded = DeploymentTargetBlock.load("fleet-web4")
    assert isinstance(loaded.connection, SshHostBlock)
    with pytest.raises(PermanentError, match="of kind aws-acm"):
        build_deployer(loaded, "web4", "aws-acm", {})
