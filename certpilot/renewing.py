"""Renewing a managed certificate: one ordered, typed sequence of steps and one failure mapping.

The steps, in order (``Step``): load the plan (``RenewalPlan``: which issuer, what it replaces),
check it against the policy in force (``check_policy``: the issuance gate, certpilot.violations.gate;
a request that violates an unwaived rule is refused, naming the rule, before any CA is contacted or
any key made), generate and seal a new key (a ``KeyRef`` leaves, never the key), build the CSR with it
(``SigningRequest``), have the issuer sign it (``IssuedCertificate``, the chain), and store what came
back after checking it (``Renewal``). The issuer is resolved before a key is made; failing to resolve
it is a failure of the issue step.

``renew(steps, name)`` runs the sequence through ``steps``, the seam (``Steps``): ``DirectSteps``
calls the plain functions below (the CLI, and renew-due's one task run per certificate); the
renew-certificate flow passes an implementation that runs each step as its own Prefect task. Either
way a failure is mapped once (``failure``): which step failed, transient or permanent, the reason
redacted (certpilot.errors.redact), recorded on the managed certificate and in the audit trail, the
unused key destroyed, the certificate in service kept, and a RenewalError raised.

The renewal journal, on the managed certificate (its ``pending_*`` columns): the key step records the
key it made (and the issuer, and when), the issue step gives the issuer a ``RenewalJournal`` in which an
ACME order's URL is recorded as soon as the CA has created it. A transient failure after the key step
(a CA gone silent until the order's deadline, a database busy at the store) leaves the journal: the next
attempt (a retry, the next renew-due or renew-certificate run) takes up the same key, and the issuer
resumes the same order (downloading the certificate if the CA issued it meanwhile) instead of ordering
again, so the CA never issues twice for one renewal. An order the CA no longer has (unknown, expired,
invalid) is dropped from the journal and a new one placed with the pending key, saying so in the log. A
journal for another issuer or key algorithm than the managed certificate now names, or whose key is gone,
is dropped at the key step: its key destroyed and a new one made (logged). Storing the certificate clears
the journal; a permanent failure clears it and destroys the key. The private CA signs at once and ignores
the journal (its key is still kept across a transient failure). The journal holds ids and URLs, never a key.

After each of the key, CSR, issue and store steps, and once an ACME order is journalled,
``certpilot.checkpoints.reached`` is called (a no-op: where tests kill the process). A renewal killed
after its store step but before its deployment finished leaves targets behind; ``left_behind`` finds
them for renew-due, which deploys them again.

The issuer only signs; ``store`` is the one place that records an issued certificate, with one
``certificate.issued`` audit event per issuance. No Prefect and no network here.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import logging
import os
import socket
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlmodel import Session, col, select

from certpilot import audit, checkpoints, inventory, managed, targets, violations
from certpilot.clock import Clock, utcnow
from certpilot.database import read_session, write_session
from certpilot.errors import CertpilotError, NotFoundError, PermanentError, TransientError, redact
from certpilot.issuance import IssuedCertificate, Issuer, build_csr
from certpilot.keys import generate_private_key
from certpilot.keystore import KeyRef, destroy_private_key, load_private_key, store_private_key
from certpilot.managed import KeyRingSource
from certpilot.models import Certificate, ManagedCertificate, PrivateKey, RenewalClaim, Target
from certpilot.policy import Policy, load_policy
from certpilot.settings import load_settings
from certpilot.x509info import describe_certificate, serial_hex, spki_sha256

if TYPE_CHECKING:
    from certpilot.rollout import DeploymentReport

__all__ = [
    "CertificateRenewal",
    "DirectSteps",
    "DueCertificate",
    "Failure",
    "PermanentRenewalError",
    "RenewDueFailed",
    "RenewDueSummary",
    "Renewal",
    "RenewalError",
    "RenewalInProgressError",
    "RenewalJournal",
    "RenewalOutcome",
    "RenewalPlan",
    "SigningRequest",
    "Step",
    "Steps",
    "TransientRenewalError",
    "due_certificates",
    "recorded_outcomes",
    "left_behind",
    "failure",
    "is_transient",
    "issue",
    "new_csr",
    "new_key",
    "plan",
    "record_failure",
    "record_issued",
    "renew",
    "renew_one",
    "renew_claimed",
    "renew_held",
    "claim",
    "claim_waiting",
    "release",
    "release_quietly",
    "Skipped",
    "process_alive",
    "process_holder",
    "check_policy",
    "step_error",
    "store",
]

_MAX_ERROR = 632  # the longest last_error stored on a managed certificate ("<step>: <reason>")
_log = logging.getLogger(__name__)


class Step(enum.StrEnum):
    """The steps of a renewal, in the order they run."""

    LOAD = "load"
    POLICY = "policy"
    KEY = "key"
    CSR = "csr"
    ISSUE = "issue"
    STORE = "store"


# ------------------------------------------------------------------------------------------ records

@dataclass(frozen=True)
class RenewalPlan:
    """What renewing ``name`` needs, read once at its start: public facts only."""

    name: str
    issuer: str  # the issuer block, <block-type-slug>/<block-name>
    profile: str
    key_algorithm: str
    validity_days: int | None
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    current: str | None  # the fingerprint of the certificate in service, if any
    current_not_after: dt.datetime | None
    targets: int  # how many targets it is deployed to
    uris: tuple[str, ...] = ()  # URI names (a SPIFFE ID)


@dataclass(frozen=True)
class SigningRequest:
    """A CSR, as PEM (public: it carries the new key's public half and the names)."""

    pem: str

    @classmethod
    def of(cls, csr: x509.CertificateSigningRequest) -> SigningRequest:
        return cls(csr.public_bytes(serialization.Encoding.PEM).decode("ascii"))

    @property
    def csr(self) -> x509.CertificateSigningRequest:
        return x509.load_pem_x509_csr(self.pem.encode("ascii"))


@dataclass(frozen=True)
class Renewal:
    """What one renewal produced: public facts only."""

    name: str
    issuer: str
    fingerprint_sha256: str
    serial_hex: str
    not_after: dt.datetime
    replaces: str | None
    key_ref: str

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "issuer": self.issuer, "fingerprint_sha256": self.fingerprint_sha256,
                "serial": self.serial_hex, "not_after": inventory.iso(self.not_after), "replaces": self.replaces,
                "key_ref": self.key_ref}


