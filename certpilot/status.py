"""The status of managed certificates, as `certpilot status` shows it (like `certbot certificates` or
`cmctl status`): the current certificate, when it renews next and why, what each target should serve
and what was last verified there, the last error, the last runs that worked on it, and the policy
violations stored for its current certificate (and the places that serve it).

Plain typed records, assembled from the inventory alone (the runs are the audit events, which carry
their Prefect flow run ids): no Prefect API is needed. Formatting for people is the CLI's.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col, select

from certpilot.clock import utcnow
from certpilot.inventory import violations_for
from certpilot.managed import Scheduled, get, list_managed, schedule
from certpilot.models import AuditEvent, Certificate, Target

RUNS_SHOWN = 10  # the newest audit events listed per managed certificate


@dataclass(frozen=True)
class CurrentCertificate:
    fingerprint_sha256: str
    serial: str
    not_before: dt.datetime
    not_after: dt.datetime
    days_left: float  # to one decimal, negative once expired


@dataclass(frozen=True)
class NextRenewal:
    """When the certificate is (or was) due, and why. ``at`` is stable: for a certificate already
    due, it is when it fell due (as certpilot.managed.schedule reports it), never the moment of asking."""

    due: bool
    at: dt.datetime
    reason: str


@dataclass(frozen=True)
class TargetStatus:
    name: str
    kind: str
    block: str | None
    desired_fingerprint: str | None  # what it should serve
    verified_fingerprint: str | None  # what it was last seen serving
    verified_at: dt.datetime | None
    deployed_at: dt.datetime | None
    last_error: str | None

    @property
    def in_step(self) -> bool:
        """It was last seen serving what it should serve."""
        return self.desired_fingerprint is not None and self.desired_fingerprint == self.verified_fingerprint


@dataclass(frozen=True)
class Run:
    """One audit event about the managed certificate, its certificates or its targets."""

    seq: int
    at: dt.datetime
    action: str
    object: str
    actor: str
    flow_run_id: str | None


@dataclass(frozen=True)
class ManagedStatus:
    name: str
    issuer: str
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    current: CurrentCertificate | None
    next_renewal: NextRenewal
    targets: tuple[TargetStatus, ...]
    last_attempt_at: dt.datetime | None
    last_error: str | None
    runs: tuple[Run, ...]  # newest first
    # The current certificate's policy violations, most severe first, waived ones last (with who waived them):
    # certpilot.inventory.violations_for's shape (rule, fingerprint_sha256, severity, detail, place, waiver_id...).
    violations: tuple[dict[str, Any], ...] = ()
    uris: tuple[str, ...] = ()  # URI names (a SPIFFE ID)


def next_renewal(scheduled: Scheduled) -> NextRenewal:
    """The schedule's answer as shown: the renewal time while not due; once due, when it fell due."""
    return NextRenewal(scheduled.decision.due, scheduled.decision.renew_at, scheduled.decision.reason)


def managed_status(session: Session, name: str | None = None, now: dt.datetime | None = None,
                   runs: int = RUNS_SHOWN) -> list[ManagedStatus]:
    """The status of managed certificate ``name`` (NotFoundError if there is none), or of every active
    one, soonest renewal first."""
    now = now or utcnow()
    rows = [get(session, name)] if name is not None else list_managed(session)
    result = []
    for s in schedule(session, now, managed=rows):
        m = s.managed
        current = None if s.current is None else CurrentCertificate(
            s.current.fingerprint_sha256, s.current.serial_hex, s.current.not_before, s.current.not_after,
            round((s.current.not_after - now).total_seconds() / 86400, 1))
        targets = tuple(TargetStatus(t.name, t.kind, t.block, t.desired_fingerprint, t.verified_fingerprint,
                                     t.verified_at, t.deployed_at, t.last_error)
                        for t in session.exec(select(Target).where(col(Target.managed_certificate_id) == m.id)
                                              .order_by(col(Target.name))).all())
        found = [] if current is None else violations_for(session, [current.fingerprint_sha256], waivers=True).get(
            current.fingerprint_sha256, [])
        result.append(ManagedStatus(m.name, m.issuer, tuple(m.dns_names), tuple(m.ip_addresses), current,
                                    next_renewal(s), targets, m.last_attempt_at, m.last_error,
                                    tuple(_runs(session, m.name, m.id, runs)), tuple(found), tuple(m.uris or ())))
    return result


def _runs(session: Session, name: str, managed_id: int | None, limit: int) -> list[Run]:
    """The newest ``limit`` audit events about managed certificate ``name``: its own (added, renewal
    failed), its certificates' (issued, superseded, revoked...) and its targets' (desired, verified)."""
    certificates = sa.select(sa.literal("certificate:") + col(Certificate.fingerprint_sha256)).where(
        col(Certificate.managed_certificate_id) == managed_id)
    events = session.exec(select(AuditEvent).where(sa.or_(
        col(AuditEvent.object) == f"managed:{name}",
        col(AuditEvent.object).startswith(f"target:{name}/", autoescape=True),
        col(AuditEvent.object).in_(certificates),
    )).order_by(col(AuditEvent.seq).desc()).limit(limit)).all()
    return [Run(e.seq, e.at, e.action, e.object, e.actor, e.flow_run_id) for e in events]
