"""certpilot's HTTP listener: ``/healthz``, ``/metrics`` and the private CAs' CRLs, CA certificates and
OCSP, as one ASGI app (Starlette) on uvicorn.

Routes (``build_app``; each part can be left out):

- ``/healthz``: 200 ``{"status": "ok", ...}`` when the inventory database answers, else 503 with why;
- ``/metrics``: the Prometheus exposition of ``certpilot.metrics.render(engine)``, with the SLIs
  (``certpilot_sli_*``) as a background task last computed them (``certpilot.sli.compute`` over
  ``sli_window``, every ``sli_refresh_seconds``: it reads the window's audit trail, too slow for every
  scrape); until the first computation ends, /metrics has no SLI gauges;
- for every CA in the inventory, under ``/<ca name>/`` (after any path prefix of the CA's base URL):
  ``issuing.crt`` and ``root.crt`` (the CA certificates, DER, application/pkix-cert); ``issuing.crl``
  (the current full CRL, DER, application/pkix-crl, reissued first when it is due); ``ocsp``: OCSP
  (RFC 6960) by POST (application/ocsp-request) and by GET with the base64 request in the path
  (``ocsp/<base64>``, RFC 6960 appendix A), answered application/ocsp-response.

Plain HTTP on purpose: every CA answer is signed, and clients fetch these while validating TLS. A
malformed OCSP request gets a malformedRequest response, never a traceback. The issuing key of each CA
is decrypted once, into a ``certpilot.ca.CASigner`` that the app keeps until it stops, and is never
logged or sent. While the app runs, a background task reissues CRLs before their nextUpdate.

Limits (``Limits``), so that no client can take the listener away from the others: a request's head
and body must arrive within ``request_seconds`` of its first byte (or of the connection, for one that
sends nothing), else the connection is closed (uvicorn by itself only times out idle keep-alive
connections); a head larger than ``max_header_bytes`` gets 431 and the connection is closed (memory
stays bounded); an answer not started within ``request_seconds`` is a 503; a client that takes none
of its answer for ``request_seconds`` is cut off; at ``max_connections`` open connections, a new
request closes the connections waiting longest for a request of their own, and beyond
``max_connections`` requests in progress uvicorn answers 503; OCSP request bodies are at most 16 KiB
(413 beyond). A client that half-closes after its request still gets the answer.

``HTTPService`` runs the app: ``await serve()`` in the caller's event loop (``certpilot serve``, beside
Prefect's runner), or ``start()``/``stop()`` in a thread of its own (tests, ``ca serve``). It installs
no signal handlers: the caller decides when to stop.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import datetime as dt
import json
import logging
import re
import socket
import struct
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio.to_thread
import h11
import sqlalchemy as sa
import uvicorn
from cryptography.hazmat.primitives import serialization
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from certpilot import audit, ca, keystore, metrics as exposition, sli
from certpilot.clock import utcnow
from certpilot.database import read_session
from certpilot.errors import CertpilotError, NotFoundError, redact
from connectors import kms
from connectors.private_ca import open_token

__all__ = ["MAX_OCSP_REQUEST_BYTES", "Answer", "CAResponder", "HTTPService", "Limits", "build_app", "parse_listen"]

log = logging.getLogger("certpilot.http")

MAX_OCSP_REQUEST_BYTES = 16 * 1024  # an OCSP request for one certificate is about 100 bytes
DEFAULT_PORT = 8180
_CA_PATH = re.compile(r"^(?P<prefix>(?:/[^/]+)*?)/(?P<ca>[A-Za-z0-9][A-Za-z0-9._-]{0,63})/"
                      r"(?P<resource>issuing\.crt|root\.crt|issuing\.crl|ocsp)(?:/(?P<rest>.*))?$")
_CACHE_SECONDS = 300
_TEXT = "text/plain; charset=utf-8"
T = TypeVar("T")


def parse_listen(text: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """``host:port``, ``[v6]:port``, ``host`` or ``:port`` -> (host, port)."""
    text = text.strip()
    match = re.fullmatch(r"\[(?P<v6>[^\]]+)\](?::(?P<p6>\d+))?|(?P<host>[^:\[\]]*)(?::(?P<port>\d+))?", text)
    if not match:
        raise ValueError(f"{text!r} is not HOST:PORT")
    host = match.group("v6") or match.group("host") or "127.0.0.1"
    port = int(match.group("p6") or match.group("port") or default_port)
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is out of range")
    return host, port


@dataclass(frozen=True)
class Limits:
    """What one client may take of the listener."""

    max_connections: int = 1000  # open connections (the idle ones longest waiting make room) and requests (503)
    max_header_bytes: int = 16 * 1024  # request line and headers; a longer head gets 431 and is cut off
    keep_alive_seconds: int = 5  # an idle kept-alive connection is closed after this
    request_seconds: float = 10.0  # to receive one request, and again to answer it

    def __post_init__(self) -> None:
        if self.max_connections < 1 or self.max_header_bytes < 1024 or self.keep_alive_seconds < 1:
            raise ValueError(f"limits out of range: {self}")
        if self.request_seconds <= 0:
            raise ValueError(f"request_seconds must be positive, not {self.request_seconds}")


@dataclass(frozen=True)
class Answer:
    """One HTTP answer, whatever serves it."""

    status: int
    content_type: str
    body: bytes
    headers: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def text(cls, status: int, text: str) -> Answer:
        return cls(status, _TEXT, text.encode() + b"\n")


# ------------------------------------------------------------------------------------------ the CAs

class CAResponder:
    """Answers for every CA in the inventory: CRLs, CA certificates and OCSP, by path. Thread-safe;
    ``close()`` lets the decrypted issuing keys go."""

    def __init__(self, engine: sa.Engine, key_ring: Callable[[], keystore.KeyRing], *,
                 actor: audit.Actor | None = None, clock: Callable[[], dt.datetime] | None = None) -> None:
        self.engine = engine
        self._key_ring = key_ring
        self._actor = actor or audit.Actor("ca-server")
        self._clock = clock or utcnow
        self._signers: dict[str, ca.CASigner] = {}
        self._certificates: dict[tuple[str, str], bytes] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._signers.clear()

    def refresh_crls(self) -> list[str]:
        """Reissue every CRL that is due; errors are logged, not raised (the refresher must go on)."""
        try:
            done = ca.refresh_crls(self.engine, self._key_ring(), self._actor, now=self._clock(), tokens=open_token)
        except Exception as exc:
            log.error("reissuing CRLs failed: %s", redact(exc))
            return []
        for name in done:
            log.info("issued a new CRL for CA %s", name)
        return done

    def answer(self, method: str, path: str, body: bytes | None) -> Answer | None:
        """The answer to ``method`` on ``path`` (raw, before percent-decoding), or None when the path
        is none of a CA's."""
        match = _CA_PATH.match(path)
        if match is None:
            return None
        name, resource, rest = match.group("ca"), match.group("resource"), match.group("rest")
        try:
            if resource == "ocsp":
                return self._ocsp(method, name, rest, body)
            if rest is not None:
                return Answer.text(404, "not found")
            if method not in ("GET", "HEAD"):
                return Answer.text(405, "use GET")
            if resource == "issuing.crl":
                der = ca.current_crl(self.engine, self._key_ring, self._actor, name, now=self._clock(),
                                     tokens=open_token)
                return Answer(200, "application/pkix-crl", der, {"Cache-Control": f"public, max-age={_CACHE_SECONDS}"})
            der = self._certificate(name, "root" if resource == "root.crt" else "issuing")
            return Answer(200, "application/pkix-cert", der, {"Cache-Control": "public, max-age=86400"})
        except NotFoundError:
            return Answer.text(404, f"no CA named {name}")
        except CertpilotError as exc:
            log.error("CA %s: %s", name, redact(exc))
            return Answer.text(503, "the CA cannot answer now")

    def _signer(self, name: str) -> ca.CASigner:
        with self._lock:
            signer = self._signers.get(name)
            if signer is None:
                with read_session(self.engine) as session:
                    signer = self._signers[name] = ca.open_signer(session, self._key_ring(), name, tokens=open_token)
            return signer

    def _certificate(self, name: str, which: str) -> bytes:
        key = (name, which)
        der = self._certificates.get(key)
        if der is None:
            with read_session(self.engine) as session:
                root, issuing = ca.ca_certificates(session, ca.get_ca(session, name))
            der = (root if which == "root" else issuing).public_bytes(serialization.Encoding.DER)
            self._certificates[key] = der
        return der

    def _ocsp(self, method: str, name: str, rest: str | None, body: bytes | None) -> Answer:
        if method == "POST":
            if rest:
                return Answer.text(404, "not found")
            request_der: bytes | None = body or b""
        elif method in ("GET", "HEAD"):
            if not rest:
                return Answer.text(405, "POST an OCSP request, or GET /ocsp/<base64 request>")
            request_der = _decode_get(rest)
        else:
            return Answer.text(405, "use POST or GET")
        signer = self._signer(name)
        if request_der is None or len(request_der) > MAX_OCSP_REQUEST_BYTES:
            response = ca.malformed_ocsp_response()
        else:
            with read_session(self.engine) as session:
                response = ca.respond_ocsp(session, signer, request_der, now=self._clock())
        headers = {}
        if method != "POST":
            headers["Cache-Control"] = f"public, max-age={_CACHE_SECONDS}, no-transform, must-revalidate"
        return Answer(200, "application/ocsp-response", response, headers)


