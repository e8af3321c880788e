"""Alerts: one per (object, condition) while unresolved, de-duplicated, escalating, suppressible.

Sensors (monitoring, renewals, discovery) report ``Finding``s together with the ``Scope`` they checked.
``observe`` folds them into the Alert table in a few set-based statements and returns the
``Transition``s someone must be told about:

- a finding for an (object, condition) with no unresolved alert opens one (``opened``);
- a finding with a higher severity than the alert ever had escalates it (``escalated``);
- a finding with the same or a lower severity only moves ``last_seen`` (the severity kept is the
  highest reached, so a condition that flaps between bands does not notify on every swing);
- an unresolved alert in the scope that was not found again resolves (``resolved``), and is told
  about only if someone was told it was open.

The same certificate seen by five sensors and ten monitor runs is one alert that notified once.

Suppressions: an active Suppression (``starts_at <= now < ends_at`` and not ended early) whose scope
matches an alert keeps it in state ``suppressed``: recorded, updated, never told. When the window
ends (by time, or ended early) the next observation of it notifies as ``opened`` (or ``escalated``
when it had been told before at a lower severity). A resolution while suppressed is silent.

Acknowledgement (``acknowledge``): someone took it. An acknowledged alert is not told about again on
escalation unless the escalation reaches PAGE (waking someone for what is being worked on only when
it became an emergency); its resolution is still told, closing the loop.

Notified severity: ``observe`` records the decision to notify (``notified_severity``,
``last_notified_at``) when it returns a transition, so a channel that is down is not retried on every
monitor run (that would cost its timeout for every alert, every run); each delivery attempt, failed
or not, is an AlertDelivery row written by the delivery layer (tasks/alerting.py), which also counts
``notifications_sent``.

Scope strings of suppressions: ``owner=X``, ``certificate=NAME-or-fingerprint``, ``tag:K=V``,
``condition=C``, ``object=O``; several joined by ``,`` must all match. ``certificate=X`` matches the
objects ``certificate:X...`` (a fingerprint or a prefix of at least 8 hex digits) and ``managed:X``,
and a finding whose details name it (``certificate``, ``managed``, ``fingerprint`` or one of
``names``).

Finding details (public facts, JSON-able) that messages show when present: ``certificate`` (the name
people know it by: managed name, DNS name or CN), ``fingerprint``, ``not_after`` (ISO 8601),
``days_left``, ``served_at`` (places: locators or targets), ``action`` (what to do), ``run_url`` (the
Prefect UI run), ``names`` (DNS names).

No Prefect and no network here.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session

from certpilot import audit
from certpilot.errors import InvalidOptionError, NotFoundError, PermanentError
from certpilot.models import Alert, Suppression

_CHUNK = 500  # objects per IN list: well under every backend's limit on bound parameters


class Severity(StrEnum):
    """How urgent: TICKET < CRITICAL < PAGE (compare with ``rank()``, never as strings)."""

    TICKET = "ticket"  # fixed in working hours; goes to the owner's daily digest
    CRITICAL = "critical"  # notified at once to the route's channels
    PAGE = "page"  # notified at once to the route's page channels (or its channels)

    def rank(self) -> int:
        return _RANK[self]


_RANK = {Severity.TICKET: 0, Severity.CRITICAL: 1, Severity.PAGE: 2}


def highest(severities: Iterable[Severity]) -> Severity:
    """The most urgent of ``severities`` (at least one)."""
    return max(severities, key=Severity.rank)


class Condition(StrEnum):
    EXPIRING = "expiring"  # within a band: WARNING -> TICKET, CRITICAL -> CRITICAL (bands configurable)
    EXPIRED = "expired"  # a served certificate is expired -> PAGE
    REVOKED_SERVED = "revoked-served"  # a served certificate is revoked -> PAGE
    WRONG_CERTIFICATE = "wrong-certificate"  # served != expected at a target/endpoint -> CRITICAL
    CHAIN_INCOMPLETE = "chain-incomplete"  # chain does not build to a trust anchor -> CRITICAL
    HOSTNAME_MISMATCH = "hostname-mismatch"  # -> CRITICAL
    WEAK_TLS = "weak-tls"  # TLS below 1.2 -> TICKET
    UNREACHABLE = "unreachable"  # an endpoint, CA or host does not answer -> CRITICAL
    RENEWAL_FAILED = "renewal-failed"  # >72h left TICKET, 12h..72h CRITICAL, <12h PAGE
    RENEWAL_OVERDUE = "renewal-overdue"  # past its renewal time without a success -> TICKET (CRITICAL under 72h)
    RUN_STUCK = "run-stuck"  # a renewal/deploy run Pending/Running/Late beyond its deadline -> CRITICAL
    SOURCE_STALE = "source-stale"  # a source's last complete run older than two intervals -> TICKET
    POLICY_VIOLATION = "policy-violation"  # -> TICKET
    REVOKED = "revoked"  # a certificate was revoked: production -> PAGE, else TICKET


# The severity of the conditions whose severity does not depend on time or on the object.
FIXED_SEVERITY: Mapping[Condition, Severity] = {
    Condition.EXPIRED: Severity.PAGE,
    Condition.REVOKED_SERVED: Severity.PAGE,
    Condition.WRONG_CERTIFICATE: Severity.CRITICAL,
    Condition.CHAIN_INCOMPLETE: Severity.CRITICAL,
    Condition.HOSTNAME_MISMATCH: Severity.CRITICAL,
    Condition.WEAK_TLS: Severity.TICKET,
    Condition.UNREACHABLE: Severity.CRITICAL,
    Condition.RUN_STUCK: Severity.CRITICAL,
    Condition.SOURCE_STALE: Severity.TICKET,
    Condition.POLICY_VIOLATION: Severity.TICKET,
}

# What to do, per condition: the default ``action`` line of a message.
ACTIONS: Mapping[Condition, str] = {
    Condition.EXPIRING: "renew it (certpilot renew NAME) or check why its scheduled renewal has not run",
    Condition.EXPIRED: "replace it now: renew and deploy (certpilot renew NAME), clients are failing",
    Condition.REVOKED_SERVED: "deploy a replacement now (certpilot renew NAME); the revoked one must not be served",
    Condition.WRONG_CERTIFICATE: "deploy the expected certificate (certpilot deploy NAME) and check what changed it",
    Condition.CHAIN_INCOMPLETE: "serve the full chain (leaf and intermediates) at this place",
    Condition.HOSTNAME_MISMATCH: "serve a certificate whose names cover this host, or fix the SNI/routing",
    Condition.WEAK_TLS: "disable TLS below 1.2 on this endpoint",
    Condition.UNREACHABLE: "check that the service is up and reachable from the monitor",
    Condition.RENEWAL_FAILED: "read the failed run's log, fix the cause, then certpilot renew NAME",
    Condition.RENEWAL_OVERDUE: "check the renew-due deployment and its runs; renew by hand if needed",
    Condition.RUN_STUCK: "inspect the run in the Prefect UI; cancel it and start it again if it hangs",
    Condition.SOURCE_STALE: "check the discovery source's deployment and its last runs",
    Condition.POLICY_VIOLATION: "replace the certificate with one that meets the policy",
    Condition.REVOKED: "make sure its replacement is deployed everywhere it was served",
}


@dataclass(frozen=True)
class Finding:
    """What a sensor saw; many findings for one (object, condition) are one alert."""

    object: str  # "certificate:<sha256>", "managed:<name>", "source:<name>", "place:<place>", "flow-run:<id>"...
    condition: Condition
    severity: Severity
    summary: str  # one line for a human, no secrets
    owner: str | None = None
    tags: Mapping[str, str] = field(default_factory=dict)
    details: Mapping[str, Any] = field(default_factory=dict)  # public facts only, JSON-able


@dataclass(frozen=True)
class Scope:
    """What a sensor run checked: unresolved alerts in scope that were not found again resolve."""

    conditions: frozenset[Condition]
    objects: frozenset[str] | None = None  # None: every object

    def covers(self, obj: str, condition: str) -> bool:
        return condition in self.conditions and (self.objects is None or obj in self.objects)


@dataclass(frozen=True)
class Bands:
    """Expiry bands in days, configurable in the alert policy."""

    critical_days: float = 7
    warning_days: float = 30

    def __post_init__(self) -> None:
        if not 0 < self.critical_days < self.warning_days:
            raise InvalidOptionError("bands", (self.critical_days, self.warning_days),
                                     "0 < critical_days < warning_days")


def expiry_severity(not_after: dt.datetime, now: dt.datetime,
                    bands: Bands = Bands()) -> tuple[Condition, Severity] | None:
    """EXPIRED/PAGE once expired, EXPIRING/CRITICAL under ``critical_days``, EXPIRING/TICKET under
    ``warning_days``, else None."""
    left = not_after - now
    if left <= dt.timedelta(0):
        return Condition.EXPIRED, Severity.PAGE
    if left < dt.timedelta(days=bands.critical_days):
        return Condition.EXPIRING, Severity.CRITICAL
    if left < dt.timedelta(days=bands.warning_days):
        return Condition.EXPIRING, Severity.TICKET
    return None


def renewal_failure_severity(not_after: dt.datetime, now: dt.datetime) -> Severity:
    """A failed renewal: PAGE with under 12 hours left, TICKET with more than 72, else CRITICAL."""
    left = not_after - now
    if left < dt.timedelta(hours=12):
        return Severity.PAGE
    if left > dt.timedelta(hours=72):
        return Severity.TICKET
    return Severity.CRITICAL


def renewal_overdue_severity(not_after: dt.datetime, now: dt.datetime) -> Severity:
    """A managed certificate past its renewal time: TICKET, CRITICAL with under 72 hours left."""
    return Severity.CRITICAL if not_after - now < dt.timedelta(hours=72) else Severity.TICKET


@dataclass(frozen=True)
class Transition:
    """An alert that must be told about, with what a message needs (routing and content)."""

    alert_id: int
    kind: str  # "opened" | "escalated" | "resolved"
    severity: Severity
    object: str
    condition: Condition
    summary: str
    owner: str | None
    tags: Mapping[str, str]
    details: Mapping[str, Any]
    first_seen: dt.datetime
    at: dt.datetime
    previous_severity: Severity | None = None  # what was told before an escalation


# ------------------------------------------------------------------------------- suppression scopes

_TERM = re.compile(r"^(owner|certificate|condition|object)=(.+)$|^tag:([^=,]+)=(.*)$")
_HEX = re.compile(r"^[0-9a-fA-F]{8,64}$")


@dataclass(frozen=True)
class ScopeTerm:
    key: str  # owner, certificate, condition, object, tag
    value: str
    tag: str | None = None  # the tag's key, for key == "tag"


def parse_scope(text: str) -> tuple[ScopeTerm, ...]:
    """The terms of a suppression scope (all must match); InvalidOptionError naming what is wrong."""
    expected = ("owner=X, certificate=NAME-or-fingerprint, tag:K=V, condition=C or object=O "
                "(several joined by ',')")
    terms = []
    for part in text.split(","):
        match = _TERM.match(part.strip())
        if not part.strip() or match is None:
            raise InvalidOptionError("scope", text, expected)
        if match.group(3) is not None:
            terms.append(ScopeTerm("tag", match.group(4).strip(), match.group(3).strip()))
        else:
            terms.append(ScopeTerm(match.group(1), match.group(2).strip()))
        if terms[-1].key == "condition" and terms[-1].value not in {c.value for c in Condition}:
            raise InvalidOptionError("scope", text, "a condition among " + ", ".join(c.value for c in Condition))
    return tuple(terms)


def _term_matches(term: ScopeTerm, obj: str, condition: str, owner: str | None, tags: Mapping[str, str],
                  details: Mapping[str, Any]) -> bool:
    if term.key == "owner":
        return owner == term.value
    if term.key == "condition":
        return condition == term.value
    if term.key == "object":
        return obj == term.value
    if term.key == "tag":
        return term.tag is not None and tags.get(term.tag) == term.value
    name = term.value
    if obj in (f"certificate:{name}", f"managed:{name}"):
        return True
    if _HEX.match(name) and (obj.startswith(f"certificate:{name.lower()}")
                             or str(details.get("fingerprint", "")).startswith(name.lower())):
        return True
    names = details.get("names") or ()
    return name in (details.get("certificate"), details.get("managed")) or (
        isinstance(names, (list, tuple)) and name in names)


def scope_matches(terms: Sequence[ScopeTerm], obj: str, condition: str, owner: str | None,
                  tags: Mapping[str, str], details: Mapping[str, Any]) -> bool:
    """True when every term matches the alert or finding described."""
    return all(_term_matches(t, obj, condition, owner, tags, details) for t in terms)


@dataclass(frozen=True)
class ActiveSuppression:
    id: int
    terms: tuple[ScopeTerm, ...]


def active_suppressions(session: Session, now: dt.datetime) -> list[ActiveSuppression]:
    """Suppressions in force at ``now``: started, not yet ended by time and not ended early."""
    table = Suppression.__table__  # type: ignore[attr-defined]
    rows = session.execute(sa.select(table.c.id, table.c.scope).where(
        table.c.starts_at <= now, table.c.ends_at > now, table.c.ended_at.is_(None)).order_by(table.c.id)).all()
    found = []
    for row in rows:
        try:
            found.append(ActiveSuppression(row.id, parse_scope(row.scope)))
        except InvalidOptionError:
            continue  # refused on the way in; a row edited by hand into nonsense suppresses nothing
    return found


def _suppressed_by(suppressions: Sequence[ActiveSuppression], obj: str, condition: str, owner: str | None,
                   tags: Mapping[str, str], details: Mapping[str, Any]) -> int | None:
    for suppression in suppressions:
        if scope_matches(suppression.terms, obj, condition, owner, tags, details):
            return suppression.id
    return None


# ------------------------------------------------------------------------------------------ observe

@dataclass
class _Merged:
    finding: Finding
    severity: Severity
    owner: str | None
    tags: dict[str, str]


def _merge(findings: Iterable[Finding]) -> dict[tuple[str, str], _Merged]:
    """One entry per (object, condition): the most urgent finding's summary and details, the first
    owner given, the union of tags."""
    merged: dict[tuple[str, str], _Merged] = {}
    for finding in findings:
        key = (finding.object, Condition(finding.condition).value)
        severity = Severity(finding.severity)
        seen = merged.get(key)
        if seen is None:
            merged[key] = _Merged(finding, severity, finding.owner, dict(finding.tags))
            continue
        seen.tags.update(finding.tags)
        seen.owner = seen.owner or finding.owner
        if severity.rank() >= seen.severity.rank():
            seen.finding, seen.severity = finding, severity
    return merged


def _chunks(values: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(values), _CHUNK):
        yield values[start:start + _CHUNK]


def _unresolved(session: Session, conditions: set[str], objects: set[str] | None) -> list[sa.Row[Any]]:
    table = Alert.__table__  # type: ignore[attr-defined]
    query = sa.select(table).where(table.c.state != "resolved", table.c.condition.in_(sorted(conditions)))
    if objects is None:
        return list(session.execute(query).all())
    rows: list[sa.Row[Any]] = []
    for chunk in _chunks(sorted(objects)):
        rows.extend(session.execute(query.where(table.c.object.in_(chunk))).all())
    return rows


@dataclass(frozen=True)
class Observation:
    transitions: list[Transition]
    suppressed: int  # alerts found this time that a suppression kept quiet


def observe(session: Session, findings: Iterable[Finding], scope: Scope, now: dt.datetime) -> list[Transition]:
    """Fold ``findings`` into the Alert table and resolve what ``scope`` covers but was not found;
    return what must be told (see the module docstring). Findings outside ``scope`` are recorded too:
    the scope only decides what resolves. Runs in the caller's (write) transaction."""
    return record(session, findings, scope, now).transitions


