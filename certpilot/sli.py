"""The seeds' service level indicators, M1 to M10, measured over a window of time.

``compute(session, window, now)`` reads the inventory (endpoint checks, alerts, certificates,
certificate authorities) and the audit trail for the window ``[now - window, now]`` and returns an
``SliReport``: each indicator with its value and unit, its numerator and denominator where it is a
ratio, and, when there is nothing to measure, no value and the reason. It never makes a number up.
Pure: no Prefect, no network, no clock of its own.

The definitions (each ``Sli.definition`` says the same in one line):

- M1 served certificates valid: among the places the monitor checked in the window (EndpointCheck
  rows, the latest check of each place) that served a certificate, the share whose check was ok, whose
  certificate was not revoked and not expired when checked. Places that could not be reached served
  nothing and are counted apart (``unreachable``).
- M2 renewal success rate: renewals of managed certificates in the window, ``certificate.issued``
  (with a ``managed`` name) against ``renewal.failed`` audit events.
- M3 time to repair a certificate incident: PAGE and CRITICAL alerts resolved in the window,
  ``resolved_at - first_seen``: the median is the value, the 90th percentile a detail.
- M4 issuance latency: ``issuance_seconds`` of the window's ``certificate.issued`` events (from the
  request to the CA to the certificate received, timed by certpilot.renewing.issue): p50, and p90.
- M5 key store availability: the key store's operations recorded in the audit trail: successes are
  ``key.stored`` events (a key sealed and written), failures are renewals that failed at step ``key``
  (generate and seal) or ``csr`` (unseal the key and sign). A successful read of a key is recorded
  nowhere, so it is not counted: M5 is a lower bound of the true availability when reads fail.
- M6 revocation propagation time: for each ``certificate.revoked`` event in the window, the time
  until relying parties could see it. Measured where certpilot watched it as a relying party would
  (a ``certificate.revocation_visible`` event after the revocation, certpilot.propagation: the CRL at
  the certificate's distribution point and its OCSP responder both said revoked), ``seconds`` of that
  event (``measured``); a watch that ended before both said revoked counts with the revocation's age
  so far (``not_seen``). Otherwise, for a certpilot CA, the time to that CA's next ``ca.crl_issued``
  event (every CRL lists each revoked certificate that has not expired, so the next one contains it;
  ``by_crl_publication``), and one that no CRL has followed yet counts with its age so far
  (``pending``). Revocations by other CAs that were not watched have nothing certpilot can see and are
  counted apart (``untracked``). The value is the worst; the definition says which measure was used.
- M7 share of automated rotations: the window's ``certificate.issued`` events of managed
  certificates made by a Prefect flow run (the event carries a flow run id: a deployment, a schedule
  or the renew-due flow) against all of them (the rest: a person at the CLI, ``cli:<name>``).
- M8 chain validation errors: the places checked in the window whose problems include
  ``chain-incomplete``; the value is their count, their share of the places that served a
  certificate a detail.
- M9 certificate incidents: alerts opened in the window (``first_seen``), counted by severity.
- M10 audit completeness: the window's part of the audit chain verifies (certpilot.audit.verify from
  the window's first event, linked to the hash before it; a whole walk grows with the trail and is
  what ``certpilot audit verify`` does), and every lifecycle
  fact of the window has its event: each certificate that entered the inventory its
  ``certificate.added``, each certificate issued (linked to a managed certificate, or a leaf of a
  certpilot CA) its ``certificate.issued``, each certificate revoked its ``certificate.revoked``. The
  value is the share of facts recorded; a chain that does not verify makes it 0 (nothing in it can
  be trusted), naming the broken link.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import sqlalchemy as sa
from sqlmodel import Session, col

from certpilot import audit, propagation
from certpilot.alerts import Condition, Severity
from certpilot.errors import AuditChainError, InvalidOptionError
from certpilot.inventory import iso
from certpilot.models import Alert, AuditEvent, Certificate, CertificateAuthority, EndpointCheck

__all__ = ["KEYS", "Sli", "SliReport", "Unit", "compute", "percentile", "renewal_slis_by", "shown_seconds"]

Unit = Literal["percent", "seconds", "count"]
Scalar = float | int | str | bool | None

KEYS = ("M1", "M2", "M3", "M4", "M5", "M6", "M7", "M8", "M9", "M10")

CHAIN_INCOMPLETE = str(Condition.CHAIN_INCOMPLETE)
INCIDENT_SEVERITIES = (str(Severity.PAGE), str(Severity.CRITICAL))  # an incident: someone must repair it now
SEVERITIES = tuple(str(s) for s in sorted(Severity, key=Severity.rank, reverse=True))  # page, critical, ticket
KEY_STORE_STEPS = ("key", "csr")  # the renewal steps that use the key store (certpilot.renewing.Step)
_MISSING_SHOWN = 5  # how many facts without their audit event M10 names


@dataclass(frozen=True)
class Sli:
    """One indicator: ``value`` in ``unit``, or None and ``reason`` when there was nothing to measure.
    A ratio has its ``numerator`` and ``denominator``; ``details`` hold the rest (a p90, counts)."""

    key: str  # M1 ... M10
    name: str
    unit: Unit
    value: float | None
    definition: str
    numerator: int | None = None
    denominator: int | None = None
    reason: str | None = None
    details: tuple[tuple[str, Scalar], ...] = ()

    def detail(self, name: str) -> Scalar:
        return dict(self.details).get(name)

    @property
    def shown(self) -> str:
        """The value for people: ``75.0 %``, ``1.2 min``, ``3``; ``no data`` when there is none."""
        if self.value is None:
            return "no data"
        if self.unit == "percent":
            return f"{self.value:.1f} %"
        if self.unit == "seconds":
            return shown_seconds(self.value)
        return f"{self.value:g}"

    @property
    def shown_details(self) -> str:
        """The details for people (``p90_seconds: 4.6 h, incidents: 3``), or why there is no value."""
        if self.value is None and self.reason:
            return self.reason
        return ", ".join(f"{k}: {_shown_detail(k, v)}" for k, v in self.details if v is not None)

    @property
    def ratio(self) -> str:
        """``3 of 4`` for a ratio that has a value, else empty."""
        return f"{self.numerator} of {self.denominator}" if self.denominator and self.value is not None else ""

    def as_dict(self) -> dict[str, Any]:
        return {"key": self.key, "name": self.name, "value": self.value, "unit": self.unit,
                "numerator": self.numerator, "denominator": self.denominator, "reason": self.reason,
                "details": dict(self.details), "definition": self.definition}


@dataclass(frozen=True)
class SliReport:
    """M1 to M10 over ``[start, end]``."""

    start: dt.datetime
    end: dt.datetime
    slis: tuple[Sli, ...]

    def get(self, key: str) -> Sli:
        for sli in self.slis:
            if sli.key == key:
                return sli
        raise KeyError(f"no SLI {key!r}: there are {', '.join(KEYS)}")

    @property
    def window(self) -> dt.timedelta:
        return self.end - self.start

    def as_dict(self) -> dict[str, Any]:
        return {"start": iso(self.start), "end": iso(self.end), "window_seconds": self.window.total_seconds(),
                "slis": [s.as_dict() for s in self.slis]}


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0 to 1) of ``values`` by linear interpolation between the closest ranks
    (the median of an even count is the mean of the middle two, as statistics.median)."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def shown_seconds(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.3g} ms"
    if seconds < 120:
        return f"{seconds:.3g} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _shown_detail(name: str, value: Scalar) -> str:
    if name.endswith("_seconds") and isinstance(value, (int, float)):
        return shown_seconds(float(value))
    if name.endswith("_percent") and isinstance(value, (int, float)):
        return f"{value:.1f} %"
    return str(value)


def compute(session: Session, window: dt.timedelta, now: dt.datetime) -> SliReport:
    """M1 to M10 over ``[now - window, now]`` (see the module docstring for each definition)."""
    if window <= dt.timedelta(0):
        raise InvalidOptionError("window", window, "a positive duration, e.g. 30d")
    if now.tzinfo is None:
        raise ValueError("now must be an aware UTC datetime")
    start = now - window
    events = _Events.read(session, start, now)
    places = _places(session, start, now)
    slis = (_m1(places), _m2(events), _m3(session, start, now), _m4(events), _m5(events),
            _m6(session, events, start, now), _m7(events), _m8(places), _m9(session, start, now),
            _m10(session, start, now))
    return SliReport(start, now, slis)


def renewal_slis_by(session: Session, start: dt.datetime, end: dt.datetime, group_of: Callable[[str], str],
                    groups: Iterable[str] = ()) -> dict[str, tuple[Sli, Sli]]:
    """M2 (renewal success) and M7 (automated rotations) over ``[start, end]`` for each group of managed
    certificates, by the same events and definitions as ``compute``: ``group_of(name)`` gives the group
    of the managed certificate called ``name`` (its owner, for the compliance report). Every group named
    in ``groups`` is present (with no value and the reason when nothing happened), and every group that
    had a renewal or a failed one in the window."""
    events = _Events.read(session, start, end)
    grouped: dict[str, list[_Event]] = {group: [] for group in groups}
    for e in events.rows:
        name = e.managed
        if name is not None:
            grouped.setdefault(group_of(name), []).append(e)
    return {group: (_m2(_Events(tuple(rows))), _m7(_Events(tuple(rows)))) for group, rows in grouped.items()}


# ------------------------------------------------------------------------------------ what is read

@dataclass(frozen=True)
class _Event:
    seq: int
    at: dt.datetime
    action: str
    object: str
    flow_run_id: str | None
    details: dict[str, Any]

    @property
    def managed(self) -> str | None:
        """The managed certificate a renewal event is about (M2, M7): a managed certificate issued, or a
        renewal that failed; None for any other event."""
        if self.action == "certificate.issued":
            name = self.details.get("managed")
            return str(name) if name else None
        if self.action == "renewal.failed":
            return self.object.removeprefix("managed:")
        return None


@dataclass(frozen=True)
class _Events:
    """The window's audit events of the actions the SLIs count, in order."""

    rows: tuple[_Event, ...]

    ACTIONS = ("certificate.issued", "renewal.failed", "key.stored", "certificate.revoked", "ca.crl_issued")

    @classmethod
    def read(cls, session: Session, start: dt.datetime, end: dt.datetime) -> _Events:
        e = AuditEvent
        rows = session.execute(
            sa.select(col(e.seq), col(e.at), col(e.action), col(e.object), col(e.flow_run_id), col(e.details))
            .where(col(e.action).in_(cls.ACTIONS), col(e.at) >= start, col(e.at) <= end).order_by(col(e.seq))).all()
        return cls(tuple(_Event(r.seq, r.at, r.action, r.object, r.flow_run_id, json.loads(r.details)) for r in rows))

    def of(self, action: str) -> list[_Event]:
        return [e for e in self.rows if e.action == action]

    def renewals(self) -> list[_Event]:
        """Managed certificates issued (renewed); `ca issue` from a CSR file names no managed certificate."""
        return [e for e in self.of("certificate.issued") if e.details.get("managed")]


