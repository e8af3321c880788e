"""The expiry report: what expires when, in the bands operators alert on."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session

from certpilot.inventory import CertificateQuery, iso, list_certificates, utcnow
from certpilot.models import Certificate

# (label, upper bound in days); a certificate falls in the first band whose bound it is under.
BANDS: tuple[tuple[str, float], ...] = (("expired", 0), ("7 days", 7), ("30 days", 30), ("90 days", 90),
                                        ("later", float("inf")))


@dataclass(frozen=True)
class ExpiryReport:
    generated_at: dt.datetime
    bands: dict[str, int]
    soonest: list[dict[str, Any]]

    def as_dict(self) -> dict[str, Any]:
        return {"generated_at": iso(self.generated_at), "bands": self.bands, "soonest": self.soonest}


def band_of(days_left: float) -> str:
    return next(label for label, bound in BANDS if days_left < bound)


def expiry_report(session: Session, now: dt.datetime | None = None, show: int = 20,
                  include_ca: bool = False) -> ExpiryReport:
    """Counts per band over active certificates (leaves only unless ``include_ca``), and the soonest ``show``."""
    now = now or utcnow()
    condition = [Certificate.status == "active"]
    if not include_ca:
        condition.append(Certificate.is_ca.is_(False))  # type: ignore[attr-defined]
    bounds = [b for _, b in BANDS[:-1]]
    cases = sa.case(*[(Certificate.not_after < now + dt.timedelta(days=b), i) for i, b in enumerate(bounds)],
                    else_=len(bounds))
    counts = dict(session.execute(sa.select(cases, sa.func.count()).where(*condition).group_by(cases)).all())
    bands = {label: int(counts.get(i, 0)) for i, (label, _) in enumerate(BANDS)}
    soonest = list_certificates(session, CertificateQuery(in_service=True, is_ca=None if include_ca else False,
                                                          limit=show), now)
    for row in soonest:
        row["band"] = band_of(row["days_left"])
    return ExpiryReport(now, bands, soonest)
