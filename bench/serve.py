"""Benchmark: `certpilot serve`, Prefect's runner and the HTTP listener in one event loop.

    python bench/serve.py              # 10 flow runs
    python bench/serve.py --quick      # 3
    python bench/serve.py --separate   # the listener in a process of its own (certpilot exporter), for comparison

What it does, all on loopback in a temporary directory (its own PREFECT_HOME, CERTPILOT_HOME):

1. Starts a Prefect server with its scheduler (lab/prefect_server.py) and `certpilot serve` as an operator
   runs it (PREFECT_RUNNER_POLL_FREQUENCY=1 so runs start quickly), and times the start: from launching
   the process until it has registered every deployment and its listener answers /healthz.
2. Asks /healthz for 20 s while idle, then again while N import-inventory runs (nothing to import) are
   created through the API and executed by the served process (at most 5 at once, the runner's default).
   Everything shares one event loop, so a runner that blocked the loop would show here as /healthz
   latency; the figures are the 99th percentile and the maximum of each phase.
3. Times each run from its creation through the API to Completed (median), and the stop after SIGTERM.

With ``--separate`` the served process runs with ``--no-http`` and /healthz is asked of a `certpilot
exporter` process instead: the same load, without the runner in the listener's event loop. Similar
latencies in both modes mean the runner does not hold up the listener; what is left is the CPU that the
flow-run subprocesses take on the machine.

The output ends with `figure serve_start_seconds`, `figure serve_healthz_p99_ms_idle`,
`figure serve_healthz_p99_ms_busy`, `figure serve_healthz_max_ms_busy`, `figure serve_run_latency_seconds`,
`figure serve_stop_seconds`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import httpx  # noqa: E402

from lab.ports import free_port  # noqa: E402
from lab.prefect_server import PrefectServer  # noqa: E402


def log(message: str) -> None:
    print(message, flush=True)


def healthz_latencies(url: str, stop: threading.Event, out: list[float]) -> None:
    with httpx.Client(timeout=10) as client:
        while not stop.is_set():
            started = time.perf_counter()
            response = client.get(url)
            out.append(time.perf_counter() - started)
            if response.status_code != 200:
                raise RuntimeError(f"/healthz answered {response.status_code}")
            time.sleep(0.02)


def p99(values: list[float]) -> float:
    return sorted(values)[max(0, int(len(values) * 0.99) - 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 runs instead of 10")
    parser.add_argument("--runs", type=int, default=None)
    parser.add_argument("--separate", action="store_true", help="the listener in a certpilot exporter process")
    args = parser.parse_args()
    runs = args.runs or (3 if args.quick else 10)
    work = Path(tempfile.mkdtemp(prefix="certpilot-bench-serve-"))
    try:
        with PrefectServer(work / "prefect-server") as server:
            log(f"Prefect server on {server.url}")
            env = {key: value for key, value in os.environ.items() if not key.startswith(("PREFECT_", "CERTPILOT_"))}
            env.update({"PREFECT_API_URL": server.api_url, "PREFECT_HOME": str(work / "prefect-client"),
                        "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_RUNNER_POLL_FREQUENCY": "1",
                        "CERTPILOT_HOME": str(work / "certpilot")})
            port = free_port()
            serve_log = work / "serve.log"
            started = time.monotonic()
            command = [sys.executable, "-m", "cli", "serve", "--listen", f"127.0.0.1:{port}"]
            exporter = None
            if args.separate:
                command = [sys.executable, "-m", "cli", "serve", "--no-http"]
                exporter = subprocess.Popen([sys.executable, "-m", "cli", "exporter", "--listen", f"127.0.0.1:{port}"],
                                            cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            with open(serve_log, "wb") as out:
                serve = subprocess.Popen(command, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT)
            healthz = f"http://127.0.0.1:{port}/healthz"
            try:
                while True:
                    if serve.poll() is not None:
                        raise RuntimeError(f"certpilot serve exited: see {serve_log}")
                    if "deployments from the Prefect API" in serve_log.read_text():
                        try:
                            if httpx.get(healthz, timeout=2).status_code == 200:
                                break
                        except httpx.HTTPError:
                            pass
                    if time.monotonic() - started > 120:
                        raise RuntimeError(f"certpilot serve did not start in 120 s: see {serve_log}")
                    time.sleep(0.05)
                start_seconds = time.monotonic() - started
                log(f"certpilot serve serving after {start_seconds:.1f} s")

                idle: list[float] = []
                stop = threading.Event()
                probe = threading.Thread(target=healthz_latencies, args=(healthz, stop, idle))
                probe.start()
                time.sleep(20 if not args.quick else 8)
                stop.set()
                probe.join()

                busy: list[float] = []
                stop = threading.Event()
                probe = threading.Thread(target=healthz_latencies, args=(healthz, stop, busy))
                probe.start()
                api = httpx.Client(base_url=server.api_url, timeout=30)
                # import-inventory (no paths: nothing to import) has no deployment concurrency limit; renew-due's
                # limit of 1 would serialise the runs and measure the queue instead
                deployment = api.get("/deployments/name/import-inventory/import-inventory").raise_for_status().json()
                created = {}
                for _ in range(runs):
                    for attempt in range(10):  # a busy SQLite-backed Prefect server answers 503 at times
                        response = api.post(f"/deployments/{deployment['id']}/create_flow_run",
                                            json={"parameters": {"paths": []}})
                        if response.status_code != 503:
                            break
                        time.sleep(0.5 * (attempt + 1))
                    created[response.raise_for_status().json()["id"]] = time.monotonic()
                done: dict[str, float] = {}
                deadline = time.monotonic() + 60 + 15 * runs
                while len(done) < runs:
                    for run_id in set(created) - set(done):
                        state = api.get(f"/flow_runs/{run_id}").raise_for_status().json()["state"]
                        if state and state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                            if state["type"] != "COMPLETED":
                                raise RuntimeError(f"run {run_id} ended {state['type']}: see {serve_log}")
                            done[run_id] = time.monotonic() - created[run_id]
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{runs - len(done)} run(s) not done: see {serve_log}")
                    time.sleep(0.2)
                stop.set()
                probe.join()
                api.close()
            except BaseException:
                log(f"--- the last lines of {serve_log}:\n" + "\n".join(serve_log.read_text().splitlines()[-40:]))
                log(f"--- the last lines of {server.log}:\n" + "\n".join(server.log.read_text().splitlines()[-20:]))
                raise
            finally:
                stopping = time.monotonic()
                serve.send_signal(signal.SIGTERM)
                code = serve.wait(timeout=90)
                stop_seconds = time.monotonic() - stopping
                if exporter is not None:
                    exporter.send_signal(signal.SIGTERM)
                    exporter.wait(timeout=30)
            log(f"certpilot serve stopped with exit code {code} {stop_seconds:.1f} s after SIGTERM"
                + (" (listener: a certpilot exporter process)" if args.separate else ""))
            log(f"/healthz idle: {len(idle)} requests, p50 {statistics.median(idle) * 1000:.1f} ms, "
                f"p99 {p99(idle) * 1000:.1f} ms, max {max(idle) * 1000:.1f} ms")
            log(f"/healthz during {runs} runs: {len(busy)} requests, p50 {statistics.median(busy) * 1000:.1f} ms, "
                f"p99 {p99(busy) * 1000:.1f} ms, max {max(busy) * 1000:.1f} ms")
            log(f"run latency (created through the API to Completed): median {statistics.median(done.values()):.1f} s, "
                f"max {max(done.values()):.1f} s")
            log(f"figure serve_start_seconds: {start_seconds:.1f} s")
            log(f"figure serve_healthz_p99_ms_idle: {p99(idle) * 1000:.1f} ms")
            log(f"figure serve_healthz_p99_ms_busy: {p99(busy) * 1000:.1f} ms")
            log(f"figure serve_healthz_max_ms_busy: {max(busy) * 1000:.1f} ms")
            log(f"figure serve_run_latency_seconds: {statistics.median(done.values()):.1f} s")
            log(f"figure serve_stop_seconds: {stop_seconds:.1f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
