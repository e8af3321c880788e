"""The 47-day readiness forecast (certpilot.forecast), its chart, its artifact's markdown and
``certpilot report forecast``, on SQLite and PostgreSQL.

The inventories are real: managed certificates defined with certpilot.managed, each with a real certificate
(a key and a signature made here) linked as its current one; ACME renewal windows recorded as the renewal
flow records them (``managed.record_renewal_info``) pin a first renewal to a known hour where a case is
computed by hand. The expected numbers are worked out in the comments, not by calling the code under test."""

from __future__ import annotations

import datetime as dt
import json
import re
import struct
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from typer.testing import CliRunner

from certpilot import acme_accounts, audit, inventory, keystore, managed
from certpilot.charts import forecast_png
from certpilot.database import read_session, write_session
from certpilot.errors import InvalidOptionError
from certpilot.forecast import (LIMIT_DOMAIN, LIMIT_DUPLICATES, LIMIT_ORDERS, ForecastReport, IssuerSettings,
                                forecast, forecast_markdown, lifetime_days, parse_issuer_settings, validation_reuse)
from certpilot.models import Certificate
from certpilot.rate_limits import RateLimits
from certpilot.renewal import RenewalPolicy, RenewalWindow
from certpilot.sample_estate import Authority, issue_leaf, make_ca
from certpilot.settings import load_settings
from certpilot.x509info import describe_certificate
from certpilot.yaml_file import PolicyFileError

UTC = dt.timezone.utc
ACTOR = audit.Actor("test")
CORP = "acme-issuer/corp"
LETS_ENCRYPT_DIRECTORY = "https://acme-v02.api.letsencrypt.org/directory"
NO_JITTER = RenewalPolicy(jitter_fraction=0)


