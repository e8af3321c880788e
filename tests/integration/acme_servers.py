"""Real ACME servers on loopback for the tests and the benchmark: pebble 2.4 and pebble-challtestsrv.

Started as TESTING.md describes: challtestsrv answers DNS for every name with 127.0.0.1 (and no AAAA,
so the VA does not dial [::1] first), serves dns-01 TXT records set through its management API, and
leaves http-01 to our own responder (``-http01 ""``). pebble gets a TLS certificate made by a test CA
of our own, runs with -strict=false, no validation sleeps, no rejected nonces unless asked, and no
authorisation reuse, so tests are deterministic. Every port is picked free at start, so two test
sessions on one machine do not collide. The CA is new on every start: fetch its root from the
management port.

    with ChallTestSrv.start(workdir) as dns, Pebble.start(workdir, dns=dns, http_port=port) as ca:
        ca.directory_url, ca.ca_bundle, ca.roots(), ca.cert_status(serial)
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from certpilot.sample_estate import Authority, key_pem, make_ca, pem
from lab.ports import free_port  # noqa: F401  (the ACME tests take it from here)

EAB_EXAMPLE_CONFIG = Path("/usr/share/doc/pebble/examples/pebble-config-external-account-bindings.json")
START_DEADLINE = 15.0
# pebble refuses these with rejectedIdentifier (its "domainBlocklist", which covers their subdomains too).
BLOCKED_DOMAINS = ("blocked.certpilot.test",)


class ServerMissingError(RuntimeError):
    """A server binary the tests need is not installed."""




def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ServerMissingError(f"{name} is not installed: run `bash scripts/setup.sh --servers` "
                                 f"(it installs the Debian package pebble, which ships {name})")
    return path


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the test process dies, even by SIGKILL (Linux)."""
    try:
        import ctypes  # noqa: PLC0415

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _trust(bundle: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(bundle))


def _stop(process: subprocess.Popen[bytes] | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _wait_until(ready: callable, process: subprocess.Popen[bytes], what: str, log: Path,  # type: ignore[valid-type]
                deadline: float = START_DEADLINE) -> None:
    end = time.monotonic() + deadline
    delay = 0.02
    try:
        while time.monotonic() < end:
            if process.poll() is not None:
                raise RuntimeError(f"{what} exited with status {process.returncode} while starting:\n{_log_tail(log)}")
            try:
                if ready():
                    return
            except (httpx.HTTPError, OSError):
                pass
            time.sleep(delay)
            delay = min(delay * 1.5, 0.2)
        raise RuntimeError(f"{what} did not answer within {deadline:.0f} s:\n{_log_tail(log)}")
    except BaseException:
        _stop(process)  # never leave a half-started server behind
        raise


def make_tls_identity(workdir: Path, ca: Authority | None = None) -> tuple[Path, Path, Path]:
    """A CA of the tests' own and a server certificate for 127.0.0.1 and localhost.
    Returns (ca_bundle, certificate, key) paths."""
    now = dt.datetime.now(dt.timezone.utc)
    ca = ca or make_ca("certpilot test ACME TLS CA", now=now)
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca.certificate.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca.key.public_key()), critical=False)  # type: ignore[arg-type]
            .sign(ca.key, hashes.SHA256()))  # type: ignore[arg-type]
    workdir.mkdir(parents=True, exist_ok=True)
    bundle, cert_path, key_path = workdir / "tls-ca.pem", workdir / "tls-cert.pem", workdir / "tls-key.pem"
    bundle.write_bytes(pem(ca.certificate))
    cert_path.write_bytes(pem(leaf))
    key_path.write_bytes(key_pem(key))
    os.chmod(key_path, 0o600)
    return bundle, cert_path, key_path


