"""Benchmark: one emergency revoke-and-replace run over a fleet, started from the served deployment.

    python bench/revoke_and_replace.py            # 500 certificates on 20 targets (15 nginx, 5 haproxy)
    python bench/revoke_and_replace.py --quick    # 50 certificates on 5 targets (4 nginx, 1 haproxy)
    python bench/revoke_and_replace.py --certificates N --nginx A --haproxy B [--concurrency C]

What it does, all on loopback in a temporary directory (its own PREFECT_HOME and CERTPILOT_HOME):

1. Not timed: a Prefect server with its services (lab.prefect_server), started while the fleet is built;
   the fleet (lab.fleet): one sshd, A nginx and B haproxy instances run by the lab user, N managed
   certificates from the private CA "bench" (SQLite inventory), each served by one site of one instance
   and recorded as verified there; each instance has its own SSH host block, as a host of its own would
   (so the run logs in once per instance). The CA's certificates point their CRL distribution point and OCSP
   responder at the HTTP listener of `certpilot serve`, which is then started as an operator runs it
   (`certpilot serve --listen 127.0.0.1:P`, PREFECT_RUNNER_POLL_FREQUENCY=1): it serves every
   deployment and the CA's CRL and OCSP. The SSH host blocks and the issuer block are saved; the
   scheduled deployments (renew-due, discover, monitor) are paused, so that none of their runs shares
   the machine with the one measured.
2. Timed: ONE revoke-and-replace run of every certificate the CA issued (scope issuer=bench, dry_run
   false, the reason key-compromise), created through the Prefect API on the served deployment as the
   UI's run form does, until the run is final. The figure is from its creation to its final state;
   the run's own start-to-end time is printed too.
   Meanwhile a relying party (this process) watches each revocation as it appears in the inventory:
   connectors.revocation.watch_revocation reads the CRL at the certificate's distribution point and
   asks its OCSP responder until both say revoked (a cross-check of what the run records).
3. Checked after the run, on the wire: every endpoint serves its managed certificate's new current
   certificate (a handshake each), none serves an old one; every old certificate is revoked in the
   inventory and, asked afresh, by the CRL at its distribution point and by the OCSP responder in its
   AIA (watch_revocation once more); every target's verified fingerprint is its desired one.
4. Where the time went: the run's task runs by name from the Prefect API (count, total, median, first
   start, last end); one certificate's replacement step by step (from its task run and the audit events
   of its steps: issue, deploy, verify, revoke); the inventory's audit events by action over time; the CPU seconds
   used by `certpilot serve` with its flow-run process, the Prefect server, sshd with nginx and
   haproxy, and this process, against the machine's load.

With ``--profile`` the flow is called in this process instead (same server, same fleet, same scope) with a
sampling profiler of all its threads: where its threads spend their time, by certpilot function and the
library frame each waits or computes in (cProfile sees only the thread that starts it).

The output ends with `figure revoke_and_replace_seconds: S s` (goal at most 120),
`figure revoked_certificates: N` (old certificates revoked by CRL and OCSP both),
`figure still_served_after: N endpoints` (endpoints serving an old certificate after the run; goal 0)
and `figure revocation_visible_seconds_max: S s` (the longest time from a revocation until the CRL and
OCSP both showed it, from the run's `certificate.revocation_visible` events: the run watches each
revocation as a relying party; `--watch` adds this process's own watch; goal at most 5). The exit status is 1 when any check failed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime as dt
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from types import FrameType
from typing import Any
from uuid import UUID

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

WORK = Path(tempfile.mkdtemp(prefix="certpilot-bench-rr-"))
os.environ["PREFECT_HOME"] = str(WORK / "prefect-client")  # before prefect is imported: keep ~/.prefect untouched
os.environ["CERTPILOT_HOME"] = str(WORK / "certpilot")
for _name in ("CERTPILOT_DATABASE_URL", "CERTPILOT_MASTER_KEY", "CERTPILOT_MASTER_KEY_FILE", "PREFECT_API_URL"):
    os.environ.pop(_name, None)
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import httpx  # noqa: E402
import sqlalchemy as sa  # noqa: E402
from cryptography import x509  # noqa: E402
from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings  # noqa: E402

from certpilot import keystore, managed, targets  # noqa: E402
from certpilot.database import get_engine, read_session  # noqa: E402
from certpilot.models import AuditEvent, Certificate  # noqa: E402
from sqlmodel import col  # noqa: E402
from certpilot.settings import load_settings  # noqa: E402
from connectors.revocation import SharedTransport  # noqa: E402
from lab.fleet import Fleet  # noqa: E402
from lab.ports import free_port  # noqa: E402
from lab.prefect_server import PrefectServer  # noqa: E402

CA_NAME = "bench"
DEPLOYMENT = "revoke-and-replace/revoke-and-replace"
RUN_TIMEOUT = 900.0


def log(message: str) -> None:
    print(message, flush=True)


def ring() -> keystore.KeyRing:
    return keystore.load_key_ring(load_settings())


# ------------------------------------------------------------------------------------------ CPU accounting

def _proc_stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, CPU ticks of the process and of its waited-for children), or None when gone."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            fields = file.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[1]), sum(int(v) for v in fields[11:15])  # ppid; utime, stime, cutime, cstime


def own_cpu_seconds() -> float:
    """CPU seconds of this process alone (its children, the lab's servers among them, are counted apart)."""
    times = os.times()
    return times.user + times.system


def tree_cpu_seconds(roots: list[int]) -> float:
    """CPU seconds used so far by ``roots`` and their live descendants (exited, waited-for children count
    in their parent's cutime/cstime)."""
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            found = _proc_stat(int(entry))
            if found is not None:
                stats[int(entry)] = found
    children: dict[int, list[int]] = defaultdict(list)
    for pid, (ppid, _) in stats.items():
        children[ppid].append(pid)
    total, seen, pending = 0, set(), list(roots)
    while pending:
        pid = pending.pop()
        if pid in seen or pid not in stats:
            continue
        seen.add(pid)
        total += stats[pid][1]
        pending.extend(children[pid])
    return total / os.sysconf("SC_CLK_TCK")


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# ------------------------------------------------------------------------------------------ the service

class Served:
    """`certpilot serve` as an operator runs it, its listener on ``port`` (where the CA's URLs point)."""

    def __init__(self, api_url: str, port: int) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "CERTPILOT_"))}
        env.update({"PREFECT_API_URL": api_url, "PREFECT_HOME": str(WORK / "prefect-serve"),
                    "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_RUNNER_POLL_FREQUENCY": "1",
                    "CERTPILOT_HOME": os.environ["CERTPILOT_HOME"]})
        self.port = port
        self.log = WORK / "serve.log"
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen([sys.executable, "-m", "cli", "serve", "--listen", f"127.0.0.1:{port}"],
                                            cwd=WORK, env=env, stdout=out, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_serving(self, timeout: float = 120.0) -> float:
        started = time.monotonic()
        while True:
            if self.process.poll() is not None:
                raise SystemExit(f"certpilot serve exited with {self.process.returncode}:\n{self.output()[-3000:]}")
            if "serving" in self.output() and "deployments from the Prefect API" in self.output():
                try:
                    if httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=2).status_code == 200:
                        return time.monotonic() - started
                except httpx.HTTPError:
                    pass
            if time.monotonic() - started > timeout:
                raise SystemExit(f"certpilot serve not serving after {timeout:.0f} s:\n{self.output()[-3000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


# ------------------------------------------------------------------------------------------ a relying party

TRANSPORT = SharedTransport()


class Watcher:
    """During the run: every old certificate that turns revoked in the inventory is watched as a relying
    party would (watch_revocation: the CRL at its distribution point, the OCSP responder in its AIA)."""

    def __init__(self, engine: sa.Engine, old: dict[str, x509.Certificate], issuing: x509.Certificate,
                 workers: int = 4) -> None:
        self.engine, self.old, self.issuing = engine, old, issuing
        self.results: dict[str, Any] = {}  # fingerprint -> Propagation
        self._submitted: set[str] = set()
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="watch")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="watcher", daemon=True)

    def start(self) -> Watcher:
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._poll()
            self._stop.wait(0.2)
        self._poll()

    def _poll(self) -> None:
        with read_session(self.engine) as session:
            rows = session.execute(sa.select(col(Certificate.fingerprint_sha256), col(Certificate.revoked_at)).where(
                col(Certificate.status) == "revoked", col(Certificate.fingerprint_sha256).in_(list(self.old)))).all()
        for fingerprint, revoked_at in rows:
            if fingerprint not in self._submitted and revoked_at is not None:
                self._submitted.add(fingerprint)
                self._pool.submit(self._watch, fingerprint, revoked_at.replace(tzinfo=dt.timezone.utc)
                                  if revoked_at.tzinfo is None else revoked_at)

    def _watch(self, fingerprint: str, revoked_at: dt.datetime) -> None:
        from connectors.revocation import watch_revocation

        self.results[fingerprint] = watch_revocation(self.old[fingerprint], self.issuing, revoked_at, timeout=30,
                                                     transport=TRANSPORT)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self._pool.shutdown(wait=True)


