"""ACME challenge solvers: the ChallengeSolver role and its implementations.

A solver proves control of an identifier by publishing what the CA asks for, and removes it after:
http-01 serves the key authorisation at /.well-known/acme-challenge/<token> (Http01Responder, a
small HTTP server on a thread of this process); tls-alpn-01 presents a self-signed certificate with
the acmeIdentifier extension to ALPN "acme-tls/1" (TlsAlpn01Responder, RFC 8737; the acme package
dropped its class, so the issuer handles the challenge generically); dns-01 sets a TXT record at
_acme-challenge.<name> through a DnsProvider (pebble-challtestsrv's management API, or AWS Route53).

Solvers see a Challenge: the identifier, the token and the key authorisation. They never see the
account key. Every network call has a timeout.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import http.server
import os
import socket
import socketserver
import ssl
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from certpilot.clock import utcnow
from certpilot.errors import InvalidDnsNameError, ServiceRefusedError, ServiceUnavailableError, TransientError
from certpilot.names import normalise_dns_name, parse_ip_address

HTTP_01 = "http-01"
DNS_01 = "dns-01"
TLS_ALPN_01 = "tls-alpn-01"
ACME_TLS_ALPN_PROTOCOL = "acme-tls/1"  # RFC 8737
ACME_IDENTIFIER_OID = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31")


@dataclass(frozen=True)
class Challenge:
    """One challenge the CA offered for one identifier, with what answers it."""

    type: str  # http-01, dns-01, tls-alpn-01
    identifier: str  # the DNS name being validated (a wildcard's base name for dns-01)
    token: str
    key_authorization: str = field(repr=False)  # token "." base64url(JWK thumbprint of the account key)

    @property
    def http_path(self) -> str:
        return f"/.well-known/acme-challenge/{self.token}"

    @property
    def dns_name(self) -> str:
        """The TXT record's name, without a trailing dot."""
        return "_acme-challenge." + self.identifier.removeprefix("*.").rstrip(".")

    @property
    def dns_value(self) -> str:
        """The TXT record's value: base64url(SHA-256(key authorisation)), unpadded (RFC 8555 section 8.4)."""
        return base64.urlsafe_b64encode(self.key_authorization_digest).rstrip(b"=").decode("ascii")

    @property
    def key_authorization_digest(self) -> bytes:
        """SHA-256 of the key authorisation: what dns-01 publishes and tls-alpn-01's certificate carries."""
        return hashlib.sha256(self.key_authorization.encode("ascii")).digest()


@runtime_checkable
class ChallengeSolver(Protocol):
    """Publishes the answer to a challenge, and removes it after."""

    challenge_types: tuple[str, ...]  # the types it answers, most preferred first

    def present(self, challenge: Challenge) -> None: ...

    def cleanup(self, challenge: Challenge) -> None: ...


# http-01 ------------------------------------------------------------------------------------------

class _ResponderServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # the default 5 drops the SYNs of a CA validating many orders at once (1 s stalls)
    answers: dict[str, str]


