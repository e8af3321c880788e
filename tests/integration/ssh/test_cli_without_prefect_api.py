"""`certpilot deploy` and `certpilot discover` without PREFECT_API_URL, as a user runs them: real
processes, a real sshd and nginx. They run the core directly: the certificate is served on the wire,
a failure rolls back and exits 1 with the one JSON error, and no flow run is written to the Prefect
database (blocks are read from it, through a temporary local Prefect with analytics off)."""

from __future__ import annotations

import datetime as dt
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from cryptography import x509
from sqlmodel import select

from certpilot import audit, keystore, managed, renewing, targets
from certpilot import ca as ca_module
from certpilot.database import get_engine, read_session, write_session
from certpilot.models import Certificate, Location
from certpilot.sample_estate import Authority, issue_leaf, key_pem, pem
from certpilot.settings import load_settings
from connectors.private_ca import PrivateCAIssuer
from connectors.tls_verify import fetch_chain
from lab.nginx import NginxInstance
from lab.ports import free_port
from lab.sshd import SshServer

NAME = "cli.direct.test"
CA_NAME = "direct-ca"
ACTOR = audit.Actor("test")
ROOT = Path(__file__).resolve().parents[3]
TIMEOUT = 180  # a subprocess that starts a temporary Prefect takes 10 to 20 s on this kind of machine

SAVE_BLOCK = """
import json, sys
from blocks.ssh import SshHostBlock
fields = json.loads(open(sys.argv[1]).read())
SshHostBlock.register_type_and_schema()
SshHostBlock(**fields).save("cli-direct", overwrite=True)
"""


def _ring() -> keystore.KeyRing:
    return keystore.load_key_ring(load_settings())


def _renew(engine: sa.Engine) -> str:
    return renewing.renew_one(engine, NAME, PrivateCAIssuer(engine, CA_NAME, _ring, actor=ACTOR), _ring,
                              ACTOR).fingerprint_sha256