@dataclass(frozen=True)
class _Place:
    place: str
    served: str | None
    ok: bool
    problems: tuple[str, ...]
    revocation: str | None
    error: str | None
    checked_at: dt.datetime
    not_after: dt.datetime | None  # of the served certificate, when the inventory knows it


def _places(session: Session, start: dt.datetime, end: dt.datetime) -> list[_Place]:
    c, k = EndpointCheck, Certificate
    rows = session.execute(
        sa.select(col(c.place), col(c.served_fingerprint), col(c.ok), col(c.problems), col(c.revocation),
                  col(c.error), col(c.checked_at), col(k.not_after))
        .outerjoin(k, col(k.fingerprint_sha256) == col(c.served_fingerprint))
        .where(col(c.checked_at) >= start, col(c.checked_at) <= end)).all()
    return [_Place(r.place, r.served_fingerprint, bool(r.ok), tuple(r.problems or ()), r.revocation, r.error,
                   r.checked_at, r.not_after) for r in rows]


# ------------------------------------------------------------------------------------ the indicators

def _ratio(key: str, name: str, definition: str, numerator: int, denominator: int, none_reason: str,
           details: Iterable[tuple[str, Scalar]] = ()) -> Sli:
    value = 100.0 * numerator / denominator if denominator else None
    return Sli(key, name, "percent", value, definition, numerator, denominator,
               None if denominator else none_reason, tuple(details))


