"""Bringing a fleet of targets to serve one certificate, and putting them back: the steps a deploy
run takes per target, over the Deployer role and the target records, and the order it takes them in
(canary, waves, rollback), without Prefect.

``bring_to`` reconciles before it deploys: a target already holding the certificate (a previous run
was killed after deploying it, say) is only verified, and deployed again if that fails. A target that
fails verification after a deploy is rolled back at once, so a failed target never stays changed.

``deploy_everywhere`` runs a plan: the canary first, alone; then the other targets in waves of
``concurrency``. If any target fails, no further wave starts, every target the run changed is rolled
back and proven to serve the previous certificate again, and the report names the targets that
failed (the culprits) apart from the ones rolled back because of them. How one batch of per-target
steps runs is the caller's seam (``RunSteps``): Prefect task runs in the deploy-certificate flow, a
thread pool in the CLI.

Plans, outcomes and reports are frozen records of public facts only: they are task and flow results.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session

from certpilot import audit, targets
from certpilot.database import write_session
from certpilot.deployment import DeployBundle, Deployer, Receipt, VerificationError
from certpilot.errors import CertpilotError, PermanentError, TransientError, redact
from certpilot.models import Target

MAX_CONCURRENCY = 16  # the most targets deployed at once, whatever a run asks for

_log = logging.getLogger(__name__)
Log = logging.Logger | logging.LoggerAdapter[Any]  # a logger, or Prefect's run logger


class Action(StrEnum):
    """What a deploy run did to one target, and so what the target serves now."""

    DEPLOYED = "deployed"  # changed and proven serving the certificate
    ALREADY_SERVED = "already-served"  # held and served it already: only verified
    FAILED = "failed"  # not changed (or put back by its own step): serves what it served before
    ROLLED_BACK = "rolled-back"  # changed, then put back to its previous certificate
    ROLLBACK_FAILED = "rollback-failed"  # changed, and could not be put back: see the detail

    @property
    def ok(self) -> bool:
        return self in (Action.DEPLOYED, Action.ALREADY_SERVED)


@dataclass(frozen=True)
class Outcome:
    """One target's end in a deploy run."""

    target: str
    kind: str
    action: Action
    fingerprint: str | None  # what the target serves now, as far as certpilot knows
    detail: str = ""
    receipt: Receipt | None = None  # set when this run changed the target (and has not put it back)

    def as_dict(self) -> dict[str, Any]:
        return {"target": self.target, "kind": self.kind, "action": str(self.action), "fingerprint": self.fingerprint,
                "detail": self.detail, "receipt": self.receipt.as_dict() if self.receipt else None}