class Lab:
    def __init__(self, engine: sa.Engine, nginx: NginxInstance, env: dict[str, str], prefect_home: Path,
                 home: Path) -> None:
        self.engine, self.nginx, self.env, self.prefect_home, self.home = engine, nginx, env, prefect_home, home

    def served(self) -> str:
        return fetch_chain("127.0.0.1", self.nginx.site(NAME).port, sni=NAME, timeout=5).fingerprint

    def certpilot(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run the CLI; its output goes through files, not pipes, so that only the CLI's own end is
        waited for (the temporary Prefect server it starts inherits its stderr)."""
        with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
            done = subprocess.run([sys.executable, "-m", "cli", *args], cwd=ROOT, env=self.env, stdout=stdout,
                                  stderr=stderr, text=True, timeout=TIMEOUT, check=False)
            stdout.seek(0)
            stderr.seek(0)
            return subprocess.CompletedProcess(done.args, done.returncode, stdout.read(), stderr.read())

    def flow_runs(self) -> int:
        """Flow runs in the Prefect database, which must exist and hold the saved block (so that a
        wrong path cannot make this pass)."""
        database = self.prefect_home / "prefect.db"
        with sqlite3.connect(database) as conn:
            assert conn.execute("SELECT count(*) FROM block_document WHERE name = 'cli-direct'").fetchone() == (1,)
            return conn.execute("SELECT count(*) FROM flow_run").fetchone()[0]


@pytest.fixture
def lab(sshd: SshServer, ca: tuple[Authority, Authority], certpilot_home: Path, tmp_path: Path) -> Iterator[Lab]:
    """A private CA and managed certificate NAME with one nginx target behind sshd, serving an old
    certificate; the target's block saved in a Prefect home of this test's own."""
    engine = get_engine()
    with write_session(engine) as session:
        authority = ca_module.init_ca(session, _ring(), ACTOR, CA_NAME, "http://127.0.0.1:8888")
        root_der = session.get(Certificate, authority.root_fingerprint).der
        managed.add(session, managed.ManagedSpec(name=NAME, dns_names=(NAME,), issuer=f"private-ca/{CA_NAME}",
                                                 validity_days=30, owner="platform"), ACTOR)
    old, old_key = issue_leaf(ca[1], [NAME], dt.datetime.now(dt.UTC) + dt.timedelta(days=5))
    nginx = NginxInstance(sshd.home / tmp_path.name / "nginx", [NAME], user=sshd.user,
                          pairs={NAME: (pem(old, ca[1].certificate), key_pem(old_key))}).start()
    trust = pem(x509.load_der_x509_certificate(root_der), ca[0].certificate).decode()
    with write_session(engine) as session:
        targets.add(session, NAME, "web1", "ssh-nginx", "ssh-host/cli-direct",
                    {**nginx.deploy_settings(NAME), "verify_trust": trust, "verify_timeout": 5}, ACTOR)
    prefect_home, home = tmp_path / "prefect-home", tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(prefect_home), HOME=str(home))
    setup = {**env, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}
    fields = tmp_path / "block.json"
    fields.write_text(json.dumps({
        "address": sshd.host, "port": sshd.port, "user": sshd.user, "private_key": sshd.client_private_key,
        "known_hosts": sshd.known_hosts_line,
        "discovery_globs": [str(nginx.site(NAME).certificate_path)]}))
    saved = subprocess.run([sys.executable, "-c", SAVE_BLOCK, str(fields)], cwd=ROOT, capture_output=True, text=True,
                           timeout=TIMEOUT, env=setup, check=False)
    fields.unlink()
    assert saved.returncode == 0, saved.stderr[-3000:]
    try:
        yield Lab(engine, nginx, env, prefect_home, home)
    finally:
        nginx.stop()


def test_deploy_and_discover_run_directly_and_create_no_flow_run(lab: Lab) -> None:
    old = lab.served()
    new = _renew(lab.engine)
    assert new != old

    deployed = lab.certpilot("deploy", NAME, "--json")
    assert deployed.returncode == 0, deployed.stderr[-3000:]
    report = json.loads(deployed.stdout)
    assert report["fingerprint"] == new and report["failed"] is False
    assert [(o["target"], o["action"]) for o in report["outcomes"]] == [("web1", "deployed")]
    assert lab.served() == new  # on the wire
    assert "without Prefect run history" in deployed.stderr
    assert "database is locked" not in deployed.stderr and "Traceback" not in deployed.stderr

    # A second certificate whose verification looks at a port nobody serves: deployed, never proven,
    # rolled back; exit 1 with the one JSON error, and the previous certificate still served.
    with write_session(lab.engine) as session:
        row = targets.get_target(session, NAME, "web1")
        targets.configure(session, NAME, "web1", row.kind, row.block or "",
                          {**row.settings, "verify_port": free_port(), "verify_timeout": 1}, ACTOR)
    newer = _renew(lab.engine)
    failed = lab.certpilot("deploy", NAME, "--json")
    assert failed.returncode == 1, failed.stderr[-3000:]
    error = json.loads(failed.stdout)
    assert error["exit_code"] == 1 and "web1" in error["error"] and newer[:16] in error["error"]
    assert lab.served() == new

    found = lab.certpilot("discover", "ssh-host/cli-direct", "--json")
    assert found.returncode == 0, found.stderr[-3000:]
    result = json.loads(found.stdout)
    assert [(s["source"], s["places"]) for s in result["sources"]] == [("ssh:cli-direct", 1)]
    assert result["failed"] == {} and sum(result["bands"].values()) >= 1
    with read_session(lab.engine) as session:  # the certificate served there is recorded where it was found
        seen = {loc.certificate_fingerprint for loc in session.exec(select(Location)) if loc.source == "ssh:cli-direct"}
    assert seen == {new}

    missing = lab.certpilot("discover", "ssh-host/cli-direct", "ssh-host/nowhere", "--json")
    assert missing.returncode == 1, missing.stderr[-3000:]
    error = json.loads(missing.stdout)
    assert error["exit_code"] == 1 and "1 of 2 source(s) failed" in error["error"]
    assert "ssh-host/nowhere" in error["error"].split("recorded):", 1)[1]  # the cause, with the block it names

    usage = lab.certpilot("deploy", NAME, "--canary", "nowhere", "--json")
    assert usage.returncode == 2 and "--canary" in json.loads(usage.stdout)["error"]

    assert lab.flow_runs() == 0
    assert not (lab.home / ".prefect").exists()  # the user's own Prefect home was never touched