def _m1(places: Sequence[_Place]) -> Sli:
    served = [p for p in places if p.served is not None]
    revoked = sum(1 for p in served if p.revocation == "revoked")
    expired = sum(1 for p in served if p.not_after is not None and p.not_after <= p.checked_at)
    valid = sum(1 for p in served if p.ok and p.revocation != "revoked"
                and not (p.not_after is not None and p.not_after <= p.checked_at))
    return _ratio("M1", "served certificates valid",
                  "places checked in the window serving a certificate whose check was ok, not revoked, not expired",
                  valid, len(served), "no place serving a certificate was checked in the window",
                  [("revoked", revoked), ("expired", expired), ("unreachable", len(places) - len(served))])


def _m2(events: _Events) -> Sli:
    issued, failed = len(events.renewals()), len(events.of("renewal.failed"))
    return _ratio("M2", "renewal success rate",
                  "certificate.issued for managed certificates against renewal.failed, in the window",
                  issued, issued + failed, "no renewal was attempted in the window", [("failed", failed)])


def _m3(session: Session, start: dt.datetime, end: dt.datetime) -> Sli:
    a = Alert
    rows = session.execute(sa.select(col(a.first_seen), col(a.resolved_at)).where(
        col(a.severity).in_(INCIDENT_SEVERITIES), col(a.resolved_at) >= start, col(a.resolved_at) <= end)).all()
    durations = [(r.resolved_at - r.first_seen).total_seconds() for r in rows]
    definition = "PAGE and CRITICAL alerts resolved in the window: median of resolved - first seen"
    if not durations:
        return Sli("M3", "time to repair a certificate incident", "seconds", None, definition,
                   reason="no PAGE or CRITICAL alert was resolved in the window", details=(("incidents", 0),))
    return Sli("M3", "time to repair a certificate incident", "seconds", percentile(durations, 0.5), definition,
               details=(("p90_seconds", percentile(durations, 0.9)), ("incidents", len(durations))))