def at(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.fixture(scope="module")
def authority() -> Authority:
    return make_ca("Forecast Test CA")


def seed(engine: sa.Engine, authority: Authority, name: str, dns_names: tuple[str, ...], not_before: dt.datetime,
         days: int, *, issuer: str = CORP, first_renewal: dt.datetime | None = None, now: dt.datetime,
         **spec: Any) -> None:
    """A managed certificate whose current certificate (real, ``days`` long) began at ``not_before``;
    ``first_renewal``: the CA's renewal window (ARI) starts then, for one minute."""
    cert, _ = issue_leaf(authority, list(dns_names), not_before + dt.timedelta(days=days),
                         now=not_before + dt.timedelta(days=days), lifetime_days=days)
    with write_session(engine) as session:
        spec.setdefault("owner", "team-web")
        row = managed.add(session, managed.ManagedSpec(name=name, dns_names=dns_names, issuer=issuer, **spec), ACTOR,
                          now=not_before - dt.timedelta(days=1))
        record = describe_certificate(cert)
        inventory.upsert(session, [inventory.Observation(record, None, "test")], ACTOR, now=not_before)
        session.execute(sa.update(Certificate).where(Certificate.fingerprint_sha256 == record.fingerprint_sha256)
                        .values(managed_certificate_id=row.id))
        if first_renewal is not None:
            managed.record_renewal_info(session, {name: RenewalWindow(first_renewal,
                                                                      first_renewal + dt.timedelta(minutes=1))},
                                        now=now - dt.timedelta(hours=1))


def run(engine: sa.Engine, now: dt.datetime, until: dt.date, **kw: Any) -> ForecastReport:
    with read_session(engine) as session:
        return forecast(session, now=now, until=until, **kw)


def weeks_with(report: ForecastReport, weekly: tuple[int, ...]) -> dict[str, int]:
    return {report.weeks[i].isoformat(): n for i, n in enumerate(weekly) if n}


# ------------------------------------------------------------------------------------- the schedules

def test_lifetimes_and_reuse_periods_change_on_their_dates() -> None:
    day = dt.date.fromisoformat
    # CA/B Forum SC-081: 398 days, 200 from 2026-03-15, 100 from 2027-03-15, 47 from 2029-03-15.
    assert [lifetime_days("public", day(d)) for d in ("2026-03-14", "2026-03-15", "2027-03-14", "2027-03-15",
                                                       "2029-03-14", "2029-03-15")] == [398, 200, 200, 100, 100, 47]
    assert [lifetime_days("public", day(d), 90) for d in ("2027-03-15", "2029-03-14", "2029-03-15")] == [90, 90, 47]
    # Let's Encrypt's classic profile: 90 days, 64 from 2027-02-10, 45 from 2028-02-16.
    assert [lifetime_days("lets-encrypt", day(d), 398) for d in ("2027-02-09", "2027-02-10", "2028-02-15",
                                                                  "2028-02-16")] == [90, 64, 64, 45]
    assert lifetime_days("private", day("2030-01-01")) == 90 and lifetime_days("private", day("2030-01-01"), 825) == 825
    # Domain-validation reuse: 398, 200, 100, then 10 days; Let's Encrypt's: 30 days, 10 days, 7 hours.
    assert [validation_reuse("public", day(d)) for d in ("2026-03-14", "2026-03-15", "2027-03-15", "2029-03-15")] == [
        dt.timedelta(days=398), dt.timedelta(days=200), dt.timedelta(days=100), dt.timedelta(days=10)]
    assert [validation_reuse("lets-encrypt", day(d)) for d in ("2027-02-09", "2027-02-10", "2028-02-16")] == [
        dt.timedelta(days=30), dt.timedelta(days=10), dt.timedelta(hours=7)]
    assert validation_reuse("private", day("2027-01-01")) is None
    with pytest.raises(ValueError, match="unknown kind of issuer 'acme'"):
        lifetime_days("acme", day("2027-01-01"))
    with pytest.raises(ValueError, match="aware UTC"):
        lifetime_days("public", dt.datetime(2027, 1, 1))


# ------------------------------------------------------------------------------ the hand-computed case

# Now: Monday 2026-12-28 00:00 UTC; until 2027-02-28, so the report's weeks are the 9 Mondays from 2026-12-28
# to 2027-02-22. One issuer, acme-issuer/corp, said to be a public CA with limits of 10 new orders per 3 hours,
# 20 certificates per registered domain per week and 2 duplicate certificates per week. 30 certificates, each
# renewing first in the hourly run after its CA's renewal window (ARI) opens:
#   A: 12 certificates a00..a11.example.com (one name each, 90-day, issued 2026-12-01): window 2027-01-13 09:10
#      (a Wednesday), renewed in the 10:00 run.
#   B: 12 certificates b00..b11.example.com (same): window 2027-01-14 15:40 (Thursday), renewed at 16:00.
#   C: 3 certificates api-1, api-2, api-3 for the same one name api.example.org (same): window 2027-01-20 08:30
#      (Wednesday), renewed at 09:00.
#   D: 3 certificates d0..d2.example.org (one name each, 230-day, issued 2026-07-01): window 2027-02-01 00:30
#      (Monday), renewed at 01:00.
# Their next renewals fall after 2027-02-28 (the earliest: A's, 2027-01-13 10:00 + 60 days - 4.5 days of jitter
# = 2027-03-09), so there are exactly 30 renewals:
WEEKLY = {"2027-01-11": 24, "2027-01-18": 3, "2027-02-01": 3}
# Exceeded, counting over sliding windows:
# - new orders per 3 hours: A's 12 in the 10:00 run (and B's 12 at 16:00 the next day, the same week): 12 > 10,
#   over by 2, in the week of 2027-01-11, the busiest window from 2027-01-13 10:00;
# - certificates per registered domain per week: example.com has A's 12 and B's 12 within 7 days from
#   2027-01-13 10:00: 24 > 20, over by 4, week of 2027-01-11; example.org never has more than 3 in 7 days;
# - duplicates: the 3 certificates for exactly api.example.org within 7 days from 2027-01-20 09:00: 3 > 2,
#   over by 1, week of 2027-01-18.
EXCEEDED = [(LIMIT_DOMAIN, "2027-01-11", "example.com", "2027-01-13T10:00:00Z", 24, 20, 4),
            (LIMIT_ORDERS, "2027-01-11", "acme-issuer/corp (its account)", "2027-01-13T10:00:00Z", 12, 10, 2),
            (LIMIT_DUPLICATES, "2027-01-18", "api.example.org", "2027-01-20T09:00:00Z", 3, 2, 1)]
# Validations: public CA, reuse 200 days until 2027-03-15. A, B, C were validated on 2026-12-01, 43 to 50 days
# before renewing: reused. D's names were validated on 2026-07-01, 215 days before 2027-02-01: one fresh
# validation each, 3 in all.
HAND_NOW = at("2026-12-28 00:00")
HAND_UNTIL = dt.date(2027, 2, 28)
HAND_LIMITS = RateLimits("Corp CA", 10, 20, 2)


@pytest.fixture
def thirty(engine: sa.Engine, authority: Authority) -> sa.Engine:
    issued, d_issued = at("2026-12-01 00:00"), at("2026-07-01 00:00")
    for i in range(12):
        seed(engine, authority, f"a{i:02d}", (f"a{i:02d}.example.com",), issued, 90,
             first_renewal=at("2027-01-13 09:10"), now=HAND_NOW)
        seed(engine, authority, f"b{i:02d}", (f"b{i:02d}.example.com",), issued, 90,
             first_renewal=at("2027-01-14 15:40"), now=HAND_NOW)
    for i in range(1, 4):
        seed(engine, authority, f"api-{i}", ("api.example.org",), issued, 90, first_renewal=at("2027-01-20 08:30"),
             now=HAND_NOW)
    for i in range(3):
        seed(engine, authority, f"d{i}", (f"d{i}.example.org",), d_issued, 230, first_renewal=at("2027-02-01 00:30"),
             now=HAND_NOW)
    return engine


def test_thirty_certificates_computed_by_hand_to_the_week(thirty: sa.Engine) -> None:
    report = run(thirty, HAND_NOW, HAND_UNTIL, issuers={CORP: IssuerSettings("public", HAND_LIMITS)})
    assert [w.isoformat() for w in report.weeks] == ["2026-12-28", "2027-01-04", "2027-01-11", "2027-01-18",
                                                      "2027-01-25", "2027-02-01", "2027-02-08", "2027-02-15",
                                                      "2027-02-22"]
    [corp] = report.issuers
    s = corp.scheduled
    assert (corp.issuer, corp.kind, corp.managed, corp.certificates, corp.registered_domains) == (CORP, "public", True,
                                                                                                  30, 2)
    assert weeks_with(report, s.weekly) == WEEKLY
    assert s.renewals_per_year == {2026: 0, 2027: 30} and s.validations_per_year == {2026: 0, 2027: 3}
    assert (s.peak_week, s.peak_week_renewals) == (dt.date(2027, 1, 11), 24)
    assert (s.peak_hour, s.peak_hour_renewals) == (at("2027-01-13 10:00"), 12)
    assert (s.peak_3h, s.peak_3h_renewals) == (at("2027-01-13 10:00"), 12)
    assert [(e.limit, e.week.isoformat(), e.subject, e.as_dict()["window_start"], e.count, e.allowed, e.over)
            for e in s.exceedances] == EXCEEDED
    # the weekly limit: min(10 orders per 3 hours x 56, 20 per domain x 2 registered domains) = 40
    assert corp.weekly_limit == 40 and corp.limits == HAND_LIMITS
    assert report.totals_per_year() == {2026: 0, 2027: 30} and report.totals_per_year(managed=False) == {2026: 0,
                                                                                                          2027: 0}


def test_spreading_lowers_the_peak_of_the_hand_computed_case(thirty: sa.Engine) -> None:
    report = run(thirty, HAND_NOW, HAND_UNTIL, issuers={CORP: IssuerSettings("public", HAND_LIMITS)})
    [corp] = report.issuers
    s, p = corp.scheduled, corp.spread
    # A, B and C may move up to 15 days earlier (a sixth of 90 days), each to its own point: no hour holds 12 any
    # more; D (due sooner than its span of 38 days from now) keeps its 01:00 run, so the busiest hour is D's 3.
    assert p.peak_hour_renewals == 3 and p.peak_3h_renewals < s.peak_3h_renewals == 12
    assert p.peak_week_renewals < s.peak_week_renewals
    assert not [e for e in p.exceedances if e.limit in (LIMIT_ORDERS, LIMIT_DOMAIN)]
    assert len(p.exceedances) < len(s.exceedances)
    # moved earlier, some renew a second time before the end of February: spreading costs renewals
    assert p.renewals >= s.renewals == 30


def test_a_cluster_exceeds_lets_encrypts_domain_limit_in_its_week_and_jitter_spreads_it(
        engine: sa.Engine, authority: Authority) -> None:
    now = at("2027-01-04 00:00")
    # 60 certificates of one registered domain, all issued 2026-12-01 00:00 (90 days, Let's Encrypt): each due at
    # two thirds of its lifetime (2027-01-30 00:00, a Saturday), earlier by up to 5 % of it (4.5 days, its
    # jitter): all between Monday 2027-01-25 12:00 and Saturday 00:00, the week of 2027-01-25. 60 > 50 by 10.
    for i in range(60):
        seed(engine, authority, f"n{i:02d}", (f"n{i:02d}.example.net",), at("2026-12-01 00:00"), 90,
             issuer="acme-issuer/letsencrypt", now=now, use_ari=False)
    report = run(engine, now, dt.date(2027, 3, 10),
                 directories={"acme-issuer/letsencrypt": LETS_ENCRYPT_DIRECTORY}, unmanaged=False)
    [le] = report.issuers
    assert le.kind == "lets-encrypt" and le.limits is not None and le.limits.name == "Let's Encrypt"
    assert weeks_with(report, le.scheduled.weekly) == {"2027-01-25": 60}
    [exceeded] = le.scheduled.exceedances
    assert (exceeded.limit, exceeded.week, exceeded.subject, exceeded.count, exceeded.allowed, exceeded.over) == (
        LIMIT_DOMAIN, dt.date(2027, 1, 25), "example.net", 60, 50, 10)
    # Spread: each moves earlier by u * 15 days (a sixth of 90), the 60 at evenly spaced u. One lands in a given
    # 7 days only if its u * 15 days is within an 11.5-day span (those 7 days plus its 4.5 days of jitter): at most
    # 60 * 11.5 / 15 + 1 = 47 certificates in any 7 days, under 50. (Their second renewals, 45 days or more after
    # their first, do not meet them within 7 days.)
    assert le.spread.peak_week_renewals <= 47 < le.scheduled.peak_week_renewals
    assert not le.spread.exceedances


# ---------------------------------------------------------------------------------- schedule transitions

def hand_schedule(first: dt.datetime, until: dt.datetime, lifetime: Any, reuse: Any, validated: dt.datetime,
                  names: int) -> tuple[list[dt.datetime], dict[int, int]]:
    """The renewals without jitter, written out independently: renew at two thirds of the lifetime in force on
    the day of issue, in the hourly run at or after that; validate when the last validation is older than the
    reuse period of the day."""
    times, validations = [], {}
    when = first
    while when < until:
        times.append(when)
        if when - validated > reuse(when.date()):
            validations[when.year] = validations.get(when.year, 0) + names
            validated = when
        step = dt.timedelta(days=lifetime(when.date())) * 2 / 3
        hours = -(-step // dt.timedelta(hours=1))  # ceiling
        when = when + dt.timedelta(hours=hours)
    return times, validations


def test_public_lifetimes_fall_at_the_cabf_dates_and_validations_follow_the_reuse(
        engine: sa.Engine, authority: Authority) -> None:
    now = at("2027-01-04 00:00")
    seed(engine, authority, "shop", ("shop.example.com", "www.shop.example.com"), at("2026-09-01 00:00"), 200,
         validity_days=398, first_renewal=at("2027-01-06 09:30"), now=now)
    report = run(engine, now, dt.date(2029, 12, 31), issuers={CORP: IssuerSettings("public")}, policy=NO_JITTER)
    [shop] = report.issuers

    def cabf(day: dt.date) -> int:
        return 200 if day < dt.date(2027, 3, 15) else 100 if day < dt.date(2029, 3, 15) else 47

    def reuse(day: dt.date) -> dt.timedelta:
        return dt.timedelta(days=200 if day < dt.date(2027, 3, 15) else 100 if day < dt.date(2029, 3, 15) else 10)

    times, validations = hand_schedule(at("2027-01-06 10:00"), at("2030-01-01 00:00"), cabf, reuse,
                                       at("2026-09-01 00:00"), 2)
    # The first three by hand: 2027-01-06 10:00 (200 days, so 133 d 8 h) -> 2027-05-19 18:00 (after 2027-03-15:
    # 100 days, 66 d 16 h) -> 2027-07-25 10:00; the names (validated 2026-09-01) are reused on 2027-01-06 (127 days
    # < 200), validated afresh on 2027-05-19 (260 days > 100), reused on 2027-07-25 (67 days < 100).
    assert times[:3] == [at("2027-01-06 10:00"), at("2027-05-19 18:00"), at("2027-07-25 10:00")]
    # From 2029-03-15, 47 days: renewals every 31 d 8 h and every one validates (reuse 10 days).
    after = [t for t in times if t.date() >= dt.date(2029, 3, 15)]
    assert {b - a for a, b in zip(after, after[1:])} == {dt.timedelta(days=31, hours=8)}
    expected_weeks: dict[str, int] = {}
    for t in times:
        monday = (t.date() - dt.timedelta(days=t.weekday())).isoformat()
        expected_weeks[monday] = expected_weeks.get(monday, 0) + 1
    assert weeks_with(report, shop.scheduled.weekly) == expected_weeks
    per_year = {y: sum(1 for t in times if t.year == y) for y in (2027, 2028, 2029)}
    assert shop.scheduled.renewals_per_year == per_year
    assert shop.scheduled.validations_per_year == {y: validations.get(y, 0) for y in (2027, 2028, 2029)}
    # Reuse 100 days against renewals every 66.7 days: every other renewal validates in 2028; every one in 2029
    # after 2029-03-15.
    assert validations[2028] < 2 * per_year[2028]


def test_lets_encrypt_profile_dates_from_the_inventorys_acme_account(engine: sa.Engine, authority: Authority) -> None:
    now = at("2027-01-04 00:00")
    issuer = "acme-issuer/letsencrypt"
    seed(engine, authority, "blog", ("blog.example.org", "www.blog.example.org"), at("2026-11-10 00:00"), 90,
         issuer=issuer, first_renewal=at("2027-01-06 09:30"), now=now)
    with write_session(engine) as session:  # the account the ACME issuer registered: its directory says who it is
        acme_accounts.record_account(session, name=issuer, directory_url=LETS_ENCRYPT_DIRECTORY,
                                     account_url="https://acme-v02.api.letsencrypt.org/acme/acct/1",
                                     key=acme_accounts.generate_account_key(),
                                     ring=keystore.load_key_ring(load_settings()), actor=ACTOR, now=now)
    report = run(engine, now, dt.date(2029, 12, 31), policy=NO_JITTER)
    [blog] = report.issuers
    assert blog.kind == "lets-encrypt" and blog.basis == f"ACME directory {LETS_ENCRYPT_DIRECTORY}"
    assert blog.limits is not None and blog.limits.certificates_per_registered_domain_per_week == 50
    assert blog.weekly_limit == 50  # min(300 x 56, 50 x one registered domain)

    def classic(day: dt.date) -> int:
        return 90 if day < dt.date(2027, 2, 10) else 64 if day < dt.date(2028, 2, 16) else 45

    def reuse(day: dt.date) -> dt.timedelta:
        return dt.timedelta(days=30) if day < dt.date(2027, 2, 10) else (
            dt.timedelta(days=10) if day < dt.date(2028, 2, 16) else dt.timedelta(hours=7))

    times, validations = hand_schedule(at("2027-01-06 10:00"), at("2030-01-01 00:00"), classic, reuse,
                                       at("2026-11-10 00:00"), 2)
    # By hand: 2027-01-06 10:00 (90 days: 60 d later) -> 2027-03-07 10:00 (64 days: 42 d 16 h) -> 2027-04-19 02:00;
    # from 2028-02-16 every 30 days.
    assert times[:3] == [at("2027-01-06 10:00"), at("2027-03-07 10:00"), at("2027-04-19 02:00")]
    after = [t for t in times if t.date() >= dt.date(2028, 2, 16)]
    assert {b - a for a, b in zip(after, after[1:])} == {dt.timedelta(days=30)}
    assert blog.scheduled.renewals_per_year == {y: sum(1 for t in times if t.year == y) for y in (2027, 2028, 2029)}
    # Authorizations are never reused across these intervals: every renewal validates both names.
    assert blog.scheduled.validations_per_year == {y: 2 * n for y, n in blog.scheduled.renewals_per_year.items()}
    assert validations == blog.scheduled.validations_per_year


# ------------------------------------------------------------------------------- unmanaged and notes

def public_ca(organisation: str) -> Authority:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation),
                      x509.NameAttribute(NameOID.COMMON_NAME, "R11")])
    now = at("2024-01-01 00:00")
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(key, hashes.SHA256()))
    return Authority(cert, key)