@dataclass(frozen=True)
class Failure:
    """A renewal that failed at ``step``, to be recorded: ``reason`` is redacted already. ``unused_key``
    (the key of this attempt, if any) is destroyed when it is recorded, with the renewal journal cleared,
    unless the failure is ``transient``: then both stay for the next attempt, which resumes its order."""

    name: str
    step: Step
    issuer: str
    reason: str
    unused_key: KeyRef | None = None
    transient: bool = False


# ------------------------------------------------------------------------------------------ errors

class RenewalError(CertpilotError):
    """A renewal that failed at ``step``; the certificate in service (``kept``, a fingerprint) stays.

    The message says what failed where and that nothing in service changed; it never holds key
    material (``reason`` is redacted), so it is safe in logs, state messages and result storage.
    """

    def __init__(self, name: str, step: Step | str, issuer: str, reason: str, kept: str | None) -> None:
        self.name = name
        self.step = Step(step)
        self.issuer = issuer
        self.reason = reason
        self.kept = kept
        still = (f"certificate {kept[:16]} stays in service" if kept
                 else "no certificate was in service before, and none is now")
        super().__init__(f"renewal of {name!r} failed at step {str(self.step)!r} (issuer {issuer}): {reason}; {still}")

    def __reduce__(self) -> tuple[Any, ...]:  # pickled into Prefect's result storage
        return (type(self), (self.name, str(self.step), self.issuer, self.reason, self.kept))


class TransientRenewalError(RenewalError, TransientError):
    """A renewal that may succeed if tried again (a busy CA or database, a timeout)."""


class PermanentRenewalError(RenewalError, PermanentError):
    """A renewal that cannot succeed as configured (a refused request, a wrong certificate back)."""


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, (TransientError, TimeoutError, ConnectionError))


def step_error(name: str, step: Step, issuer: str, exc: BaseException, kept: str | None = None) -> RenewalError:
    """``exc`` as the RenewalError of ``step`` (transient or permanent as ``exc`` is), its reason
    redacted; a RenewalError already is one. Tasks raise this so that Prefect sees nothing else."""
    if isinstance(exc, RenewalError):
        return exc
    kind = TransientRenewalError if is_transient(exc) else PermanentRenewalError
    return kind(name, step, issuer, redact(exc), kept)


# ------------------------------------------------------------------------------------------ the steps

def plan(engine: sa.Engine, name: str) -> RenewalPlan:
    """Step load: the managed certificate ``name`` and what it replaces. NotFoundError if none;
    PermanentError for one that is retired or being retired."""
    with read_session(engine) as session:
        row = managed.in_service(session, name)
        current = managed.current_certificate(session, row)
        count = len(targets.list_targets(session, name))
    return RenewalPlan(row.name, row.issuer, row.profile, row.key_algorithm, row.validity_days,
                       tuple(row.dns_names), tuple(row.ip_addresses),
                       current.fingerprint_sha256 if current else None, current.not_after if current else None,
                       count, tuple(row.uris or ()))


def check_policy(engine: sa.Engine, plan: RenewalPlan, policy: Policy, now: dt.datetime | None = None) -> None:
    """Step policy, the issuance gate: what renewing the plan's certificate would ask the issuer for
    (certpilot.violations.request_facts: its names, key, validity, issuer, owner, tags) against the
    request rules of ``policy``, with the waivers in force. PolicyViolationError (permanent), naming
    each unwaived rule it breaks, before any issuer is built or contacted."""
    now = now or utcnow()
    with read_session(engine) as session:
        row = managed.get(session, plan.name)
        facts = violations.request_facts(session, row, policy, now, plan.key_algorithm)
        violations.gate(session, policy, facts, f"managed certificate {plan.name!r}", now)


def new_key(engine: sa.Engine, plan: RenewalPlan, key_ring: KeyRingSource, actor: audit.Actor,
            now: dt.datetime | None = None) -> KeyRef:
    """Step key: the key of this renewal, sealed in the keystore; only its reference leaves.

    The pending key of an earlier attempt that failed transiently (the renewal journal) is taken up again,
    so that its order is resumed. Else a new key is generated, stored and journalled in one transaction (a
    pending key that cannot serve, being for another issuer or key algorithm, or gone, is destroyed then)."""
    now = now or utcnow()
    with read_session(engine) as session:
        row = managed.get(session, plan.name)
        pending, stale = _pending_key(session, row, plan)
        since, order = row.pending_since, row.pending_order_url
    if pending is not None:
        _log.info("renewal of %r takes up its pending key %s (made %s by an attempt that did not finish)%s",
                  plan.name, pending, since.isoformat() if since else "?", f", and its order {order}" if order else "")
        return pending
    key = generate_private_key(plan.key_algorithm)  # outside the write transaction: an RSA key takes a while
    with write_session(engine) as session:
        ref = store_private_key(session, key, key_ring(), actor, origin="generated", now=now)
        row = managed.get(session, plan.name)
        if stale is not None and row.pending_key_id is not None:
            _log.warning("renewal of %r drops its journal (key %s, order %s): %s; a new key is made",
                         plan.name, KeyRef(row.pending_key_id), row.pending_order_url or "none", stale)
            _destroy_unused(session, KeyRef(row.pending_key_id), actor, now)
        row.pending_key_id, row.pending_issuer, row.pending_since = ref.id, plan.issuer, now
        row.pending_order_url = None
        session.add(row)
    return ref


