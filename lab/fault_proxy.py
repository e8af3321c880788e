"""A loopback fault-injecting proxy for tests and benchmarks: put it between certpilot and a server it talks
to (an ACME CA, an SSH host, a cloud API stand-in) and it breaks some of the traffic on purpose.

    faults = Faults(reset=0.1, status_5xx=0.1, status_429=0.1)
    with FaultProxy(upstream=("127.0.0.1", pebble.port), faults=faults, seed=7, mode="http",
                    tls=(cert_path, key_path), upstream_ca=pebble.ca_bundle) as proxy:
        proxy.url                # https://127.0.0.1:PORT: the client talks to this instead of the server
        proxy.set_faults(Faults())   # heal the link
        proxy.stats              # FaultStats(connections=..., requests=..., injected={"reset": 3, ...})

Modes:
- ``tcp``: a fault is drawn per accepted connection, then the bytes are piped both ways unchanged (TLS passes
  through end to end). ``status_5xx`` and ``status_429`` need HTTP and are refused here.
- ``http``: HTTP/1.1 with keep-alive; a fault is drawn per request. With ``tls`` the proxy terminates TLS with
  that certificate; with ``upstream_ca`` it speaks TLS to the upstream and checks its certificate against that
  bundle. Requests and responses are forwarded byte for byte, the Host header included, so a server that
  builds its URLs from Host (pebble does) hands out URLs on the proxy and the client never leaves it.

The faults (``Faults``: probabilities 0..1, at most one per connection or request, drawn from
``random.Random(seed)``, so the same seed and the same sequence of connections or requests give the same
faults): ``reset`` closes the client's connection with a RST before anything is forwarded; ``delay`` waits
``delay_seconds`` then forwards; ``black_hole`` reads and never answers, holding the connection until the
client gives up or the proxy stops; ``truncate`` forwards the request, then only part of the response (half
of it in HTTP mode, ``truncate_after`` bytes or a drawn 1..1024 in TCP mode) and closes: the server acted,
the client never heard; ``status_5xx`` answers 502, 503 or 504 without forwarding; ``status_429`` answers 429
with ``Retry-After: retry_after``. In HTTP mode ``only(method, path)`` aims the faults: other requests are
forwarded untouched and draw nothing.

Loopback only: the listening and upstream addresses must be loopback (ValueError otherwise). Threads, one per
connection, at most ``max_connections`` at once (more are closed at accept); every socket has a timeout;
``stop()`` (or leaving the ``with``) closes every connection and joins the threads.
"""

from __future__ import annotations

import ipaddress
import json
import random
import selectors
import socket
import ssl
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Literal

from lab.ports import free_port

KINDS = ("reset", "delay", "black_hole", "truncate", "status_5xx", "status_429")
HTTP_ONLY_KINDS = ("status_5xx", "status_429")
MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 64 * 1024 * 1024
POLL_SECONDS = 0.2  # how often a held or piping connection looks at the stop flag


@dataclass(frozen=True)
class Faults:
    """What to break, and how often: each probability is 0..1 and together they sum to at most 1."""

    reset: float = 0.0
    delay: float = 0.0
    delay_seconds: float = 0.5
    black_hole: float = 0.0
    truncate: float = 0.0
    truncate_after: int | None = None  # TCP mode: bytes of the response forwarded before closing
    status_5xx: float = 0.0
    status_429: float = 0.0
    retry_after: int = 1
    only: Callable[[str, str], bool] | None = field(default=None, compare=False)  # HTTP: (method, path) -> aim

    def __post_init__(self) -> None:
        for kind in KINDS:
            value = getattr(self, kind)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"Faults.{kind} is a probability between 0 and 1, not {value!r}")
        if sum(getattr(self, kind) for kind in KINDS) > 1.0 + 1e-9:
            raise ValueError("the fault probabilities add up to more than 1")
        if self.delay_seconds < 0 or self.retry_after < 0:
            raise ValueError("delay_seconds and retry_after cannot be negative")
        if self.truncate_after is not None and self.truncate_after < 0:
            raise ValueError("truncate_after cannot be negative")

    def pick(self, draw: float) -> str | None:
        """The fault a uniform draw in [0, 1) lands on, or None."""
        edge = 0.0
        for kind in KINDS:
            edge += getattr(self, kind)
            if draw < edge:
                return kind
        return None


@dataclass(frozen=True)
class FaultStats:
    """A snapshot: connections accepted, HTTP requests read, faults injected by kind, upstream failures (the
    proxy could not reach or read the upstream and answered 502 itself, or closed the connection)."""

    connections: int
    requests: int
    injected: dict[str, int]
    upstream_errors: int
    refused: int  # connections closed at accept because max_connections were open

    @property
    def total_injected(self) -> int:
        return sum(self.injected.values())


