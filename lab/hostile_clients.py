"""Hostile HTTP/1.1 clients on raw sockets, for tests and benchmarks of certpilot's HTTP listener.

Each one does one thing a well-behaved client never does, on loopback only, with a timeout on every
socket: a head sent a byte at a time (slowloris), a body sent slowly, many small or one huge header,
connections opened and left idle, requests pipelined on one connection, a request followed by a
half-close (``shutdown(SHUT_WR)``), and a client that asks for a large answer and never reads it.

They return what the server did (``Outcome``: the answer's head and body, whether and when the
server closed or reset the connection), so a caller asserts on the wire. ``held_connections`` counts
the TCP connections a process holds on a listening port (from /proc), the figure for "connections
held".
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

Address = tuple[str, int]


def _loopback(address: Address) -> Address:
    if not ipaddress.ip_address(address[0]).is_loopback:
        raise ValueError(f"{address[0]} is not a loopback address: the hostile clients stay on loopback")
    return address


@dataclass(frozen=True)
class Outcome:
    """What the server did to one hostile connection."""

    data: bytes  # everything it sent, until it closed (or ``seconds`` ran out)
    closed: bool  # it closed (FIN) or reset the connection
    reset: bool  # with RST
    seconds: float  # from the first byte sent until it closed, or until the client stopped waiting
    sent: int  # bytes the client managed to send

    @property
    def status(self) -> int | None:
        """The first answer's status code, None without one."""
        match = re.match(rb"HTTP/1\.[01] (\d{3}) ", self.data)
        return int(match.group(1)) if match else None

    def answers(self) -> list[tuple[int, bytes]]:
        """Every answer in ``data`` (status, body), in order, by Content-Length."""
        found, rest = [], self.data
        while rest.startswith(b"HTTP/1."):
            head, _, rest = rest.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip())
            found.append((int(head.split(b" ")[1]), rest[:length]))
            rest = rest[length:]
        return found


