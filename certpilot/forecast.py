"""The 47-day readiness forecast: every renewal from now to a date, under the lifetimes in force on each
date, against each issuer's rate limits.

What is projected. Each active managed certificate renews first when certpilot.managed.schedule says
(its renew-before, two thirds of its lifetime, or the CA's ARI window, with the stable jitter of
certpilot.renewal); every later certificate is issued with the lifetime in force on the day it is issued
and renewed at ``lifetime_fraction`` of it (or its renew-before), less a jitter of up to
``jitter_fraction`` of it, as certpilot.renewal does (the jitter of a future certificate, whose fingerprint
is not known yet, is a fixed sequence per managed certificate). Renewals happen at the renew-due
deployment's hourly runs: a renewal counts in the hour it falls due, and the next certificate starts then.
Optionally, and counted apart, the unmanaged publicly trusted certificates (active, not expired, not CA
certificates, not from a certpilot private CA, not self-signed; one per issuer and exact set of names) are
renewed by hand, each ``min(30 days, a third of its lifetime)`` before it expires (one already past that
point at a stable random time in the first half of the time it has left).

Lifetimes on a date, by the kind of issuer:
- ``public``: min(the validity asked for: the managed certificate's validity_days, else its current
  certificate's lifetime; the CA/B Forum maximum on that date, certpilot.ca.max_validity_days: 398 days,
  200 from 2026-03-15, 100 from 2027-03-15, 47 from 2029-03-15 (SC-081)).
- ``lets-encrypt`` (an ACME directory certpilot.rate_limits.limits_for knows as Let's Encrypt's): the
  ``classic`` profile certpilot's ACME issuer gets (it asks for no profile and no validity), as announced in
  "Decreasing Certificate Lifetimes to 45 Days" (https://letsencrypt.org/2025/12/02/from-90-to-45):
  90 days now; 64 days from 2027-02-10; 45 days from 2028-02-16. (The opt-in ``tlsserver`` profile issues
  45-day certificates from 2026-05-13, and ``shortlived`` 6-day ones; certpilot does not request them.)
- ``private``: the private CA profile's default (certpilot.ca.CA_PROFILES), or validity_days up to the
  profile's maximum; no CA/B schedule.

Validations. A renewal validates each of its names afresh when its last validation is older than the reuse
period on that date (counted per certificate: names shared by several certificates are counted for each):
public CAs, the CA/B Forum's domain-validation reuse: 398 days, 200 from 2026-03-15, 100 from 2027-03-15,
10 from 2029-03-15; Let's Encrypt, its authorization reuse (same announcement): 30 days, 10 days from
2027-02-10, 7 hours from 2028-02-16; private CAs validate nothing. A current certificate's names count as
validated when it was issued.

Rate limits. Each issuer's limits are the ones given for it (``IssuerSettings``, e.g. from
``certpilot report forecast --limits FILE``: issuer blocks configure none), else the published ones of its
ACME directory (Let's Encrypt's: certpilot.rate_limits), else none. Compared over sliding windows, as Let's
Encrypt counts: new orders per account (the issuer block) in any 3 hours; certificates per registered
domain (certpilot.rate_limits.registered_domain) in any 7 days; certificates for one exact set of names in
any 7 days (duplicates). Every renewal counts as a new certificate, the conservative reading (as
certpilot.blast_radius): Let's Encrypt exempts renewals of the same names from the per-domain limit and
renewals it suggested by ARI from all limits, so an exceedance is what happens without those exemptions.
An exceedance is named by the week (Monday, UTC) its busiest window starts in, the subject (the account,
the registered domain or the names), the count and by how much it is over. Unmanaged certificates are
shown but not compared (their accounts are not known).

Spreading. The same forecast with every renewal of a managed certificate spread evenly over the
``spread_fraction`` of its lifetime before its scheduled time, the certificates of an issuer at evenly
spaced points of it (ranked by a hash of their names); the first renewal too, unless it is due sooner than
that span from now (it keeps its time): what a wider jitter would do to the peaks and the exceedances, and
what it costs in extra renewals.

``forecast`` reads the inventory (one session) and projects; ``forecast_markdown`` renders the ``forecast``
artifact; ``ForecastReport.as_dict`` is ``--json``. No Prefect, no network here.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import sqlalchemy as sa
from sqlmodel import Session, col

from certpilot import ca, managed
from certpilot.clock import utcnow
from certpilot.errors import InvalidOptionError
from certpilot.models import AcmeAccount, Certificate, CertificateAuthority, ManagedCertificate, SubjectAltName
from certpilot.rate_limits import LETS_ENCRYPT, LETS_ENCRYPT_STAGING, RateLimits, limits_for, registered_domain
from certpilot.renewal import RenewalPolicy, stable_fraction
from certpilot.views import escape, png_data_uri
from certpilot.yaml_file import YamlReader

__all__ = ["DEFAULT_UNTIL", "KINDS", "LISTED", "LIMIT_DOMAIN", "LIMIT_DUPLICATES", "LIMIT_ORDERS", "SPREAD_FRACTION",
           "Exceedance", "ForecastReport", "IssuerForecast", "IssuerProfile", "IssuerSettings", "Load", "PublicTest",
           "forecast", "forecast_markdown", "issuer_profiles", "lets_encrypt_days", "lifetime_days", "limits_text",
           "managed_issuers", "parse_issuer_settings", "validation_reuse"]

DEFAULT_UNTIL = dt.date(2029, 12, 31)
SPREAD_FRACTION = 1 / 6  # spread: renewals anywhere in the sixth of the lifetime before their scheduled time
KINDS = ("lets-encrypt", "public", "private")
LIMIT_ORDERS = "new-orders-per-account-per-3h"
LIMIT_DOMAIN = "certificates-per-registered-domain-per-week"
LIMIT_DUPLICATES = "duplicate-certificates-per-week"
MANUAL_RENEW_BEFORE_DAYS = 30  # unmanaged certificates: renewed by hand this long before expiry (at most 1/3)
MIN_INTERVAL_DAYS = 1.0  # a renewal policy renewing sooner than this after issuance is flagged, not followed
LISTED = 50  # exceedances listed per issuer in the artifact and the CLI's text

# Let's Encrypt's classic profile and authorization reuse (https://letsencrypt.org/2025/12/02/from-90-to-45).
_LE_CLASSIC_DAYS = ((dt.date(2028, 2, 16), 45), (dt.date(2027, 2, 10), 64))
_LE_CLASSIC_DAYS_BEFORE = 90
_LE_AUTHZ_REUSE = ((dt.date(2028, 2, 16), dt.timedelta(hours=7)), (dt.date(2027, 2, 10), dt.timedelta(days=10)))
_LE_AUTHZ_REUSE_BEFORE = dt.timedelta(days=30)
# The CA/B Forum's domain-validation reuse (Baseline Requirements 3.2.2.4 / 4.2.1, SC-081), by validation date.
_DV_REUSE = ((dt.date(2029, 3, 15), 10), (dt.date(2027, 3, 15), 100), (dt.date(2026, 3, 15), 200))
_DV_REUSE_BEFORE = 398

_UTC = dt.timezone.utc
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=_UTC)
_PHI = (math.sqrt(5) - 1) / 2  # spread: a generation's point is frac(point + g * phi), still evenly spaced
_NO_LIMIT = np.iinfo(np.int64).max
_SHIFT = np.int64(1) << np.int64(32)  # group * _SHIFT + hour: one sortable key
_KIND_CODE = {kind: code for code, kind in enumerate(KINDS)}
_LE, _PUBLIC, _PRIVATE = (_KIND_CODE[k] for k in KINDS)
_ORG = re.compile(r"(?:^|,)O=((?:[^,\\]|\\.)*)")
_CN = re.compile(r"(?:^|,)CN=((?:[^,\\]|\\.)*)")


# ------------------------------------------------------------------------------------ the schedules

def _day(day: dt.date | dt.datetime) -> dt.date:
    if isinstance(day, dt.datetime):
        if day.tzinfo is None:
            raise ValueError("use an aware UTC datetime")
        return day.astimezone(_UTC).date()
    return day


def lets_encrypt_days(day: dt.date | dt.datetime) -> int:
    """The lifetime of a Let's Encrypt certificate of the classic profile issued on ``day`` (UTC)."""
    day = _day(day)
    return next((days for since, days in _LE_CLASSIC_DAYS if day >= since), _LE_CLASSIC_DAYS_BEFORE)


