"""Benchmark: certificate import throughput, and the expiring-within-30-days query at scale.

    python bench/import_inventory.py            # 20,000 certificates imported, 1,000,000 in the inventory
    python bench/import_inventory.py --quick    # 5,000 and 50,000

On SQLite (a fresh file database) and on PostgreSQL (127.0.0.1:5432, user postgres, a database
certpilot_bench_<random> created here and dropped at the end), one inventory per backend:

1. Real certificates: distinct leaves, each with its own P-256 key, issued by one generated P-256
   issuing CA, expiries spread evenly from 30 days ago to 400 days ahead (certificate i gets slot
   i * 7919 mod M of the spread, so every prefix spans it), one PEM file per certificate, 1,000 per
   directory, generated in a process pool.
2. Throughput: the CA and the first N leaves imported into the empty inventory through
   certpilot.importer.import_paths, the code path of `certpilot inventory import`: read, parse,
   upsert (one row per fingerprint, SANs, a location, an audit event per change, per-file
   atomicity), then the policy applied to each batch as the command applies the policy in force
   (BENCH_POLICY: the built-in rules and an ownership rule that gives every certificate an owner,
   so each batch is assigned owners, audited, evaluated and its violations stored; --no-policy
   leaves this step out, for comparison). Certificates per second. Goal: >= 5,000/s on each backend.
3. Fill to M certificates, one of two ways, and the output says which:
   --fill import (the default up to 200,000): the remaining real certificate files, imported the
       same way. Real certificates all the way.
   --fill bulk (the default above 200,000; importing a million real files takes longer than a
       benchmark run should on a small machine): rows derived from the N real certificates parsed
       above, each with its own fingerprint, serial, names and expiry (the expiry spread of step 1),
       its SANs and a location, written with the importer's own bulk insert (COPY on PostgreSQL,
       executemany on SQLite) in transactions of 50,000, with the issuer link set. No audit events
       for these rows (the query does not read them); the DER kept is the base certificate's.
4. The query of `certpilot inventory list --expiring-within 30d`, i.e.
   certpilot.inventory.list_certificates(session, CertificateQuery(expiring_within=timedelta(days=30))),
   after ANALYZE (PostgreSQL: VACUUM ANALYZE, what autovacuum does after a bulk load; SQLite: as
   loaded, no ANALYZE), median of warm runs, three figures:
     (a) expiring_30d_count: the number of matching certificates (count_certificates, same WHERE),
     (b) expiring_30d_first_page: the first page, limit 100 (what a person looks at),
     (c) expiring_30d_full_result: every matching certificate with its SANs and locations (about 7%
         of the inventory: some 70,000 rows at a million), with its row count.
   The goal (<= 50 ms at 1,000,000) is for (a) and (b), which read a range of the
   (status, not_after) index. (c) builds tens of thousands of result dicts in Python: it is reported
   so the cost of asking for everything is on record, not as a 50 ms operation.

The output ends with one line per figure: `figure NAME: VALUE UNIT`. The only network traffic is to
PostgreSQL on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import multiprocessing
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import psycopg
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from certpilot import audit, database, inventory
from certpilot.formats import load_certificate
from certpilot.importer import ImportOptions, import_paths
from certpilot.inventory import CertificateQuery, count_certificates, list_certificates
from certpilot.models import Certificate, Location, SubjectAltName
from certpilot.policy import Policy, parse_policy
from certpilot.sample_estate import Authority, issue_leaf, pem
from certpilot.x509info import CertificateRecord, describe_certificate

PG_ADMIN_URL = os.environ.get("CERTPILOT_BENCH_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
PER_DIR = 1000
SPREAD_DAYS = (-30.0, 400.0)
SPREAD_STRIDE = 7919  # a prime: certificate i gets slot (i * stride) mod M, so any prefix spans the spread
BULK_FILL_ABOVE = 200_000
BULK_TRANSACTION = 50_000

_worker_ca: Authority | None = None
_worker_now: dt.datetime | None = None


def log(message: str) -> None:
    print(message, flush=True)


def expiry(now: dt.datetime, index: int, total: int) -> dt.datetime:
    low, high = SPREAD_DAYS
    slot = (index * SPREAD_STRIDE) % total
    return now + dt.timedelta(days=low + (high - low) * (slot + 0.5) / total)


def host(index: int) -> str:
    return f"host{index}.bench.test"


# -------------------------------------------------------------------------------------------- generate

def bench_ca(now: dt.datetime) -> Authority:
    """An issuing CA like sample_estate.make_ca's, but on P-256: signing a million leaves with P-384
    takes several times longer, and the certificates are no less real."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "certpilot bench"),
                      x509.NameAttribute(NameOID.COMMON_NAME, "certpilot bench issuing CA")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return Authority(cert, key)