def test_unmanaged_public_certificates_are_counted_apart(engine: sa.Engine, authority: Authority) -> None:
    now = at("2027-01-04 00:00")
    lets_encrypt = public_ca("Let's Encrypt")
    # by hand: renewed 30 days before expiry (90-day: at most a third, 30), i.e. on 2027-01-31 00:00; then the
    # 64-day classic profile, renewed 21 d 8 h (a third of 64 days) before its expiry: 42 d 16 h later, 2027-03-14
    # 16:00, after the end of the forecast.
    hand, _ = issue_leaf(lets_encrypt, ["legacy.example.com"], at("2027-03-02 00:00"), now=at("2027-03-02 00:00"),
                         lifetime_days=90)
    key = ec.generate_private_key(ec.SECP256R1())
    self_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "printer.example.com")])
    self_signed = (x509.CertificateBuilder().subject_name(self_name).issuer_name(self_name)
                   .public_key(key.public_key()).serial_number(1).not_valid_before(at("2026-12-01 00:00"))
                   .not_valid_after(at("2027-02-01 00:00"))
                   .add_extension(x509.SubjectAlternativeName([x509.DNSName("printer.example.com")]), critical=False)
                   .sign(key, hashes.SHA256()))
    with write_session(engine) as session:
        inventory.upsert(session, [inventory.Observation(describe_certificate(c), f"tls://{i}.example.com:443", "scan")
                                   for i, c in enumerate((hand, self_signed))], ACTOR, now=now)
    seed(engine, authority, "web", ("web.example.com",), at("2026-12-01 00:00"), 90,
         first_renewal=at("2027-01-20 10:30"), now=now)
    report = run(engine, now, dt.date(2027, 3, 1), issuers={CORP: IssuerSettings("public")})
    assert [(f.issuer, f.managed, f.kind, f.certificates) for f in report.issuers] == [
        (CORP, True, "public", 1), ("unmanaged: Let's Encrypt", False, "lets-encrypt", 1)]
    unmanaged = report.issuers[1]
    assert unmanaged.limits is None and "not compared" in unmanaged.basis
    assert weeks_with(report, unmanaged.scheduled.weekly) == {"2027-01-25": 1}
    assert unmanaged.scheduled.peak_hour == at("2027-01-31 00:00")
    assert report.totals_per_year(managed=False) == {2027: 1} and report.totals_per_year() == {2027: 1}
    assert [f.issuer for f in run(engine, now, dt.date(2027, 3, 1), unmanaged=False).issuers] == [CORP]
    # a policy that calls that issuer private leaves it out
    private = run(engine, now, dt.date(2027, 3, 1),
                  is_public=lambda issuer_dn, *, private_ca, self_signed: not self_signed and "Let's" not in issuer_dn)
    assert [f.issuer for f in private.issuers] == [CORP]