def record(session: Session, findings: Iterable[Finding], scope: Scope, now: dt.datetime) -> Observation:
    """``observe``, also counting the alerts kept quiet by a suppression."""
    if now.tzinfo is None:
        raise ValueError("observe needs an aware UTC datetime")
    merged = _merge(findings)
    table = Alert.__table__  # type: ignore[attr-defined]
    conditions = {c.value for c in scope.conditions} | {key[1] for key in merged}
    objects = None if scope.objects is None else set(scope.objects) | {key[0] for key in merged}
    existing = {(row.object, row.condition): row for row in _unresolved(session, conditions, objects)}
    suppressions = active_suppressions(session, now)
    transitions: list[Transition] = []
    inserts: list[dict[str, Any]] = []
    updates: list[dict[str, Any]] = []

    for (obj, condition), entry in merged.items():
        finding, severity = entry.finding, entry.severity
        row = existing.get((obj, condition))
        owner = entry.owner if entry.owner is not None else (row.owner if row is not None else None)
        tags = {**(row.tags if row is not None else {}), **entry.tags}
        details = dict(finding.details)
        suppression_id = _suppressed_by(suppressions, obj, condition, owner, tags, details)
        if row is None:
            inserts.append({"object": obj, "condition": condition, "severity": severity.value,
                            "state": "suppressed" if suppression_id else "open", "summary": finding.summary,
                            "owner": owner, "tags": tags, "details": details, "first_seen": now, "last_seen": now,
                            "notified_severity": None if suppression_id else severity.value,
                            "last_notified_at": None if suppression_id else now, "notifications_sent": 0,
                            "suppression_id": suppression_id})
            continue
        kept = highest([Severity(row.severity), severity])
        told = Severity(row.notified_severity) if row.notified_severity else None
        change: dict[str, Any] = {"id": row.id, "severity": kept.value, "summary": finding.summary, "owner": owner,
                                  "tags": tags, "details": details, "last_seen": now, "suppression_id": suppression_id,
                                  "notified_severity": row.notified_severity,
                                  "last_notified_at": row.last_notified_at}
        kind = None
        if suppression_id:
            change["state"] = "suppressed"
        elif told is None:
            kind = "opened"  # never told: new after a suppression window, or recorded while suppressed
            change["state"] = "open"
        elif kept.rank() > told.rank() and (row.acknowledged_at is None or kept == Severity.PAGE):
            kind = "escalated"
            change["state"] = "escalated"
        else:
            escalated = kept.rank() > told.rank() or row.state == "escalated"
            change["state"] = "escalated" if escalated else "open"
        if kind is not None:
            change["notified_severity"], change["last_notified_at"] = kept.value, now
            transitions.append(Transition(row.id, kind, kept, obj, Condition(condition), finding.summary, owner, tags,
                                          details, row.first_seen, now, told if kind == "escalated" else None))
        updates.append(change)

    for (obj, condition), row in existing.items():
        if (obj, condition) in merged or not scope.covers(obj, condition):
            continue
        updates.append({"id": row.id, "severity": row.severity, "summary": row.summary, "owner": row.owner,
                        "tags": row.tags, "details": row.details, "last_seen": row.last_seen,
                        "suppression_id": row.suppression_id, "notified_severity": row.notified_severity,
                        "last_notified_at": row.last_notified_at, "state": "resolved", "resolved_at": now})
        if row.notified_severity and row.state != "suppressed":
            updates[-1]["last_notified_at"] = now
            transitions.append(Transition(row.id, "resolved", Severity(row.severity), obj, Condition(condition),
                                          row.summary, row.owner, row.tags, row.details, row.first_seen, now))

    if updates:
        _update(session, updates)
    if inserts:
        session.connection().execute(sa.insert(table), inserts)
        # Their ids: read back by (object, condition), unique while unresolved (one statement per chunk;
        # an executemany with RETURNING runs row by row on SQLite).
        opened = [values for values in inserts if values["state"] == "open"]
        found = _unresolved(session, {v["condition"] for v in opened}, {v["object"] for v in opened}) if opened else []
        ids = {(row.object, row.condition): row.id for row in found}
        for values in opened:
            transitions.append(Transition(
                ids[values["object"], values["condition"]], "opened", Severity(values["severity"]), values["object"],
                Condition(values["condition"]), values["summary"], values["owner"], values["tags"], values["details"],
                now, now))
    suppressed = sum(1 for values in inserts if values["state"] == "suppressed") + sum(
        1 for change in updates if change["state"] == "suppressed")
    return Observation(transitions, suppressed)