def _init_generator(ca_cert_pem: bytes, ca_key_pem: bytes, now_iso: str) -> None:
    global _worker_ca, _worker_now
    _worker_ca = Authority(x509.load_pem_x509_certificate(ca_cert_pem),
                           serialization.load_pem_private_key(ca_key_pem, password=None))
    _worker_now = dt.datetime.fromisoformat(now_iso)


def leaf_path(root: Path, index: int) -> Path:
    return root / f"d{index // PER_DIR:04d}" / f"leaf-{index:07d}.pem"


def _generate_range(job: tuple[str, int, int, int]) -> int:
    root, start, stop, total = job
    assert _worker_ca is not None and _worker_now is not None
    for index in range(start, stop):
        cert, _key = issue_leaf(_worker_ca, [host(index), f"www.{host(index)}"], expiry(_worker_now, index, total),
                                now=_worker_now)
        path = leaf_path(Path(root), index)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pem(cert))
    return stop - start


def generate(root: Path, count: int, total: int, now: dt.datetime, workers: int) -> Path:
    """``count`` leaf certificate files under ``root`` (expiries laid out for ``total``); returns the CA's file."""
    ca = bench_ca(now)
    ca_file = root / "ca" / "issuing-ca.pem"
    ca_file.parent.mkdir(parents=True)
    ca_file.write_bytes(pem(ca.certificate))
    key_pem = ca.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption())
    jobs = [(str(root), start, min(start + PER_DIR, count), total) for start in range(0, count, PER_DIR)]
    started = time.perf_counter()
    done = 0
    context = multiprocessing.get_context("fork")  # this script runs no other thread at this point
    with context.Pool(workers, _init_generator, (pem(ca.certificate), key_pem, now.isoformat())) as pool:
        for made in pool.imap_unordered(_generate_range, jobs):
            done += made
            if done % 100_000 < PER_DIR and done >= 100_000:
                log(f"  generated {done:,} certificates ({done / (time.perf_counter() - started):,.0f}/s)")
    log(f"  generated {count:,} certificates in {time.perf_counter() - started:.1f}s")
    return ca_file


def import_inputs(root: Path, start: int, stop: int) -> list[str]:
    """The paths of leaves ``start``..``stop``: whole directories where possible."""
    paths: list[str] = []
    index = start
    while index < stop:
        if index % PER_DIR == 0 and index + PER_DIR <= stop:
            paths.append(str(root / f"d{index // PER_DIR:04d}"))
            index += PER_DIR
        else:
            paths.append(str(leaf_path(root, index)))
            index += 1
    return paths


# -------------------------------------------------------------------------------------------- backends

@contextmanager
def fresh_inventory(backend: str, workdir: Path) -> Iterator[sa.Engine]:
    """A new, migrated, empty inventory; removed afterwards."""
    if backend == "sqlite":
        path = workdir / f"inventory-{uuid.uuid4().hex[:8]}.db"
        engine = database.create_engine(f"sqlite:///{path}")
        try:
            database.upgrade(engine)
            yield engine
        finally:
            engine.dispose()
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
        return
    name = f"certpilot_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=10) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    engine = database.create_engine(PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}")
    try:
        database.upgrade(engine)
        yield engine
    finally:
        engine.dispose()
        with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# The policy applied during the imports: the built-in rules, and an ownership rule every certificate matches.
