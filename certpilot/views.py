"""The operators' views, as records and as markdown: the SLIs, an executive view and an on-call view.

``executive_view`` is the fleet at a glance: how many certificates, how many served valid (M1), how
renewals went (M2), the incidents (M9) and open alerts, and the trends of the window (renewals and
incidents per day, certificates expiring per week ahead), which ``certpilot.charts`` draws.
``on_call_view`` is what needs someone now: what expires within 72, 24 and 6 hours, failing renewals,
recent revocations, deployments in progress (targets whose desired fingerprint is not the one last
verified there) and the open PAGE and CRITICAL alerts.

The ``*_markdown`` functions render them for a Prefect markdown artifact. Everything shown is a public
fact (names, fingerprints, times, redacted errors); every value from the inventory is escaped, so a
certificate name or an error message is shown as text, never as markdown or HTML. No Prefect, no network.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from sqlmodel import Session, col

from certpilot.inventory import CertificateQuery, iso, list_certificates
from certpilot.models import Alert, AuditEvent, Certificate, Location, ManagedCertificate, Target
from certpilot.sli import INCIDENT_SEVERITIES, SEVERITIES, SliReport, shown_seconds

__all__ = ["DayCount", "Deployment", "ExecutiveView", "ExpiringCertificate", "FailingRenewal", "OnCallView",
           "OpenAlert", "Revocation", "escape", "executive_markdown", "executive_view", "markdown_table",
           "on_call_markdown", "on_call_view", "png_data_uri", "sli_markdown"]

EXPIRY_HORIZONS = (6, 24, 72)  # hours: the on-call view's bands
WEEKS_AHEAD = 12  # the expiry trend: certificates expiring in each of the next 12 weeks
LISTED = 50  # at most this many rows in each table of the on-call view


# ------------------------------------------------------------------------------------ escaping

_MARKDOWN = re.compile(r"([\\`*_\[\]|~])")  # what could start markup inside a table cell


def escape(value: object) -> str:
    """``value`` as inline text in markdown: HTML and markdown characters escaped, one line."""
    text = " ".join(str(value).split())
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _MARKDOWN.sub(r"\\\1", text)


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    """A markdown table's lines: ``header`` as given, every cell of ``rows`` escaped."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(escape(cell) for cell in row) + " |" for row in rows]
    return lines


def _when(value: dt.datetime | None) -> str:
    return value.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC") if value is not None else ""


# ------------------------------------------------------------------------------------ the SLIs

def sli_markdown(report: SliReport) -> str:
    """The ``sli`` artifact: M1 to M10 over the window, each with its ratio, details and definition."""
    lines = [f"# Service level indicators, {shown_seconds(report.window.total_seconds())} window",
             "", f"From {_when(report.start)} to {_when(report.end)}.", ""]
    rows = []
    for s in report.slis:
        rows.append((s.key, s.name, s.shown, s.ratio, s.shown_details))
    lines += markdown_table(("SLI", "what", "value", "of", "details"), rows)
    lines += ["", "## Definitions", ""]
    lines += [f"- **{s.key}** {escape(s.definition)}" for s in report.slis]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ executive view

@dataclass(frozen=True)
class DayCount:
    """One bin of the window's trend: renewals that succeeded and failed, incidents opened."""

    start: dt.datetime
    renewed: int
    failed: int
    incidents: int


@dataclass(frozen=True)
class ExecutiveView:
    generated_at: dt.datetime
    certificates: int  # leaf certificates in service (active, not expired)
    managed: int  # managed certificates (not retired)
    places: int  # where certificates are seen (locations that are not ghosts)
    targets: int
    slis: SliReport
    open_alerts: tuple[tuple[str, int], ...]  # (severity, count) of unresolved alerts
    trend: tuple[DayCount, ...]
    trend_bin: dt.timedelta
    expiring_weeks: tuple[tuple[dt.datetime, int], ...]  # (week start, leaf certificates expiring in it)