def _pending_key(session: Session, row: ManagedCertificate, plan: RenewalPlan) -> tuple[KeyRef | None, str | None]:
    """The journal's pending key if this renewal can take it up: (its KeyRef, None); else (None, why it
    cannot), or (None, None) when there is no journal."""
    if row.pending_key_id is None:
        return None, None
    key_row = session.get(PrivateKey, row.pending_key_id)
    if key_row is None or key_row.destroyed_at is not None:
        return None, "its key is destroyed"
    if key_row.algorithm != plan.key_algorithm:
        return None, f"its key is {key_row.algorithm}, the managed certificate now asks for {plan.key_algorithm}"
    if row.pending_issuer != plan.issuer:
        return None, f"it was for issuer {row.pending_issuer}, the managed certificate now names {plan.issuer}"
    if _key_in_use(session, key_row):
        return None, "a certificate carries its key already"
    return KeyRef(key_row.id), None


def _key_in_use(session: Session, key_row: PrivateKey) -> bool:
    return session.exec(select(Certificate.fingerprint_sha256).where(
        Certificate.spki_sha256 == key_row.spki_sha256).limit(1)).first() is not None


def _destroy_unused(session: Session, ref: KeyRef, actor: audit.Actor, now: dt.datetime) -> None:
    """Destroy ``ref`` unless it is destroyed already or a certificate carries it."""
    key_row = session.get(PrivateKey, ref.id)
    if key_row is not None and key_row.destroyed_at is None and not _key_in_use(session, key_row):
        destroy_private_key(session, ref, actor, now)


def _clear_journal(row: ManagedCertificate) -> None:
    row.pending_key_id = row.pending_order_url = row.pending_issuer = None
    row.pending_since = None


class RenewalJournal:
    """The OrderJournal (certpilot.issuance) of a managed certificate's renewal in progress: the
    ``pending_order_url`` of its journal, read and written only while the journal's pending key is the
    one whose public key (``spki_sha256``) the CSR being issued carries."""

    def __init__(self, engine: sa.Engine, name: str, spki_sha256: str) -> None:
        self.engine, self.name, self.spki_sha256 = engine, name, spki_sha256

    def _ours(self, session: Session, row: ManagedCertificate) -> bool:
        key_row = session.get(PrivateKey, row.pending_key_id) if row.pending_key_id is not None else None
        return key_row is not None and key_row.spki_sha256 == self.spki_sha256

    def order_url(self) -> str | None:
        with read_session(self.engine) as session:
            row = managed.get(session, self.name)
            return row.pending_order_url if self._ours(session, row) else None

    def record_order(self, url: str) -> None:
        with write_session(self.engine) as session:
            row = managed.get(session, self.name)
            if not self._ours(session, row):
                return
            if row.pending_order_url and row.pending_order_url != url:
                _log.warning("renewal of %r: the CA could not resume order %s (it no longer has it, or it expired "
                             "or is invalid): dropped from the journal; order %s placed with the pending key %s",
                             self.name, row.pending_order_url, url, KeyRef(row.pending_key_id or ""))
            row.pending_order_url = url
            session.add(row)
        checkpoints.reached(checkpoints.Point.ORDERED, self.name)


def new_csr(engine: sa.Engine, plan: RenewalPlan, key_ref: KeyRef, key_ring: KeyRingSource) -> SigningRequest:
    """Step csr: a CSR for the plan's names, signed with the stored key ``key_ref`` (decrypted here only)."""
    with read_session(engine) as session:
        key = load_private_key(session, key_ref, key_ring())
    return SigningRequest.of(build_csr(key, plan.dns_names, plan.ip_addresses, plan.uris))


def issue(engine: sa.Engine, plan: RenewalPlan, request: SigningRequest, issuer: Issuer) -> IssuedCertificate:
    """Step issue: the issuer signs the CSR; it is told which certificate this one replaces (ARI).
    What it returns carries ``issuance_seconds``, the time from the request to the certificate
    received, which ``record_issued`` audits (the SLI M4 and the issuance latency metric read it)."""
    replaces = None
    if plan.current is not None:
        with read_session(engine) as session:
            row = session.get(Certificate, plan.current)
        replaces = x509.load_der_x509_certificate(row.der) if row is not None else None
    csr = request.csr
    journal = RenewalJournal(engine, plan.name, spki_sha256(csr.public_key()))
    started = time.monotonic()
    issued = issuer.issue(csr, plan.profile, validity_days=plan.validity_days, replaces=replaces, journal=journal)
    return dataclasses.replace(issued, issuance_seconds=round(time.monotonic() - started, 6))


def store(engine: sa.Engine, plan: RenewalPlan, issued: IssuedCertificate, key_ref: KeyRef, actor: audit.Actor,
          now: dt.datetime | None = None) -> Renewal:
    """Step store: check what the issuer returned and make it the current certificate."""
    with write_session(engine) as session:
        return record_issued(session, managed.get(session, plan.name), issued, key_ref, actor, now)


