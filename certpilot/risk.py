"""Risk: a score from 0 to 100 per certificate in service, and the reasons for it.

A certificate's score is the sum of the points below (at most ``MAX_SCORE``); each part that adds
points is one reason, ``"<reason>: +<points>"``, so the reasons say exactly how the score was made.

- Days left: expired (still active in the inventory) ``EXPIRED_POINTS``; else the first of
  ``EXPIRY_POINTS`` whose days it expires within.
- Exposure: the endpoints that serve it, i.e. its TLS locations (``tls://`` locators not ghosted) and the
  targets of a managed certificate whose desired or last verified fingerprint it is.
  ``PUBLIC_ENDPOINT_POINTS`` per public endpoint and ``PRIVATE_ENDPOINT_POINTS`` per private one, at
  most ``EXPOSURE_CAP`` in all. An endpoint is public when the certificate is publicly trusted (its
  issuer is public per ``Policy.is_public``, as certpilot.violations.facts_for decides: not a certpilot
  private CA, not self-signed, not one of the policy's private issuers; a publicly trusted certificate
  is accepted by every client anywhere), or when the endpoint's host is a global IP address (not private,
  loopback, link-local or reserved). An endpoint named by a DNS name serving a privately trusted
  certificate counts as private: certpilot does not resolve names here. Targets have no address of
  their own: they are public when the certificate is.
- Weakness: ``WEAK_KEY_POINTS`` for a weak key (RSA under 2048 bits, DSA, an EC curve under 256 bits)
  and ``WEAK_SIGNATURE_POINTS`` for a weak signature (MD2, MD4, MD5, SHA-1), as certpilot.crypto_inventory
  defines them: the cryptographic fact, whatever the policy says.
- Policy: each stored violation not waived (certificate.violations, certificate and endpoint rules)
  adds ``VIOLATION_POINTS`` of its severity, at most ``VIOLATIONS_CAP`` in all: the organisation's rules.
  A weak key usually breaks key-size as well; both count, one as a fact and one as a rule broken.
- Unmanaged: ``UNMANAGED_POINTS`` when nothing in certpilot renews it.

``risk_report(session, policy, now, limit)`` scores every active leaf certificate (those the policy
evaluates) and lists the riskiest first (then the soonest to expire); ``risk_markdown`` renders the
``risk`` artifact. Pure over the session: no Prefect, no network, no clock of its own.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col

from certpilot import violations as violation_store
from certpilot.crypto_inventory import display_name, key_label, key_weakness, signature_weakness
from certpilot.inventory import iso
from certpilot.models import Certificate, Location, Target
from certpilot.monitoring import parse_tls_locator
from certpilot.names import parse_ip_address
from certpilot.policy import Facts, Policy, Severity, Violation
from certpilot.views import escape, markdown_table

__all__ = ["EXPIRED_POINTS", "EXPIRY_POINTS", "EXPOSURE_CAP", "MAX_SCORE", "PRIVATE_ENDPOINT_POINTS",
           "PUBLIC_ENDPOINT_POINTS", "UNMANAGED_POINTS", "VIOLATIONS_CAP", "VIOLATION_POINTS", "WEAK_KEY_POINTS",
           "WEAK_SIGNATURE_POINTS", "Exposure", "Risk", "RiskReport", "is_public_address", "risk_markdown",
           "risk_report", "score"]

# ---------------------------------------------------------------------------------- the scoring weights
MAX_SCORE = 100
EXPIRED_POINTS = 40  # expired and still in service: anything that serves it fails now
EXPIRY_POINTS: tuple[tuple[int, int], ...] = ((7, 30), (14, 20), (30, 10))  # expires within N days: +points
PUBLIC_ENDPOINT_POINTS = 6  # per endpoint serving it where anyone can connect, or trusting anywhere
PRIVATE_ENDPOINT_POINTS = 2  # per endpoint on a private network with a privately trusted certificate
EXPOSURE_CAP = 24
WEAK_KEY_POINTS = 25  # RSA < 2048, DSA, EC < 256 bits: the key can be broken
WEAK_SIGNATURE_POINTS = 20  # MD5/SHA-1: the signature can be forged by collision
VIOLATION_POINTS: Mapping[str, int] = {Severity.CRITICAL: 20, Severity.HIGH: 10, Severity.MEDIUM: 5,
                                       Severity.LOW: 2}  # per unwaived violation, by its severity
VIOLATIONS_CAP = 30
UNMANAGED_POINTS = 10  # nothing renews it: its expiry depends on someone remembering

BANDS = (("75-100", 75), ("50-74", 50), ("25-49", 25), ("1-24", 1), ("0", 0))  # the report's distribution
_CHUNK = 500


@dataclass(frozen=True)
class Exposure:
    public: int  # endpoints serving it that count as public
    private: int

    @property
    def endpoints(self) -> int:
        return self.public + self.private


@dataclass(frozen=True)
class Risk:
    """One certificate's score and why."""

    fingerprint_sha256: str
    name: str
    owner: str | None
    managed: bool
    score: int
    reasons: tuple[str, ...]  # "<reason>: +<points>", in the order of the module docstring
    not_after: dt.datetime
    days_left: float
    key: str  # crypto_inventory.key_label
    signature_algorithm: str | None
    public: bool  # publicly trusted
    exposure: Exposure
    violations: tuple[str, ...]  # the rules it breaks, unwaived

    def as_dict(self) -> dict[str, Any]:
        return {"fingerprint_sha256": self.fingerprint_sha256, "name": self.name, "owner": self.owner,
                "managed": self.managed, "score": self.score, "reasons": list(self.reasons),
                "not_after": iso(self.not_after), "days_left": round(self.days_left, 1), "key": self.key,
                "signature_algorithm": self.signature_algorithm, "public": self.public,
                "endpoints": {"public": self.exposure.public, "private": self.exposure.private},
                "violations": list(self.violations)}


