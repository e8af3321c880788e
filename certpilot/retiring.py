"""Retiring a managed certificate: the last step of its lifecycle, undoable until the operator confirms it.

Retiring takes two steps. The first (``retire``) marks the managed certificate ``retiring`` (it is no
longer renewed, deployed or monitored as expected: certpilot.managed.in_service, schedule) and takes the
certificate off every target with Deployer.remove, which keeps what it took (backup files, a
soft-deleted vault certificate, a stored certificate taken off a listener) and says where in a Removal.
Each removal is an audit event ``target.removed`` on the target, so the inventory itself records the
state: ``restore`` puts every target back (Deployer.restore, then verify: the certificate proven served
again) and makes the managed certificate ``active`` again. The second step (``confirm``) purges what the
removals kept (Deployer.purge), then, when asked, revokes its certificates that are still valid and
crypto-shreds every key of it (certpilot.keystore.shred), and marks it ``retired``. Revocation and key
destruction wait for the confirmation because they cannot be undone; ``retire(..., confirm=True)`` does
both steps in one go.

One bad target never stops the others: every target's outcome is reported, the managed certificate
stays ``retiring`` while any target is not done, and running the same step again takes up only what is
left (a step is idempotent per target). Once a confirmation has started (audit event
``managed.retirement_confirmed``) nothing can be restored.

What a target looks like after removal is the deployer's to say (the Removal's ``note`` and ``served``):
an nginx site whose files were moved aside keeps serving the certificate from memory, and its
configuration names files that are gone, until the site is taken out of it (connectors/ssh_deploy.py).

How each per-target step runs is the caller's seam (``RunSteps``): Prefect task runs in the retire flow,
threads in the CLI. Revoking is a seam too (``Revoke``): it needs the issuer's connector. No Prefect and
no network here.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from cryptography import x509
from sqlmodel import Session, col, select

from certpilot import audit, keystore, managed, targets
from certpilot.ca import REASONS, reason_name
from certpilot.clock import utcnow
from certpilot.database import read_session, write_session
from certpilot.deployment import Deployer, Removal
from certpilot.errors import CertpilotError, PermanentError, TransientError, redact
from certpilot.models import AuditEvent, Certificate, ManagedCertificate, PrivateKey, Target

__all__ = ["ACTIVE", "RETIRED", "RETIRING", "KeyOutcome", "Retirement", "RetirementFailed", "RetirementReport",
           "Revoke", "Revoked", "RunSteps", "Step", "StepFailed", "TargetOutcome", "TargetState", "TargetStep",
           "apply", "begin", "confirm", "remove_target", "restore", "retire", "state"]

ACTIVE, RETIRING, RETIRED = "active", "retiring", "retired"

_log = logging.getLogger(__name__)
Log = logging.Logger | logging.LoggerAdapter[Any]


class Step(StrEnum):
    """What is done to one target."""

    REMOVE = "remove"  # take the certificate off, keeping it restorable
    RESTORE = "restore"  # put back what remove kept, and prove it served
    PURGE = "purge"  # destroy what remove kept


@dataclass(frozen=True)
class TargetStep:
    """Do ``step`` to target ``target`` of managed certificate ``name`` (``removal``: for restore and purge)."""

    name: str
    target: str
    kind: str
    step: Step
    removal: Removal | None = None


@dataclass(frozen=True)
class TargetOutcome:
    """How one target's step ended. ``fingerprint``: the certificate removed, restored or purged."""

    target: str
    kind: str
    step: Step
    ok: bool
    fingerprint: str | None
    detail: str
    removal: Removal | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"target": self.target, "kind": self.kind, "step": str(self.step), "ok": self.ok,
                "fingerprint": self.fingerprint, "detail": self.detail,
                "removal": self.removal.as_dict() if self.removal else None}


class StepFailed(CertpilotError):
    """One target's step failed; ``outcome`` says how (the other targets go on)."""

    def __init__(self, outcome: TargetOutcome) -> None:
        self.outcome = outcome
        super().__init__(f"{outcome.target}: {outcome.step} failed: {outcome.detail}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.outcome,))


class TransientStepFailed(StepFailed, TransientError):
    """As StepFailed, for a reason that may pass (a host that did not answer): worth a retry."""


RunSteps = Callable[[Sequence[TargetStep]], Sequence["TargetOutcome | BaseException"]]
"""Runs a batch of target steps at once; returns, in order, each one's outcome or the error it ended with."""


@dataclass(frozen=True)
class Revoked:
    """One certificate's revocation during a confirmation: done, found done already, or failed (``ok``)."""

    fingerprint: str
    ok: bool
    reason: str
    already: bool = False
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "ok": self.ok, "reason": self.reason, "already": self.already,
                "detail": self.detail}