# ------------------------------------------------------------------------------------------ profiling

class Sampler:
    """A sampling profiler of every thread of this process (cProfile sees one thread; the flow's work runs in
    its task runner's threads): every ``interval`` seconds, each thread running certpilot's code is
    charged to its innermost frame in the checkout (certpilot, connectors, blocks, tasks, flows) and to the
    frame it is in (the library function it waits in or computes in)."""

    PROJECT = tuple(str(ROOT / part) + os.sep for part in ("certpilot", "connectors", "blocks", "tasks", "flows"))

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.pairs: dict[tuple[str, str], int] = defaultdict(int)  # (project frame, leaf frame) -> samples
        self.project: dict[str, int] = defaultdict(int)  # project function (innermost) -> samples
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sampler", daemon=True)

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    @staticmethod
    def _name(frame: Any) -> str:
        path = frame.f_code.co_filename
        short = path.split(str(ROOT) + os.sep, 1)[-1].split("site-packages" + os.sep, 1)[-1]
        return f"{short}:{frame.f_code.co_name}"

    def _loop(self) -> None:
        me = threading.get_ident()
        while not self._stop.wait(self.interval):
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                leaf, inner = self._name(frame), None
                walk: FrameType | None = frame
                while walk is not None:
                    if walk.f_code.co_filename.startswith(self.PROJECT):
                        inner = self._name(walk)
                        break
                    walk = walk.f_back
                if inner is None:
                    continue
                self.samples += 1
                self.pairs[(inner, leaf)] += 1
                self.project[inner] += 1

    def lines(self, top: int = 25) -> list[str]:
        total = max(1, self.samples)
        out = [f"  {self.samples} thread samples every {self.interval * 1000:.0f} ms of threads in certpilot's code; "
               "share of them by innermost certpilot function:"]
        for name, count in sorted(self.project.items(), key=lambda kv: -kv[1])[:top]:
            out.append(f"    {count / total:6.1%}  {name}")
        out.append("  by innermost certpilot function and the frame it was in:")
        for (inner, leaf), count in sorted(self.pairs.items(), key=lambda kv: -kv[1])[:top]:
            out.append(f"    {count / total:6.1%}  {inner}  <-  {leaf}")
        return out