def lifetime_days(kind: str, day: dt.date | dt.datetime, requested: int | None = None) -> int:
    """The lifetime, in days, of a certificate issued on ``day`` by an issuer of ``kind``: public, the
    validity ``requested`` (None: the most allowed) cut at the CA/B Forum maximum of that day; Let's
    Encrypt, its classic profile's; private, ``requested`` (its profile's default when None)."""
    if kind == "lets-encrypt":
        return lets_encrypt_days(day)
    if kind == "public":
        most = ca.max_validity_days(_day(day))
        return most if requested is None else min(requested, most)
    if kind == "private":
        return requested if requested is not None else ca.CA_PROFILES["tls-server"].default_days
    raise ValueError(f"unknown kind of issuer {kind!r}; one of {', '.join(KINDS)}")


def validation_reuse(kind: str, day: dt.date | dt.datetime) -> dt.timedelta | None:
    """How long a validation of a name may be reused on ``day`` by an issuer of ``kind``; None: the issuer
    validates nothing (a private CA)."""
    day = _day(day)
    if kind == "lets-encrypt":
        return next((reuse for since, reuse in _LE_AUTHZ_REUSE if day >= since), _LE_AUTHZ_REUSE_BEFORE)
    if kind == "public":
        return dt.timedelta(days=next((days for since, days in _DV_REUSE if day >= since), _DV_REUSE_BEFORE))
    if kind == "private":
        return None
    raise ValueError(f"unknown kind of issuer {kind!r}; one of {', '.join(KINDS)}")


@dataclass(frozen=True)
class _Steps:
    """A step function of the day (days since 1970-01-01, UTC): ``values[i]`` from ``starts[i]`` on."""

    starts: np.ndarray
    values: np.ndarray

    @classmethod
    def scan(cls, value: Callable[[dt.date], float], first: dt.date, last: dt.date) -> _Steps:
        starts: list[int] = []
        values: list[float] = []
        day = first
        while day <= last:
            v = value(day)
            if not values or v != values[-1]:
                starts.append((day - _EPOCH.date()).days)
                values.append(v)
            day += dt.timedelta(days=1)
        return cls(np.array(starts, dtype=np.int64), np.array(values, dtype=np.float64))

    def at(self, days: np.ndarray) -> np.ndarray:
        return self.values[np.clip(np.searchsorted(self.starts, days, side="right") - 1, 0, None)]

    def changes(self) -> list[tuple[dt.date, float]]:
        return [(_EPOCH.date() + dt.timedelta(days=int(s)), float(v)) for s, v in zip(self.starts[1:], self.values[1:])]


@dataclass(frozen=True)
class _Schedules:
    cabf: _Steps  # the CA/B Forum maximum validity, days
    lets_encrypt: _Steps  # Let's Encrypt's classic lifetime, days
    dv_reuse: _Steps  # hours
    le_reuse: _Steps  # hours

    @classmethod
    def between(cls, first: dt.date, last: dt.date) -> _Schedules:
        def hours(kind: str) -> Callable[[dt.date], float]:
            return lambda d: (validation_reuse(kind, d) or dt.timedelta(0)) / dt.timedelta(hours=1)
        return cls(_Steps.scan(ca.max_validity_days, first, last), _Steps.scan(lets_encrypt_days, first, last),
                   _Steps.scan(hours("public"), first, last), _Steps.scan(hours("lets-encrypt"), first, last))

    def lifetime(self, kind: np.ndarray, requested: np.ndarray, days: np.ndarray) -> np.ndarray:
        cabf = self.cabf.at(days)
        public = np.where(np.isnan(requested), cabf, np.minimum(requested, cabf))
        return np.where(kind == _LE, self.lets_encrypt.at(days), np.where(kind == _PUBLIC, public, requested))

    def reuse_hours(self, kind: np.ndarray, days: np.ndarray) -> np.ndarray:
        return np.where(kind == _LE, self.le_reuse.at(days), np.where(kind == _PUBLIC, self.dv_reuse.at(days), np.inf))

    def changes(self) -> list[tuple[dt.date, str]]:
        out = [(d, f"CA/B Forum maximum validity {v:g} days") for d, v in self.cabf.changes()]
        out += [(d, f"CA/B Forum domain-validation reuse {v / 24:g} days") for d, v in self.dv_reuse.changes()]
        out += [(d, f"Let's Encrypt classic profile {v:g} days") for d, v in self.lets_encrypt.changes()]
        out += [(d, "Let's Encrypt authorization reuse " + (f"{v / 24:g} days" if v >= 24 else f"{v:g} hours"))
                for d, v in self.le_reuse.changes()]
        return sorted(out)


# ------------------------------------------------------------------------------------------ issuers

@dataclass(frozen=True)
class IssuerSettings:
    """What an operator says of an issuer: its kind (None: decided from the inventory) and its rate limits
    (None: its published ones, if any)."""

    kind: str | None = None
    limits: RateLimits | None = None

    def __post_init__(self) -> None:
        if self.kind is not None and self.kind not in KINDS:
            raise InvalidOptionError("kind", self.kind, " or ".join(KINDS))


@dataclass(frozen=True)
class IssuerProfile:
    """An issuer as the forecast sees it: its kind, its limits (None: none known) and on what basis."""

    name: str
    kind: str
    limits: RateLimits | None
    basis: str

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "limits": self.limits.as_dict() if self.limits else None,
                "basis": self.basis}