def _m4(events: _Events) -> Sli:
    samples = [float(e.details["issuance_seconds"]) for e in events.of("certificate.issued")
               if isinstance(e.details.get("issuance_seconds"), (int, float))]
    definition = "issuance_seconds of certificate.issued in the window (request to the CA to certificate received): p50"
    if not samples:
        return Sli("M4", "issuance latency", "seconds", None, definition,
                   reason="no issuance with a measured latency in the window", details=(("samples", 0),))
    return Sli("M4", "issuance latency", "seconds", percentile(samples, 0.5), definition,
               details=(("p90_seconds", percentile(samples, 0.9)), ("samples", len(samples))))


def _m5(events: _Events) -> Sli:
    stored = len(events.of("key.stored"))
    failed = sum(1 for e in events.of("renewal.failed") if e.details.get("step") in KEY_STORE_STEPS)
    return _ratio("M5", "key store availability",
                  "key.stored against renewals failed at step key or csr, in the window (reads are not recorded)",
                  stored, stored + failed, "no key store operation was recorded in the window",
                  [("failed", failed)])


def _m6(session: Session, events: _Events, start: dt.datetime, end: dt.datetime) -> Sli:
    ours = set(session.execute(sa.select(col(CertificateAuthority.name))).scalars())
    crls: dict[str, list[_Event]] = {}
    for crl in events.of("ca.crl_issued"):
        crls.setdefault(crl.object.removeprefix("ca:"), []).append(crl)
    revocations = events.of("certificate.revoked")
    measured = propagation.measurements(session, {r.object.removeprefix("certificate:") for r in revocations},
                                        since=start, until=end)
    times: list[float] = []
    by_watch, not_seen, by_crl, pending, untracked = 0, 0, 0, 0, 0
    for revoked in revocations:
        watch = measured.get(revoked.object.removeprefix("certificate:"))
        if watch is not None and watch.seq > revoked.seq:  # a relying party's view, measured after the revocation
            by_watch += 1
            if watch.seconds is not None:
                times.append(watch.seconds)
            else:  # the watch ended before both said revoked: not known to be visible, counted with its age
                not_seen += 1
                times.append((end - revoked.at).total_seconds())
            continue
        ca = str(revoked.details.get("ca"))
        if ca not in ours:
            untracked += 1
            continue
        by_crl += 1
        following = next((c for c in crls.get(ca, []) if c.seq > revoked.seq), None)
        if following is None:
            pending += 1
            times.append((end - revoked.at).total_seconds())
        else:  # a CRL's time is whole seconds (its thisUpdate): one issued with the revocation may read as before it
            times.append(max(0.0, (following.at - revoked.at).total_seconds()))
    details: tuple[tuple[str, Scalar], ...] = (("revocations", len(times)), ("measured", by_watch),
                                               ("not_seen", not_seen), ("by_crl_publication", by_crl),
                                               ("pending", pending), ("untracked", untracked))
    definition = _m6_definition(by_watch, by_crl)
    if not times:
        reason = ("no revocation by a certpilot CA in the window" if not untracked else
                  f"{untracked} revocation(s) in the window, none by a certpilot CA (no CRL of its own to follow)")
        return Sli("M6", "revocation propagation time", "seconds", None, definition, reason=reason, details=details)
    return Sli("M6", "revocation propagation time", "seconds", max(times), definition,
               details=(("median_seconds", percentile(times, 0.5)), *details))


_M6_MEASURED = ("to its certificate.revocation_visible (the CRL at its distribution point and its OCSP responder "
                "both said revoked, read as a relying party)")
_M6_CRL = "to its certpilot CA's next ca.crl_issued (no relying-party measurement)"


