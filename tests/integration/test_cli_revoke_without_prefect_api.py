"""`certpilot revoke` without PREFECT_API_URL, as a user runs it: real processes, the private CA served
over HTTP. The revocation runs directly (no flow run is written), the issuer block is found through a
temporary local Prefect, and a client sees the revocation at the URLs the certificate carries; revoking
again, or naming an unknown certificate, is answered from the inventory alone."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from cryptography import x509
from sqlmodel import select

from certpilot.database import get_engine, read_session
from certpilot.models import AuditEvent, Certificate
from certpilot.x509info import describe_certificate
from tests.private_ca_service import private_ca_served
from tests.revocation_drill import relying_party_view

CA_NAME = "direct-revoke"
ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 180  # a process that starts a temporary Prefect takes 10 to 20 s on this kind of machine

# The block is saved, then the command runs, in one process: one temporary Prefect server, not two.
SAVE_BLOCK_THEN_REVOKE = f"""
import sys
from blocks.issuers import PrivateCABlock
PrivateCABlock.register_type_and_schema()
PrivateCABlock(ca_name={CA_NAME!r}).save({CA_NAME!r}, overwrite=True)
from cli.main import main
sys.argv = ["certpilot", *sys.argv[1:]]
main()
"""


def test_revoke_without_a_prefect_api_runs_directly(certpilot_home: Path, tmp_path: Path) -> None:
    engine = get_engine()
    prefect_home, home = tmp_path / "prefect-home", tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(prefect_home), HOME=str(home), PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
               PREFECT_SERVER_ANALYTICS_ENABLED="false")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=TIMEOUT, check=False)

    with private_ca_served(engine, CA_NAME) as served:
        leaf = served.issue("direct.revoke.test").leaf  # in the inventory; no managed certificate
        fingerprint = describe_certificate(leaf).fingerprint_sha256

        revoked = run("-c", SAVE_BLOCK_THEN_REVOKE, "revoke", fingerprint, "--reason", "key-compromise", "--json")

        assert revoked.returncode == 0, revoked.stderr[-3000:]
        assert "without Prefect run history" in revoked.stderr and "Traceback" not in revoked.stderr
        result = json.loads(revoked.stdout)
        assert (result["fingerprint_sha256"], result["issuer"], result["reason"], result["signed_with"]) == (
            fingerprint, CA_NAME, "key-compromise", "ca")
        assert result["propagation"]["seconds"] is not None, result["propagation"]
        view = relying_party_view(leaf, served.issuing, served.root, tmp_path / "view")
        assert "leaf.pem: revoked" in view.ocsp_text and "Reason: keyCompromise" in view.ocsp_text
        assert view.crl_reason == x509.ReasonFlags.key_compromise

        env["PREFECT_HOME"] = str(untouched := tmp_path / "untouched-prefect-home")  # a temporary Prefect would
        again = run("-m", "cli", "revoke", fingerprint, "--reason", "superseded")  # make its database here
        unknown = run("-m", "cli", "revoke", "nothing-by-this-name", "--reason", "superseded")

    assert again.returncode == 0, again.stderr[-3000:]
    assert f"was already revoked on {result['revoked_at']} (reason key-compromise)" in again.stdout
    assert unknown.returncode == 1 and "no managed certificate named 'nothing-by-this-name'" in unknown.stderr
    assert not (untouched / "prefect.db").exists()  # no temporary Prefect was started for these two
    with read_session(engine) as session:
        row = session.get(Certificate, fingerprint)
        assert row is not None and (row.status, row.revocation_reason) == ("revoked", "keyCompromise")
        actions = [e.action for e in session.exec(select(AuditEvent).where(
            AuditEvent.object == f"certificate:{fingerprint}")).all()]
    assert actions.count("certificate.revoked") == 1 and actions.count("certificate.revocation_visible") == 1
    with sqlite3.connect(prefect_home / "prefect.db") as conn:  # the block was read from here; no run was written
        assert conn.execute("SELECT count(*) FROM block_document WHERE name = ?", (CA_NAME,)).fetchone() == (1,)
        assert conn.execute("SELECT count(*) FROM flow_run").fetchone() == (0,)
