"""The expiry report: what expires when, in the bands operators alert on."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col

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


def band_bounds(now: dt.datetime) -> list[tuple[str, dt.datetime | None]]:
    """Each band's label and the instant its certificates expire before (None: no bound). The one
    banding rule: the counts (in SQL) and each listed row's band both use it, on exact times."""
    return [(label, None if bound == float("inf") else now + dt.timedelta(days=bound)) for label, bound in BANDS]


def band_of(not_after: dt.datetime, now: dt.datetime) -> str:
    """The band of a certificate that expires at ``not_after``, seen at ``now``."""
    return next(label for label, before in band_bounds(now) if before is None or not_after < before)


def expiry_report(session: Session, now: dt.datetime | None = None, show: int = 20,
                  include_ca: bool = False) -> ExpiryReport:
    """Counts per band over active certificates (leaves only unless ``include_ca``), and the soonest
    ``show`` of them (none for 0)."""
    if show < 0:
        raise ValueError(f"show must be 0 or more, not {show}")
    now = now or utcnow()
    condition = [col(Certificate.status) == "active"]
    if not include_ca:
        condition.append(col(Certificate.is_ca).is_(False))
    bounded = [before for _, before in band_bounds(now) if before is not None]
    cases = sa.case(*[(col(Certificate.not_after) < before, i) for i, before in enumerate(bounded)], else_=len(bounded))
    counts = {int(band): int(n) for band, n in session.execute(
        sa.select(cases, sa.func.count()).where(*condition).group_by(cases)).all()}
    bands = {label: int(counts.get(i, 0)) for i, (label, _) in enumerate(BANDS)}
    soonest = list_certificates(session, CertificateQuery(in_service=True, is_ca=None if include_ca else False,
                                                          limit=show), now) if show else []
    for row in soonest:
        row["band"] = band_of(dt.datetime.fromisoformat(row["not_after"].replace("Z", "+00:00")), now)
    return ExpiryReport(now, bands, soonest)
