"""Emergency revoke-and-replace: a campaign over every certificate a scope matched, one resumable state
machine per certificate, without Prefect.

A campaign (``ReplacementRun``) is opened for a scope (certpilot.scope), a revocation reason and an
order (``revoke_first``): the certificates the scope matched are recorded as its items
(``ReplacementItem``) when it starts, each with what the scope said to do (certpilot.scope.Action).
Running the same scope, reason and order again while the campaign is not done resumes it from those
items, never from a fresh look at the scope: once replaced, the managed names resolve to the new
certificates, which are not the ones to revoke.

Each item advances through its states, each change committed before the next step starts, and the
module-level ``checkpoint(item_id, state)`` called after each commit (a no-op: the seam where tests
kill the process):

- replace (the default order): pending -> key -> issued -> deployed -> revoked -> done.
  key: a new key, generated and sealed in the keystore in the same transaction that records its id on
  the item (never the old, compromised key: its public key is checked to differ); a resumed item reuses
  it. issued: a CSR with that key, the issuer's order remembered in the item (``ItemJournal``, so a
  resumed ACME order is finished, not placed twice), the certificate checked and stored
  (certpilot.renewing.record_issued) and its fingerprint written on the item in one transaction.
  deployed: certpilot.rollout.deploy_everywhere over the managed certificate's targets (canary, waves,
  verification on the wire, roll back on failure); no targets counts as deployed. revoked:
  certpilot.revoking.revoke of the old certificate with the campaign's reason.
- revoke_first: pending -> key -> revoked -> issued -> deployed -> done (for a key known to be in an
  attacker's hands: the old certificate is revoked before its replacement exists, so its targets serve
  a revoked certificate until the new one is deployed).
- revoke only (scope action REVOKE: a superseded certificate still valid): pending -> revoked -> done.
- CANNOT and NOTHING items are ``skipped`` from the start, with the scope's reason.

The issuance gate: before a replacement's key is made, and again before it is issued (a resumed item,
a policy changed meanwhile), the request is checked against the policy (``Replacer.policy``;
certpilot.renewing.check_policy). A request the policy refuses fails the item at step ``policy``,
naming the rules, before any CA is contacted; with revoke_first it fails before the old certificate
is revoked, unless that was done already.

A replacement holds its managed certificate's renewal claim (certpilot.renewing.claim, for
``Replacer.holder``) from before its key is made until its certificate is stored, so that no renew-due
batch or ad hoc renewal issues for that certificate meanwhile; a renewal in progress is waited for
(``Replacer.claim_wait``), then the step fails as transient.

A step that fails for a transient reason leaves the item where it was (its error noted) and raises, so
the caller may retry; any other failure marks it ``failed`` with its error, redacted. A failed
replacement is never revoked (unless revoke_first revoked it already): its targets keep the certificate
they served (rolled back). Running the campaign again resumes failed items from the last state they
reached (their key, order and certificate are kept).

``run_campaign`` orders the items: the first unfinished replacement alone (the canary: replaced,
verified and revoked before any other starts, unless one was already done; if it fails, no other starts
and the campaign stays resumable), then the rest, at most
``concurrency`` at once, through the caller's seam (``RunItems``: Prefect task runs in the flow, threads
on the CLI). ``CampaignReport`` is what the run did, with the exposures found after it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

import sqlalchemy as sa
from cryptography import x509
from sqlmodel import Session, col, select

from certpilot import audit, ca, inventory, managed, renewing, revoking, rollout
from certpilot.clock import Clock, utcnow
from certpilot.database import read_session, write_session
from certpilot.errors import NotFoundError, PermanentError, TransientError, redact
from certpilot.exposure import Exposure, ExposureReport
from certpilot.issuance import Issuer
from certpilot.keys import generate_private_key, public_key_sha256
from certpilot.keystore import KeyRef, store_private_key
from certpilot.managed import KeyRingSource
from certpilot.models import Certificate, ManagedCertificate, ReplacementItem, ReplacementRun, Target
from certpilot.policy import Policy, load_policy
from certpilot.scope import Action, InScope, Scope
from certpilot.settings import load_settings

__all__ = [
    "Campaign",
    "CampaignReport",
    "Item",
    "ItemJournal",
    "NothingInScope",
    "ReplacementFailed",
    "Replacer",
    "RevokeAndReplaceFailed",
    "RunItems",
    "State",
    "advance",
    "checkpoint",
    "finish_campaign",
    "load_campaign",
    "mark_failed",
    "open_campaign",
    "run_campaign",
]

_MAX_ERROR = 1000
_log = logging.getLogger(__name__)


class State(StrEnum):
    PENDING = "pending"
    KEY = "key"
    ISSUED = "issued"
    DEPLOYED = "deployed"
    REVOKED = "revoked"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"


FINISHED = frozenset({State.DONE, State.FAILED, State.SKIPPED})
_REPLACE = (State.PENDING, State.KEY, State.ISSUED, State.DEPLOYED, State.REVOKED, State.DONE)
_REVOKE_FIRST = (State.PENDING, State.KEY, State.REVOKED, State.ISSUED, State.DEPLOYED, State.DONE)
_REVOKE_ONLY = (State.PENDING, State.REVOKED, State.DONE)


def sequence(action: str, revoke_first: bool) -> tuple[State, ...]:
    """The states an item of ``action`` goes through, in order."""
    if action == Action.REVOKE:
        return _REVOKE_ONLY
    return _REVOKE_FIRST if revoke_first else _REPLACE


def checkpoint(item_id: int, state: str) -> None:
    """Called after every committed state change of an item. Does nothing: it is the seam where tests
    stop the process (SIGKILL) at a chosen point of a run."""


# ------------------------------------------------------------------------------------------ records

@dataclass(frozen=True)
class Item:
    """One old certificate of a campaign and how far its replacement got: public facts only."""

    id: int
    old_fingerprint: str
    managed: str | None
    action: str  # certpilot.scope.Action value
    why: str | None
    state: State
    key_id: str | None
    new_fingerprint: str | None
    revoked_at: dt.datetime | None
    error: str | None

    @classmethod
    def of(cls, row: ReplacementItem) -> Item:
        assert row.id is not None
        return cls(row.id, row.old_fingerprint, row.managed, row.action, row.why, State(row.state), row.key_id,
                   row.new_fingerprint, row.revoked_at, row.error)

    @property
    def finished(self) -> bool:
        return self.state in FINISHED

    @property
    def label(self) -> str:
        return self.managed or self.old_fingerprint[:16]

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "old_fingerprint": self.old_fingerprint, "managed": self.managed,
                "action": self.action, "why": self.why, "state": str(self.state), "key": f"key:{self.key_id}"
                if self.key_id else None, "new_fingerprint": self.new_fingerprint,
                "revoked_at": inventory.iso(self.revoked_at), "error": self.error}


@dataclass(frozen=True)
class Campaign:
    """A revoke-and-replace campaign and its items (in the order they were recorded: replacements first)."""

    id: int
    scope: dict[str, Any]
    scope_key: str
    reason: str
    revoke_first: bool
    status: str  # open, failed, done
    created_at: dt.datetime
    finished_at: dt.datetime | None
    items: tuple[Item, ...]
    resumed: bool = False  # this run picked up a campaign an earlier run started

    @property
    def reason_flag(self) -> x509.ReasonFlags:
        return ca.parse_reason(self.reason)

    def of_action(self, action: Action) -> list[Item]:
        return [i for i in self.items if i.action == action]

    @property
    def managed_names(self) -> list[str]:
        return sorted({i.managed for i in self.items if i.managed})

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "scope": self.scope, "reason": self.reason, "revoke_first": self.revoke_first,
                "status": self.status, "resumed": self.resumed, "created_at": inventory.iso(self.created_at),
                "finished_at": inventory.iso(self.finished_at), "items": [i.as_dict() for i in self.items]}


class NothingInScope(PermanentError):
    """A real run whose scope matched no certificate: nothing was started."""

    def __init__(self, scope: str) -> None:
        self.scope = scope
        super().__init__(f"nothing matched the scope {scope}: no certificate in the inventory is in it, so "
                         "nothing was replaced or revoked")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.scope,))


class ReplacementFailed(PermanentError):
    """One certificate's replacement failed at ``step``; it was not revoked unless ``revoked``."""

    def __init__(self, label: str, old: str, step: str, reason: str, revoked: bool) -> None:
        self.label, self.old, self.step, self.reason, self.revoked = label, old, step, reason, revoked
        state = ("its old certificate was revoked first (revoke_first)" if revoked
                 else "its old certificate was NOT revoked")
        super().__init__(f"replacement of {label} ({old[:16]}) failed at {step}: {reason}; {state}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.label, self.old, self.step, self.reason, self.revoked))


# ------------------------------------------------------------------------------------------ campaigns

def _load(session: Session, run: ReplacementRun, resumed: bool = False) -> Campaign:
    assert run.id is not None
    items = session.exec(select(ReplacementItem).where(ReplacementItem.run_id == run.id)
                         .order_by(col(ReplacementItem.id))).all()
    return Campaign(run.id, dict(run.scope), run.scope_key, run.reason, run.revoke_first, run.status, run.created_at,
                    run.finished_at, tuple(Item.of(i) for i in items), resumed)


def load_campaign(engine: sa.Engine, campaign_id: int) -> Campaign:
    with read_session(engine) as session:
        run = session.get(ReplacementRun, campaign_id)
        if run is None:
            raise NotFoundError(f"no revoke-and-replace campaign {campaign_id}")
        return _load(session, run)


def _reached(row: ReplacementItem, revoke_first: bool) -> State:
    """The last state a failed item had reached, from what it recorded: where a resumed run picks it up."""
    if row.action == Action.REVOKE:
        return State.PENDING
    if row.new_fingerprint is not None:
        return State.ISSUED  # deploying again is safe: a target already serving it is only verified
    if row.key_id is not None:
        return State.REVOKED if revoke_first and row.revoked_at is not None else State.KEY
    return State.PENDING


def open_campaign(engine: sa.Engine, scope: Scope, reason: str, revoke_first: bool, actor: audit.Actor, *,
                  available_issuers: Collection[str] | None = None, now: dt.datetime | None = None) -> Campaign:
    """The campaign for ``scope``, ``reason`` and ``revoke_first``: the one not yet done (open, or failed
    last time), resumed from its recorded items (failed ones from where they got to); else a new one
    with the certificates the scope matches now (certpilot.scope.resolve). NothingInScope when it
    matches none; PermanentError for an unknown reason or an empty scope."""
    reason = ca.reason_name(ca.parse_reason(reason)) or reason
    now = now or utcnow()
    with write_session(engine) as session:
        run = session.exec(select(ReplacementRun).where(
            ReplacementRun.scope_key == scope.key(), ReplacementRun.reason == reason,
            ReplacementRun.revoke_first == revoke_first, col(ReplacementRun.status) != "done")
            .order_by(col(ReplacementRun.id).desc()).limit(1)).first()
        if run is not None:
            rows = session.exec(select(ReplacementItem).where(ReplacementItem.run_id == run.id,
                                                              ReplacementItem.state == State.FAILED)).all()
            for row in rows:
                row.state = _reached(row, revoke_first)
                row.updated_at = now
                session.add(row)
            run.status, run.finished_at, run.updated_at = "open", None, now
            run.flow_run_id = actor.flow_run_id
            session.add(run)
            session.flush()
            audit.append(session, actor, [audit.Change("replacement.resumed", f"replacement:{run.id}", {
                "scope": scope.describe(), "reason": reason, "revoke_first": revoke_first,
                "retrying_failed": len(rows)})], now)
            return _load(session, run, resumed=True)
        found = resolve_scope(session, scope, now, available_issuers)
        if not found:
            raise NothingInScope(scope.describe())
        run = ReplacementRun(scope_key=scope.key(), scope=scope.as_dict(), reason=reason, revoke_first=revoke_first,
                             status="open", flow_run_id=actor.flow_run_id, created_at=now, updated_at=now)
        session.add(run)
        session.flush()
        assert run.id is not None
        session.execute(sa.insert(ReplacementItem), [{
            "run_id": run.id, "old_fingerprint": f.fingerprint_sha256, "managed": f.managed, "action": str(f.action),
            "why": f.why, "state": State.PENDING if f.action in (Action.REPLACE, Action.REVOKE) else State.SKIPPED,
            "updated_at": now} for f in found])
        counts = {a.value: sum(1 for f in found if f.action == a) for a in Action}
        audit.append(session, actor, [audit.Change("replacement.started", f"replacement:{run.id}", {
            "scope": scope.describe(), "reason": reason, "revoke_first": revoke_first, **counts})], now)
        return _load(session, run)


def resolve_scope(session: Session, scope: Scope, now: dt.datetime,
                  available_issuers: Collection[str] | None) -> list[InScope]:
    """The scope's certificates (certpilot.scope.resolve), each once."""
    from certpilot import scope as scopes

    seen: set[str] = set()
    out = []
    for found in scopes.resolve(session, scope, now=now, available_issuers=available_issuers):
        if found.fingerprint_sha256 not in seen:
            seen.add(found.fingerprint_sha256)
            out.append(found)
    return out


def finish_campaign(engine: sa.Engine, campaign_id: int, actor: audit.Actor,
                    now: dt.datetime | None = None) -> Campaign:
    """Close the campaign: done when every item is done or skipped, failed (and resumable) otherwise;
    one ``replacement.finished`` audit event."""
    now = now or utcnow()
    with write_session(engine) as session:
        run = session.get(ReplacementRun, campaign_id)
        if run is None:
            raise NotFoundError(f"no revoke-and-replace campaign {campaign_id}")
        campaign = _load(session, run)
        states = [i.state for i in campaign.items]
        failed = [i for i in campaign.items if i.state is not State.DONE and i.state is not State.SKIPPED]
        run.status = "failed" if failed else "done"
        run.finished_at = run.updated_at = now
        session.add(run)
        session.flush()
        audit.append(session, actor, [audit.Change("replacement.finished", f"replacement:{campaign_id}", {
            "status": run.status, **{s.value: states.count(s) for s in State if states.count(s)},
            "failed": [i.label for i in failed][:50]})], now)
        return _load(session, run)


# ------------------------------------------------------------------------------------------ one item

class ItemJournal:
    """The OrderJournal of one item: its ``order_url`` column, so a resumed issuance finishes the order
    placed before the kill instead of placing a second one."""

    def __init__(self, engine: sa.Engine, item_id: int) -> None:
        self.engine, self.item_id = engine, item_id

    def order_url(self) -> str | None:
        with read_session(self.engine) as session:
            row = session.get(ReplacementItem, self.item_id)
            return row.order_url if row is not None else None

    def record_order(self, url: str) -> None:
        with write_session(self.engine) as session:
            row = session.get(ReplacementItem, self.item_id)
            if row is not None:
                row.order_url = url
                row.updated_at = utcnow()
                session.add(row)


IssuerSource = Callable[[str], Issuer]  # the connector of an issuer block name, built once per run


class Log(Protocol):
    def info(self, msg: str, *args: Any) -> None: ...

    def warning(self, msg: str, *args: Any) -> None: ...

    def error(self, msg: str, *args: Any) -> None: ...


CLAIM_WAIT_SECONDS = 600.0  # a replacement waits this long for a renewal of the same certificate to end


@dataclass(frozen=True)
class Replacer:
    """What advancing an item needs, built once per run: the inventory, the issuer connectors by block
    name, the key ring, who acts, how a deployment's per-target steps run (certpilot.rollout.RunSteps),
    and the policy of the issuance gate (the tasks and the CLI pass blocks.policy.policy_in_force();
    None: certpilot.policy.load_policy from the settings, read at each check)."""

    engine: sa.Engine
    issuers: IssuerSource
    key_ring: KeyRingSource
    actor: audit.Actor
    run_steps: rollout.RunSteps
    target_concurrency: int = 4
    log: Any = None  # a logging.Logger or Prefect's run logger; None: certpilot.rollout's
    clock: Clock = utcnow
    # Called once an old certificate is revoked (the flow watches relying parties see it and records how
    # long that took); its failure is logged, never the item's.
    on_revoked: Callable[[revoking.RevocationOutcome], Any] | None = None
    policy: Policy | None = None
    # Whose renewal claim (certpilot.renewing.claim) a replacement holds while it makes its key and
    # certificate, so that no renewal issues for the same managed certificate meanwhile; whether another
    # claim's holder may still be renewing; how long to wait for a renewal in progress to end.
    holder: str = dataclasses.field(default_factory=renewing.process_holder)
    alive: renewing.HolderAlive | None = renewing.process_alive
    claim_wait: float = CLAIM_WAIT_SECONDS


def _set(r: Replacer, item_id: int, state: State, **values: Any) -> None:
    with write_session(r.engine) as session:
        _write(session, item_id, state, r.clock(), **values)
    checkpoint(item_id, str(state))


def _write(session: Session, item_id: int, state: State, now: dt.datetime, **values: Any) -> None:
    session.execute(sa.update(ReplacementItem).where(col(ReplacementItem.id) == item_id)
                    .values(state=str(state), updated_at=now, **values))


def _row(engine: sa.Engine, item_id: int) -> tuple[ReplacementItem, ReplacementRun]:
    with read_session(engine) as session:
        row = session.get(ReplacementItem, item_id)
        if row is None:
            raise NotFoundError(f"no revoke-and-replace item {item_id}")
        run = session.get(ReplacementRun, row.run_id)
        assert run is not None
        return row, run


def _check_policy(r: Replacer, row: ReplacementItem) -> None:
    """The issuance gate for the item's replacement: PolicyViolationError naming the rules it breaks."""
    assert row.managed is not None
    policy = r.policy if r.policy is not None else load_policy(load_settings())
    renewing.check_policy(r.engine, renewing.plan(r.engine, row.managed), policy, r.clock())


def _claim(r: Replacer, row: ReplacementItem) -> None:
    """The managed certificate's renewal claim, for ``r.holder``: TransientError (retried) when a renewal
    of it by another run has not ended within ``r.claim_wait``."""
    assert row.managed is not None
    try:
        renewing.claim_waiting(r.engine, row.managed, r.holder, r.alive, r.claim_wait)
    except renewing.RenewalInProgressError as busy:
        raise TransientError(f"{row.managed} is being renewed by {busy.holder}: that renewal did not end within "
                             f"{r.claim_wait:g} s") from None


def _make_key(r: Replacer, row: ReplacementItem) -> None:
    """pending -> key: a new key for the managed certificate, sealed, its id on the item: one transaction."""
    with read_session(r.engine) as session:
        algorithm = managed.get(session, row.managed or "").key_algorithm
        old = session.get(Certificate, row.old_fingerprint)
    key = generate_private_key(algorithm)  # outside the write transaction: an RSA key takes a while
    if old is not None and public_key_sha256(key) == old.spki_sha256:
        raise PermanentError(f"the new key of {row.managed} is the old certificate's key: refusing to reuse it")
    now = r.clock()
    with write_session(r.engine) as session:
        ref = store_private_key(session, key, r.key_ring(), r.actor, origin="generated", now=now)
        _write(session, row.id or 0, State.KEY, now, key_id=ref.id)
    del key
    checkpoint(row.id or 0, str(State.KEY))


def _issue(r: Replacer, row: ReplacementItem) -> None:
    """key (or revoked) -> issued: CSR with the item's key, the order journalled on the item, the
    certificate checked, stored and named on the item in one transaction."""
    assert row.key_id is not None and row.managed is not None and row.id is not None
    plan = renewing.plan(r.engine, row.managed)
    key = KeyRef(row.key_id)
    request = renewing.new_csr(r.engine, plan, key, r.key_ring)
    with read_session(r.engine) as session:
        old = session.get(Certificate, row.old_fingerprint)
    replaces = x509.load_der_x509_certificate(old.der) if old is not None and old.status != "revoked" else None
    started = time.monotonic()
    issued = r.issuers(plan.issuer).issue(request.csr, plan.profile, validity_days=plan.validity_days,
                                          replaces=replaces, journal=ItemJournal(r.engine, row.id))
    issued = dataclasses.replace(issued, issuance_seconds=round(time.monotonic() - started, 6))
    now = r.clock()
    with write_session(r.engine) as session:
        renewal = renewing.record_issued(session, managed.get(session, row.managed), issued, key, r.actor, now,
                                         replaces=row.old_fingerprint)
        _write(session, row.id, State.ISSUED, now, new_fingerprint=renewal.fingerprint_sha256)
    checkpoint(row.id, str(State.ISSUED))


def _deploy(r: Replacer, row: ReplacementItem) -> None:
    """issued -> deployed: the new certificate on every target of the managed certificate, canary first,
    verified on the wire; a failure rolls back every target this step changed."""
    assert row.new_fingerprint is not None and row.managed is not None and row.id is not None
    with read_session(r.engine) as session:
        plan = rollout.plan(session, row.managed, row.new_fingerprint)
    kwargs = {"log": r.log} if r.log is not None else {}
    report = rollout.deploy_everywhere(plan, r.run_steps, concurrency=r.target_concurrency, **kwargs)
    if report.failed:
        raise rollout.DeploymentFailed(report)
    _set(r, row.id, State.DEPLOYED)


def _revoke(r: Replacer, row: ReplacementItem, run: ReplacementRun) -> None:
    """-> revoked: the old certificate revoked with the campaign's reason (idempotent)."""
    assert row.id is not None
    with read_session(r.engine) as session:
        old = session.get(Certificate, row.old_fingerprint)
        block = revoking.issuer_of(session, old) if old is not None else None
    if block is None:
        raise PermanentError(f"no issuer block is known that can revoke {row.old_fingerprint[:16]}")
    outcome = revoking.revoke(r.engine, row.old_fingerprint, ca.parse_reason(run.reason), r.issuers(block),
                              r.key_ring, r.actor, now=r.clock())
    _set(r, row.id, State.REVOKED, revoked_at=outcome.revoked_at)
    if r.on_revoked is not None:
        try:
            r.on_revoked(outcome)
        except Exception as exc:  # noqa: BLE001 - a watch that fails is reported, the revocation stands
            (r.log or _log).warning("%s: revoked, but its propagation was not measured: %s", row.managed or
                                    row.old_fingerprint[:16], redact(exc))


def _done(r: Replacer, row: ReplacementItem, run: ReplacementRun) -> None:
    assert row.id is not None
    now = r.clock()
    with write_session(r.engine) as session:
        _write(session, row.id, State.DONE, now, error=None)
        action = "certificate.replaced" if row.new_fingerprint else "certificate.revocation_done"
        audit.append(session, r.actor, [audit.Change(action, f"certificate:{row.old_fingerprint}", {
            "managed": row.managed, "by": row.new_fingerprint, "campaign": run.id, "reason": run.reason,
            "revoke_first": run.revoke_first})], now)
    checkpoint(row.id, str(State.DONE))


_STEPS = {State.KEY: "key", State.ISSUED: "issue", State.DEPLOYED: "deploy", State.REVOKED: "revoke",
          State.DONE: "done"}


def advance(r: Replacer, item_id: int) -> Item:
    """Advance item ``item_id`` to its end (done), from wherever it stands; an item already finished is
    returned as it is. A transient failure leaves it where it was (its error noted) and raises
    TransientError, to be retried; any other failure marks it failed and raises ReplacementFailed."""
    while True:
        row, run = _row(r.engine, item_id)
        state = State(row.state)
        if state in FINISHED:
            return Item.of(row)
        order = sequence(row.action, run.revoke_first)
        target = order[order.index(state) + 1]
        step = _STEPS[target]
        claimed = False
        try:
            if target in (State.KEY, State.ISSUED) and row.action == Action.REPLACE:
                step = "policy"  # the gate: before a key is made and before anything is sent to a CA
                _check_policy(r, row)
                step = "claim"  # no renewal of the same certificate meanwhile (held from key to issued)
                _claim(r, row)
                claimed = True
                step = _STEPS[target]
            if target is State.KEY:
                _make_key(r, row)
            elif target is State.ISSUED:
                _issue(r, row)
            elif target is State.DEPLOYED:
                _deploy(r, row)
            elif target is State.REVOKED:
                _revoke(r, row, run)
            else:
                _done(r, row, run)
            if claimed and target is State.ISSUED:
                renewing.release_quietly(r.engine, row.managed or "", r.holder)
        except Exception as exc:  # noqa: BLE001 - recorded on the item, then raised as what it is
            if claimed:
                renewing.release_quietly(r.engine, row.managed or "", r.holder)
            reason = redact(exc)
            if isinstance(exc, TransientError):
                _note(r, item_id, f"{step}: {reason} (will be retried)")
                raise
            failed = mark_failed(r.engine, item_id, f"{step}: {reason}", r.actor, r.clock())
            raise ReplacementFailed(failed.label, failed.old_fingerprint, step, reason,
                                    failed.revoked_at is not None) from None


def _note(r: Replacer, item_id: int, error: str) -> None:
    with write_session(r.engine) as session:
        session.execute(sa.update(ReplacementItem).where(col(ReplacementItem.id) == item_id)
                        .values(error=error[:_MAX_ERROR], updated_at=r.clock()))


def mark_failed(engine: sa.Engine, item_id: int, error: str, actor: audit.Actor,
                now: dt.datetime | None = None) -> Item:
    """Mark an unfinished item failed with ``error`` (redacted already) and audit it; a finished one is
    left as it is. Its key, order and certificate stay recorded for a resumed run."""
    now = now or utcnow()
    with write_session(engine) as session:
        row = session.get(ReplacementItem, item_id)
        if row is None:
            raise NotFoundError(f"no revoke-and-replace item {item_id}")
        if State(row.state) not in FINISHED:
            at = row.state
            row.state, row.error, row.updated_at = State.FAILED, error[:_MAX_ERROR], now
            session.add(row)
            session.flush()
            audit.append(session, actor, [audit.Change("replacement.failed", f"certificate:{row.old_fingerprint}", {
                "managed": row.managed, "campaign": row.run_id, "after": at, "error": row.error,
                "revoked": row.revoked_at is not None, "new": row.new_fingerprint})], now)
        item = Item.of(row)
    checkpoint(item_id, str(item.state))
    return item


# ------------------------------------------------------------------------------------------ the run

RunItems = Callable[[Sequence[Item], int], Sequence[Item | BaseException]]
"""Advances each of a batch of items to its end, at most ``concurrency`` at once (Prefect task runs in
the flow, threads on the CLI), and returns, in order, each one's Item or the error it ended with. It
never raises for an item."""


def run_campaign(engine: sa.Engine, campaign: Campaign, run_items: RunItems, concurrency: int,
                 actor: audit.Actor, log: Any = None) -> Campaign:
    """Advance every unfinished item of ``campaign``: the canary (the first unfinished replacement,
    alone, unless a replacement of this campaign is done already; a failed canary stops the run there),
    then the other replacements and the revocations, at most ``concurrency`` at once. An item whose run ended in an error without recording
    a failure (retries exhausted, a crash) is marked failed with that error. Then the campaign is
    finished (done, or failed and resumable). Returns it as it now stands."""
    pending = [i for i in campaign.items if not i.finished]
    replacements = [i for i in pending if i.action == Action.REPLACE]
    others = [i for i in pending if i.action != Action.REPLACE]
    batches: list[tuple[list[Item], int]] = []
    canary_done = any(i.action == Action.REPLACE and i.state is State.DONE for i in campaign.items)
    if replacements and not canary_done:
        batches.append((replacements[:1], 1))
        replacements = replacements[1:]
    batches.append((replacements + others, max(1, concurrency)))
    for index, (batch, width) in enumerate(batches):
        if not batch:
            continue
        results = run_items(batch, width)
        for item, result in zip(batch, results, strict=True):
            if isinstance(result, BaseException) and not isinstance(result, ReplacementFailed):
                mark_failed(engine, item.id, redact(result), actor)
        if index == 0 and len(batches) == 2:
            first = load_item(engine, batch[0].id)
            if first.state is not State.DONE:
                # A canary that fails is most often the run's own problem (the issuer, the key type, a
                # reload command all certificates share): stop before touching the rest of the fleet.
                if log is not None:
                    log.error("canary %s did not complete (%s): the other %d certificate(s) were not started; "
                              "fix the cause and run the same scope again to resume", first.label, first.error,
                              len(batches[1][0]))
                break
            if log is not None:
                log.info("canary %s replaced, verified and revoked: %s -> %s", first.label,
                         first.old_fingerprint[:16], (first.new_fingerprint or "?")[:16])
    return dataclasses.replace(finish_campaign(engine, campaign.id, actor), resumed=campaign.resumed)


def load_item(engine: sa.Engine, item_id: int) -> Item:
    with read_session(engine) as session:
        row = session.get(ReplacementItem, item_id)
        if row is None:
            raise NotFoundError(f"no revoke-and-replace item {item_id}")
        return Item.of(row)


# ------------------------------------------------------------------------------------------ report

@dataclass(frozen=True)
class ItemReport:
    """One certificate in the report: old -> new, where the new one is proven served, when the old was revoked."""

    item: Item
    targets: int
    verified: int  # targets last proven serving the new certificate

    def as_dict(self) -> dict[str, Any]:
        return {**self.item.as_dict(), "targets": self.targets, "targets_verified": self.verified}


@dataclass(frozen=True)
class CampaignReport:
    """What a revoke-and-replace run did: per certificate, the exposures found after it, totals, duration."""

    campaign: Campaign
    items: tuple[ItemReport, ...]
    exposure: ExposureReport | None  # the probe after the run (None: not probed)
    seconds: float
    probe_error: str | None = None  # why the exposure probe did not run to its end

    @classmethod
    def of(cls, engine: sa.Engine, campaign: Campaign, exposure: ExposureReport | None, seconds: float,
           probe_error: str | None = None) -> CampaignReport:
        names = sorted({i.managed for i in campaign.items if i.managed})
        with read_session(engine) as session:
            targets: dict[str, list[Target]] = {}
            if names:
                m = ManagedCertificate
                rows = session.exec(select(Target, col(m.name)).join(m, col(m.id) == Target.managed_certificate_id)
                                    .where(col(m.name).in_(names))).all()
                for target, name in rows:
                    targets.setdefault(name, []).append(target)
        reports = []
        for item in campaign.items:
            own = targets.get(item.managed or "", []) if item.action == Action.REPLACE else []
            verified = sum(1 for t in own if item.new_fingerprint and t.verified_fingerprint == item.new_fingerprint)
            reports.append(ItemReport(item, len(own), verified))
        return cls(campaign, tuple(reports), exposure, round(seconds, 3), probe_error)

    @property
    def exposures(self) -> list[Exposure]:
        """The places that still serve an old certificate."""
        return self.exposure.exposures if self.exposure is not None else []

    @property
    def unverified(self) -> list[Exposure]:
        """The places that could not be probed: not known to be clean."""
        return self.exposure.unverified if self.exposure is not None else []

    @property
    def failed(self) -> list[ItemReport]:
        return [r for r in self.items if r.item.state not in (State.DONE, State.SKIPPED)]

    @property
    def ok(self) -> bool:
        return not self.failed and not self.exposures and self.probe_error is None

    def totals(self) -> dict[str, int]:
        items = [r.item for r in self.items]
        return {"certificates": len(items),
                "replaced": sum(1 for i in items if i.action == Action.REPLACE and i.state is State.DONE),
                "revoked": sum(1 for i in items if i.revoked_at is not None),
                "revoked_only": sum(1 for i in items if i.action == Action.REVOKE and i.state is State.DONE),
                "skipped": sum(1 for i in items if i.state is State.SKIPPED),
                "failed": len(self.failed), "exposures": len(self.exposures), "unverified": len(self.unverified)}

    def as_dict(self) -> dict[str, Any]:
        c = self.campaign
        return {"campaign": c.id, "scope": c.scope, "reason": c.reason, "revoke_first": c.revoke_first,
                "status": c.status, "resumed": c.resumed, "seconds": self.seconds, "totals": self.totals(),
                "items": [r.as_dict() for r in self.items],
                "exposure": self.exposure.as_dict() if self.exposure is not None else None,
                "probe_error": self.probe_error}

    def lines(self) -> list[str]:
        t = self.totals()
        c = self.campaign
        out = [f"revoke-and-replace campaign {c.id} ({c.reason}{', revoke first' if c.revoke_first else ''}"
               f"{', resumed' if c.resumed else ''}): {t['replaced']} replaced, {t['revoked']} revoked, "
               f"{t['skipped']} skipped, {t['failed']} failed, {t['exposures']} exposure(s), "
               f"{t['unverified']} place(s) unverified in {self.seconds:.1f} s"]
        for r in self.items:
            i = r.item
            if i.state is State.SKIPPED:
                out.append(f"  skipped  {i.label} {i.old_fingerprint[:16]}: {i.why}")
            elif i.state is State.DONE:
                new = (f" -> {i.new_fingerprint[:16]}, served on {r.verified}/{r.targets} target(s)"
                       if i.new_fingerprint else "")
                out.append(f"  done     {i.label} {i.old_fingerprint[:16]}{new}, revoked {inventory.iso(i.revoked_at)}")
            else:
                out.append(f"  FAILED   {i.label} {i.old_fingerprint[:16]} ({i.state}): {i.error}")
        out += [f"  EXPOSED  {e.place} ({e.where}) still serves {(e.old or '?')[:16]}" for e in self.exposures]
        out += [f"  unverified {e.place} ({e.where}): {e.error}" for e in self.unverified]
        if self.probe_error:
            out.append(f"  EXPOSURE NOT PROBED: {self.probe_error}")
        return out

    def markdown(self, max_rows: int = 1000) -> str:
        c = self.campaign
        t = self.totals()
        verdict = ("FAILED" if self.failed else "EXPOSED" if self.exposures
                   else "exposure not probed" if self.probe_error else "done")
        lines = [f"# Revoke-and-replace: {verdict}", "",
                 f"Campaign {c.id}, scope `{_cell(Scope(**_scope_args(c.scope)).describe())}`, reason **{c.reason}**"
                 f"{', revoke first' if c.revoke_first else ', replace then revoke'}"
                 f"{' (resumed)' if c.resumed else ''}; {self.seconds:.1f} s.", "",
                 " | ".join(f"**{k.replace('_', ' ')}**: {v}" for k, v in t.items()), ""]
        if self.probe_error:
            lines += [f"**The exposure probe did not complete**: {_cell(self.probe_error)}. Whether an old "
                      "certificate is still served somewhere is not known.", ""]
        if self.exposures:
            lines += ["## Exposures: places still serving an old certificate", "",
                      "| place | what | old certificate served |", "|---|---|---|"]
            lines += [f"| {_cell(e.place)} | {_cell(e.where)} | {(e.old or '')[:16]} |"
                      for e in self.exposures[:max_rows]]
            lines.append("")
        if self.unverified:
            lines += ["## Unverified: places that could not be probed (not known to be clean)", "",
                      "| place | what | why |", "|---|---|---|"]
            lines += [f"| {_cell(e.place)} | {_cell(e.where)} | {_cell(e.error)} |" for e in self.unverified[:max_rows]]
            lines.append("")
        rows = sorted(self.items, key=lambda r: (r.item.state in (State.DONE, State.SKIPPED), r.item.id))
        lines += ["## Certificates", "",
                  "| certificate | action | state | old | new | targets verified | revoked at (UTC) | error / why |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in rows[:max_rows]:
            i = r.item
            served = f"{r.verified}/{r.targets}" if i.action == Action.REPLACE else ""
            note = i.error or (i.why if i.state is State.SKIPPED else "")
            lines.append(f"| {_cell(i.label)} | {i.action} | {i.state} | {i.old_fingerprint[:16]} | "
                         f"{(i.new_fingerprint or '')[:16]} | {served} | {_cell(inventory.iso(i.revoked_at))} | "
                         f"{_cell(note)} |")
        if len(rows) > max_rows:
            lines.append(f"| ... and {len(rows) - max_rows} more | | | | | | | |")
        return "\n".join(lines)


def _scope_args(scope: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in scope.items()}


def _cell(value: Any) -> str:
    return str(value if value is not None else "").replace("|", "\\|").replace("\n", " ")


class RevokeAndReplaceFailed(PermanentError):
    """A real revoke-and-replace run that did not finish cleanly: the message names every certificate
    whose replacement failed and every exposure; ``report`` has the rest."""

    def __init__(self, report: CampaignReport) -> None:
        self.report = report
        waiting = [r for r in report.failed if r.item.state is State.PENDING and not r.item.error]
        failed = [r for r in report.failed if r not in waiting]
        parts = []
        if failed:
            shown = "; ".join(f"{r.item.label} ({r.item.old_fingerprint[:16]}): {r.item.error or r.item.state}"
                              for r in failed[:20])
            more = f"; and {len(failed) - 20} more" if len(failed) > 20 else ""
            parts.append(f"{len(failed)} replacement(s) failed, not revoked unless revoke_first: {shown}{more}")
        if waiting:
            parts.append(f"{len(waiting)} certificate(s) not started because the canary failed (run the same scope "
                         "again to resume)")
        if report.exposures:
            shown = "; ".join(f"{e.place} ({e.where}) serves {(e.old or '?')[:16]}" for e in report.exposures[:20])
            more = f"; and {len(report.exposures) - 20} more" if len(report.exposures) > 20 else ""
            parts.append(f"{len(report.exposures)} exposure(s), places still serving an old certificate: {shown}{more}")
        if report.probe_error:
            parts.append(f"the exposure probe did not complete ({report.probe_error}): whether an old certificate "
                         "is still served somewhere is not known")
        super().__init__(f"revoke-and-replace campaign {report.campaign.id}: " + "; ".join(parts))

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.report,))