Revoke = Callable[[str, x509.ReasonFlags], Revoked]
"""Revokes the certificate with this fingerprint with its issuer, for this reason; raises when it cannot."""


@dataclass(frozen=True)
class KeyOutcome:
    """One key of the managed certificate at a confirmation: destroyed (crypto-shredded) or kept, and why."""

    key: str  # key:<id>
    destroyed: bool
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {"key": self.key, "destroyed": self.destroyed, "detail": self.detail}


# ------------------------------------------------------------------------------------------- state

@dataclass(frozen=True)
class TargetState:
    """A target during a retirement: its latest removal (None: not removed), whether that was put back or
    purged since."""

    target: str
    kind: str
    removal: Removal | None
    restored: bool
    purged: bool

    @property
    def removed(self) -> bool:
        """Taken off and not put back."""
        return self.removal is not None and not self.restored


@dataclass(frozen=True)
class Retirement:
    """A managed certificate's retirement as the inventory records it."""

    name: str
    status: str
    started_seq: int | None  # the managed.retiring event that began it (None: not begun)
    confirmed: bool
    revoke: str | None  # the revocation reason asked for (CLI name), if any
    destroy_key: bool
    targets: tuple[TargetState, ...]


def _events(session: Session, objects: Sequence[str], actions: Sequence[str], after: int) -> list[AuditEvent]:
    return list(session.exec(select(AuditEvent).where(col(AuditEvent.object).in_(list(objects)),
                                                      col(AuditEvent.action).in_(list(actions)),
                                                      col(AuditEvent.seq) > after)
                             .order_by(col(AuditEvent.seq))).all())


def state(session: Session, name: str) -> Retirement:
    """The retirement of managed certificate ``name`` (NotFoundError when there is no such one)."""
    row = managed.get(session, name)
    rows = list(session.exec(select(Target).where(Target.managed_certificate_id == row.id).order_by(col(Target.name))))
    if row.status == ACTIVE:
        return Retirement(name, row.status, None, False, None, False,
                          tuple(TargetState(t.name, t.kind, None, False, False) for t in rows))
    started = session.exec(select(AuditEvent.seq).where(AuditEvent.object == f"managed:{name}",
                                                        AuditEvent.action == "managed.retiring")
                           .order_by(col(AuditEvent.seq).desc()).limit(1)).first() or 0
    revoke: str | None = None
    destroy_key, confirmed = False, False
    for event in _events(session, [f"managed:{name}"], ["managed.retiring", "managed.retirement_options",
                                                        "managed.retirement_confirmed"], started - 1):
        details = json.loads(event.details)
        revoke = details.get("revoke") or revoke
        destroy_key = destroy_key or bool(details.get("destroy_key"))
        confirmed = confirmed or event.action == "managed.retirement_confirmed"
    found: dict[str, TargetState] = {t.name: TargetState(t.name, t.kind, None, False, False) for t in rows}
    objects = {f"target:{name}/{t.name}": t.name for t in rows}
    for event in _events(session, list(objects), ["target.removed", "target.restored", "target.purged"], started):
        held = found[objects[event.object]]
        if event.action == "target.removed":
            removal = Removal.from_dict(json.loads(event.details)["removal"])
            found[held.target] = dataclasses.replace(held, removal=removal, restored=False, purged=False)
        elif event.action == "target.restored" and held.removal is not None:
            found[held.target] = dataclasses.replace(held, restored=True)
        elif event.action == "target.purged" and held.removal is not None:
            found[held.target] = dataclasses.replace(held, purged=True)
    return Retirement(name, row.status, started or None, confirmed, revoke, destroy_key, tuple(found.values()))