def record_issued(session: Session, row: ManagedCertificate, issued: IssuedCertificate, key_ref: KeyRef,
                  actor: audit.Actor, now: dt.datetime | None = None, *, replaces: str | None = None) -> Renewal:
    """Check what the issuer returned and, only if it is right, make it the current certificate.

    The leaf must carry the public key of ``key_ref`` and every managed name; anything else is refused
    (PermanentError) and the inventory is left as it was. Then the leaf and its chain are upserted,
    the leaf is linked to the managed certificate and to the one it replaces, which is superseded,
    and the issuance is audited: one ``certificate.issued`` event (the issuer records nothing).
    ``replaces``: the fingerprint of the certificate it replaces, when that is not the newest active
    one (revoke-and-replace with revoke_first revokes it before its replacement is issued).
    """
    now = now or utcnow()
    if not issued.chain_der:
        raise PermanentError(f"the issuer returned no certificate for {row.name!r}")
    leaf = issued.leaf
    serial = serial_hex(leaf.serial_number)
    key_row = session.get(PrivateKey, key_ref.id)
    if key_row is None or key_row.destroyed_at is not None:
        raise PermanentError(f"the key {key_ref} that the certificate for {row.name!r} was requested with is "
                             "missing or destroyed: refusing to store a certificate without its key")
    leaf_spki = spki_sha256(leaf.public_key())
    if leaf_spki != key_row.spki_sha256:
        raise PermanentError(f"the certificate issued for {row.name!r} (serial {serial}) carries public key "
                             f"sha256 {leaf_spki[:16]}..., not that of {key_ref} ({key_row.spki_sha256[:16]}...) "
                             "whose CSR was sent: refusing to store it")
    missing = managed.uncovered_names(leaf, row)
    if missing:
        raise PermanentError(f"the certificate issued for {row.name!r} (serial {serial}) does not cover "
                             f"{', '.join(missing)}: refusing to store it")
    if leaf.not_valid_after_utc <= now:
        raise PermanentError(f"the certificate issued for {row.name!r} (serial {serial}) expired at "
                             f"{leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC: refusing to store it")
    records = [describe_certificate(c) for c in issued.chain]
    fp = records[0].fingerprint_sha256
    if row.pending_key_id is not None:  # the renewal in progress ends here: its journal is cleared
        if row.pending_key_id != key_ref.id:
            _destroy_unused(session, KeyRef(row.pending_key_id), actor, now)
        _clear_journal(row)
        session.add(row)
    existing = session.get(Certificate, fp)
    if existing is not None and existing.managed_certificate_id == row.id:  # recorded already (a retried store)
        return Renewal(row.name, row.issuer, fp, existing.serial_hex, existing.not_after,
                       existing.replaces_fingerprint, str(key_ref))
    previous = [c for c, in session.execute(sa.select(col(Certificate.fingerprint_sha256)).where(
        col(Certificate.managed_certificate_id) == row.id, col(Certificate.status) == "active",
        col(Certificate.fingerprint_sha256) != fp).order_by(col(Certificate.not_before).desc()))]
    replaces = replaces or (previous[0] if previous else None)
    if len(records) > 1:
        inventory.upsert(session, [inventory.Observation(r, None, "issued") for r in records[1:]], actor, now=now)
    inventory.upsert(session, [inventory.Observation(records[0], None, "issued")], actor,
                     owner=row.owner, tags=row.tags or None, now=now)
    session.execute(sa.update(Certificate).where(col(Certificate.fingerprint_sha256) == fp).values(
        managed_certificate_id=row.id, replaces_fingerprint=replaces, status="active"))
    if previous:
        session.execute(sa.update(Certificate).where(col(Certificate.fingerprint_sha256).in_(previous))
                        .values(status="superseded"))
    row.last_attempt_at = now
    row.last_error = None
    row.ari_start = row.ari_end = row.ari_checked_at = None  # the window was for the certificate replaced
    session.add(row)
    session.flush()
    changes = [audit.Change("certificate.issued", f"certificate:{fp}", {
        "managed": row.name, "issuer": row.issuer, "serial": serial, "not_after": leaf.not_valid_after_utc.isoformat(),
        "key": str(key_ref), "replaces": replaces, "profile": row.profile,
        **({"issuance_seconds": issued.issuance_seconds} if issued.issuance_seconds is not None else {}),
        **({"notes": list(issued.notes)} if issued.notes else {})})]
    changes += [audit.Change("certificate.superseded", f"certificate:{old}", {"managed": row.name, "by": fp})
                for old in previous]
    audit.append(session, actor, changes, now)
    return Renewal(row.name, row.issuer, fp, serial, leaf.not_valid_after_utc, replaces, str(key_ref))


def record_failure(session: Session, failure: Failure, actor: audit.Actor, now: dt.datetime | None = None) -> str | None:
    """Record a failed renewal on the row and in the audit trail; the current certificate stays active.

    A permanent failure's ``unused_key``, made for this attempt and carried by no certificate, is
    destroyed and the renewal journal cleared: the next attempt makes its own. A transient failure keeps
    both, for the next attempt to take up (``new_key``) with its order. Returns the fingerprint of the
    certificate that stays in service.
    """
    now = now or utcnow()
    row = managed.get(session, failure.name)
    kept = managed.current_certificate(session, row)
    row.last_attempt_at = now
    row.last_error = f"{failure.step}: {failure.reason}"[:_MAX_ERROR]
    session.add(row)
    session.flush()
    audit.append(session, actor, [audit.Change("renewal.failed", f"managed:{failure.name}", {
        "step": str(failure.step), "error": failure.reason, "issuer": row.issuer,
        "kept": kept.fingerprint_sha256 if kept else None})], now)
    if failure.unused_key is not None and not failure.transient:
        _destroy_unused(session, failure.unused_key, actor, now)
        if row.pending_key_id == failure.unused_key.id:
            _clear_journal(row)
            session.add(row)
    return kept.fingerprint_sha256 if kept else None