def _update(session: Session, updates: list[dict[str, Any]]) -> None:
    """Executemany UPDATE by id, grouped by the set of columns each change carries."""
    table = Alert.__table__  # type: ignore[attr-defined]
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for change in updates:
        groups.setdefault(tuple(sorted(change)), []).append(change)
    for columns, rows in groups.items():
        statement = sa.update(table).where(table.c.id == sa.bindparam("b_id")).values(
            {name: sa.bindparam(f"b_{name}") for name in columns if name != "id"})
        session.connection().execute(statement, [{f"b_{k}": v for k, v in r.items()} for r in rows])


# ------------------------------------------------------------------------------ reading and acting

@dataclass(frozen=True)
class AlertView:
    """An alert as shown to people and scripts."""

    id: int
    object: str
    condition: str
    severity: str
    state: str
    summary: str
    owner: str | None
    tags: Mapping[str, str]
    details: Mapping[str, Any]
    first_seen: dt.datetime
    last_seen: dt.datetime
    resolved_at: dt.datetime | None
    notified_severity: str | None
    notifications_sent: int
    last_notified_at: dt.datetime | None
    acknowledged_by: str | None
    acknowledged_at: dt.datetime | None
    suppression_id: int | None

    @classmethod
    def of(cls, row: Any) -> AlertView:
        return cls(**{name: getattr(row, name) for name in cls.__dataclass_fields__})

    def as_json(self) -> dict[str, Any]:
        return {name: (_iso(value) if isinstance(value, dt.datetime) else value)
                for name, value in ((n, getattr(self, n)) for n in self.__dataclass_fields__)}