def test_a_renew_before_longer_than_the_lifetime_is_named(engine: sa.Engine, authority: Authority) -> None:
    now = at("2029-01-01 00:00")
    seed(engine, authority, "legacy-api", ("api.example.com",), at("2028-12-01 00:00"), 100, renew_before_days=60,
         now=now, use_ari=False)
    report = run(engine, now, dt.date(2029, 12, 31), issuers={CORP: IssuerSettings("public")})
    [f] = report.issuers
    [note] = f.notes
    # 100-day certificates renew 60 days before expiry (40 days in); the first issued on or after 2029-03-15 is
    # 47 days long, and 60 days before its expiry is before its start.
    assert "legacy-api (60 days)" in note and "lower their renew_before_days" in note
    first_47 = dt.date.fromisoformat(note.split(" from ")[1].split(" on,")[0])
    assert first_47 >= dt.date(2029, 3, 15)


def test_until_must_be_after_today(engine: sa.Engine) -> None:
    with pytest.raises(InvalidOptionError, match="until must be a date after today"):
        run(engine, at("2027-01-04 00:00"), dt.date(2027, 1, 4))


# ------------------------------------------------------------------------------------- issuer settings

def test_issuer_settings_file_and_its_errors() -> None:
    settings = parse_issuer_settings("acme-issuer/corp:\n  kind: public\n  name: Corp CA\n"
                                     "  new_orders_per_account_per_3h: 100\n"
                                     "  duplicate_certificates_per_week: 5\n"
                                     "acme-issuer/letsencrypt:\n  kind: lets-encrypt\n", "limits.yaml")
    assert settings == {CORP: IssuerSettings("public", RateLimits("Corp CA", 100, None, 5)),
                        "acme-issuer/letsencrypt": IssuerSettings("lets-encrypt", None)}
    for text, message in (("acme-issuer/corp:\n  kind: acme\n", "limits.yaml:2: acme-issuer/corp's kind 'acme'"),
                          ("corp:\n  kind: public\n", "limits.yaml:1: 'corp' is not an issuer block"),
                          ("acme-issuer/corp:\n  orders: 5\n", "limits.yaml:2: unknown key 'orders'"),
                          ("acme-issuer/corp:\n  duplicate_certificates_per_week: many\n",
                           "limits.yaml:2: acme-issuer/corp's duplicate_certificates_per_week must be a whole number")):
        with pytest.raises(PolicyFileError) as raised:
            parse_issuer_settings(text, "limits.yaml")
        assert str(raised.value).startswith(message), str(raised.value)