def begin(session: Session, name: str, actor: audit.Actor, *, revoke: str | None = None,
          destroy_key: bool = False, now: dt.datetime | None = None) -> Retirement:
    """Mark ``name`` as being retired (recording what the confirmation is to do: revoke, destroy the keys);
    on one being retired already, record options added. PermanentError for a retired one."""
    if revoke is not None and revoke not in REASONS:
        raise PermanentError(f"unknown revocation reason {revoke!r}; choose one of {', '.join(REASONS)}")
    row = managed.get(session, name)
    if row.status == RETIRED:
        raise PermanentError(f"managed certificate {name} is retired already")
    now = now or utcnow()
    if row.status == ACTIVE:
        session.execute(sa.update(ManagedCertificate).where(col(ManagedCertificate.id) == row.id)
                        .values(status=RETIRING))
        audit.append(session, actor, [audit.Change("managed.retiring", f"managed:{name}", {
            "revoke": revoke, "destroy_key": destroy_key,
            "targets": [t.name for t in targets.list_targets(session, name)]})], now)
    elif revoke or destroy_key:
        held = state(session, name)
        if (revoke and revoke != held.revoke) or (destroy_key and not held.destroy_key):
            audit.append(session, actor, [audit.Change("managed.retirement_options", f"managed:{name}", {
                "revoke": revoke, "destroy_key": destroy_key})], now)
    session.flush()
    return state(session, name)


# ------------------------------------------------------------------------------- one target's steps

def _fail(target: Target, step: Step, exc: BaseException, removal: Removal | None = None) -> StepFailed:
    outcome = TargetOutcome(target.name, target.kind, step, False, removal.fingerprint if removal else None,
                            redact(exc), removal)
    return (TransientStepFailed if isinstance(exc, TransientError) else StepFailed)(outcome)


def apply(engine: sa.Engine, target: Target, deployer: Deployer, step: TargetStep, actor: audit.Actor) -> TargetOutcome:
    """Do ``step`` to ``target`` through its deployer and record it. Raises StepFailed with the outcome."""
    if step.step is Step.REMOVE:
        return _remove(engine, target, deployer, actor)
    if step.removal is None:
        raise PermanentError(f"{target.name}: a {step.step} step needs the target's removal")
    if step.step is Step.RESTORE:
        return _restore(engine, target, deployer, step.removal, actor)
    return _purge(engine, target, deployer, step.removal, actor)


def _remove(engine: sa.Engine, target: Target, deployer: Deployer, actor: audit.Actor) -> TargetOutcome:
    try:
        removal = deployer.remove()
    except Exception as exc:
        failed = _fail(target, Step.REMOVE, exc)
        with write_session(engine) as session:
            targets.record_failed(session, target, f"remove: {failed.outcome.detail}", actor)
        raise failed from None
    if removal.fingerprint is None and target.verified_fingerprint:  # taken off by an earlier, unrecorded attempt
        removal = dataclasses.replace(removal, fingerprint=target.verified_fingerprint)
    with write_session(engine) as session:
        targets.record_removed(session, target, removal, actor)
    detail = "removed" + (f" {removal.fingerprint[:16]}" if removal.fingerprint else " (it held no certificate)")
    return TargetOutcome(target.name, target.kind, Step.REMOVE, True, removal.fingerprint,
                         f"{detail}; {removal.note}" if removal.note else detail, removal)


def _restore(engine: sa.Engine, target: Target, deployer: Deployer, removal: Removal,
             actor: audit.Actor) -> TargetOutcome:
    try:
        done = deployer.restore(removal)
        proof = deployer.verify(removal.fingerprint) if removal.fingerprint else None
    except Exception as exc:
        failed = _fail(target, Step.RESTORE, exc, removal)
        with write_session(engine) as session:
            targets.record_failed(session, target, f"restore: {failed.outcome.detail}", actor)
        raise failed from None
    with write_session(engine) as session:
        targets.record_restored(session, target, removal.fingerprint, proof.method if proof else None, actor)
    detail = f"{done}; served again ({proof.detail})" if proof else done
    return TargetOutcome(target.name, target.kind, Step.RESTORE, True, removal.fingerprint, detail, removal)


def _purge(engine: sa.Engine, target: Target, deployer: Deployer, removal: Removal,
           actor: audit.Actor) -> TargetOutcome:
    try:
        deployer.purge(removal)
    except Exception as exc:
        failed = _fail(target, Step.PURGE, exc, removal)
        with write_session(engine) as session:
            targets.record_failed(session, target, f"purge: {failed.outcome.detail}", actor)
        raise failed from None
    with write_session(engine) as session:
        targets.record_purged(session, target, removal, actor)
    return TargetOutcome(target.name, target.kind, Step.PURGE, True, removal.fingerprint,
                         "what the removal kept is destroyed", removal)