class WriteLockMeter:
    """How long the inventory's write lock is held (SQLite: from BEGIN IMMEDIATE acquired to the commit), by
    whom: each write transaction of this process is charged to the innermost certpilot function outside
    certpilot/database.py that opened it. Writers queue on that lock, so its busy share bounds the run."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self.held: dict[str, list[float]] = defaultdict(list)  # opener -> seconds held, each transaction
        self.intervals: list[tuple[float, float]] = []
        self._lock = threading.Lock()

    def start(self) -> WriteLockMeter:
        sa.event.listen(self.engine, "begin", self._begin)
        sa.event.listen(self.engine, "commit", self._end)
        sa.event.listen(self.engine, "rollback", self._end)
        return self

    def stop(self) -> None:
        sa.event.remove(self.engine, "begin", self._begin)
        sa.event.remove(self.engine, "commit", self._end)
        sa.event.remove(self.engine, "rollback", self._end)

    def _begin(self, conn: Any) -> None:  # after certpilot.database's own "begin" hook took the lock
        if not conn.get_execution_options().get("certpilot_write", False):
            return
        opener, frame = "?", sys._getframe(1)
        while frame is not None:
            path = frame.f_code.co_filename
            if path.startswith(Sampler.PROJECT) and not path.endswith(os.path.join("certpilot", "database.py")):
                opener = Sampler._name(frame)
                break
            frame = frame.f_back  # type: ignore[assignment]
        conn.info["bench_write"] = (time.monotonic(), opener)

    def _end(self, conn: Any) -> None:
        started = conn.info.pop("bench_write", None)
        if started is None:
            return
        now = time.monotonic()
        with self._lock:
            self.held[started[1]].append(now - started[0])
            self.intervals.append((started[0], now))

    def lines(self, wall: float, top: int = 15) -> list[str]:
        busy, end = 0.0, float("-inf")
        for begin, finish in sorted(self.intervals):  # the union of the intervals
            if finish > end:
                busy += finish - max(begin, end)
                end = finish
        count = sum(len(v) for v in self.held.values())
        total = sum(sum(v) for v in self.held.values())
        out = [f"  the inventory's write lock (SQLite BEGIN IMMEDIATE): {count} write transactions held it "
               f"{total:.1f} s in all, busy {busy:.1f} s of the {wall:.1f} s run ({busy / max(wall, 1e-9):.0%}); "
               "by opener (transactions, total, median, max):"]
        for opener, values in sorted(self.held.items(), key=lambda kv: -sum(kv[1]))[:top]:
            out.append(f"    {len(values):>6}  {sum(values):7.2f} s  {statistics.median(values) * 1000:7.1f} ms  "
                       f"{max(values) * 1000:7.1f} ms  {opener}")
        return out


def run_in_process(parameters: dict[str, Any], sampler: Sampler) -> tuple[str, float, Any]:
    """The flow called in this process (against the same Prefect server), sampled: (run id, start, state)."""
    from flows.revoke_and_replace import revoke_and_replace

    sampler.start()
    started = time.monotonic()
    try:
        state = revoke_and_replace(**parameters, return_state=True)
    finally:
        sampler.stop()
    return str(state.state_details.flow_run_id), started, state


# ------------------------------------------------------------------------------------------ the run

def pause_schedules() -> list[str]:
    """Pause every scheduled deployment (renew-due, discover, monitor), so that no scheduled run shares the
    machine with the one measured (a monitor run in the middle of it opened an alert per endpoint)."""
    from prefect.client.orchestration import get_client

    paused = []
    with get_client(sync_client=True) as client:
        for deployment in client.read_deployments(limit=200):
            if deployment.schedules and not deployment.paused:
                client.pause_deployment(deployment.id)
                paused.append(deployment.name)
    return sorted(paused)


def start_run(parameters: dict[str, Any]) -> tuple[str, float]:
    """Create a run of the served deployment through the API, as the UI's run form does: (id, when)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(DEPLOYMENT)
        started = time.monotonic()
        run = client.create_flow_run_from_deployment(deployment.id, parameters=parameters)
    return str(run.id), started


