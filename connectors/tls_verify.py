"""One TLS handshake on the wire, and the proof that an endpoint serves the certificate it should.

``fetch_chain`` does one client handshake and returns what the server presented (DER, leaf first, as
presented), the TLS version and the cipher. It verifies nothing: deciding trust is certpilot's job.
The handshake runs over memory BIOs on a plain socket, so that one deadline covers connect, handshake and
read (a server that drip-feeds bytes cannot stretch it) and the bytes read are capped (a server sending an
absurd chain costs at most ``max_bytes``). Every failure is a TlsProbeError (transient) naming host:port,
the SNI and what happened (refused, timed out, not TLS, a TLS alert, closed, too large), raised as the
subclass named by its cause: TlsUnreachableError, TlsTimeoutError or TlsHandshakeError.

``wait_until_served`` proves a deployment on the wire: it handshakes until the leaf's SHA-256 equals the
expected fingerprint on ``consecutive`` handshakes in a row (nginx's old workers keep serving the old
certificate for 100 to 200 ms after a reload), then checks

- the chain is complete:
  * with ``trust`` (CA certificates): starting at the leaf, the presented certificates link by signature
    (in any order) to a certificate issued by, or equal to, one of the trust anchors;
  * without ``trust``: the presented certificates link the leaf by signature to a self-signed root, or to a
    presented CA certificate (an intermediate, whose root clients are assumed to hold). A leaf presented
    alone is incomplete unless it is self-signed; give ``trust`` to accept a leaf issued directly by a root;
- the hostname (``hostname``, else ``sni``; no check when neither is given) matches the leaf's
  subjectAltName (RFC 6125 / RFC 9525, by ``certpilot.names.check_hostname``, re-exported here): DNS
  names compared case-insensitively as A-labels, a wildcard only as the whole left-most label, matching
  exactly one label (``*.a.b`` matches ``x.a.b``, not ``a.b`` nor ``y.x.a.b``), never a wildcard over
  fewer than two labels; IP addresses against IP SANs only; the subject CN is never used.

Validity dates are not checked here (the scanner's verification and the monitor flow look at them).
It returns a Verification(method="tls") or raises VerificationError with the precise reason.
"""

from __future__ import annotations

import hashlib
import socket
import ssl
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from certpilot.deployment import Verification, VerificationError
from certpilot.errors import EndpointTimeoutError, EndpointUnreachableError, HandshakeFailedError, TransientError
from certpilot.names import check_hostname
from certpilot.x509info import fingerprint_sha256, is_issued_by

__all__ = ["MAX_HANDSHAKE_BYTES", "ClientHandshake", "Presented", "TlsHandshakeError", "TlsProbeError", "TlsTimeoutError",
           "TlsUnreachableError", "check_chain", "check_hostname", "client_context", "endpoint_label", "fetch_chain",
           "wait_until_served"]

MAX_HANDSHAKE_BYTES = 64 * 1024  # a server's flight with a sane chain is a few KiB; OpenSSL's own cap is 100 KiB
_RECV = 16 * 1024 + 64
# ssl re-exports no name for it; typeshed does not describe the private _ssl module
_ENCODING_DER = ssl._ssl.ENCODING_DER  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Presented:
    """What one handshake showed: the certificates as presented (DER, leaf first), the protocol, the cipher."""

    chain: tuple[bytes, ...]
    tls_version: str
    cipher: str

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the leaf's DER, lower-case hex."""
        return hashlib.sha256(self.chain[0]).hexdigest()


class TlsProbeError(TransientError):
    """One handshake failed. ``kind`` is one of: refused, timeout, silent, slow, not-tls, alert, closed,
    reset, too-large, unresolved, unreachable, tls-error; ``detail`` says exactly what happened.

    Raised as the subclass named by its cause (``TlsProbeError.of`` picks it): TlsUnreachableError
    (an EndpointUnreachableError: refused, reset, unresolved, unreachable), TlsTimeoutError (an
    EndpointTimeoutError: timeout, silent, slow; ``timeout`` in seconds) or TlsHandshakeError (a
    HandshakeFailedError: not-tls, alert, closed, too-large, tls-error)."""

    def __init__(self, host: str, port: int, sni: str | None, kind: str, detail: str,
                 timeout: float | None = None) -> None:
        self.host, self.port, self.sni, self.kind, self.detail = host, port, sni, kind, detail
        self.timeout = timeout
        self.cause, self.reason = kind, detail  # the cause classes' fields (the message stays the probe's own)
        Exception.__init__(self, f"{endpoint_label(host, port, sni)}: {detail}")

    def __reduce__(self):  # noqa: ANN204 - pickling for Prefect results
        return (type(self), (self.host, self.port, self.sni, self.kind, self.detail, self.timeout))

    @staticmethod
    def of(host: str, port: int, sni: str | None, kind: str, detail: str,
           timeout: float | None = None) -> TlsProbeError:
        """The error of this ``kind``, as the class named by its cause."""
        cls = _PROBE_ERRORS.get(kind, TlsHandshakeError)
        return cls(host, port, sni, kind, detail, timeout)