def _loopback(host: str, what: str) -> str:
    if host == "localhost":
        return "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"the fault proxy's {what} must be a loopback IP address, not {host!r}") from None
    if not address.is_loopback:
        raise ValueError(f"the fault proxy's {what} must be loopback (127.0.0.0/8 or ::1), not {host}")
    return host


def _rst_close(sock: socket.socket) -> None:
    """Close with a RST (SO_LINGER 0), not a FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class _Closed(Exception):
    """The peer closed the connection (before a whole message, if ``partial``)."""

    def __init__(self, partial: bool) -> None:
        super().__init__("connection closed")
        self.partial = partial


class _Reader:
    """Buffered reads of HTTP/1.1 messages from a socket (its own timeout applies to every recv)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise _Closed(partial=bool(self.buffer))
        self.buffer += data

    def until(self, marker: bytes, limit: int) -> bytes:
        while (end := self.buffer.find(marker)) < 0:
            if len(self.buffer) > limit:
                raise ValueError(f"no {marker!r} within {limit} bytes")
            self._fill()
        end += len(marker)
        data, self.buffer = self.buffer[:end], self.buffer[end:]
        return data

    def exactly(self, count: int) -> bytes:
        while len(self.buffer) < count:
            self._fill()
        data, self.buffer = self.buffer[:count], self.buffer[count:]
        return data

    def to_close(self) -> bytes:
        try:
            while len(self.buffer) <= MAX_BODY_BYTES:
                self._fill()
        except _Closed:
            pass
        data, self.buffer = self.buffer, b""
        return data

    def body(self, headers: dict[str, str], *, until_close: bool) -> bytes:
        """The raw body (chunked framing kept as it came) after a head with these headers."""
        if "chunked" in headers.get("transfer-encoding", "").lower():
            raw = b""
            while True:
                line = self.until(b"\r\n", MAX_HEAD_BYTES)
                raw += line
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while (trailer := self.until(b"\r\n", MAX_HEAD_BYTES)) != b"\r\n":
                        raw += trailer
                    return raw + b"\r\n"
                raw += self.exactly(size + 2)
        if "content-length" in headers:
            length = int(headers["content-length"])
            if not 0 <= length <= MAX_BODY_BYTES:
                raise ValueError(f"Content-Length {length} out of range")
            return self.exactly(length)
        return self.to_close() if until_close else b""