def wait_final(run_id: str, served: Served, timeout: float = RUN_TIMEOUT) -> Any:
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(UUID(run_id))
            if run.state is not None and run.state.is_final():
                return run
            if time.monotonic() > deadline:
                raise SystemExit(f"the revoke-and-replace run {run_id} is still "
                                 f"{run.state.name if run.state else None} after {timeout:.0f} s:\n"
                                 f"{served.output()[-3000:]}")
            time.sleep(0.2)


def task_runs(run_id: str) -> list[Any]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.orchestration import get_client

    found: list[Any] = []
    with get_client(sync_client=True) as client:
        while True:
            page = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])),
                                         limit=200, offset=len(found))
            found += page
            if len(page) < 200:
                return found


def task_breakdown(runs: list[Any], run_start: dt.datetime | None) -> list[str]:
    """Task runs grouped by name, the certificate's name taken out: count, total and median seconds, first
    start and last end relative to the flow run's start, and their final states."""
    groups: dict[str, list[Any]] = defaultdict(list)
    for run in runs:
        name = re.sub(r"rr-\d{4}(\.[A-Za-z0-9.-]+)?", "<certificate>", run.name)
        groups[re.sub(r"-[0-9a-z]{3}$", "", name) if "<certificate>" not in name else name].append(run)
    never = dt.datetime.max.replace(tzinfo=dt.timezone.utc)
    lines = []
    for name, members in sorted(groups.items(), key=lambda item: min(r.start_time or never for r in item[1])):
        durations = [r.total_run_time.total_seconds() for r in members if r.total_run_time is not None]
        starts = [r.start_time for r in members if r.start_time is not None]
        ends = [r.end_time for r in members if r.end_time is not None]
        states: dict[str, int] = defaultdict(int)
        for r in members:
            states[r.state_type.value if r.state_type else "?"] += 1

        def rel(at: dt.datetime) -> str:
            return f"{(at - run_start).total_seconds():.1f}" if run_start else "?"

        lines.append(f"  {name:<36} {len(members):>5} runs  total {sum(durations):8.1f} s  median "
                     f"{statistics.median(durations) if durations else 0:6.2f} s  from "
                     f"{rel(min(starts)) if starts else '?'} to {rel(max(ends)) if ends else '?'} s  {dict(states)}")
    return lines


