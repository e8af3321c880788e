"""Renewal claims (certpilot.renewing.claim, renew_claimed): two runs that overlap, on threads of one
process here as on workers of several machines, never renew the same certificate twice; on SQLite and
on the real PostgreSQL."""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import subprocess
import sys
import threading

import sqlalchemy as sa
from sqlmodel import select

from certpilot import audit, keystore, managed, renewing
from certpilot.database import read_session
from certpilot.models import AuditEvent, Certificate, RenewalClaim
from certpilot.settings import load_settings
from connectors.private_ca import PrivateCAIssuer
from lab.due_fleet import define_due, init_backdated_ca

ACTOR = audit.Actor("test")
CA = "claims"


def _ring() -> keystore.KeyRing:
    return keystore.load_key_ring(load_settings())


def _fleet(engine: sa.Engine, count: int) -> list[str]:
    init_backdated_ca(engine, _ring(), ACTOR, CA)
    return define_due(engine, _ring(), ACTOR, CA, "claim", count)


def _current(engine: sa.Engine, name: str) -> str | None:
    with read_session(engine) as session:
        row = managed.current_certificate(session, managed.get(session, name))
        return row.fingerprint_sha256 if row else None


def test_one_holder_at_a_time_until_released_or_expired(engine: sa.Engine) -> None:
    [name] = _fleet(engine, 1)
    now = dt.datetime.now(dt.timezone.utc)
    assert renewing.claim(engine, name, "flow-run:a", now) is None
    assert renewing.claim(engine, name, "flow-run:b", now) == "flow-run:a"
    assert renewing.claim(engine, name, "flow-run:a", now) is None  # its own claim, renewed
    renewing.release(engine, name, "flow-run:b")  # not b's to release
    assert renewing.claim(engine, name, "flow-run:b", now) == "flow-run:a"
    renewing.release(engine, name, "flow-run:a")
    assert renewing.claim(engine, name, "flow-run:b", now) is None
    # b dies holding it: its claim lapses at its until, and then c may take it.
    later = now + renewing.CLAIM_LEASE + dt.timedelta(seconds=1)
    assert renewing.claim(engine, name, "flow-run:c", now + dt.timedelta(minutes=5)) == "flow-run:b"
    assert renewing.claim(engine, name, "flow-run:c", later) is None
    with read_session(engine) as session:
        [held] = session.exec(select(RenewalClaim)).all()
    assert held.holder == "flow-run:c" and held.until == later + renewing.CLAIM_LEASE


def test_overlapping_runs_renew_each_certificate_once(engine: sa.Engine) -> None:
    names = _fleet(engine, 6)
    selected = {name: _current(engine, name) for name in names}  # what both runs found due
    issuer = PrivateCAIssuer(engine, CA, _ring)
    steps = renewing.DirectSteps(engine, lambda _: issuer, _ring, ACTOR)
    results: dict[str, list[renewing.Renewal | renewing.Skipped]] = {"a": [], "b": []}
    started = dt.datetime.now(dt.timezone.utc)

    def run(holder: str, order: list[str]) -> None:
        for name in order:
            results[holder].append(renewing.renew_claimed(steps, engine, name, f"flow-run:{holder}", selected[name]))

    threads = [threading.Thread(target=run, args=("a", names)), threading.Thread(target=run, args=("b", names[::-1]))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads)

    both = results["a"] + results["b"]
    renewed = sorted(r.name for r in both if isinstance(r, renewing.Renewal))
    skipped = [r for r in both if isinstance(r, renewing.Skipped)]
    assert renewed == sorted(names) and len(skipped) == len(names), both
    assert all("is renewing it" in s.why or "renewed by another run meanwhile" in s.why for s in skipped)
    with read_session(engine) as session:
        for name in names:  # one new certificate each: the one seeded superseded, one active
            row = managed.get(session, name)
            assert sorted(c.status for c in session.exec(select(Certificate).where(
                Certificate.managed_certificate_id == row.id))) == ["active", "superseded"]
        issued = session.exec(select(AuditEvent).where(AuditEvent.action == "certificate.issued",
                                                       AuditEvent.at >= started)).all()
        assert not session.exec(select(RenewalClaim)).all()  # every claim released
    assert sorted(json.loads(e.details)["managed"] for e in issued) == sorted(names)

    # A third run that found them due before the others renewed them leaves them alone.
    late = renewing.renew_claimed(steps, engine, names[0], "flow-run:c", selected[names[0]])
    assert isinstance(late, renewing.Skipped) and "renewed by another run meanwhile" in late.why


def test_a_claim_whose_holder_is_gone_is_taken_over_at_once(engine: sa.Engine) -> None:
    """A renewal killed mid-way (SIGKILL) leaves its claim; the next run takes it over at once when the holder
    is known gone, here a process of this host that exited, instead of waiting an hour for it to lapse."""
    [name] = _fleet(engine, 1)
    exited = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                            check=True, timeout=30)
    dead = f"process:{socket.gethostname()}:{int(exited.stdout)}"
    assert renewing.claim(engine, name, dead) is None
    assert renewing.claim(engine, name, "flow-run:b") == dead  # not asked whether it is alive: it waits
    assert renewing.claim(engine, name, renewing.process_holder(), alive=renewing.process_alive) is None
    assert renewing.claim(engine, name, "flow-run:c", alive=renewing.process_alive) == renewing.process_holder()


def test_a_flow_run_holder_whose_process_on_this_host_is_gone_is_not_alive(no_prefect_api: None) -> None:
    """A flow run killed outside a worker stays Running in Prefect: its claim names the run's process too
    (tasks.renewal.run_holder), and a process of this host that is gone means the run is gone."""
    from tasks.renewal import claim_holder_alive

    exited = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                            check=True, timeout=30)
    here = socket.gethostname()
    run = "flow-run:6f0e2c1a-3b7d-4e59-9a41-0c8d2f6b7e13"
    assert claim_holder_alive(f"{run}@{here}:{int(exited.stdout)}") is False
    assert claim_holder_alive(f"{run}@{here}:{os.getpid()}") is True  # alive; no API to ask about the run
    assert claim_holder_alive(f"{run}@another-host:{int(exited.stdout)}") is True  # cannot tell