def managed_issuers(session: Session) -> list[str]:
    """The issuer blocks of the active managed certificates."""
    return sorted(session.execute(sa.select(col(ManagedCertificate.issuer)).distinct()
                                  .where(col(ManagedCertificate.status) == "active")).scalars())


def issuer_profiles(session: Session, names: Iterable[str], directories: Mapping[str, str] | None = None,
                    given: Mapping[str, IssuerSettings] | None = None) -> dict[str, IssuerProfile]:
    """The kind and limits of each issuer block in ``names``: what is ``given``, else a private CA block
    (``private-ca/...``) is private, else its ACME directory (``directories``, else the inventory's ACME
    account of that issuer) decides (Let's Encrypt's is ``lets-encrypt`` with its published limits, any
    other ``public`` without), else it is assumed a public CA without known limits."""
    names = sorted(set(names))
    directories = dict(directories or {})
    wanted = [n for n in names if n not in directories]
    for start in range(0, len(wanted), 500):
        for name, url in session.execute(sa.select(col(AcmeAccount.name), col(AcmeAccount.directory_url))
                                         .where(col(AcmeAccount.name).in_(wanted[start:start + 500]))
                                         .order_by(col(AcmeAccount.created_at))):
            directories[name] = url  # the newest account wins
    given = given or {}
    out = {}
    for name in names:
        url = directories.get(name)
        published = limits_for(url)
        if name.partition("/")[0] == "private-ca":
            kind, basis = "private", "a certpilot private CA block"
        elif url is not None:
            le = published in (LETS_ENCRYPT, LETS_ENCRYPT_STAGING)
            kind, basis = ("lets-encrypt" if le else "public"), f"ACME directory {url}"
        else:
            kind, basis = "public", "no ACME directory known: assumed a public CA"
        limits = published
        settings = given.get(name)
        if settings is not None and settings.kind is not None:
            kind, basis = settings.kind, "kind as given"
        if settings is not None and settings.limits is not None:
            limits = _merged(settings.limits, published)
            basis += "; limits as given"
        out[name] = IssuerProfile(name, kind, limits, basis)
    return out


_LIMIT_KEYS = ("new_orders_per_account_per_3h", "certificates_per_registered_domain_per_week",
               "duplicate_certificates_per_week")


def parse_issuer_settings(text: str, source: str) -> dict[str, IssuerSettings]:
    """Issuer settings from YAML: a mapping of issuer block (``acme-issuer/corp``) to ``kind`` (one of KINDS)
    and any of the three limits (whole numbers); a limit not given is the published one, if any, else none.
    PolicyFileError naming the line otherwise."""
    reader = YamlReader(source)
    out: dict[str, IssuerSettings] = {}
    for key, value in reader.pairs(reader.document(text), "the issuers"):
        name = reader.text(key, "an issuer block")
        if "/" not in name:
            raise reader.fail(key, f"{name!r} is not an issuer block: use <block-type-slug>/<block-name>, "
                                   "e.g. acme-issuer/letsencrypt")
        found = reader.mapping(value, name, ("kind", "name", *_LIMIT_KEYS))
        kind = None
        if "kind" in found:
            kind = reader.text(found["kind"][1], f"{name}'s kind")
            if kind not in KINDS:
                raise reader.fail(found["kind"][1], f"{name}'s kind {kind!r} is not one of {', '.join(KINDS)}")
        limits = None
        if any(k in found for k in _LIMIT_KEYS):
            numbers = {k: reader.integer(found[k][1], f"{name}'s {k}") if k in found else None for k in _LIMIT_KEYS}
            label = reader.text(found["name"][1], f"{name}'s name") if "name" in found else name
            limits = RateLimits(label, numbers[_LIMIT_KEYS[0]], numbers[_LIMIT_KEYS[1]], numbers[_LIMIT_KEYS[2]])
        out[name] = IssuerSettings(kind, limits)
    return out


def _merged(given: RateLimits | None, published: RateLimits | None) -> RateLimits | None:
    if given is None or published is None:
        return given or published
    return RateLimits(given.name,
                      *(getattr(given, k) if getattr(given, k) is not None else getattr(published, k)
                        for k in _LIMIT_KEYS))


class PublicTest(Protocol):
    """Whether a certificate of this issuer is publicly trusted (certpilot.policy.Policy.is_public)."""

    def __call__(self, issuer_dn: str, *, private_ca: bool, self_signed: bool) -> bool: ...


def _default_public(issuer_dn: str, *, private_ca: bool, self_signed: bool) -> bool:
    return not private_ca and not self_signed


def _organisation(issuer_dn: str) -> str:
    found = _ORG.search(issuer_dn) or _CN.search(issuer_dn)
    return found.group(1).replace("\\", "") if found else issuer_dn


# -------------------------------------------------------------------------------------------- records

@dataclass(frozen=True)
class Exceedance:
    """A rate limit exceeded: the week (its Monday, UTC) in which the busiest window over the limit starts,
    what is counted (the issuer's account, a registered domain, or a set of names), how many, the limit."""

    limit: str  # LIMIT_ORDERS, LIMIT_DOMAIN or LIMIT_DUPLICATES
    week: dt.date
    subject: str
    window_start: dt.datetime
    count: int
    allowed: int

    @property
    def over(self) -> int:
        return self.count - self.allowed

    def as_dict(self) -> dict[str, Any]:
        return {"limit": self.limit, "week": self.week.isoformat(), "subject": self.subject,
                "window_start": _iso(self.window_start), "count": self.count, "allowed": self.allowed,
                "over": self.over}


@dataclass(frozen=True)
class Load:
    """One issuer's renewals in one scenario: per week (the report's weeks), per year, the busiest week,
    hour and 3 hours, the validations per year, and every exceedance of its limits."""

    weekly: tuple[int, ...]
    renewals_per_year: dict[int, int]
    validations_per_year: dict[int, int]
    peak_week: dt.date | None
    peak_week_renewals: int
    peak_hour: dt.datetime | None
    peak_hour_renewals: int
    peak_3h: dt.datetime | None
    peak_3h_renewals: int
    exceedances: tuple[Exceedance, ...]

    @property
    def renewals(self) -> int:
        return sum(self.weekly)

    def as_dict(self) -> dict[str, Any]:
        return {"renewals": self.renewals, "renewals_per_year": {str(y): n for y, n in self.renewals_per_year.items()},
                "validations_per_year": {str(y): n for y, n in self.validations_per_year.items()},
                "peak_week": self.peak_week.isoformat() if self.peak_week else None,
                "peak_week_renewals": self.peak_week_renewals, "peak_hour": _iso(self.peak_hour),
                "peak_hour_renewals": self.peak_hour_renewals, "peak_3h": _iso(self.peak_3h),
                "peak_3h_renewals": self.peak_3h_renewals, "exceedances": [e.as_dict() for e in self.exceedances],
                "weekly": list(self.weekly)}