def _decode_get(rest: str) -> bytes | None:
    """The DER request from ``ocsp/<url-encoded base64>``; None when it is not base64."""
    text = urllib.parse.unquote(rest)
    text = text.replace(" ", "+")  # a '+' that something decoded as a space
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None


# ------------------------------------------------------------------------------------------ the app

async def _in_thread(function: Callable[[], T]) -> T:
    """Blocking work (the database, signing) off the event loop; a request's time limit abandons it."""
    return await anyio.to_thread.run_sync(function, abandon_on_cancel=True)


def _response(answer: Answer, method: str) -> Response:
    response = Response(b"" if method == "HEAD" else answer.body, answer.status, dict(answer.headers),
                        media_type=answer.content_type)
    if method == "HEAD":
        response.headers["Content-Length"] = str(len(answer.body))
    return response


def _json(status: int, data: dict[str, Any]) -> Response:
    return Response(json.dumps(data, sort_keys=True) + "\n", status, media_type="application/json")


METRICS_REUSE_SECONDS = 0.0  # scrapes share a render in progress; a later one sees the inventory as it is then


class _SharedRender:
    """One render of /metrics shared by every request that asks while it is made or within ``reuse`` seconds
    after: a hundred scrapes at once (or clients pipelining them) cost one render and one copy in memory."""

    def __init__(self, render: Callable[[], bytes], reuse: float) -> None:
        self._render, self._reuse = render, reuse
        self._pending: asyncio.Future[bytes] | None = None
        self._done: tuple[float, bytes] | None = None

    async def get(self) -> bytes:
        loop = asyncio.get_running_loop()
        if self._done is not None and loop.time() - self._done[0] < self._reuse:
            return self._done[1]
        if self._pending is None:
            self._pending = loop.create_future()
            pending = self._pending
            try:
                body = await _in_thread(self._render)
            except BaseException as exc:
                if isinstance(exc, asyncio.CancelledError):
                    pending.cancel()
                else:
                    pending.set_exception(exc)
                    pending.exception()  # retrieved: the waiters (if any) raise it, never "never retrieved"
                raise
            finally:
                self._pending = None
            self._done = (loop.time(), body)
            pending.set_result(body)
            return body
        return await asyncio.shield(self._pending)