def _m6_definition(by_watch: int, by_crl: int) -> str:
    """Says which measure the value rests on: the relying party's watch, the CRL publication, or both."""
    if by_watch and by_crl:
        how = f"{_M6_MEASURED} for {by_watch}, else {_M6_CRL} for {by_crl}"
    elif by_watch:
        how = _M6_MEASURED
    else:
        how = _M6_CRL
    return (f"certificate.revoked in the window {how}: the worst (one not seen yet, or in no CRL yet, counts "
            "with its age)")


def _m7(events: _Events) -> Sli:
    renewals = events.renewals()
    automated = sum(1 for e in renewals if e.flow_run_id)
    return _ratio("M7", "share of automated rotations",
                  "certificate.issued for managed certificates in the window made by a Prefect flow run (not the CLI)",
                  automated, len(renewals), "no managed certificate was issued in the window",
                  [("manual", len(renewals) - automated)])


def _m8(places: Sequence[_Place]) -> Sli:
    served = [p for p in places if p.served is not None]
    broken = sum(1 for p in served if CHAIN_INCOMPLETE in p.problems)
    definition = "places checked in the window whose chain does not build to a trust anchor (chain-incomplete)"
    if not served:
        return Sli("M8", "chain validation errors", "count", None, definition,
                   reason="no place serving a certificate was checked in the window")
    return Sli("M8", "chain validation errors", "count", float(broken), definition, broken, len(served),
               details=(("share_percent", 100.0 * broken / len(served)), ("places_checked", len(places))))


def _m9(session: Session, start: dt.datetime, end: dt.datetime) -> Sli:
    a = Alert
    counts = {str(severity): int(n) for severity, n in session.execute(
        sa.select(col(a.severity), sa.func.count()).where(col(a.first_seen) >= start, col(a.first_seen) <= end)
        .group_by(col(a.severity))).all()}
    details = tuple((s, counts.pop(s, 0)) for s in SEVERITIES) + tuple(sorted(counts.items()))
    return Sli("M9", "certificate incidents", "count", float(sum(n for _, n in details)),
               "alerts opened in the window (first seen), by severity", details=details)


def _m10(session: Session, start: dt.datetime, end: dt.datetime) -> Sli:
    definition = ("the window's audit chain verifies, and each certificate added, issued or revoked in the window has its "
                  "certificate.added, .issued or .revoked event")
    k = Certificate
    in_window = [col(k.created_at) >= start, col(k.created_at) <= end]
    ca_leaf = sa.and_(col(k.is_ca).is_(False), col(k.issuer_fingerprint).in_(
        sa.select(col(CertificateAuthority.issuing_fingerprint))))
    facts = (("certificate.added", in_window),
             ("certificate.issued", [*in_window, sa.or_(col(k.managed_certificate_id).is_not(None), ca_leaf)]),
             ("certificate.revoked", [col(k.status) == "revoked", col(k.revoked_at) >= start, col(k.revoked_at) <= end]))
    total, missing, examples = 0, 0, list[str]()
    for action, where in facts:
        recorded = sa.exists().where(col(AuditEvent.action) == action,
                                     col(AuditEvent.object) == sa.literal("certificate:") + col(k.fingerprint_sha256))
        total += session.execute(sa.select(sa.func.count()).select_from(k).where(*where)).scalar_one()
        absent = session.execute(sa.select(col(k.fingerprint_sha256)).where(*where, ~recorded)
                                 .order_by(col(k.fingerprint_sha256))).scalars().all()
        missing += len(absent)
        examples += [f"{action} certificate:{fp[:16]}" for fp in absent[:_MISSING_SHOWN - len(examples)]]
    first = session.execute(sa.select(sa.func.min(col(AuditEvent.seq))).where(col(AuditEvent.at) >= start)).scalar()
    try:
        chain = audit.verify(session, since=first or 1)
    except AuditChainError as exc:
        return Sli("M10", "audit completeness", "percent", 0.0, definition, total - missing, total,
                   details=(("chain_verified", False), ("chain_error", str(exc)), ("missing", missing),
                            ("missing_examples", "; ".join(examples) or None)))
    details = (("chain_verified", True), ("events", chain.events), ("missing", missing),
               ("missing_examples", "; ".join(examples) or None))
    if not total:
        return Sli("M10", "audit completeness", "percent", None, definition, 0, 0,
                   reason=f"no certificate was added, issued or revoked in the window (the chain of {chain.events} "
                          "events verifies)", details=details)
    return Sli("M10", "audit completeness", "percent", 100.0 * (total - missing) / total, definition,
               total - missing, total, details=details)