@dataclass(frozen=True)
class IssuerForecast:
    """One issuer block's managed certificates (or, ``managed`` False, the unmanaged certificates of one
    issuing organisation): as scheduled, and spread. ``weekly_limit``: the most its limits let it issue
    in a week (its orders per 3 hours times 56, or its per-domain limit times the registered domains its
    certificates use, the lower), None without limits."""

    issuer: str
    kind: str
    managed: bool
    basis: str
    certificates: int
    limits: RateLimits | None
    registered_domains: int
    weekly_limit: int | None
    scheduled: Load
    spread: Load
    notes: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"issuer": self.issuer, "kind": self.kind, "managed": self.managed, "basis": self.basis,
                "certificates": self.certificates, "limits": self.limits.as_dict() if self.limits else None,
                "registered_domains": self.registered_domains, "weekly_limit": self.weekly_limit,
                "scheduled": self.scheduled.as_dict(), "spread": self.spread.as_dict(), "notes": list(self.notes)}


@dataclass(frozen=True)
class ForecastReport:
    """Every renewal from ``generated_at`` to the end of ``until``: per issuer, per week (``weeks``: each
    week's Monday), as scheduled and spread; the schedule changes in the period."""

    generated_at: dt.datetime
    until: dt.date
    weeks: tuple[dt.date, ...]
    issuers: tuple[IssuerForecast, ...]
    changes: tuple[tuple[dt.date, str], ...]
    lifetime_fraction: float
    jitter_fraction: float
    spread_fraction: float
    years: tuple[int, ...] = field(default=())

    def totals_per_year(self, *, managed: bool = True, spread: bool = False) -> dict[int, int]:
        """Renewals per year of the managed (or the unmanaged) certificates, every issuer together."""
        out = {year: 0 for year in self.years}
        for f in self.issuers:
            if f.managed == managed:
                for year, n in (f.spread if spread else f.scheduled).renewals_per_year.items():
                    out[year] = out.get(year, 0) + n
        return out

    @property
    def exceedances(self) -> list[tuple[str, Exceedance]]:
        return [(f.issuer, e) for f in self.issuers for e in f.scheduled.exceedances]

    def as_dict(self) -> dict[str, Any]:
        def per_year(values: dict[int, int]) -> dict[str, int]:
            return {str(y): n for y, n in values.items()}
        return {"generated_at": _iso(self.generated_at), "until": self.until.isoformat(),
                "weeks": [w.isoformat() for w in self.weeks],
                "assumptions": {"lifetime_fraction": self.lifetime_fraction, "jitter_fraction": self.jitter_fraction,
                                "spread_fraction": self.spread_fraction,
                                "renewals": "hourly renew-due runs; every renewal counted as a new certificate"},
                "changes": [{"date": d.isoformat(), "change": text} for d, text in self.changes],
                "totals_per_year": {"managed": per_year(self.totals_per_year()),
                                    "managed_spread": per_year(self.totals_per_year(spread=True)),
                                    "unmanaged": per_year(self.totals_per_year(managed=False))},
                "exceedances": len(self.exceedances),
                "spread_exceedances": sum(len(f.spread.exceedances) for f in self.issuers),
                "issuers": [f.as_dict() for f in self.issuers]}


