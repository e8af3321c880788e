"""certpilot's HTTP listener (uvicorn) on loopback: /healthz, /metrics, the CA's CRL and OCSP on one app,
and the limits that keep it reachable: silent and slow clients, huge headers, oversized or malformed
OCSP requests, a database that never answers, more connections than it takes. The CA's answers
themselves are checked in depth (openssl, pkilint) in test_ca_revocation.py, through the same app."""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from prometheus_client.parser import text_string_to_metric_families

from certpilot import audit, ca, inventory, keystore
from certpilot.database import write_session
from certpilot.issuance import build_csr
from certpilot.settings import load_settings
from certpilot.x509info import describe_certificate
from connectors.http_service import MAX_OCSP_REQUEST_BYTES, HTTPService, Limits, build_app
from connectors.private_ca import PrivateCAIssuer
from lab.hostile_clients import server_closed
from lab.ports import free_port

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


def _ring() -> keystore.KeyRing:
    return keystore.load_key_ring(load_settings())


def _get(url: str, method: str = "GET", data: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, dict(exc.headers), exc.read()


def _raw(address: tuple[str, int], data: bytes, timeout: float = 10) -> bytes:
    """Send ``data`` on a new connection and read until the server closes it."""
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.fixture
def service(engine: sa.Engine) -> Iterator[HTTPService]:
    """The whole app (CA, metrics, health) with 2-second request limits, CA "corp" at its URL."""
    with HTTPService(build_app(engine, key_ring=_ring, request_seconds=2.0), ("127.0.0.1", free_port()),
                     limits=Limits(request_seconds=2.0)) as running:
        with write_session(engine) as session:
            ca.init_ca(session, _ring(), audit.Actor("test"), "corp", running.url)
        yield running


def _issue(engine: sa.Engine, name: str) -> x509.Certificate:
    issued = PrivateCAIssuer(engine, "corp", _ring).issue(build_csr(ec.generate_private_key(ec.SECP256R1()), [name]),
                                                          "tls-server")
    with write_session(engine) as session:
        inventory.upsert(session, [inventory.Observation(describe_certificate(c), None, "issued")
                                   for c in issued.chain], audit.Actor("test"))
    return issued.leaf


def test_health_metrics_crl_and_ocsp_on_one_listener(service: HTTPService, engine: sa.Engine, tmp_path: Path) -> None:
    status, headers, body = _get(f"{service.url}/healthz")
    assert (status, headers["content-type"]) == (200, "application/json")
    assert body == b'{"ca": true, "inventory": "ok", "metrics": true, "status": "ok"}\n'

    leaf = _issue(engine, "one.example.com")
    status, headers, body = _get(f"{service.url}/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    families = {family.name: family for family in text_string_to_metric_families(body.decode())}
    serials = {sample.labels["serial_number"] for sample in families["x509_cert_not_after"].samples}
    assert str(leaf.serial_number) in serials

    crl_url = leaf.extensions.get_extension_for_class(x509.CRLDistributionPoints).value[0].full_name[0].value
    status, headers, body = _get(crl_url)
    assert (status, headers["content-type"]) == (200, "application/pkix-crl")
    with write_session(engine) as session:
        root, issuing = ca.ca_certificates(session, ca.get_ca(session, "corp"))
    assert x509.load_der_x509_crl(body).is_signature_valid(issuing.public_key())  # type: ignore[arg-type]
    status, headers, body = _get(crl_url, method="HEAD")
    assert (status, body, headers["content-length"]) == (200, b"", str(len(_get(crl_url)[2])))

    for path, certificate in ((tmp_path / "root.pem", root), (tmp_path / "issuing.pem", issuing),
                              (tmp_path / "leaf.pem", leaf)):
        path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    run = subprocess.run(["openssl", "ocsp", "-issuer", "issuing.pem", "-cert", "leaf.pem", "-url",
                          f"{service.url}/corp/ocsp", "-CAfile", "root.pem", "-timeout", "10"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=30, check=False)
    assert run.returncode == 0 and "Response verify OK" in run.stderr + run.stdout, run.stderr
    assert "leaf.pem: good" in run.stdout


def test_malformed_oversized_and_unframed_ocsp_requests(service: HTTPService, engine: sa.Engine) -> None:
    ocsp_url = f"{service.url}/corp/ocsp"
    for garbage in (b"garbage", b"\x30\x03\x02\x01\x01", b"\x30" + b"\xff" * 40):
        status, headers, body = _get(ocsp_url, "POST", garbage, {"Content-Type": "application/ocsp-request"})
        assert (status, headers["content-type"]) == (200, "application/ocsp-response")
        assert ocsp.load_der_ocsp_response(body).response_status == ocsp.OCSPResponseStatus.MALFORMED_REQUEST
    status, _, body = _get(f"{ocsp_url}/not-base64!!")
    assert ocsp.load_der_ocsp_response(body).response_status == ocsp.OCSPResponseStatus.MALFORMED_REQUEST

    status, _, body = _get(ocsp_url, "POST", b"\x30" * (MAX_OCSP_REQUEST_BYTES + 1))
    assert status == 413 and b"over 16384 bytes" in body
    chunked = _raw(service.address, b"POST /corp/ocsp HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                                    b"Connection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    assert chunked.startswith(b"HTTP/1.1 411 ")

    leaf = _issue(engine, "still.example.com")  # and it still answers properly
    with write_session(engine) as session:
        issuing = ca.ca_certificates(session, ca.get_ca(session, "corp"))[1]
    request = ocsp.OCSPRequestBuilder().add_certificate(leaf, issuing, hashes.SHA256()).build()
    status, _, body = _get(ocsp_url, "POST", request.public_bytes(serialization.Encoding.DER))
    response = ocsp.load_der_ocsp_response(body)
    assert response.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
    assert response.certificate_status == ocsp.OCSPCertStatus.GOOD and response.serial_number == leaf.serial_number


def test_hundreds_of_silent_and_slow_clients_do_not_take_the_listener(service: HTTPService) -> None:
    opened = time.monotonic()
    silent = [socket.create_connection(service.address, timeout=10) for _ in range(300)]
    partial = [socket.create_connection(service.address, timeout=10) for _ in range(50)]
    for sock in partial:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
    closed_at: list[float] = []

    def slowloris() -> None:  # a header byte every 0.1 s: busy, but never a whole request
        with socket.create_connection(service.address, timeout=10) as sock:
            try:
                sock.sendall(b"GET /healthz HTTP/1.1\r\n")
                for _ in range(200):
                    sock.sendall(b"X")
                    time.sleep(0.1)
            except OSError:
                pass
            closed_at.append(time.monotonic())

    loris = threading.Thread(target=slowloris)
    loris.start()
    try:
        started = time.monotonic()
        status, _, body = _get(f"{service.url}/healthz")
        assert status == 200 and b'"status": "ok"' in body
        assert time.monotonic() - started < 1.5  # answered at once, beside 351 idle or slow connections

        for sock in silent + partial:  # each is cut off once its request time (2 s) is up
            assert sock.recv(1024) == b""
        assert 1.9 < time.monotonic() - opened < 6
        loris.join(timeout=10)
        assert closed_at and closed_at[0] - started < 4
    finally:
        for sock in silent + partial:
            sock.close()
        loris.join(timeout=10)


def test_a_kept_alive_connection_serves_again_and_its_next_request_has_the_same_deadline(service: HTTPService) -> None:
    def answer(sock: socket.socket, method: str) -> bytes:
        sock.sendall(f"{method} /healthz HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:")).split(b":")[1])
        while method != "HEAD" and len(body) < length:
            body += sock.recv(65536)
        return head.split(b"\r\n")[0] + b" " + body

    with socket.create_connection(service.address, timeout=10) as sock:
        assert answer(sock, "GET").startswith(b"HTTP/1.1 200 OK {")
        time.sleep(1.5)  # idle, within the keep-alive time (5 s)
        assert answer(sock, "HEAD") == b"HTTP/1.1 200 OK "  # no body after a HEAD
        assert answer(sock, "GET").startswith(b"HTTP/1.1 200 OK {")
        started = time.monotonic()
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")  # the next request, never finished
        assert sock.recv(1024) == b""
        assert 1.9 < time.monotonic() - started < 4


def test_idle_connections_beyond_the_limit_make_room_and_requests_beyond_it_get_503(engine: sa.Engine) -> None:
    with HTTPService(build_app(engine, metrics=False), ("127.0.0.1", free_port()),
                     limits=Limits(max_connections=20, request_seconds=5)) as service:
        idle = [socket.create_connection(service.address, timeout=10) for _ in range(25)]
        try:
            time.sleep(0.2)  # let the server accept them all
            assert _get(f"{service.url}/healthz")[0] == 200  # the 7 idle ones waiting longest made room for it
            assert [sock.recv(1024) for sock in idle[:7]] == [b""] * 7
            assert not any(server_closed(sock) for sock in idle[7:])
        finally:
            for sock in idle:
                sock.close()
        busy = [socket.create_connection(service.address, timeout=10) for _ in range(20)]
        try:  # 20 requests in progress (their bodies never come): none of them is cut for a new one
            for sock in busy:
                sock.sendall(b"POST /corp/ocsp HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
            time.sleep(0.2)
            status, _, body = _get(f"{service.url}/healthz")
            assert (status, body) == (503, b"Service Unavailable")
        finally:
            for sock in busy:
                sock.close()
        time.sleep(0.2)
        assert _get(f"{service.url}/healthz")[0] == 200


def test_a_database_that_never_answers_costs_a_request_its_time_limit(engine: sa.Engine) -> None:
    with socket.socket() as black_hole:  # accepts connections (the kernel's backlog) and never says a word
        black_hole.bind(("127.0.0.1", 0))
        black_hole.listen(16)
        port = black_hole.getsockname()[1]
        silent_db = sa.create_engine(f"postgresql+psycopg://certpilot@127.0.0.1:{port}/inventory?connect_timeout=4")
        with HTTPService(build_app(silent_db, ca=False, metrics=False, request_seconds=1.0),
                         ("127.0.0.1", free_port()), limits=Limits(request_seconds=1.0)) as service:
            started = time.monotonic()
            status, _, body = _get(f"{service.url}/healthz")
            assert (status, body) == (503, b"no answer within 1 s\n")
            assert time.monotonic() - started < 3
            started = time.monotonic()
            assert _get(f"{service.url}/nothing-here")[0] == 404  # the listener itself is still there
            assert time.monotonic() - started < 1
        silent_db.dispose()
    refused = sa.create_engine(f"postgresql+psycopg://certpilot@127.0.0.1:{free_port()}/inventory?connect_timeout=4")
    with HTTPService(build_app(refused, ca=False, metrics=False), ("127.0.0.1", free_port())) as service:
        status, headers, body = _get(f"{service.url}/healthz")
        assert (status, headers["content-type"]) == (503, "application/json")
        assert b'"status": "unavailable"' in body and b"does not answer" in body and b"refused" in body


def test_metrics_carry_the_slis_a_background_task_computed(engine: sa.Engine) -> None:
    """The SLIs are computed at start and then every sli_refresh_seconds, not on every scrape; /metrics
    answers before the first computation ends and carries the gauges after."""
    with write_session(engine) as session:
        ca.init_ca(session, _ring(), audit.Actor("test"), "corp", "http://127.0.0.1:9/")
    _issue(engine, "sli.example.com")  # certificate.added events: audit completeness (M10) has something to count
    with HTTPService(build_app(engine, ca=False, sli_refresh_seconds=3600), ("127.0.0.1", free_port())) as service:
        deadline = time.monotonic() + 15
        while True:
            status, _, body = _get(f"{service.url}/metrics")
            assert status == 200
            found = {s.name: s for f in text_string_to_metric_families(body.decode()) for s in f.samples}
            if "certpilot_sli_audit_completeness_ratio" in found or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    m10 = found["certpilot_sli_audit_completeness_ratio"]
    # Root, issuing CA and leaf were added with their events, but the leaf was signed outside a renewal, so
    # its certificate.issued event is missing: 3 of 4 facts recorded.
    assert (m10.value, m10.labels) == (0.75, {"sli": "M10", "window_seconds": str(30 * 86400)})


def _rss_kib(pid: int) -> int:
    for text in Path(f"/proc/{pid}/status").read_text().splitlines():
        if text.startswith("VmRSS:"):
            return int(text.split()[1])
    raise AssertionError(f"no VmRSS for process {pid}")


def test_exporter_huge_headers_get_431_memory_stays_bounded_and_sigterm_stops_it(engine: sa.Engine) -> None:
    """`certpilot exporter` as an operator runs it: /metrics and /healthz only; huge headers are refused
    without the process growing; SIGTERM stops it cleanly (exit 0)."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "cli", "exporter", "--listen", f"127.0.0.1:{port}"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ})
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if _get(f"http://127.0.0.1:{port}/healthz")[0] == 200:
                    break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline, "certpilot exporter did not start"
                time.sleep(0.1)
        assert _get(f"http://127.0.0.1:{port}/metrics")[0] == 200
        assert _get(f"http://127.0.0.1:{port}/corp/issuing.crl")[0] == 404  # no CA part on the exporter

        answer = _raw(("127.0.0.1", port), b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 60_000 + b"\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 431 ")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:  # the same, a KiB at a time
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            for _ in range(40):
                sock.sendall(b"X-Part: " + b"a" * 1014 + b"\r\n")
                if select.select([sock], [], [], 0.01)[0]:
                    break  # it answered: stop sending
            assert sock.recv(65536).startswith(b"HTTP/1.1 431 ")
        before = _rss_kib(process.pid)

        def flood() -> None:  # 8 MiB of one header, as fast as the server takes it
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                    sock.sendall(b"GET /healthz HTTP/1.1\r\nX-Big: ")
                    for _ in range(128):
                        sock.sendall(b"a" * 65536)
            except OSError:
                pass  # cut off by the server, as it should be

        floods = [threading.Thread(target=flood) for _ in range(40)]  # 320 MiB offered in all
        for thread in floods:
            thread.start()
        for thread in floods:
            thread.join(timeout=30)
        grown = _rss_kib(process.pid) - before
        assert grown < 20 * 1024, f"the exporter grew by {grown} KiB"
        assert _get(f"http://127.0.0.1:{port}/healthz")[0] == 200
    finally:
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    assert "serving /metrics and /healthz on http://127.0.0.1:" in stderr and "Traceback" not in stderr


def test_a_bad_or_taken_listen_address_is_refused(engine: sa.Engine) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        for listen, code, message in (("127.0.0.1:99999", 2, "out of range"),
                                      (f"127.0.0.1:{taken.getsockname()[1]}", 1, "cannot listen on 127.0.0.1:")):
            run = subprocess.run([sys.executable, "-m", "cli", "exporter", "--listen", listen], capture_output=True,
                                 text=True, timeout=60, check=False, env={**os.environ})
            assert run.returncode == code and message in run.stderr, run.stderr
            assert "Traceback" not in run.stderr