@dataclass
class ChallTestSrv:
    """pebble-challtestsrv: DNS on ``dns_port`` (every name is 127.0.0.1), TXT records through the
    management API; http-01, https-01 and tls-alpn-01 responders off (we run our own)."""

    dns_port: int
    management_port: int
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def dns_address(self) -> str:
        return f"127.0.0.1:{self.dns_port}"

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.management_port}"

    @classmethod
    def start(cls, workdir: Path) -> ChallTestSrv:
        exe = binary("pebble-challtestsrv")
        workdir.mkdir(parents=True, exist_ok=True)
        server = cls(dns_port=free_port(), management_port=free_port())
        log = workdir / "challtestsrv.log"
        with open(log, "wb") as out:
            server.process = subprocess.Popen(
                [exe, "-defaultIPv4", "127.0.0.1", "-defaultIPv6", "", "-dns01", server.dns_address,
                 "-http01", "", "-https01", "", "-tlsalpn01", "",
                 "-management", f"127.0.0.1:{server.management_port}"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)

        def ready() -> bool:
            # Any HTTP answer means the management API is up (it has no GET endpoints).
            httpx.get(server.management_url + "/", timeout=1.0)
            return True

        _wait_until(ready, server.process, "pebble-challtestsrv", log)
        return server

    def stop(self) -> None:
        _stop(self.process)

    def __enter__(self) -> ChallTestSrv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class Pebble:
    """A pebble ACME server. ``ca_bundle`` is the PEM of the test CA that signed its TLS certificate."""

    port: int
    management_port: int
    http_port: int
    ca_bundle: Path
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    log: Path | None = None

    @property
    def directory_url(self) -> str:
        return f"https://127.0.0.1:{self.port}/dir"

    @property
    def management_url(self) -> str:
        return f"https://127.0.0.1:{self.management_port}"

    @classmethod
    def start(cls, workdir: Path, *, dns: ChallTestSrv, http_port: int, nonce_reject: int = 0,
              authz_reuse: int = 0, alternate_roots: int = 0, eab: bool = False,
              tls: tuple[Path, Path, Path] | None = None, validity_seconds: int | None = None,
              tls_port: int | None = None) -> Pebble:
        """Start pebble validating http-01 on 127.0.0.1:``http_port`` (tls-alpn-01 on ``tls_port``) and
        resolving through ``dns``.
        ``eab`` takes the external account binding keys of Debian's example configuration."""
        exe = binary("pebble")
        workdir.mkdir(parents=True, exist_ok=True)
        bundle, cert_path, key_path = tls or make_tls_identity(workdir)
        config: dict[str, object] = {
            "listenAddress": "", "managementListenAddress": "", "certificate": str(cert_path),
            "privateKey": str(key_path), "httpPort": http_port, "tlsPort": tls_port or free_port(),
            "ocspResponderURL": "", "externalAccountBindingRequired": False,
            "domainBlocklist": list(BLOCKED_DOMAINS),
        }
        if eab:
            if not EAB_EXAMPLE_CONFIG.exists():
                raise ServerMissingError(f"{EAB_EXAMPLE_CONFIG} is missing: reinstall the Debian package pebble")
            example = json.loads(EAB_EXAMPLE_CONFIG.read_text())["pebble"]
            config["externalAccountBindingRequired"] = True
            config["externalAccountMACKeys"] = example["externalAccountMACKeys"]
        if validity_seconds is not None:
            config["certificateValidityPeriod"] = validity_seconds
        server = cls(port=free_port(), management_port=free_port(), http_port=http_port, ca_bundle=bundle,
                     env={"PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": str(nonce_reject),
                          "PEBBLE_AUTHZREUSE": str(authz_reuse), "PEBBLE_ALTERNATE_ROOTS": str(alternate_roots)})
        config["listenAddress"] = f"127.0.0.1:{server.port}"
        config["managementListenAddress"] = f"127.0.0.1:{server.management_port}"
        config_path = workdir / "pebble-config.json"
        config_path.write_text(json.dumps({"pebble": config}, indent=2))
        log = server.log = workdir / "pebble.log"
        with open(log, "wb") as out:
            server.process = subprocess.Popen(
                [exe, "-config", str(config_path), "-dnsserver", dns.dns_address, "-strict=false"],
                env={**os.environ, **server.env}, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent, cwd=workdir)

        def ready() -> bool:
            return httpx.get(server.directory_url, verify=_trust(bundle), timeout=1.0).status_code == 200

        _wait_until(ready, server.process, "pebble", log)
        return server

    def get(self, path: str) -> httpx.Response:
        """GET from the management port (roots, intermediates, certificate status)."""
        return httpx.get(self.management_url + path, verify=_trust(self.ca_bundle), timeout=5.0)

    def roots(self) -> list[x509.Certificate]:
        """Every root pebble signs under: root 0, then the alternate roots."""
        found = [x509.load_pem_x509_certificate(self.get("/roots/0").content)]
        for index in range(1, int(self.env.get("PEBBLE_ALTERNATE_ROOTS", "0")) + 1):
            found.append(x509.load_pem_x509_certificate(self.get(f"/roots/{index}").content))
        return found

    def cert_status(self, serial: int) -> dict[str, object]:
        """pebble's record of a certificate, e.g. {"Status": "Revoked", "Reason": 4, ...}."""
        response = self.get(f"/cert-status-by-serial/{serial:x}")
        response.raise_for_status()
        return response.json()

    def issued(self) -> dict[int, str]:
        """Every certificate this pebble has issued, as its log says (``Issued certificate serial S for order
        O``): serial -> order id. The CA's own count, for tests that must see no certificate issued twice."""
        found: dict[int, str] = {}
        assert self.log is not None
        for line in self.log.read_text(errors="replace").splitlines():
            words = line.split()
            if "Issued certificate serial" in line and "for order" in line:
                at = words.index("serial")
                found[int(words[at + 1], 16)] = words[at + 4]
        return found

    def orders(self) -> set[str]:
        """Every order this pebble has created, as its log says (``Added order "O" to the db``)."""
        assert self.log is not None
        return {line.split('"')[1] for line in self.log.read_text(errors="replace").splitlines()
                if "Added order" in line and line.count('"') >= 2}

    def stop(self) -> None:
        _stop(self.process)

    def __enter__(self) -> Pebble:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


# -- A front of the tests' own before pebble: ARI, and problem documents on demand ---------------------

@dataclass
class Injection:
    path_prefix: str
    status: int
    problem: dict[str, object]
    headers: dict[str, str]
    times: int


class AcmeFront:
    """An HTTPS server in front of pebble that adds what pebble 2.4 lacks.

    Every request is forwarded to pebble with this server's own Host header, so pebble (which builds
    every URL from the request's Host) hands out URLs on this server and checks JWS ``url`` headers
    against them: the client talks only to the front. On top of that:

    - the directory gains ``renewalInfo``, answered here from ``windows`` (CertID -> (start, end,
      Retry-After seconds)); unknown CertIDs get 404, as RFC 9773 says;
    - ``inject(path_prefix, status, problem, headers)`` answers the next matching request(s) with a
      problem document of the test's choosing (and a real nonce fetched from pebble);
    - ``posts`` records (path, JWS payload as JSON) of every POST, e.g. to see newOrder's ``replaces``.

    pebble 2.4 ignores the unknown ``replaces`` field in newOrder (Go's json.Unmarshal skips unknown
    fields), so the front forwards it unchanged.
    """

    def __init__(self, pebble: Pebble, tls: tuple[Path, Path, Path]) -> None:
        import http.server  # noqa: PLC0415
        import threading  # noqa: PLC0415

        self.pebble = pebble
        self.windows: dict[str, tuple[dt.datetime, dt.datetime, int | None]] = {}
        self.renewal_info_requests: list[str] = []
        self.posts: list[tuple[str, dict[str, object] | None, float]] = []
        self._injections: list[Injection] = []
        self._lock = threading.Lock()
        self._upstream = httpx.Client(verify=_trust(pebble.ca_bundle), timeout=10.0)
        front = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 10

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

            def setup(self) -> None:
                super().setup()
                self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no Nagle delay per reply

            def _reply(self, status: int, body: bytes, headers: dict[str, str]) -> None:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                if self.command == "POST":
                    front._record_post(self.path, body)
                if self.path.startswith("/renewal-info/") and self.command == "GET":
                    return self._reply(*front._renewal_info(self.path.removeprefix("/renewal-info/")))
                injected = front._take_injection(self.path)
                if injected is not None:
                    return self._reply(*injected)
                status, payload, headers = front._forward(self.command, self.path, body, dict(self.headers))
                self._reply(status, payload, headers)

            do_GET = do_POST = do_HEAD = _handle  # noqa: N815

        _, cert_path, key_path = tls
        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 64

        self.server = Server(("127.0.0.1", 0), Handler)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert_path, key_path)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def directory_url(self) -> str:
        return f"https://{self.host}/dir"

    def _record_post(self, path: str, body: bytes) -> None:
        import base64  # noqa: PLC0415

        payload: dict[str, object] | None = None
        try:
            encoded = json.loads(body)["payload"]
            if encoded:
                payload = json.loads(base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)))
        except (ValueError, KeyError, TypeError):
            pass
        with self._lock:
            self.posts.append((path, payload, time.monotonic()))

    def _forward(self, method: str, path: str, body: bytes,
                 headers: dict[str, str]) -> tuple[int, bytes, dict[str, str]]:
        keep = {k: v for k, v in headers.items() if k.lower() in ("content-type", "accept", "user-agent")}
        keep["Host"] = self.host
        response = self._upstream.request(method, f"https://127.0.0.1:{self.pebble.port}{path}", content=body,
                                          headers=keep)
        out = {k: v for k, v in response.headers.multi_items()
               if k.lower() in ("content-type", "location", "replay-nonce", "retry-after", "cache-control")}
        links = response.headers.get_list("link")
        payload = response.content
        if path == "/dir" and response.status_code == 200:
            directory = json.loads(payload)
            directory["renewalInfo"] = f"https://{self.host}/renewal-info"
            payload = json.dumps(directory).encode()
        result_headers = dict(out)
        if links:
            result_headers["Link"] = ", ".join(links)
        return response.status_code, payload, result_headers

    def _renewal_info(self, cert_id: str) -> tuple[int, bytes, dict[str, str]]:
        with self._lock:
            self.renewal_info_requests.append(cert_id)
            window = self.windows.get(cert_id)
        if window is None:
            problem = {"type": "urn:ietf:params:acme:error:malformed", "detail": f"no certificate {cert_id}",
                       "status": 404}
            return 404, json.dumps(problem).encode(), {"Content-Type": "application/problem+json"}
        start, end, retry_after = window
        body = {"suggestedWindow": {"start": start.isoformat().replace("+00:00", "Z"),
                                    "end": end.isoformat().replace("+00:00", "Z")},
                "explanationURL": "https://certpilot.test/why"}
        headers = {"Content-Type": "application/json"}
        if retry_after is not None:
            headers["Retry-After"] = str(retry_after)
        return 200, json.dumps(body).encode(), headers

    def inject(self, path_prefix: str, status: int, problem: dict[str, object], headers: dict[str, str] | None = None,
               times: int = 1) -> None:
        with self._lock:
            self._injections.append(Injection(path_prefix, status, problem, dict(headers or {}), times))

    def _take_injection(self, path: str) -> tuple[int, bytes, dict[str, str]] | None:
        with self._lock:
            for injection in self._injections:
                if path.startswith(injection.path_prefix) and injection.times > 0:
                    injection.times -= 1
                    break
            else:
                return None
            self._injections = [i for i in self._injections if i.times > 0]
        nonce = self._upstream.head(f"https://127.0.0.1:{self.pebble.port}/nonce-plz",
                                    headers={"Host": self.host}).headers["Replay-Nonce"]
        headers = {"Content-Type": "application/problem+json", "Replay-Nonce": nonce, **injection.headers}
        return injection.status, json.dumps({**injection.problem, "status": injection.status}).encode(), headers

    def reset(self) -> None:
        with self._lock:
            self.windows.clear()
            self.renewal_info_requests.clear()
            self.posts.clear()
            self._injections.clear()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._upstream.close()