def _iso(value: dt.datetime | None) -> str | None:
    return value.astimezone(_UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if value is not None else None


def _hours(moment: dt.datetime) -> float:
    return (moment - _EPOCH) / dt.timedelta(hours=1)


def _moment(hour: int) -> dt.datetime:
    return _EPOCH + dt.timedelta(hours=int(hour))


# ------------------------------------------------------------------------------------------- the fleet

@dataclass
class _Fleet:
    """The certificates to project, as arrays (one entry per certificate), and their groups."""

    groups: list[tuple[str, bool]] = field(default_factory=list)  # (issuer, managed) per group index
    group: list[int] = field(default_factory=list)
    kind: list[int] = field(default_factory=list)
    requested: list[float] = field(default_factory=list)  # days; nan: the most allowed (public)
    renew_before: list[float] = field(default_factory=list)  # days; nan: none
    manual: list[bool] = field(default_factory=list)
    first: list[float] = field(default_factory=list)  # hours since the epoch: when it first falls due
    current_days: list[float] = field(default_factory=list)  # the current certificate's lifetime (0: none)
    validated: list[float] = field(default_factory=list)  # hours: the current certificate's names validated
    seed: list[int] = field(default_factory=list)  # 64 bits of the SHA-256 of its label
    label: list[str] = field(default_factory=list)
    names: list[tuple[str, ...]] = field(default_factory=list)

    def add(self, group: int, kind: int, requested: float, renew_before: float, manual: bool, first: float,
            current_days: float, validated: float, label: str, names: tuple[str, ...]) -> None:
        self.group.append(group)
        self.kind.append(kind)
        self.requested.append(requested)
        self.renew_before.append(renew_before)
        self.manual.append(manual)
        self.first.append(first)
        self.current_days.append(current_days)
        self.validated.append(validated)
        self.seed.append(int.from_bytes(hashlib.sha256(label.encode()).digest()[:8], "big"))
        self.label.append(label)
        self.names.append(names)

    def group_of(self, issuer: str, is_managed: bool) -> int:
        key = (issuer, is_managed)
        if key not in self.groups:
            self.groups.append(key)
        return self.groups.index(key)


def _read_managed(session: Session, fleet: _Fleet, profiles: Mapping[str, IssuerProfile], now: dt.datetime) -> None:
    group_index: dict[str, int] = {}
    for item in managed.schedule(session, now):
        m = item.managed
        profile = profiles[m.issuer]
        kind = _KIND_CODE[profile.kind]
        current_days = 0.0
        if item.current is not None:
            current_days = (item.current.not_after - item.current.not_before) / dt.timedelta(days=1)
        if profile.kind == "private":
            ca_profile = ca.CA_PROFILES.get(m.profile, ca.CA_PROFILES["tls-server"])
            requested = float(min(m.validity_days or ca_profile.default_days, ca_profile.max_days))
        elif m.validity_days is not None:
            requested = float(m.validity_days)
        else:
            requested = float(round(current_days)) if current_days else math.nan
        if m.issuer not in group_index:
            group_index[m.issuer] = fleet.group_of(m.issuer, True)
        names = tuple(sorted({*(n.lower() for n in m.dns_names), *m.ip_addresses}))
        validated = _hours(item.current.not_before) if item.current is not None else -math.inf
        fleet.add(group_index[m.issuer], kind, requested,
                  float(m.renew_before_days) if m.renew_before_days is not None else math.nan, False,
                  _hours(item.decision.renew_at), current_days, validated, m.name, names)


def _read_unmanaged(session: Session, fleet: _Fleet, now: dt.datetime, is_public: PublicTest) -> None:
    ca_fps: set[str] = set()
    for root, issuing in session.execute(sa.select(col(CertificateAuthority.root_fingerprint),
                                                   col(CertificateAuthority.issuing_fingerprint))):
        ca_fps |= {root, issuing}
    rows = session.execute(
        sa.select(col(Certificate.fingerprint_sha256), col(Certificate.issuer), col(Certificate.not_before),
                  col(Certificate.not_after), col(Certificate.self_signed), col(Certificate.issuer_fingerprint))
        .where(col(Certificate.status) == "active", col(Certificate.is_ca).is_(False),
               col(Certificate.managed_certificate_id).is_(None), col(Certificate.not_after) > now)).all()
    public = [r for r in rows if is_public(r.issuer, private_ca=r.issuer_fingerprint in ca_fps,
                                           self_signed=bool(r.self_signed))]
    names: dict[str, set[str]] = {}
    fps = [r.fingerprint_sha256 for r in public]
    for start in range(0, len(fps), 500):
        for fp, kind, value in session.execute(
                sa.select(col(SubjectAltName.certificate_fingerprint), col(SubjectAltName.kind),
                          col(SubjectAltName.value))
                .where(col(SubjectAltName.certificate_fingerprint).in_(fps[start:start + 500]),
                       col(SubjectAltName.kind).in_(("DNS", "IP")))):
            names.setdefault(fp, set()).add(value.lower())
    newest: dict[tuple[str, tuple[str, ...]], Any] = {}  # one per issuer and names: the latest to expire
    for r in public:
        key = (r.issuer, tuple(sorted(names.get(r.fingerprint_sha256, ()))))
        if key[1] and (key not in newest or r.not_after > newest[key].not_after):
            newest[key] = r
    for (issuer_dn, cert_names), r in sorted(newest.items(), key=lambda kv: kv[1].fingerprint_sha256):
        organisation = _organisation(issuer_dn)
        kind = _LE if "let's encrypt" in organisation.lower() else _PUBLIC
        lifetime = (r.not_after - r.not_before) / dt.timedelta(days=1)
        before = min(MANUAL_RENEW_BEFORE_DAYS, lifetime / 3)
        group = fleet.group_of(f"unmanaged: {organisation}", False)
        due = _hours(r.not_after) - before * 24
        if due < _hours(now):  # already in its last stretch: renewed by hand in the first half of the time left
            due = _hours(now) + (_hours(r.not_after) - _hours(now)) / 2 * stable_fraction(r.fingerprint_sha256)
        fleet.add(group, kind, float(round(lifetime)), math.nan, True, due, 0.0, _hours(r.not_before),
                  r.fingerprint_sha256, cert_names)


# ------------------------------------------------------------------------------------------ projection

@dataclass(frozen=True)
class _Events:
    cert: np.ndarray  # int64: the certificate's index in the fleet
    hour: np.ndarray  # int64: hours since the epoch of the run that renews it
    validations: np.ndarray  # int64: names validated afresh by this renewal
    conflicts: dict[int, int]  # certificate -> first day (since the epoch) its renew-before was not followed


def _hashed(seed: np.ndarray, generation: int) -> np.ndarray:
    """A point in [0, 1) per 64-bit seed and generation (splitmix64): the jitter of a certificate not issued
    yet, independent from one generation to the next, as a new fingerprint's is."""
    z = seed + np.uint64(0x9E3779B97F4A7C15 * (generation + 1) % (1 << 64))  # array arithmetic wraps silently
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _project(a: dict[str, np.ndarray], schedules: _Schedules, start: int, end: int, fraction: float,
             jitter: float, first: np.ndarray, points: Callable[[np.ndarray, int], np.ndarray]) -> _Events:
    """Every renewal from hour ``start`` to before ``end``: each certificate from ``first`` (hours), one
    generation at a time for all certificates at once; ``points(certificates, generation)``: where in its
    jitter span each renewal falls."""
    idx = np.flatnonzero(first < end)
    hour = np.maximum(np.ceil(first[idx] - 1e-6).astype(np.int64), start)
    last_valid = a["validated"][idx]
    certs, hours, validations = [], [], []
    conflicts: dict[int, int] = {}
    generation = 0
    while idx.size:
        days = hour // 24
        kind = a["kind"][idx]
        stale = (hour - last_valid) > schedules.reuse_hours(kind, days)
        certs.append(idx)
        hours.append(hour)
        validations.append(np.where(stale, a["name_count"][idx], 0))
        last_valid = np.where(stale, hour.astype(np.float64), last_valid)
        generation += 1
        lifetime = schedules.lifetime(kind, a["requested"][idx], days)
        spread = lifetime * jitter * points(idx, generation)
        offset = lifetime * fraction - spread
        before = a["renew_before"][idx]
        capped = ~np.isnan(before) & (offset > lifetime - before)
        offset = np.where(capped, lifetime - np.where(np.isnan(before), 0.0, before) - spread, offset)
        offset = np.where(a["manual"][idx], lifetime - np.minimum(MANUAL_RENEW_BEFORE_DAYS, lifetime / 3), offset)
        bad = offset < MIN_INTERVAL_DAYS
        if bad.any():
            for cert, day in zip(idx[bad].tolist(), days[bad].tolist()):
                conflicts.setdefault(cert, day)
            offset = np.where(bad, lifetime * fraction - spread, offset)
        hour = hour + np.ceil(offset * 24 - 1e-6).astype(np.int64)
        keep = hour < end
        idx, hour, last_valid = idx[keep], hour[keep], last_valid[keep]
    if not certs:
        empty = np.zeros(0, dtype=np.int64)
        return _Events(empty, empty, empty, conflicts)
    return _Events(np.concatenate(certs), np.concatenate(hours), np.concatenate(validations), conflicts)


def _window_counts(group: np.ndarray, hour: np.ndarray, *widths: int) -> list[np.ndarray]:
    """For each event, the events of its group in the ``width`` hours from its own hour (sliding windows),
    for each of ``widths``: one sort for all."""
    key = group.astype(np.int64) * _SHIFT + hour  # hours since 1970 stay below 2**32
    order = np.argsort(key, kind="stable")
    ordered = key[order]
    first = np.searchsorted(ordered, ordered, "left")
    out = []
    for width in widths:
        counts = np.empty_like(key)
        counts[order] = np.searchsorted(ordered, ordered + width, "left") - first
        out.append(counts)
    return out


def _busiest(group: np.ndarray, count: np.ndarray, hour: np.ndarray, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Per group: the highest count (0 when none) and the earliest hour with it (-1)."""
    best, when = np.zeros(groups, dtype=np.int64), np.full(groups, np.iinfo(np.int64).max, dtype=np.int64)
    np.maximum.at(best, group, count)
    top = count == best[group]
    np.minimum.at(when, group[top], hour[top])
    return best, np.where(best > 0, when, -1)


def _exceeded(group: np.ndarray, hour: np.ndarray, counts: np.ndarray, allowed: np.ndarray, week0: int
              ) -> list[tuple[int, int, int, int]]:
    """(group, week, count, hour) of the busiest window over ``allowed[group]`` starting in each week;
    ``counts``: each event's window (``_window_counts``)."""
    over = counts > allowed[group]
    if not over.any():
        return []
    g, h, c = group[over], hour[over], counts[over]
    week = (h - week0) // 168
    order = np.lexsort((h, -c, week, g))
    g, week, c, h = g[order], week[order], c[order], h[order]
    first = np.r_[True, (g[1:] != g[:-1]) | (week[1:] != week[:-1])]
    return list(zip(g[first].tolist(), week[first].tolist(), c[first].tolist(), h[first].tolist()))


@dataclass(frozen=True)
class _Frame:
    """What the loads are counted against: the period, the fleet's groups, names and domains, the limits."""

    week0: int
    weeks: int
    years: tuple[int, ...]
    year_starts: np.ndarray
    groups: list[tuple[str, bool]]
    cert_group: np.ndarray
    domain_names: list[str]
    pair_domain: np.ndarray  # the registered domain of each (certificate, domain) pair, by certificate
    pair_start: np.ndarray
    pair_count: np.ndarray
    nameset_names: list[tuple[str, ...]]
    cert_nameset: np.ndarray
    limits: list[RateLimits | None]


def _limit(limits: list[RateLimits | None], attribute: str) -> np.ndarray:
    values = [getattr(x, attribute) if x is not None else None for x in limits]
    return np.array([_NO_LIMIT if v is None else v for v in values], dtype=np.int64)


def _loads(events: _Events, frame: _Frame) -> list[Load]:
    """Each group's load (in the order of ``frame.groups``)."""
    groups, weeks = len(frame.groups), frame.weeks
    group = frame.cert_group[events.cert]
    week = (events.hour - frame.week0) // 168
    weekly = np.bincount(group * weeks + week, minlength=groups * weeks).reshape(groups, weeks)
    year = np.searchsorted(frame.year_starts, events.hour, "right") - 1
    years = len(frame.years)
    per_year = np.bincount(group * years + year, minlength=groups * years).reshape(groups, years)
    checks = np.bincount(group * years + year, weights=events.validations, minlength=groups * years)
    checks = checks.reshape(groups, years).round().astype(np.int64)
    in_hour, in_3h = _window_counts(group, events.hour, 1, 3)
    hour_best, hour_when = _busiest(group, in_hour, events.hour, groups)
    three_best, three_when = _busiest(group, in_3h, events.hour, groups)

    found: list[list[Exceedance]] = [[] for _ in range(groups)]
    week_start = [_moment(frame.week0 + 168 * w).date() for w in range(weeks)]

    def record(limit: str, rows: list[tuple[int, int, int, int]], issuer_of: Callable[[int], int],
               subject: Callable[[int], str], allowed: np.ndarray) -> None:
        for g, w, c, h in rows:
            k = issuer_of(g)
            found[k].append(Exceedance(limit, week_start[w], subject(g), _moment(h), c, int(allowed[k])))

    orders = _limit(frame.limits, "new_orders_per_account_per_3h")
    record(LIMIT_ORDERS, _exceeded(group, events.hour, in_3h, orders, frame.week0), lambda g: g,
           lambda g: f"{frame.groups[g][0]} (its account)", orders)
    per_domain = _limit(frame.limits, "certificates_per_registered_domain_per_week")
    if (per_domain != _NO_LIMIT).any():
        n = frame.pair_count[events.cert]
        repeat = np.repeat(np.arange(events.cert.size), n)
        offsets = np.arange(repeat.size) - np.repeat(np.cumsum(n) - n, n)
        domain = frame.pair_domain[frame.pair_start[events.cert][repeat] + offsets]
        domains = max(len(frame.domain_names), 1)
        key, hours = group[repeat] * domains + domain, events.hour[repeat]
        [in_week] = _window_counts(key, hours, 168)
        record(LIMIT_DOMAIN, _exceeded(key, hours, in_week, np.repeat(per_domain, domains), frame.week0),
               lambda g: g // domains, lambda g: frame.domain_names[g % domains], per_domain)
    duplicates = _limit(frame.limits, "duplicate_certificates_per_week")
    if (duplicates != _NO_LIMIT).any():
        sets = max(len(frame.nameset_names), 1)
        key = group * sets + frame.cert_nameset[events.cert]
        [in_week] = _window_counts(key, events.hour, 168)
        record(LIMIT_DUPLICATES, _exceeded(key, events.hour, in_week, np.repeat(duplicates, sets), frame.week0),
               lambda g: g // sets, lambda g: ", ".join(frame.nameset_names[g % sets]), duplicates)

    out = []
    for k in range(groups):
        series = weekly[k]
        peak = int(series.argmax()) if series.size and series.max() > 0 else None
        load = Load(
            weekly=tuple(int(x) for x in series),
            renewals_per_year={y: int(per_year[k, i]) for i, y in enumerate(frame.years)},
            validations_per_year={y: int(checks[k, i]) for i, y in enumerate(frame.years)},
            peak_week=week_start[peak] if peak is not None else None,
            peak_week_renewals=int(series[peak]) if peak is not None else 0,
            peak_hour=_moment(hour_when[k]) if hour_when[k] >= 0 else None, peak_hour_renewals=int(hour_best[k]),
            peak_3h=_moment(three_when[k]) if three_when[k] >= 0 else None, peak_3h_renewals=int(three_best[k]),
            exceedances=tuple(sorted(found[k], key=lambda e: (e.week, e.limit, -e.over, e.subject))))
        out.append(load)
    return out


def _spread_first(a: dict[str, np.ndarray], u: np.ndarray, now_hour: float, fraction: float) -> np.ndarray:
    """The first renewal of each managed certificate moved earlier by ``u`` of its spread span, the
    ``fraction`` of its current lifetime before it. One due sooner than that span keeps its time: pulling
    it into the time left would crowd the next days instead of spreading them."""
    first = a["first"]
    span = fraction * a["current_days"] * 24
    movable = ~a["manual"] & (first - span >= now_hour)
    return np.where(movable, first - u * span, first)


def _even_points(group: np.ndarray, seed: np.ndarray) -> np.ndarray:
    """Per certificate, a point in [0, 1): the certificates of each group evenly spaced, ranked by seed."""
    order = np.lexsort((seed, group))
    ordered = group[order]
    starts = np.r_[0, np.flatnonzero(ordered[1:] != ordered[:-1]) + 1]
    sizes = np.diff(np.r_[starts, ordered.size])
    rank = np.arange(ordered.size) - np.repeat(starts, sizes)
    u = np.empty(ordered.size)
    u[order] = (rank + 0.5) / np.repeat(sizes, sizes)
    return u


def forecast(session: Session, *, now: dt.datetime | None = None, until: dt.date = DEFAULT_UNTIL,
             issuers: Mapping[str, IssuerSettings] | None = None, directories: Mapping[str, str] | None = None,
             unmanaged: bool = True, policy: RenewalPolicy | None = None, spread_fraction: float = SPREAD_FRACTION,
             is_public: PublicTest | None = None) -> ForecastReport:
    """Every renewal of the inventory's managed certificates (and, ``unmanaged``, of its unmanaged public
    ones, counted apart) from ``now`` to the end of ``until``, as scheduled and spread, per issuer and week,
    against each issuer's limits. ``issuers``: what an operator says of some issuers (kind, limits);
    ``directories``: issuer block -> ACME directory URL, when known better than the inventory's ACME
    accounts (from the blocks); ``policy``: the lifetime and jitter fractions of projected renewals
    (certpilot.renewal's defaults); ``is_public``: which unmanaged certificates are publicly trusted
    (default: not from a certpilot private CA and not self-signed)."""
    now = (now or utcnow()).astimezone(_UTC)
    if until <= now.date():
        raise InvalidOptionError("until", until.isoformat(), f"a date after today ({now.date().isoformat()})")
    if not 0 <= spread_fraction < 1:
        raise InvalidOptionError("spread_fraction", spread_fraction, "a fraction of the lifetime from 0 to below 1")
    policy = policy or RenewalPolicy()
    profiles = issuer_profiles(session, managed_issuers(session), directories, issuers)
    fleet = _Fleet()
    _read_managed(session, fleet, profiles, now)
    if unmanaged:
        _read_unmanaged(session, fleet, now, is_public or _default_public)
    return _forecast(fleet, profiles, now, until, policy, spread_fraction)


def _forecast(fleet: _Fleet, profiles: Mapping[str, IssuerProfile], now: dt.datetime, until: dt.date,
              policy: RenewalPolicy, spread_fraction: float) -> ForecastReport:
    start = int(math.ceil(_hours(now) - 1e-6))
    end = int(_hours(dt.datetime.combine(until + dt.timedelta(days=1), dt.time(), _UTC)))
    monday = dt.datetime.combine(now.date() - dt.timedelta(days=now.weekday()), dt.time(), _UTC)
    week0 = int(_hours(monday))
    weeks = (end - week0 + 167) // 168
    years = tuple(range(now.year, until.year + 1))
    year_starts = np.array([_hours(dt.datetime(y, 1, 1, tzinfo=_UTC)) for y in years], dtype=np.int64)
    schedules = _Schedules.between(now.date() - dt.timedelta(days=1), until)

    a = {"kind": np.array(fleet.kind, dtype=np.int64), "requested": np.array(fleet.requested, dtype=np.float64),
         "renew_before": np.array(fleet.renew_before, dtype=np.float64), "manual": np.array(fleet.manual, dtype=bool),
         "first": np.array(fleet.first, dtype=np.float64), "current_days": np.array(fleet.current_days),
         "validated": np.array(fleet.validated, dtype=np.float64),
         "name_count": np.array([len(n) for n in fleet.names], dtype=np.int64)}
    cert_group = np.array(fleet.group, dtype=np.int64)
    seed = np.array(fleet.seed, dtype=np.uint64)

    domain_ids: dict[str, int] = {}
    nameset_ids: dict[tuple[str, ...], int] = {}
    pair_cert, pair_domain, cert_nameset = [], [], []
    for i, names in enumerate(fleet.names):
        cert_nameset.append(nameset_ids.setdefault(names, len(nameset_ids)))
        for domain in sorted({_registered_domain(n) for n in names}):
            pair_cert.append(i)
            pair_domain.append(domain_ids.setdefault(domain, len(domain_ids)))
    pair_cert_a = np.array(pair_cert, dtype=np.int64)
    pair_count = np.bincount(pair_cert_a, minlength=len(fleet.names)).astype(np.int64)
    limits = [profiles[issuer].limits if is_managed else None for issuer, is_managed in fleet.groups]
    frame = _Frame(week0, weeks, years, year_starts, fleet.groups, cert_group, list(domain_ids),
                   np.array(pair_domain, dtype=np.int64), np.cumsum(pair_count) - pair_count, pair_count,
                   list(nameset_ids), np.array(cert_nameset, dtype=np.int64), limits)

    scheduled = _project(a, schedules, start, end, policy.lifetime_fraction, policy.jitter_fraction, a["first"],
                         lambda idx, generation: _hashed(seed[idx], generation))
    u = _even_points(cert_group, seed)
    spread = _project(a, schedules, start, end, policy.lifetime_fraction, spread_fraction,
                      _spread_first(a, u, float(start), spread_fraction),
                      lambda idx, generation: (u[idx] + generation * _PHI) % 1.0)
    as_scheduled, as_spread = _loads(scheduled, frame), _loads(spread, frame)

    out = []
    for k, (issuer, is_managed) in enumerate(fleet.groups):
        members = np.flatnonzero(cert_group == k)
        domains = {int(d) for d in frame.pair_domain[np.isin(pair_cert_a, members)]}
        if is_managed:
            profile = profiles[issuer]
            kind, basis, issuer_limits = profile.kind, profile.basis, profile.limits
        else:
            kind = KINDS[int(a["kind"][members[0]])]
            basis, issuer_limits = "unmanaged certificates renewed by hand, counted apart: limits not compared", None
        notes = _conflict_notes(scheduled.conflicts, members, fleet, a)
        out.append(IssuerForecast(issuer, kind, is_managed, basis, int(members.size), issuer_limits, len(domains),
                                  _weekly_limit(issuer_limits, len(domains)), as_scheduled[k], as_spread[k],
                                  tuple(notes)))
    out.sort(key=lambda f: (not f.managed, f.issuer))
    weeks_list = tuple((monday + dt.timedelta(weeks=w)).date() for w in range(weeks))
    changes = tuple((d, text) for d, text in schedules.changes() if now.date() < d <= until)
    return ForecastReport(now, until, weeks_list, tuple(out), changes, policy.lifetime_fraction,
                          policy.jitter_fraction, spread_fraction, years)


@functools.lru_cache(maxsize=65536)
def _domain_of_suffix(suffix: str) -> str:
    return registered_domain(suffix)


def _registered_domain(name: str) -> str:
    """certpilot.rate_limits.registered_domain, which looks at the last three labels only: a DNS name's is
    cached by them (a fleet's names share few)."""
    labels = name.rsplit(".", 3)
    if ":" in name or len(labels) < 4 or not any(c.isalpha() for c in labels[-1]):
        return registered_domain(name)  # an IP address, or nothing to share
    return _domain_of_suffix(".".join(labels[1:]))


def _weekly_limit(limits: RateLimits | None, domains: int) -> int | None:
    if limits is None:
        return None
    candidates = []
    if limits.new_orders_per_account_per_3h is not None:
        candidates.append(limits.new_orders_per_account_per_3h * 56)
    if limits.certificates_per_registered_domain_per_week is not None and domains:
        candidates.append(limits.certificates_per_registered_domain_per_week * domains)
    return min(candidates) if candidates else None


def _conflict_notes(conflicts: Mapping[int, int], members: np.ndarray, fleet: _Fleet,
                    a: dict[str, np.ndarray]) -> list[str]:
    mine = sorted((day, fleet.label[c], a["renew_before"][c]) for c in members.tolist() if c in conflicts
                  for day in (conflicts[c],))
    if not mine:
        return []
    first_day = (_EPOCH + dt.timedelta(days=mine[0][0])).date()
    named = ", ".join(f"{label} ({before:g} days)" for _, label, before in mine[:5])
    more = f" and {len(mine) - 5} more" if len(mine) > 5 else ""
    return [f"{len(mine)} certificate(s) renew less than {MIN_INTERVAL_DAYS:g} day after issuance from {first_day} "
            f"on, their renew-before being about their lifetime then: {named}{more}; certpilot would renew them at "
            f"every renew-due run. Projected at {RenewalPolicy().lifetime_fraction:.0%} of the lifetime instead: "
            "lower their renew_before_days"]


# -------------------------------------------------------------------------------------------- markdown

def _table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(escape(cell) for cell in row) + " |" for row in rows]


def limits_text(limits: RateLimits | None) -> str:
    """A rate limit record in words ("none known" for None)."""
    if limits is None:
        return "none known"
    parts = []
    if limits.new_orders_per_account_per_3h is not None:
        parts.append(f"{limits.new_orders_per_account_per_3h:,} new orders per account per 3 hours")
    if limits.certificates_per_registered_domain_per_week is not None:
        parts.append(f"{limits.certificates_per_registered_domain_per_week:,} certificates per registered domain "
                     "per week")
    if limits.duplicate_certificates_per_week is not None:
        parts.append(f"{limits.duplicate_certificates_per_week:,} duplicate certificates per week")
    return f"{limits.name}: " + ", ".join(parts) if parts else f"{limits.name}: none"


def _when(value: dt.datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M UTC") if value is not None else "-"


def _years(values: Mapping[int, int]) -> str:
    return ", ".join(f"{y}: {n:,}" for y, n in values.items())


def forecast_markdown(report: ForecastReport, chart_png: bytes | None = None) -> str:
    """The ``forecast`` artifact: per issuer, renewals per year, the busiest week, hour and 3 hours against
    its limits, the exceedances (week, subject, count, limit, by how much) and what spreading does; the
    chart (certpilot.charts.forecast_png) inline; the schedule changes and the assumptions."""
    managed_total = report.totals_per_year()
    lines = [f"# Renewal forecast to {report.until.isoformat()}", "",
             f"From {_when(report.generated_at)}: every renewal of the managed certificates under the lifetimes in "
             f"force on each date, against each issuer's rate limits. {len(report.exceedances)} limit(s) exceeded as "
             f"scheduled, {sum(len(f.spread.exceedances) for f in report.issuers)} with renewals spread.", ""]
    if chart_png is not None:
        lines += [f"![Renewals per week and issuer, with each issuer's weekly limit]({png_data_uri(chart_png)})", ""]
    lines += _table(("issuer", "kind", "certificates", "renewals per year", "peak week", "busiest 3 hours",
                     "weekly limit", "exceeded", "spread: peak week", "spread: exceeded"),
                    [(f.issuer, f.kind, f.certificates, _years(f.scheduled.renewals_per_year),
                      f"{f.scheduled.peak_week or '-'}: {f.scheduled.peak_week_renewals:,}",
                      f"{_when(f.scheduled.peak_3h)}: {f.scheduled.peak_3h_renewals:,}",
                      f"{f.weekly_limit:,}" if f.weekly_limit is not None else "-", len(f.scheduled.exceedances),
                      f"{f.spread.peak_week or '-'}: {f.spread.peak_week_renewals:,}", len(f.spread.exceedances))
                     for f in report.issuers] or [("(no certificates to renew)",) + ("",) * 9])
    lines += ["", f"Managed renewals per year: {_years(managed_total) or '-'}; spread: "
                  f"{_years(report.totals_per_year(spread=True)) or '-'}.", ""]
    for f in report.issuers:
        lines += [f"## {escape(f.issuer)}", "",
                  f"{escape(f.kind)}; {f.certificates:,} certificate(s) on {f.registered_domains:,} registered "
                  f"domain(s); limits: {escape(limits_text(f.limits))} ({escape(f.basis)}).", "",
                  f"- validations per year: {_years(f.scheduled.validations_per_year)}",
                  f"- busiest hour: {_when(f.scheduled.peak_hour)}, {f.scheduled.peak_hour_renewals:,} renewal(s)",
                  f"- spread over {report.spread_fraction:.0%} of the lifetime: peak week {f.spread.peak_week or '-'} "
                  f"{f.spread.peak_week_renewals:,} (as scheduled {f.scheduled.peak_week_renewals:,}), busiest 3 hours "
                  f"{f.spread.peak_3h_renewals:,} (as scheduled {f.scheduled.peak_3h_renewals:,}), "
                  f"{f.spread.renewals:,} renewals (as scheduled {f.scheduled.renewals:,})"]
        lines += [f"- note: {escape(n)}" for n in f.notes]
        if f.scheduled.exceedances:
            shown = f.scheduled.exceedances[:LISTED]
            lines += ["", *_table(("week", "limit", "subject", "busiest window from", "count", "allowed", "over by"),
                                  [(e.week, e.limit, e.subject, _when(e.window_start), e.count, e.allowed, e.over)
                                   for e in shown])]
            if len(f.scheduled.exceedances) > LISTED:
                lines.append(f"\n({len(f.scheduled.exceedances) - LISTED} more: `certpilot report forecast --json`)")
        lines.append("")
    lines += ["## Schedule changes in the period", ""]
    lines += [f"- {d.isoformat()}: {escape(text)}" for d, text in report.changes] or ["- none"]
    lines += ["", "## Assumptions", "",
              f"- Renewals at {report.lifetime_fraction:.0%} of the lifetime (or the renew-before), earlier by up to "
              f"{report.jitter_fraction:.0%} of it (jitter); in the hourly renew-due run where they fall due.",
              "- Every renewal counts as a new certificate: Let's Encrypt exempts renewals of the same names from the "
              "per-domain limit, and ARI renewals from all limits.",
              "- Validations: a name is validated again when its last validation is older than the reuse period on "
              "that date, counted per certificate.",
              "- Unmanaged certificates are renewed by hand 30 days (at most a third of the lifetime) before expiry, "
              "and are not compared with limits."]
    return "\n".join(lines)
