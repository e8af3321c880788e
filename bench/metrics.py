"""Benchmark: rendering /metrics (certpilot.metrics.render) for an inventory of 100,000 certificates.

    python bench/metrics.py                  # 100,000 certificates in service, embedded SQLite
    python bench/metrics.py --quick          # 5,000
    python bench/metrics.py --database-url postgresql://postgres@127.0.0.1:5432/DB   # an empty database

What it does:

1. Builds the inventory fast, by bulk inserts of rows rather than by importing certificates: N leaf
   certificates in service with distinct subjects (``svc<i>.<team>.example.com``, one of 12
   organisations), serial numbers (random 128-bit), SANs, owners (200 teams, one certificate in five
   without owner), issuers (certpilot's two private CAs, made for real with ``ca.init_ca``, and 18
   public intermediate CAs), lifetimes of 47, 90 or 398 days spread so that a few per cent have expired,
   one TLS location each (2 per cent more that are only seen at ghost locations, which render leaves
   out). One in ten is managed: a ManagedCertificate with a target, a superseded predecessor, five
   certificate.issued audit events carrying issuance_seconds and a target.deployed event; one in a
   hundred managed had a failed renewal or a failed target. Plus discovery source runs, 2,000 endpoint
   checks, 500 open alerts and three revocations by a private CA (with their CRL). The ``der`` column
   holds 600 random bytes per row (the size of a real certificate; nothing in render reads it) and the
   fingerprint is their SHA-256.
2. Renders /metrics in a fresh Python process (so that its memory is the render's alone) four times
   and reports each time, wall and CPU (the CPU time says how much of the wall time other processes on
   the machine took). The first render counts the whole audit trail (60,000 events); the later ones,
   like every scrape of a running server, only what was appended since (nothing here). It checks the
   output: one x509_cert_not_after series per certificate in service, one cert-manager expiry series
   per managed certificate.

The output ends with:

    figure metrics_render_seconds_100k: S s   (median of renders 2 to 4, what each scrape costs once the
                                               server runs; the name says 100k whatever N is)
    figure metrics_first_render_seconds_100k: S s   (the first render of the process)
    figure metrics_rss_mib_100k: M MiB        (the rendering process's peak RSS (VmHWM in /proc/self/status)
                                               minus its peak before the first render, i.e. after imports
                                               and opening the database: what rendering adds)

Goal: at most 1 s.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import sqlalchemy as sa  # noqa: E402
from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

from certpilot import audit, ca, database, keystore  # noqa: E402
from certpilot.models import (  # noqa: E402
    Alert,
    Certificate,
    EndpointCheck,
    Location,
    ManagedCertificate,
    SourceRun,
    SubjectAltName,
    Target,
)

ORGS = ("Example Corp", "Payments GmbH", "Northwind", "Contoso", "Fabrikam", "Globex", "Initech", "Umbrella",
        "Hooli", "Stark Industries", "Wayne Enterprises", "Acme \"Rockets\" Ltd")
PUBLIC_CAS = [(f"R{n}", "Let's Encrypt") for n in range(10, 14)] + [(f"E{n}", "Let's Encrypt") for n in range(5, 9)] + \
    [(f"DigiCert Global G{n} TLS RSA SHA256 2020 CA1", "DigiCert Inc") for n in range(2, 6)] + \
    [(f"GTS CA 1{c}{n}", "Google Trust Services") for c, n in (("C", 3), ("D", 4), ("P", 5), ("E", 1), ("D", 5), ("C", 5))]
LIFETIMES = (47, 90, 90, 90, 398)
TEAMS = 200
BATCH = 5000


def log(message: str) -> None:
    print(message, flush=True)


def name(cn: str, org: str) -> str:
    escaped = org.replace("\\", "\\\\").replace('"', '\\"').replace(",", "\\,").replace("+", "\\+")
    return f"CN={cn},O={escaped}"


def cert_row(rng: random.Random, subject: str, issuer: str, issuer_fp: str | None, not_before: dt.datetime,
             lifetime_days: int, owner: str | None, is_ca: bool, now: dt.datetime, status: str = "active",
             managed_id: int | None = None) -> dict[str, object]:
    der = rng.randbytes(600)
    return {
        "fingerprint_sha256": hashlib.sha256(der).hexdigest(), "subject": subject, "issuer": issuer,
        "serial_hex": f"{rng.getrandbits(127) | 1 << 126:x}", "not_before": not_before,
        "not_after": not_before + dt.timedelta(days=lifetime_days), "key_type": "EC", "key_size": 256,
        "key_curve": "secp256r1", "spki_sha256": hashlib.sha256(der[:64]).hexdigest(),
        "signature_algorithm": "ecdsa-with-SHA256", "is_ca": is_ca, "path_length": 0 if is_ca else None,
        "key_usage": ["digital_signature"], "extended_key_usage": [] if is_ca else ["serverAuth"],
        "subject_key_id": None, "authority_key_id": None, "crl_urls": [], "ocsp_urls": [], "ca_issuer_urls": [],
        "self_signed": False, "issuer_fingerprint": issuer_fp, "status": status, "revocation_reason": None,
        "revoked_at": None, "owner": owner, "tags": {}, "managed_certificate_id": managed_id,
        "replaces_fingerprint": None, "notes": [], "der": der, "created_at": now,
    }


def insert(session: sa.orm.Session, table: type, rows: list[dict[str, object]]) -> None:
    for start in range(0, len(rows), BATCH):
        session.execute(sa.insert(table), rows[start:start + BATCH])


def build(engine: sa.Engine, count: int, now: dt.datetime) -> dict[str, int]:
    rng = random.Random(20260509)
    actor = audit.Actor("bench")
    ring = keystore.KeyRing(keystore.generate_master_key())
    with database.write_session(engine) as session:
        private = [ca.init_ca(session, ring, actor, n, f"http://127.0.0.1:8080/{n}", now=now - dt.timedelta(days=400))
                   for n in ("internal", "payments")]
    issuers: list[tuple[str, str | None, str]] = []  # (issuer DN, issuing fingerprint, issuer block)
    with database.read_session(engine) as session:
        for authority in private:
            subject = session.get(Certificate, authority.issuing_fingerprint)
            assert subject is not None
            issuers.append((subject.subject, authority.issuing_fingerprint, f"private-ca/{authority.name}"))
    ca_rows = []
    for cn, org in PUBLIC_CAS:
        row = cert_row(rng, name(cn, org), name("Root " + org, org), None, now - dt.timedelta(days=900), 1800, None,
                       True, now)
        ca_rows.append(row)
        issuers.append((str(row["subject"]), str(row["fingerprint_sha256"]), "acme-issuer/" + cn.split()[0].lower()))

    certificates: list[dict[str, object]] = []
    sans: list[dict[str, object]] = []
    locations: list[dict[str, object]] = []
    managed_rows: list[dict[str, object]] = []
    managed_of: dict[int, tuple[int, str]] = {}  # certificate index -> (managed id, its certificate)
    ghosts = count // 50
    for i in range(count + ghosts):
        team = f"team{i % TEAMS:03d}"
        owner = None if i % 5 == 4 else team
        issuer_dn, issuer_fp, block = issuers[i % len(issuers)]
        lifetime = LIFETIMES[i % len(LIFETIMES)]
        not_before = (now - dt.timedelta(days=rng.randrange(int(lifetime * 1.04)), seconds=rng.randrange(86400))
                      ).replace(microsecond=0)  # validity is in whole seconds
        host = f"svc{i}.{team}.example.com"
        managed_id = None
        if i % 10 == 1 and i < count:
            managed_id = len(managed_rows) + 1
            managed_rows.append({
                "id": managed_id, "name": f"svc{i}-{team}", "dns_names": [host], "ip_addresses": [],
                "profile": "tls-server", "key_algorithm": "ec-p256", "validity_days": lifetime, "issuer": block,
                "owner": owner, "tags": {}, "renew_before_days": None, "use_ari": False, "status": "active",
                "created_at": now - dt.timedelta(days=500), "last_attempt_at": not_before,
                "last_error": "issue: the CA refused the order (rateLimited)" if i % 1000 == 0 else None})
        row = cert_row(rng, name(host, ORGS[i % len(ORGS)]), issuer_dn, issuer_fp, not_before, lifetime, owner,
                       False, now, managed_id=managed_id)
        certificates.append(row)
        if managed_id is not None:
            managed_of[i] = (managed_id, str(row["fingerprint_sha256"]))
        sans.append({"certificate_fingerprint": row["fingerprint_sha256"], "kind": "DNS", "value": host})
        locations.append({"certificate_fingerprint": row["fingerprint_sha256"], "locator": f"tls://{host}:443",
                          "source": f"tls-scan:dc{i % 4}", "first_seen": not_before, "last_seen": now,
                          "seen_by_run": None, "ghost": i >= count, "details": None})
        if managed_id is not None:  # its predecessor, superseded
            old = cert_row(rng, row["subject"], issuer_dn, issuer_fp, not_before - dt.timedelta(days=lifetime * 2 / 3),
                           lifetime, owner, False, now, status="superseded", managed_id=managed_id)
            certificates.append(old)
            sans.append({"certificate_fingerprint": old["fingerprint_sha256"], "kind": "DNS", "value": host})

    with database.write_session(engine) as session:
        insert(session, Certificate, ca_rows)
        insert(session, ManagedCertificate, managed_rows)
        insert(session, Certificate, certificates)
        insert(session, SubjectAltName, sans)
        insert(session, Location, locations)
        insert(session, Target, [{
            "managed_certificate_id": m["id"], "name": "web", "kind": "ssh-nginx", "block": "ssh-host/web",
            "settings": {}, "desired_fingerprint": None, "verified_fingerprint": None, "verified_at": now,
            "deployed_at": now, "last_error": "verify: served a different certificate" if n % 100 == 50 else None,
            "updated_at": now} for n, m in enumerate(managed_rows)])
        insert(session, SourceRun, [{"source": f"tls-scan:dc{n}", "block": f"tls-scan/dc{n}",
                                     "last_started_at": now - dt.timedelta(hours=n), "last_completed_at":
                                     now - dt.timedelta(hours=n) if n < 3 else None, "last_failed_at": None,
                                     "last_error": None, "flow_run_id": None} for n in range(4)])
        insert(session, EndpointCheck, [{
            "place": f"tls://svc{n * 37}.team{n * 37 % TEAMS:03d}.example.com:443", "checked_at": now,
            "served_fingerprint": certificates[n * 37 % len(certificates)]["fingerprint_sha256"],
            "expected_fingerprint": None, "ok": n % 10 != 0,
            "problems": [] if n % 10 else ["expiring", "chain-incomplete"][: 1 + n % 2], "tls_version": "TLSv1.3",
            "revocation": "good", "error": None, "flow_run_id": None} for n in range(min(2000, count))])
        insert(session, Alert, [{
            "object": f"certificate:{certificates[n]['fingerprint_sha256']}", "condition": "expiring",
            "severity": ("page", "ticket", "ticket", "critical")[n % 4], "state": ("open", "escalated")[n % 2],
            "summary": "expires soon", "owner": None, "tags": {}, "details": {}, "first_seen": now, "last_seen": now,
            "notifications_sent": 1} for n in range(min(500, count))])
        # The audit trail of the managed certificates: five issuances each (latency recorded), a deploy.
        changes: list[audit.Change] = []
        for index, (managed_id, fp) in managed_of.items():
            for _ in range(5):
                changes.append(audit.Change("certificate.issued", f"certificate:{fp}", {
                    "managed": f"m{managed_id}", "issuer": "private-ca/internal", "serial": "01",
                    "issuance_seconds": round(rng.lognormvariate(0.3, 1.0), 3)}))
            changes.append(audit.Change("target.deployed", f"target:m{managed_id}/web", {"fingerprint": fp}))
            if index % 1000 == 0:
                changes.append(audit.Change("renewal.failed", f"managed:m{managed_id}", {"step": "issue"}))
        for start in range(0, len(changes), BATCH):
            audit.append(session, actor, changes[start:start + BATCH], now)
    revoked = 3  # real certificates of the private CA "internal", revoked (each publishes its CRL)
    with database.write_session(engine) as session:
        for n in range(revoked):
            key = ec.generate_private_key(ec.SECP256R1())
            csr = (x509.CertificateSigningRequestBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"revoked{n}.example.com")]))
                   .add_extension(x509.SubjectAlternativeName([x509.DNSName(f"revoked{n}.example.com")]), False)
                   .sign(key, hashes.SHA256()))
            issued = ca.issue(session, ring, actor, "internal", csr, "tls-server", now=now - dt.timedelta(days=2))
            fp = hashlib.sha256(issued.chain_der[0]).hexdigest()
            ca.revoke(session, ring, actor, fp, x509.ReasonFlags.superseded, ca_name="internal", now=now)
    return {"certificates": count, "ghost_only": ghosts, "managed": len(managed_rows),
            "audit_events": len(changes) + 3, "private_cas": len(private), "revoked": revoked}


RENDER = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
from certpilot import database, metrics


def peak_kib():  # this process's own high-water mark (ru_maxrss would carry the parent's over exec)
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))


start_cpu, step = time.process_time(), 0
for step in range(5_000_000):  # a yardstick of this machine's speed now: a plain Python loop
    pass
reference = time.process_time() - start_cpu
engine = database.create_engine(sys.argv[2])
with engine.connect() as conn:
    conn.exec_driver_sql("SELECT 1")
base = peak_kib()
times, cpu, out = [], [], b""
for _ in range(4):
    out = b""  # the previous render's text is let go first, as a server does
    start, start_cpu = time.perf_counter(), time.process_time()
    out = metrics.render(engine)
    times.append(time.perf_counter() - start)
    cpu.append(time.process_time() - start_cpu)
peak = peak_kib()
after = sum(1 for line in out.splitlines() if line.startswith(b"x509_cert_not_after{"))
managed = sum(1 for line in out.splitlines() if line.startswith(b"certmanager_certificate_expiration_timestamp_seconds{"))
print(json.dumps({"times": times, "cpu": cpu, "reference": reference, "base_kib": base, "peak_kib": peak, "bytes": len(out),
                  "lines": out.count(b"\n"), "not_after_series": after, "managed_series": managed}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="5,000 certificates")
    parser.add_argument("--count", type=int, default=None, help="certificates in service (default 100,000)")
    parser.add_argument("--database-url", help="an empty inventory database (default: SQLite in a temporary directory)")
    args = parser.parse_args()
    count = args.count or (5000 if args.quick else 100_000)
    work = Path(tempfile.mkdtemp(prefix="certpilot-bench-metrics-"))
    try:
        url = args.database_url or f"sqlite:///{work / 'inventory.db'}"
        engine = database.create_engine(url)
        database.upgrade(engine)
        now = dt.datetime.now(dt.timezone.utc)
        log(f"building an inventory of {count:,} certificates in service ({url.split(':')[0]})")
        start = time.perf_counter()
        built = build(engine, count, now)
        engine.dispose()
        log(f"built in {time.perf_counter() - start:.1f} s: {built}")
        done = subprocess.run([sys.executable, "-c", RENDER, str(ROOT), url], capture_output=True, text=True,
                              timeout=600, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
        if done.returncode != 0:
            raise SystemExit(f"the rendering process failed:\n{done.stderr}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        expected = count + 2 * built["private_cas"]  # and the private CAs' root and issuing certificates
        if result["not_after_series"] != expected or result["managed_series"] != built["managed"]:
            raise SystemExit(f"render wrote {result['not_after_series']} x509_cert_not_after series (expected "
                             f"{expected}) and {result['managed_series']} cert-manager ones (expected {built['managed']})")
        log("renders: " + ", ".join(f"{t:.3f} s" for t in result["times"]) + " (CPU time "
            + ", ".join(f"{t:.3f} s" for t in result["cpu"]) + f"; load average {os.getloadavg()[0]:.1f})")
        log(f"yardstick: an empty 5,000,000-step Python loop took {result['reference']:.3f} s of CPU in the "
            "rendering process just before (to compare runs on busier or other machines)")
        log(f"output: {result['bytes'] / 2**20:.1f} MiB, {result['lines']:,} lines; "
            f"{result['not_after_series']:,} certificates in service, {result['managed_series']:,} managed")
        log(f"rendering process: {result['base_kib'] / 1024:.0f} MiB resident before rendering, "
            f"peak {result['peak_kib'] / 1024:.0f} MiB (VmHWM)")
        log(f"figure metrics_render_seconds_100k: {statistics.median(result['times'][1:]):.3f} s")
        log(f"figure metrics_first_render_seconds_100k: {result['times'][0]:.3f} s")
        log(f"figure metrics_rss_mib_100k: {(result['peak_kib'] - result['base_kib']) / 1024:.0f} MiB")
    finally:
        if not os.environ.get("CERTPILOT_BENCH_KEEP"):
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"kept {work}")


if __name__ == "__main__":
    main()
