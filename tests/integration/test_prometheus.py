"""A real Prometheus (Debian's 2.42) against certpilot: the shipped alert rules pass promtool's checks
and unit tests, what `certpilot exporter` serves passes `promtool check metrics`, and a Prometheus
started here on loopback scrapes the exporter, answers queries with certpilot's series and fires a
shipped rule on them."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from certpilot import audit, database, inventory
from certpilot.database import write_session
from certpilot.metrics import CONTENT_TYPE
from certpilot.sample_estate import Authority, issue_leaf
from certpilot.x509info import describe_certificate, fingerprint_sha256
from lab.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deployments" / "prometheus" / "certpilot-rules.yml"
RULE_TESTS = ROOT / "tests" / "prometheus" / "certpilot-rules.test.yml"
UTC = dt.timezone.utc


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is not installed: bash scripts/setup.sh --servers (Debian package prometheus)"
    return path


def run(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(args, input=stdin, capture_output=True, timeout=60)


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def wait_for(check: Callable[[], Any], process: subprocess.Popen[bytes], what: str, log: Path,
             seconds: float = 30.0) -> Any:
    """``check()``'s first truthy answer; fails naming ``what`` (with its log) if the process dies or time runs out."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, f"{what} exited with status {process.returncode}:\n{log.read_text()[-3000:]}"
        try:
            answer = check()
        except httpx.HTTPError:
            answer = None
        if answer:
            return answer
        time.sleep(0.2)
    raise AssertionError(f"{what}: nothing within {seconds:.0f} s\n{log.read_text()[-3000:]}")


def test_shipped_rules_are_valid_and_pass_their_unit_tests() -> None:
    promtool = tool("promtool")
    checked = run(promtool, "check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout.decode() + checked.stderr.decode()
    assert b"SUCCESS: 7 rules found" in checked.stdout
    tested = run(promtool, "test", "rules", str(RULE_TESTS))
    assert tested.returncode == 0 and b"SUCCESS" in tested.stdout, tested.stdout.decode() + tested.stderr.decode()


@pytest.fixture
def estate(ca: tuple[Authority, Authority]) -> dict[str, Any]:
    """An inventory (the default SQLite of this test's CERTPILOT_HOME) with a certificate in service
    for 40 days and one that expired yesterday."""
    engine = database.get_engine()
    now = dt.datetime.now(UTC)
    good, _ = issue_leaf(ca[1], ["shop.example.test"], (now + dt.timedelta(days=40)).replace(microsecond=0))
    gone, _ = issue_leaf(ca[1], ["old.example.test"], (now - dt.timedelta(days=1)).replace(microsecond=0))
    with write_session(engine) as session:
        inventory.upsert(session, [inventory.Observation(describe_certificate(good), "tls://shop.example.test:443",
                                                         "tls-scan:lab"),
                                   inventory.Observation(describe_certificate(gone), "tls://old.example.test:443",
                                                         "tls-scan:lab")],
                         audit.Actor("test"), owner="shop")
    return {"engine": engine, "good": good, "gone": gone}


@pytest.fixture
def exporter(estate: dict[str, Any], tmp_path: Path) -> Iterator[str]:
    """`certpilot exporter` as an operator starts it, on a free loopback port; its base URL."""
    port = free_port()
    log = tmp_path / "exporter.log"
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "cli", "exporter", "--listen", f"127.0.0.1:{port}"],
                                   cwd=ROOT, env=dict(os.environ), stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: httpx.get(f"{url}/healthz", timeout=2).status_code == 200, process, "certpilot exporter", log)
        yield url
    finally:
        stop(process)
    assert process.returncode == 0, f"certpilot exporter did not stop cleanly:\n{log.read_text()[-3000:]}"


def test_prometheus_scrapes_certpilot_and_fires_a_shipped_rule(estate: dict[str, Any], exporter: str,
                                                               tmp_path: Path) -> None:
    served = httpx.get(f"{exporter}/metrics", timeout=10)
    assert served.status_code == 200 and served.headers["content-type"] == CONTENT_TYPE
    checked = run(tool("promtool"), "check", "metrics", stdin=served.content)
    assert checked.returncode == 0 and not checked.stdout.strip() and not checked.stderr.strip(), \
        checked.stdout.decode() + checked.stderr.decode()

    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(f"""
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files: ["{RULES}"]
scrape_configs:
  - job_name: certpilot
    static_configs:
      - targets: ["{exporter.removeprefix('http://')}"]
""")
    log = tmp_path / "prometheus.log"
    with log.open("wb") as out:
        prometheus = subprocess.Popen([tool("prometheus"), f"--config.file={config}",
                                       f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                       f"--web.listen-address=127.0.0.1:{port}"], stdout=out, stderr=subprocess.STDOUT)
    api = f"http://127.0.0.1:{port}/api/v1"

    def query(promql: str) -> list[dict[str, Any]]:
        answer = httpx.get(f"{api}/query", params={"query": promql}, timeout=5).json()
        assert answer["status"] == "success", answer
        return list(answer["data"]["result"])

    def firing() -> list[dict[str, Any]]:
        alerts = httpx.get(f"{api}/alerts", timeout=5).json()["data"]["alerts"]
        return [a for a in alerts if a["labels"]["alertname"] == "CertificateExpired" and a["state"] == "firing"]

    try:
        good, gone = estate["good"], estate["gone"]
        fingerprint = fingerprint_sha256(good)
        [series] = wait_for(lambda: query(f'x509_cert_not_after{{fingerprint="{fingerprint}"}}'), prometheus,
                            "Prometheus scraping certpilot", log)
        assert series["metric"] == {
            "__name__": "x509_cert_not_after", "job": "certpilot", "instance": exporter.removeprefix("http://"),
            "fingerprint": fingerprint, "subject_CN": "shop.example.test", "subject_O": "certpilot sample estate",
            "issuer_CN": "Test Issuing CA", "issuer_O": "certpilot sample estate",
            "serial_number": str(good.serial_number), "owner": "shop", "managed": "false"}
        assert float(series["value"][1]) == good.not_valid_after_utc.timestamp()
        assert [float(s["value"][1]) for s in query('up{job="certpilot"}')] == [1.0]
        days_left = query(f'(x509_cert_not_after{{fingerprint="{fingerprint}"}} - time()) / 86400')
        assert 39 < float(days_left[0]["value"][1]) <= 40

        [alert] = wait_for(firing, prometheus, "the shipped rule CertificateExpired firing", log)
        assert alert["labels"]["fingerprint"] == fingerprint_sha256(gone) and alert["labels"]["severity"] == "page"
        assert alert["annotations"]["summary"] == "Certificate old.example.test has expired and is still in service"
    finally:
        stop(prometheus)


def test_exporter_metrics_follow_the_inventory(estate: dict[str, Any], exporter: str,
                                               ca: tuple[Authority, Authority]) -> None:
    """Each scrape reads the inventory afresh: a certificate added after the start is in the next one."""
    engine: sa.Engine = estate["engine"]
    before = httpx.get(f"{exporter}/metrics", timeout=10).text
    late, _ = issue_leaf(ca[1], ["late.example.test"], dt.datetime.now(UTC) + dt.timedelta(days=10))
    with write_session(engine) as session:
        inventory.upsert(session, [inventory.Observation(describe_certificate(late), "tls://late.example.test:443",
                                                         "tls-scan:lab")], audit.Actor("test"))
    after = httpx.get(f"{exporter}/metrics", timeout=10).text
    fingerprint = fingerprint_sha256(late)
    assert fingerprint not in before and f'fingerprint="{fingerprint}"' in after