def build_app(engine: sa.Engine, *, ca: bool = True, metrics: bool = True,
              key_ring: Callable[[], keystore.KeyRing] | None = None, actor: audit.Actor | None = None,
              clock: Callable[[], dt.datetime] | None = None, request_seconds: float = Limits.request_seconds,
              crl_refresh_seconds: float = 600.0, sli_refresh_seconds: float = 300.0,
              sli_window: dt.timedelta = dt.timedelta(days=30)) -> ASGIApp:
    """The ASGI app: ``/healthz`` always, ``/metrics`` if ``metrics``, the CAs' URLs if ``ca`` (with
    ``key_ring`` giving the master key when an issuing key must be decrypted; by default the configured
    one). Each answer must be ready within ``request_seconds`` (503 otherwise)."""
    from certpilot.settings import load_settings

    responder = CAResponder(engine, key_ring or kms.key_ring_loader(load_settings()),
                            actor=actor, clock=clock) if ca else None

    async def healthz(request: Request) -> Response:
        def check() -> None:
            with engine.connect() as connection:
                connection.execute(sa.text("SELECT 1"))

        served = {"ca": ca, "metrics": metrics}
        try:
            await _in_thread(check)
        except Exception as exc:
            log.error("healthz: the inventory database does not answer: %s", redact(exc))
            return _json(503, {"status": "unavailable", "inventory": f"does not answer: {redact(exc)}", **served})
        return _json(200, {"status": "ok", "inventory": "ok", **served})

    slis: list[sli.SliReport] = []  # the latest computation, once there is one

    def compute_slis() -> None:
        with read_session(engine) as session:
            slis[:] = [sli.compute(session, sli_window, (clock or utcnow)())]

    rendering = _SharedRender(lambda: exposition.render(engine, sli=slis[0] if slis else None), METRICS_REUSE_SECONDS)

    async def metrics_endpoint(request: Request) -> Response:
        return Response(await rendering.get(), 200, media_type=exposition.CONTENT_TYPE)

    async def ca_endpoint(request: Request) -> Response:
        assert responder is not None
        method = request.method
        body: bytes | None = None
        if method == "POST":
            length = request.headers.get("content-length")
            if length is None or not length.isdigit():
                return _response(Answer.text(411, "a POST needs a Content-Length"), method)
            if int(length) > MAX_OCSP_REQUEST_BYTES:
                return _response(Answer.text(413, f"request body over {MAX_OCSP_REQUEST_BYTES} bytes"), method)
            try:
                body = await request.body()  # h11 holds the client to its Content-Length
            except ClientDisconnect:  # cut off for sending too slowly (logged), or gone: no one to answer
                return _response(Answer.text(400, "the client went away"), method)
        raw_path = request.scope.get("raw_path") or request.url.path.encode()
        path = urllib.parse.urlsplit(raw_path.decode("latin-1")).path
        answer = await _in_thread(lambda: responder.answer(method, path, body))
        return _response(answer or Answer.text(404, "not found"), method)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        background = []
        if responder is not None:
            await _in_thread(responder.refresh_crls)
            background.append(asyncio.create_task(_every(crl_refresh_seconds, responder.refresh_crls, "CRLs", False),
                                                  name="ca-crl-refresh"))
        if metrics:
            background.append(asyncio.create_task(_every(sli_refresh_seconds, compute_slis, "SLIs", True),
                                                  name="sli-refresh"))
        try:
            yield
        finally:
            for task in background:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if responder is not None:
                responder.close()  # let the decrypted keys go

    routes = [Route("/healthz", healthz, methods=["GET"])]
    if metrics:
        routes.append(Route("/metrics", metrics_endpoint, methods=["GET"]))
    if ca:
        routes.append(Route("/{path:path}", ca_endpoint, methods=["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"]))
    return _TimeLimit(Starlette(routes=routes, lifespan=lifespan), request_seconds)