def connect(address: Address, *, timeout: float = 10.0, receive_buffer: int | None = None) -> socket.socket:
    """A TCP connection to ``address`` (loopback); ``receive_buffer`` shrinks SO_RCVBUF before connecting,
    so that a client that does not read fills its window quickly."""
    host, port = _loopback(address)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        if receive_buffer is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.connect((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def read_until_closed(sock: socket.socket, started: float, sent: int, wait: float) -> Outcome:
    """Read until the server closes ``sock`` or ``wait`` seconds have passed since ``started``."""
    chunks: list[bytes] = []
    closed = reset = False
    while (left := started + wait - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            closed = reset = True
            break
        if not chunk:
            closed = True
            break
        chunks.append(chunk)
    return Outcome(b"".join(chunks), closed, reset, time.monotonic() - started, sent)


def _trickle(address: Address, first: bytes, trickled: bytes, interval: float, wait: float) -> Outcome:
    with contextlib.closing(connect(address)) as sock:
        started = time.monotonic()
        sent = 0
        try:
            sock.sendall(first)
            sent = len(first)
            for index in range(len(trickled)):
                if time.monotonic() - started > wait:
                    break
                sock.sendall(trickled[index:index + 1])
                sent += 1
                time.sleep(interval)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server closed it while we were sending: what a slow client should get
        return read_until_closed(sock, started, sent, wait)


def slow_head(address: Address, path: str = "/healthz", *, interval: float = 0.1, wait: float = 30.0) -> Outcome:
    """Slowloris: a request head sent one byte every ``interval`` seconds, with a header that never ends."""
    head = f"GET {path} HTTP/1.1\r\nHost: x\r\nX-Slow: ".encode() + b"a" * 100_000
    return _trickle(address, b"", head, interval, wait)


def slow_body(address: Address, path: str, body: bytes, *, interval: float = 0.1, wait: float = 30.0,
              content_type: str = "application/ocsp-request") -> Outcome:
    """A POST whose head arrives at once and whose body one byte every ``interval`` seconds."""
    head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    return _trickle(address, head, body, interval, wait)


def send_at_once(address: Address, data: bytes, *, wait: float = 30.0, half_close: bool = False) -> Outcome:
    """``data`` on a new connection (all of it, if the server takes it), optionally half-closed after,
    then everything the server answers until it closes."""
    with contextlib.closing(connect(address)) as sock:
        started = time.monotonic()
        sent = 0
        try:
            sock.sendall(data)
            sent = len(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass
        return read_until_closed(sock, started, sent, wait)


def many_headers(address: Address, path: str = "/healthz", *, count: int = 2000, size: int = 20,
                 wait: float = 30.0) -> Outcome:
    """A head of ``count`` small headers (``size`` bytes of value each), sent at once."""
    lines = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * size) for i in range(count))
    return send_at_once(address, f"GET {path} HTTP/1.1\r\nHost: x\r\n".encode() + lines + b"\r\n", wait=wait)


def huge_header(address: Address, path: str = "/healthz", *, size: int = 8 << 20, wait: float = 30.0) -> Outcome:
    """One header of ``size`` bytes, sent as fast as the server takes it."""
    head = f"GET {path} HTTP/1.1\r\nHost: x\r\nX-Huge: ".encode() + b"a" * size + b"\r\n\r\n"
    return send_at_once(address, head, wait=wait)


def request(method: str, path: str, body: bytes = b"", *, close: bool = False,
            content_type: str = "application/ocsp-request") -> bytes:
    """One HTTP/1.1 request's bytes."""
    head = f"{method} {path} HTTP/1.1\r\nHost: x\r\n"
    if body or method == "POST":
        head += f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
    if close:
        head += "Connection: close\r\n"
    return head.encode() + b"\r\n" + body


def pipelined(address: Address, requests: list[bytes], *, wait: float = 30.0) -> Outcome:
    """Every request written at once on one connection (the last should say Connection: close)."""
    return send_at_once(address, b"".join(requests), wait=wait)


def half_closed(address: Address, data: bytes, *, wait: float = 30.0) -> Outcome:
    """A whole request, then ``shutdown(SHUT_WR)``: the client has nothing more to say, and waits for the answer."""
    return send_at_once(address, data, wait=wait, half_close=True)


@contextlib.contextmanager
def idle_connections(address: Address, count: int, *, first: bytes = b"") -> Iterator[list[socket.socket]]:
    """``count`` connections that send ``first`` (nothing by default) and then nothing; closed on exit.
    A connection the server refuses (its backlog full) is left out."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            try:
                sock = connect(address, timeout=2)
                if first:
                    sock.sendall(first)
            except OSError:
                continue
            socks.append(sock)
        yield socks
    finally:
        for sock in socks:
            sock.close()


@contextlib.contextmanager
def non_readers(address: Address, path: str, count: int = 1, *,
                receive_buffer: int = 4096) -> Iterator[list[socket.socket]]:
    """``count`` connections that ask for ``path`` (keep-alive) and never read the answer, with a small
    receive window so that the server's writes stall; closed (with RST) on exit."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = connect(address, receive_buffer=receive_buffer)
            socks.append(sock)
            sock.sendall(request("GET", path))
        yield socks
    finally:
        for sock in socks:
            with contextlib.suppress(OSError):  # abort: unread data makes close() send RST
                sock.close()


def server_closed(sock: socket.socket) -> bool:
    """Whether the server has closed or reset ``sock`` (reading and dropping whatever it had sent)."""
    sock.setblocking(False)
    try:
        while True:
            try:
                chunk = sock.recv(1 << 20)
            except BlockingIOError:
                return False
            except (ConnectionResetError, TimeoutError):
                return True
            if not chunk:
                return True
    finally:
        sock.setblocking(True)


def held_connections(pid: int, port: int) -> int:
    """How many TCP connections process ``pid`` holds open on its local ``port`` (not the listening socket)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    count = 0
    for table in ("tcp", "tcp6"):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] != "0A" and fields[9] in inodes:  # 0A: LISTEN
                count += 1
    return count


def rss_kib(pid: int) -> tuple[int, int]:
    """(current, peak) resident memory of process ``pid`` in KiB, from /proc/PID/status."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(rest.split()[0])
    return values["VmRSS"], values["VmHWM"]