# ------------------------------------------------------------------------------------------ the sequence

class Steps(Protocol):
    """How each step runs: directly (DirectSteps) or, in the renew-certificate flow, as a task each."""

    def load(self, name: str) -> RenewalPlan: ...

    def gate(self, plan: RenewalPlan) -> None:
        """The issuance gate (``check_policy``): PolicyViolationError when the plan's request violates policy."""
        ...

    def issuer(self, plan: RenewalPlan) -> Issuer: ...

    def key(self, plan: RenewalPlan) -> KeyRef: ...

    def csr(self, plan: RenewalPlan, key: KeyRef) -> SigningRequest: ...

    def issue(self, plan: RenewalPlan, request: SigningRequest, issuer: Issuer) -> IssuedCertificate: ...

    def store(self, plan: RenewalPlan, issued: IssuedCertificate, key: KeyRef) -> Renewal: ...

    def record_failure(self, failure: Failure) -> str | None:
        """Record ``failure``; return the fingerprint of the certificate kept in service."""
        ...


IssuerSource = Callable[[str], Issuer]  # the issuer of an issuer block name


@dataclass(frozen=True)
class DirectSteps:
    """Every step a plain call, in this process (the CLI without a Prefect API; renew-due's task run
    per certificate). ``issuers`` builds the issuer a plan names. ``policy``: the policy the gate
    applies (the CLI and the tasks pass blocks.policy.policy_in_force()); None: certpilot.policy's
    load_policy from the settings, read at each renewal."""

    engine: sa.Engine
    issuers: IssuerSource
    key_ring: KeyRingSource
    actor: audit.Actor
    clock: Clock = utcnow
    policy: Policy | None = None

    def load(self, name: str) -> RenewalPlan:
        return plan(self.engine, name)

    def gate(self, plan: RenewalPlan) -> None:
        policy = self.policy if self.policy is not None else load_policy(load_settings())
        check_policy(self.engine, plan, policy, self.clock())

    def issuer(self, plan: RenewalPlan) -> Issuer:
        return self.issuers(plan.issuer)

    def key(self, plan: RenewalPlan) -> KeyRef:
        return new_key(self.engine, plan, self.key_ring, self.actor, self.clock())

    def csr(self, plan: RenewalPlan, key: KeyRef) -> SigningRequest:
        return new_csr(self.engine, plan, key, self.key_ring)

    def issue(self, plan: RenewalPlan, request: SigningRequest, issuer: Issuer) -> IssuedCertificate:
        return issue(self.engine, plan, request, issuer)

    def store(self, plan: RenewalPlan, issued: IssuedCertificate, key: KeyRef) -> Renewal:
        return store(self.engine, plan, issued, key, self.actor, self.clock())

    def record_failure(self, failure: Failure) -> str | None:
        with write_session(self.engine) as session:
            return record_failure(session, failure, self.actor, self.clock())


def failure(steps: Steps, name: str, step: Step, exc: BaseException, plan: RenewalPlan | None,
            unused_key: KeyRef | None) -> RenewalError:
    """THE failure mapping: ``exc`` ended the renewal of ``name`` at ``step``. Records it through
    ``steps`` (the row's last error, a renewal.failed event, the unused key destroyed) and returns
    the error to raise: transient or permanent as ``exc`` is, its reason redacted, naming the
    certificate that stays in service."""
    reason = exc.reason if isinstance(exc, RenewalError) else redact(exc)
    issuer = plan.issuer if plan is not None else exc.issuer if isinstance(exc, RenewalError) else "?"
    transient = is_transient(exc)
    try:
        kept = steps.record_failure(Failure(name, step, issuer, reason, unused_key, transient))
    except Exception as record_exc:  # noqa: BLE001 - the renewal failed either way: say why it is not recorded
        kept = plan.current if plan is not None else None
        recorded = record_exc.reason if isinstance(record_exc, RenewalError) else redact(record_exc)
        reason += f" (recording this failure also failed: {recorded})"
    kind = TransientRenewalError if transient else PermanentRenewalError
    return kind(name, step, issuer, reason, kept)


def renew(steps: Steps, name: str) -> Renewal:
    """Renew managed certificate ``name``: every step in order, through ``steps``.

    A managed certificate that does not exist raises NotFoundError. Any other failure is recorded
    (``failure``) and raised as a TransientRenewalError or PermanentRenewalError naming the step; the
    certificate in service is untouched then.
    """
    step, loaded, key = Step.LOAD, None, None
    try:
        loaded = steps.load(name)
        step = Step.POLICY  # the gate: nothing is asked of a CA for a request the policy refuses
        steps.gate(loaded)
        step = Step.ISSUE  # resolved before a key is made: an issuer that cannot be had fails the issue step
        issuer = steps.issuer(loaded)
        step = Step.KEY
        key = steps.key(loaded)
        checkpoints.reached(checkpoints.Point.KEY, name)
        step = Step.CSR
        request = steps.csr(loaded, key)
        checkpoints.reached(checkpoints.Point.REQUESTED, name)
        step = Step.ISSUE
        issued = steps.issue(loaded, request, issuer)
        checkpoints.reached(checkpoints.Point.ISSUED, name)
        step = Step.STORE
        renewal = steps.store(loaded, issued, key)
        checkpoints.reached(checkpoints.Point.STORED, name)
        return renewal
    except Exception as exc:
        if step is Step.LOAD and isinstance(exc, NotFoundError):
            raise
        raise failure(steps, name, step, exc, loaded, key) from None