PHASES = (("start", "issued", "new key, CSR, issue, store"),
          ("issued", "desired", "plan the deployment"),
          ("desired", "deployed", "upload, test, reload (all targets)"),
          ("deployed", "verified", "verify on the wire"),
          ("verified", "revoked", "revoke the old certificate (new CRL)"),
          ("revoked", "replaced", "record the item done"),
          ("replaced", "end", "end of the task run"))


def phase_breakdown(engine: sa.Engine, runs: list[Any], since: dt.datetime) -> list[str]:
    """Per certificate, the time between the steps of its replacement, from its task run's start and end
    (Prefect) and the audit events of its steps (the inventory): median, 95th percentile and the sum
    over all certificates, per phase."""
    marks: dict[str, dict[str, dt.datetime]] = defaultdict(dict)
    for run in runs:
        found = re.fullmatch(r"replace-(rr-\d{4})", run.name)
        if found and run.start_time and run.end_time:
            marks[found.group(1)].update(start=run.start_time, end=run.end_time)
    with read_session(engine) as session:
        steps = ["certificate.issued", "target.desired", "target.deployed", "target.verified", "certificate.revoked",
                 "certificate.replaced"]
        events = session.execute(sa.select(col(AuditEvent.action), col(AuditEvent.object), col(AuditEvent.at),
                                           col(AuditEvent.details))
                                 .where(col(AuditEvent.at) >= since, col(AuditEvent.action).in_(steps))).all()
    owner_of_old: dict[str, str] = {}
    for action, obj, at, details in events:
        if action == "certificate.replaced":
            owner_of_old[obj] = json.loads(details)["managed"]
    for action, obj, at, details in events:
        at = at if at.tzinfo else at.replace(tzinfo=dt.timezone.utc)
        if action == "certificate.issued":
            name, mark = json.loads(details).get("managed"), "issued"
        elif action.startswith("target."):
            name, mark = obj.split(":", 1)[1].split("/")[0], action.split(".")[1]
        else:
            name, mark = owner_of_old.get(obj), action.split(".")[1]
        if name is None:
            continue
        keep = min if mark == "desired" else max  # the first target planned, the last one done
        marks[name][mark] = keep(marks[name][mark], at) if mark in marks[name] else at
    lines = []
    for first, then, what in PHASES:
        gaps = sorted((m[then] - m[first]).total_seconds() for m in marks.values() if first in m and then in m)
        if gaps:
            p95 = gaps[max(0, int(len(gaps) * 0.95) - 1)]
            lines.append(f"  {what:<40} median {statistics.median(gaps):6.3f} s  p95 {p95:6.3f} s  "
                         f"sum {sum(gaps):7.1f} s  ({len(gaps)} certificates)")
    return lines


def audit_timeline(engine: sa.Engine, since: dt.datetime) -> list[str]:
    """The inventory's audit events since ``since``, by action: count, first and last (seconds after)."""
    with read_session(engine) as session:
        rows = session.execute(sa.select(col(AuditEvent.action), sa.func.count(), sa.func.min(col(AuditEvent.at)),
                                         sa.func.max(col(AuditEvent.at)))
                               .where(col(AuditEvent.at) >= since).group_by(col(AuditEvent.action))
                               .order_by(sa.func.min(col(AuditEvent.at)))).all()

    def rel(at: dt.datetime) -> float:
        return ((at if at.tzinfo else at.replace(tzinfo=dt.timezone.utc)) - since).total_seconds()

    return [f"  {action:<40} {count:>5}  from {rel(first):6.1f} to {rel(last):6.1f} s"
            for action, count, first, last in rows]


# ------------------------------------------------------------------------------------------ checks

def old_certificates(engine: sa.Engine, fingerprints: dict[str, str]) -> dict[str, x509.Certificate]:
    with read_session(engine) as session:
        rows = session.execute(sa.select(col(Certificate.fingerprint_sha256), col(Certificate.der)).where(
            col(Certificate.fingerprint_sha256).in_(list(fingerprints.values())))).all()
    return {fp: x509.load_der_x509_certificate(der) for fp, der in rows}