@dataclass(frozen=True)
class RiskReport:
    generated_at: dt.datetime
    policy: str  # the policy's source
    scored: int
    distribution: dict[str, int]  # certificates per score band (BANDS)
    risks: tuple[Risk, ...]  # the riskiest first, at most the limit asked

    def as_dict(self) -> dict[str, Any]:
        return {"generated_at": iso(self.generated_at), "policy": self.policy, "scored": self.scored,
                "distribution": self.distribution, "certificates": [r.as_dict() for r in self.risks],
                "weights": weights()}


def weights() -> dict[str, Any]:
    """The scoring weights, as the report states them."""
    return {"max_score": MAX_SCORE, "expired": EXPIRED_POINTS,
            "expiring": [{"within_days": d, "points": p} for d, p in EXPIRY_POINTS],
            "public_endpoint": PUBLIC_ENDPOINT_POINTS, "private_endpoint": PRIVATE_ENDPOINT_POINTS,
            "exposure_cap": EXPOSURE_CAP, "weak_key": WEAK_KEY_POINTS, "weak_signature": WEAK_SIGNATURE_POINTS,
            "violation": {str(k): v for k, v in VIOLATION_POINTS.items()}, "violations_cap": VIOLATIONS_CAP,
            "unmanaged": UNMANAGED_POINTS}


def is_public_address(locator: str) -> bool:
    """Whether a ``tls://`` locator's host is a global IP address (a DNS name is not known to be)."""
    try:
        host, _, _ = parse_tls_locator(locator)
    except ValueError:
        return False
    address = parse_ip_address(host)
    return address is not None and address.is_global


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def score(facts: Facts, exposure: Exposure, open_violations: Sequence[Violation], now: dt.datetime) -> tuple[int, tuple[str, ...]]:
    """The score of one certificate and its reasons (see the module docstring)."""
    reasons: list[tuple[str, int]] = []
    days_left = (facts.not_after - now).total_seconds() / 86400
    if days_left < 0:
        reasons.append((f"expired {-days_left:.1f} days ago", EXPIRED_POINTS))
    else:
        band = next(((d, p) for d, p in EXPIRY_POINTS if days_left < d), None)
        if band is not None:
            reasons.append((f"expires within {band[0]} days ({days_left:.1f} left)", band[1]))
    if exposure.endpoints:
        raw = exposure.public * PUBLIC_ENDPOINT_POINTS + exposure.private * PRIVATE_ENDPOINT_POINTS
        parts = [_plural(n, f"{kind} endpoint") for kind, n in (("public", exposure.public),
                                                                 ("private", exposure.private)) if n]
        capped = f" (capped at {EXPOSURE_CAP})" if raw > EXPOSURE_CAP else ""
        reasons.append((f"served at {' and '.join(parts)}{capped}", min(EXPOSURE_CAP, raw)))
    weak_key = key_weakness(facts.key_type, facts.key_size, facts.key_curve)
    if weak_key:
        reasons.append((f"weak key: {weak_key}", WEAK_KEY_POINTS))
    weak_signature = signature_weakness(facts.signature_algorithm)
    if weak_signature:
        reasons.append((f"weak signature: {weak_signature}", WEAK_SIGNATURE_POINTS))
    if open_violations:
        ordered = sorted(open_violations, key=lambda v: (-Severity.rank(v.severity), v.rule, v.place))
        raw = sum(VIOLATION_POINTS.get(v.severity, 0) for v in ordered)
        named = ", ".join(f"{v.rule} ({v.severity}{f' at {v.place}' if v.place else ''})" for v in ordered)
        capped = f" (capped at {VIOLATIONS_CAP})" if raw > VIOLATIONS_CAP else ""
        reasons.append((f"violates {named}{capped}", min(VIOLATIONS_CAP, raw)))
    if not facts.managed:
        reasons.append(("unmanaged: nothing renews it", UNMANAGED_POINTS))
    total = min(MAX_SCORE, sum(points for _, points in reasons))
    return total, tuple(f"{reason}: +{points}" for reason, points in reasons if points)