def _iso(value: dt.datetime) -> str:
    return value.astimezone(dt.timezone.utc).isoformat().replace("+00:00", "Z")


STATES = ("open", "escalated", "suppressed", "resolved")


def list_alerts(session: Session, states: Iterable[str] = ("open", "escalated", "suppressed"),
                owner: str | None = None, limit: int | None = None) -> list[AlertView]:
    """Alerts in ``states``, most urgent first, then the most recently seen."""
    table = Alert.__table__  # type: ignore[attr-defined]
    wanted = list(states)
    unknown = [s for s in wanted if s not in STATES]
    if unknown:
        raise InvalidOptionError("--state", unknown[0], "one of " + ", ".join(STATES))
    rank = sa.case({s.value: s.rank() for s in Severity}, value=table.c.severity, else_=-1)
    query = sa.select(table).where(table.c.state.in_(wanted)).order_by(rank.desc(), table.c.last_seen.desc(),
                                                                       table.c.id)
    if owner is not None:
        query = query.where(table.c.owner == owner)
    if limit is not None:
        query = query.limit(limit)
    return [AlertView.of(row) for row in session.execute(query).all()]


def get_alert(session: Session, alert_id: int) -> AlertView:
    table = Alert.__table__  # type: ignore[attr-defined]
    row = session.execute(sa.select(table).where(table.c.id == alert_id)).first()
    if row is None:
        raise NotFoundError(f"no alert with id {alert_id}")
    return AlertView.of(row)


