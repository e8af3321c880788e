"""When to renew: a chain of pure functions of (certificate validity, policy, ARI window, now).

Default: at two thirds of the lifetime, never later than the policy's renew-before, with a jitter
that spreads a fleet over time and is stable per certificate (the same certificate gets the same
answer every time it is asked). When the CA offers a renewal window (ARI), a point in it is chosen
the same stable way. A time already past renews at once.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass


@dataclass(frozen=True)
class RenewalWindow:
    """A CA's suggested renewal window (ACME Renewal Information, RFC 9773)."""

    start: dt.datetime
    end: dt.datetime
    retry_after: dt.timedelta | None = None
    explanation_url: str | None = None


@dataclass(frozen=True)
class RenewalPolicy:
    renew_before: dt.timedelta | None = None  # renew at the latest this long before expiry
    lifetime_fraction: float = 2 / 3  # renew once this much of the lifetime has passed
    jitter_fraction: float = 0.05  # spread renewals earlier by up to this much of the lifetime


@dataclass(frozen=True)
class RenewalDecision:
    due: bool
    renew_at: dt.datetime
    reason: str


def stable_fraction(seed: str) -> float:
    """A number in [0, 1) that depends only on ``seed`` (a certificate's fingerprint)."""
    return int.from_bytes(hashlib.sha256(seed.encode()).digest()[:8], "big") / 2**64


def renewal_time(not_before: dt.datetime, not_after: dt.datetime, policy: RenewalPolicy, seed: str,
                 window: RenewalWindow | None = None) -> tuple[dt.datetime, str]:
    if window is not None and window.end > window.start:
        at = window.start + (window.end - window.start) * stable_fraction(seed)
        return at, f"a point in the CA's renewal window {window.start:%Y-%m-%d %H:%M} to {window.end:%Y-%m-%d %H:%M} UTC"
    lifetime = not_after - not_before
    at = not_before + lifetime * policy.lifetime_fraction - lifetime * policy.jitter_fraction * stable_fraction(seed)
    reason = f"{policy.lifetime_fraction:.0%} of its {lifetime.days}-day lifetime"
    if policy.renew_before is not None and at > not_after - policy.renew_before:
        at = not_after - policy.renew_before - lifetime * policy.jitter_fraction * stable_fraction(seed)
        reason = f"{policy.renew_before.days} days before expiry (the policy's renew-before)"
    return at, reason


def decide(not_before: dt.datetime, not_after: dt.datetime, policy: RenewalPolicy, seed: str,
           now: dt.datetime, window: RenewalWindow | None = None) -> RenewalDecision:
    at, reason = renewal_time(not_before, not_after, policy, seed, window)
    if now >= not_after:
        return RenewalDecision(True, now, "expired: renew at once")
    if now >= at:
        return RenewalDecision(True, now, f"due since {at:%Y-%m-%d %H:%M} UTC ({reason})")
    return RenewalDecision(False, at, f"renew at {at:%Y-%m-%d %H:%M} UTC ({reason})")