class _ResponderHandler(http.server.BaseHTTPRequestHandler):
    server: _ResponderServer
    timeout = 10  # a client that stalls mid-request does not hold a thread for ever
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # headers and body go out at once

    def do_GET(self) -> None:  # noqa: N802 (the http.server naming)
        prefix = "/.well-known/acme-challenge/"
        path = self.path.split("?", 1)[0]
        answer = self.server.answers.get(path[len(prefix):]) if path.startswith(prefix) else None
        body = (answer or "not found").encode("ascii")
        self.send_response(200 if answer is not None else 404)
        self.send_header("Content-Type", "application/octet-stream" if answer is not None else "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # tokens are not secret, but a CA's validation requests are not worth a log line each


class _ThreadedResponder:
    """The lifecycle both responders share: listen on first use, serve from a daemon thread, stop."""

    kind = "responder"

    def __init__(self, address: str, port: int) -> None:
        self.address = address
        self._port = port
        self._server: socketserver.TCPServer | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def port(self) -> int:
        return self._server.server_address[1] if self._server else self._port

    def _make_server(self) -> socketserver.TCPServer:
        raise NotImplementedError

    def start(self):  # noqa: ANN201 - returns self, for `with`
        with self._lock:
            if self._server is None:
                try:
                    server = self._make_server()
                except OSError as exc:
                    raise TransientError(f"{self.kind} responder cannot listen on {self.address}:{self._port}: "
                                         f"{exc.strerror}") from exc
                self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                                                name=f"{self.kind} responder {self.address}:{self._port}", daemon=True)
                self._server = server
                self._thread.start()
        return self

    def stop(self) -> None:
        with self._lock:
            server, self._server = self._server, None
            thread, self._thread = self._thread, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self):  # noqa: ANN204
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Http01Responder(_ThreadedResponder):
    """Serves http-01 answers from a thread of this process. Starts on first use (or ``start()``);
    one responder serves every issuer in the process, so share it. ``port=0`` picks a free port."""

    challenge_types = (HTTP_01,)
    kind = "http-01"

    def __init__(self, address: str = "127.0.0.1", port: int = 5002) -> None:
        super().__init__(address, port)
        self._answers: dict[str, str] = {}

    def _make_server(self) -> _ResponderServer:
        server = _ResponderServer((self.address, self._port), _ResponderHandler)
        server.answers = self._answers
        return server

    def present(self, challenge: Challenge) -> None:
        self.start()
        self._answers[challenge.token] = challenge.key_authorization

    def cleanup(self, challenge: Challenge) -> None:
        self._answers.pop(challenge.token, None)


# tls-alpn-01 --------------------------------------------------------------------------------------

class _AlpnServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128
    context: ssl.SSLContext


class _AlpnHandler(socketserver.BaseRequestHandler):
    server: _AlpnServer

    def handle(self) -> None:
        self.request.settimeout(10)
        try:
            with self.server.context.wrap_socket(self.request, server_side=True) as tls:
                tls.recv(1)  # the CA closes once it has seen the certificate
        except (ssl.SSLError, OSError):
            pass


class TlsAlpn01Responder(_ThreadedResponder):
    """Answers tls-alpn-01 (RFC 8737): a TLS server that, to a client offering ALPN "acme-tls/1" and
    naming an identifier in SNI, presents a self-signed certificate for that identifier carrying the
    critical acmeIdentifier extension (SHA-256 of the key authorisation). Each certificate and its
    throw-away key live only in memory and in an SSL context. Starts on first use; ``port=0`` picks one."""

    challenge_types = (TLS_ALPN_01,)
    kind = "tls-alpn-01"

    def __init__(self, address: str = "127.0.0.1", port: int = 5001) -> None:
        super().__init__(address, port)
        self._contexts: dict[str, ssl.SSLContext] = {}

    def _pick(self, tls: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: ssl.SSLContext) -> int | None:
        context = self._contexts.get((server_name or "").lower())
        if context is None:
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        tls.context = context
        return None

    def _make_server(self) -> _AlpnServer:
        base = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        base.set_alpn_protocols([ACME_TLS_ALPN_PROTOCOL])
        base.sni_callback = self._pick
        server = _AlpnServer((self.address, self._port), _AlpnHandler)
        server.context = base
        return server

    def present(self, challenge: Challenge) -> None:
        self.start()
        self._contexts[_sni_name(challenge.identifier)] = _alpn_context(challenge)

    def cleanup(self, challenge: Challenge) -> None:
        self._contexts.pop(_sni_name(challenge.identifier), None)