async def _every(interval: float, work: Callable[[], Any], what: str, at_once: bool) -> None:
    """Run ``work`` in a thread every ``interval`` seconds (first at once if ``at_once``); a failure is
    logged and tried again at the next interval."""
    if not at_once:
        await asyncio.sleep(interval)
    while True:
        try:
            await _in_thread(work)
        except Exception as exc:  # noqa: BLE001 - a background refresh must outlive one failure
            log.error("refreshing the %s failed (tried again in %.0f s): %s", what, interval, redact(exc))
        await asyncio.sleep(interval)


class _TimeLimit:
    """ASGI middleware: an answer not started within ``seconds`` becomes a 503. Once started, the answer
    is written as fast as the client takes it; a client that takes nothing of it for ``seconds`` is cut
    off by the connection (``_BoundedH11``), not here (cutting a started answer here would log uvicorn's
    traceback, and would cut off a slow client that is still reading)."""

    def __init__(self, app: ASGIApp, seconds: float) -> None:
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False
        limit = asyncio.timeout(self.seconds)

        async def send_tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                limit.reschedule(None)
            await send(message)

        try:
            async with limit:
                await self.app(scope, receive, send_tracked)
        except TimeoutError:
            log.warning("%s %s took over %.1f s: abandoned", scope["method"], scope["path"], self.seconds)
            if not started:
                await Response(f"no answer within {self.seconds:g} s\n", 503, media_type=_TEXT)(scope, receive, send)


