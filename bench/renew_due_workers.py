"""Benchmark: renew-due over 10,000 due private-CA certificates, executed by the process workers of one
Prefect work pool, with the Prefect server and the inventory on PostgreSQL; two workers, then one.

    python bench/renew_due_workers.py            # 10,000 certificates per run
    python bench/renew_due_workers.py --quick    # 500

What it does, all on this machine (loopback only):

1. Creates two databases on the PostgreSQL at 127.0.0.1:5432 (trust auth, user postgres): one for the
   Prefect server, one for the inventory; both are dropped at the end, whatever happens.
2. Starts a Prefect server on the first (lab.prefect_server with PREFECT_SERVER_DATABASE_CONNECTION_URL
   postgresql+asyncpg://...), creates the process work pool `certpilot` and deploys renew-due and
   renew-batch from prefect.yaml with `prefect deploy` (as README tells an operator to).
3. The inventory: certpilot's private CA (backdated 60 days) and the issuer block; then, for each run,
   N managed certificates, each with a 30-day certificate issued 25 days ago, so due
   (lab.due_fleet, the set-up bench/renew_due.py uses).
4. Starts W process workers (`prefect worker start --pool certpilot --limit L`, each in its own
   process, as on its own machine) and times a run of the renew-due deployment (batches of 200,
   4 renew-batch runs in flight) from its creation until it is Completed and the API shows every
   certificate's task run completed (it records them from events, a little behind): renew-due fans the due
   certificates out as renew-batch runs, which the workers share. Every renewal is the full path (new
   key sealed, CSR, an issuer slot, the CA's signature, the checks, the inventory update), each a task
   run of its own named renew-<name> and tagged certificate:<name>. Checked after each run: every
   certificate renewed once (one superseded and one active each), one task run per certificate in the
   renew-batch runs, and which worker ran how many batches.
5. The same with one worker, over N certificates of its own.

The output ends with `figure renew_due_seconds_10k_2_workers: S s` and `figure renew_due_seconds_10k_1_worker:
S s` (with another N, such as --quick's 500, the names say N instead of 10k).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

WORK = Path(tempfile.mkdtemp(prefix="certpilot-bench-workers-"))
os.environ["PREFECT_HOME"] = str(WORK / "prefect-client")  # before prefect is imported: keep ~/.prefect untouched
os.environ["CERTPILOT_HOME"] = str(WORK / "certpilot")
for _name in ("CERTPILOT_DATABASE_URL", "CERTPILOT_MASTER_KEY", "CERTPILOT_MASTER_KEY_FILE", "PREFECT_API_URL"):
    os.environ.pop(_name, None)
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import httpx  # noqa: E402
import psycopg  # noqa: E402
import sqlalchemy as sa  # noqa: E402
from prefect.client.orchestration import get_client  # noqa: E402
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId  # noqa: E402
from prefect.settings import PREFECT_API_URL, temporary_settings  # noqa: E402

from certpilot import audit, database, keystore  # noqa: E402
from certpilot.database import read_session  # noqa: E402
from certpilot.models import Certificate  # noqa: E402
from certpilot.settings import load_settings  # noqa: E402
from sqlmodel import col  # noqa: E402
from lab.due_fleet import define_due, init_backdated_ca  # noqa: E402
from lab.prefect_server import PrefectServer  # noqa: E402

PG_ADMIN = os.environ.get("CERTPILOT_BENCH_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
PREFECT = str(Path(sys.executable).parent / "prefect")
POOL = "certpilot"  # the pool prefect.yaml names
CA_NAME = "bench"
ACTOR = audit.Actor("bench")
RUN_SECONDS = 3 * 3600  # a run that takes longer than this is reported as a failure


def log(message: str) -> None:
    print(message, flush=True)


def pg_url(name: str, driver: str = "postgresql") -> str:
    return f"{driver}://" + PG_ADMIN.split("://", 1)[1].rsplit("/", 1)[0] + f"/{name}"


def admin(statement: str) -> None:
    with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=10) as conn:
        conn.execute(statement)


def prefect(env: dict[str, str], *args: str) -> None:
    run = subprocess.run([PREFECT, "--no-prompt", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300, check=False)
    if run.returncode != 0:
        raise RuntimeError(f"prefect {' '.join(args)} exited {run.returncode}:\n{run.stdout}\n{run.stderr}")


def superseded(engine: sa.Engine, prefix: str) -> int:
    with read_session(engine) as session:
        return session.execute(sa.select(sa.func.count()).select_from(Certificate).where(
            col(Certificate.status) == "superseded", col(Certificate.subject).like(f"CN={prefix}-%"))).scalar_one()


def start_workers(count: int, env: dict[str, str], limit: int, tag: str) -> list[tuple[subprocess.Popen[bytes], Path]]:
    workers = []
    for index in range(count):
        path = WORK / f"worker-{tag}-{index}.log"
        with open(path, "wb") as out:
            workers.append((subprocess.Popen(
                [PREFECT, "worker", "start", "--pool", POOL, "--type", "process", "--name", f"bench-{tag}-{index}",
                 "--limit", str(limit)], cwd=WORK, env=env, stdout=out, stderr=subprocess.STDOUT), path))
    return workers


def stop_workers(workers: list[tuple[subprocess.Popen[bytes], Path]]) -> None:
    for worker, _ in workers:
        if worker.poll() is None:
            worker.send_signal(signal.SIGINT)  # a process worker ignores SIGTERM
    for worker, _ in workers:
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait(timeout=10)


def bench_run(engine: sa.Engine, env: dict[str, str], prefix: str, count: int, workers: int, limit: int,
              batch_size: int) -> float:
    define_due(engine, keystore.load_key_ring(load_settings()), ACTOR, CA_NAME, prefix, count)
    started_workers = start_workers(workers, env, limit, prefix)
    try:
        with get_client(sync_client=True) as client:
            parent = client.read_deployment_by_name("renew-due/renew-due")
            batch = client.read_deployment_by_name("renew-batch/renew-batch")
            before = {r.id for r in client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[batch.id])))}
            log(f"{prefix}: renew-due over {count} due certificates, {workers} worker(s) (--limit {limit}) ...")
            start = time.perf_counter()
            run = client.create_flow_run_from_deployment(parent.id, parameters={"batch_size": batch_size})
            while not (state := client.read_flow_run(run.id).state) or not state.is_final():
                for worker, path in started_workers:
                    if worker.poll() is not None:
                        raise RuntimeError(f"worker exited with {worker.returncode}: see {path}")
                if time.perf_counter() - start > RUN_SECONDS:
                    raise RuntimeError(f"renew-due still {state.name if state else None} after {RUN_SECONDS} s")
                time.sleep(1)
            finished = time.perf_counter() - start
            if not state.is_completed():
                raise RuntimeError(f"renew-due ended {state.name}: {state.message}")
            batches = [r for r in client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[batch.id])), limit=200)
                if r.id not in before]
            # The server records task runs from the events the workers send, a little behind: wait (bounded)
            # until it shows every certificate's record completed.
            body = {"flow_runs": {"id": {"any_": [str(b.id) for b in batches]}},
                    "task_runs": {"name": {"like_": f"renew-{prefix}-"}, "state": {"type": {"any_": ["COMPLETED"]}}}}
            while (records := int(httpx.post(f"{env['PREFECT_API_URL']}/task_runs/count", json=body,
                                             timeout=60).json())) < count and time.perf_counter() - start < RUN_SECONDS:
                time.sleep(1)
            elapsed = time.perf_counter() - start
    finally:
        stop_workers(started_workers)
    renewed = superseded(engine, prefix)
    if renewed != count or records != count:
        raise RuntimeError(f"{prefix}: {renewed} of {count} renewed, {records} task-run records")
    shares = [sum(f"Flow run '{b.name}' submitted to infrastructure" in path.read_text() for b in batches)
              for _, path in started_workers]
    log(f"{prefix}: {count} renewed once each; renew-due Completed after {finished:.1f} s, the API showed all "
        f"{records} task runs renew-{prefix}-... completed after {elapsed:.1f} s ({count / elapsed:.0f}/s); "
        f"{len(batches)} renew-batch runs, per worker: {shares}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="500 certificates instead of 10,000")
    parser.add_argument("--count", type=int, help="certificates per run (overrides --quick)")
    parser.add_argument("--limit", type=int, default=3, help="flow runs at once per worker (prefect worker --limit)")
    parser.add_argument("--batch-size", type=int, default=200, help="certificates per renew-batch run")
    parser.add_argument("--keep", action="store_true", help=f"keep the work directory ({WORK})")
    args = parser.parse_args()
    count = args.count or (500 if args.quick else 10_000)

    suffix = uuid.uuid4().hex[:10]
    server_db, inventory_db = f"certpilot_bench_prefect_{suffix}", f"certpilot_bench_inventory_{suffix}"
    admin(f'CREATE DATABASE "{server_db}"')
    admin(f'CREATE DATABASE "{inventory_db}"')
    os.environ["CERTPILOT_DATABASE_URL"] = pg_url(inventory_db)
    started = time.perf_counter()
    try:
        with PrefectServer(WORK / "prefect-server", database_url=pg_url(server_db, "postgresql+asyncpg")) as server:
            log(f"prefect server on PostgreSQL ready at {server.api_url} after {time.perf_counter() - started:.1f} s "
                f"(work dir {WORK})")
            env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
            env.update({"PREFECT_API_URL": server.api_url, "PREFECT_HOME": str(WORK / "prefect-operator"),
                        "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_WORKER_QUERY_SECONDS": "2",
                        "PREFECT_LOGGING_LEVEL": "INFO", "CERTPILOT_PROJECT_DIR": str(ROOT)})
            prefect(env, "work-pool", "create", POOL, "--type", "process")
            prefect(env, "deploy", "--name", "renew-due", "--name", "renew-batch")
            with temporary_settings({PREFECT_API_URL: server.api_url}):
                from blocks.issuers import PrivateCABlock

                engine = database.get_engine()
                init_backdated_ca(engine, keystore.load_key_ring(load_settings()), ACTOR, CA_NAME)
                PrivateCABlock.register_type_and_schema()
                PrivateCABlock(ca_name=CA_NAME).save(CA_NAME, overwrite=True)
                two = bench_run(engine, env, "w2", count, 2, args.limit, args.batch_size)
                one = bench_run(engine, env, "w1", count, 1, args.limit, args.batch_size)
    finally:
        database.dispose_engines()
        for name in (server_db, inventory_db):
            admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if not args.keep:
            shutil.rmtree(WORK, ignore_errors=True)
    log(f"{count} certificates per run; Prefect server and inventory on PostgreSQL; workers on this one machine")
    size = "10k" if count == 10_000 else str(count)  # the figure names the number of certificates it measured
    log(f"figure renew_due_seconds_{size}_2_workers: {two:.1f} s")
    log(f"figure renew_due_seconds_{size}_1_worker: {one:.1f} s")


if __name__ == "__main__":
    main()