def acknowledge(session: Session, alert_id: int, who: str, now: dt.datetime) -> AlertView:
    """Record that ``who`` took alert ``alert_id``: it is told about again only if it escalates to
    PAGE, and when it resolves. Audited. Acknowledging it again changes nothing."""
    alert = session.get(Alert, alert_id)
    if alert is None:
        raise NotFoundError(f"no alert with id {alert_id}")
    if alert.state == "resolved":
        raise PermanentError(f"alert {alert_id} ({alert.condition} on {alert.object}) is already resolved")
    if alert.acknowledged_at is None:
        alert.acknowledged_by, alert.acknowledged_at = who, now
        session.add(alert)
        audit.append(session, audit.Actor(who), [audit.Change("alert.acknowledged", f"alert:{alert_id}", {
            "object": alert.object, "condition": alert.condition, "severity": alert.severity})], now)
        session.flush()
    return get_alert(session, alert_id)


# ------------------------------------------------------------------------------------ suppressions

@dataclass(frozen=True)
class SuppressionView:
    id: int
    scope: str
    starts_at: dt.datetime
    ends_at: dt.datetime
    reason: str
    created_by: str
    created_at: dt.datetime
    ended_at: dt.datetime | None

    def state(self, now: dt.datetime) -> str:
        if self.ended_at is not None:
            return "ended"
        if now < self.starts_at:
            return "scheduled"
        return "active" if now < self.ends_at else "expired"

    def as_json(self, now: dt.datetime) -> dict[str, Any]:
        values: dict[str, Any] = {n: getattr(self, n) for n in self.__dataclass_fields__}
        return {**{k: (_iso(v) if isinstance(v, dt.datetime) else v) for k, v in values.items()},
                "state": self.state(now)}

    @classmethod
    def of(cls, row: Any) -> SuppressionView:
        return cls(**{name: getattr(row, name) for name in cls.__dataclass_fields__})