def _parse_head(head: bytes) -> tuple[list[str], dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    return lines[0].split(" ", 2), headers


def _canned(status: int, reason: str, body: bytes, content_type: str, extra: dict[str, str] | None = None) -> bytes:
    head = [f"HTTP/1.1 {status} {reason}", f"Content-Type: {content_type}", f"Content-Length: {len(body)}"]
    head += [f"{name}: {value}" for name, value in (extra or {}).items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


_REASONS = {502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}


class FaultProxy:
    """A loopback proxy that injects faults (see the module docstring). Use it as a context manager."""

    def __init__(self, upstream: tuple[str, int], faults: Faults | None = None, *, seed: int = 0,
                 mode: Literal["tcp", "http"] = "tcp", tls: tuple[Path | str, Path | str] | None = None,
                 upstream_ca: Path | str | None = None, listen_host: str = "127.0.0.1", port: int | None = None,
                 timeout: float = 30.0, max_connections: int = 256) -> None:
        if mode not in ("tcp", "http"):
            raise ValueError(f"mode is 'tcp' or 'http', not {mode!r}")
        if mode == "tcp" and (tls is not None or upstream_ca is not None):
            raise ValueError("tls and upstream_ca need mode='http' (TCP mode passes TLS through untouched)")
        self.upstream = (_loopback(upstream[0], "upstream"), int(upstream[1]))
        self.host = _loopback(listen_host, "listening address")
        self.mode = mode
        self.timeout = timeout
        self._faults = self._checked(faults or Faults())
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._slots = threading.BoundedSemaphore(max_connections)
        self._open: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._connections = self._requests = self._upstream_errors = self._refused = 0
        self._injected = dict.fromkeys(KINDS, 0)
        self._server_tls: ssl.SSLContext | None = None
        if tls is not None:
            self._server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self._server_tls.load_cert_chain(str(tls[0]), str(tls[1]))
        self._upstream_tls: ssl.SSLContext | None = None
        if upstream_ca is not None:
            self._upstream_tls = ssl.create_default_context(cafile=str(upstream_ca))
        self._listener = socket.create_server((self.host, port if port is not None else free_port()), backlog=128)
        self._listener.settimeout(POLL_SECONDS)
        self.port: int = self._listener.getsockname()[1]
        self._acceptor = threading.Thread(target=self._accept, name=f"fault-proxy-{self.port}", daemon=True)
        self._acceptor.start()

    # -- the public surface -------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        scheme = "https" if self._server_tls is not None else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"

    @property
    def faults(self) -> Faults:
        return self._faults

    def set_faults(self, faults: Faults) -> None:
        self._faults = self._checked(faults)

    @property
    def stats(self) -> FaultStats:
        with self._lock:
            return FaultStats(connections=self._connections, requests=self._requests,
                              injected=dict(self._injected), upstream_errors=self._upstream_errors,
                              refused=self._refused)

    def stop(self) -> None:
        self._stopping.set()
        self._acceptor.join(timeout=2)
        self._listener.close()
        with self._lock:
            sockets, threads = list(self._open), list(self._threads)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        for thread in threads:
            thread.join(timeout=2)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, _type: type[BaseException] | None, _exc: BaseException | None,
                 _tb: TracebackType | None) -> None:
        self.stop()

    # -- drawing faults --------------------------------------------------------------------------------------

    def _checked(self, faults: Faults) -> Faults:
        if self.mode == "tcp" and any(getattr(faults, kind) for kind in HTTP_ONLY_KINDS):
            raise ValueError("status_5xx and status_429 need mode='http'")
        return faults

    def _draw(self, method: str | None = None, path: str | None = None) -> tuple[str | None, float]:
        """(fault or None, a second uniform draw for the fault's details), counted under the lock."""
        faults = self._faults
        with self._lock:
            if method is not None:
                self._requests += 1
                if faults.only is not None and not faults.only(method, path or ""):
                    return None, 0.0
            kind = faults.pick(self._rng.random())
            detail = self._rng.random() if kind is not None else 0.0
            if kind is not None:
                self._injected[kind] += 1
            return kind, detail

    # -- connections -------------------------------------------------------------------------------------------

    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._open.add(sock)

    def _untrack(self, sock: socket.socket) -> None:
        with self._lock:
            self._open.discard(sock)

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            if not self._slots.acquire(blocking=False):
                with self._lock:
                    self._refused += 1
                client.close()
                continue
            client.settimeout(self.timeout)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._connections += 1
                self._open.add(client)
            fault = self._draw() if self.mode == "tcp" else (None, 0.0)
            thread = threading.Thread(target=self._serve, args=(client, fault), daemon=True,
                                      name=f"fault-proxy-{self.port}-conn")
            with self._lock:
                self._threads.add(thread)
            thread.start()

    def _serve(self, client: socket.socket, fault: tuple[str | None, float]) -> None:
        try:
            if self.mode == "tcp":
                self._serve_tcp(client, *fault)
            else:
                self._serve_http(client)
        except (OSError, ValueError, _Closed):
            pass  # the client went away or sent garbage: nothing to answer
        finally:
            self._untrack(client)
            client.close()
            self._slots.release()
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _hold(self, sock: socket.socket) -> None:
        """A black hole: read and drop whatever comes, answer nothing, until the peer closes or we stop."""
        sock.settimeout(POLL_SECONDS)
        while not self._stopping.is_set():
            try:
                if not sock.recv(65536):
                    return
            except TimeoutError:
                continue
            except ssl.SSLWantReadError:
                continue

    def _connect_upstream(self) -> socket.socket:
        sock = socket.create_connection(self.upstream, timeout=self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._upstream_tls is not None:
            try:
                sock = self._upstream_tls.wrap_socket(sock, server_hostname=self.upstream[0])
            except BaseException:
                sock.close()
                raise
        self._track(sock)
        return sock

    # -- TCP mode ----------------------------------------------------------------------------------------------

    def _serve_tcp(self, client: socket.socket, kind: str | None, detail: float) -> None:
        if kind == "reset":
            return _rst_close(client)
        if kind == "black_hole":
            return self._hold(client)
        if kind == "delay" and self._stopping.wait(self._faults.delay_seconds):
            return
        limit = None
        if kind == "truncate":
            limit = self._faults.truncate_after if self._faults.truncate_after is not None else 1 + int(detail * 1024)
        try:
            upstream = self._connect_upstream()
        except OSError:
            with self._lock:
                self._upstream_errors += 1
            return
        try:
            self._pipe(client, upstream, limit)
        finally:
            self._untrack(upstream)
            upstream.close()

    def _pipe(self, client: socket.socket, upstream: socket.socket, limit: int | None) -> None:
        """Copy both ways until either side closes, idles past the timeout, or ``limit`` bytes went back."""
        sent_back = 0
        peer = {client: upstream, upstream: client}
        idle = 0.0
        with selectors.DefaultSelector() as selector:
            selector.register(client, selectors.EVENT_READ)
            selector.register(upstream, selectors.EVENT_READ)
            while not self._stopping.is_set() and idle < self.timeout:
                ready = selector.select(POLL_SECONDS)
                if not ready:
                    idle += POLL_SECONDS
                    continue
                idle = 0.0
                for key, _ in ready:
                    source: socket.socket = key.fileobj  # type: ignore[assignment]
                    data = source.recv(65536)
                    if not data:
                        return
                    if source is upstream and limit is not None:
                        data = data[:limit - sent_back]
                        sent_back += len(data)
                        peer[source].sendall(data)
                        if sent_back >= limit:
                            return
                        continue
                    peer[source].sendall(data)

    # -- HTTP mode ---------------------------------------------------------------------------------------------

    def _serve_http(self, raw_client: socket.socket) -> None:
        client = raw_client
        if self._server_tls is not None:
            client = self._server_tls.wrap_socket(raw_client, server_side=True)
            self._track(client)
        reader = _Reader(client)
        upstream: list[socket.socket | None] = [None]
        try:
            while not self._stopping.is_set():
                try:
                    head = reader.until(b"\r\n\r\n", MAX_HEAD_BYTES)
                except _Closed:
                    return
                request_line, headers = _parse_head(head)
                if len(request_line) < 2:
                    return
                method, target = request_line[0], request_line[1]
                request = head + reader.body(headers, until_close=False)
                kind, detail = self._draw(method, target.split("?", 1)[0])
                if kind == "reset":
                    return _rst_close(client)
                if kind == "black_hole":
                    return self._hold(client)
                if kind == "status_5xx":
                    status = (502, 503, 504)[min(int(detail * 3), 2)]
                    client.sendall(_canned(status, _REASONS[status], f"fault proxy: injected {status}\n".encode(),
                                           "text/plain"))
                    continue
                if kind == "status_429":
                    problem = {"type": "about:blank", "title": "Too Many Requests", "status": 429,
                               "detail": "fault proxy: injected 429"}
                    client.sendall(_canned(429, "Too Many Requests", json.dumps(problem).encode(),
                                           "application/problem+json",
                                           {"Retry-After": str(self._faults.retry_after)}))
                    continue
                if kind == "delay" and self._stopping.wait(self._faults.delay_seconds):
                    return
                response, close_after = self._exchange(upstream, method, request)
                if response is None:
                    client.sendall(_canned(502, "Bad Gateway", b"fault proxy: the upstream did not answer\n",
                                           "text/plain", {"Connection": "close"}))
                    return
                if kind == "truncate":
                    client.sendall(response[:max(1, len(response) // 2)])
                    return
                client.sendall(response)
                if close_after or headers.get("connection", "").lower() == "close":
                    return
        finally:
            if upstream[0] is not None:
                self._untrack(upstream[0])
                upstream[0].close()
            if client is not raw_client:  # wrapping took raw_client's descriptor: closing raw_client does nothing
                self._untrack(client)
                client.close()

    def _exchange(self, upstream: list[socket.socket | None], method: str,
                  request: bytes) -> tuple[bytes | None, bool]:
        """Send one request upstream and read its whole response: (raw response or None, close after it).
        A kept-alive upstream connection that turns out closed before answering is reopened once."""
        for attempt in (1, 2):
            reused = upstream[0] is not None
            try:
                sock = upstream[0] if upstream[0] is not None else self._connect_upstream()
                upstream[0] = sock
                sock.sendall(request)
                reader = _Reader(sock)
                while True:
                    head = reader.until(b"\r\n\r\n", MAX_HEAD_BYTES)
                    status_line, headers = _parse_head(head)
                    status = int(status_line[1]) if len(status_line) > 1 else 0
                    if 100 <= status < 200:
                        continue  # an interim response: the client sent no Expect, so drop it
                    break
                no_body = method == "HEAD" or status in (204, 304)
                close_after = headers.get("connection", "").lower() == "close" or (
                    not no_body and "content-length" not in headers
                    and "chunked" not in headers.get("transfer-encoding", "").lower())
                body = b"" if no_body else reader.body(headers, until_close=True)
                if close_after:
                    self._drop_upstream(upstream)
                return head + body, close_after
            except _Closed as closed:
                self._drop_upstream(upstream)
                if attempt == 1 and reused and not closed.partial:
                    continue
            except (OSError, ValueError):
                self._drop_upstream(upstream)
            break
        with self._lock:
            self._upstream_errors += 1
        return None, True

    def _drop_upstream(self, upstream: list[socket.socket | None]) -> None:
        if upstream[0] is not None:
            self._untrack(upstream[0])
            upstream[0].close()
            upstream[0] = None
