"""A Key Vault (certificates and their secrets) on loopback, for the tests, the benchmarks and the demo.

No Key Vault emulator exists, so this is a small HTTPS server of our own that speaks the part of the
Key Vault REST API (api-version 2026-04-01, as azure-keyvault-certificates 4.12 sends it) that certpilot
uses, closely enough that the real SDK drives it:

- authentication as Key Vault does it: a request without a token gets 401 with
  ``WWW-Authenticate: Bearer authorization="...", resource="..."``; the SDK then asks its credential for a
  token and sends the request again. One fixed token is accepted (give the client
  connectors.azure_kv.StaticTokenCredential with it, and ``verify_challenge_resource=False``, since the
  challenge's resource is not the loopback address);
- ``POST /certificates/{name}/import`` (PEM or PFX, parsed with cryptography; the private key must match
  the certificate) creates a new version; the key becomes the certificate's secret, whose value is the
  PEM text (key then certificates) or the base64 PFX, as Key Vault keeps it;
- ``GET /certificates`` and ``GET /certificates/{name}/versions`` with paging (``maxresults``, and a
  ``nextLink`` carrying ``$skiptoken``), ``GET /certificates/{name}/[{version}]``, ``GET .../policy``,
  ``PATCH /certificates/{name}/[{version}]`` (enabled, tags), ``DELETE /certificates/{name}`` (soft
  delete: a DeletedCertificateBundle; the name cannot be reused until it is purged or recovered),
  ``GET``/``DELETE /deletedcertificates/{name}`` (purge), ``POST /deletedcertificates/{name}/recover``,
  ``GET /secrets/{name}/{version}`` (403 for a disabled version, as Key Vault refuses it);
- errors as Key Vault sends them: ``{"error": {"code": ..., "message": ...}}`` with 400 BadParameter,
  401 Unauthorized, 403 Forbidden, 404 CertificateNotFound / SecretNotFound, 409 Conflict.

Hostile modes, to prove clients' timeouts and retries: ``hostile(delay=...)`` answers every request
only after a delay, ``hostile(drop=True)`` closes each connection without answering, and
``fail_next(status, count)`` answers the next requests with a server error or a throttle (429).

    with KeyVaultServer(workdir) as vault:
        vault.url, vault.ca_file, vault.token, vault.requests, vault.latest("name")
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import json
import random
import socket
import ssl
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from certpilot.errors import ParseError
from certpilot.formats import load_bundle
from certpilot.sample_estate import make_ca

API_VERSIONS = {"2026-04-01", "2025-07-01", "7.6", "7.5", "7.4"}
PEM_CONTENT_TYPE = "application/x-pem-file"
PFX_CONTENT_TYPE = "application/x-pkcs12"
DEFAULT_TOKEN = "certpilot-lab-keyvault-token"
TENANT = "00000000-0000-0000-0000-00000000c1a0"
RECOVERABLE_DAYS = 90
PORT_RANGE = (20000, 32767)  # below the ephemeral range, where clients' ports come from


class VaultHttpError(Exception):
    """One Key Vault error response: status, code and message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass
class _Version:
    version: str
    der: bytes
    chain_der: tuple[bytes, ...]
    secret_value: str = field(repr=False)
    content_type: str
    enabled: bool
    created: int
    updated: int
    nbf: int
    exp: int
    tags: dict[str, str]
    key_props: dict[str, Any]


@dataclass
class _Certificate:
    name: str
    versions: list[_Version]  # in the order they were created: the last is the current one
    policy: dict[str, Any]
    deleted: int | None = None  # deletedDate, while soft-deleted

    @property
    def latest(self) -> _Version:
        return self.versions[-1]

    def version(self, version: str) -> _Version:
        for item in self.versions:
            if item.version == version:
                return item
        raise VaultHttpError(404, "CertificateNotFound",
                             f"A certificate with (name/id) {self.name}/{version} was not found in this key vault. "
                             "If you recently deleted this certificate you may be able to recover it using the "
                             "correct recovery command.")


def _now() -> int:
    return int(time.time())


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _not_found(name: str, what: str = "certificate") -> VaultHttpError:
    code = "CertificateNotFound" if what == "certificate" else "SecretNotFound"
    return VaultHttpError(404, code, f"A {what} with (name/id) {name} was not found in this key vault. If you "
                                     f"recently deleted this {what} you may be able to recover it using the "
                                     "correct recovery command.")