def remove_target(engine: sa.Engine, name: str, target_name: str, deployer: Deployer | None,
                  actor: audit.Actor) -> TargetOutcome:
    """Take one target away for good (``certpilot target remove``): remove the certificate from it and
    purge what was kept (unless ``deployer`` is None: files and stores are left as they are), then delete
    its record, audited. Raises StepFailed, the record kept, when the target cannot be cleared."""
    with read_session(engine) as session:
        target = targets.get_target(session, name, target_name)
    removal: Removal | None = None
    detail = "its files and stores were left as they are"
    if deployer is not None:
        removed = _remove(engine, target, deployer, actor)
        removal = removed.removal
        assert removal is not None
        _purge(engine, target, deployer, removal, actor)
        detail = removed.detail
    with write_session(engine) as session:
        targets.delete(session, name, target_name, actor,
                       {"removal": removal.as_dict() if removal else None, "kept_files": deployer is None})
    return TargetOutcome(target.name, target.kind, Step.PURGE if removal else Step.REMOVE, True,
                         removal.fingerprint if removal else target.verified_fingerprint, detail, removal)


# ----------------------------------------------------------------------------------- the whole run

@dataclass(frozen=True)
class RetirementReport:
    """What one retire, confirm or restore run did, target by target, and where it leaves the managed
    certificate (``status``). ``failed``: some target, revocation or key did not end as it should."""

    name: str
    action: str  # retire, confirm, restore
    status: str
    targets: tuple[TargetOutcome, ...] = ()
    revocations: tuple[Revoked, ...] = ()
    keys: tuple[KeyOutcome, ...] = ()
    problems: tuple[str, ...] = ()  # failures that are not a target's, a revocation's or a key's

    @property
    def failed(self) -> bool:
        return bool(self.problems) or any(not o.ok for o in self.targets) or any(not r.ok for r in self.revocations)

    def next_step(self) -> str:
        if self.status == RETIRING and self.action == "retire":
            return (f"restorable until confirmed: `certpilot managed retire {self.name} --confirm` purges what was "
                    f"kept (and revokes and destroys keys if asked), `certpilot managed restore {self.name}` puts "
                    "every target back")
        if self.status == RETIRING:
            return f"not finished: run the same command again to take up what is left ({self.action})"
        if self.status == RETIRED:
            return f"{self.name} is retired"
        return f"{self.name} is active again"

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "action": self.action, "status": self.status, "failed": self.failed,
                "targets": [o.as_dict() for o in self.targets], "revocations": [r.as_dict() for r in self.revocations],
                "keys": [k.as_dict() for k in self.keys], "problems": list(self.problems),
                "next": self.next_step()}

    def lines(self) -> list[str]:
        out = [f"{o.target} ({o.kind}): {o.step} {'done' if o.ok else 'FAILED'}: {o.detail}" for o in self.targets]
        out += [f"certificate {r.fingerprint[:16]}: " + (f"revoked ({r.reason})" if r.ok and not r.already else
                                                          f"revoked already ({r.reason})" if r.ok else
                                                          f"NOT REVOKED: {r.detail}") for r in self.revocations]
        out += [f"{k.key}: {'destroyed' if k.destroyed else 'kept'}: {k.detail}" for k in self.keys]
        out += [f"FAILED: {p}" for p in self.problems]
        out.append(f"{self.name}: {self.status}; {self.next_step()}")
        return out


class RetirementFailed(PermanentError):
    """A retire, confirm or restore run did not finish everywhere: ``report`` says what happened where."""

    def __init__(self, report: RetirementReport) -> None:
        self.report = report
        bad = [f"{o.target}: {o.step}: {o.detail}" for o in report.targets if not o.ok]
        bad += [f"revoking {r.fingerprint[:16]}: {r.detail}" for r in report.revocations if not r.ok]
        bad += list(report.problems)
        super().__init__(f"{report.action} of {report.name} did not finish ({report.name} is {report.status}): "
                         + "; ".join(bad))

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.report,))


def _settled(step: TargetStep, result: TargetOutcome | BaseException) -> TargetOutcome:
    if isinstance(result, TargetOutcome):
        return result
    if isinstance(result, StepFailed):
        return result.outcome
    return TargetOutcome(step.target, step.kind, step.step, False,
                         step.removal.fingerprint if step.removal else None, redact(result), step.removal)


def _run(steps: Sequence[TargetStep], run_steps: RunSteps, log: Log) -> list[TargetOutcome]:
    outcomes = [_settled(s, r) for s, r in zip(steps, run_steps(steps) if steps else [], strict=True)]
    for o in outcomes:
        (log.info if o.ok else log.error)("%s (%s): %s %s: %s", o.target, o.kind, o.step,
                                          "done" if o.ok else "FAILED", o.detail)
    return outcomes


