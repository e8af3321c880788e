"""The blast radius of a revoke-and-replace: what is in scope, what would be done, and what it costs.

``BlastRadius.of`` takes the resolved scope (certpilot.scope.resolve) and each issuer's published rate
limits (certpilot.rate_limits) and counts, per issuer block, the new orders and revocations the run would
make and the new certificates per registered domain, naming every limit the run would exceed (counted as
new certificates: the conservative reading, since a CA may treat a same-names replacement as a renewal).
``markdown`` is the dry run's artifact (a summary, a table of the certificates in scope with their owner,
targets and where discovery saw them, the budget, and what revoking first costs); ``lines`` the same for
logs and the CLI; ``as_dict`` for --json.

No Prefect, no network here.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from certpilot.inventory import iso
from certpilot.rate_limits import RateLimits, registered_domain
from certpilot.scope import Action, InScope, Scope
from certpilot.views import escape

__all__ = ["BlastRadius", "IssuerBudget", "ROWS_SHOWN"]

ROWS_SHOWN = 500  # certificates listed in the artifact's table; the rest are counted
PLACES_SHOWN = 8  # targets or locations listed in one cell


@dataclass(frozen=True)
class IssuerBudget:
    """What the run asks of one issuer: new orders (one per replacement), revocations, new certificates
    per registered domain; ``exceeded`` names each published limit that it goes over."""

    issuer: str
    orders: int
    revocations: int
    by_registered_domain: dict[str, int]
    limits: RateLimits | None
    exceeded: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"issuer": self.issuer, "orders": self.orders, "revocations": self.revocations,
                "by_registered_domain": dict(self.by_registered_domain),
                "limits": self.limits.as_dict() if self.limits else None, "exceeded": list(self.exceeded)}


def _budget(issuer: str, items: Sequence[InScope], limits: RateLimits | None) -> IssuerBudget:
    replacing = [i for i in items if i.action is Action.REPLACE]
    revoking = [i for i in items if i.action is Action.REVOKE or (i.action is Action.REPLACE and i.status != "revoked")]
    domains: Counter[str] = Counter()
    duplicates: Counter[tuple[str, ...]] = Counter()
    for item in replacing:
        domains.update(sorted({registered_domain(n) for n in item.dns_names}))
        duplicates[tuple(sorted(item.dns_names))] += 1
    exceeded: list[str] = []
    if limits is not None:
        per_3h = limits.new_orders_per_account_per_3h
        if per_3h is not None and len(replacing) > per_3h:
            exceeded.append(f"{len(replacing)} new orders, more than {limits.name}'s {per_3h} per account per "
                            "3 hours")
        per_domain = limits.certificates_per_registered_domain_per_week
        if per_domain is not None:
            exceeded += [f"registered domain {domain}: {count} new certificates, more than {limits.name}'s "
                         f"{per_domain} per registered domain per week"
                         for domain, count in sorted(domains.items()) if count > per_domain]
        per_set = limits.duplicate_certificates_per_week
        if per_set is not None:
            exceeded += [f"{count} certificates for the same names {', '.join(names) or '(none)'}, more than "
                         f"{limits.name}'s {per_set} duplicate certificates per week"
                         for names, count in sorted(duplicates.items()) if count > per_set]
    return IssuerBudget(issuer, len(replacing), len(revoking), dict(sorted(domains.items())), limits, tuple(exceeded))


@dataclass(frozen=True)
class BlastRadius:
    scope: Scope
    items: tuple[InScope, ...]
    budget: tuple[IssuerBudget, ...]
    revoke_first: bool = False
    shown: int = field(default=ROWS_SHOWN, compare=False)

    @classmethod
    def of(cls, scope: Scope, items: Sequence[InScope], limits: Mapping[str, RateLimits | None],
           revoke_first: bool = False) -> BlastRadius:
        """The blast radius of ``items``; ``limits``: each issuer block's published limits (None: not known)."""
        by_issuer: dict[str, list[InScope]] = {}
        for item in items:
            if item.issuer is not None and item.action in (Action.REPLACE, Action.REVOKE):
                by_issuer.setdefault(item.issuer, []).append(item)
        budget = tuple(_budget(issuer, found, limits.get(issuer)) for issuer, found in sorted(by_issuer.items()))
        return cls(scope, tuple(items), budget, revoke_first)

    @property
    def counts(self) -> dict[str, int]:
        counted = Counter(i.action for i in self.items)
        return {action.value: counted.get(action, 0) for action in Action}

    @property
    def exceeded(self) -> list[str]:
        return [f"{b.issuer}: {reason}" for b in self.budget for reason in b.exceeded]

    def summary(self) -> str:
        c = self.counts
        order = ("revoke first, then replace (revoke_first)" if self.revoke_first
                 else "replace first, revoke once the replacement is verified")
        line = (f"{len(self.items)} certificate(s) in scope: {c['replace']} to replace, {c['revoke']} to revoke only, "
                f"{c['cannot']} that cannot be handled, {c['nothing']} with nothing to do; {order}")
        if self.exceeded:
            line += f"; {len(self.exceeded)} CA rate limit(s) exceeded"
        return line

    # -------------------------------------------------------------------------------------- the cost

    def exposed_while_revoked(self) -> list[tuple[InScope, list[str]]]:
        """The certificates that would be revoked while places still serve them, with those places: with
        revoke_first every replacement's targets and live locations (until the replacement is verified);
        always, a revoke-only certificate's targets that hold it and its live locations."""
        out = []
        for item in self.items:
            if item.action is Action.REPLACE and self.revoke_first and item.status != "revoked":
                places = [f"target {t.name} ({t.kind})" for t in item.targets]
            elif item.action is Action.REVOKE:
                places = [f"target {t.name} ({t.kind})" for t in item.targets
                          if item.fingerprint_sha256 in (t.desired, t.verified)]
            else:
                continue
            places += [loc.locator for loc in item.locations if not loc.ghost]
            if places:
                out.append((item, places))
        return out

    # ----------------------------------------------------------------------------------------- output

    def as_dict(self) -> dict[str, Any]:
        return {"scope": self.scope.as_dict(), "scope_key": self.scope.key(), "revoke_first": self.revoke_first,
                "summary": self.summary(), "counts": self.counts, "items": [i.as_dict() for i in self.items],
                "budget": [b.as_dict() for b in self.budget], "exceeded": self.exceeded,
                "exposed_while_revoked": [{"fingerprint_sha256": i.fingerprint_sha256, "places": places}
                                          for i, places in self.exposed_while_revoked()]}

    def lines(self) -> list[str]:
        """For logs and the CLI: the summary, one line per certificate (at most ``shown``), the budget."""
        out = [self.summary()]
        for item in self.items[:self.shown]:
            out.append(f"{item.action.value:<8} {item.label} {item.fingerprint_sha256[:16]} serial {item.serial_hex}: "
                       f"{item.why}")
        if len(self.items) > self.shown:
            out.append(f"... and {len(self.items) - self.shown} more certificate(s) not listed")
        for b in self.budget:
            out.append(f"issuer {b.issuer}: {b.orders} new order(s), {b.revocations} revocation(s)"
                       + (f"; limits: {b.limits.name}" if b.limits else "; no published limits known"))
        out += [f"rate limit exceeded: {reason}" for reason in self.exceeded]
        for item, places in self.exposed_while_revoked():
            out.append(f"revoked while served: {item.label} {item.fingerprint_sha256[:16]} at {', '.join(places)}")
        return out

    def markdown(self) -> str:
        """The blast-radius artifact."""
        scope = self.scope.describe()
        out = [f"# Blast radius: {escape(scope)}", "", f"**{escape(self.summary())}.**", "",
               f"Scope key `{self.scope.key()[:16]}`.", "", "## Certificates in scope", ""]
        if not self.items:
            out.append("_The scope matches no certificate in the inventory._")
        else:
            out += ["| Certificate | Fingerprint | Serial | Owner | Targets | Seen at | Expires | Action | Why |",
                    "|---|---|---|---|---|---|---|---|---|"]
            for item in self.items[:self.shown]:
                out.append("| " + " | ".join([
                    escape(item.label), f"`{item.fingerprint_sha256[:16]}`", f"`{item.serial_hex}`",
                    escape(item.owner or "-"), _cell([f"{t.name} ({t.kind})" for t in item.targets]),
                    _cell([loc.locator + (" (ghost)" if loc.ghost else "") for loc in item.locations]),
                    escape((iso(item.not_after) or "")[:10]), f"**{item.action.value}**", escape(item.why)]) + " |")
            if len(self.items) > self.shown:
                out += ["", f"_{len(self.items) - self.shown} more certificate(s) in scope are not listed here "
                            f"(the table shows the first {self.shown}; the run's JSON output lists all)._"]
        out += ["", "## CA rate-limit budget", ""]
        if not self.budget:
            out.append("_No issuer would be asked for anything._")
        else:
            out += ["| Issuer | New orders | Revocations | New certificates per registered domain | Limits | Exceeded |",
                    "|---|---|---|---|---|---|"]
            for b in self.budget:
                domains = sorted(b.by_registered_domain.items(), key=lambda kv: (-kv[1], kv[0]))
                out.append("| " + " | ".join([
                    escape(b.issuer), str(b.orders), str(b.revocations),
                    _cell([f"{d}: {n}" for d, n in domains]), escape(_limits(b.limits)),
                    escape("; ".join(b.exceeded)) if b.exceeded else "none"]) + " |")
            out += ["", "_Counted as new certificates; a CA may exempt a replacement with the same names as a "
                        "renewal. The run itself is throttled by the issuer's own limits._"]
        out += ["", "## Cost", ""]
        exposed = self.exposed_while_revoked()
        if self.revoke_first:
            out.append("**revoke_first**: each old certificate is revoked before its replacement is issued, deployed "
                       "and verified. Until then the places below serve a revoked certificate, and clients that "
                       "check revocation (OCSP, CRLs, browsers with CRLite) fail their handshakes there.")
        else:
            out.append("Replace first: an old certificate is revoked only once its replacement is verified on every "
                       "target, so no target serves a revoked certificate.")
        if exposed:
            out += ["", "| Certificate | Action | Would serve a revoked certificate |", "|---|---|---|"]
            out += [f"| {escape(item.label)} `{item.fingerprint_sha256[:16]}` | {item.action.value} | {_cell(places)} |"
                    for item, places in exposed[:self.shown]]
            if len(exposed) > self.shown:
                out.append(f"\n_{len(exposed) - self.shown} more not listed._")
        out += ["", "Every target and every live location where discovery saw an old certificate is probed after "
                    "the run; one still serving it is reported as an exposure."]
        return "\n".join(out) + "\n"


def _cell(values: Sequence[str]) -> str:
    if not values:
        return "-"
    shown = ", ".join(escape(v) for v in values[:PLACES_SHOWN])
    return shown + (f" and {len(values) - PLACES_SHOWN} more" if len(values) > PLACES_SHOWN else "")


def _limits(limits: RateLimits | None) -> str:
    if limits is None:
        return "none published"
    parts = []
    if limits.new_orders_per_account_per_3h is not None:
        parts.append(f"{limits.new_orders_per_account_per_3h} orders/3 h")
    if limits.certificates_per_registered_domain_per_week is not None:
        parts.append(f"{limits.certificates_per_registered_domain_per_week} per registered domain/week")
    if limits.duplicate_certificates_per_week is not None:
        parts.append(f"{limits.duplicate_certificates_per_week} duplicates/week")
    return f"{limits.name}: " + ", ".join(parts)