BENCH_POLICY = parse_policy("ownership:\n  - match: {source: import}\n    owner: bench\n", "bench policy")


def timed_import(engine: sa.Engine, paths: list[str], expected: int, label: str,
                 policy: Policy | None = BENCH_POLICY) -> float:
    """Import ``paths`` through import_paths, applying ``policy``; returns certificates per second."""
    done = 0
    started = time.perf_counter()

    def progress(_result: object) -> None:
        nonlocal done
        done += 1
        if done % 200_000 == 0:
            log(f"  {label}: {done:,} files ({done / (time.perf_counter() - started):,.0f}/s)")

    cpu_before = cpu_seconds()
    report = import_paths(engine, paths, ImportOptions(), audit.Actor("bench:import_inventory"), on_file=progress,
                          policy=policy)
    elapsed = time.perf_counter() - started
    cpu = cpu_seconds() - cpu_before
    summary = report.summary()
    if summary.failed or summary.new_certificates != expected or summary.policy_error:
        raise SystemExit(f"{label}: unexpected import result {summary} (expected {expected:,} new)")
    if policy is not None:
        log(f"  {label}: policy: {summary.owners_assigned:,} owner(s) assigned, {summary.violations:,} violation(s) "
            f"{dict(summary.violations_by_rule)}")
    # The CPU time is there to read the wall-clock rate against: on a shared machine it moves with the load.
    log(f"  {label}: {expected:,} certificates in {elapsed:.2f}s = {expected / elapsed:,.0f}/s "
        f"(CPU {cpu / expected * 1e6:.0f} us per certificate in the importer and its parse workers, "
        f"not counting the database server; load average {os.getloadavg()[0]:.1f})")
    return expected / elapsed