def executive_view(session: Session, slis: SliReport) -> ExecutiveView:
    """The fleet at ``slis.end``, with the SLIs and the trends of their window."""
    now, start = slis.end, slis.start
    k = Certificate
    certificates = session.execute(sa.select(sa.func.count()).select_from(k).where(
        col(k.status) == "active", col(k.is_ca).is_(False), col(k.not_after) >= now)).scalar_one()
    managed = session.execute(sa.select(sa.func.count()).select_from(ManagedCertificate)
                              .where(col(ManagedCertificate.status) != "retired")).scalar_one()
    places = session.execute(sa.select(sa.func.count()).select_from(Location)
                             .where(col(Location.ghost).is_(False))).scalar_one()
    targets = session.execute(sa.select(sa.func.count()).select_from(Target)).scalar_one()
    open_counts = {str(severity): int(n) for severity, n in session.execute(
        sa.select(col(Alert.severity), sa.func.count()).where(col(Alert.state) != "resolved")
        .group_by(col(Alert.severity))).all()}
    open_alerts = tuple((s, int(open_counts.get(s, 0))) for s in SEVERITIES)
    step = dt.timedelta(days=1) if slis.window <= dt.timedelta(days=62) else dt.timedelta(days=7)
    ahead = [now + dt.timedelta(weeks=w) for w in range(WEEKS_AHEAD + 1)]
    expiring = session.execute(sa.select(col(k.not_after)).where(
        col(k.status) == "active", col(k.is_ca).is_(False), col(k.not_after) >= now,
        col(k.not_after) < ahead[-1])).scalars().all()
    weeks = tuple((ahead[w], sum(1 for t in expiring if ahead[w] <= t < ahead[w + 1])) for w in range(WEEKS_AHEAD))
    return ExecutiveView(now, int(certificates), int(managed), int(places), int(targets), slis, open_alerts,
                         _trend(session, start, now, step), step, weeks)