def revoked_on_the_wire(engine: sa.Engine, old: dict[str, x509.Certificate],
                        issuing: x509.Certificate) -> tuple[int, list[str]]:
    """How many old certificates are revoked in the inventory and, asked now, by both the CRL at their
    distribution point and the OCSP responder in their AIA; the problems."""
    from connectors.revocation import watch_revocation

    with read_session(engine) as session:
        found = session.execute(sa.select(col(Certificate.fingerprint_sha256), col(Certificate.revoked_at)).where(
            col(Certificate.fingerprint_sha256).in_(list(old)), col(Certificate.status) == "revoked")).all()
    rows: dict[str, dt.datetime] = {fp: at for fp, at in found if at is not None}
    problems = [f"{fp[:16]}: not revoked in the inventory" for fp in old if fp not in rows]

    def check(fp: str) -> str | None:
        at = rows[fp] if rows[fp].tzinfo else rows[fp].replace(tzinfo=dt.timezone.utc)
        seen = watch_revocation(old[fp], issuing, at, timeout=10, interval=0.2, transport=TRANSPORT)
        if seen.crl_seconds is None or seen.ocsp_seconds is None:
            return f"{fp[:16]}: {seen.detail}"
        return None

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        checked = list(pool.map(check, list(rows)))
    problems += [p for p in checked if p]
    return sum(1 for p in checked if p is None), problems


def targets_recorded(engine: sa.Engine, fleet: Fleet, current: dict[str, str]) -> list[str]:
    problems = []
    with read_session(engine) as session:
        for site in fleet.sites:
            target = targets.get_target(session, site.managed, site.instance)
            if not (target.desired_fingerprint == target.verified_fingerprint == current.get(site.managed)):
                problems.append(f"{site.managed}/{site.instance}: desired {str(target.desired_fingerprint)[:12]}, "
                                f"verified {str(target.verified_fingerprint)[:12]}, current "
                                f"{str(current.get(site.managed))[:12]}")
    return problems


def revoked_in_inventory(engine: sa.Engine, fingerprints: list[str]) -> list[str]:
    with read_session(engine) as session:
        return list(session.execute(sa.select(col(Certificate.fingerprint_sha256)).where(
            col(Certificate.fingerprint_sha256).in_(fingerprints), col(Certificate.status) == "revoked")).scalars())


def run_propagation(engine: sa.Engine, fingerprints: list[str]) -> dict[str, Any]:
    """The run's own measurements: the latest certificate.revocation_visible event of each certificate."""
    from certpilot.propagation import measurements

    with read_session(engine) as session:
        return measurements(session, fingerprints)


