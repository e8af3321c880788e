"""renew-due killed (SIGKILL) at each step of renew-and-deploy, then run again: it converges.

One lab fleet (lab.fleet: a real sshd fronting one nginx and one haproxy, one managed certificate of a
private CA served by both), renewed the CLI's direct way (cli.renewals: the same core steps as the flows,
no flow run; blocks read from the test's Prefect server) in a child process that kills itself the first
time a point of certpilot.checkpoints is reached (tests/renewal_killer.py): after the key is made, after
the request is made (the private CA's place of an ACME order: it signs at once), after issuance, after
the store, after each target's upload, before and after each target's reload. Then renew-due again, in
this process, with the same horizon. Checked where it shows:

- converged: both targets serve the managed certificate's current certificate on the wire, and the
  target records say so (desired = verified = current);
- no target serves a certificate with the wrong key: the served leaf's public key is the one in the key
  file on the host (read over SSH);
- no key lost: no key destroyed, every certificate recorded has its key in the keystore, the one key the
  killed run made is still there and is the renewed certificate's (a run killed before its store left it in
  the renewal journal, certpilot.renewing, and the re-run took it up);
- nothing renewed twice: a run killed after its store step is not renewed again (its targets left behind
  are deployed again instead), one killed before is renewed once;
- the audit chain verifies (certpilot.audit.verify, as `certpilot audit verify` does).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from prefect.settings import PREFECT_API_URL
from sqlmodel import col, func, select

from certpilot import audit, managed, targets
from certpilot.database import read_session, write_session
from certpilot.keys import public_key_sha256
from certpilot.models import AuditEvent, Certificate, ManagedCertificate, PrivateKey
from certpilot.renewing import RenewDueSummary
from certpilot.x509info import spki_sha256
from cli.renewals import _Direct
from lab.fleet import Fleet, Site
from tests.flows.fleet_fixtures import inventory, make_fleet  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parents[2]
NAME = "cert-0000"
WITHIN_DAYS = 25.0  # the fleet's 30-day certificates are due within it; a renewal's 90-day one is not


def _kill_at(point: str, subject: str) -> str:
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    child = subprocess.run([sys.executable, "-m", "tests.renewal_killer", point, subject, str(WITHIN_DAYS)],
                           cwd=ROOT, env=env, capture_output=True, timeout=120)
    assert child.returncode == -9, child.stderr.decode(errors="replace")[-3000:]
    return child.stdout.decode()


def _head(engine: sa.Engine) -> int:
    with read_session(engine) as session:
        return session.exec(select(func.max(AuditEvent.seq))).one() or 0


def _actions(engine: sa.Engine, after: int) -> list[str]:
    with read_session(engine) as session:
        return list(session.exec(select(AuditEvent.action).where(col(AuditEvent.seq) > after)
                                 .order_by(col(AuditEvent.seq))))


def _key_file_spki(fleet: Fleet, site: Site) -> str:
    """The public key (SHA-256 of its SPKI) of the private key the target's files hold, read over SSH."""
    settings = fleet.settings(site)
    path = str(settings["key_path"] if site.kind == "ssh-nginx" else settings["pem_path"])
    connection = fleet.host_block().connection()
    try:
        data = connection.read_file(path)
    finally:
        connection.close()
    start = data.index(b"-----BEGIN PRIVATE KEY-----")
    key = serialization.load_pem_private_key(data[start:], password=None)
    return public_key_sha256(key)


def _served_spki(fleet: Fleet, site: Site) -> str:
    from connectors.tls_verify import fetch_chain

    host, port, sni = fleet.endpoint(site)
    return spki_sha256(x509.load_der_x509_certificate(fetch_chain(host, port, sni=sni, timeout=5).chain[0]).public_key())


# Each subject's points in the order the run reaches them; haproxy00 is the canary (the first target by name).
KILLS = [("key", NAME), ("requested", NAME), ("issued", NAME), ("stored", NAME),
         ("uploaded", "haproxy00"), ("reloaded", "haproxy00"),
         ("uploaded", "nginx00"), ("reloading", "nginx00"), ("reloaded", "nginx00")]


@pytest.mark.parametrize(("point", "subject"), KILLS, ids=[f"{p}-{s}" for p, s in KILLS])
def test_killed_then_renew_due_again_converges(make_fleet: Callable[..., Fleet], point: str, subject: str) -> None:
    fleet = make_fleet(certificates=1, nginx=1, haproxy=1, replicas=2, ca_name=f"crash-{point}-{subject}")
    with write_session(fleet.engine) as session:  # renewals get 90 days: not due again within WITHIN_DAYS
        session.execute(sa.update(ManagedCertificate).values(validity_days=90))
        for site in fleet.sites:  # a target that holds the new files but does not serve them: found out in 2 s
            row = targets.get_target(session, NAME, site.instance)
            targets.configure(session, NAME, site.instance, row.kind, row.block or "",
                              {**row.settings, "verify_timeout": 2.0}, audit.Actor("test"))
    old = fleet.current()[NAME]
    head = _head(fleet.engine)

    said = _kill_at(point, subject)

    assert f"killed at {point} of {subject}" in said
    killed_head = _head(fleet.engine)
    killed = _actions(fleet.engine, head)
    stored_before_kill = "certificate.issued" in killed
    assert stored_before_kill == (point not in ("key", "requested", "issued"))

    summary = _Direct().renew_due(dt.timedelta(days=WITHIN_DAYS))

    assert isinstance(summary, RenewDueSummary) and summary.failed == 0, summary
    rerun = _actions(fleet.engine, killed_head)
    if stored_before_kill:  # not renewed twice: the stored renewal is deployed again instead
        assert (summary.due, summary.redeployed) == (0, 1) and "certificate.issued" not in rerun
    else:
        assert (summary.due, summary.renewed) == (1, 1) and rerun.count("certificate.issued") == 1
    current = fleet.current()[NAME]
    assert current != old
    # Converged, on the wire and in the records.
    assert fleet.not_serving_current() == []
    with read_session(fleet.engine) as session:
        rows = targets.list_targets(session, NAME)
        assert {(t.name, t.desired_fingerprint, t.verified_fingerprint) for t in rows} == \
            {(site.instance, current, current) for site in fleet.sites}
        issued = session.get(Certificate, current)
        assert issued is not None and issued.managed_certificate_id == managed.get(session, NAME).id
    # No target serves a certificate with a key other than its key file's.
    for site in fleet.sites:
        assert _served_spki(fleet, site) == _key_file_spki(fleet, site) == issued.spki_sha256, site
    # No key lost: none destroyed, every recorded certificate's key kept, every key made (killed run too) kept.
    with read_session(fleet.engine) as session:
        keys = {k.spki_sha256: k for k in session.exec(select(PrivateKey))}
        recorded = session.exec(select(Certificate).where(col(Certificate.managed_certificate_id).is_not(None))).all()
        made = [json.loads(e.details) for e in session.exec(
            select(AuditEvent).where(col(AuditEvent.seq) > head, AuditEvent.action == "key.stored"))]
        assert all(k.destroyed_at is None for k in keys.values())
        assert all(c.spki_sha256 in keys for c in recorded)
        # One key: a run killed before its store left it in the renewal journal, and the re-run took it up.
        assert len(made) == 1 and made[0]["spki_sha256"] == issued.spki_sha256
        assert "key.destroyed" not in killed + rerun
        assert audit.verify(session).events == _head(fleet.engine)
