"""Benchmark: the renew-due flow over 1,000 due private-CA certificates, and the same renewals without Prefect.

    python bench/renew_due.py            # 1,000 certificates
    python bench/renew_due.py --quick    # 50

What it does, all on this machine:

1. Starts a local Prefect server (lab.prefect_server: `prefect server start --host 127.0.0.1 --port P`) as a subprocess with
   its own PREFECT_HOME and SQLite database in a temporary directory, and waits for /api/health. The
   client here runs with flow heartbeats off (PREFECT_FLOWS_HEARTBEAT_FREQUENCY None) and its own
   PREFECT_HOME too; nothing outside the temporary directory is written.
2. Creates a fresh inventory (SQLite) with certpilot's private CA (backdated 60 days, so it can have
   signed the old certificates), registers the private-ca block type and saves the issuer block.
3. Prefect: defines N managed certificates and gives each a 30-day certificate from the private CA
   issued 25 days ago (due: past two thirds of its lifetime), then times renew_due() with the
   deployment's defaults (8 worker threads, batches of 200, 4 slots of the issuer's concurrency
   limit) from the call until the Prefect API shows every task run of that flow run completed
   (polling the task-run count of the run; one task run per certificate, named renew-<name> and
   tagged certificate:<name>, plus the flow's four bookkeeping tasks). The client's own finish time
   is printed too. Every renewal is the full path: ARI check, new key (sealed), CSR, an issuer slot,
   the CA's signature, the checks on what came back and the inventory update; the run must complete
   with N renewed and N certificates superseded.
4. Without Prefect: N other managed certificates seeded the same way, then certpilot.managed.due()
   and certpilot.renewing.renew_one() for each on a thread pool of the same size, with the same PrivateCAIssuer.

The output ends with `figure renew_due_1000_prefect: S s` and `figure renew_due_1000_plain: S s`
(the name says 1000 whatever N is with --quick; the line before says N). Goal: <= 90 s.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime as dt
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

WORK = Path(tempfile.mkdtemp(prefix="certpilot-bench-renew-"))
os.environ["PREFECT_HOME"] = str(WORK / "prefect-client")  # before prefect is imported: keep ~/.prefect untouched
os.environ["CERTPILOT_HOME"] = str(WORK / "certpilot")
for _name in ("CERTPILOT_DATABASE_URL", "CERTPILOT_MASTER_KEY", "CERTPILOT_MASTER_KEY_FILE", "PREFECT_API_URL"):
    os.environ.pop(_name, None)
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")  # no console line per task run

import httpx  # noqa: E402
from cryptography.hazmat.primitives.serialization import Encoding  # noqa: E402
import sqlalchemy as sa  # noqa: E402
from prefect.settings import (PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY,  # noqa: E402
                              temporary_settings)

from certpilot import audit, ca, keystore, managed, renewing  # noqa: E402
from certpilot.database import get_engine, read_session, write_session  # noqa: E402
from certpilot.issuance import IssuedCertificate, build_csr  # noqa: E402
from certpilot.keys import generate_private_key  # noqa: E402
from certpilot.models import Certificate  # noqa: E402
from certpilot.settings import load_settings  # noqa: E402
from lab.prefect_server import PrefectServer  # noqa: E402

CA_NAME = "bench"
ISSUER = f"private-ca/{CA_NAME}"
ACTOR = audit.Actor("bench")


def log(message: str) -> None:
    print(message, flush=True)


def ring() -> keystore.KeyRing:
    return keystore.load_key_ring(load_settings())


def define_and_seed(engine: sa.Engine, prefix: str, count: int) -> None:
    """``count`` managed certificates, each with a 30-day certificate issued 25 days ago (so: due)."""
    back = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=25)
    the_ring = ring()
    for start in range(0, count, 100):
        names = [f"{prefix}-{i:04d}" for i in range(start, min(count, start + 100))]
        with write_session(engine) as session:
            rows = [managed.add(session, managed.ManagedSpec(name=n, dns_names=(f"{n}.bench.test",), issuer=ISSUER,
                                                             validity_days=30, owner="bench"), ACTOR) for n in names]
            signer = ca.open_signer(session, the_ring, CA_NAME)
            for row in rows:
                key = generate_private_key(row.key_algorithm)
                ref = keystore.store_private_key(session, key, the_ring, ACTOR, "generated")
                cert = signer.sign(build_csr(key, row.dns_names), "tls-server", validity_days=30, now=back)
                issued = IssuedCertificate((cert.public_bytes(Encoding.DER), signer.certificate.public_bytes(Encoding.DER)))
                renewing.record_issued(session, row, issued, ref, ACTOR)


def count_completed(url: str, run_id: str) -> int:
    body = {"flow_runs": {"id": {"any_": [run_id]}}, "task_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}}
    return int(httpx.post(f"{url}/task_runs/count", json=body, timeout=30).json())


def superseded(engine: sa.Engine, prefix: str) -> int:
    with read_session(engine) as session:
        return session.execute(sa.select(sa.func.count()).select_from(Certificate).where(
            Certificate.status == "superseded", Certificate.subject.like(f"CN={prefix}-%"))).scalar_one()


def bench_prefect(engine: sa.Engine, url: str, count: int, workers: int) -> float:
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.renew import renew_due

    define_and_seed(engine, "pf", count)
    with read_session(engine) as session:
        assert len(managed.due(session)) == count
    flow = renew_due.with_options(task_runner=ThreadPoolTaskRunner(max_workers=workers))
    log(f"prefect: renew-due over {count} due certificates, {workers} worker threads ...")
    start = time.perf_counter()
    state = flow(return_state=True)  # the deployment's defaults: batches of 200, 4 issuer slots
    client_done = time.perf_counter() - start
    if not state.is_completed():
        raise RuntimeError(f"renew-due did not complete: {state.message}")
    result = state.result()
    assert result.renewed == count and result.failed == 0, result
    run_id = str(state.state_details.flow_run_id)
    expected = count + 4  # refresh-renewal-info, select-due, ensure-issuer-limits, publish-renewal-report
    seen = 0
    while seen < expected:
        seen = count_completed(url, run_id)
        if seen < expected:
            time.sleep(0.2)
    api_done = time.perf_counter() - start
    assert superseded(engine, "pf") == count
    for index in sorted({0, count // 2, count - 1}):  # each certificate's record: named and tagged after it
        name = f"pf-{index:04d}"
        body = {"flow_runs": {"id": {"any_": [run_id]}}, "task_runs": {"name": {"any_": [f"renew-{name}"]}},
                "limit": 5, "offset": 0, "sort": "EXPECTED_START_TIME_DESC"}
        [record] = httpx.post(f"{url}/task_runs/filter", json=body, timeout=30).json()
        assert f"certificate:{name}" in record["tags"] and record["state_type"] == "COMPLETED", record
    log(f"prefect: client finished after {client_done:.1f} s; the API showed all {expected} task runs completed "
        f"after {api_done:.1f} s")
    return api_done


def bench_plain(engine: sa.Engine, count: int, workers: int) -> float:
    from connectors.private_ca import PrivateCAIssuer

    define_and_seed(engine, "pl", count)
    issuer = PrivateCAIssuer(engine, CA_NAME, ring)
    log(f"plain: due() and renewing.renew_one() over {count} due certificates, {workers} threads ...")
    start = time.perf_counter()
    with read_session(engine) as session:
        names = [m.name for m, _ in managed.due(session)]
    assert len(names) == count, len(names)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(lambda n: renewing.renew_one(engine, n, issuer, ring, ACTOR), names))
    elapsed = time.perf_counter() - start
    assert len(results) == count and superseded(engine, "pl") == count
    log(f"plain: {count} renewed in {elapsed:.1f} s")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="50 certificates instead of 1,000")
    parser.add_argument("--count", type=int, help="how many certificates (overrides --quick)")
    parser.add_argument("--workers", type=int, default=8, help="renewals at once (thread pool size)")
    parser.add_argument("--keep", action="store_true", help=f"keep the work directory ({WORK})")
    args = parser.parse_args()
    count = args.count or (50 if args.quick else 1000)

    started = time.perf_counter()
    try:
        with PrefectServer(WORK / "prefect-server") as server:
            url = server.api_url
            log(f"prefect server ready at {url} after {time.perf_counter() - started:.1f} s (work dir {WORK})")
            with temporary_settings({PREFECT_API_URL: url, PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
                from blocks.issuers import PrivateCABlock

                engine = get_engine()
                with write_session(engine) as session:
                    ca.init_ca(session, ring(), ACTOR, CA_NAME, "http://127.0.0.1:8888",
                               now=dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=60))
                PrivateCABlock.register_type_and_schema()
                PrivateCABlock(ca_name=CA_NAME).save(CA_NAME, overwrite=True)
                prefect_s = bench_prefect(engine, url, count, args.workers)
                plain_s = bench_plain(engine, count, args.workers)
    finally:
        if not args.keep:
            shutil.rmtree(WORK, ignore_errors=True)
    log(f"{count} certificates")
    log(f"figure renew_due_1000_prefect: {prefect_s:.1f} s")
    log(f"figure renew_due_1000_plain: {plain_s:.1f} s")


if __name__ == "__main__":
    main()