def retire(engine: sa.Engine, name: str, run_steps: RunSteps, actor: audit.Actor, *, revoke: str | None = None,
           destroy_key: bool = False, confirm_now: bool = False, revoker: Revoke | None = None,
           log: Log = _log) -> RetirementReport:
    """The first step: mark ``name`` retiring and take it off every target not yet taken off (restorable).
    With ``confirm_now`` the second step follows at once (see ``confirm``)."""
    with write_session(engine) as session:
        held = begin(session, name, actor, revoke=revoke, destroy_key=destroy_key)
    if held.confirmed:
        if not confirm_now:
            raise PermanentError(f"the retirement of {name} was confirmed already: finish it with "
                                 f"`certpilot managed retire {name} --confirm`")
        return confirm(engine, name, run_steps, actor, revoker=revoker, log=log)
    steps = [TargetStep(name, t.target, t.kind, Step.REMOVE) for t in held.targets if not t.removed]
    outcomes = _run(steps, run_steps, log)
    if confirm_now:
        report = confirm(engine, name, run_steps, actor, revoker=revoker, log=log)
        return dataclasses.replace(report, targets=(*outcomes, *report.targets))
    if not held.targets:
        log.warning("managed certificate %s has no targets: nothing to take off", name)
    return RetirementReport(name, "retire", RETIRING, tuple(outcomes))


def confirm(engine: sa.Engine, name: str, run_steps: RunSteps, actor: audit.Actor, *, revoker: Revoke | None = None,
            log: Log = _log) -> RetirementReport:
    """The second step, not undoable: purge what every removal kept; then revoke the managed certificate's
    certificates that are still valid (when a reason was asked for), crypto-shred its keys (when asked),
    and mark it retired once every target is purged and every revocation done. A target not yet taken off
    is taken off and purged at once."""
    with read_session(engine) as session:
        held = state(session, name)
    if held.status == ACTIVE:
        raise PermanentError(f"managed certificate {name} is not being retired: `certpilot managed retire {name}` "
                             "first (or with --confirm, both steps at once)")
    if held.status == RETIRED:
        raise PermanentError(f"managed certificate {name} is retired already")
    if not held.confirmed:
        with write_session(engine) as session:
            audit.append(session, actor, [audit.Change("managed.retirement_confirmed", f"managed:{name}", {
                "revoke": held.revoke, "destroy_key": held.destroy_key})])
    outcomes = _run([TargetStep(name, t.target, t.kind, Step.REMOVE) for t in held.targets if not t.removed],
                    run_steps, log)
    with read_session(engine) as session:
        held = state(session, name)
    outcomes += _run([TargetStep(name, t.target, t.kind, Step.PURGE, t.removal) for t in held.targets
                      if t.removed and not t.purged], run_steps, log)
    revocations = _revoke_all(engine, name, held.revoke, revoker, log) if held.revoke else []
    problems: list[str] = []
    if held.revoke and revoker is None:
        problems.append(f"revocation ({held.revoke}) was asked for, but no issuer was given to revoke with")
    keys = _shred_keys(engine, name, actor, log) if held.destroy_key else []
    with read_session(engine) as session:
        pending = [t.target for t in state(session, name).targets if not (t.removed and t.purged)]
    problems += [f"{t}: not purged" for t in pending if t not in {o.target for o in outcomes if not o.ok}]
    status = RETIRING
    if not pending and not problems and all(r.ok for r in revocations):
        status = RETIRED
        with write_session(engine) as session:
            session.execute(sa.update(ManagedCertificate).where(col(ManagedCertificate.name) == name)
                            .values(status=RETIRED))
            audit.append(session, actor, [audit.Change("managed.retired", f"managed:{name}", {
                "revoked": [r.fingerprint for r in revocations if r.ok],
                "keys_destroyed": [k.key for k in keys if k.destroyed]})])
        log.info("%s is retired", name)
    return RetirementReport(name, "confirm", status, tuple(outcomes), tuple(revocations), tuple(keys),
                            tuple(problems))