def add_suppression(session: Session, scope: str, starts_at: dt.datetime, ends_at: dt.datetime, reason: str,
                    who: str, now: dt.datetime) -> SuppressionView:
    """A new suppression window; the scope is checked, the window must end after it starts and in the
    future, and a reason is required. Audited."""
    parse_scope(scope)
    if starts_at.tzinfo is None or ends_at.tzinfo is None:
        raise ValueError("suppression windows need aware UTC datetimes")
    if ends_at <= now:
        raise InvalidOptionError("--until", _iso(ends_at), "in the future")
    if ends_at <= starts_at:
        raise InvalidOptionError("--until", _iso(ends_at), f"after the window's start ({_iso(starts_at)})")
    if not reason.strip():
        raise InvalidOptionError("--reason", reason, "a non-empty reason")
    row = Suppression(scope=scope.strip(), starts_at=starts_at, ends_at=ends_at, reason=reason.strip(),
                      created_by=who, created_at=now)
    session.add(row)
    session.flush()
    audit.append(session, audit.Actor(who), [audit.Change("suppression.added", f"suppression:{row.id}", {
        "scope": row.scope, "starts_at": _iso(starts_at), "ends_at": _iso(ends_at), "reason": row.reason})], now)
    return SuppressionView.of(row)


def end_suppression(session: Session, suppression_id: int, who: str, now: dt.datetime) -> SuppressionView:
    """End a suppression now; alerts it held notify on their next observation. Audited."""
    row = session.get(Suppression, suppression_id)
    if row is None:
        raise NotFoundError(f"no suppression with id {suppression_id}")
    if row.ended_at is None and row.ends_at > now:
        row.ended_at = now
        session.add(row)
        session.flush()
        audit.append(session, audit.Actor(who), [audit.Change("suppression.ended", f"suppression:{row.id}", {
            "scope": row.scope})], now)
    return SuppressionView.of(row)