# ------------------------------------------------------------------------------------------ the server

class _BoundedH11(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with more limits, and answers for half-closed connections.

    A deadline for receiving each request: a connection that sends nothing, or sends a request's head
    or body too slowly, is closed ``read_seconds`` after it opened or after the request's first bytes
    (uvicorn times out idle kept-alive connections only). A head (request line and headers) longer
    than ``max_head_bytes`` gets 431 and the connection is closed, however it arrives (h11's own limit
    applies only to a head still incomplete after a read, so a large head read at once would pass).

    A deadline for sending: a client that takes none of what is waiting for it for ``read_seconds`` is
    cut off with a reset, its buffered answer freed (in the process and in the kernel). Without it, a
    client that asked for a large answer (or pipelined many) and never read held its connection and
    the answer's memory until it went away: closing waits for the buffer to drain. The transport
    buffers nothing before telling the protocol to pause (high-water mark 0), so "paused" means "the
    client's window is full", and every such wait is watched.

    At ``max_connections``, a whole request that arrives closes the connections waiting longest for a
    request of their own (idle, silent or sending a head slowly) to make room, rather than get a 503:
    idle connections, which cost an attacker nothing, cannot keep well-behaved clients out. Requests in
    progress are never cut; beyond ``max_connections`` of those, uvicorn answers 503.

    A client that half-closes (``shutdown(SHUT_WR)``) after its request gets its answer (and those of
    requests it pipelined before), then the connection is closed; uvicorn by itself closed it at once."""

    read_seconds: float = Limits.request_seconds
    max_head_bytes: int = Limits.max_header_bytes
    _deadline: asyncio.TimerHandle | None = None
    _write_deadline: asyncio.TimerHandle | None = None
    _waiting_since: float = 0.0  # when it began waiting for its next request (loop time)
    _eof: bool = False  # the client half-closed: answer what it sent, then close

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        transport.set_write_buffer_limits(high=0)  # pause_writing as soon as the kernel takes no more
        self._waiting_since = self.loop.time()
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:  # reading a request's head
            if self._deadline is None:
                self._arm()  # the next request on a kept-alive connection begins
            if self._head_too_large(data):
                self._refuse(431, "Request Header Fields Too Large",
                             f"request line and headers over {self.max_head_bytes} bytes")
                return
        super().data_received(data)
        if self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
            self._disarm()  # received whole (or the connection is done)

    def handle_events(self) -> None:
        limit = self.limit_concurrency
        if (limit is not None and len(self.connections) >= limit and self.conn.their_state is h11.IDLE
                and b"\r\n\r\n" in self.conn.trailing_data[0]):  # a whole head to serve (maybe pipelined)
            self._make_room(len(self.connections) - limit + 1)
        super().handle_events()

    def eof_received(self) -> bool | None:  # type: ignore[override]
        if self.cycle is not None and not self.cycle.response_complete and self.conn.their_state is not h11.SEND_BODY:
            self._eof = True  # a whole request (and any pipelined after it) to answer first
            return True  # keep the transport open for writing
        return None  # nothing asked, or a request cut short: close

    def on_response_complete(self) -> None:
        super().on_response_complete()  # starts any pipelined request
        self._waiting_since = self.loop.time()
        if self._eof and (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
            with contextlib.suppress(h11.LocalProtocolError):
                self.conn.send(h11.ConnectionClosed())
            self.transport.close()  # all answered

    def pause_writing(self) -> None:
        super().pause_writing()
        self._watch_writes(self.transport.get_write_buffer_size())

    def resume_writing(self) -> None:
        self._unwatch_writes()
        super().resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._unwatch_writes()
        super().connection_lost(exc)

    def _waiting_for_request(self) -> bool:
        return ((self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing()
                and self.conn.their_state is h11.IDLE)

    def _make_room(self, count: int) -> None:
        waiting = sorted((c for c in self.connections if isinstance(c, _BoundedH11) and c is not self
                          and c._waiting_for_request()), key=lambda c: c._waiting_since)[:count]
        for connection in waiting:
            self.connections.discard(connection)  # now: uvicorn counts them before the transport is gone
            connection.transport.abort()
        if waiting:
            log.info("%d open connections (the limit): closed the %d waiting longest for a request",
                     len(self.connections) + len(waiting), len(waiting))

    def _watch_writes(self, buffered: int) -> None:
        self._unwatch_writes()
        self._write_deadline = self.loop.call_later(self.read_seconds, self._writes_checked, buffered)

    def _unwatch_writes(self) -> None:
        if self._write_deadline is not None:
            self._write_deadline.cancel()
            self._write_deadline = None

    def _writes_checked(self, buffered_before: int) -> None:
        self._write_deadline = None
        buffered = self.transport.get_write_buffer_size()
        if not buffered:
            return
        if buffered < buffered_before:  # it is reading, slowly: watch again
            self._watch_writes(buffered)
            return
        log.info("%s: took none of its answer (%d bytes waiting) for %.1f s: connection reset", self._peer(),
                 buffered, self.read_seconds)
        sock = self.transport.get_extra_info("socket")
        if sock is not None:  # RST, so the kernel drops what it still holds for this client too
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    def _head_too_large(self, data: bytes) -> bool:
        buffered = self.conn.trailing_data[0]  # the head so far (h11 keeps it under max_head_bytes)
        if len(buffered) + len(data) <= self.max_head_bytes:
            return False
        return b"\r\n\r\n" not in (buffered + data)[:self.max_head_bytes]

    def _refuse(self, status: int, reason: str, text: str) -> None:
        body = text.encode() + b"\n"
        self.transport.write(b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n"
                             b"Connection: close\r\n\r\n%s" % (status, reason.encode(), len(body), body))
        self.transport.close()
        self._disarm()
        log.info("%s: %s: connection closed", self._peer(), text)

    def _peer(self) -> str:
        return "%s:%d" % self.client if self.client else "a client"

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.read_seconds, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            log.info("%s: no whole request within %.1f s: connection closed", self._peer(), self.read_seconds)
            self.transport.close()


class _Server(uvicorn.Server):
    """uvicorn's server without its signal handling: whoever runs it decides when it stops."""

    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield


def _bind(host: str, port: int) -> socket.socket:
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP, and without it
    # every answer waits about 40 ms for the client's delayed ACK (a head and a body are two writes)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class HTTPService:
    """``app`` on uvicorn at ``listen``, within ``limits``. The socket is bound here (an OSError says
    when the address is taken), so ``address`` and ``url`` are known before it serves."""

    def __init__(self, app: ASGIApp, listen: tuple[str, int] = ("127.0.0.1", DEFAULT_PORT), *,
                 limits: Limits = Limits()) -> None:
        self.limits = limits
        self._socket = _bind(*listen)
        protocol = type("BoundedH11", (_BoundedH11,), {"read_seconds": limits.request_seconds,
                                                        "max_head_bytes": limits.max_header_bytes})
        self._config = uvicorn.Config(
            app, http=protocol, lifespan="on", log_config=None, access_log=True, server_header=False,
            limit_concurrency=limits.max_connections, h11_max_incomplete_event_size=limits.max_header_bytes,
            timeout_keep_alive=limits.keep_alive_seconds, timeout_graceful_shutdown=5)
        self._server = _Server(self._config)
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._socket.getsockname()[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    @property
    def started(self) -> bool:
        return self._server.started

    async def serve(self) -> None:
        """Serve until ``stop()``; the lifespan (the CRL refresher) starts and ends with it."""
        try:
            await self._server.serve(sockets=[self._socket])
        finally:
            self._socket.close()

    def stop(self) -> None:
        """Ask the server to stop (from any thread); ``serve()`` returns once it has."""
        self._server.should_exit = True

    def start(self, timeout: float = 30.0) -> HTTPService:
        """Serve in a thread of its own; returns once it accepts connections."""
        if self._thread is not None:
            raise RuntimeError(f"the HTTP listener on {self.url} is already started")
        self._thread = threading.Thread(target=lambda: asyncio.run(self.serve()), name="certpilot-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self._server.started:
            self.close()
            raise RuntimeError(f"the HTTP listener on {self.url} did not start within {timeout:g} s")
        return self

    def close(self) -> None:
        """Stop a server that ``start()`` started and wait for its thread."""
        self.stop()
        if self._thread is not None:
            self._thread.join(timeout=15)
            self._thread = None
        self._socket.close()

    def __enter__(self) -> HTTPService:
        return self if self._thread is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
