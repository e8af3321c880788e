"""`certpilot renew` without PREFECT_API_URL, as a user runs it: real processes, the real private CA.
The renewal steps run directly: the certificate is in the inventory with one certificate.issued
event, and no flow run is written to the Prefect database (the issuer block is read from it, through
a temporary local Prefect with analytics off)."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

from sqlmodel import select

from certpilot import audit, keystore, managed, renewing
from certpilot import ca as ca_module
from certpilot.database import get_engine, read_session, write_session
from certpilot.models import AuditEvent
from certpilot.settings import load_settings

CA_NAME = "direct-ca"
ACTOR = audit.Actor("test")
ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 180  # a process that starts a temporary Prefect takes 10 to 20 s on this kind of machine

SAVE_BLOCK = f"""
from blocks.issuers import PrivateCABlock
PrivateCABlock.register_type_and_schema()
PrivateCABlock(ca_name={CA_NAME!r}).save({CA_NAME!r}, overwrite=True)
"""


def _ring() -> keystore.KeyRing:
    return keystore.load_key_ring(load_settings())


def test_renew_without_a_prefect_api_runs_directly_and_creates_no_flow_run(certpilot_home: Path, tmp_path: Path) -> None:
    engine = get_engine()
    with write_session(engine) as session:
        ca_module.init_ca(session, _ring(), ACTOR, CA_NAME, "http://127.0.0.1:8888")
        for name in ("direct-1", "direct-2"):
            managed.add(session, managed.ManagedSpec(name=name, dns_names=(f"{name}.corp.test",),
                                                     issuer=f"private-ca/{CA_NAME}", owner="platform"), ACTOR)
    prefect_home, home = tmp_path / "prefect-home", tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(prefect_home), HOME=str(home), PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120")
    saved = subprocess.run([sys.executable, "-c", SAVE_BLOCK], cwd=ROOT, capture_output=True, text=True, check=False,
                           timeout=TIMEOUT, env={**env, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    assert saved.returncode == 0, saved.stderr[-3000:]

    def certpilot(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cli", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=TIMEOUT, check=False)

    def flow_runs() -> int:
        """Flow runs in the Prefect database, which must exist and hold the saved block (so that a wrong
        path cannot make this pass)."""
        with sqlite3.connect(prefect_home / "prefect.db") as conn:
            assert conn.execute("SELECT count(*) FROM block_document WHERE name = ?", (CA_NAME,)).fetchone() == (1,)
            return int(conn.execute("SELECT count(*) FROM flow_run").fetchone()[0])

    # Another run renewing direct-1 now (a live process of this host holds its renewal claim): refused at once.
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    holder = f"process:{socket.gethostname()}:{other.pid}"
    try:
        assert renewing.claim(engine, "direct-1", holder) is None
        held = certpilot("renew", "direct-1", "--json")
        assert held.returncode == 1 and "Traceback" not in held.stderr
        assert json.loads(held.stdout)["error"].startswith(f"direct-1 is being renewed by {holder} now")
    finally:
        other.kill()
        other.wait()
    with read_session(engine) as session:
        assert managed.current_certificate(session, managed.get(session, "direct-1")) is None

    one = certpilot("renew", "direct-1", "--json")
    assert one.returncode == 0, one.stderr[-3000:]
    renewal = json.loads(one.stdout)
    assert renewal["name"] == "direct-1" and renewal["issuer"] == f"private-ca/{CA_NAME}"
    assert renewal["deployment"] is None and renewal["replaces"] is None
    assert "without Prefect run history" in one.stderr
    assert "database is locked" not in one.stderr and "Traceback" not in one.stderr

    # The due path, directly too: what is left due is renewed, and the dry run is stable.
    dry = [json.loads(certpilot("renew", "--due", "--dry-run", "--json").stdout) for _ in range(2)]
    assert dry[0] == dry[1] and [r["name"] for r in dry[0]] == ["direct-2"]
    due = certpilot("renew", "--due", "--json")
    assert due.returncode == 0, due.stderr[-3000:]
    assert json.loads(due.stdout) == {"due": 1, "renewed": 1, "failed": 0, "redeployed": 0, "skipped": 0,
                                      "failures": []}

    with read_session(engine) as session:
        currents = {n: managed.current_certificate(session, managed.get(session, n)) for n in ("direct-1", "direct-2")}
        issued = session.exec(select(AuditEvent).where(AuditEvent.action == "certificate.issued")).all()
    assert currents["direct-1"] is not None and currents["direct-1"].fingerprint_sha256 == renewal["fingerprint_sha256"]
    assert currents["direct-2"] is not None
    assert sorted(e.object for e in issued) == sorted(f"certificate:{c.fingerprint_sha256}"  # one event per issuance
                                                      for c in currents.values() if c is not None)
    assert flow_runs() == 0
