"""Loopback receivers of notifications, for tests and benchmarks: an HTTP webhook receiver, an SMTP
server (aiosmtpd), and a black hole (accepts connections, never answers).

```python
with WebhookReceiver() as hook, SmtpReceiver() as smtp, BlackHole() as hole:
    ...                                    # hook.url, smtp.port, hole.port
    hook.wait_for(2)                       # the first two requests, or AssertionError after a timeout
    smtp.messages[0]["Subject"]
```
Every receiver binds 127.0.0.1 on a port from lab.ports.free_port and keeps what arrived in order.
"""

from __future__ import annotations

import email
import email.policy
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

from lab.ports import free_port


def _wait(items: list[Any], count: int, timeout: float, what: str) -> list[Any]:
    deadline = time.monotonic() + timeout
    while len(items) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    if len(items) < count:
        raise AssertionError(f"{what}: {len(items)} arrived within {timeout:g} s, expected {count}")
    return list(items)


@dataclass(frozen=True)
class WebhookRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class WebhookReceiver:
    """An HTTP server that records every request and answers ``status`` (200 by default)."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.requests: list[WebhookRequest] = []
        self.port = free_port()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def _record(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                receiver.requests.append(WebhookRequest(self.command, self.path, dict(self.headers.items()), body))
                self.send_response(receiver.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_POST = do_PUT = do_GET = do_PATCH = _record  # noqa: N815 - http.server's method names

            def log_message(self, *_args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name=f"webhook-{self.port}", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def wait_for(self, count: int, timeout: float = 10) -> list[WebhookRequest]:
        return _wait(self.requests, count, timeout, f"webhook requests at {self.url}")

    def __enter__(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


@dataclass
class _Handler:
    messages: list[EmailMessage] = field(default_factory=list)
    envelopes: list[tuple[str, list[str]]] = field(default_factory=list)

    async def handle_DATA(self, _server: Any, _session: Any, envelope: Any) -> str:  # noqa: N802 - aiosmtpd's name
        self.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos)))
        parsed = email.message_from_bytes(envelope.content, policy=email.policy.default)
        self.messages.append(parsed)  # type: ignore[arg-type]  # the default policy makes an EmailMessage
        return "250 Message accepted for delivery"


class SmtpReceiver:
    """A real SMTP server (aiosmtpd) on loopback that keeps every message it accepted, parsed.

    ``tls_context`` (an ssl.SSLContext for the server) offers STARTTLS and requires it;
    ``implicit_tls`` speaks TLS from the first byte (port-465 style) instead; ``credentials``
    (user, password) requires a login (only over TLS)."""

    def __init__(self, tls_context: Any = None, implicit_tls: Any = None,
                 credentials: tuple[str, str] | None = None) -> None:
        from aiosmtpd.controller import Controller
        from aiosmtpd.smtp import AuthResult

        self.port = free_port()
        self._handler = _Handler()
        options: dict[str, Any] = {}
        if tls_context is not None:
            options = {"tls_context": tls_context, "require_starttls": True}
        if implicit_tls is not None:
            options = {"ssl_context": implicit_tls}
        if credentials is not None:
            def authenticate(_server: Any, _session: Any, _envelope: Any, _mechanism: str, data: Any) -> AuthResult:
                given = (data.login.decode(), data.password.decode())
                return AuthResult(success=given == credentials, handled=False)  # aiosmtpd answers 535

            options |= {"authenticator": authenticate, "auth_required": True, "auth_require_tls": True}
        self._controller = Controller(self._handler, hostname="127.0.0.1", port=self.port, **options)

    @property
    def messages(self) -> list[EmailMessage]:
        return self._handler.messages

    @property
    def envelopes(self) -> list[tuple[str, list[str]]]:
        return self._handler.envelopes

    def wait_for(self, count: int, timeout: float = 10) -> list[EmailMessage]:
        return _wait(self._handler.messages, count, timeout, f"e-mails at 127.0.0.1:{self.port}")

    def __enter__(self) -> SmtpReceiver:
        self._controller.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._controller.stop()


class BlackHole:
    """A TCP listener that accepts every connection and never sends a byte (nor closes): what a hung
    server looks like to a client."""

    def __init__(self) -> None:
        self.port = free_port()
        self._listener = socket.create_server(("127.0.0.1", self.port), backlog=128)
        self._held: list[socket.socket] = []
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._accept, name=f"black-hole-{self.port}", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def _accept(self) -> None:
        self._listener.settimeout(0.1)
        while not self._stopping.is_set():
            try:
                connection, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            self._held.append(connection)

    def __enter__(self) -> BlackHole:
        self._thread.start()
        return self

    def __exit__(self, _type: type[BaseException] | None, _exc: BaseException | None,
                 _tb: TracebackType | None) -> None:
        self._stopping.set()
        self._thread.join(timeout=2)
        for connection in self._held:
            connection.close()
        self._listener.close()


def closed_port() -> int:
    """A loopback port nothing listens on: connecting is refused at once."""
    return free_port()
