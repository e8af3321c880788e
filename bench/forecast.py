"""Benchmark: the 47-day readiness forecast (certpilot.forecast.forecast) of 10,000 managed certificates to 2029-12-31.

    python bench/forecast.py                  # 10,000 managed certificates (and 1,000 unmanaged), embedded SQLite
    python bench/forecast.py --quick          # 1,000 (and 100)
    python bench/forecast.py --database-url postgresql://postgres@127.0.0.1:5432/DB   # an empty database

The inventory is built by bulk inserts of rows (as bench/scope_resolve.py does), not by issuing certificates:
N managed certificates, each with a current certificate (its SANs: ``svc<i>.team<t>.example<j>.com`` and
``www.`` of it, on 200 registered domains) under three issuer blocks: 60 per cent ``acme-issuer/letsencrypt``
(its directory is Let's Encrypt's production one, given as the CLI and the task give it from the block: 90-day
certificates), 25 per cent ``acme-issuer/corp`` (a public CA with no known limits: 200-day certificates, one in
four asking 398 days, one in ten renewing 30 days before expiry) and 15 per cent ``private-ca/internal``
(90-day certificates of the private CA's tls-server profile). Four in five current certificates were issued
at a uniformly random point of the past two thirds of their lifetime, one in five on the same day 40 days ago
(a bulk migration: the spike that spreading should flatten). Plus N/10 unmanaged public certificates (half from
Let's Encrypt, half from another CA), renewed by hand and counted apart.

Then ``forecast`` runs from a session on that inventory (reading included) three times; the median wall time
is the figure (each run's CPU time is printed too: on a busy machine the wall time is longer). It prints the
totals per year, the exceedances as scheduled and spread, and ends with:

    figure forecast_seconds_10k: S s   (the name says 10k whatever N is; the line before says N)

Goal: under 5 s.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import sqlalchemy as sa  # noqa: E402
from sqlmodel import SQLModel  # noqa: E402

from certpilot import database  # noqa: E402
from certpilot.forecast import forecast  # noqa: E402

LETS_ENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"
DOMAINS = 200
TEAMS = 50


def _hex(*parts: object) -> str:
    return hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()


def build(engine: sa.Engine, count: int, now: dt.datetime) -> None:
    rng = random.Random(11)
    tables = SQLModel.metadata.tables
    common = {"key_type": "EC", "key_size": 256, "key_curve": "secp256r1", "signature_algorithm": "ecdsa-with-SHA256",
              "key_usage": [], "extended_key_usage": [], "crl_urls": [], "ocsp_urls": [], "ca_issuer_urls": [],
              "notes": [], "self_signed": False, "der": b"", "created_at": now, "revocation_reason": None,
              "revoked_at": None, "subject_key_id": None, "authority_key_id": None, "path_length": None,
              "replaces_fingerprint": None, "is_ca": False, "issuer_fingerprint": None, "status": "active",
              "owner": None, "tags": {}}
    issuers = {"acme-issuer/letsencrypt": "CN=R11,O=Let's Encrypt,C=US", "acme-issuer/corp": "CN=Corp TLS CA,O=Corp",
               "private-ca/internal": "CN=internal issuing CA,O=certpilot"}
    managed, certs, sans = [], [], []
    migration = now - dt.timedelta(days=40)
    for i in range(count):
        pick = rng.random()
        issuer = ("acme-issuer/letsencrypt" if pick < 0.6 else "acme-issuer/corp" if pick < 0.85
                  else "private-ca/internal")
        lifetime = {"acme-issuer/letsencrypt": 90, "acme-issuer/corp": 200, "private-ca/internal": 90}[issuer]
        validity = 398 if issuer == "acme-issuer/corp" and i % 4 == 0 else None
        renew_before = 30 if issuer == "acme-issuer/corp" and i % 10 == 0 else None
        host = f"svc{i}.team{i % TEAMS}.example{i % DOMAINS}.com"
        names = [host, f"www.{host}"]
        managed.append({"id": i + 1, "name": f"svc{i}", "dns_names": names, "ip_addresses": [], "uris": [],
                        "profile": "tls-server", "key_algorithm": "ec-p256", "validity_days": validity,
                        "issuer": issuer, "owner": f"team{i % TEAMS}", "tags": {}, "renew_before_days": renew_before,
                        "use_ari": False, "status": "active", "created_at": now - dt.timedelta(days=400)})
        issued = migration if rng.random() < 0.2 else now - dt.timedelta(days=rng.uniform(0, lifetime * 2 / 3))
        fp = _hex("managed", i)
        certs.append({**common, "fingerprint_sha256": fp, "subject": f"CN={names[0]}", "issuer": issuers[issuer],
                      "serial_hex": f"{rng.getrandbits(128):032x}", "not_before": issued,
                      "not_after": issued + dt.timedelta(days=lifetime), "spki_sha256": _hex("key", i),
                      "managed_certificate_id": i + 1})
        sans += [{"certificate_fingerprint": fp, "kind": "DNS", "value": n} for n in names]
    for i in range(count // 10):
        le = i % 2 == 0
        lifetime = 90 if le else 200
        issued = now - dt.timedelta(days=rng.uniform(0, lifetime * 0.9))
        fp = _hex("unmanaged", i)
        name = f"legacy{i}.example{i % DOMAINS}.org"
        certs.append({**common, "fingerprint_sha256": fp, "subject": f"CN={name}",
                      "issuer": "CN=E6,O=Let's Encrypt,C=US" if le else "CN=Sectigo RSA DV,O=Sectigo Limited,C=GB",
                      "serial_hex": f"{rng.getrandbits(128):032x}", "not_before": issued,
                      "not_after": issued + dt.timedelta(days=lifetime), "spki_sha256": _hex("legacy-key", i),
                      "managed_certificate_id": None, "owner": f"team{i % TEAMS}"})
        sans.append({"certificate_fingerprint": fp, "kind": "DNS", "value": name})
    with engine.begin() as conn:
        for name, rows in (("managed_certificate", managed), ("certificate", certs), ("subject_alt_name", sans)):
            for start in range(0, len(rows), 5000):
                conn.execute(tables[name].insert(), rows[start:start + 5000])
        conn.exec_driver_sql("ANALYZE")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1,000 managed certificates instead of 10,000")
    parser.add_argument("--database-url", help="an empty database to build the inventory in (default: SQLite)")
    args = parser.parse_args()
    count = 1_000 if args.quick else 10_000
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    with tempfile.TemporaryDirectory() as home:
        os.environ["CERTPILOT_HOME"] = home
        os.environ["CERTPILOT_DATABASE_URL"] = args.database_url or f"sqlite:///{home}/inventory.db"
        engine = database.get_engine()
        started = time.perf_counter()
        build(engine, count, now)
        print(f"inventory: {count} managed and {count // 10} unmanaged certificates built in "
              f"{time.perf_counter() - started:.1f} s ({engine.dialect.name})")
        times, cpu, report = [], [], None
        for _ in range(3):
            with database.read_session(engine) as session:
                t0, c0 = time.perf_counter(), time.process_time()
                report = forecast(session, now=now, directories={"acme-issuer/letsencrypt": LETS_ENCRYPT})
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
        assert report is not None
        renewals = sum(f.scheduled.renewals for f in report.issuers)
        print(f"forecast to {report.until}: {renewals:,} renewals in {len(report.weeks)} weeks, "
              f"runs {', '.join(f'{t:.2f}' for t in times)} s (CPU {', '.join(f'{c:.2f}' for c in cpu)} s: the "
              "difference is the time other processes on the machine took)")
        for f in report.issuers:
            print(f"  {f.issuer} ({f.kind}, {f.certificates} certificates): per year "
                  f"{', '.join(f'{y}: {n:,}' for y, n in f.scheduled.renewals_per_year.items())}; peak week "
                  f"{f.scheduled.peak_week} {f.scheduled.peak_week_renewals:,} "
                  f"(spread {f.spread.peak_week_renewals:,}); "
                  f"busiest 3 hours {f.scheduled.peak_3h_renewals:,} (spread {f.spread.peak_3h_renewals:,}); "
                  f"exceedances {len(f.scheduled.exceedances)} (spread {len(f.spread.exceedances)})")
        print(f"forecast: {count} managed certificates, median of 3 runs")
        print(f"figure forecast_seconds_10k: {statistics.median(times):.2f} s")
        database.dispose_engines()


if __name__ == "__main__":
    main()
