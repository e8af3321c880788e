"""The fault proxy (lab/fault_proxy.py), each fault seen by a real client (httpx, a raw socket) through the proxy
to a real loopback HTTP(S) server; the seed repeats the faults; only loopback addresses are accepted."""

from __future__ import annotations

import http.server
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from lab.fault_proxy import Faults, FaultProxy
from tests.integration.acme_servers import make_tls_identity

BIG = b"x" * 200_000


class Upstream:
    """A loopback HTTP/1.1 server (HTTPS with ``tls``) that counts the requests it served."""

    def __init__(self, tls: tuple[Path, Path, Path] | None = None) -> None:
        self.seen: list[tuple[str, str]] = []
        upstream = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 5

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                upstream.seen.append((self.command, self.path))
                payload = BIG if self.path == "/big" else f"{self.command} {self.path} {body.decode()}".encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(payload)))
                self.send_header("X-Host-Seen", self.headers.get("Host", ""))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = _answer  # noqa: N815

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: object, client_address: object) -> None:
                pass  # the proxy cut a connection on purpose

        self.server = Server(("127.0.0.1", 0), Handler)
        if tls is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(tls[1], tls[2])
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    server = Upstream()
    yield server
    server.stop()


def _proxy(upstream: Upstream, faults: Faults, mode: str = "http", seed: int = 1) -> FaultProxy:
    return FaultProxy(upstream=("127.0.0.1", upstream.port), faults=faults, seed=seed,
                      mode=mode)  # type: ignore[arg-type]


def test_no_faults_forwards_requests_and_keeps_the_host_header(upstream: Upstream) -> None:
    with _proxy(upstream, Faults()) as proxy, httpx.Client(timeout=5) as client:
        for i in range(5):  # one kept-alive connection, five requests
            response = client.post(f"{proxy.url}/r{i}", content=b"body")
            assert response.text == f"POST /r{i} body"
            assert response.headers["X-Host-Seen"] == f"127.0.0.1:{proxy.port}"
        assert client.get(f"{proxy.url}/big").content == BIG
        stats = proxy.stats
    assert stats.connections == 1 and stats.requests == 6 and stats.total_injected == 0
    assert len(upstream.seen) == 6