def cpu_seconds() -> float:
    """User and system CPU of this process and of its children that have exited (the parse workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def bulk_fill(engine: sa.Engine, root: Path, ca_file: Path, real: int, size: int, now: dt.datetime) -> float:
    """Rows ``real``..``size``, derived from the ``real`` certificates already imported (see the module
    docstring); returns rows per second."""
    ca_fp = describe_certificate(load_certificate(ca_file.read_bytes())).fingerprint_sha256
    bases: list[CertificateRecord] = [describe_certificate(load_certificate(leaf_path(root, i).read_bytes()))
                                      for i in range(real)]
    locator_dir = (root / "derived").resolve().as_uri()
    started = time.perf_counter()
    for first in range(real, size, BULK_TRANSACTION):
        certificates, sans, locations = [], [], []
        for index in range(first, min(first + BULK_TRANSACTION, size)):
            base_index = index % real
            base = bases[base_index]
            old, new = host(base_index), host(index)
            not_after = expiry(now, index, size)
            record = replace(
                base, fingerprint_sha256=hashlib.sha256(b"certpilot bench derived %d:" % index + base.der).hexdigest(),
                serial_hex=f"{(index << 64) | int.from_bytes(base.der[-8:], 'big'):032x}",
                subject=base.subject.replace(old, new), not_after=not_after,
                not_before=min(now, not_after) - dt.timedelta(days=90),
                sans=tuple((kind, value.replace(old, new)) for kind, value in base.sans))
            row = inventory._certificate_row(record, None, {}, now)  # the importer's own row shape
            row["issuer_fingerprint"] = ca_fp
            certificates.append(row)
            sans += [{"certificate_fingerprint": record.fingerprint_sha256, "kind": kind, "value": value}
                     for kind, value in record.sans]
            locations.append({"certificate_fingerprint": record.fingerprint_sha256,
                              "locator": f"{locator_dir}/leaf-{index:07d}.pem", "source": "import",
                              "first_seen": now, "last_seen": now, "seen_by_run": None, "ghost": False})
        with database.write_session(engine) as session:
            inventory._insert_rows(session, Certificate.__table__, certificates)  # type: ignore[attr-defined]
            inventory._insert_rows(session, SubjectAltName.__table__, sans)  # type: ignore[attr-defined]
            inventory._insert_rows(session, Location.__table__, locations)  # type: ignore[attr-defined]
        done = min(first + BULK_TRANSACTION, size) - real
        if done % 200_000 == 0:
            log(f"  bulk fill: {done:,} rows ({done / (time.perf_counter() - started):,.0f}/s)")
    elapsed = time.perf_counter() - started
    log(f"  bulk fill: {size - real:,} derived rows in {elapsed:.1f}s = {(size - real) / elapsed:,.0f}/s")
    return (size - real) / elapsed


def analyze(engine: sa.Engine) -> None:
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM (ANALYZE)")


def stored(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(Certificate)).scalar_one())


def median_ms(runs: int, action: Callable[[], object]) -> tuple[float, object]:
    action()  # warm-up: connection, statement cache, pages
    times, result = [], None
    for _ in range(runs):
        started = time.perf_counter()
        result = action()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), result


def time_queries(engine: sa.Engine, runs: int, full_runs: int) -> dict[str, tuple[float, int]]:
    query = CertificateQuery(expiring_within=dt.timedelta(days=30))
    out: dict[str, tuple[float, int]] = {}
    with database.read_session(engine) as session:
        ms, count = median_ms(runs, lambda: count_certificates(session, query))
        out["count"] = (ms, int(count))  # type: ignore[call-overload]
        ms, page = median_ms(runs, lambda: list_certificates(session, replace(query, limit=100)))
        out["first_page"] = (ms, len(page))  # type: ignore[arg-type]
        ms, rows = median_ms(full_runs, lambda: list_certificates(session, query))
        out["full_result"] = (ms, len(rows))  # type: ignore[arg-type]
    # Each call takes its own "now", seconds apart: a certificate or two may cross the window's edges.
    if abs(out["full_result"][1] - out["count"][1]) > 10:
        raise SystemExit(f"the count ({out['count'][1]}) and the full result ({out['full_result'][1]}) disagree")
    return out


def explain(engine: sa.Engine) -> str:
    """The plan of the first-page query, for the log."""
    now = dt.datetime.now(dt.timezone.utc)
    c = Certificate
    stmt = (sa.select(c.fingerprint_sha256, c.not_after)
            .where(*inventory._where(CertificateQuery(expiring_within=dt.timedelta(days=30)), now))
            .order_by(c.not_after, c.fingerprint_sha256).limit(100))
    compiled = stmt.compile(engine, compile_kwargs={"literal_binds": True})
    if engine.dialect.name == "sqlite":
        sql = "EXPLAIN QUERY PLAN " + str(compiled)
    else:
        sql = "EXPLAIN " + str(compiled).replace("%", "%%")  # psycopg reads % as a placeholder
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(sql).all()
    return " | ".join(str(row[-1]).strip() for row in rows)


# ------------------------------------------------------------------------------------------------ main

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small run: 5,000 and 50,000 certificates")
    parser.add_argument("--certs", type=int, help="certificates imported for the throughput figure (default 20,000)")
    parser.add_argument("--inventory", type=int, help="certificates in the inventory for the query (default 1,000,000)")
    parser.add_argument("--fill", choices=("import", "bulk"),
                        help=f"how to fill the inventory (default: import up to {BULK_FILL_ABOVE:,}, bulk above)")
    parser.add_argument("--backends", default="sqlite,postgres", help="comma-separated: sqlite, postgres")
    parser.add_argument("--runs", type=int, default=7, help="runs of the count and first-page queries (median)")
    parser.add_argument("--full-runs", type=int, default=3, help="runs of the full-result query (median)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="certificate generator processes")
    parser.add_argument("--workdir", type=Path, help="where to put the temporary files (default: the system temp dir)")
    parser.add_argument("--no-policy", action="store_true", help="import without applying a policy (for comparison)")
    args = parser.parse_args(argv)
    certs = args.certs or (5_000 if args.quick else 20_000)
    size = max(args.inventory or (50_000 if args.quick else 1_000_000), certs)
    fill = args.fill or ("bulk" if size > BULK_FILL_ABOVE else "import")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if unknown := set(backends) - {"sqlite", "postgres"}:
        parser.error(f"unknown backend(s): {', '.join(sorted(unknown))}")

    now = dt.datetime.now(dt.timezone.utc)
    workdir = Path(tempfile.mkdtemp(prefix="certpilot-bench-", dir=args.workdir))
    root = workdir / "certs"
    figures: list[tuple[str, str, str]] = []
    notes: list[str] = []
    try:
        real = size if fill == "import" else certs
        log(f"certpilot import benchmark: {certs:,} certificates imported for throughput; inventory of {size:,} "
            f"for the query, filled by {fill}; {os.cpu_count()} CPU(s); backends {', '.join(backends)}; "
            f"files in {workdir}")
        log(f"generating {real:,} real certificates (one P-256 key each) with {args.workers} process(es)")
        ca_file = generate(root, real, size, now, args.workers)
        for backend in backends:
            with fresh_inventory(backend, workdir) as engine:
                log(f"[{backend}] throughput: the issuing CA and {certs:,} leaves into the empty inventory")
                policy = None if args.no_policy else BENCH_POLICY
                rate = timed_import(engine, [str(ca_file)] + import_inputs(root, 0, certs), certs + 1,
                                    f"{backend} import", policy)
                log(f"[{backend}] fill to {size:,} leaves ({fill})")
                if size > certs and fill == "import":
                    fill_rate = timed_import(engine, import_inputs(root, certs, size), size - certs, f"{backend} fill",
                                             policy)
                elif size > certs:
                    fill_rate = bulk_fill(engine, root, ca_file, certs, size, now)
                else:
                    fill_rate = rate
                analyze(engine)
                total = stored(engine)
                log(f"  {total:,} certificates in the inventory; plan of the first page: {explain(engine)}")
                timings = time_queries(engine, args.runs, args.full_runs)
            for part, (ms, rows) in timings.items():
                log(f"  expiring within 30 days, {part}: {ms:.2f} ms median ({rows:,} rows)")
            figures += [
                (f"import_throughput_{backend}", f"{rate:.0f}", "certificates/s"),
                (f"fill_throughput_{backend}", f"{fill_rate:.0f}", "certificates/s" if fill == "import" else "rows/s"),
                (f"inventory_size_{backend}", str(total), "certificates"),
                (f"expiring_30d_count_{backend}", f"{timings['count'][0]:.2f}", "ms"),
                (f"expiring_30d_first_page_{backend}", f"{timings['first_page'][0]:.2f}", "ms"),
                (f"expiring_30d_full_result_{backend}", f"{timings['full_result'][0]:.1f}", "ms"),
                (f"expiring_30d_full_result_rows_{backend}", str(timings["full_result"][1]), "rows"),
            ]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    notes.append(f"import_throughput: the CA and {certs:,} real certificate files into an empty inventory through "
                 "certpilot.importer.import_paths (read + parse + upsert"
                 + (")" if args.no_policy else " + the policy: ownership and evaluation") + "; goal >= 5000/s.")
    if fill == "import":
        notes.append(f"fill: the inventory brought to {size:,} by importing the remaining real certificate files "
                     "the same way (every certificate in it is real).")
    else:
        notes.append(f"fill: the inventory brought to {size:,} with rows derived from the {certs:,} real certificates "
                     "(own fingerprint, serial, names, expiry; SANs and a location each; no audit events), written "
                     "with the importer's bulk insert (COPY / executemany); fill_throughput counts rows, "
                     "not an import.")
    notes.append("expiring_30d_*: list_certificates(CertificateQuery(expiring_within=30 days)) as `certpilot inventory "
                 "list --expiring-within 30d` runs it; median of warm runs; PostgreSQL VACUUM ANALYZEd, SQLite as "
                 "loaded. The <= 50 ms goal applies to count and first_page (limit 100); full_result builds every "
                 "matching row with its SANs and locations in Python and is reported with its row count.")
    for note in notes:
        log(f"note: {note}")
    for name, value, unit in figures:
        print(f"figure {name}: {value} {unit}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
