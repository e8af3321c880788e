"""The private CA on HTTP: CRLs, CA certificates and OCSP, at the URLs its certificates carry.

For every CA in the inventory, under ``/<ca name>/`` (after any path prefix of the CA's base URL):

- ``issuing.crt`` and ``root.crt``: the CA certificates, DER (application/pkix-cert);
- ``issuing.crl``: the current full CRL, DER (application/pkix-crl), reissued first when it is due;
- ``ocsp``: OCSP (RFC 6960) by POST (application/ocsp-request) and by GET with the base64 request
  in the path (``ocsp/<base64>``, RFC 6960 appendix A), answered application/ocsp-response.

Plain HTTP on purpose: every answer is signed, and clients fetch these while validating TLS.
Every connection has a socket timeout; request bodies are bounded; a malformed OCSP request gets a
malformedRequest response, never a traceback. The issuing key of each CA is decrypted once, into a
``certpilot.ca.CASigner`` that the server keeps, and is never logged or sent. A background thread
reissues CRLs before their nextUpdate (``certpilot.ca.refresh_crls``).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import logging
import re
import socket
import threading
import urllib.parse
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization

from certpilot import audit, ca, keystore
from certpilot.clock import utcnow
from certpilot.database import read_session
from certpilot.errors import CertpilotError, NotFoundError

__all__ = ["CAHTTPServer", "parse_listen"]

log = logging.getLogger("certpilot.ca_http")

MAX_REQUEST_BYTES = 16 * 1024  # an OCSP request for one certificate is about 100 bytes
_PATH = re.compile(r"^(?P<prefix>(?:/[^/]+)*?)/(?P<ca>[A-Za-z0-9][A-Za-z0-9._-]{0,63})/"
                   r"(?P<resource>issuing\.crt|root\.crt|issuing\.crl|ocsp)(?:/(?P<rest>.*))?$")
_CACHE_SECONDS = 300


def parse_listen(text: str, default_port: int = 8180) -> tuple[str, int]:
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


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    app: CAHTTPServer


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "certpilot-ca"
    sys_version = ""
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        self.request.settimeout(self.server.app.timeout)  # what StreamRequestHandler does with a class timeout
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        log.info("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        self._handle("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self._handle("HEAD")

    def do_POST(self) -> None:  # noqa: N802
        self._handle("POST")

    def _handle(self, method: str) -> None:
        try:
            status, content_type, body, headers = self.server.app.respond(method, self.path, self._body(method))
        except _HTTPError as exc:
            status, content_type, body, headers = exc.status, "text/plain; charset=utf-8", exc.text.encode() + b"\n", {}
        except (TimeoutError, socket.timeout, ConnectionError):
            self.close_connection = True
            return
        except Exception:  # never a traceback to the client; the log has it
            log.exception("error answering %s %s", method, self.path)
            status, content_type, body, headers = 500, "text/plain; charset=utf-8", b"internal error\n", {}
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(body)

    def _body(self, method: str) -> bytes | None:
        if method != "POST":
            return None
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            raise _HTTPError(411, "a POST needs a Content-Length")
        size = int(length)
        if size > MAX_REQUEST_BYTES:
            self.close_connection = True
            raise _HTTPError(413, f"request body over {MAX_REQUEST_BYTES} bytes")
        return self.rfile.read(size)


class _HTTPError(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


class CAHTTPServer:
    """Serves every CA in the inventory. ``start()`` runs it in threads (tests, flows);
    ``serve_forever()`` blocks (the CLI). ``close()`` stops both the server and the CRL refresher."""

    def __init__(self, engine: sa.Engine, key_ring: Callable[[], keystore.KeyRing],
                 listen: tuple[str, int] = ("127.0.0.1", 8180), *, actor: audit.Actor | None = None,
                 timeout: float = 10.0, refresh_interval: float = 600.0,
                 clock: Callable[[], dt.datetime] | None = None) -> None:
        self.engine = engine
        self.timeout = timeout
        self.refresh_interval = refresh_interval
        self._key_ring = key_ring
        self._actor = actor or audit.Actor("ca-server")
        self._clock = clock or utcnow
        self._signers: dict[str, ca.CASigner] = {}
        self._certificates: dict[tuple[str, str], bytes] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        host, port = listen
        self._server = (_Server6 if ":" in host else _Server)((host, port), _Handler)
        self._server.app = self

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    def start(self) -> CAHTTPServer:
        serve = lambda: self._server.serve_forever(poll_interval=0.05)  # noqa: E731 - shutdown() waits one poll
        for target, name in ((serve, "ca-http"), (self._refresh_loop, "ca-crl-refresh")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def serve_forever(self) -> None:
        refresher = threading.Thread(target=self._refresh_loop, name="ca-crl-refresh", daemon=True)
        refresher.start()
        self._threads.append(refresher)
        try:
            self._server.serve_forever()
        finally:
            self._stop.set()

    def close(self) -> None:
        self._stop.set()
        if any(t.name == "ca-http" for t in self._threads):
            self._server.shutdown()
        self._server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads.clear()
        with self._lock:
            self._signers.clear()  # let the decrypted keys go

    def __enter__(self) -> CAHTTPServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------------------------------------

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.refresh_interval):
            self.refresh_crls()

    def refresh_crls(self) -> list[str]:
        """Reissue every CRL that is due; errors are logged, not raised (the loop must go on)."""
        try:
            done = ca.refresh_crls(self.engine, self._key_ring(), self._actor, now=self._clock())
        except Exception:
            log.exception("reissuing CRLs failed; will try again in %.0f s", self.refresh_interval)
            return []
        for name in done:
            log.info("issued a new CRL for CA %s", name)
        return done

    def _signer(self, name: str) -> ca.CASigner:
        with self._lock:
            signer = self._signers.get(name)
            if signer is None:
                with read_session(self.engine) as session:
                    signer = self._signers[name] = ca.open_signer(session, self._key_ring(), name)
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

    def respond(self, method: str, raw_path: str, body: bytes | None) -> tuple[int, str, bytes, dict[str, str]]:
        """(status, content type, body, extra headers) for one request."""
        path = urllib.parse.urlsplit(raw_path).path
        match = _PATH.match(path)
        if match is None:
            if path in ("/", "/healthz") and method in ("GET", "HEAD"):
                return 200, "text/plain; charset=utf-8", b"certpilot private CA\n", {}
            raise _HTTPError(404, "not found")
        name, resource, rest = match.group("ca"), match.group("resource"), match.group("rest")
        try:
            if resource == "ocsp":
                return self._ocsp(method, name, rest, body)
            if method not in ("GET", "HEAD") or rest is not None:
                raise _HTTPError(405 if rest is None else 404, "use GET" if rest is None else "not found")
            if resource == "issuing.crl":
                der = ca.current_crl(self.engine, self._key_ring, self._actor, name, now=self._clock())
                return 200, "application/pkix-crl", der, {"Cache-Control": f"public, max-age={_CACHE_SECONDS}"}
            der = self._certificate(name, "root" if resource == "root.crt" else "issuing")
            return 200, "application/pkix-cert", der, {"Cache-Control": "public, max-age=86400"}
        except NotFoundError:
            raise _HTTPError(404, f"no CA named {name}") from None
        except CertpilotError as exc:
            log.error("CA %s: %s", name, exc)
            raise _HTTPError(503, "the CA cannot answer now") from None

    def _ocsp(self, method: str, name: str, rest: str | None, body: bytes | None) -> tuple[int, str, bytes, dict[str, str]]:
        if method == "POST":
            if rest:
                raise _HTTPError(404, "not found")
            request_der: bytes | None = body or b""
        elif method in ("GET", "HEAD"):
            if not rest:
                raise _HTTPError(405, "POST an OCSP request, or GET /ocsp/<base64 request>")
            request_der = _decode_get(rest)
        else:
            raise _HTTPError(405, "use POST or GET")
        signer = self._signer(name)
        if request_der is None or len(request_der) > MAX_REQUEST_BYTES:
            response = ca.malformed_ocsp_response()
        else:
            with read_session(self.engine) as session:
                response = ca.respond_ocsp(session, signer, request_der, now=self._clock())
        headers = {}
        if method != "POST":
            headers["Cache-Control"] = f"public, max-age={_CACHE_SECONDS}, no-transform, must-revalidate"
        return 200, "application/ocsp-response", response, headers


def _decode_get(rest: str) -> bytes | None:
    """The DER request from ``ocsp/<url-encoded base64>``; None when it is not base64."""
    text = urllib.parse.unquote(rest)
    text = text.replace(" ", "+")  # a '+' that something decoded as a space
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None