def _trend(session: Session, start: dt.datetime, end: dt.datetime, step: dt.timedelta) -> tuple[DayCount, ...]:
    """Counts per UTC calendar day (or week) from the day ``start`` falls in to the day of ``end``
    (today, partly); only what happened in ``[start, end]`` is counted."""
    first = start.astimezone(dt.timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    bins = max(1, int((end - first) // step) + 1)

    def index(at: dt.datetime) -> int | None:
        i = int((at - first) // step)
        return i if 0 <= i < bins and at >= start else None

    renewed, failed, incidents = [0] * bins, [0] * bins, [0] * bins
    e = AuditEvent
    for action, at, details in session.execute(
            sa.select(col(e.action), col(e.at), col(e.details)).where(
                col(e.action).in_(("certificate.issued", "renewal.failed")), col(e.at) >= start, col(e.at) <= end)):
        i = index(at)
        if i is None:
            continue
        if action == "renewal.failed":
            failed[i] += 1
        elif json.loads(details).get("managed"):
            renewed[i] += 1
    for (at,) in session.execute(sa.select(col(Alert.first_seen)).where(
            col(Alert.first_seen) >= start, col(Alert.first_seen) <= end)):
        i = index(at)
        if i is not None:
            incidents[i] += 1
    return tuple(DayCount(first + i * step, renewed[i], failed[i], incidents[i]) for i in range(bins))


def executive_markdown(view: ExecutiveView, chart_png: bytes | None = None) -> str:
    """The ``executive-view`` artifact; ``chart_png`` (certpilot.charts.trend_png) is shown inline."""
    s = view.slis
    m1, m2, m3, m9 = s.get("M1"), s.get("M2"), s.get("M3"), s.get("M9")
    lines = [f"# Certificates: executive view, {_when(view.generated_at)}", "",
             f"Window: the last {shown_seconds(s.window.total_seconds())}.", ""]
    lines += markdown_table(("", "now"), [
        ("certificates in service", view.certificates),
        ("managed certificates", view.managed),
        ("places certificates are seen", view.places),
        ("deployment targets", view.targets),
        ("served certificates valid (M1)", f"{m1.shown} ({m1.ratio})" if m1.value is not None else m1.shown),
        ("renewal success (M2)", f"{m2.shown} ({m2.ratio})" if m2.value is not None else m2.shown),
        ("time to repair an incident (M3, median)", m3.shown),
        ("incidents opened (M9)", ", ".join(f"{k}: {v}" for k, v in m9.details) + f" (total {m9.shown})"),
        ("open alerts", ", ".join(f"{k}: {v}" for k, v in view.open_alerts)),
    ])
    lines += ["", "## Trend", ""]
    if chart_png is not None:
        lines += [f"![Renewals and incidents per {'day' if view.trend_bin.days == 1 else 'week'}, and certificates "
                  f"expiring per week ahead]({png_data_uri(chart_png)})", ""]
    unit = "day" if view.trend_bin.days == 1 else "week from"
    lines += markdown_table((unit, "renewed", "failed", "incidents"),
                    [(d.start.strftime("%Y-%m-%d"), d.renewed, d.failed, d.incidents) for d in view.trend
                     if d.renewed or d.failed or d.incidents] or [("(none in the window)", 0, 0, 0)])
    lines += ["", "## Expiring ahead", ""]
    lines += markdown_table(("week from", "certificates expiring"),
                    [(start.strftime("%Y-%m-%d"), n) for start, n in view.expiring_weeks])
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ on-call view

@dataclass(frozen=True)
class ExpiringCertificate:
    name: str
    fingerprint: str
    not_after: dt.datetime
    hours_left: float
    owner: str | None
    managed: bool
    places: int


@dataclass(frozen=True)
class FailingRenewal:
    name: str
    owner: str | None
    last_attempt_at: dt.datetime | None
    error: str
    current_not_after: dt.datetime | None


@dataclass(frozen=True)
class Revocation:
    at: dt.datetime
    certificate: str  # certificate:<fingerprint>
    ca: str | None
    serial: str | None
    reason: str | None
    actor: str


@dataclass(frozen=True)
class Deployment:
    managed: str
    target: str
    kind: str
    desired: str
    verified: str | None
    last_error: str | None
    updated_at: dt.datetime | None


@dataclass(frozen=True)
class OpenAlert:
    severity: str
    object: str
    condition: str
    summary: str
    owner: str | None
    first_seen: dt.datetime
    acknowledged_by: str | None


@dataclass(frozen=True)
class OnCallView:
    generated_at: dt.datetime
    expiring: tuple[tuple[int, int], ...]  # (hours, leaf certificates in service expiring within them)
    soonest: tuple[ExpiringCertificate, ...]  # those expiring within the longest horizon, soonest first
    failing_renewals: tuple[FailingRenewal, ...]
    revocations: tuple[Revocation, ...]
    revocations_since: dt.datetime
    deployments: tuple[Deployment, ...]
    alerts: tuple[OpenAlert, ...]  # open PAGE and CRITICAL alerts


def on_call_view(session: Session, now: dt.datetime, recent: dt.timedelta = dt.timedelta(days=7)) -> OnCallView:
    """What needs someone at ``now``; revocations of the last ``recent``."""
    horizon = max(EXPIRY_HORIZONS)
    rows = list_certificates(session, CertificateQuery(expiring_within=dt.timedelta(hours=horizon), is_ca=False), now)
    soonest = [ExpiringCertificate(_name(r), r["fingerprint_sha256"], _parse(r["not_after"]),
                                   (_parse(r["not_after"]) - now).total_seconds() / 3600, r["owner"], r["managed"],
                                   len(r["locations"])) for r in rows]
    expiring = tuple((h, sum(1 for c in soonest if c.hours_left <= h)) for h in EXPIRY_HORIZONS)
    return OnCallView(now, expiring, tuple(soonest[:LISTED]), _failing(session), _revocations(session, now - recent, now),
                      now - recent, _deployments(session), _alerts(session))


def _parse(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def _name(row: dict[str, object]) -> str:
    sans = [str(s) for s in row["sans"]] if isinstance(row["sans"], list) else []
    dns = next((s[4:] for s in sans if s.startswith("DNS:")), None)
    other = next((s.partition(":")[2] for s in sans), None)  # a SPIFFE ID, say: machine identities may have no CN
    return dns or (str(row["subject"]) if row["subject"] else other or "")


def _failing(session: Session) -> tuple[FailingRenewal, ...]:
    m, k = ManagedCertificate, Certificate
    rows = session.execute(sa.select(col(m.id), col(m.name), col(m.owner), col(m.last_attempt_at), col(m.last_error))
                           .where(col(m.last_error).is_not(None), col(m.status) != "retired")
                           .order_by(col(m.last_attempt_at).desc()).limit(LISTED)).all()
    current: dict[int, dt.datetime] = {int(managed_id): not_after for managed_id, not_after in session.execute(
        sa.select(col(k.managed_certificate_id), sa.func.max(col(k.not_after))).where(
            col(k.managed_certificate_id).in_([r.id for r in rows]), col(k.status) == "active")
        .group_by(col(k.managed_certificate_id))).all()} if rows else {}
    return tuple(FailingRenewal(r.name, r.owner, r.last_attempt_at, r.last_error or "", current.get(r.id))
                 for r in rows)


def _revocations(session: Session, since: dt.datetime, now: dt.datetime) -> tuple[Revocation, ...]:
    e = AuditEvent
    rows = session.execute(sa.select(col(e.at), col(e.object), col(e.actor), col(e.details)).where(
        col(e.action) == "certificate.revoked", col(e.at) >= since, col(e.at) <= now)
        .order_by(col(e.seq).desc()).limit(LISTED)).all()
    out = []
    for r in rows:
        details = json.loads(r.details)
        out.append(Revocation(r.at, r.object, details.get("ca"), details.get("serial"), details.get("reason"), r.actor))
    return tuple(out)


def _deployments(session: Session) -> tuple[Deployment, ...]:
    t, m = Target, ManagedCertificate
    rows = session.execute(
        sa.select(col(m.name), col(t.name).label("target"), col(t.kind), col(t.desired_fingerprint),
                  col(t.verified_fingerprint), col(t.last_error), col(t.updated_at))
        .join(m, col(m.id) == col(t.managed_certificate_id))
        .where(col(t.desired_fingerprint).is_not(None), sa.or_(
            col(t.verified_fingerprint).is_(None), col(t.verified_fingerprint) != col(t.desired_fingerprint)))
        .order_by(col(t.updated_at)).limit(LISTED)).all()
    return tuple(Deployment(r.name, r.target, r.kind, r.desired_fingerprint, r.verified_fingerprint, r.last_error,
                            r.updated_at) for r in rows)


def _alerts(session: Session) -> tuple[OpenAlert, ...]:
    a = Alert
    rows = session.execute(sa.select(col(a.severity), col(a.object), col(a.condition), col(a.summary), col(a.owner),
                                     col(a.first_seen), col(a.acknowledged_by))
                           .where(col(a.state).in_(("open", "escalated")), col(a.severity).in_(INCIDENT_SEVERITIES))
                           .order_by(col(a.first_seen)).limit(LISTED)).all()
    ranked = sorted(rows, key=lambda r: (INCIDENT_SEVERITIES.index(r.severity), r.first_seen))
    return tuple(OpenAlert(r.severity, r.object, r.condition, r.summary, r.owner, r.first_seen, r.acknowledged_by)
                 for r in ranked)


def _short(obj: str) -> str:
    """An alert's object with a fingerprint cut to 16 hex digits (``certificate:0123...``)."""
    kind, _, rest = obj.partition(":")
    return f"{kind}:{rest[:16]}" if kind == "certificate" and len(rest) == 64 else obj


def on_call_markdown(view: OnCallView) -> str:
    """The ``on-call`` artifact."""
    lines = [f"# Certificates: on call, {_when(view.generated_at)}", "",
             " · ".join(f"**{n}** expire within {h} h" for h, n in view.expiring), ""]
    lines += ["## Expiring within 72 hours", ""]
    lines += markdown_table(("hours left", "expires", "certificate", "fingerprint", "owner", "managed", "places"),
                    [(f"{c.hours_left:.1f}", _when(c.not_after), c.name, c.fingerprint[:16], c.owner or "",
                      "yes" if c.managed else "no", c.places) for c in view.soonest]) if view.soonest else ["None."]
    lines += ["", "## Open PAGE and CRITICAL alerts", ""]
    lines += markdown_table(("severity", "since", "what", "condition", "owner", "summary", "acknowledged by"),
                    [(a.severity, _when(a.first_seen), _short(a.object), a.condition, a.owner or "", a.summary,
                      a.acknowledged_by or "") for a in view.alerts]) if view.alerts else ["None."]
    lines += ["", "## Failing renewals", ""]
    lines += markdown_table(("managed certificate", "owner", "last attempt", "current expires", "error"),
                    [(f.name, f.owner or "", _when(f.last_attempt_at), _when(f.current_not_after) or "none",
                      f.error) for f in view.failing_renewals]) if view.failing_renewals else ["None."]
    lines += ["", f"## Revocations since {_when(view.revocations_since)}", ""]
    lines += markdown_table(("at", "certificate", "CA", "serial", "reason", "by"),
                    [(_when(r.at), r.certificate.removeprefix("certificate:")[:16], r.ca or "", r.serial or "",
                      r.reason or "", r.actor) for r in view.revocations]) if view.revocations else ["None."]
    lines += ["", "## Deployments in progress (desired is not what was last verified)", ""]
    lines += markdown_table(("managed certificate", "target", "kind", "desired", "verified", "since", "last error"),
                    [(d.managed, d.target, d.kind, d.desired[:16], (d.verified or "never")[:16], _when(d.updated_at),
                      d.last_error or "") for d in view.deployments]) if view.deployments else ["None."]
    return "\n".join(lines)

