"""How long a revocation took to reach relying parties (seed metric M6), as certpilot measured it.

After a revocation, connectors.revocation.watch_revocation reads the CRL at the certificate's own CRL
distribution point and asks the OCSP responder named in its AIA, as a relying party would, until both
say revoked; the result is a ``Propagation``. ``record_propagation`` writes it as one audit event,
``certificate.revocation_visible`` on ``certificate:<fingerprint>``, with ``crl_seconds``,
``ocsp_seconds``, ``seconds`` (the later of the two; None when not both were seen within the watch),
``crl_url``, ``ocsp_url`` and ``detail``. ``measurements`` reads those events back for the SLI (M6) and
the metric. Pure: no network, no Prefect.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col

from certpilot import audit
from certpilot.models import AuditEvent

__all__ = ["EVENT", "Measurement", "Propagation", "measurements", "record_propagation"]

EVENT = "certificate.revocation_visible"


@dataclass(frozen=True)
class Propagation:
    """What a relying party saw after a revocation. Seconds are counted from the revocation time (wall
    clock) to when each source was first seen saying revoked; None: not seen within the watch. A
    certificate that names only one of the two (a CA without OCSP) is judged by the one it names."""

    crl_url: str | None
    ocsp_url: str | None
    crl_seconds: float | None
    ocsp_seconds: float | None
    seconds: float | None
    detail: str

    @property
    def visible(self) -> bool:
        return self.seconds is not None

    def as_dict(self) -> dict[str, Any]:
        return {"crl_url": self.crl_url, "ocsp_url": self.ocsp_url, "crl_seconds": self.crl_seconds,
                "ocsp_seconds": self.ocsp_seconds, "seconds": self.seconds, "detail": self.detail}


def record_propagation(session: Session, fingerprint: str, propagation: Propagation, actor: audit.Actor,
                       now: dt.datetime | None = None) -> None:
    """One ``certificate.revocation_visible`` audit event for the certificate ``fingerprint`` (SHA-256
    hex), in the caller's write transaction."""
    details = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in propagation.as_dict().items()}
    audit.append(session, actor, [audit.Change(EVENT, f"certificate:{fingerprint}", details)], now)


@dataclass(frozen=True)
class Measurement:
    """The latest ``certificate.revocation_visible`` event of one certificate."""

    fingerprint: str
    seq: int
    at: dt.datetime
    seconds: float | None  # None: the watch ended before both sources said revoked
    crl_seconds: float | None
    ocsp_seconds: float | None

    @property
    def visible(self) -> bool:
        return self.seconds is not None


def measurements(session: Session, fingerprints: Collection[str] | None = None, *,
                 since: dt.datetime | None = None, until: dt.datetime | None = None) -> dict[str, Measurement]:
    """The latest measurement of each certificate (of ``fingerprints`` only, when given), from events in
    ``[since, until]``; keyed by fingerprint."""
    e = AuditEvent
    query = sa.select(col(e.seq), col(e.at), col(e.object), col(e.details)).where(col(e.action) == EVENT)
    if fingerprints is not None:
        if not fingerprints:
            return {}
        query = query.where(col(e.object).in_([f"certificate:{fp}" for fp in fingerprints]))
    if since is not None:
        query = query.where(col(e.at) >= since)
    if until is not None:
        query = query.where(col(e.at) <= until)
    found: dict[str, Measurement] = {}
    for row in session.connection().execute(query.order_by(col(e.seq))):
        details = json.loads(row.details)
        fingerprint = row.object.removeprefix("certificate:")
        found[fingerprint] = Measurement(fingerprint, row.seq, row.at, _seconds(details.get("seconds")),
                                         _seconds(details.get("crl_seconds")), _seconds(details.get("ocsp_seconds")))
    return found


def _seconds(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
