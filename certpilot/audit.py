"""The audit trail: append-only, hash-chained events.

Each event's hash is SHA-256 over its canonical form, which includes the previous event's hash, so
changing, removing or reordering any stored event breaks the chain at that point. Callers append
inside a write transaction (certpilot.database.write_session), which serialises writers and so keeps
the chain linear. Details must never hold secrets: ``append`` refuses anything that looks like PEM.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col, select

from certpilot.clock import utcnow
from certpilot.errors import AuditChainError, InvalidOptionError
from certpilot.models import AuditEvent

GENESIS = "0" * 64
HASH = re.compile(r"^[0-9a-f]{64}$")  # an event's hash: SHA-256, lower-case hex


@dataclass(frozen=True)
class Actor:
    """Who acts, and the Prefect flow run acting for them, if any."""

    name: str
    flow_run_id: str | None = None


@dataclass(frozen=True)
class Change:
    action: str  # e.g. certificate.added, location.added, key.stored, key.destroyed
    object: str  # e.g. certificate:<fingerprint>, key:<id>
    details: dict[str, Any] = field(default_factory=dict)


def canonical_details(details: dict[str, Any]) -> str:
    text = json.dumps(details, sort_keys=True, separators=(",", ":"), default=str, ensure_ascii=False)
    if "-----BEGIN" in text or "PRIVATE KEY" in text:
        raise ValueError("audit details must not contain PEM or key material")
    return text


def event_hash(seq: int, at: dt.datetime, actor: str, action: str, obj: str, flow_run_id: str | None,
               details: str, prev_hash: str) -> str:
    canonical = json.dumps([seq, at.astimezone(dt.timezone.utc).isoformat(timespec="microseconds"), actor,
                            action, obj, flow_run_id, details, prev_hash], separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def append(session: Session, actor: Actor, changes: Iterable[Change], now: dt.datetime | None = None) -> int:
    """Append one event per change, chained after the current head. Returns how many were appended."""
    changes = list(changes)
    if not changes:
        return 0
    head = session.exec(select(AuditEvent.seq, AuditEvent.hash).order_by(col(AuditEvent.seq).desc()).limit(1)).first()
    seq, prev = (head[0], head[1]) if head else (0, GENESIS)
    at = now or utcnow()
    rows = []
    for change in changes:
        seq += 1
        details = canonical_details(change.details)
        digest = event_hash(seq, at, actor.name, change.action, change.object, actor.flow_run_id, details, prev)
        rows.append({"seq": seq, "at": at, "actor": actor.name, "action": change.action, "object": change.object,
                     "flow_run_id": actor.flow_run_id, "details": details, "prev_hash": prev, "hash": digest})
        prev = digest
    session.execute(sa.insert(AuditEvent), rows)
    return len(rows)


@dataclass(frozen=True)
class ChainStatus:
    events: int
    head_hash: str


def verify(session: Session, expected_head: str | None = None, batch: int = 5000, since: int = 1) -> ChainStatus:
    """Walk the chain in order from event ``since`` (the whole chain by default). Raises
    AuditChainError naming the first broken or missing link.

    From a later event, the walk starts at the hash the event before it records, so it proves the
    links and contents of that part only (the monitor's audit completeness checks its window this way;
    ``certpilot audit verify`` walks it all). ``events`` in the result still counts the whole chain.

    The chain alone cannot show that its newest events were cut off; ``expected_head``, a head hash
    recorded earlier (``audit verify`` prints it), can: it must still be in the chain. A value that is
    not a hash at all is an InvalidOptionError, not a broken chain.
    """
    if expected_head is not None and not HASH.match(expected_head):
        raise InvalidOptionError("expected_head", expected_head, "an event hash: 64 lower-case hex digits")
    expected_seq, prev = 1, GENESIS
    if since > 1:
        before = session.exec(select(AuditEvent.hash).where(col(AuditEvent.seq) == since - 1)).first()
        if before is None:
            raise AuditChainError(since - 1, f"event {since - 1} is missing")
        expected_seq, prev = since, before
    last_seq = expected_seq - 1
    while True:
        rows: Sequence[AuditEvent] = session.exec(
            select(AuditEvent).where(col(AuditEvent.seq) > last_seq).order_by(col(AuditEvent.seq)).limit(batch)).all()
        if not rows:
            if expected_head and session.exec(select(AuditEvent.seq).where(col(AuditEvent.hash) == expected_head)).first() is None:
                raise AuditChainError(expected_seq, f"the recorded head {expected_head[:16]}... is no longer in the "
                                                    "chain: newer events were removed or rewritten")
            return ChainStatus(expected_seq - 1, prev)
        for event in rows:
            if event.seq != expected_seq:
                raise AuditChainError(expected_seq, f"event {expected_seq} is missing (next stored is {event.seq})")
            if event.prev_hash != prev:
                raise AuditChainError(event.seq, "its previous-hash does not match the event before it")
            recomputed = event_hash(event.seq, event.at, event.actor, event.action, event.object,
                                    event.flow_run_id, event.details, event.prev_hash)
            if recomputed != event.hash:
                raise AuditChainError(event.seq, "its contents do not match its hash (altered)")
            prev = event.hash
            expected_seq += 1
            last_seq = event.seq
        session.expunge_all()


def list_events(session: Session, *, object_prefix: str | None = None, action: str | None = None,
                limit: int = 100) -> list[AuditEvent]:
    query = select(AuditEvent)
    if object_prefix:
        query = query.where(col(AuditEvent.object).startswith(object_prefix))
    if action:
        query = query.where(col(AuditEvent.action) == action)
    events = session.exec(query.order_by(col(AuditEvent.seq).desc()).limit(limit)).all()
    return list(reversed(events))