def restore(engine: sa.Engine, name: str, run_steps: RunSteps, actor: audit.Actor, log: Log = _log) -> RetirementReport:
    """Undo the first step: put back what every removal kept, prove it served, and make ``name`` active
    again (once every target is back). PermanentError once the retirement was confirmed."""
    with read_session(engine) as session:
        held = state(session, name)
    if held.status != RETIRING:
        raise PermanentError(f"managed certificate {name} is {held.status}, not being retired: nothing to restore")
    if held.confirmed:
        raise PermanentError(f"the retirement of {name} was confirmed: what the targets held was purged and cannot "
                             f"be restored (finish it with `certpilot managed retire {name} --confirm`)")
    outcomes = _run([TargetStep(name, t.target, t.kind, Step.RESTORE, t.removal) for t in held.targets if t.removed],
                    run_steps, log)
    status = RETIRING
    if all(o.ok for o in outcomes):
        status = ACTIVE
        with write_session(engine) as session:
            session.execute(sa.update(ManagedCertificate).where(col(ManagedCertificate.name) == name)
                            .values(status=ACTIVE))
            audit.append(session, actor, [audit.Change("managed.restored", f"managed:{name}", {
                "targets": [o.target for o in outcomes]})])
        log.info("%s is active again", name)
    return RetirementReport(name, "restore", status, tuple(outcomes))


# ------------------------------------------------------------------------------ revocation and keys

def _revoke_all(engine: sa.Engine, name: str, reason: str, revoker: Revoke | None, log: Log) -> list[Revoked]:
    """Revoke every certificate of ``name`` still valid and not revoked (each on its own: one that fails
    does not stop the others)."""
    if revoker is None:
        return []
    flag = REASONS[reason]
    with read_session(engine) as session:
        row = managed.get(session, name)
        fingerprints = list(session.exec(select(Certificate.fingerprint_sha256).where(
            Certificate.managed_certificate_id == row.id, col(Certificate.status) != "revoked",
            col(Certificate.not_after) > utcnow()).order_by(col(Certificate.not_before))))
    done = []
    for fingerprint in fingerprints:
        try:
            done.append(revoker(fingerprint, flag))
        except Exception as exc:  # noqa: BLE001 - reported; the others are revoked all the same
            done.append(Revoked(fingerprint, False, reason_name(flag) or reason, False, redact(exc)))
        r = done[-1]
        (log.info if r.ok else log.error)("certificate %s: %s", fingerprint[:16],
                                          "revoked" if r.ok else f"NOT REVOKED: {r.detail}")
    return done


def keys_of(session: Session, name: str) -> list[tuple[str, str]]:
    """(key id, SPKI SHA-256) of every live key of a certificate managed certificate ``name`` has had, and
    of the pending key of its renewal journal (certpilot.renewing: made for a renewal not finished)."""
    row = managed.get(session, name)
    spkis = sa.select(col(Certificate.spki_sha256)).where(col(Certificate.managed_certificate_id) == row.id)
    return [(key_id, spki) for key_id, spki in session.execute(
        sa.select(col(PrivateKey.id), col(PrivateKey.spki_sha256))
        .where(sa.or_(col(PrivateKey.spki_sha256).in_(spkis), col(PrivateKey.id) == row.pending_key_id),
               col(PrivateKey.destroyed_at).is_(None))
        .order_by(col(PrivateKey.created_at)))]


def _shred_keys(engine: sa.Engine, name: str, actor: audit.Actor, log: Log) -> list[KeyOutcome]:
    """Crypto-shred every key of ``name``, except one a certificate of another managed certificate that is
    not retired also uses."""
    with read_session(engine) as session:
        found = keys_of(session, name)
        shared: dict[str, list[str]] = {}
        for spki, other in session.execute(
                sa.select(col(Certificate.spki_sha256), col(ManagedCertificate.name))
                .join(ManagedCertificate, col(ManagedCertificate.id) == col(Certificate.managed_certificate_id))
                .where(col(Certificate.spki_sha256).in_([s for _, s in found]), col(ManagedCertificate.name) != name,
                       col(ManagedCertificate.status) != RETIRED)).all():
            shared.setdefault(spki, []).append(other)
    outcomes = []
    for key_id, spki in found:
        ref = keystore.KeyRef(key_id)
        if spki in shared:
            outcomes.append(KeyOutcome(str(ref), False, "also the key of managed certificate(s) "
                                                        + ", ".join(sorted(set(shared[spki])))))
            continue
        keystore.shred(engine, ref, actor)
        outcomes.append(KeyOutcome(str(ref), True, "crypto-shredded: ciphertext and data key erased"))
        log.info("%s: %s", ref, outcomes[-1].detail)
    return outcomes