# ------------------------------------------------------------------------------------------ main

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="50 certificates on 5 targets")
    parser.add_argument("--certificates", type=int, help="managed certificates (default 500, --quick 50)")
    parser.add_argument("--nginx", type=int, help="nginx instances (default 15, --quick 4)")
    parser.add_argument("--haproxy", type=int, help="haproxy instances (default 5, --quick 1)")
    parser.add_argument("--concurrency", type=int, help="the run's concurrency parameter (default: the flow's)")
    parser.add_argument("--watch", action="store_true", help=(
        "also watch every revocation from this process, as a second relying party (the run watches and records "
        "each one itself: its certificate.revocation_visible events give the figure)"))
    parser.add_argument("--profile", action="store_true", help=(
        "call the flow in this process (same Prefect server, same fleet) with a sampling profiler of all its "
        "threads, instead of starting it on the served deployment"))
    parser.add_argument("--keep", action="store_true", help=f"keep the work directory ({WORK})")
    args = parser.parse_args()
    count = args.certificates or (50 if args.quick else 500)
    nginx = args.nginx if args.nginx is not None else (4 if args.quick else 15)
    haproxy = args.haproxy if args.haproxy is not None else (1 if args.quick else 5)
    log(f"machine: {os.cpu_count()} cores, load average {load_average()} (work dir {WORK})")

    ok = True
    server = PrefectServer(WORK / "prefect-server")
    serve: Served | None = None
    fleet: Fleet | None = None
    try:
        starting = threading.Thread(target=server.start, name="prefect-server")
        starting.start()
        engine = get_engine()
        listen_port = free_port()
        started = time.perf_counter()
        fleet = Fleet(WORK / "fleet", engine, ring, certificates=count, nginx=nginx, haproxy=haproxy, ca_name=CA_NAME,
                      ca_url=f"http://127.0.0.1:{listen_port}", block="bench", block_per_instance=True, prefix="rr",
                      domain="bench.test")
        fleet.start()
        log(f"fleet: {count} managed certificates on {nginx} nginx and {haproxy} haproxy over SSH, built in "
            f"{time.perf_counter() - started:.1f} s (" + ", ".join(f"{k} {v:.1f} s" for k, v in fleet.timings.items())
            + ")")
        starting.join()
        if server.process is None or server.process.poll() is not None:
            raise SystemExit(f"the Prefect server did not start: see {server.log}")
        with temporary_settings({PREFECT_API_URL: server.api_url, PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            from blocks.issuers import PrivateCABlock

            fleet.save_block()
            PrivateCABlock.register_type_and_schema()
            PrivateCABlock(ca_name=CA_NAME).save(CA_NAME, overwrite=True)
            serve = Served(server.api_url, listen_port)
            log(f"certpilot serve serving after {serve.wait_serving():.1f} s; Prefect server at {server.url}; "
                f"schedules paused for the measurement: {', '.join(pause_schedules()) or 'none'}")
            crl = httpx.get(f"{fleet.ca_url}/{CA_NAME}/issuing.crl", timeout=10)
            if crl.status_code != 200:
                raise SystemExit(f"the CA's CRL at {fleet.ca_url} answers {crl.status_code}")

            before = fleet.current()
            old = old_certificates(engine, before)
            assert fleet.issuing is not None
            if fleet.not_serving_current():
                raise SystemExit("the fleet does not serve its certificates before the run")
            watcher = Watcher(engine, old, fleet.issuing).start() if args.watch else None
            parameters: dict[str, Any] = {"issuer": CA_NAME, "dry_run": False, "reason": "key-compromise"}
            if args.concurrency:
                parameters["concurrency"] = args.concurrency
            roots = {"certpilot serve with its flow run": [serve.process.pid], "prefect server": [server.process.pid],
                     "sshd, nginx, haproxy": fleet_pids(fleet)}
            cpu_before = {name: tree_cpu_seconds(pids) for name, pids in roots.items()}
            mine = "this process (the watch)" if not args.profile else "this process (the flow and the watch)"
            cpu_before[mine] = own_cpu_seconds()
            load_before = load_average()
            since = dt.datetime.now(dt.timezone.utc)
            sampler = Sampler() if args.profile else None
            meter = WriteLockMeter(engine) if args.profile else None
            if sampler is not None and meter is not None:
                log(f"revoke-and-replace called in this process with {json.dumps(parameters)}, profiled ...")
                meter.start()
                try:
                    run_id, created, _ = run_in_process(parameters, sampler)
                finally:
                    meter.stop()
            else:
                run_id, created = start_run(parameters)
                log(f"revoke-and-replace run {run_id} created with {json.dumps(parameters)}; waiting ...")
            run = wait_final(run_id, serve)
            elapsed = time.monotonic() - created
            cpu_used = {name: tree_cpu_seconds(pids) - cpu_before[name] for name, pids in roots.items()}
            cpu_used[mine] = own_cpu_seconds() - cpu_before[mine]
            load_after = load_average()
            if watcher is not None:
                watcher.stop()
            own = (run.end_time - run.start_time).total_seconds() if run.start_time and run.end_time else None
            log(f"run {run.state.name} after {elapsed:.1f} s from its creation"
                + (f" ({own:.1f} s from its start to its end)" if own is not None else "")
                + f": {run.state.message or ''}"[:600])
            if not run.state.is_completed():
                ok = False
                log("--- the last lines of certpilot serve's log:\n" + "\n".join(serve.output().splitlines()[-40:]))

            # On the wire, and in the inventory
            after = fleet.current()
            served = fleet.served()
            old_fps = set(old)
            still = sorted(f"{site.managed} on {site.instance}" for site, fp in served.items() if fp in old_fps)
            wrong = sorted(f"{site.managed} on {site.instance}" for site, fp in served.items()
                           if fp != after.get(site.managed) and fp not in old_fps)
            unchanged = sorted(name for name in before if after.get(name) == before[name])
            for label, names in (("endpoints still serving an old certificate", still),
                                 ("endpoints not serving their current certificate", wrong),
                                 ("managed certificates not replaced", unchanged)):
                if names:
                    ok = False
                    log(f"CHECK FAILED: {len(names)} {label}: {', '.join(names[:10])}")
            recorded = targets_recorded(engine, fleet, after)
            if recorded:
                ok = False
                log(f"CHECK FAILED: {len(recorded)} target record(s) not verified: " + "; ".join(recorded[:5]))
            revoked, problems = revoked_on_the_wire(engine, old, fleet.issuing)
            if problems:
                ok = False
                log(f"CHECK FAILED: {len(problems)} old certificate(s) not revoked on the wire: "
                    + "; ".join(problems[:5]))
            if ok:
                log(f"checked: all {len(served)} endpoints serve their new certificate (a handshake each), all {count} "
                    "old certificates are revoked in the inventory, by the CRL at their distribution point and by the "
                    "OCSP responder in their AIA, and every target's verified fingerprint is its desired one")

            # Propagation: the run's own measurements, and this process's watch
            measured = run_propagation(engine, list(old))
            seen = [m.seconds for m in measured.values() if m.seconds is not None]
            if measured:
                log(f"propagation recorded by the run: {len(measured)} certificate(s), {len(seen)} seen by CRL and "
                    "OCSP; "
                    + (f"median {statistics.median(seen):.2f} s, max {max(seen):.2f} s" if seen else "none visible"))
            watched = [p.seconds for p in (watcher.results.values() if watcher else []) if p.seconds is not None]
            if watcher is not None:
                log(f"propagation seen by this process's watch: {len(watcher.results)} watched, {len(watched)} seen; "
                    + (f"median {statistics.median(watched):.2f} s, max {max(watched):.2f} s (from the revocation "
                       "time, including up to 0.2 s before the watch noticed it)" if watched else "none visible"))
            revoked_now = revoked_in_inventory(engine, list(old))
            if seen and len(seen) >= len(revoked_now):
                visible_max, visible_from = max(seen), "the run's certificate.revocation_visible events"
            elif watcher is not None and watched and len(watched) >= len(revoked_now):
                visible_max = max(watched)
                visible_from = f"this process's watch (the run recorded {len(seen)} of {len(revoked_now)} revocations)"
            else:
                visible_max, visible_from = float("nan"), (f"nowhere: of {len(revoked_now)} revocations the run saw "
                                                           f"{len(seen)}, this process {len(watched)}")
                ok = False  # every revocation should have been measured

            # Where the time went
            runs = task_runs(run_id)
            log(f"where the time went: {len(runs)} task runs of the flow run (name, count, total, median, span "
                "from the flow run's start)")
            for line in task_breakdown(runs, run.start_time):
                log(line)
            if sampler is not None and meter is not None:
                log("where the flow's threads spent their time (sampled, in this process):")
                for line in sampler.lines():
                    log(line)
                for line in meter.lines(elapsed):
                    log(line)
            log("one certificate's replacement, step by step (its task run and the audit events of its steps):")
            for line in phase_breakdown(engine, runs, since):
                log(line)
            log("audit events in the inventory since the run was created (action, count, first and last, seconds):")
            for line in audit_timeline(engine, since):
                log(line)
            cores = os.cpu_count() or 1
            log(f"CPU during the run ({elapsed * cores:.0f} s available on {cores} cores): "
                + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in cpu_used.items())
                + f"; load average before {load_before}, after {load_after}")
    finally:
        if serve is not None:
            serve.stop()
        if fleet is not None:
            fleet.stop()
        server.stop()
        TRANSPORT.shut()
        get_engine().dispose()
        if not args.keep:
            shutil.rmtree(WORK, ignore_errors=True)

    log(f"{count} certificates on {nginx + haproxy} targets ({nginx} nginx, {haproxy} haproxy) over SSH; "
        f"propagation from {visible_from}")
    log(f"figure revoke_and_replace_seconds: {elapsed:.1f} s")
    log(f"figure revoked_certificates: {revoked}")
    log(f"figure still_served_after: {len(still)} endpoints")
    log(f"figure revocation_visible_seconds_max: {visible_max:.2f} s")
    return 0 if ok else 1


def fleet_pids(fleet: Fleet) -> list[int]:
    """The lab's sshd and the nginx and haproxy processes (their children count with them)."""
    pids = [int((fleet.sshd.workdir / "sshd.pid").read_text().split()[0])]
    for instance in [*fleet.nginx.values(), *fleet.haproxy.values()]:
        process = getattr(instance, "_process", None)
        if process is not None and process.poll() is None:
            pids.append(process.pid)
    return pids


if __name__ == "__main__":
    sys.exit(main())