def list_suppressions(session: Session, now: dt.datetime, include_past: bool = False) -> list[SuppressionView]:
    """Suppressions active or scheduled at ``now`` (and, with ``include_past``, expired and ended ones)."""
    table = Suppression.__table__  # type: ignore[attr-defined]
    query = sa.select(table).order_by(table.c.starts_at, table.c.id)
    if not include_past:
        query = query.where(table.c.ended_at.is_(None), table.c.ends_at > now)
    return [SuppressionView.of(row) for row in session.execute(query).all()]


# ----------------------------------------------------------------------------------------- messages

def days_left(details: Mapping[str, Any], now: dt.datetime) -> float | None:
    """Days until ``details['not_after']`` (or ``details['days_left']`` as given), else None."""
    if details.get("days_left") is not None:
        return float(details["days_left"])
    not_after = details.get("not_after")
    if not not_after:
        return None
    try:
        when = dt.datetime.fromisoformat(str(not_after).replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return round((when - now).total_seconds() / 86400, 1)


@dataclass(frozen=True)
class Message:
    subject: str
    body: str


def render(transition: Transition, run_url: str | None = None) -> Message:
    """The subject and plain-text body that tell someone about ``transition``; ``run_url``: the
    Prefect UI page of the run that found it, unless its details name one."""
    details = transition.details
    name = details.get("certificate") or transition.object
    verb = {"opened": "", "escalated": "escalated: ", "resolved": "resolved: "}.get(transition.kind, "")
    subject = f"[certpilot {transition.severity.value.upper()}] {verb}{transition.condition.value} {name}"
    lines = [transition.summary, "",
             f"certificate: {name}",
             f"object: {transition.object}",
             f"condition: {transition.condition.value}",
             f"severity: {transition.severity.value}"
             + (f" (was {transition.previous_severity.value})" if transition.previous_severity else ""),
             f"state: {transition.kind}"]
    left = days_left(details, transition.at)
    if left is not None:
        lines.append(f"days left: {left:g}")
    if details.get("not_after"):
        lines.append(f"expires: {details['not_after']}")
    if details.get("fingerprint"):
        lines.append(f"fingerprint: {details['fingerprint']}")
    served = details.get("served_at")
    if served:
        places = served if isinstance(served, (list, tuple)) else [served]
        lines.append("served at: " + ", ".join(str(p) for p in list(places)[:20])
                     + (f" (+{len(places) - 20} more)" if len(places) > 20 else ""))
    lines.append(f"owner: {transition.owner or '(none)'}")
    if transition.tags:
        lines.append("tags: " + ", ".join(f"{k}={v}" for k, v in sorted(transition.tags.items())))
    lines.append(f"first seen: {_iso(transition.first_seen)}")
    if transition.kind != "resolved":
        lines.append("what to do: " + str(details.get("action") or ACTIONS.get(transition.condition, "investigate")))
    if details.get("run_url") or run_url:
        lines.append(f"Prefect run: {details.get('run_url') or run_url}")
    lines.append(f"alert id: {transition.alert_id} (certpilot alerts ack {transition.alert_id})")
    return Message(subject, "\n".join(lines))


def render_digest(owner: str | None, items: Sequence[AlertView], now: dt.datetime) -> Message:
    """The daily digest of ticket-level alerts for ``owner``: one line each, the soonest to expire first."""
    def soonest(item: AlertView) -> tuple[float, int]:
        left = days_left(item.details, now)
        return (left if left is not None else float("inf"), item.id)

    who = owner or "(no owner)"
    subject = f"[certpilot] daily digest for {who}: {len(items)} ticket-level alert(s)"
    lines = [f"Ticket-level alerts open for {who} on {now.date().isoformat()} (fix in working hours):", ""]
    for item in sorted(items, key=soonest):
        left = days_left(item.details, now)
        name = item.details.get("certificate") or item.object
        parts = [f"- [{item.condition}] {name}: {item.summary}"]
        if left is not None:
            parts.append(f"{left:g} days left")
        served = item.details.get("served_at")
        if served:
            places = served if isinstance(served, (list, tuple)) else [served]
            parts.append("served at " + ", ".join(str(p) for p in list(places)[:3])
                         + (f" (+{len(places) - 3})" if len(places) > 3 else ""))
        if item.acknowledged_by:
            parts.append(f"acknowledged by {item.acknowledged_by}")
        parts.append(f"alert {item.id}, since {_iso(item.first_seen)}")
        lines.append("; ".join(parts))
        action = item.details.get("action") or ACTIONS.get(Condition(item.condition))
        if action:
            lines.append(f"  what to do: {action}")
    listing = "certpilot alerts list" + (f" --owner {owner}" if owner else "")
    lines += ["", f"List them: {listing}; acknowledge one: certpilot alerts ack ID"]
    return Message(subject, "\n".join(lines))
