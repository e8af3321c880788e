"""Bringing one target to serve one certificate, and putting it back: the steps a deploy run takes
per target, over the Deployer role and the target records, without Prefect.

``bring_to`` reconciles before it deploys: a target already holding the certificate (a previous run
was killed after deploying it, say) is only verified, and deployed again if that fails. A target that
fails verification after a deploy is rolled back at once, so a failed target never stays changed.
Outcomes are public facts only: they are task results.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from certpilot import audit, targets
from certpilot.database import write_session
from certpilot.deployment import DeployBundle, Deployer, Receipt, VerificationError
from certpilot.errors import CertpilotError, TransientError
from certpilot.models import Target


@dataclass
class Outcome:
    target: str
    kind: str
    action: str  # deployed, already-served, failed, rolled-back, rollback-failed
    fingerprint: str | None  # what the target serves now, as far as certpilot knows
    detail: str = ""
    receipt: dict[str, Any] | None = None  # set when this run changed the target

    def as_dict(self) -> dict[str, Any]:
        return {"target": self.target, "kind": self.kind, "action": self.action, "fingerprint": self.fingerprint,
                "detail": self.detail, "receipt": self.receipt}


class TargetFailed(CertpilotError):
    """One target could not be brought to the certificate; it was left as it was (or put back)."""

    def __init__(self, outcome: Outcome, transient: bool = False) -> None:
        self.outcome, self.transient = outcome, transient
        super().__init__(f"{outcome.target}: {outcome.action}: {outcome.detail}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.outcome, self.transient))


class TransientTargetFailed(TargetFailed, TransientError):
    """As TargetFailed, for a reason that may pass (nothing was changed): worth a retry."""


def safe(exc: BaseException) -> str:
    """An error's message for records and reports: certpilot's own messages hold no secrets; others
    are reduced to their type (a library's message may quote what it was given)."""
    if isinstance(exc, CertpilotError):
        return str(exc)
    return f"{type(exc).__name__} (details withheld: not a certpilot error)"


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
            return Outcome(target.name, target.kind, "already-served", fingerprint, proof.detail)
    try:
        receipt = deployer.deploy(bundle())
    except Exception as exc:
        reason = safe(exc)
        _record(engine, target, targets.record_failed, f"deploy: {reason}", actor)
        outcome = Outcome(target.name, target.kind, "failed", held, f"deploy: {reason}")
        raise (TransientTargetFailed if isinstance(exc, TransientError) else TargetFailed)(outcome) from None
    _record(engine, target, targets.record_deployed, fingerprint, actor)
    try:
        proof = deployer.verify(fingerprint)
    except Exception as exc:
        reason = f"verify: {safe(exc)}"
        _record(engine, target, targets.record_failed, reason, actor)
        back = roll_back(engine, target, deployer, receipt, actor)
        raise TargetFailed(Outcome(target.name, target.kind, back.action, back.fingerprint,
                                   f"{reason}; {back.detail}")) from None
    _record(engine, target, targets.record_verified, fingerprint, proof.method, actor)
    return Outcome(target.name, target.kind, "deployed", fingerprint, proof.detail, receipt.as_dict())


def roll_back(engine: sa.Engine, target: Target, deployer: Deployer, receipt: Receipt,
              actor: audit.Actor) -> Outcome:
    """Undo ``receipt`` and prove the previous certificate is served again (when there was one)."""
    previous = receipt.previous_fingerprint
    try:
        deployer.rollback(receipt)
    except Exception as exc:
        reason = f"rollback failed: {safe(exc)}"
        _record(engine, target, targets.record_failed, reason, actor)
        return Outcome(target.name, target.kind, "rollback-failed", None, reason)
    verified = False
    detail = "rolled back"
    if previous:
        try:
            proof = deployer.verify(previous)
            verified, detail = True, f"rolled back; previous certificate served again ({proof.detail})"
        except Exception as exc:
            detail = f"rolled back, but the previous certificate is not proven served: {safe(exc)}"
    _record(engine, target, targets.record_rolled_back, previous, verified, actor)
    return Outcome(target.name, target.kind, "rolled-back", previous if verified else None, detail)


@dataclass
class Report:
    """A deploy run's outcome per target, in order, and what it means."""

    name: str
    fingerprint: str
    outcomes: list[Outcome] = field(default_factory=list)
    not_attempted: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return any(o.action not in ("deployed", "already-served") for o in self.outcomes)

    def markdown(self) -> str:
        head = "FAILED: every changed target was rolled back" if self.failed else "all targets serve it"
        lines = [f"# Deployment of {self.name}", "", f"Certificate `{self.fingerprint[:16]}`: {head}.", "",
                 "| target | kind | outcome | serving | detail |", "|---|---|---|---|---|"]
        for o in self.outcomes:
            lines.append(f"| {o.target} | {o.kind} | {o.action} | {(o.fingerprint or '?')[:16]} | "
                         f"{o.detail.replace('|', '/')} |")
        lines += [f"| {t} | | not attempted | | stopped after a failure |" for t in self.not_attempted]
        return "\n".join(lines)

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "fingerprint": self.fingerprint, "failed": self.failed,
                "outcomes": [o.as_dict() for o in self.outcomes], "not_attempted": list(self.not_attempted)}