class TargetFailed(CertpilotError):
    """One target could not be brought to the certificate; it was left as it was (or put back)."""

    def __init__(self, outcome: Outcome, transient: bool = False) -> None:
        self.outcome, self.transient = outcome, transient
        super().__init__(f"{outcome.target}: {outcome.action}: {outcome.detail}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.outcome, self.transient))


class TransientTargetFailed(TargetFailed, TransientError):
    """As TargetFailed, for a reason that may pass (nothing was changed): worth a retry."""


def _record(engine: sa.Engine, target: Target, fn: Callable[..., None], *args: Any) -> None:
    with write_session(engine) as session:
        fn(session, target, *args)


def bring_to(engine: sa.Engine, target: Target, deployer: Deployer, bundle: Callable[[], DeployBundle],
             fingerprint: str, actor: audit.Actor) -> Outcome:
    """Make ``target`` serve ``fingerprint`` and prove it. Raises TargetFailed (the target as it was
    before, or rolled back) with the outcome."""
    _record(engine, target, targets.set_desired, fingerprint, actor)
    try:
        held = deployer.current()
    except Exception:  # unknown: deploy anyway
        held = None
    if held == fingerprint:
        try:
            proof = deployer.verify(fingerprint)
        except VerificationError:
            pass  # holds it but does not serve it (a run killed before the reload): deploy again
        else:
            _record(engine, target, targets.record_verified, fingerprint, proof.method, actor)
            return Outcome(target.name, target.kind, Action.ALREADY_SERVED, fingerprint, proof.detail)
    try:
        receipt = deployer.deploy(bundle())
    except Exception as exc:
        reason = redact(exc)
        _record(engine, target, targets.record_failed, f"deploy: {reason}", actor)
        outcome = Outcome(target.name, target.kind, Action.FAILED, held, f"deploy: {reason}")
        raise (TransientTargetFailed if isinstance(exc, TransientError) else TargetFailed)(outcome) from None
    _record(engine, target, targets.record_deployed, fingerprint, actor)
    try:
        proof = deployer.verify(fingerprint)
    except Exception as exc:
        reason = f"verify: {redact(exc)}"
        _record(engine, target, targets.record_failed, reason, actor)
        back = roll_back(engine, target, deployer, receipt, actor)
        raise TargetFailed(Outcome(target.name, target.kind, back.action, back.fingerprint,
                                   f"{reason}; {back.detail}")) from None
    _record(engine, target, targets.record_verified, fingerprint, proof.method, actor)
    return Outcome(target.name, target.kind, Action.DEPLOYED, fingerprint, proof.detail, receipt)


def roll_back(engine: sa.Engine, target: Target, deployer: Deployer, receipt: Receipt,
              actor: audit.Actor) -> Outcome:
    """Undo ``receipt`` and prove the previous certificate is served again (when there was one)."""
    previous = receipt.previous_fingerprint
    try:
        deployer.rollback(receipt)
    except Exception as exc:
        reason = f"rollback failed: {redact(exc)}"
        _record(engine, target, targets.record_failed, reason, actor)
        return Outcome(target.name, target.kind, Action.ROLLBACK_FAILED, None, reason)
    verified = False
    detail = "rolled back"
    if previous:
        try:
            proof = deployer.verify(previous)
            verified, detail = True, f"rolled back; previous certificate served again ({proof.detail})"
        except Exception as exc:
            detail = f"rolled back, but the previous certificate is not proven served: {redact(exc)}"
    _record(engine, target, targets.record_rolled_back, previous, verified, actor)
    return Outcome(target.name, target.kind, Action.ROLLED_BACK, previous if verified else None, detail)


# ------------------------------------------------------------------------------------ a deploy run

@dataclass(frozen=True)
class PlannedTarget:
    """A target of a deploy run as it stood when the run was planned."""

    name: str
    kind: str
    desired: str | None  # the fingerprint it should serve
    verified: str | None  # the fingerprint last proven served there


@dataclass(frozen=True)
class DeploymentPlan:
    """What a deploy run of managed certificate ``name`` will do: serve ``fingerprint`` on ``targets``
    (ordered by name)."""

    name: str
    fingerprint: str
    targets: tuple[PlannedTarget, ...] = ()


def plan(session: Session, name: str, fingerprint: str | None = None) -> DeploymentPlan:
    """Deploy ``fingerprint``, or managed certificate ``name``'s current certificate, to all its targets.
    Raises NotFoundError for a name, or a certificate of it, that does not exist."""
    found = targets.plan(session, name, fingerprint)
    return DeploymentPlan(found.name, found.fingerprint, tuple(
        PlannedTarget(t["name"], t["kind"], t.get("desired"), t.get("verified")) for t in found.targets))


@dataclass(frozen=True)
class DeployStep:
    """Bring target ``target`` of managed certificate ``name`` to serve ``fingerprint``."""

    name: str
    target: str
    kind: str
    fingerprint: str


@dataclass(frozen=True)
class RollbackStep:
    """Undo what ``receipt`` says this run changed on target ``target`` of ``name``."""

    name: str
    target: str
    kind: str
    receipt: Receipt


Step = DeployStep | RollbackStep
RunSteps = Callable[[Sequence[Step]], Sequence[Outcome | BaseException]]
"""Runs a batch of steps at once and returns, in order, each one's Outcome or the error it ended with
(a TargetFailed carries its outcome). It never raises for a step."""


@dataclass(frozen=True)
class DeploymentReport:
    """A deploy run's outcome per target, in the order the targets were attempted, and what it means.

    ``culprits`` are the targets whose failure stopped the run; the others that are not ok were
    rolled back because of them. ``not_attempted`` are the targets of waves that never started."""

    name: str
    fingerprint: str
    outcomes: tuple[Outcome, ...] = ()
    not_attempted: tuple[str, ...] = ()
    culprits: tuple[str, ...] = ()

    @property
    def failed(self) -> bool:
        return any(not o.action.ok for o in self.outcomes)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "fingerprint": self.fingerprint, "failed": self.failed,
                "outcomes": [o.as_dict() for o in self.outcomes], "not_attempted": list(self.not_attempted),
                "culprits": list(self.culprits)}