# ---------------------------------------------------------------------------------- markdown and chart

def png_size(png: bytes) -> tuple[int, int]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    return struct.unpack(">II", png[16:24])


def test_the_artifacts_markdown_and_chart(thirty: sa.Engine) -> None:
    report = run(thirty, HAND_NOW, HAND_UNTIL, issuers={CORP: IssuerSettings("public", HAND_LIMITS)})
    png = forecast_png(report)
    assert png_size(png) == (720, 316)  # 10 x 4.4 inches at 72 dpi
    markdown = forecast_markdown(report, png)
    assert markdown.startswith("# Renewal forecast to 2027-02-28")
    assert "3 limit(s) exceeded as scheduled" in markdown
    assert "](data:image/png;base64," in markdown
    assert ("| acme-issuer/corp | public | 30 | 2026: 0, 2027: 30 | 2027-01-11: 24 | 2027-01-13 10:00 UTC: 12 | 40 "
            "| 3 |") in markdown
    assert ("| 2027-01-11 | certificates-per-registered-domain-per-week | example.com | 2027-01-13 10:00 UTC | 24 | 20 "
            "| 4 |") in markdown
    assert "- 2027-02-10: Let's Encrypt classic profile 64 days" in markdown
    assert "2027-03-15" not in markdown  # the CA/B Forum's 100 days: after the end of the forecast
    without = forecast_markdown(report)
    assert "data:image" not in without and "## acme-issuer/corp" in without


