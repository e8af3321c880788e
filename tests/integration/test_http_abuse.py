"""certpilot's HTTP listener against hostile clients (lab/hostile_clients.py), on loopback, in each of the
shapes certpilot runs it: `certpilot serve` (CA URLs, /metrics, /healthz), `certpilot exporter` (/metrics,
/healthz) and `certpilot ca serve` (CA URLs, /healthz). test_http_service.py has the single limits
(silent and slowloris clients cut off, 431, 413, the limit on connections); here: clients that never
read their answer, clients that half-close, and everything at once while a well-behaved client still
gets correct answers in time."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

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
from connectors.http_service import HTTPService, Limits, build_app
from connectors.private_ca import PrivateCAIssuer
from lab import hostile_clients as hostile
from lab.ports import free_port

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)

SECONDS = 1.5  # the listeners' request time limit here (10 s by default)


def _ring() -> keystore.KeyRing:
    return keystore.load_key_ring(load_settings())


def _get(url: str, method: str = "GET", data: bytes | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/ocsp-request"} if data else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


@contextlib.contextmanager
def _listener(engine: sa.Engine, *, ca_part: bool, metrics: bool, max_connections: int = 1000) -> Iterator[HTTPService]:
    with HTTPService(build_app(engine, ca=ca_part, metrics=metrics, key_ring=_ring, request_seconds=SECONDS),
                     ("127.0.0.1", free_port()), limits=Limits(request_seconds=SECONDS,
                                                               max_connections=max_connections)) as service:
        yield service


def _corp_with_leaves(engine: sa.Engine, base_url: str, count: int) -> tuple[x509.Certificate, list[x509.Certificate]]:
    """CA "corp" at ``base_url`` and ``count`` leaves recorded in the inventory: (issuing CA, leaves)."""
    with write_session(engine) as session:
        ca.init_ca(session, _ring(), audit.Actor("test"), "corp", base_url)
    issuer, key = PrivateCAIssuer(engine, "corp", _ring), ec.generate_private_key(ec.SECP256R1())
    chains = [issuer.issue(build_csr(key, [f"host{i}.example.com"]), "tls-server").chain for i in range(count)]
    with write_session(engine) as session:
        inventory.upsert(session, [inventory.Observation(describe_certificate(c), None, "issued")
                                   for chain in chains for c in chain[:1]], audit.Actor("test"))
        issuing = ca.ca_certificates(session, ca.get_ca(session, "corp"))[1]
    return issuing, [chain[0] for chain in chains]


def _ocsp_request(leaf: x509.Certificate, issuing: x509.Certificate) -> bytes:
    return ocsp.OCSPRequestBuilder().add_certificate(leaf, issuing, hashes.SHA256()).build().public_bytes(
        serialization.Encoding.DER)


def _crl_valid(der: bytes, issuing: x509.Certificate) -> bool:
    return x509.load_der_x509_crl(der).is_signature_valid(issuing.public_key())  # type: ignore[arg-type]


def _assert_good_ocsp(body: bytes, leaf: x509.Certificate, issuing: x509.Certificate) -> None:
    response = ocsp.load_der_ocsp_response(body)
    assert response.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
    assert (response.certificate_status, response.serial_number) == (ocsp.OCSPCertStatus.GOOD, leaf.serial_number)
    issuing.public_key().verify(response.signature, response.tbs_response_bytes,  # type: ignore[call-arg, union-attr]
                                ec.ECDSA(response.signature_hash_algorithm))  # type: ignore[arg-type]


def test_a_half_closed_client_gets_its_answers(engine: sa.Engine) -> None:
    """curl-like clients that shutdown(SHUT_WR) after their request: uvicorn alone closed at once, unanswered."""
    with _listener(engine, ca_part=True, metrics=True) as service:
        issuing, (leaf,) = _corp_with_leaves(engine, service.url, 1)
        healthz = hostile.half_closed(service.address, hostile.request("GET", "/healthz"))
        assert healthz.closed and healthz.answers()[0][0] == 200 and b'"status": "ok"' in healthz.answers()[0][1]
        crl = hostile.half_closed(service.address, hostile.request("GET", "/corp/issuing.crl"))
        assert _crl_valid(crl.answers()[0][1], issuing)
        pipelined = (hostile.request("POST", "/corp/ocsp", _ocsp_request(leaf, issuing))
                     + hostile.request("GET", "/metrics"))
        answers = hostile.half_closed(service.address, pipelined).answers()
        assert [status for status, _ in answers] == [200, 200]
        _assert_good_ocsp(answers[0][1], leaf, issuing)
        assert f'serial_number="{leaf.serial_number}"'.encode() in answers[1][1]
        cut_short = hostile.half_closed(service.address, b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # no blank line
        assert (cut_short.closed, cut_short.data) == (True, b"") and cut_short.seconds < SECONDS - 0.5


def test_clients_that_never_read_their_answers_are_cut_off_and_free_what_they_held(
        engine: sa.Engine, caplog: pytest.LogCaptureFixture) -> None:
    """Pipelined /metrics on connections whose window is full: without a deadline for sending, each held its
    connection (and the answers' memory) until the client went away, and uvicorn logged a traceback."""
    caplog.set_level(logging.INFO)
    with _listener(engine, ca_part=False, metrics=True) as service:
        _corp_with_leaves(engine, "http://127.0.0.1:9/", 20)
        size = len(_get(f"{service.url}/metrics")[1])
        pipeline = hostile.request("GET", "/metrics") * (6_000_000 // size + 1)  # more than the kernel buffers
        socks = []
        try:
            for _ in range(3):
                sock = hostile.connect(service.address, receive_buffer=4096)
                sock.sendall(pipeline[:60_000])  # one read's worth: the rest waits behind the answers
                socks.append(sock)
            deadline = time.monotonic() + 5
            while hostile.held_connections(os.getpid(), service.address[1]) < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert hostile.held_connections(os.getpid(), service.address[1]) == 3
            status, body = _get(f"{service.url}/healthz")  # the listener serves others meanwhile
            assert status == 200
            deadline = time.monotonic() + 3 * SECONDS + 5
            while hostile.held_connections(os.getpid(), service.address[1]) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert hostile.held_connections(os.getpid(), service.address[1]) == 0, "a non-reader is still held"
            assert all(hostile.server_closed(sock) for sock in socks)
        finally:
            for sock in socks:
                sock.close()
    assert "took none of its answer" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize("shape", ["serve", "exporter", "ca serve"])
def test_a_good_client_is_served_correctly_while_everything_hostile_happens_at_once(
        engine: sa.Engine, shape: str, caplog: pytest.LogCaptureFixture) -> None:
    """Slowloris heads and bodies, many small and one huge header, idle connections beyond the limit,
    pipelined requests and non-readers all at once; meanwhile /healthz, a CRL, OCSP and /metrics (each
    where that listener serves it) answer in time and correctly, and every hostile connection is let go."""
    ca_part, metrics = shape != "exporter", shape != "ca serve"
    limit = 100
    with _listener(engine, ca_part=ca_part, metrics=metrics, max_connections=limit) as service:
        issuing, leaves = _corp_with_leaves(engine, service.url, 3)
        address, stop = service.address, threading.Event()
        outcomes: dict[str, list[hostile.Outcome]] = {}

        def repeat(name: str, attack: object) -> None:
            while not stop.is_set():
                outcomes.setdefault(name, []).append(attack())  # type: ignore[operator]

        attacks = {
            "slow head": lambda: hostile.slow_head(address, interval=0.05, wait=3 * SECONDS),
            "many headers": lambda: hostile.many_headers(address, count=3000, wait=3 * SECONDS),
            "huge header": lambda: hostile.huge_header(address, size=4 << 20, wait=3 * SECONDS),
            "pipelined": lambda: hostile.pipelined(address, [hostile.request("GET", "/healthz")] * 50
                                                   + [hostile.request("GET", "/healthz", close=True)],
                                                   wait=3 * SECONDS),
        }
        if ca_part:  # the only route that takes a body
            attacks["slow body"] = lambda: hostile.slow_body(address, "/corp/ocsp", b"\x30" * 500, interval=0.05,
                                                             wait=3 * SECONDS)
        threads = [threading.Thread(target=repeat, args=item, daemon=True) for item in attacks.items()]
        with hostile.idle_connections(address, limit + 20), \
                hostile.idle_connections(address, 20, first=b"GET /healthz HTTP/1.1\r\nHost: x\r\n"), \
                hostile.non_readers(address, "/metrics" if metrics else "/corp/issuing.crl", 5):
            for thread in threads:
                thread.start()
            time.sleep(0.3)
            try:
                for round_ in range(3):
                    started = time.monotonic()
                    status, body = _get(f"{service.url}/healthz")
                    assert (status, body) == (200, f'{{"ca": {str(ca_part).lower()}, "inventory": "ok", "metrics": '
                                                   f'{str(metrics).lower()}, "status": "ok"}}\n'.encode())
                    if ca_part:
                        status, body = _get(f"{service.url}/corp/issuing.crl")
                        assert status == 200
                        assert _crl_valid(body, issuing)
                        leaf = leaves[round_]
                        status, body = _get(f"{service.url}/corp/ocsp", "POST", _ocsp_request(leaf, issuing))
                        assert status == 200
                        _assert_good_ocsp(body, leaf, issuing)
                    if metrics:
                        status, body = _get(f"{service.url}/metrics")
                        assert status == 200
                        serials = {s.labels["serial_number"] for f in text_string_to_metric_families(body.decode())
                                   if f.name == "x509_cert_not_after" for s in f.samples}
                        assert {str(leaf.serial_number) for leaf in leaves} <= serials
                    assert time.monotonic() - started < 5, f"round {round_} took {time.monotonic() - started:.1f} s"
                    time.sleep(0.2)
            finally:
                stop.set()
                for thread in threads:
                    thread.join(timeout=30)
        assert all(not thread.is_alive() for thread in threads)
    for name in ("slow head", "slow body") if ca_part else ("slow head",):  # cut off at the time limit, unanswered
        assert all(o.closed and o.status is None and o.seconds < SECONDS + 4 for o in outcomes[name]), name
    assert {o.status for o in outcomes["many headers"] + outcomes["huge header"]} == {431}
    assert all([s for s, _ in o.answers()] == [200] * 51 for o in outcomes["pipelined"])
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]
