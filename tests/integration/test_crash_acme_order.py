"""renew-due against a real ACME CA (pebble) killed (SIGKILL) right after the order is placed, and right after
the CA issued the certificate (before it is stored), then run again: the renewal journal
(certpilot.renewing.RenewalJournal) carries the killed run's key and order to the next run, which resumes
that order rather than placing another.

Checked where it shows: pebble's log has one order and one certificate for the renewal; the certificate the
inventory now serves is that one and carries the killed run's key; that key is in the keystore and no key
was destroyed; the journal is cleared; the audit chain verifies.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlmodel import col, func, select

from certpilot import audit, managed
from certpilot.database import read_session
from certpilot.keystore import KeyRing
from certpilot.models import AuditEvent, Certificate, PrivateKey
from connectors.acme_issuer import AcmeIssuer
from connectors.challenges import Http01Responder
from lab.ports import free_port
from tests.integration.acme_faults import expiring_estate, issuance_counts, renew_due_directly
from tests.integration.acme_servers import ChallTestSrv, Pebble

ROOT = Path(__file__).resolve().parents[2]
NAME = "ordered0"

HTTP_PORT = free_port()  # where pebble validates http-01: the killed child answers there, then this process


@pytest.fixture(scope="module")
def order_pebble(acme_workdir: Path, challtestsrv: ChallTestSrv,
                 acme_tls: tuple[Path, Path, Path]) -> Iterator[Pebble]:
    """A pebble of this module's own (its log counts only this module's orders), validating on HTTP_PORT."""
    with Pebble.start(acme_workdir / "pebble-crash", dns=challtestsrv, http_port=HTTP_PORT, tls=acme_tls) as server:
        yield server


def _issuer(engine: sa.Engine, pebble: Pebble, ring: Callable[[], KeyRing], solver: Http01Responder,
            acme_tls: tuple[Path, Path, Path]) -> AcmeIssuer:
    return AcmeIssuer(engine, "faulty", pebble.directory_url, key_ring=ring, solver=solver, ca_bundle=acme_tls[0],
                      timeout=5.0)


def _kill_at(point: str, pebble: Pebble, acme_tls: tuple[Path, Path, Path]) -> str:
    child = subprocess.run([sys.executable, "-m", "tests.integration.acme_order_killer", point, NAME,
                            pebble.directory_url, str(acme_tls[0]), str(HTTP_PORT)],
                           cwd=ROOT, env=dict(os.environ), capture_output=True, timeout=120)
    assert child.returncode == -9, child.stderr.decode(errors="replace")[-3000:]
    return child.stdout.decode()


def _head(engine: sa.Engine) -> int:
    with read_session(engine) as session:
        return session.exec(select(func.max(AuditEvent.seq))).one() or 0


@pytest.mark.parametrize("point", ["ordered", "issued"])
def test_killed_after_the_order_then_renew_due_resumes_it(sqlite_engine: sa.Engine, order_pebble: Pebble,
                                                          key_ring: Callable[[], KeyRing],
                                                          acme_tls: tuple[Path, Path, Path], point: str) -> None:
    name = NAME
    expiring_estate(sqlite_engine, key_ring, [name], f"{point}.crash.certpilot.test")
    with Http01Responder("127.0.0.1", HTTP_PORT) as solver:  # the account, registered before the kill
        _issuer(sqlite_engine, order_pebble, key_ring, solver, acme_tls).account()
    before_serials, before_orders = set(order_pebble.issued()), order_pebble.orders()
    head = _head(sqlite_engine)

    said = _kill_at(point, order_pebble, acme_tls)

    assert f"killed at {point} of {name}" in said
    with read_session(sqlite_engine) as session:  # the journal holds the killed run's key and order
        row = managed.get(session, name)
        assert row.pending_key_id is not None and row.pending_order_url is not None
        pending = session.get(PrivateKey, row.pending_key_id)
        assert pending is not None and pending.destroyed_at is None
        journalled_key, journalled_order = pending.spki_sha256, row.pending_order_url
    placed = order_pebble.orders() - before_orders
    assert len(placed) == 1 and journalled_order.endswith(next(iter(placed)))
    issued_while_killed = set(order_pebble.issued()) - before_serials
    assert len(issued_while_killed) == (1 if point == "issued" else 0)
    killed_head = _head(sqlite_engine)

    with Http01Responder("127.0.0.1", HTTP_PORT) as solver:
        summary = renew_due_directly(sqlite_engine, _issuer(sqlite_engine, order_pebble, key_ring, solver, acme_tls),
                                     key_ring)

    assert (summary.due, summary.renewed, summary.failed) == (1, 1, 0), summary
    # The CA: no second order, one certificate, the one the inventory holds.
    assert order_pebble.orders() - before_orders == placed
    counts = issuance_counts(sqlite_engine, order_pebble, before_serials)
    assert len(counts.ca_serials) == 1 and counts.per_managed == {name: 1} and counts.not_recorded == frozenset()
    if point == "issued":
        assert counts.ca_serials == issued_while_killed  # downloaded, not issued again
    with read_session(sqlite_engine) as session:
        row = managed.get(session, name)
        current = managed.current_certificate(session, row)
        assert current is not None and int(current.serial_hex.replace(":", ""), 16) in counts.ca_serials
        # The killed run's key is the new certificate's, and it is kept; the journal is cleared.
        assert current.spki_sha256 == journalled_key
        assert (row.pending_key_id, row.pending_order_url) == (None, None)
        keys = {k.spki_sha256: k for k in session.exec(select(PrivateKey))}
        assert journalled_key in keys and all(k.destroyed_at is None for k in keys.values())
        recorded = session.exec(select(Certificate).where(col(Certificate.managed_certificate_id).is_not(None))).all()
        assert all(c.spki_sha256 in keys for c in recorded)
        made = [json.loads(e.details) for e in session.exec(
            select(AuditEvent).where(col(AuditEvent.seq) > head, AuditEvent.action == "key.stored"))]
        assert [m["spki_sha256"] for m in made] == [journalled_key]  # one key made, by the killed run
        rerun = list(session.exec(select(AuditEvent.action).where(col(AuditEvent.seq) > killed_head)))
        assert rerun.count("certificate.issued") == 1 and "key.destroyed" not in rerun
        assert audit.verify(session).events == _head(sqlite_engine)