def test_markdown_escapes_what_the_inventory_holds(engine: sa.Engine, authority: Authority) -> None:
    now = at("2027-01-04 00:00")
    seed(engine, authority, "odd", ("odd.example.com",), at("2026-12-01 00:00"), 90, issuer="acme-issuer/x_y",
         first_renewal=at("2027-01-06 09:30"), now=now)
    markdown = forecast_markdown(run(engine, now, dt.date(2027, 2, 1), issuers={
        "acme-issuer/x_y": IssuerSettings("public", RateLimits("<b>Corp|CA</b>", 1, None, None))}))
    assert "acme-issuer/x\\_y" in markdown and "&lt;b&gt;Corp\\|CA&lt;/b&gt;" in markdown
    assert "<b>" not in markdown


# ------------------------------------------------------------------------------------------- the CLI

def test_cli_forecast_json_text_and_chart(engine: sa.Engine, authority: Authority, tmp_path: Path,
                                          no_prefect_api: None) -> None:
    from cli.main import app

    now = dt.datetime.now(UTC)
    window = (now + dt.timedelta(days=2)).replace(minute=10, second=0, microsecond=0)
    for i in range(3):  # three certificates for exactly the same name, renewing in one run
        seed(engine, authority, f"api-{i}", ("api.example.org",), now - dt.timedelta(days=50), 90,
             first_renewal=window, now=now)
    limits = tmp_path / "limits.yaml"
    limits.write_text("acme-issuer/corp:\n  kind: public\n  duplicate_certificates_per_week: 2\n", encoding="utf-8")
    until = (now + dt.timedelta(days=30)).date()
    result = CliRunner().invoke(app, ["report", "forecast", "--until", until.isoformat(), "--limits", str(limits),
                                      "--json"])
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    renewed = window.replace(minute=0) + dt.timedelta(hours=1)
    monday = renewed.date() - dt.timedelta(days=renewed.weekday())
    [corp] = got["issuers"]
    assert (corp["issuer"], corp["kind"], corp["certificates"], corp["scheduled"]["renewals"]) == (CORP, "public", 3, 3)
    assert corp["scheduled"]["exceedances"] == [
        {"limit": LIMIT_DUPLICATES, "week": monday.isoformat(), "subject": "api.example.org",
         "window_start": renewed.strftime("%Y-%m-%dT%H:%M:%SZ"), "count": 3, "allowed": 2, "over": 1}]
    assert got["until"] == until.isoformat() and got["exceedances"] == 1
    assert corp["limits"] == {"name": CORP, "new_orders_per_account_per_3h": None,
                              "certificates_per_registered_domain_per_week": None,
                              "duplicate_certificates_per_week": 2}

    chart = tmp_path / "forecast.png"
    result = CliRunner().invoke(app, ["report", "forecast", "--until", until.isoformat(), "--limits", str(limits),
                                      "--chart", str(chart)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert png_size(chart.read_bytes()) == (720, 316)
    text = " ".join(re.sub(r"[│┃━╇]", " ", result.stdout).split())
    assert f"{monday.isoformat()} {LIMIT_DUPLICATES} api.example.org" in text
    assert "spread over 17% of the lifetime" in text and f"chart written to {chart}" in text

    bad = CliRunner().invoke(app, ["report", "forecast", "--until", "31/12/2029", "--json"])
    assert bad.exit_code == 2 and "is not a date such as 2029-12-31" in bad.stdout
    missing = CliRunner().invoke(app, ["report", "forecast", "--limits", str(tmp_path / "none.yaml")])
    assert missing.exit_code == 1 and "cannot read the issuer limits file" in missing.output