def _exposures(session: Session, facts: Sequence[Facts]) -> dict[str, Exposure]:
    public_cert = {f.fingerprint_sha256: f.public for f in facts if f.fingerprint_sha256}
    fps = list(public_cert)
    counts: dict[str, list[int]] = {fp: [0, 0] for fp in fps}

    def count(fp: str, public: bool) -> None:
        counts[fp][0 if public else 1] += 1

    for chunk in _chunks(fps):
        for fp, locator in session.execute(
                sa.select(col(Location.certificate_fingerprint), col(Location.locator))
                .where(col(Location.certificate_fingerprint).in_(chunk), col(Location.ghost).is_(False),
                       col(Location.locator).startswith("tls://"))):
            count(fp, public_cert[fp] or is_public_address(locator))
        for desired, verified in session.execute(
                sa.select(col(Target.desired_fingerprint), col(Target.verified_fingerprint))
                .where(sa.or_(col(Target.desired_fingerprint).in_(chunk), col(Target.verified_fingerprint).in_(chunk)))):
            for fp in {desired, verified} & set(chunk):
                count(fp, public_cert[fp])
    return {fp: Exposure(public, private) for fp, (public, private) in counts.items()}


def _chunks(items: Sequence[str]) -> Iterable[Sequence[str]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start:start + _CHUNK]


def _subjects(session: Session, fps: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for chunk in _chunks(fps):
        out.update(session.execute(sa.select(col(Certificate.fingerprint_sha256), col(Certificate.subject))
                                   .where(col(Certificate.fingerprint_sha256).in_(chunk))).tuples().all())
    return out


def _name(facts: Facts, subject: str) -> str:
    first = next(iter((*facts.dns_names, *facts.ip_addresses, *facts.uris)), None)
    return display_name(facts.managed_name, first, subject)


def risk_report(session: Session, policy: Policy, now: dt.datetime, limit: int = 50) -> RiskReport:
    """Score every active leaf certificate (certpilot.violations.facts_for) and list the ``limit`` riskiest,
    highest score first, then the soonest to expire."""
    if limit < 0:
        raise ValueError(f"limit must be 0 or more, not {limit}")
    facts = [f for f in violation_store.facts_for(session, policy, None, now) if f.fingerprint_sha256]
    fps = [f.fingerprint_sha256 for f in facts if f.fingerprint_sha256]
    exposures = _exposures(session, facts)
    stored = violation_store.stored_violations(session, fps, include_waived=False)
    subjects = _subjects(session, fps)
    risks: list[Risk] = []
    for f in facts:
        fp = f.fingerprint_sha256
        assert fp is not None
        unwaived = [v for v in stored.get(fp, []) if v.waiver_id is None]
        points, reasons = score(f, exposures[fp], unwaived, now)
        risks.append(Risk(fp, _name(f, subjects.get(fp, fp)), f.owner, f.managed, points, reasons,
                          f.not_after, (f.not_after - now).total_seconds() / 86400,
                          key_label(f.key_type, f.key_size, f.key_curve), f.signature_algorithm, f.public, exposures[fp],
                          tuple(dict.fromkeys(v.rule for v in unwaived))))
    risks.sort(key=lambda r: (-r.score, r.not_after, r.fingerprint_sha256))
    distribution = {label: 0 for label, _ in BANDS}
    for r in risks:
        distribution[next(label for label, low in BANDS if r.score >= low)] += 1
    return RiskReport(now, policy.source, len(risks), distribution, tuple(risks[:limit]))


def risk_markdown(report: RiskReport) -> str:
    """The ``risk`` artifact: the distribution of scores and the riskiest certificates with their reasons."""
    lines = [f"# Certificate risk, {report.generated_at:%Y-%m-%d %H:%M} UTC", "",
             f"{report.scored} certificates scored (0 to {MAX_SCORE}) under the policy {escape(report.policy)}.", ""]
    lines += markdown_table(tuple(label for label, _ in BANDS), [tuple(report.distribution.values())])
    lines += ["", f"## The riskiest {len(report.risks)}", ""]
    if not report.risks:
        lines.append("No certificate to score." if not report.scored else "None listed.")
        return "\n".join(lines)
    lines += markdown_table(("score", "certificate", "fingerprint", "owner", "days left", "why"),
                            [(r.score, r.name, r.fingerprint_sha256[:16], r.owner or "", f"{r.days_left:.0f}",
                              "; ".join(r.reasons)) for r in report.risks])
    return "\n".join(lines)