# ------------------------------------------------------------------------------------------ claims

CLAIM_LEASE = dt.timedelta(hours=1)  # longer than a renewal may take (its task's timeout is 40 minutes)


@dataclass(frozen=True)
class Skipped:
    """A due certificate a renew-due run left alone, and why: another run holds its claim, or renewed it
    after this run found it due."""

    name: str
    why: str


HolderAlive = Callable[[str], bool]  # whether the holder of a claim may still be renewing (True when unsure)


def process_holder() -> str:
    """The holder name of this process (``process:<host>:<pid>``), for renewals outside a flow run (the CLI)."""
    return f"process:{socket.gethostname()}:{os.getpid()}"


def process_alive(holder: str) -> bool:
    """False only for a ``process_holder`` of this host whose process is gone (killed); True otherwise."""
    kind, _, rest = holder.partition(":")
    host, _, pid = rest.rpartition(":")
    if kind != "process" or host != socket.gethostname() or not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process by that number: alive
        return True
    return True


def claim(engine: sa.Engine, name: str, holder: str, now: dt.datetime | None = None,
          lease: dt.timedelta = CLAIM_LEASE, alive: HolderAlive | None = None) -> str | None:
    """Claim the renewal of managed certificate ``name`` for ``holder`` (a flow run, a process) until
    ``now + lease``. Returns None when claimed, else the holder whose claim is in force. One serialised
    write transaction (certpilot.database.write_session): of two runs on any machines, one gets it. A
    claim left by a run that died lapses at its ``until``, or at once when ``alive`` says its holder is
    gone (asked outside the write transaction; the claim is taken over only if that holder still has it)."""
    now = now or utcnow()
    gone = None
    with read_session(engine) as session:
        row = managed.get(session, name)
        held = session.get(RenewalClaim, row.id)
        other = held.holder if held is not None and held.until > now and held.holder != holder else None
    if other is not None:
        if alive is None or alive(other):
            return other
        gone = other
    with write_session(engine) as session:
        row = managed.get(session, name)
        assert row.id is not None  # a stored row
        held = session.get(RenewalClaim, row.id)
        if held is not None and held.until > now and held.holder not in (holder, gone):
            return held.holder
        if held is None:
            session.add(RenewalClaim(managed_certificate_id=row.id, holder=holder, until=now + lease))
        else:
            held.holder, held.until = holder, now + lease
            session.add(held)
    return None


def release(engine: sa.Engine, name: str, holder: str) -> None:
    """End ``holder``'s claim on ``name`` (another's, if it took over an expired one, stays)."""
    with write_session(engine) as session:
        ids = sa.select(col(ManagedCertificate.id)).where(col(ManagedCertificate.name) == name).scalar_subquery()
        session.execute(sa.delete(RenewalClaim).where(col(RenewalClaim.managed_certificate_id) == ids,
                                                      col(RenewalClaim.holder) == holder))


class RenewalInProgressError(PermanentError):
    """An ad hoc renewal of ``name`` refused because ``holder`` (another run) holds its renewal claim."""

    def __init__(self, name: str, holder: str) -> None:
        self.name, self.holder = name, holder
        super().__init__(f"{name} is being renewed by {holder} now: not renewed again by this run (wait for that "
                         "run to end, or cancel it, and then renew it if it still needs it)")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.name, self.holder))


def renew_held(steps: Steps, engine: sa.Engine, name: str, holder: str, alive: HolderAlive | None = None,
               lease: dt.timedelta = CLAIM_LEASE) -> Renewal:
    """``renew`` for an ad hoc renewal of one certificate (renew-certificate, `certpilot renew NAME`), due or
    not: under ``holder``'s claim for ``lease`` (``claim``), so that it cannot overlap a renew-due batch or
    another ad hoc run. RenewalInProgressError when another run's claim is in force; nothing recorded then."""
    other = claim(engine, name, holder, alive=alive, lease=lease)
    if other is not None:
        raise RenewalInProgressError(name, other)
    try:
        return renew(steps, name)
    finally:
        release_quietly(engine, name, holder)


def claim_waiting(engine: sa.Engine, name: str, holder: str, alive: HolderAlive | None, wait: float,
                  lease: dt.timedelta = CLAIM_LEASE, poll: float = 1.0) -> None:
    """Claim ``name`` for ``holder`` (``claim``), waiting up to ``wait`` seconds while another run holds it
    (a renewal in progress ends within minutes); RenewalInProgressError naming that run after that."""
    deadline = time.monotonic() + wait
    while (other := claim(engine, name, holder, alive=alive, lease=lease)) is not None:
        if time.monotonic() >= deadline:
            raise RenewalInProgressError(name, other)
        time.sleep(min(poll, max(deadline - time.monotonic(), 0.0)))


def release_quietly(engine: sa.Engine, name: str, holder: str) -> None:
    """``release``, for a run ending: a claim that cannot be released now lapses at its until."""
    try:
        release(engine, name, holder)
    except Exception:  # noqa: BLE001 - the claim then lapses at its until; the renewal's end stands
        pass


