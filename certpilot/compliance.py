"""The compliance report: per owner, how the certificates stand against the policy and how they are renewed.

``compliance_report(session, now, window)`` gives, for each owner (and ``(no owner)`` for certificates
that have none):

- certificates: the active leaf certificates (the certificate's owner, else its managed certificate's);
  how many are managed, and how many are compliant (no stored violation that is not waived);
- violations by rule: the stored violations of those certificates (certpilot.violations, certificate
  and endpoint rules), open (not waived) and waived, per rule;
- waivers: those not revoked that are active or expired within the window, that either waive one of
  the owner's violations or whose scope names the owner (``owner=<owner>``), each with its expiry;
- M7, the share of the window's renewals made automatically (by a Prefect flow run), and M2, the
  renewal success rate over the window, from the audit trail exactly as certpilot.sli defines them
  (``sli.renewal_slis_by``), each managed certificate's renewals counted for its owner.

Owners are listed by name, ``(no owner)`` last. An owner appears when it has a certificate, a managed
certificate, a renewal in the window or a waiver naming it.

``ComplianceReport.to_csv()`` is what a spreadsheet user expects: one row per owner, fixed columns,
numbers as numbers (a percentage with nothing to measure is an empty cell, never "no data"): owner,
certificates, managed, compliant, compliant_percent, open_violations, waived_violations, one
``open:<rule>`` and one ``waived:<rule>`` column per policy rule (certpilot.policy.RULES, in its order:
the same columns every time, so a sheet or a pivot built on them keeps working), active_waivers,
expired_waivers, next_waiver_expiry, automated_percent (M7), automated_renewals, issued_renewals,
renewal_success_percent (M2), renewals_succeeded, renewals_failed. The waivers themselves (one per line)
are in ``as_dict`` and the markdown. ``compliance_markdown`` renders the ``compliance`` artifact.
Pure over the session: no Prefect, no network.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col

from certpilot import sli
from certpilot import violations as violation_store
from certpilot.errors import CertpilotError, InvalidOptionError
from certpilot.inventory import iso
from certpilot.models import Certificate, ManagedCertificate, PolicyWaiver
from certpilot.policy import RULES, Violation, parse_waiver_scope
from certpilot.views import markdown_table

__all__ = ["CSV_COLUMNS", "DEFAULT_WINDOW", "NO_OWNER", "ComplianceReport", "OwnerCompliance", "RuleCount",
           "WaiverView", "compliance_markdown", "compliance_report"]

NO_OWNER = "(no owner)"
DEFAULT_WINDOW = dt.timedelta(days=30)
_CHUNK = 500

CSV_COLUMNS: tuple[str, ...] = (
    "owner", "certificates", "managed", "compliant", "compliant_percent", "open_violations", "waived_violations",
    *(f"open:{rule}" for rule in RULES), *(f"waived:{rule}" for rule in RULES),
    "active_waivers", "expired_waivers", "next_waiver_expiry", "automated_percent", "automated_renewals",
    "issued_renewals", "renewal_success_percent", "renewals_succeeded", "renewals_failed")


@dataclass(frozen=True)
class RuleCount:
    rule: str
    open: int
    waived: int

    def as_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "open": self.open, "waived": self.waived}


@dataclass(frozen=True)
class WaiverView:
    """A waiver as the report shows it."""

    id: int
    rule: str
    scope: str
    reason: str
    approver: str
    expires_at: dt.datetime
    expired: bool
    days_left: float  # negative once expired
    waived: int  # how many stored violations it waives (of the owner's, in an owner's list)

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "rule": self.rule, "scope": self.scope, "reason": self.reason,
                "approver": self.approver, "expires_at": iso(self.expires_at), "expired": self.expired,
                "days_left": round(self.days_left, 1), "waived": self.waived}


@dataclass(frozen=True)
class OwnerCompliance:
    owner: str  # NO_OWNER for none
    certificates: int
    managed: int
    compliant: int  # certificates with no open violation
    rules: tuple[RuleCount, ...]  # rules with a violation, in certpilot.policy.RULES order
    waivers: tuple[WaiverView, ...]  # soonest to expire first
    automated: sli.Sli  # M7 over the window
    renewals: sli.Sli  # M2 over the window

    @property
    def open_violations(self) -> int:
        return sum(r.open for r in self.rules)

    @property
    def waived_violations(self) -> int:
        return sum(r.waived for r in self.rules)

    @property
    def compliant_percent(self) -> float | None:
        return 100.0 * self.compliant / self.certificates if self.certificates else None

    def rule(self, rule: str) -> RuleCount:
        return next((r for r in self.rules if r.rule == rule), RuleCount(rule, 0, 0))

    def as_dict(self) -> dict[str, Any]:
        return {"owner": self.owner, "certificates": self.certificates, "managed": self.managed,
                "compliant": self.compliant, "compliant_percent": self.compliant_percent,
                "open_violations": self.open_violations, "waived_violations": self.waived_violations,
                "violations": [r.as_dict() for r in self.rules], "waivers": [w.as_dict() for w in self.waivers],
                "automated_renewals": self.automated.as_dict(), "renewal_success": self.renewals.as_dict()}

    def csv_row(self) -> dict[str, Any]:
        active = [w for w in self.waivers if not w.expired]
        return {"owner": self.owner, "certificates": self.certificates, "managed": self.managed,
                "compliant": self.compliant, "compliant_percent": _number(self.compliant_percent),
                "open_violations": self.open_violations, "waived_violations": self.waived_violations,
                **{f"open:{rule}": self.rule(rule).open for rule in RULES},
                **{f"waived:{rule}": self.rule(rule).waived for rule in RULES},
                "active_waivers": len(active), "expired_waivers": len(self.waivers) - len(active),
                "next_waiver_expiry": iso(min(w.expires_at for w in active)) if active else "",
                "automated_percent": _number(self.automated.value),
                "automated_renewals": self.automated.numerator or 0, "issued_renewals": self.automated.denominator or 0,
                "renewal_success_percent": _number(self.renewals.value),
                "renewals_succeeded": self.renewals.numerator or 0,
                "renewals_failed": self.renewals.detail("failed") or 0}


def _number(value: float | None) -> str | float:
    return "" if value is None else round(value, 1)


@dataclass(frozen=True)
class ComplianceReport:
    generated_at: dt.datetime
    start: dt.datetime  # of the window M2 and M7 are measured over (and expired waivers are kept for)
    owners: tuple[OwnerCompliance, ...]
    waivers: tuple[WaiverView, ...]  # every waiver in the report, soonest to expire first

    @property
    def window(self) -> dt.timedelta:
        return self.generated_at - self.start

    def owner(self, name: str | None) -> OwnerCompliance:
        wanted = name or NO_OWNER
        for o in self.owners:
            if o.owner == wanted:
                return o
        raise KeyError(f"no owner {wanted!r} in the compliance report")

    def as_dict(self) -> dict[str, Any]:
        return {"generated_at": iso(self.generated_at), "start": iso(self.start),
                "window_seconds": self.window.total_seconds(), "owners": [o.as_dict() for o in self.owners],
                "waivers": [w.as_dict() for w in self.waivers]}

    def to_csv(self) -> str:
        """One row per owner, the columns of CSV_COLUMNS (see the module docstring)."""
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for o in self.owners:
            writer.writerow(o.csv_row())
        return buffer.getvalue()


def _chunks(items: Sequence[str]) -> Iterable[Sequence[str]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start:start + _CHUNK]


def _owner_terms(scope: str) -> set[str]:
    """The owners a waiver scope names (``owner=<owner>`` terms); none for a scope that does not parse."""
    try:
        return {t.value for t in parse_waiver_scope(scope) if t.key == "owner"}
    except CertpilotError:
        return set()


def _waiver_view(w: PolicyWaiver, now: dt.datetime, waived: Mapping[int, int]) -> WaiverView:
    """``waived``: how many violations each waiver waives (of those counted)."""
    assert w.id is not None
    return WaiverView(w.id, w.rule, w.scope, w.reason, w.approver, w.expires_at, w.expires_at <= now,
                      (w.expires_at - now).total_seconds() / 86400, waived.get(w.id, 0))


def compliance_report(session: Session, now: dt.datetime, window: dt.timedelta = DEFAULT_WINDOW) -> ComplianceReport:
    """Per owner: certificates, violations by rule, waivers, M7 and M2 over ``[now - window, now]``."""
    if window <= dt.timedelta(0):
        raise InvalidOptionError("window", window, "a positive duration, e.g. 30d")
    start = now - window
    c, m = Certificate, ManagedCertificate
    rows = session.execute(
        sa.select(col(c.fingerprint_sha256), col(c.owner), col(m.owner).label("managed_owner"),
                  col(c.managed_certificate_id))
        .outerjoin(m, col(m.id) == col(c.managed_certificate_id))
        .where(col(c.status) == "active", col(c.is_ca).is_(False))).all()
    owner_of = {r.fingerprint_sha256: r.owner or r.managed_owner or NO_OWNER for r in rows}
    certificates: dict[str, list[str]] = {}
    managed_count: dict[str, int] = {}
    for r in rows:
        owner = owner_of[r.fingerprint_sha256]
        certificates.setdefault(owner, []).append(r.fingerprint_sha256)
        managed_count[owner] = managed_count.get(owner, 0) + (r.managed_certificate_id is not None)
    stored: dict[str, list[Violation]] = violation_store.stored_violations(session, list(owner_of), include_waived=True)

    managed_owner = {name: owner or NO_OWNER for name, owner in session.execute(sa.select(col(m.name), col(m.owner)))}
    listed = [w for w in violation_store.list_waivers(session, include_inactive=True, now=now)
              if w.revoked_at is None and w.expires_at > start]
    waiver_owners = {w.id: _owner_terms(w.scope) for w in listed}

    owners = set(certificates) | set(managed_owner.values())
    owners |= {owner for named in waiver_owners.values() for owner in named}
    renewal = sli.renewal_slis_by(session, start, now, lambda name: managed_owner.get(name, NO_OWNER), owners)
    owners |= set(renewal)

    by_id = {w.id: w for w in listed}
    waived_total: dict[int, int] = {}
    result = []
    for owner in sorted(owners, key=lambda o: (o == NO_OWNER, o)):
        fps = certificates.get(owner, [])
        open_by_rule: dict[str, int] = {}
        waived_by_rule: dict[str, int] = {}
        waived_here: dict[int, int] = {}
        compliant = 0
        for fp in fps:
            found = stored.get(fp, [])
            if not any(v.waiver_id is None for v in found):
                compliant += 1
            for v in found:
                if v.waiver_id is None:
                    open_by_rule[v.rule] = open_by_rule.get(v.rule, 0) + 1
                else:
                    waived_by_rule[v.rule] = waived_by_rule.get(v.rule, 0) + 1
                    waived_here[v.waiver_id] = waived_here.get(v.waiver_id, 0) + 1
                    waived_total[v.waiver_id] = waived_total.get(v.waiver_id, 0) + 1
        order = {rule: i for i, rule in enumerate(RULES)}
        rules = tuple(RuleCount(rule, open_by_rule.get(rule, 0), waived_by_rule.get(rule, 0))
                      for rule in sorted(set(open_by_rule) | set(waived_by_rule), key=lambda r: (order.get(r, len(RULES)), r)))
        mine = {wid for wid, named in waiver_owners.items() if owner in named} | {
            wid for wid in waived_here if wid in by_id}
        waivers = tuple(sorted((_waiver_view(by_id[wid], now, waived_here) for wid in mine),
                               key=lambda w: (w.expires_at, w.id)))
        m2, m7 = renewal[owner]
        result.append(OwnerCompliance(owner, len(fps), managed_count.get(owner, 0), compliant, rules, waivers, m7, m2))
    everything = tuple(sorted((_waiver_view(w, now, waived_total) for w in listed),
                              key=lambda w: (w.expires_at, w.id)))
    return ComplianceReport(now, start, tuple(result), everything)


def compliance_markdown(report: ComplianceReport) -> str:
    """The ``compliance`` artifact: one row per owner, then the waivers. Every value is escaped."""
    days = report.window.total_seconds() / 86400
    lines = [f"# Compliance per owner, {report.generated_at:%Y-%m-%d %H:%M} UTC", "",
             f"Violations as the policy's last evaluation stored them; renewals over the last {days:g} days "
             "(M7 automated share, M2 success rate, from the audit trail).", ""]
    lines += markdown_table(
        ("owner", "certificates", "managed", "compliant", "open violations", "waived", "waivers (expiry)",
         "automated (M7)", "renewal success (M2)"),
        [(o.owner, o.certificates, o.managed,
          f"{o.compliant} ({o.compliant_percent:.0f} %)" if o.compliant_percent is not None else "0",
          ", ".join(f"{r.rule}: {r.open}" for r in o.rules if r.open) or "none",
          ", ".join(f"{r.rule}: {r.waived}" for r in o.rules if r.waived) or "none",
          ", ".join(f"#{w.id} {w.rule} {'expired' if w.expired else 'until'} {w.expires_at:%Y-%m-%d}"
                    for w in o.waivers) or "none",
          _shown(o.automated), _shown(o.renewals)) for o in report.owners])
    lines += ["", f"## Waivers ({len(report.waivers)})", ""]
    if report.waivers:
        lines += markdown_table(("id", "rule", "scope", "approver", "reason", "expires", "waives"),
                                [(w.id, w.rule, w.scope, w.approver, w.reason,
                                  f"{w.expires_at:%Y-%m-%d %H:%M} UTC{' (expired)' if w.expired else ''}", w.waived)
                                 for w in report.waivers])
    else:
        lines.append("No waiver active or expired in the window.")
    return "\n".join(lines)


def _shown(value: sli.Sli) -> str:
    return f"{value.shown} ({value.ratio})" if value.ratio else value.shown