def make_server_identity(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1, ::1 and localhost: (CA file, certificate, key), the key 0600."""
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    ca = make_ca("certpilot lab Key Vault CA", now=now, days=30)
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                    x509.IPAddress(ipaddress.ip_address("::1"))]
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lab key vault")]))
            .issuer_name(ca.certificate.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca.key, hashes.SHA384()))  # type: ignore[arg-type]
    ca_file, cert_file, key_file = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    ca_file.write_bytes(ca.certificate.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.touch(mode=0o600)
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return ca_file, cert_file, key_file


class _Vault:
    """The vault's state, behind one lock. Methods return JSON-able dicts or raise VaultHttpError."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.lock = threading.Lock()
        self.certificates: dict[str, _Certificate] = {}

    # -- representations, as the REST API returns them

    def _attributes(self, item: _Version) -> dict[str, Any]:
        return {"enabled": item.enabled, "nbf": item.nbf, "exp": item.exp, "created": item.created,
                "updated": item.updated, "recoveryLevel": "Recoverable+Purgeable",
                "recoverableDays": RECOVERABLE_DAYS}

    def _bundle(self, cert: _Certificate, item: _Version) -> dict[str, Any]:
        return {"id": f"{self.base_url}/certificates/{cert.name}/{item.version}",
                "kid": f"{self.base_url}/keys/{cert.name}/{item.version}",
                "sid": f"{self.base_url}/secrets/{cert.name}/{item.version}",
                "x5t": _b64url(hashlib.sha1(item.der).digest()),  # noqa: S324 - Key Vault's x5t is SHA-1
                "cer": base64.b64encode(item.der).decode("ascii"),
                "contentType": item.content_type,
                "attributes": self._attributes(item),
                "tags": dict(item.tags),
                "policy": dict(cert.policy, id=f"{self.base_url}/certificates/{cert.name}/policy")}

    def _item(self, cert: _Certificate, item: _Version, with_version: bool) -> dict[str, Any]:
        suffix = f"/{item.version}" if with_version else ""
        return {"id": f"{self.base_url}/certificates/{cert.name}{suffix}",
                "x5t": _b64url(hashlib.sha1(item.der).digest()),  # noqa: S324
                "attributes": self._attributes(item), "tags": dict(item.tags)}

    def _deleted_bundle(self, cert: _Certificate) -> dict[str, Any]:
        assert cert.deleted is not None
        return dict(self._bundle(cert, cert.latest), recoveryId=f"{self.base_url}/deletedcertificates/{cert.name}",
                    deletedDate=cert.deleted, scheduledPurgeDate=cert.deleted + RECOVERABLE_DAYS * 86400)

    def _live(self, name: str) -> _Certificate:
        cert = self.certificates.get(name.lower())
        if cert is None or cert.deleted is not None:
            raise _not_found(name)
        return cert

    # -- operations

    def import_certificate(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        value = body.get("value")
        if not isinstance(value, str) or not value:
            raise VaultHttpError(400, "BadParameter", "Property value is required and must be a non-empty string.")
        policy = body.get("policy") or {}
        with self.lock:
            existing = self.certificates.get(name.lower())
            if existing is not None and existing.deleted is not None:
                raise VaultHttpError(409, "Conflict", f"Certificate {name} is currently in a deleted but recoverable "
                                                      "state, and its name cannot be reused; in this state, the "
                                                      "certificate can only be recovered or purged.")
            content_type = ((policy.get("secret_props") or {}).get("contentType")
                            or (existing.policy["secret_props"]["contentType"] if existing else PFX_CONTENT_TYPE))
            leaf, chain, key_props, secret_value = _parse_import(value, body.get("pwd"), content_type)
            now = _now()
            attributes = body.get("attributes") or {}
            item = _Version(version=uuid.uuid4().hex, der=leaf.public_bytes(serialization.Encoding.DER),
                            chain_der=tuple(c.public_bytes(serialization.Encoding.DER) for c in chain),
                            secret_value=secret_value, content_type=content_type,
                            enabled=bool(attributes.get("enabled", True)), created=now, updated=now,
                            nbf=int(leaf.not_valid_before_utc.timestamp()),
                            exp=int(leaf.not_valid_after_utc.timestamp()),
                            tags=dict(body.get("tags") or {}), key_props=key_props)
            new_policy = _policy(leaf, content_type, key_props, now)
            if existing is None:
                existing = self.certificates[name.lower()] = _Certificate(name, [], new_policy)
            elif body.get("policy"):
                existing.policy = new_policy
            existing.versions.append(item)
            return self._bundle(existing, item)

    def get(self, name: str, version: str | None) -> dict[str, Any]:
        with self.lock:
            cert = self._live(name)
            return self._bundle(cert, cert.version(version) if version else cert.latest)

    def policy(self, name: str) -> dict[str, Any]:
        with self.lock:
            cert = self._live(name)
            return dict(cert.policy, id=f"{self.base_url}/certificates/{cert.name}/policy")

    def update(self, name: str, version: str | None, body: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            cert = self._live(name)
            item = cert.version(version) if version else cert.latest
            attributes = body.get("attributes") or {}
            if "enabled" in attributes and attributes["enabled"] is not None:
                item.enabled = bool(attributes["enabled"])
            if body.get("tags") is not None:
                item.tags = dict(body["tags"])
            item.updated = _now()
            return self._bundle(cert, item)

    def list_certificates(self) -> list[dict[str, Any]]:
        with self.lock:
            return [self._item(c, c.latest, with_version=False)
                    for c in sorted(self.certificates.values(), key=lambda c: c.name.lower()) if c.deleted is None]

    def list_versions(self, name: str) -> list[dict[str, Any]]:
        with self.lock:
            cert = self.certificates.get(name.lower())
            if cert is None or cert.deleted is not None:
                return []  # Key Vault answers an empty list for a name it does not hold
            return [self._item(cert, item, with_version=True) for item in cert.versions]

    def delete(self, name: str) -> dict[str, Any]:
        with self.lock:
            cert = self._live(name)
            cert.deleted = _now()
            return self._deleted_bundle(cert)

    def get_deleted(self, name: str) -> dict[str, Any]:
        with self.lock:
            cert = self.certificates.get(name.lower())
            if cert is None or cert.deleted is None:
                raise VaultHttpError(404, "CertificateNotFound", f"Deleted Certificate not found: {name}")
            return self._deleted_bundle(cert)

    def purge(self, name: str) -> None:
        with self.lock:
            cert = self.certificates.get(name.lower())
            if cert is None or cert.deleted is None:
                raise VaultHttpError(404, "CertificateNotFound", f"Deleted Certificate not found: {name}")
            del self.certificates[name.lower()]

    def recover(self, name: str) -> dict[str, Any]:
        with self.lock:
            cert = self.certificates.get(name.lower())
            if cert is None or cert.deleted is None:
                raise VaultHttpError(404, "CertificateNotFound", f"Deleted Certificate not found: {name}")
            cert.deleted = None
            return self._bundle(cert, cert.latest)

    def secret(self, name: str, version: str | None) -> dict[str, Any]:
        with self.lock:
            cert = self.certificates.get(name.lower())
            if cert is None or cert.deleted is not None:
                raise _not_found(name, "secret")
            try:
                item = cert.version(version) if version else cert.latest
            except VaultHttpError:
                raise _not_found(f"{name}/{version}", "secret") from None
            if not item.enabled:
                raise VaultHttpError(403, "Forbidden", "Operation get is not allowed on a disabled secret.")
            return {"value": item.secret_value, "contentType": item.content_type,
                    "id": f"{self.base_url}/secrets/{cert.name}/{item.version}",
                    "kid": f"{self.base_url}/keys/{cert.name}/{item.version}", "managed": True,
                    "attributes": {"enabled": item.enabled, "nbf": item.nbf, "exp": item.exp,
                                   "created": item.created, "updated": item.updated,
                                   "recoveryLevel": "Recoverable+Purgeable", "recoverableDays": RECOVERABLE_DAYS},
                    "tags": dict(item.tags)}


def _parse_import(value: str, password: str | None,
                  content_type: str) -> tuple[x509.Certificate, list[x509.Certificate], dict[str, Any], str]:
    """(leaf, chain, key properties, secret value) of an import's ``value``, or 400 BadParameter."""
    if value.lstrip().startswith("-----BEGIN"):
        data = value.encode("ascii", "replace")
    else:
        try:
            data = base64.b64decode(value, validate=True)
        except ValueError:
            raise VaultHttpError(400, "BadParameter", "The specified certificate value is not valid base64.") from None
    is_pem = data.lstrip().startswith(b"-----BEGIN")
    if content_type == PEM_CONTENT_TYPE and not is_pem:
        raise VaultHttpError(400, "BadParameter", "The specified PEM X.509 certificate content is in an unexpected "
                                                  "format. Please check if certificate is in valid PEM format.")
    if content_type == PFX_CONTENT_TYPE and is_pem:
        raise VaultHttpError(400, "BadParameter", "The specified PFX content is in an unexpected format: the policy's "
                                                  "content type is application/x-pkcs12.")
    if content_type not in (PEM_CONTENT_TYPE, PFX_CONTENT_TYPE):
        raise VaultHttpError(400, "BadParameter", f"Unsupported content type {content_type!r}.")
    try:
        bundle = load_bundle(data, source="import", password=password.encode() if password else None)
    except ParseError as exc:
        raise VaultHttpError(400, "BadParameter", f"The specified certificate content could not be read: "
                                                  f"{exc.detail}") from None
    if len(bundle.private_keys) != 1 or not bundle.certificates:
        raise VaultHttpError(400, "BadParameter", "The certificate to import must contain exactly one private key "
                                                  "and its X.509 certificate.")
    key = bundle.private_keys[0]
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    key_public = key.public_key().public_bytes(serialization.Encoding.DER, spki)
    leaves = [c for c in bundle.certificates
              if c.public_key().public_bytes(serialization.Encoding.DER, spki) == key_public]
    if not leaves:
        raise VaultHttpError(400, "BadParameter", "Private key is not matching with the certificate: the public key "
                                                  "of the certificate and the private key do not form a pair.")
    leaf = leaves[0]
    chain = [c for c in bundle.certificates if c is not leaf]
    if isinstance(key, rsa.RSAPrivateKey):
        key_props: dict[str, Any] = {"exportable": True, "kty": "RSA", "key_size": key.key_size, "reuse_key": False}
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        curve = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}.get(key.curve.name, key.curve.name)
        key_props = {"exportable": True, "kty": "EC", "crv": curve, "key_size": key.key_size, "reuse_key": False}
    else:
        raise VaultHttpError(400, "BadParameter", "Key Vault certificates take RSA or EC keys only.")
    if content_type == PEM_CONTENT_TYPE:
        secret = (key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
                  + b"".join(c.public_bytes(serialization.Encoding.PEM) for c in [leaf, *chain])).decode("ascii")
    else:
        secret = base64.b64encode(data).decode("ascii")
    del key
    return leaf, chain, key_props, secret


def _policy(leaf: x509.Certificate, content_type: str, key_props: dict[str, Any], now: int) -> dict[str, Any]:
    try:
        sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns_names = sans.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        dns_names = []
    months = max(1, round((leaf.not_valid_after_utc - leaf.not_valid_before_utc).days / 30))
    x509_props: dict[str, Any] = {"subject": leaf.subject.rfc4514_string(), "validity_months": months, "ekus": []}
    if dns_names:
        x509_props["sans"] = {"dns_names": dns_names}
    return {"key_props": key_props, "secret_props": {"contentType": content_type}, "x509_props": x509_props,
            "lifetime_actions": [{"trigger": {"lifetime_percentage": 80}, "action": {"action_type": "EmailContacts"}}],
            "issuer": {"name": "Unknown"}, "attributes": {"enabled": True, "created": now, "updated": now}}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass  # requests are recorded in KeyVaultServer.requests instead

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(10)  # a client that stalls mid-request does not hold a thread forever
        # Headers and body go out in separate writes: without this, Nagle and delayed ACKs add 40 ms a request.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _handle(self) -> None:
        owner = self.server.owner
        split = urlsplit(self.path)
        with owner.lock:
            owner.requests.append((self.command, split.path))
            delay, drop, generation = owner.delay, owner.drop, owner.generation
            injected = None
            for index, (status, retry_after, prefix) in enumerate(owner.injected):
                if split.path.startswith(prefix):
                    injected = (status, retry_after)
                    del owner.injected[index]
                    break
        if delay:
            owner.stopping.wait(delay)
        if drop or generation != owner.generation:  # dropping, or reset while delayed: no late effects
            self.close_connection = True
            self.connection.close()
            return
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if injected is not None:
            status, retry_after = injected
            headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
            code = {429: "Throttled", 403: "Forbidden", 404: "NotFound"}.get(status, "InternalServerError")
            self._error(VaultHttpError(status, code, f"injected by the lab server (HTTP {status})"), headers)
            return
        if self.headers.get("Authorization") != f"Bearer {owner.token}":
            challenge = (f'Bearer authorization="https://login.microsoftonline.com/{TENANT}", '
                         f'resource="https://vault.azure.net"')
            message = ("AKV10000: Request is missing a Bearer or PoP token." if "Authorization" not in self.headers
                       else "AKV10032: Invalid issuer or token.")
            self._error(VaultHttpError(401, "Unauthorized", message), {"WWW-Authenticate": challenge})
            return
        query = parse_qs(split.query)
        try:
            if query.get("api-version", [""])[0] not in API_VERSIONS:
                raise VaultHttpError(400, "BadParameter", "The specified version is not supported: give a known "
                                                          "api-version.")
            body = json.loads(raw) if raw else {}
            if not isinstance(body, dict):
                raise VaultHttpError(400, "BadParameter", "The request body must be a JSON object.")
            status, payload = owner.route(self.command, split.path, query, body)
        except VaultHttpError as exc:
            self._error(exc)
            return
        except json.JSONDecodeError:
            self._error(VaultHttpError(400, "BadParameter", "The request body is not valid JSON."))
            return
        self._send(status, payload)

    do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _handle

    def _error(self, exc: VaultHttpError, headers: dict[str, str] | None = None) -> None:
        self._send(exc.status, {"error": {"code": exc.code, "message": exc.message}}, headers)

    def _send(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        if data:
            self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-ms-keyvault-service-version", "1.9.0.0")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    owner: KeyVaultServer
    context: ssl.SSLContext

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = self.socket.accept()
        # The handshake happens in the handler's thread, on first read, not in the accepting loop.
        return self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), address

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that went away mid-response (timeouts are the point of some tests)


class KeyVaultServer:
    """A Key Vault on https://127.0.0.1:PORT (a free port below 32768) with its own CA, in threads.

    ``token`` is the one bearer token accepted; ``page_size`` is the default page size of the list
    operations (a request's ``maxresults`` may lower it)."""

    def __init__(self, workdir: Path, *, token: str = DEFAULT_TOKEN, page_size: int = 25) -> None:
        self.token = token
        self.page_size = page_size
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str]] = []
        self.delay = 0.0
        self.drop = False
        self.injected: list[tuple[int, int | None, str]] = []
        self.stopping = threading.Event()
        self.generation = 0  # bumped by reset(), so a request delayed across a reset changes nothing
        self.ca_file, cert_file, key_file = make_server_identity(workdir)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(cert_file, key_file)
        self._httpd = _bind(context)
        self._httpd.owner = self
        self.port = self._httpd.server_address[1]
        self.url = f"https://127.0.0.1:{self.port}"
        self.host = f"127.0.0.1:{self.port}"
        self.vault = _Vault(self.url)
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"keyvault-{self.port}", daemon=True)
        self._thread.start()

    # -- control, for tests

    def hostile(self, *, delay: float = 0.0, drop: bool = False) -> None:
        """Answer every request only after ``delay`` seconds, or (``drop``) close it unanswered."""
        with self.lock:
            self.delay, self.drop = delay, drop

    def fail_next(self, status: int, count: int = 1, retry_after: int | None = None, path: str = "/") -> None:
        """Answer the next ``count`` requests whose path starts with ``path`` with ``status`` (500, 503,
        429, 403...) and a Key Vault error, before authentication."""
        with self.lock:
            self.injected.extend([(status, retry_after, path)] * count)

    def reset(self) -> None:
        """Forget every certificate, recorded request and hostile setting."""
        self.stopping.set()  # wakes delayed handlers
        with self.lock, self.vault.lock:
            self.vault.certificates.clear()
            self.requests.clear()
            self.injected.clear()
            self.delay, self.drop = 0.0, False
            self.generation += 1
        self.stopping.clear()

    def latest(self, name: str) -> x509.Certificate | None:
        """The current version's certificate, read from the vault's state (not through the API)."""
        with self.vault.lock:
            cert = self.vault.certificates.get(name.lower())
            if cert is None or cert.deleted is not None:
                return None
            return x509.load_der_x509_certificate(cert.latest.der)

    def version_count(self, name: str) -> int:
        with self.vault.lock:
            cert = self.vault.certificates.get(name.lower())
            return len(cert.versions) if cert else 0

    def is_deleted(self, name: str) -> bool:
        with self.vault.lock:
            cert = self.vault.certificates.get(name.lower())
            return cert is not None and cert.deleted is not None

    def stop(self) -> None:
        self.stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> KeyVaultServer:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    # -- routing

    def route(self, method: str, path: str, query: dict[str, list[str]], body: dict[str, Any]) -> tuple[int, Any]:
        parts = [p for p in path.split("/")]
        parts = parts[1:] if parts and parts[0] == "" else parts
        trailing = bool(parts) and parts[-1] == ""
        parts = [p for p in parts if p]
        vault = self.vault
        match (method, parts):
            case ("GET", ["certificates"]):
                return 200, self._page(vault.list_certificates(), path, query)
            case ("GET", ["certificates", name, "versions"]):
                return 200, self._page(vault.list_versions(name), path, query)
            case ("GET", ["certificates", name, "policy"]):
                return 200, vault.policy(name)
            case ("POST", ["certificates", name, "import"]):
                return 200, vault.import_certificate(name, body)
            case ("GET", ["certificates", name]):
                return 200, vault.get(name, None)
            case ("GET", ["certificates", name, version]):
                return 200, vault.get(name, version)
            case ("PATCH", ["certificates", name]) if trailing:
                return 200, vault.update(name, None, body)
            case ("PATCH", ["certificates", name, version]):
                return 200, vault.update(name, version, body)
            case ("DELETE", ["certificates", name]):
                return 200, vault.delete(name)
            case ("GET", ["deletedcertificates", name]):
                return 200, vault.get_deleted(name)
            case ("DELETE", ["deletedcertificates", name]):
                vault.purge(name)
                return 204, None
            case ("POST", ["deletedcertificates", name, "recover"]):
                return 200, vault.recover(name)
            case ("GET", ["secrets", name]):
                return 200, vault.secret(name, None)
            case ("GET", ["secrets", name, version]):
                return 200, vault.secret(name, version)
        raise VaultHttpError(400, "BadParameter", f"The lab vault does not serve {method} {path}.")

    def _page(self, items: list[dict[str, Any]], path: str, query: dict[str, list[str]]) -> dict[str, Any]:
        try:
            size = min(self.page_size, int(query.get("maxresults", [self.page_size])[0]))
            start = int(query.get("$skiptoken", ["0"])[0])
        except ValueError:
            raise VaultHttpError(400, "BadParameter", "maxresults and $skiptoken must be integers.") from None
        if size < 1:
            raise VaultHttpError(400, "BadParameter", "maxresults must be at least 1.")
        page = items[start:start + size]
        next_link = None
        if start + size < len(items):
            api_version = query.get("api-version", ["2026-04-01"])[0]
            next_link = (f"{self.url}{quote(path)}?api-version={api_version}"
                         f"&$skiptoken={start + size}&maxresults={size}")
        return {"value": page, "nextLink": next_link}


def _bind(context: ssl.SSLContext) -> _Server:
    """A server on a free port in PORT_RANGE: try random ports, binding directly (no check-then-bind race)."""
    ports = random.sample(range(*PORT_RANGE), 200)
    for port in ports:
        try:
            server = _Server(("127.0.0.1", port), _Handler)
        except OSError:
            continue
        server.context = context
        return server
    raise OSError(f"no free port in {PORT_RANGE[0]}..{PORT_RANGE[1]} after {len(ports)} tries")