def renew_claimed(steps: Steps, engine: sa.Engine, name: str, holder: str, selected_with: str | None,
                  alive: HolderAlive | None = None) -> Renewal | Skipped:
    """``renew`` for renew-due and renew-batch, so that no certificate is renewed twice however runs
    overlap: under ``holder``'s claim (``claim``), and only if the certificate in service is still
    ``selected_with``, the one it was found due with. Else Skipped, saying which run has it or what
    replaced it; nothing is recorded then. ``alive``: as for ``claim``."""
    other = claim(engine, name, holder, alive=alive)
    if other is not None:
        return Skipped(name, f"run {other} is renewing it")
    try:
        with read_session(engine) as session:
            current = managed.current_certificate(session, managed.get(session, name))
        now_serving = current.fingerprint_sha256 if current is not None else None
        if now_serving != selected_with:
            return Skipped(name, f"renewed by another run meanwhile (now {(now_serving or 'none')[:16]})")
        return renew(steps, name)
    finally:
        release_quietly(engine, name, holder)


def renew_one(engine: sa.Engine, name: str, issuer: Issuer, key_ring: KeyRingSource, actor: audit.Actor,
              clock: Clock = utcnow, *, policy: Policy | None = None) -> Renewal:
    """Renew ``name`` with ``issuer`` (whatever issuer the managed certificate names), every step
    directly, no Prefect. ``policy``: the gate's (None: load_policy from the settings)."""
    return renew(DirectSteps(engine, lambda _: issuer, key_ring, actor, clock, policy), name)


# ------------------------------------------------------------------------------------------ renew-due

@dataclass(frozen=True)
class DueCertificate:
    """A managed certificate due for renewal, and since when (stable: not the time of asking)."""

    name: str
    issuer: str
    reason: str
    due_since: dt.datetime
    current: str | None
    current_not_after: dt.datetime | None
    has_targets: bool


def due_certificates(session: Session, at: dt.datetime, limit: int | None = None,
                     names: Sequence[str] | None = None) -> list[DueCertificate]:
    """The managed certificates due for renewal at ``at``, most overdue first, at most ``limit``;
    only those of ``names`` when given (a renew-batch run: what is still due of the names it was given)."""
    subset = None
    if names is not None:
        subset = []
        for start in range(0, len(names), 500):
            subset += list(session.exec(select(ManagedCertificate).where(
                col(ManagedCertificate.name).in_(list(names[start:start + 500])),
                ManagedCertificate.status == "active")))
    rows = [s for s in managed.schedule(session, at, subset) if s.decision.due]
    deployed = targets.managed_with_targets(session)
    if limit is not None:
        rows = rows[:limit]
    return [DueCertificate(s.managed.name, s.managed.issuer, s.decision.reason, s.decision.renew_at,
                           s.current.fingerprint_sha256 if s.current else None,
                           s.current.not_after if s.current else None, s.managed.id in deployed) for s in rows]


LEFT_BEHIND = "its targets were left behind by an interrupted deployment"  # why renew-due deploys one not due


def left_behind(session: Session, exclude: Collection[str] = ()) -> list[DueCertificate]:
    """The managed certificates (not in ``exclude``) whose current certificate is not proven served on
    targets an interrupted run left behind (certpilot.targets.left_behind), as items for renew-due to
    deploy again (not renew: they are not due), with ``reason`` LEFT_BEHIND."""
    out = []
    for name in targets.left_behind(session):
        if name in exclude:
            continue
        row = managed.get(session, name)
        current = managed.current_certificate(session, row)
        out.append(DueCertificate(name, row.issuer, LEFT_BEHIND, current.not_before if current else row.created_at,
                                  current.fingerprint_sha256 if current else None,
                                  current.not_after if current else None, True))
    return out


FailedAt = Step | Literal["deploy"]


@dataclass(frozen=True)
class CertificateRenewal:
    """One certificate renewed and, when it has targets, deployed (``deployment``; None: not deployed,
    having no targets or not asked to)."""

    renewal: Renewal
    deployment: DeploymentReport | None = None

    def as_dict(self) -> dict[str, Any]:
        return {**self.renewal.as_dict(),
                "deployment": self.deployment.as_dict() if self.deployment is not None else None}


@dataclass(frozen=True)
class RenewalOutcome:
    """How renewing one due certificate ended in renew-due: ``renewal`` when it was renewed (and
    deployed, if it has targets); else the step it failed at (None: unknown, a crashed run), why,
    and the certificate kept in service."""

    name: str
    issuer: str
    why: str  # why it was due
    renewal: Renewal | None = None
    step: FailedAt | None = None
    reason: str | None = None
    kept: str | None = None
    skipped: str | None = None  # why this run left it alone (another run renews it or renewed it: ``Skipped``)

    @classmethod
    def of(cls, due: DueCertificate, renewal: Renewal | Skipped | None, error: BaseException | None) -> RenewalOutcome:
        """The outcome of renewing ``due``: ``renewal`` (or why it was skipped), or the ``error`` it ended with."""
        if isinstance(renewal, Skipped):
            return cls(due.name, due.issuer, due.reason, kept=due.current, skipped=renewal.why)
        if error is None and renewal is not None:
            return cls(due.name, due.issuer, due.reason, renewal=renewal)
        if isinstance(error, RenewalError):
            return cls(due.name, due.issuer, due.reason, step=error.step, reason=error.reason, kept=error.kept)
        reason = redact(error) if error is not None else "ended without a result"
        return cls(due.name, due.issuer, due.reason, step=None, reason=reason, kept=due.current)

    @classmethod
    def not_redeployed(cls, item: DueCertificate, why: str) -> RenewalOutcome:
        """Deploying ``item``'s current certificate again to targets an interrupted run left behind
        (``left_behind``) failed: those targets serve what they served before."""
        return cls(item.name, item.issuer, item.reason, step="deploy", kept=None,
                   reason=f"{item.current and item.current[:16]} not deployed again: {why}")

    def not_deployed(self, why: str) -> RenewalOutcome:
        """This renewal, failed at its deployment: its targets still serve the certificate it replaces."""
        fingerprint = self.renewal.fingerprint_sha256[:16] if self.renewal else "?"
        return dataclasses.replace(self, step="deploy", kept=self.renewal.replaces if self.renewal else self.kept,
                                   reason=f"renewed as {fingerprint} but not deployed: {why}")

    @property
    def ok(self) -> bool:
        return (self.renewal is not None or self.skipped is not None) and self.reason is None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "issuer": self.issuer, "why": self.why, "ok": self.ok}
        if self.ok and self.renewal is not None:
            return {**out, **self.renewal.as_dict()}
        return {**out, "step": str(self.step) if self.step is not None else None, "reason": self.reason,
                "kept": self.kept}