class TlsUnreachableError(TlsProbeError, EndpointUnreachableError):
    """No TCP connection: refused, reset, unresolved or unreachable (``kind``, also as ``cause``)."""


class TlsTimeoutError(TlsProbeError, EndpointTimeoutError):
    """No connection, or no complete handshake, within ``timeout`` seconds (timeout, silent, slow)."""

    timeout: float


class TlsHandshakeError(TlsProbeError, HandshakeFailedError):
    """Connected, but no TLS handshake: not TLS, a TLS alert, closed, too large (``detail``, also as ``reason``)."""


_PROBE_ERRORS: dict[str, type[TlsProbeError]] = {
    **dict.fromkeys(("refused", "reset", "unresolved", "unreachable"), TlsUnreachableError),
    **dict.fromkeys(("timeout", "silent", "slow"), TlsTimeoutError),
    **dict.fromkeys(("not-tls", "alert", "closed", "too-large", "tls-error"), TlsHandshakeError),
}


def endpoint_label(host: str, port: int, sni: str | None = None) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"{shown}:{port}" + (f" sni={sni}" if sni else "")


def client_context(trust: Sequence[x509.Certificate] = (), *, use_system_trust: bool = False,
                   legacy_versions: bool = False) -> ssl.SSLContext:
    """A client context for TLS 1.2 and 1.3 that never checks the hostname.

    With no trust it accepts whatever is presented (CERT_NONE). With trust anchors (``trust`` and/or the
    system's store) OpenSSL verifies the chain during the handshake (an anchor may be an intermediate:
    partial chains are allowed); a chain that does not verify ends the handshake with the server's
    certificates already read, and ClientHandshake records why in ``verify_error``.

    ``legacy_versions`` also offers TLS 1.0 and 1.1 (and the old ciphers they need), so that an endpoint
    that speaks nothing newer answers and can be reported as weak instead of failing the handshake; a
    server that speaks 1.2 or 1.3 still negotiates them."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if legacy_versions:
        with warnings.catch_warnings():  # the ssl module deprecates naming TLS 1.0: naming it is the point here
            warnings.simplefilter("ignore", DeprecationWarning)
            context.minimum_version = ssl.TLSVersion.TLSv1
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
    else:
        context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    if not trust and not use_system_trust:
        context.verify_mode = ssl.CERT_NONE
        return context
    context.verify_mode = ssl.CERT_REQUIRED
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    if trust:
        context.load_verify_locations(cadata=b"".join(c.public_bytes(serialization.Encoding.DER) for c in trust))
    if use_system_trust:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    return context


_DEFAULT_CONTEXT: ssl.SSLContext | None = None


def _default_context() -> ssl.SSLContext:
    global _DEFAULT_CONTEXT
    if _DEFAULT_CONTEXT is None:
        _DEFAULT_CONTEXT = client_context()
    return _DEFAULT_CONTEXT


class ClientHandshake:
    """One client handshake over memory BIOs; the caller moves bytes between it and a socket.

    Used by ``fetch_chain`` (blocking socket) and by the scanner (asyncio), so both say the same things
    about the same failures."""

    __slots__ = ("host", "port", "sni", "max_bytes", "_in", "_out", "_obj", "received", "first_bytes",
                 "verify_error")

    def __init__(self, context: ssl.SSLContext, host: str, port: int, sni: str | None,
                 max_bytes: int = MAX_HANDSHAKE_BYTES) -> None:
        self.host, self.port, self.sni, self.max_bytes = host, port, sni, max_bytes
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._obj = context.wrap_bio(self._in, self._out, server_side=False, server_hostname=sni or None)
        self.received = 0
        self.first_bytes = b""
        self.verify_error: str | None = None  # set when the context verifies and the chain did not

    def error(self, kind: str, detail: str, timeout: float | None = None) -> TlsProbeError:
        return TlsProbeError.of(self.host, self.port, self.sni, kind, detail, timeout)

    def step(self) -> bool:
        """Advance the handshake with what was fed; True when it is complete. Raises TlsProbeError."""
        try:
            self._obj.do_handshake()
            return True
        except ssl.SSLWantReadError:
            return False
        except ssl.SSLCertVerificationError as exc:  # the certificates were read: the handshake ends here
            self.verify_error = exc.verify_message or str(exc.reason)
            return True
        except ssl.SSLError as exc:
            raise self._translate(exc) from None

    def outgoing(self) -> bytes:
        return self._out.read()

    def feed(self, data: bytes) -> None:
        """Give the handshake bytes read from the socket (b"" when the server closed)."""
        if not data:
            if self.received == 0:
                raise self.error("closed", "connection closed by the server before any TLS data")
            if not self._looks_like_tls():
                raise self.not_tls()
            raise self.error("closed", f"connection closed by the server during the handshake after "
                                       f"{self.received} bytes")
        if self.received < 16:
            self.first_bytes = (self.first_bytes + data)[:16]
        self.received += len(data)
        if not self._looks_like_tls():
            raise self.not_tls()
        if self.received > self.max_bytes:
            raise self.error("too-large", f"handshake still incomplete after {self.received} bytes, more than the "
                                          f"{self.max_bytes} read (an oversized certificate chain?): stopped reading")
        self._in.write(data)

    def timeout(self, seconds: float) -> TlsProbeError:
        if self.received == 0:
            return self.error("silent", f"no answer to the TLS ClientHello within {seconds:g} s (connected, silent)",
                              seconds)
        if not self._looks_like_tls():
            return self.not_tls()
        return self.error("slow", f"handshake not complete within {seconds:g} s: {self.received} bytes received "
                                  "(slow or stalled server)", seconds)

    def not_tls(self) -> TlsProbeError:
        return self.error("not-tls", f"not TLS: the server answered {self.first_bytes!r}")

    def closing_bytes(self) -> bytes:
        """Our last handshake flight (e.g. the TLS 1.3 Finished) and a close_notify, to send before closing."""
        try:
            self._obj.unwrap()
        except (ssl.SSLError, OSError):
            pass
        return self._out.read()

    def presented(self) -> Presented:
        obj = self._obj
        if hasattr(obj, "get_unverified_chain"):  # public from Python 3.13, as DER bytes
            raw = obj.get_unverified_chain()
        else:
            # before 3.13 only the private _sslobj has it, and typeshed does not list that attribute
            raw = obj._sslobj.get_unverified_chain()  # type: ignore[attr-defined]
        chain = tuple(c if isinstance(c, bytes) else c.public_bytes(_ENCODING_DER) for c in raw or ())
        if not chain:
            der = obj.getpeercert(binary_form=True)
            if not der:
                raise self.error("tls-error", "handshake completed but the server presented no certificate")
            chain = (der,)
        cipher = obj.cipher()
        name = cipher[0] if cipher else "unknown"
        version = obj.version()  # None when verification ended the handshake; by default we offer only TLS 1.2
        if version is None:  # and 1.3, and only TLS 1.3 uses the TLS_* suites
            version = "TLSv1.3" if name.startswith("TLS_") else "TLSv1.2"
        return Presented(chain, version, name)

    def _looks_like_tls(self) -> bool:
        # Every TLS record starts with a content type (handshake 22, alert 21, change_cipher_spec 20)
        # and a 3.x version byte.
        head = self.first_bytes
        if not head:
            return True
        if head[0] not in (20, 21, 22):
            return False
        return len(head) < 2 or head[1] == 3

    def _translate(self, exc: ssl.SSLError) -> TlsProbeError:
        reason = (exc.reason or "").lower()
        alert = _alert_name(reason)
        if alert:
            return self.error("alert", f"TLS alert from the server: {alert}")
        if not self._looks_like_tls() or reason in ("wrong_version_number", "record_layer_failure",
                                                    "packet_length_too_long", "unknown_protocol"):
            return self.not_tls()
        if reason == "excessive_message_size":
            return self.error("too-large", "handshake message larger than OpenSSL accepts (oversized chain)")
        return self.error("tls-error", f"TLS handshake failed: {reason or exc}")


_ALERT_PREFIXES = ("sslv3_alert_", "tlsv1_alert_", "tlsv13_alert_")
# OpenSSL's reason codes for alerts received (SSL_AD_REASON_OFFSET + alert) that do not say "alert".
_OTHER_ALERTS = {"tlsv1_unrecognized_name", "tlsv1_certificate_unobtainable", "tlsv1_bad_certificate_status_response",
                 "tlsv1_bad_certificate_hash_value"}


def _alert_name(reason: str) -> str | None:
    """'sslv3_alert_handshake_failure' -> 'handshake failure'; None when the reason is not a received alert."""
    for prefix in _ALERT_PREFIXES:
        if reason.startswith(prefix):
            return reason.removeprefix(prefix).replace("_", " ")
    if reason in _OTHER_ALERTS:
        return reason.removeprefix("tlsv1_").replace("_", " ")
    return None


def _os_error(host: str, port: int, sni: str | None, exc: OSError) -> TlsProbeError:
    if isinstance(exc, ConnectionRefusedError):
        return TlsProbeError.of(host, port, sni, "refused", "connection refused (nothing listening)")
    if isinstance(exc, ConnectionResetError):
        return TlsProbeError.of(host, port, sni, "reset", "connection reset by the server")
    if isinstance(exc, socket.gaierror):
        return TlsProbeError.of(host, port, sni, "unresolved", f"cannot resolve {host}: {exc.strerror}")
    return TlsProbeError.of(host, port, sni, "unreachable", f"connection failed: {exc.strerror or exc}")


def fetch_chain(host: str, port: int, *, sni: str | None = None, timeout: float = 5.0,
                context: ssl.SSLContext | None = None, max_bytes: int = MAX_HANDSHAKE_BYTES) -> Presented:
    """One handshake with ``host:port`` (``sni`` as server name, none when None); no trust is checked.

    ``timeout`` covers connect, handshake and reads together (a host name is resolved first, by the system
    resolver). Raises TlsProbeError."""
    deadline = time.monotonic() + timeout
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except TimeoutError:
        raise TlsProbeError.of(host, port, sni, "timeout", f"no TCP connection within {timeout:g} s", timeout) from None
    except OSError as exc:
        raise _os_error(host, port, sni, exc) from None
    with sock:
        hs = ClientHandshake(context or _default_context(), host, port, sni, max_bytes)
        try:
            while not hs.step():
                out = hs.outgoing()
                if out:
                    sock.settimeout(max(deadline - time.monotonic(), 0.001))
                    sock.sendall(out)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise hs.timeout(timeout)
                sock.settimeout(remaining)
                hs.feed(sock.recv(_RECV))
            presented = hs.presented()
            try:
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                sock.sendall(hs.closing_bytes())
            except OSError:
                pass
            return presented
        except TimeoutError:
            raise hs.timeout(timeout) from None
        except OSError as exc:
            raise _os_error(host, port, sni, exc) from None


# --- checks on a presented chain ---------------------------------------------------------------------------


def _subject(cert: x509.Certificate) -> str:
    try:
        return cert.subject.rfc4514_string()
    except ValueError:
        return repr(cert.subject)


def _issuer(cert: x509.Certificate) -> str:
    try:
        return cert.issuer.rfc4514_string()
    except ValueError:
        return repr(cert.issuer)


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except (x509.ExtensionNotFound, ValueError):
        return False


def check_chain(chain: Sequence[x509.Certificate], trust: Sequence[x509.Certificate] = ()) -> str | None:
    """None when the presented ``chain`` (leaf first) is complete (see the module docstring), else why not."""
    if not chain:
        return "no certificate presented"
    anchors = {fingerprint_sha256(a): a for a in trust}
    current = chain[0]
    used = {fingerprint_sha256(current)}
    pool = list(chain[1:])
    while True:
        fp = fingerprint_sha256(current)
        if anchors:
            if fp in anchors or any(is_issued_by(current, a) for a in anchors.values()):
                return None
        elif is_issued_by(current, current):
            return None
        if is_issued_by(current, current):
            return f"chain ends at the self-signed {_subject(current)}, which is not a trust anchor"
        parent = next((c for c in pool if fingerprint_sha256(c) not in used and is_issued_by(current, c)), None)
        if parent is None:
            if not anchors and current is not chain[0] and _is_ca(current):
                return None  # an intermediate presented: its root is the clients' business
            issuer = _issuer(current)
            if anchors:
                return f"chain incomplete: no intermediate or trust anchor for issuer {issuer}"
            return f"chain incomplete: no intermediate for issuer {issuer}"
        used.add(fingerprint_sha256(parent))
        current = parent


# --- proof on the wire --------------------------------------------------------------------------------------


def wait_until_served(host: str, port: int, expected_fingerprint: str, *, target: str,
                      sni: str | None = None, hostname: str | None = None,
                      trust: Sequence[x509.Certificate] = (), consecutive: int = 5,
                      timeout: float = 10.0, interval: float = 0.02) -> Verification:
    """Handshake until ``expected_fingerprint`` is served ``consecutive`` times in a row, then check the chain
    and the hostname. Returns Verification(method="tls"); raises VerificationError(target, ...) on timeout
    or a failed check, with the reason."""
    if consecutive < 1:
        raise ValueError(f"consecutive must be at least 1, not {consecutive}")
    expected = expected_fingerprint.lower().replace(":", "")
    where = endpoint_label(host, port, sni)
    start = time.monotonic()
    deadline = start + timeout
    streak = handshakes = matches = 0
    served: str | None = None
    served_subject = ""
    last_error: TlsProbeError | None = None
    presented: Presented | None = None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            presented = fetch_chain(host, port, sni=sni, timeout=min(remaining, 5.0))
        except TlsProbeError as exc:
            last_error, streak = exc, 0
        else:
            handshakes += 1
            served = presented.fingerprint
            if served == expected:
                matches += 1
                streak += 1
                if streak >= consecutive:
                    break
            else:
                streak = 0
                served_subject = _leaf_subject(presented.chain[0])
        time.sleep(max(0.0, min(interval, deadline - time.monotonic())))
    elapsed = time.monotonic() - start
    if streak < consecutive or presented is None:
        raise VerificationError(target, expected, served, _timeout_reason(
            where, expected, served, served_subject, handshakes, matches, streak, consecutive, timeout, last_error))
    try:
        chain = [x509.load_der_x509_certificate(der) for der in presented.chain]
    except ValueError as exc:
        raise VerificationError(target, expected, served,
                                f"{where} presented an unparseable certificate: {exc}") from None
    problem = check_chain(chain, trust)
    if problem:
        raise VerificationError(target, expected, served, f"{where}: {problem}")
    name = hostname or sni
    if name:
        problem = check_hostname(chain[0], name)
        if problem:
            raise VerificationError(target, expected, served, f"{where}: {problem}")
    detail = (f"{consecutive} consecutive handshakes on {where} in {elapsed:.2f} s ({presented.tls_version}); "
              f"chain of {len(chain)} complete" + (" to a trust anchor" if trust else "")
              + (f"; hostname {name} matches" if name else "; hostname not checked"))
    return Verification(target, expected, "tls", detail)


def _leaf_subject(der: bytes) -> str:
    try:
        return _subject(x509.load_der_x509_certificate(der))
    except ValueError:
        return "an unparseable certificate"


def _timeout_reason(where: str, expected: str, served: str | None, served_subject: str, handshakes: int,
                    matches: int, streak: int, consecutive: int, timeout: float,
                    last_error: TlsProbeError | None) -> str:
    if handshakes == 0:
        error = last_error.detail if last_error else "no handshake attempted"
        return f"nothing served a certificate on {where} within {timeout:g} s: {error}"
    if matches == 0:
        return (f"{where} served {served[:16] if served else '?'}… ({served_subject}) on all {handshakes} "
                f"handshakes in {timeout:g} s, never {expected[:16]}…")
    tail = f"; last failure: {last_error.detail}" if last_error else ""
    return (f"{where} served {expected[:16]}… on {matches} of {handshakes} handshakes in {timeout:g} s, "
            f"never {consecutive} in a row (longest current run {streak}); otherwise "
            f"{served[:16] if served and served != expected else '?'}… ({served_subject}){tail}")
