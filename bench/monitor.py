"""Benchmark: the monitor flow over 2,000 loopback TLS endpoints, and how many notifications 1,000 expiring
certificates seen by three sources each cause over ten monitor runs.

    python bench/monitor.py            # 2,000 endpoints; 1,000 certificates over 10 runs
    python bench/monitor.py --quick    # 200 endpoints; 100 certificates over 3 runs

What it does, all on this machine (nothing is written outside a temporary directory):

1. Starts a local Prefect server (lab.prefect_server: `prefect server start` on a loopback port with its own
   PREFECT_HOME and SQLite database); the client runs with flow heartbeats off and its own PREFECT_HOME.
2. Endpoints: a TLS farm (lab.tls_farm) of N listeners, each with its own certificate (leaf and intermediate;
   expiries spread over every band: 3 to 200 days), recorded in a fresh inventory as N endpoint locations of
   a tls-scan source. An alert policy routes every alert to a Prefect CustomWebhookNotificationBlock that
   posts to a loopback webhook receiver (lab.receivers). Then one monitor() run through Prefect, with the
   deployment's defaults (handshakes 200 at a time, 1,000 places per task run, the system's roots and the
   farm's root as trust anchors), timed from the call to its Completed state: every place probed,
   chains, names and revocation checked, EndpointCheck rows written, alerts raised and delivered. Checked:
   N places, N ok, one alert per certificate in an alert band. `figure monitor_seconds_2000: S s`
   (goal: at most 30 s).
3. Notifications: another inventory and farm: M certificates, each expiring in 3 days (CRITICAL), each seen
   by three sources (a tls-scan location on the farm, an SSH file location, an ACM location), then R monitor
   runs. Every message the receiver got names its certificate's fingerprint; the figure is the messages
   received per certificate, and each certificate is checked to have had exactly one.
   `figure notifications_per_certificate: N` (goal: exactly 1; they do not escalate in 10 runs).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import shutil
import sys
import tempfile
import textwrap
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

WORK = Path(tempfile.mkdtemp(prefix="certpilot-bench-monitor-"))
os.environ["PREFECT_HOME"] = str(WORK / "prefect-client")  # before prefect is imported: keep ~/.prefect untouched
os.environ["CERTPILOT_HOME"] = str(WORK / "certpilot")
for _name in ("CERTPILOT_DATABASE_URL", "CERTPILOT_MASTER_KEY", "CERTPILOT_MASTER_KEY_FILE", "PREFECT_API_URL"):
    os.environ.pop(_name, None)
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")  # no console line per task run

import sqlalchemy as sa  # noqa: E402
from sqlmodel import col  # noqa: E402
from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402

from certpilot import alert_policy, audit, database, inventory  # noqa: E402
from certpilot.clock import utcnow  # noqa: E402
from certpilot.database import read_session, write_session  # noqa: E402
from certpilot.models import Alert, EndpointCheck  # noqa: E402
from certpilot.x509info import describe_certificate  # noqa: E402
from lab.prefect_server import PrefectServer  # noqa: E402
from lab.receivers import WebhookReceiver  # noqa: E402
from lab.tls_farm import TlsFarm, plan  # noqa: E402

ACTOR = audit.Actor("bench")
BATCH = 500
FINGERPRINT = re.compile(r"fingerprint: ([0-9a-f]{64})")


def log(message: str) -> None:
    print(message, flush=True)


def use_inventory(name: str) -> sa.Engine:
    """A fresh inventory (SQLite under the work directory) for the flows of this process to use."""
    database.dispose_engines()
    os.environ["CERTPILOT_DATABASE_URL"] = f"sqlite:///{WORK / f'{name}.db'}"
    return database.get_engine()


def route_alerts_to(engine: sa.Engine, hook: WebhookReceiver, name: str) -> None:
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    CustomWebhookNotificationBlock(name=name, url=hook.url, json_data={"subject": "{{subject}}", "body": "{{body}}"}
                                   ).save(name, overwrite=True)
    with write_session(engine) as session:
        alert_policy.load_policy(session, textwrap.dedent(f"""\
            default:
              notify: [custom-webhook/{name}]
            """), "bench", utcnow())


def record_locations(engine: sa.Engine, rows: list[tuple[list[bytes], str, str]]) -> None:
    """(chain DER, locator, source) as discovery would have recorded them, in batches."""
    for start in range(0, len(rows), BATCH):
        observations = []
        for chain, locator, source in rows[start:start + BATCH]:
            records = [describe_certificate(x509.load_der_x509_certificate(der)) for der in chain]
            observations.append(inventory.Observation(records[0], locator, source))
            observations += [inventory.Observation(r, None, source) for r in records[1:]]
        with write_session(engine) as session:
            inventory.upsert(session, observations, ACTOR)


def run_monitor(trust: str) -> tuple[float, Any, str]:
    from flows.monitor import monitor

    started = time.perf_counter()
    state = monitor(trust_bundle_pem=trust, return_state=True)
    elapsed = time.perf_counter() - started
    if not state.is_completed():
        raise RuntimeError(f"the monitor run did not complete: {state.message}")
    return elapsed, state.result(), str(state.state_details.flow_run_id)


def task_times(run_id: str) -> str:
    """Where a run's time went: each task run's name and seconds, as the API recorded them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
    ordered = sorted(runs, key=lambda r: r.start_time or r.expected_start_time or utcnow())
    return ", ".join(f"{r.name} {r.total_run_time.total_seconds():.1f} s" for r in ordered)