@dataclass(frozen=True)
class RenewDueSummary:
    """What a renew-due run did: how many were due, renewed and failed, and each failure; ``redeployed``:
    how many certificates not due had their current certificate deployed again to targets an
    interrupted run had left behind (certpilot.targets.left_behind; a failure to do so is a failure)."""

    due: int
    renewed: int
    failed: int
    failures: tuple[RenewalOutcome, ...]
    redeployed: int = 0
    skipped: int = 0  # left to another run that was renewing them, or had renewed them

    @classmethod
    def of(cls, outcomes: Sequence[RenewalOutcome],
           redeploys: Sequence[RenewalOutcome | None] = ()) -> RenewDueSummary:
        """``redeploys``: for each certificate deployed again, None when that worked, else its failure."""
        failed = tuple(o for o in outcomes if not o.ok) + tuple(o for o in redeploys if o is not None)
        renewed = sum(1 for o in outcomes if o.ok and o.renewal is not None)
        skipped = sum(1 for o in outcomes if o.ok and o.skipped is not None)
        return cls(len(outcomes), renewed, len(failed), failed, sum(1 for o in redeploys if o is None), skipped)

    def as_dict(self) -> dict[str, Any]:
        return {"due": self.due, "renewed": self.renewed, "failed": self.failed, "redeployed": self.redeployed,
                "skipped": self.skipped,
                "failures": [{"name": f.name, "issuer": f.issuer, "step": str(f.step) if f.step else None,
                              "reason": f.reason, "kept": f.kept} for f in self.failures]}


class RenewDueFailed(PermanentError):
    """Some due renewals failed (after all that could be done was done); ``summary`` says which, at
    which step and why. The certificates in service were kept."""

    def __init__(self, summary: RenewDueSummary) -> None:
        self.summary = summary
        shown = "; ".join(f"{o.name} at {o.step or '?'} ({o.issuer}): {o.reason}" for o in summary.failures[:10])
        more = f"; and {summary.failed - 10} more" if summary.failed > 10 else ""
        attempted = summary.renewed + summary.redeployed + summary.failed  # the due ones, and those deployed again
        super().__init__(f"{summary.failed} of {attempted} renewal(s) failed, the certificates in service were "
                         f"kept ({summary.renewed} renewed): {shown}{more}")

    def __reduce__(self) -> tuple[Any, ...]:  # pickled into Prefect's result storage
        return (type(self), (self.summary,))


def recorded_outcomes(session: Session, due: Sequence[DueCertificate], since: dt.datetime) -> list[RenewalOutcome]:
    """How renewing each of ``due`` ended, as the inventory recorded it: renew-due reads this after its
    renew-batch runs (on any worker, any machine) are over, since their results stay where they ran.

    Renewed: its current certificate is no longer the one it was due with (the new one, with the key
    it carries); not deployed, if a target of it does not serve that one as last verified. Failed: a
    renewal failure recorded since ``since`` (its step and reason, as ``record_failure`` stored them).
    Neither: an outcome with no step whose reason says nothing was recorded (its batch run's end tells why)."""
    rows = {}
    names = [d.name for d in due]
    for start in range(0, len(names), 500):
        rows.update({r.name: r for r in session.exec(select(ManagedCertificate).where(
            col(ManagedCertificate.name).in_(names[start:start + 500])))})
    out = []
    for item in due:
        row = rows.get(item.name)
        current = managed.current_certificate(session, row) if row is not None else None
        if row is not None and current is not None and current.fingerprint_sha256 != item.current:
            key = session.exec(select(PrivateKey.id).where(PrivateKey.spki_sha256 == current.spki_sha256)
                               .limit(1)).first()
            renewal = Renewal(item.name, row.issuer, current.fingerprint_sha256, current.serial_hex, current.not_after,
                              current.replaces_fingerprint, str(KeyRef(key)) if key else "?")
            outcome = RenewalOutcome(item.name, item.issuer, item.reason, renewal=renewal)
            unverified = [t.name for t in session.exec(select(Target).where(Target.managed_certificate_id == row.id))
                          if t.verified_fingerprint != current.fingerprint_sha256]
            if item.has_targets and unverified:
                outcome = outcome.not_deployed(f"target(s) {', '.join(sorted(unverified))} not verified serving it")
            out.append(outcome)
        elif row is not None and row.last_error and row.last_attempt_at is not None and row.last_attempt_at >= since:
            step, _, reason = row.last_error.partition(": ")
            out.append(RenewalOutcome(item.name, item.issuer, item.reason, reason=reason or row.last_error,
                                      step=Step(step) if step in Step.__members__.values() else None,
                                      kept=current.fingerprint_sha256 if current else None))
        else:
            out.append(RenewalOutcome(item.name, item.issuer, item.reason, kept=item.current,
                                      reason="no renewal and no failure was recorded for it"))
    return out
