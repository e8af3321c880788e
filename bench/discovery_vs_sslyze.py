"""Benchmark: discovering certificates on 1,000 TLS endpoints, certpilot's scanner against sslyze.

    python bench/discovery_vs_sslyze.py              # 1,000 endpoints
    python bench/discovery_vs_sslyze.py --quick      # 100
    python bench/discovery_vs_sslyze.py --endpoints N

One TLS farm (lab/tls_farm.py) on 127.0.0.1: N listeners, each with its own EC P-256 certificate,
presenting leaf + intermediate. Both scanners run in this one run against the same endpoints, one after
the other (the farm process serves both; this machine's cores are shared by the farm and the scanner).

certpilot: connectors.tls_scan.TlsScanSource with its defaults (concurrency 200, timeout 3 s), the farm's
root as trust: every endpoint's full chain, TLS version, and chain verification. Timed three times over
the whole scan (``discover()`` until the last result); the median is the figure.

sslyze: from PyPI, in its own virtual environment (bench/.venvs/sslyze, created with `python -m venv` and
`pip install sslyze` on first use; --sslyze-venv to choose another), certificate information only
(ScanCommand.CERTIFICATE_INFO), its default concurrency (10 servers at once, 5 connections each), driven
by a small script run by that venv's python. Timed from queueing the scans to the last result (its
interpreter start and imports are excluded, which favours sslyze).

Both must find the same leaf fingerprints (the count that agree is printed). The output ends with:
    figure certpilot_endpoints_per_second: VALUE endpoints/s
    figure sslyze_endpoints_per_second: VALUE endpoints/s
    figure speedup_vs_sslyze: VALUE x
Goals: >= 500 endpoints/s and >= 20x sslyze. Nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from certpilot.discovery import split  # noqa: E402
from connectors.tls_scan import TlsScanSource  # noqa: E402
from lab.tls_farm import TlsFarm, plan  # noqa: E402

DEFAULT_SSLYZE_VENV = ROOT / "bench" / ".venvs" / "sslyze"

SSLYZE_SCRIPT = r'''
import json, sys, time, hashlib
from cryptography.hazmat.primitives import serialization
from sslyze import Scanner, ServerScanRequest, ServerNetworkLocation, ScanCommand, ServerScanStatusEnum

host = sys.argv[1]
ports = [int(p) for p in sys.argv[2].split(",")]
requests = [ServerScanRequest(server_location=ServerNetworkLocation(hostname=host, port=port),
                              scan_commands={ScanCommand.CERTIFICATE_INFO}) for port in ports]
scanner = Scanner()  # default concurrency
started = time.monotonic()
scanner.queue_scans(requests)
found, errors = {}, []
for result in scanner.get_results():
    port = result.server_location.port
    certinfo = result.scan_result.certificate_info if result.scan_result else None
    if result.scan_status != ServerScanStatusEnum.COMPLETED or certinfo is None or certinfo.result is None:
        errors.append(f"{port}: {result.connectivity_error_trace or (certinfo and certinfo.error_reason)}")
        continue
    leaf = certinfo.result.certificate_deployments[0].received_certificate_chain[0]
    found[port] = hashlib.sha256(leaf.public_bytes(serialization.Encoding.DER)).hexdigest()
elapsed = time.monotonic() - started
print(json.dumps({"elapsed": elapsed, "found": found, "errors": errors[:10], "error_count": len(errors)}))
'''


def say(text: str) -> None:
    print(text, flush=True)


def ensure_sslyze(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if python.exists() and subprocess.run([str(python), "-c", "import sslyze"], capture_output=True).returncode == 0:
        return python
    say(f"creating sslyze's virtual environment in {venv} (first use) ...")
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "sslyze"],
                   check=True)
    return python


def scan_certpilot(farm: TlsFarm, expected: dict[int, str]) -> tuple[float, dict[int, str]]:
    targets = [f"{e.host}:{e.port}" for e in farm.endpoints]
    rates, found_fps = [], {}
    for attempt in range(3):
        source = TlsScanSource("bench", targets, trust=[farm.ca.root])
        started = time.monotonic()
        found, problems = split(source.discover())
        elapsed = time.monotonic() - started
        verified = sum(1 for f in found if f.details["verified"])
        rates.append(len(targets) / elapsed)
        say(f"  certpilot run {attempt + 1}: {len(found)} found, {len(problems)} problems, {verified} verified, "
            f"{elapsed:.2f} s, {rates[-1]:.0f} endpoints/s")
        for problem in problems[:5]:
            say(f"    problem: {problem.locator}: {problem.reason}")
        found_fps = {int(f.details["port"]): hashlib.sha256(f.certificates[0]).hexdigest() for f in found}
    agree = sum(1 for port, fp in found_fps.items() if expected.get(port) == fp)
    say(f"  certpilot: {agree} of {len(expected)} fingerprints as the farm serves them")
    return statistics.median(rates), found_fps


def scan_sslyze(python: Path, farm: TlsFarm) -> tuple[float, dict[int, str]]:
    ports = ",".join(str(e.port) for e in farm.endpoints)
    started = time.monotonic()
    run = subprocess.run([str(python), "-W", "ignore", "-c", SSLYZE_SCRIPT, "127.0.0.1", ports],
                         capture_output=True, text=True, timeout=3600)
    wall = time.monotonic() - started
    if run.returncode != 0:
        raise SystemExit(f"sslyze failed ({run.returncode}): {run.stderr[-2000:]}")
    result = json.loads(run.stdout.strip().splitlines()[-1])
    elapsed = result["elapsed"]
    rate = len(farm.endpoints) / elapsed
    say(f"  sslyze: {len(result['found'])} found, {result['error_count']} errors, {elapsed:.2f} s scanning "
        f"({wall:.2f} s with its start), {rate:.1f} endpoints/s")
    for error in result["errors"][:5]:
        say(f"    error: {error}")
    return rate, {int(port): fp for port, fp in result["found"].items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100 endpoints")
    parser.add_argument("--endpoints", type=int, help="number of endpoints (default 1,000; --quick: 100)")
    parser.add_argument("--sslyze-venv", type=Path, default=DEFAULT_SSLYZE_VENV)
    args = parser.parse_args()
    count = args.endpoints or (100 if args.quick else 1000)

    python = ensure_sslyze(args.sslyze_venv)
    say(f"machine: {os.cpu_count()} cores; {count} endpoints, each with its own certificate")
    with tempfile.TemporaryDirectory(prefix="certpilot-bench-farm-") as directory:
        started = time.monotonic()
        with TlsFarm.run(Path(directory), plan(count)) as farm:
            say(f"farm of {len(farm.endpoints)} listeners ready in {time.monotonic() - started:.1f} s")
            expected = {e.port: e.fingerprint or "" for e in farm.endpoints}
            say("certpilot (TlsScanSource, concurrency 200, timeout 3 s, full chains, chain verification):")
            cp_rate, cp_found = scan_certpilot(farm, expected)
            say("sslyze 6 (certificate information only, default concurrency):")
            sy_rate, sy_found = scan_sslyze(python, farm)
    agree = sum(1 for port, fp in cp_found.items() if sy_found.get(port) == fp)
    say(f"fingerprints found by both and equal: {agree} of {count}")
    ratio = cp_rate / sy_rate if sy_rate else float("inf")
    say(f"certpilot {cp_rate:.0f} endpoints/s (median of 3), sslyze {sy_rate:.1f} endpoints/s: {ratio:.1f}x")
    say(f"figure certpilot_endpoints_per_second: {cp_rate:.0f} endpoints/s")
    say(f"figure sslyze_endpoints_per_second: {sy_rate:.1f} endpoints/s")
    say(f"figure speedup_vs_sslyze: {ratio:.1f} x")


if __name__ == "__main__":
    main()