def bench_endpoints(count: int) -> float:
    engine = use_inventory("endpoints")
    with TlsFarm.run(WORK / "farm-endpoints", plan(count)) as farm, WebhookReceiver() as hook:
        record_locations(engine, [(list(e.chain), e.locator, "tls-scan:bench") for e in farm.endpoints])
        route_alerts_to(engine, hook, "bench-endpoints")
        trust = farm.ca.root.public_bytes(serialization.Encoding.PEM).decode()
        log(f"endpoints: one monitor run over {count} TLS endpoints ...")
        elapsed, summary, run_id = run_monitor(trust)
        banded = sum(1 for e in farm.endpoints if e.not_after and e.not_after - utcnow() < dt.timedelta(days=30))
        with read_session(engine) as session:
            checks = session.execute(sa.select(sa.func.count()).select_from(EndpointCheck)
                                     .where(col(EndpointCheck.ok).is_(True))).scalar_one()
            alerts = session.execute(sa.select(sa.func.count()).select_from(Alert)
                                     .where(col(Alert.condition) == "expiring")).scalar_one()
        assert summary.places == count and summary.ok == count and checks == count, summary
        assert alerts == banded, (alerts, banded)
        log(f"endpoints: {count} places checked ok, {alerts} expiring alerts opened, {summary.alerts.delivered} "
            f"messages delivered, in {elapsed:.1f} s")
        log(f"endpoints: task runs: {task_times(run_id)}")
        return elapsed


def bench_notifications(count: int, runs: int) -> float:
    engine = use_inventory("notifications")
    with TlsFarm.run(WORK / "farm-notifications", plan(count, expiry_days=(3,))) as farm, WebhookReceiver() as hook:
        rows = []
        for i, e in enumerate(farm.endpoints):
            rows += [(list(e.chain), e.locator, "tls-scan:bench"),
                     (list(e.chain[:1]), f"ssh://bench-host/etc/ssl/site{i:05d}.pem", "ssh:bench-host"),
                     (list(e.chain[:1]), f"aws-acm://eu-west-1/arn:aws:acm:eu-west-1:123456789012:certificate/{i:05d}",
                      "aws-acm:bench")]
        record_locations(engine, rows)
        route_alerts_to(engine, hook, "bench-notifications")
        trust = farm.ca.root.public_bytes(serialization.Encoding.PEM).decode()
        log(f"notifications: {count} certificates expiring in 3 days, each at 3 places of 3 sources; {runs} monitor "
            "runs ...")
        for run in range(runs):
            elapsed, summary, run_id = run_monitor(trust)
            log(f"  run {run + 1}: {elapsed:.1f} s, {summary.alerts.opened} opened, {summary.alerts.delivered} "
                f"delivered, {len(hook.requests)} received so far; task runs: {task_times(run_id)}")
        time.sleep(1)  # anything still in flight
        received = Counter(m for r in hook.requests for m in FINGERPRINT.findall(r.json()["body"]))
        expected = {e.fingerprint for e in farm.endpoints}
        assert set(received) == expected, f"{len(expected - set(received))} certificate(s) never notified"
        counts = Counter(received.values())
        log(f"notifications: {len(hook.requests)} messages for {count} certificates; messages per certificate: "
            + ", ".join(f"{n} for {c}" for n, c in sorted(counts.items())))
        return len(hook.requests) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="200 endpoints; 100 certificates over 3 runs")
    parser.add_argument("--endpoints", type=int, help="endpoints for the timed run (default 2,000)")
    parser.add_argument("--certificates", type=int, help="expiring certificates (default 1,000)")
    parser.add_argument("--runs", type=int, help="monitor runs over them (default 10)")
    parser.add_argument("--keep", action="store_true", help=f"keep the work directory ({WORK})")
    args = parser.parse_args()
    endpoints = args.endpoints or (200 if args.quick else 2000)
    certificates = args.certificates or (100 if args.quick else 1000)
    runs = args.runs or (3 if args.quick else 10)
    started = time.perf_counter()
    try:
        with PrefectServer(WORK / "prefect-server") as server:
            log(f"prefect server ready at {server.api_url} after {time.perf_counter() - started:.1f} s "
                f"(work dir {WORK})")
            # In the environment before Prefect is imported, as on a worker: every thread (the alert channels'
            # own) talks to this server, not to an ephemeral one of its own.
            os.environ["PREFECT_API_URL"] = server.api_url
            from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

            with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
                seconds = bench_endpoints(endpoints)
                per_certificate = bench_notifications(certificates, runs)
    finally:
        database.dispose_engines()
        if not args.keep:
            shutil.rmtree(WORK, ignore_errors=True)
    log(f"{endpoints} endpoints; {certificates} certificates over {runs} runs")
    log(f"figure monitor_seconds_2000: {seconds:.1f} s")
    log(f"figure notifications_per_certificate: {per_certificate:g}")


if __name__ == "__main__":
    main()
