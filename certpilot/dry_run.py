"""What a renewal or a deployment would do, said without doing it: the dry runs of renew-certificate,
renew-due and deploy-certificate.

A dry run reads the inventory and checks that the blocks a real run would load exist; it generates
no key, sends nothing to a CA, changes no target, writes nothing to the inventory or the audit
trail. What it says of a target comes from the inventory's records (the fingerprint last verified
there), not from the wire: the real run reconciles each target before it changes it.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from certpilot.renewing import DueCertificate, RenewalPlan
from certpilot.rollout import DeploymentPlan

__all__ = ["DeploymentPreview", "DuePreview", "RenewalPreview", "TargetPreview"]


def _fp(fingerprint: str | None) -> str:
    return fingerprint[:16] if fingerprint else "none"


def _when(at: dt.datetime | None) -> str:
    return f"{at.astimezone(dt.timezone.utc):%Y-%m-%d %H:%M} UTC" if at else "?"


@dataclass(frozen=True)
class RenewalPreview:
    """What renewing ``plan.name`` now would do. ``issuer_problem``: why its issuer block could not be
    loaded (None: it loads); ``targets``: the targets it would then be deployed to (empty: not deployed)."""

    plan: RenewalPlan
    issuer_problem: str | None
    targets: tuple[str, ...]

    def lines(self) -> list[str]:
        p = self.plan
        names = ", ".join([*p.dns_names, *p.ip_addresses]) or "no names"
        out = [f"DRY RUN: nothing was renewed. Renewing {p.name} would:",
               f"- generate a new {p.key_algorithm} key (stored encrypted in the keystore)",
               f"- request a {p.profile} certificate for {names}"
               + (f", valid {p.validity_days} days" if p.validity_days else "") + f", from issuer {p.issuer}",
               (f"- replace certificate {_fp(p.current)} (expires {_when(p.current_not_after)}), which stays in service "
                "until the new one is stored" if p.current else "- give it its first certificate")]
        out.append(f"- then deploy it to {len(self.targets)} target(s): {', '.join(self.targets)}" if self.targets
                   else "- deploy it nowhere (it has no targets, or deploy is off)")
        out.append(f"BLOCKED: issuer block {p.issuer}: {self.issuer_problem}" if self.issuer_problem
                   else f"issuer block {p.issuer} loads")
        return out


@dataclass(frozen=True)
class DuePreview:
    """The managed certificates a renew-due run would renew now (as of ``at``)."""

    at: dt.datetime
    due: tuple[DueCertificate, ...]

    def lines(self) -> list[str]:
        out = [f"DRY RUN: nothing was renewed. {len(self.due)} managed certificate(s) due as of {_when(self.at)}"
               + (":" if self.due else ".")]
        out += [f"- {d.name}: {d.reason} (due since {_when(d.due_since)}), issuer {d.issuer}, in service "
                f"{_fp(d.current)}" + (", then deployed to its targets" if d.has_targets else "") for d in self.due]
        return out


@dataclass(frozen=True)
class TargetPreview:
    """One target as a deploy run would find it: ``verified`` is the fingerprint last proven served
    there; ``block_problem`` why its block could not be loaded (None: it loads)."""

    name: str
    kind: str
    block: str | None
    verified: str | None
    block_problem: str | None = None


@dataclass(frozen=True)
class DeploymentPreview:
    """What deploying ``plan.fingerprint`` of ``plan.name`` would do, wave by wave (the canary alone first)."""

    plan: DeploymentPlan
    waves: tuple[tuple[TargetPreview, ...], ...]

    @property
    def blocked(self) -> tuple[TargetPreview, ...]:
        return tuple(t for wave in self.waves for t in wave if t.block_problem)

    def lines(self) -> list[str]:
        fp = self.plan.fingerprint
        if not self.waves:
            return [f"DRY RUN: {self.plan.name} has no targets: a deploy run would do nothing."]
        out = [f"DRY RUN: nothing was deployed. Deploying {self.plan.name} ({_fp(fp)}) would take "
               f"{sum(len(w) for w in self.waves)} target(s) in {len(self.waves)} wave(s):"]
        for index, wave in enumerate(self.waves):
            label = "canary" if index == 0 else f"wave {index}"
            for t in wave:
                verdict = ("verify only: last verified serving it" if t.verified == fp else
                           f"deploy and verify (last verified serving {_fp(t.verified)})")
                problem = f"; BLOCKED: block {t.block}: {t.block_problem}" if t.block_problem else ""
                out.append(f"- {label}: {t.name} ({t.kind}, through {t.block or 'no block'}): {verdict}{problem}")
        out.append("If a target failed, the run would stop there and roll back every target it changed.")
        return out
