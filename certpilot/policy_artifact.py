"""The ``policy`` artifact of a discovery run: the inventory's policy violations by rule, and its worst
certificates (the most severe violation first, then the most violations), each with its rules.

Only violations not waived count; everything shown from the inventory (names, owners, details) is
escaped for markdown (certpilot.views.escape) and the lists are bounded, so the artifact stays small
however large the inventory.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from sqlmodel import Session, col

from certpilot.discovery import SourceSummary
from certpilot.models import Certificate, ManagedCertificate, PolicyViolation, SubjectAltName
from certpilot.views import escape

RULES_SHOWN = 5  # rule ids listed per certificate
_RANK = {"low": 1, "medium": 2, "high": 3, "critical": 4}  # certpilot.policy.Severity, in SQL


@dataclass(frozen=True)
class FlaggedCertificate:
    """A certificate with violations not waived: its worst severity, how many, and which rules."""

    fingerprint_sha256: str
    name: str  # its managed certificate's name, else its first DNS name, else its subject
    owner: str | None
    severity: str
    violations: int
    rules: tuple[str, ...]


def worst_certificates(session: Session, limit: int = 20) -> list[FlaggedCertificate]:
    """The ``limit`` certificates with the most severe violation not waived, then the most of them."""
    v = PolicyViolation
    rank = sa.case(*[(col(v.severity) == name, value) for name, value in _RANK.items()], else_=0)
    worst = session.execute(
        sa.select(col(v.certificate_fingerprint), sa.func.max(rank), sa.func.count())
        .where(col(v.waiver_id).is_(None)).group_by(col(v.certificate_fingerprint))
        .order_by(sa.func.max(rank).desc(), sa.func.count().desc(), col(v.certificate_fingerprint))
        .limit(limit)).all()
    fps = [row[0] for row in worst]
    if not fps:
        return []
    rules: dict[str, list[tuple[int, str]]] = {}
    for fp, rule, severity in session.execute(
            sa.select(col(v.certificate_fingerprint), col(v.rule), col(v.severity))
            .where(col(v.certificate_fingerprint).in_(fps), col(v.waiver_id).is_(None))):
        rules.setdefault(fp, []).append((-_RANK.get(severity, 0), rule))
    names: dict[str, str] = {}
    for fp, value in session.execute(
            sa.select(col(SubjectAltName.certificate_fingerprint), col(SubjectAltName.value))
            .where(col(SubjectAltName.certificate_fingerprint).in_(fps), col(SubjectAltName.kind) == "DNS")
            .order_by(col(SubjectAltName.value))):
        names.setdefault(fp, value)
    described = {row[0]: row for row in session.execute(
        sa.select(col(Certificate.fingerprint_sha256), col(Certificate.subject), col(Certificate.owner),
                  col(ManagedCertificate.name))
        .outerjoin(ManagedCertificate, col(ManagedCertificate.id) == col(Certificate.managed_certificate_id))
        .where(col(Certificate.fingerprint_sha256).in_(fps)))}
    by_rank = {value: name for name, value in _RANK.items()}
    out = []
    for fp, top, count in worst:
        row = described.get(fp)
        managed = row[3] if row is not None else None
        name = managed or names.get(fp) or (row[1] if row is not None else fp[:16])
        ids = tuple(dict.fromkeys(rule for _, rule in sorted(rules.get(fp, []))))
        out.append(FlaggedCertificate(fp, name, row[2] if row is not None else None, by_rank.get(int(top), "?"),
                                      int(count), ids))
    return out


def policy_markdown(by_rule: Mapping[str, int], worst: Sequence[FlaggedCertificate],
                    sources: Sequence[SourceSummary] = (), policy_source: str | None = None) -> str:
    """The artifact: this run's owners assigned and violations per source, the inventory's violations by rule
    (every rule, 0 included), and the worst certificates."""
    total = sum(by_rule.values())
    lines = ["# Policy", ""]
    if policy_source:
        lines += [f"Policy in force: {escape(policy_source)}", ""]
    lines += [f"**{total}** violation(s) not waived in the inventory.", ""]
    if sources:
        lines += ["| source | owners assigned | violations found | policy |", "|---|---|---|---|"]
        lines += [f"| {escape(s.source)} | {s.owners_assigned} | {s.violations} | "
                  f"{escape(s.policy_error) if s.policy_error else 'applied'} |" for s in sources]
        lines.append("")
    lines += ["## Violations by rule", "", "| rule | certificates and places |", "|---|---|"]
    lines += [f"| {escape(rule)} | {count} |" for rule, count in by_rule.items()]
    lines += ["", "## Worst certificates", ""]
    if not worst:
        lines.append("None: no certificate violates the policy.")
        return "\n".join(lines)
    lines += ["| certificate | fingerprint | owner | worst | violations | rules |", "|---|---|---|---|---|---|"]
    for c in worst:
        shown = ", ".join(c.rules[:RULES_SHOWN]) + (f" and {len(c.rules) - RULES_SHOWN} more"
                                                    if len(c.rules) > RULES_SHOWN else "")
        lines.append(f"| {escape(c.name)} | {c.fingerprint_sha256[:16]} | {escape(c.owner or '')} | {c.severity} | "
                     f"{c.violations} | {escape(shown)} |")
    return "\n".join(lines)