class DeploymentFailed(PermanentError):
    """A deploy run failed: every target it changed was rolled back (or ``report`` says which could
    not be). The message names only the culprits."""

    def __init__(self, report: DeploymentReport) -> None:
        self.report = report
        stuck = [o for o in report.outcomes if o.action is Action.ROLLBACK_FAILED]
        state = ("every changed target was rolled back" if not stuck
                 else f"{len(stuck)} target(s) could not be rolled back: see the report")
        shown = "; ".join(f"{o.target}: {o.action}: {o.detail}" for o in report.outcomes if o.target in report.culprits)
        super().__init__(f"deployment of {report.name} ({report.fingerprint[:16]}) failed; {state}: {shown}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.report,))


def _settled(step: Step, result: Outcome | BaseException) -> Outcome:
    if isinstance(result, Outcome):
        return result
    if isinstance(result, TargetFailed):
        return result.outcome
    return Outcome(step.target, step.kind, Action.FAILED, None, redact(result))


def waves(plan: DeploymentPlan, canary: str | None = None, concurrency: int = 4) -> list[list[PlannedTarget]]:
    """The order a deploy run takes the plan's targets in: ``canary`` (default: the first by name) alone,
    then ``concurrency`` at a time (at most MAX_CONCURRENCY). PermanentError for a canary not in the plan."""
    pending = list(plan.targets)
    if canary is not None:
        if canary not in [t.name for t in pending]:
            raise PermanentError(f"canary {canary!r} is not a target of {plan.name}")
        pending.sort(key=lambda t: t.name != canary)
    size = max(1, min(concurrency, MAX_CONCURRENCY))
    return [pending[:1]] + [pending[i:i + size] for i in range(1, len(pending), size)] if pending else []


def deploy_everywhere(plan: DeploymentPlan, run_steps: RunSteps, *, canary: str | None = None,
                      concurrency: int = 4, log: Log = _log) -> DeploymentReport:
    """Serve ``plan.fingerprint`` on every target of the plan: ``canary`` (default: the first by name)
    alone first, then ``concurrency`` targets at a time (at most MAX_CONCURRENCY). On a failure no
    further wave starts and every target this run changed is rolled back (a failed target rolled
    itself back). Returns the report either way: ``report.failed`` says whether the run failed, and
    ``DeploymentFailed(report)`` is its error. Raises PermanentError for a canary not in the plan."""
    name, fp = plan.name, plan.fingerprint
    if not plan.targets:
        log.warning("managed certificate %s has no targets: nothing to deploy", name)
        return DeploymentReport(name, fp)
    outcomes: list[Outcome] = []
    not_attempted: list[str] = []
    for index, wave in enumerate(waves(plan, canary, concurrency)):
        if any(not o.action.ok for o in outcomes):
            not_attempted += [t.name for t in wave]
            continue
        steps = [DeployStep(name, t.name, t.kind, fp) for t in wave]
        outcomes += [_settled(s, r) for s, r in zip(steps, run_steps(steps), strict=True)]
        if index == 0 and outcomes[0].action.ok:
            log.info("canary %s serves %s", wave[0].name, fp[:16])
    culprits = tuple(o.target for o in outcomes if not o.action.ok)
    if culprits:  # undo every target this run changed (a failed target has undone itself)
        back = [RollbackStep(name, o.target, o.kind, o.receipt) for o in reversed(outcomes) if o.receipt]
        rolled = {s.target: _settled(s, r) for s, r in zip(back, run_steps(back) if back else [], strict=True)}
        outcomes = [rolled.get(o.target, o) for o in outcomes]
    report = DeploymentReport(name, fp, tuple(outcomes), tuple(not_attempted), culprits)
    if report.failed:
        for o in report.outcomes:
            if o.target in culprits:
                log.error("DEPLOYMENT FAILED at %s (%s): %s: %s", o.target, o.kind, o.action, o.detail)
            elif o.action is not Action.ALREADY_SERVED:
                log.warning("%s (%s): %s: %s", o.target, o.kind, o.action, o.detail)
    else:
        log.info("%s (%s) is served on all %d target(s)", name, fp[:16], len(report.outcomes))
    return report