def query_txt(dns_port: int, name: str, timeout: float = 2.0) -> list[str]:
    """Ask the DNS server on 127.0.0.1:``dns_port`` for ``name``'s TXT records (one UDP query, no library)."""
    import random  # noqa: PLC0415
    import struct  # noqa: PLC0415

    query_id = random.randrange(1 << 16)
    question = b"".join(bytes([len(label)]) + label.encode("ascii") for label in name.rstrip(".").split(".")) + b"\0"
    packet = struct.pack(">HHHHHH", query_id, 0x0100, 1, 0, 0, 0) + question + struct.pack(">HH", 16, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(packet, ("127.0.0.1", dns_port))
        answer = sock.recv(65535)
    _, _, _, ancount, _, _ = struct.unpack(">HHHHHH", answer[:12])
    offset = 12 + len(question) + 4

    def skip_name(at: int) -> int:
        while True:
            length = answer[at]
            if length == 0:
                return at + 1
            if length & 0xC0 == 0xC0:
                return at + 2
            at += 1 + length

    values = []
    for _ in range(ancount):
        offset = skip_name(offset)
        rtype, _, _, rdlength = struct.unpack(">HHIH", answer[offset:offset + 10])
        offset += 10
        if rtype == 16:
            rdata, parts, at = answer[offset:offset + rdlength], [], 0
            while at < len(rdata):
                parts.append(rdata[at + 1:at + 1 + rdata[at]])
                at += 1 + rdata[at]
            values.append(b"".join(parts).decode())
        offset += rdlength
    return values


def verified_chain(chain: list[x509.Certificate], root: x509.Certificate, dns_name: str) -> list[x509.Certificate]:
    """Path-validate ``chain`` (leaf first) up to ``root`` as a TLS server certificate for ``dns_name``
    (cryptography's RFC 5280 / CA/B Forum verifier). Raises if it does not chain."""
    from cryptography.x509 import verification  # noqa: PLC0415

    verifier = (verification.PolicyBuilder().store(verification.Store([root]))
                .build_server_verifier(x509.DNSName(dns_name)))
    return verifier.verify(chain[0], chain[1:])


def san_dns_names(certificate: x509.Certificate) -> list[str]:
    sans = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return sans.get_values_for_type(x509.DNSName)


def alpn_certificate(port: int, server_name: str) -> x509.Certificate | None:
    """The certificate a tls-alpn-01 responder on 127.0.0.1:``port`` presents for ``server_name`` to a
    client offering only "acme-tls/1", or None when it refuses the handshake."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["acme-tls/1"])
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as raw, \
                context.wrap_socket(raw, server_hostname=server_name) as tls:
            der = tls.getpeercert(binary_form=True)
            assert tls.selected_alpn_protocol() == "acme-tls/1"
    except (ssl.SSLError, ConnectionError):
        return None
    return x509.load_der_x509_certificate(der) if der else None