def test_reset_closes_with_a_rst_before_forwarding(upstream: Upstream) -> None:
    with _proxy(upstream, Faults(reset=1.0)) as proxy:
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{proxy.url}/a", timeout=5)
        with socket.create_connection((proxy.host, proxy.port), timeout=5) as raw:
            raw.sendall(b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n")
            with pytest.raises(ConnectionResetError):
                raw.recv(100)
        assert proxy.stats.injected["reset"] == 2
    assert upstream.seen == []


def test_black_hole_holds_until_the_client_gives_up(upstream: Upstream) -> None:
    with _proxy(upstream, Faults(black_hole=1.0)) as proxy:
        started = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            httpx.get(f"{proxy.url}/a", timeout=0.5)
        assert 0.45 < time.monotonic() - started < 3
    assert upstream.seen == []


def test_stop_releases_a_held_connection(upstream: Upstream) -> None:
    proxy = _proxy(upstream, Faults(black_hole=1.0), mode="tcp")
    raw = socket.create_connection((proxy.host, proxy.port), timeout=5)
    raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    time.sleep(0.1)
    started = time.monotonic()
    proxy.stop()
    assert time.monotonic() - started < 3
    assert raw.recv(100) == b""  # closed, never answered
    raw.close()


def test_delay_then_forward(upstream: Upstream) -> None:
    with _proxy(upstream, Faults(delay=1.0, delay_seconds=0.4)) as proxy:
        started = time.monotonic()
        assert httpx.get(f"{proxy.url}/slow", timeout=5).text == "GET /slow "
        assert time.monotonic() - started >= 0.4


def test_truncate_forwards_the_request_but_only_part_of_the_answer(upstream: Upstream) -> None:
    with _proxy(upstream, Faults(truncate=1.0)) as proxy:
        with pytest.raises(httpx.RemoteProtocolError):
            httpx.get(f"{proxy.url}/big", timeout=5)
    assert upstream.seen == [("GET", "/big")]  # the server acted; the client never heard the whole answer


def test_5xx_and_429_answer_without_forwarding(upstream: Upstream) -> None:
    with _proxy(upstream, Faults(status_5xx=1.0)) as proxy, httpx.Client(timeout=5) as client:
        statuses = {client.get(f"{proxy.url}/a").status_code for _ in range(20)}
        assert statuses <= {502, 503, 504} and len(statuses) > 1
        proxy.set_faults(Faults(status_429=1.0, retry_after=7))
        limited = client.post(f"{proxy.url}/b", content=b"x")
        assert limited.status_code == 429 and limited.headers["Retry-After"] == "7"
        assert limited.headers["Content-Type"] == "application/problem+json"
        proxy.set_faults(Faults())  # healed, on the same kept-alive connection
        assert client.get(f"{proxy.url}/c").status_code == 200
        assert proxy.stats.injected["status_5xx"] == 20 and proxy.stats.injected["status_429"] == 1
    assert upstream.seen == [("GET", "/c")]


def test_only_aims_the_faults(upstream: Upstream) -> None:
    faults = Faults(status_5xx=1.0, only=lambda method, path: method == "POST" and path.startswith("/finalize"))
    with _proxy(upstream, faults) as proxy, httpx.Client(timeout=5) as client:
        assert client.get(f"{proxy.url}/finalize/1").status_code == 200
        assert client.post(f"{proxy.url}/order/1", content=b"").status_code == 200
        assert client.post(f"{proxy.url}/finalize/1?x=1", content=b"").status_code in (502, 503, 504)
    assert ("POST", "/finalize/1?x=1") not in upstream.seen


def _outcomes(upstream: Upstream, seed: int, mode: str) -> list[str]:
    faults = Faults(reset=0.2, black_hole=0.1, truncate=0.1) if mode == "tcp" else \
        Faults(reset=0.2, status_5xx=0.2, status_429=0.2)
    seen = []
    with _proxy(upstream, faults, mode=mode, seed=seed) as proxy:
        for i in range(20):  # a new connection each time
            try:
                seen.append(str(httpx.get(f"{proxy.url}/big" if mode == "tcp" else f"{proxy.url}/{i}",
                                          timeout=0.2).status_code))
            except httpx.TimeoutException:
                seen.append("timeout")
            except httpx.TransportError:
                seen.append("broken")
    return seen


@pytest.mark.parametrize("mode", ["http", "tcp"])
def test_the_seed_repeats_the_faults(upstream: Upstream, mode: str) -> None:
    first = _outcomes(upstream, 7, mode)
    assert _outcomes(upstream, 7, mode) == first
    assert len(set(first)) >= 3  # faults and successes mixed
    assert _outcomes(upstream, 8, mode) != first


def test_tcp_truncate_after_a_number_of_bytes(upstream: Upstream) -> None:
    with _proxy(upstream, Faults(truncate=1.0, truncate_after=10), mode="tcp") as proxy:
        with socket.create_connection((proxy.host, proxy.port), timeout=5) as raw:
            raw.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
            received = b""
            while chunk := raw.recv(65536):
                received += chunk
    assert received == b"HTTP/1.1 2"  # the first ten bytes, then EOF


def test_https_in_front_of_an_https_server(tmp_path: Path) -> None:
    identity = make_tls_identity(tmp_path / "tls")
    server = Upstream(tls=identity)
    try:
        with FaultProxy(upstream=("127.0.0.1", server.port), faults=Faults(status_5xx=0.5), seed=3, mode="http",
                        tls=(identity[1], identity[2]), upstream_ca=identity[0]) as proxy, \
                httpx.Client(verify=ssl.create_default_context(cafile=str(identity[0])), timeout=5) as client:
            assert proxy.url.startswith("https://127.0.0.1:")
            statuses = [client.get(f"{proxy.url}/s{i}").status_code for i in range(20)]
        assert set(statuses) - {502, 503, 504} == {200}
        assert len(server.seen) == statuses.count(200)
    finally:
        server.stop()


@pytest.mark.parametrize("upstream_host, listen_host", [("10.0.0.1", "127.0.0.1"), ("192.0.2.7", "127.0.0.1"),
                                                         ("127.0.0.1", "0.0.0.0"), ("example.com", "127.0.0.1")])
def test_only_loopback(upstream_host: str, listen_host: str) -> None:
    with pytest.raises(ValueError, match="loopback"):
        FaultProxy(upstream=(upstream_host, 80), listen_host=listen_host)


def test_bad_faults_are_refused() -> None:
    with pytest.raises(ValueError, match="more than 1"):
        Faults(reset=0.6, status_5xx=0.6)
    with pytest.raises(ValueError, match="probability"):
        Faults(delay=1.5)
    with pytest.raises(ValueError, match="mode='http'"):
        FaultProxy(upstream=("127.0.0.1", 1), faults=Faults(status_429=0.1), mode="tcp")
