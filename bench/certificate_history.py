"""Benchmark: what a certificate's history artifact costs, next to the task run renew-due already pays
per certificate, on the SQLite-backed Prefect server of the test session's harness.

    python bench/certificate_history.py            # 400 of each
    python bench/certificate_history.py --quick    # 100 of each

What it does, all on this machine:

1. Starts Prefect's test harness (a real Prefect server on a temporary SQLite database, as
   tests/flows/conftest.py does), with flow heartbeats off and its own PREFECT_HOME.
2. Task runs: one flow submits N trivial task runs on 8 threads (renew-due's pool) and the clock runs
   until the API counts all N completed (the server records task runs from events, behind the client).
3. Artifacts: one flow creates N markdown artifacts keyed ``certificate-<name>``, each the history of a
   renewal as tasks/history.py writes it (six audit events), one after another as the publishing task
   does; the clock runs until the API counts all N.

The output ends with `figure certificate_artifact_ms: X ms` and `figure task_run_ms: Y ms`, each per
item, until the API shows it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

WORK = Path(tempfile.mkdtemp(prefix="certpilot-bench-history-"))
os.environ["PREFECT_HOME"] = str(WORK / "prefect")  # before prefect is imported: keep ~/.prefect untouched
os.environ.pop("PREFECT_API_URL", None)
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import httpx  # noqa: E402
from prefect import flow, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.settings import (PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY,  # noqa: E402
                              PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings)
from prefect.task_runners import ThreadPoolTaskRunner  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from certpilot.history import HistoryEvent, artifact_key, history_markdown  # noqa: E402

WORKERS = 8  # renew-due's pool
FP = "ab" * 32


def _events(name: str) -> list[HistoryEvent]:
    now = dt.datetime.now(dt.timezone.utc)
    return [HistoryEvent(i, now, "prefect:renew-due", action, obj, details) for i, (action, obj, details) in enumerate([
        ("key.stored", "key:0123456789abcdef", {"algorithm": "ec-p256", "spki_sha256": FP, "origin": "generated"}),
        ("certificate.added", f"certificate:{FP}", {"subject": f"CN={name}", "issuer": "CN=Bench CA"}),
        ("certificate.issued", f"certificate:{FP}", {"managed": name, "issuer": "private-ca/bench", "serial": "01"}),
        ("certificate.superseded", f"certificate:{'cd' * 32}", {"managed": name, "by": FP}),
        ("target.desired", f"target:{name}/nginx-1", {"fingerprint": FP}),
        ("target.verified", f"target:{name}/nginx-1", {"fingerprint": FP, "method": "tls"})], start=1)]


@task
def record(i: int) -> int:
    return i


def count(path: str, body: dict[str, object]) -> int:
    return int(httpx.post(f"{PREFECT_API_URL.value()}/{path}", json=body, timeout=30).json())


def until_counted(path: str, body: dict[str, object], n: int, start: float) -> float:
    while count(path, body) < n:
        time.sleep(0.1)
    return time.perf_counter() - start


def bench_task_runs(n: int) -> float:
    @flow(name="bench-task-runs", task_runner=ThreadPoolTaskRunner(max_workers=WORKERS))
    def task_runs() -> None:
        for future in [record.submit(i) for i in range(n)]:
            future.result()

    start = time.perf_counter()
    state = task_runs(return_state=True)
    client = time.perf_counter() - start
    body = {"flow_runs": {"id": {"any_": [str(state.state_details.flow_run_id)]}},
            "task_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}}
    seen = until_counted("task_runs/count", body, n, start)
    print(f"task runs: {n} on {WORKERS} threads, client done after {client:.1f} s, all completed in the API "
          f"after {seen:.1f} s", flush=True)
    return seen


def bench_artifacts(n: int) -> float:
    pages = {f"bench-{i:04d}": history_markdown(f"bench-{i:04d}", _events(f"bench-{i:04d}"), "renew-due run 'bench'")
             for i in range(n)}

    @flow(name="bench-artifacts")
    def artifacts() -> None:
        for name, markdown in pages.items():
            create_markdown_artifact(key=artifact_key(name), markdown=markdown, description=f"{name}: 6 audit event(s)")

    start = time.perf_counter()
    state = artifacts(return_state=True)
    client = time.perf_counter() - start
    body = {"artifacts": {"flow_run_id": {"any_": [str(state.state_details.flow_run_id)]}}}
    seen = until_counted("artifacts/count", body, n, start)
    print(f"artifacts: {n} of {len(next(iter(pages.values())))} characters, client done after {client:.1f} s, "
          f"all in the API after {seen:.1f} s", flush=True)
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="100 of each instead of 400")
    parser.add_argument("--count", type=int, help="how many of each (overrides --quick)")
    args = parser.parse_args()
    n = args.count or (100 if args.quick else 400)
    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None, PREFECT_SERVER_ANALYTICS_ENABLED: False}):
        with prefect_test_harness(server_startup_timeout=60):
            bench_task_runs(10)  # warm up the server and the client
            task_runs = bench_task_runs(n)
            artifacts = bench_artifacts(n)
    print(f"figure certificate_artifact_ms: {artifacts / n * 1000:.0f} ms")
    print(f"figure task_run_ms: {task_runs / n * 1000:.0f} ms")


if __name__ == "__main__":
    main()