def _sni_name(identifier: str) -> str:
    """The SNI a CA sends for an identifier: the name itself, or an IP's reverse-DNS name (RFC 8738)."""
    address = parse_ip_address(identifier)
    if address is not None:
        return address.reverse_pointer.lower()
    try:
        return normalise_dns_name(identifier)
    except InvalidDnsNameError:
        return identifier.lower().rstrip(".")  # the CA validates identifiers; the responder only looks them up


def _alpn_context(challenge: Challenge, now: dt.datetime | None = None) -> ssl.SSLContext:
    key = ec.generate_private_key(ec.SECP256R1())
    now = now or utcnow()
    address = parse_ip_address(challenge.identifier)
    san: x509.GeneralName = x509.IPAddress(address) if address is not None else x509.DNSName(challenge.identifier)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "certpilot tls-alpn-01")]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "certpilot tls-alpn-01")]))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=7))
            .add_extension(x509.SubjectAlternativeName([san]), critical=False)
            .add_extension(x509.UnrecognizedExtension(ACME_IDENTIFIER_OID,
                                                      b"\x04\x20" + challenge.key_authorization_digest), critical=True)
            .sign(key, hashes.SHA256()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.set_alpn_protocols([ACME_TLS_ALPN_PROTOCOL])
    # ssl loads keys only from files: a private directory, gone as soon as the context has them.
    with tempfile.TemporaryDirectory(prefix="certpilot-alpn-") as directory:
        path = os.path.join(directory, "challenge.pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
            handle.write(cert.public_bytes(serialization.Encoding.PEM))
        context.load_cert_chain(path)
    return context


# dns-01 -------------------------------------------------------------------------------------------

@runtime_checkable
class DnsProvider(Protocol):
    """Adds and removes one value of a TXT record set (names without the trailing dot). Several
    values may share a name (example.test and *.example.test both validate at _acme-challenge.example.test)."""

    def set_txt(self, name: str, value: str) -> None: ...

    def delete_txt(self, name: str, value: str) -> None: ...


class Dns01Solver:
    """dns-01 through a DnsProvider."""

    challenge_types = (DNS_01,)

    def __init__(self, provider: DnsProvider) -> None:
        self.provider = provider

    def present(self, challenge: Challenge) -> None:
        self.provider.set_txt(challenge.dns_name, challenge.dns_value)

    def cleanup(self, challenge: Challenge) -> None:
        self.provider.delete_txt(challenge.dns_name, challenge.dns_value)


class ChallTestSrvDns:
    """pebble-challtestsrv's management API (tests and demos): /set-txt and /clear-txt. Clearing
    removes every value of a name, so a name's values are tracked here and re-added as needed."""

    def __init__(self, management_url: str, timeout: float = 5.0) -> None:
        self.management_url = management_url.rstrip("/")
        self.timeout = timeout
        self._values: dict[str, list[str]] = {}
        self._lock = threading.Lock()

    def _post(self, path: str, body: dict[str, str]) -> None:
        try:
            response = httpx.post(self.management_url + path, json=body, timeout=self.timeout)
        except httpx.HTTPError as exc:
            raise ServiceUnavailableError("challtestsrv", path, type(exc).__name__, f"unreachable: {exc}",
                                          f"challtestsrv at {self.management_url}") from exc
        if response.status_code != 200:
            raise ServiceUnavailableError("challtestsrv", path, str(response.status_code), response.text[:200],
                                          f"challtestsrv {path} answered")

    def set_txt(self, name: str, value: str) -> None:
        with self._lock:
            self._values.setdefault(name, []).append(value)
            self._post("/set-txt", {"host": name + ".", "value": value})

    def delete_txt(self, name: str, value: str) -> None:
        with self._lock:
            remaining = [v for v in self._values.get(name, []) if v != value]
            self._values[name] = remaining
            self._post("/clear-txt", {"host": name + "."})
            for other in remaining:
                self._post("/set-txt", {"host": name + ".", "value": other})
            if not remaining:
                self._values.pop(name, None)


class Route53Dns:
    """AWS Route53: UPSERTs the TXT record set with the value added, waits until the change is
    INSYNC (with a deadline), and on delete UPSERTs it without the value or DELETEs it when none is
    left. ``client`` is a boto3 route53 client built with connect and read timeouts (its block does)."""

    def __init__(self, client: Any, hosted_zone_id: str, *, ttl: int = 60, propagation_timeout: float = 120.0,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
        self.client = client
        self.hosted_zone_id = hosted_zone_id
        self.ttl = ttl
        self.propagation_timeout = propagation_timeout
        self._clock, self._sleep = clock, sleep
        self._lock = threading.Lock()  # read-modify-write of one record set at a time

    def _call(self, operation: str, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError  # noqa: PLC0415 (boto only when used)

        where = f"route53 {operation} in zone {self.hosted_zone_id}"
        try:
            return getattr(self.client, operation)(**kwargs)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            message = str(exc.response.get("Error", {}).get("Message", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            if code in ("Throttling", "ThrottlingException", "PriorRequestNotComplete", "ServiceUnavailable") \
                    or status >= 500:
                raise ServiceUnavailableError("route53", operation, code, message, where) from exc
            raise ServiceRefusedError("route53", operation, code, message, where) from exc
        except BotoCoreError as exc:  # connection refused, timeouts, no credentials
            raise ServiceUnavailableError("route53", operation, type(exc).__name__, str(exc), where) from exc

    def _current(self, fqdn: str) -> dict[str, Any] | None:
        found = self._call("list_resource_record_sets", HostedZoneId=self.hosted_zone_id,
                           StartRecordName=fqdn, StartRecordType="TXT", MaxItems="1")
        for record_set in found.get("ResourceRecordSets", []):
            if record_set["Name"].rstrip(".").lower() == fqdn.rstrip(".").lower() and record_set["Type"] == "TXT":
                return record_set
        return None

    def _change(self, action: str, record_set: dict[str, Any], comment: str) -> str:
        batch = {"Comment": comment, "Changes": [{"Action": action, "ResourceRecordSet": record_set}]}
        answer = self._call("change_resource_record_sets", HostedZoneId=self.hosted_zone_id, ChangeBatch=batch)
        return answer["ChangeInfo"]["Id"]

    def _wait_insync(self, change_id: str) -> None:
        deadline = self._clock() + self.propagation_timeout
        delay = 0.2
        while True:
            status = self._call("get_change", Id=change_id)["ChangeInfo"]["Status"]
            if status == "INSYNC":
                return
            if self._clock() + delay > deadline:
                raise TransientError(f"route53 change {change_id} still {status} "
                                     f"after {self.propagation_timeout:.0f} s")
            self._sleep(delay)
            delay = min(delay * 2, 5.0)

    def set_txt(self, name: str, value: str) -> None:
        fqdn = name.rstrip(".") + "."
        quoted = f'"{value}"'
        with self._lock:
            current = self._current(fqdn)
            values = [r["Value"] for r in current["ResourceRecords"]] if current else []
            if quoted not in values:
                values.append(quoted)
            change = self._change("UPSERT", {"Name": fqdn, "Type": "TXT", "TTL": self.ttl,
                                             "ResourceRecords": [{"Value": v} for v in values]},
                                  "certpilot: ACME dns-01 challenge")
        self._wait_insync(change)

    def delete_txt(self, name: str, value: str) -> None:
        fqdn = name.rstrip(".") + "."
        quoted = f'"{value}"'
        with self._lock:
            current = self._current(fqdn)
            if current is None:
                return
            remaining = [r for r in current["ResourceRecords"] if r["Value"] != quoted]
            if len(remaining) == len(current["ResourceRecords"]):
                return
            if remaining:
                self._change("UPSERT", {**current, "ResourceRecords": remaining}, "certpilot: ACME dns-01 cleanup")
            else:
                self._change("DELETE", current, "certpilot: ACME dns-01 cleanup")
