"""Benchmark: certpilot's HTTP listeners under hostile clients, with a well-behaved client beside them.

    python bench/serve_abuse.py            # 3,000 certificates, 12 s per abuse, exporter, ca serve and serve
    python bench/serve_abuse.py --quick    # 300 certificates, 4 s per abuse, exporter and ca serve

All on loopback in a temporary directory (its own CERTPILOT_HOME and inventory): a private CA "corp" whose
URLs point at the listener, N leaves in the inventory (so /metrics is about N KiB). Each listener runs as
an operator runs it, in a process of its own with its default limits (10 s per request, 16 KiB heads,
1,000 connections): `certpilot exporter`, `certpilot ca serve`, and (not with --quick) `certpilot serve`
beside a Prefect server (lab/prefect_server.py). Against each, one abuse at a time (lab/hostile_clients.py):

- slowloris: 300 connections sending a request head a byte at a time (one byte each every 0.5 s);
- slow body: 50 OCSP POSTs whose body comes a byte every 0.5 s (listeners with the CA part);
- huge headers: 8 clients in a loop sending one 4 MiB header, and 8 sending 3,000 small ones;
- idle: 1,100 connections (beyond the 1,000 limit) that send nothing;
- pipelined: 8 clients in a loop, 100 requests written at once on one connection;
- half-closed: 8 clients in a loop, a request then shutdown(SHUT_WR);
- non-readers: 50 connections asking for /metrics (or the CRL) 20 times, pipelined, and never reading.

Meanwhile a good client asks, in a loop: /healthz; the CRL (signature checked) and OCSP for a random leaf
(status, serial and signature checked) where the CA is served; /metrics (every certificate's
x509_cert_not_after present) where metrics are. A request lost is one that failed, timed out (10 s) or
answered wrongly. Sampled every 0.1 s from /proc: the connections the listener's process holds on its
port, and its resident memory (peak: VmHWM).

Ends with `figure serve_abuse_connections_held` (the most held at once, any listener, any abuse),
`figure serve_abuse_rss_mib` (the highest peak RSS of a listener process), `figure
serve_abuse_healthz_p99_ms` (the good client's /healthz during the abuses), `figure
serve_abuse_requests_lost` (goal 0), and per listener `figure serve_abuse_rss_mib_<listener>`.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import httpx  # noqa: E402
from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509 import ocsp  # noqa: E402

from lab import hostile_clients as hostile  # noqa: E402
from lab.ports import free_port  # noqa: E402


def log(message: str) -> None:
    print(message, flush=True)


@dataclass
class Good:
    """What the well-behaved client saw during one abuse."""

    healthz_ms: list[float] = field(default_factory=list)
    requests: int = 0
    lost: list[str] = field(default_factory=list)


@dataclass
class Sample:
    held: int = 0
    rss_kib: int = 0


def prepare(home: Path, certificates: int, base_url: str) -> tuple[x509.Certificate, list[x509.Certificate]]:
    """CA "corp" at ``base_url`` and ``certificates`` leaves in the inventory under ``home``."""
    for name in [name for name in os.environ if name.startswith("CERTPILOT_")]:
        del os.environ[name]
    os.environ["CERTPILOT_HOME"] = str(home)
    from certpilot import audit, ca, inventory, keystore
    from certpilot.database import dispose_engines, get_engine, write_session
    from certpilot.issuance import build_csr
    from certpilot.settings import load_settings
    from certpilot.x509info import describe_certificate
    from connectors.private_ca import PrivateCAIssuer

    def ring() -> keystore.KeyRing:
        return keystore.load_key_ring(load_settings())

    engine = get_engine()
    with write_session(engine) as session:
        ca.init_ca(session, ring(), audit.Actor("bench"), "corp", base_url)
    issuer, key = PrivateCAIssuer(engine, "corp", ring), ec.generate_private_key(ec.SECP256R1())
    leaves = []
    for start in range(0, certificates, 500):
        chains = [issuer.issue(build_csr(key, [f"host{i}.example.com"]), "tls-server").chain
                  for i in range(start, min(start + 500, certificates))]
        with write_session(engine) as session:
            inventory.upsert(session, [inventory.Observation(describe_certificate(c[0]), None, "issued")
                                       for c in chains], audit.Actor("bench"))
        leaves += [c[0] for c in chains]
    with write_session(engine) as session:
        issuing = ca.ca_certificates(session, ca.get_ca(session, "corp"))[1]
    dispose_engines()
    return issuing, leaves


def good_client(base: str, ca_part: bool, metrics: bool, issuing: x509.Certificate, leaves: list[x509.Certificate],
                expected_series: int, stop: threading.Event, out: Good) -> None:
    rng = random.Random(7)
    with httpx.Client(base_url=base, timeout=10) as client:
        def ask(what: str, check: Callable[[httpx.Response], bool], method: str = "GET", **kwargs: object) -> float:
            out.requests += 1
            started = time.perf_counter()
            try:
                response = client.request(method, what, **kwargs)  # type: ignore[arg-type]
                if response.status_code != 200 or not check(response):
                    out.lost.append(f"{method} {what}: {response.status_code} {response.content[:80]!r}")
            except httpx.HTTPError as exc:
                out.lost.append(f"{method} {what}: {type(exc).__name__}: {exc}")
            return (time.perf_counter() - started) * 1000

        while not stop.is_set():
            out.healthz_ms.append(ask("/healthz", lambda r: r.json()["status"] == "ok"))
            if ca_part:
                ask("/corp/issuing.crl", lambda r: x509.load_der_x509_crl(r.content).is_signature_valid(
                    issuing.public_key()))  # type: ignore[arg-type]
                leaf = rng.choice(leaves)
                request = ocsp.OCSPRequestBuilder().add_certificate(leaf, issuing, hashes.SHA256()).build()
                der = request.public_bytes(serialization.Encoding.DER)
                ask("/corp/ocsp", lambda r: _ocsp_good(r.content, leaf, issuing), "POST", content=der,
                    headers={"Content-Type": "application/ocsp-request"})
                ask(f"/corp/ocsp/{base64.b64encode(der).decode()}", lambda r: _ocsp_good(r.content, leaf, issuing))
            if metrics:
                ask("/metrics", lambda r: r.text.count("\nx509_cert_not_after{") == expected_series)
            stop.wait(0.05)


def _ocsp_good(der: bytes, leaf: x509.Certificate, issuing: x509.Certificate) -> bool:
    response = ocsp.load_der_ocsp_response(der)
    if response.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
        return False
    issuing.public_key().verify(response.signature, response.tbs_response_bytes,  # type: ignore[call-arg, union-attr]
                                ec.ECDSA(response.signature_hash_algorithm))  # type: ignore[arg-type]
    return response.certificate_status == ocsp.OCSPCertStatus.GOOD and response.serial_number == leaf.serial_number


def sampler(pid: int, port: int, stop: threading.Event, out: Sample) -> None:
    while not stop.is_set():
        with contextlib.suppress(OSError, KeyError):
            out.held = max(out.held, hostile.held_connections(pid, port))
            out.rss_kib = max(out.rss_kib, hostile.rss_kib(pid)[0])
        stop.wait(0.1)


def looping(stop: threading.Event, attack: Callable[[], object], clients: int) -> Iterator[threading.Thread]:
    def run() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                attack()

    for _ in range(clients):
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        yield thread


@contextlib.contextmanager
def abuse(name: str, address: hostile.Address, ca_part: bool, metrics: bool, stop: threading.Event) -> Iterator[None]:
    """One abuse running until ``stop``."""
    threads: list[threading.Thread] = []
    socks: list[socket.socket] = []
    try:
        if name == "slowloris":
            head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100_000

            def trickle() -> None:
                offsets: dict[socket.socket, int] = {}
                while not stop.is_set():
                    while len(offsets) < 300:
                        with contextlib.suppress(OSError):
                            offsets[hostile.connect(address, timeout=2)] = 0
                    for sock, offset in list(offsets.items()):
                        try:
                            sock.sendall(head[offset:offset + 1])
                            offsets[sock] = offset + 1
                        except OSError:  # cut off: open another
                            sock.close()
                            del offsets[sock]
                    stop.wait(0.5)
                for sock in offsets:
                    sock.close()
            threads.append(threading.Thread(target=trickle, daemon=True))
            threads[-1].start()
        elif name == "slow body":
            threads += looping(stop, lambda: hostile.slow_body(address, "/corp/ocsp", b"\x30" * 200, interval=0.5,
                                                               wait=30), 50)
        elif name == "huge headers":
            threads += looping(stop, lambda: hostile.huge_header(address, size=4 << 20, wait=15), 8)
            threads += looping(stop, lambda: hostile.many_headers(address, count=3000, wait=15), 8)
        elif name == "idle":
            with hostile.idle_connections(address, 1100) as idle:
                socks += idle
                idle.clear()
        elif name == "pipelined":
            requests = [hostile.request("GET", "/healthz")] * 99 + [hostile.request("GET", "/healthz", close=True)]
            threads += looping(stop, lambda: hostile.pipelined(address, requests, wait=15), 8)
        elif name == "half-closed":
            path = "/corp/issuing.crl" if ca_part else "/metrics"
            threads += looping(stop, lambda: hostile.half_closed(address, hostile.request("GET", path), wait=15), 8)
        elif name == "non-readers":
            path = "/metrics" if metrics else "/corp/issuing.crl"
            for _ in range(50):
                sock = hostile.connect(address, receive_buffer=4096)
                sock.sendall(hostile.request("GET", path) * 20)
                socks.append(sock)
        yield
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=40)
        for sock in socks:
            sock.close()


def wait_ready(url: str, process: subprocess.Popen[bytes], seconds: float, log_path: Path) -> None:
    deadline = time.monotonic() + seconds
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited {process.returncode}: see {log_path}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer within {seconds:g} s: see {log_path}")
        time.sleep(0.1)


def p99(values: list[float]) -> float:
    return sorted(values)[max(0, int(len(values) * 0.99) - 1)] if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="300 certificates, 4 s per abuse, no certpilot serve")
    parser.add_argument("--certificates", type=int, default=None)
    parser.add_argument("--seconds", type=float, default=None, help="how long each abuse lasts")
    parser.add_argument("--no-serve", action="store_true", help="leave out certpilot serve (and its Prefect server)")
    args = parser.parse_args()
    certificates = args.certificates or (300 if args.quick else 3000)
    seconds = args.seconds or (4.0 if args.quick else 12.0)
    work = Path(tempfile.mkdtemp(prefix="certpilot-bench-serve-abuse-"))
    port = free_port()
    try:
        started = time.monotonic()
        issuing, leaves = prepare(work / "home", certificates, f"http://127.0.0.1:{port}")
        log(f"CA corp and {certificates} certificates in {time.monotonic() - started:.1f} s")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "CERTPILOT_"))}
        env["CERTPILOT_HOME"] = str(work / "home")
        listeners = [("exporter", ["exporter"], False, True), ("ca-serve", ["ca", "serve"], True, False)]
        if not (args.quick or args.no_serve):
            listeners.append(("serve", ["serve"], True, True))
        abuses = ["slowloris", "slow body", "huge headers", "idle", "pipelined", "half-closed", "non-readers"]
        held_max, rss_peak, lost = 0, 0, 0
        all_healthz: list[float] = []
        per_rss: dict[str, float] = {}
        for listener, command, ca_part, metrics in listeners:
            server = None
            if listener == "serve":
                from lab.prefect_server import PrefectServer
                server = PrefectServer(work / "prefect-server").__enter__()
                env.update({"PREFECT_API_URL": server.api_url, "PREFECT_HOME": str(work / "prefect-client"),
                            "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
            log_path = work / f"{listener}.log"
            with open(log_path, "wb") as out:
                process = subprocess.Popen([sys.executable, "-m", "cli", *command, "--listen", f"127.0.0.1:{port}"],
                                           cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
            base = f"http://127.0.0.1:{port}"
            try:
                wait_ready(base, process, 120, log_path)
                expected = 0
                if metrics:
                    expected = httpx.get(f"{base}/metrics", timeout=30).text.count("\nx509_cert_not_after{")
                log(f"{listener}: pid {process.pid}, RSS {hostile.rss_kib(process.pid)[0] / 1024:.0f} MiB at rest"
                    + (f", /metrics with {expected} certificates" if metrics else ""))
                for name in abuses:
                    if name == "slow body" and not ca_part:
                        continue
                    good, sample, stop, done = Good(), Sample(), threading.Event(), threading.Event()
                    watch = threading.Thread(target=sampler, args=(process.pid, port, done, sample), daemon=True)
                    client = threading.Thread(target=good_client, args=(base, ca_part, metrics, issuing, leaves,
                                                                        expected, done, good), daemon=True)
                    watch.start()
                    with abuse(name, ("127.0.0.1", port), ca_part, metrics, stop):
                        time.sleep(0.5)  # the abuse in place first
                        client.start()
                        time.sleep(seconds)
                        done.set()
                        client.join(timeout=30)
                    watch.join(timeout=5)
                    time.sleep(0.5)
                    after = hostile.held_connections(process.pid, port)
                    log(f"  {name:13s} held {sample.held:5d} connections (then {after:4d}), "
                        f"RSS {sample.rss_kib / 1024:6.0f} MiB; good client: {good.requests} requests, "
                        f"/healthz p99 {p99(good.healthz_ms):7.1f} ms, "
                        f"max {max(good.healthz_ms, default=float('nan')):7.1f} ms, lost {len(good.lost)}"
                        + (f" (first: {good.lost[0]})" if good.lost else ""))
                    held_max, lost = max(held_max, sample.held), lost + len(good.lost)
                    all_healthz += good.healthz_ms
                peak = hostile.rss_kib(process.pid)[1]
                per_rss[listener] = peak / 1024
                rss_peak = max(rss_peak, peak)
                log(f"  {listener}: peak RSS {peak / 1024:.0f} MiB")
            finally:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    process.kill()
                if server is not None:
                    server.__exit__(None, None, None)
        log(f"figure serve_abuse_connections_held: {held_max} connections")
        log(f"figure serve_abuse_rss_mib: {rss_peak / 1024:.0f} MiB")
        log(f"figure serve_abuse_healthz_p99_ms: {p99(all_healthz):.1f} ms")
        log(f"figure serve_abuse_requests_lost: {lost}")
        for listener, mib in per_rss.items():
            log(f"figure serve_abuse_rss_mib_{listener.replace('-', '_')}: {mib:.0f} MiB")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
