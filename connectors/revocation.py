"""Is a served certificate revoked? Its CRL first, then OCSP.

``RevocationChecker.check(certificate, issuer)`` returns a Revocation: ``good``, ``revoked`` (with the
time and reason the CA gives) or ``unknown``, always with the reason in words ("not on the CRL of
http://ca.example/issuing.crl, number 7, valid until ..."; "the OCSP responder 127.0.0.1:8080 did not
answer within 5 s"). It never raises for the network or for what a CA sent: whatever goes wrong is an
``unknown`` that says what and where.

CRL: from the certificate's CRL distribution points (http and https URLs, in order), fetched with a
``timeout`` on the connection and on every read, and one deadline for the whole body (a server that
drip-feeds a body cannot stretch it), reading at most ``max_crl_bytes``. A CRL is used only when its
issuer is the certificate's issuer, its signature verifies with the issuer's key and it is current (now before its nextUpdate). It is kept
(in memory, and in ``cache_dir`` when given, so that the next run finds it) until its nextUpdate; at most
``cache_entries`` CRLs are held in memory, the least recently used dropped first.

OCSP (when no CRL gave an answer): a request for the certificate (SHA-1 identifiers, as RFC 6960
clients send) POSTed to each OCSP URL of its Authority Information Access, with the same deadline and a
bound on the answer's size. A response is used only when it is successful, answers for this serial and
issuer, is signed by the issuer or by a responder certificate the issuer delegated (OCSP signing) and is
current.

A URL that failed to answer (refused, timed out, an HTTP error) is not asked again for ``retry_after``
seconds: a black-holed CA costs one timeout per run, not one per certificate. ``unreachable()`` lists
such URLs with the reason, for the monitor to report.

Propagation (seed metric M6): ``watch_revocation(certificate, issuer, revoked_at)`` is the relying
party's view after a revocation: it reads the CRL at the certificate's own distribution point (afresh
each time, never the cache) and asks the OCSP responder in its AIA, polling until both say revoked or
its timeout ends, and returns a ``Propagation`` (certpilot.propagation) with the seconds from the
revocation to each being seen; certpilot.propagation.record_propagation records it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import threading
import time
import urllib.parse
from collections import OrderedDict
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID

from certpilot.clock import Clock, utcnow
from certpilot.errors import endpoint_label
from certpilot.propagation import Propagation

__all__ = ["MAX_CRL_BYTES", "MAX_OCSP_BYTES", "Propagation", "Revocation", "RevocationChecker", "RevocationStatus",
           "Unanswered", "watch_revocation"]

MAX_CRL_BYTES = 16 * 1024 * 1024  # the largest public CRLs are a few MiB
MAX_OCSP_BYTES = 64 * 1024  # a response for one certificate is a few KiB, with a delegated responder's certificate
CACHE_ENTRIES = 64
_CHUNK = 64 * 1024


class RevocationStatus(StrEnum):
    GOOD = "good"
    REVOKED = "revoked"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Revocation:
    """What the CA says about one certificate: ``method`` is crl or ocsp (None when neither answered),
    ``url`` the one that answered; ``revoked_at`` and ``revocation_reason`` when revoked."""

    status: RevocationStatus
    reason: str
    method: str | None = None
    url: str | None = None
    revoked_at: dt.datetime | None = None
    revocation_reason: str | None = None


@dataclass(frozen=True)
class Unanswered:
    """A CRL or OCSP URL that did not answer: ``what`` is "CRL" or "OCSP", ``where`` its host:port."""

    url: str
    what: str
    where: str
    reason: str


class _FetchError(Exception):
    def __init__(self, reason: str, *, unreachable: bool) -> None:
        super().__init__(reason)
        self.reason, self.unreachable = reason, unreachable


def _where(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return endpoint_label(parts.hostname or "?", port)


def _name(name: x509.Name) -> str:
    try:
        return name.rfc4514_string()
    except ValueError:
        return repr(name)


def _verify_signature(key: CertificatePublicKeyTypes, signature: bytes, data: bytes,
                      algorithm: hashes.HashAlgorithm | None) -> bool:
    try:
        if isinstance(key, rsa.RSAPublicKey) and algorithm is not None:
            key.verify(signature, data, padding.PKCS1v15(), algorithm)
        elif isinstance(key, ec.EllipticCurvePublicKey) and algorithm is not None:
            key.verify(signature, data, ec.ECDSA(algorithm))
        elif isinstance(key, dsa.DSAPublicKey) and algorithm is not None:
            key.verify(signature, data, algorithm)
        elif isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
            key.verify(signature, data)
        else:
            return False
    except (InvalidSignature, UnsupportedAlgorithm, ValueError, TypeError):
        return False
    return True


def _reason_name(flag: x509.ReasonFlags | None) -> str | None:
    return flag.name if flag is not None else None


def _crl_urls(certificate: x509.Certificate) -> list[str]:
    try:
        points = certificate.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    except (x509.ExtensionNotFound, ValueError):
        return []
    return [n.value for point in points for n in (point.full_name or ())
            if isinstance(n, x509.UniformResourceIdentifier) and n.value.lower().startswith(("http://", "https://"))]


def _ocsp_urls(certificate: x509.Certificate) -> list[str]:
    try:
        aia = certificate.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    except (x509.ExtensionNotFound, ValueError):
        return []
    return [d.access_location.value for d in aia
            if d.access_method == x509.AuthorityInformationAccessOID.OCSP
            and isinstance(d.access_location, x509.UniformResourceIdentifier)
            and d.access_location.value.lower().startswith(("http://", "https://"))]


class RevocationChecker:
    """Checks revocation, CRL first then OCSP; thread-safe, so that many checks can run at once.

    ``timeout``: seconds for each fetch, everything included; ``retry_after``: seconds a URL that did not
    answer is left alone; ``cache_dir``: where CRLs are kept between runs (none: in memory only)."""

    def __init__(self, *, timeout: float = 5.0, max_crl_bytes: int = MAX_CRL_BYTES,
                 max_ocsp_bytes: int = MAX_OCSP_BYTES, cache_entries: int = CACHE_ENTRIES,
                 cache_dir: Path | None = None, retry_after: float = 300.0, clock: Clock = utcnow,
                 transport: httpx.BaseTransport | None = None) -> None:
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, not {timeout}")
        self.timeout = timeout
        self.max_crl_bytes = max_crl_bytes
        self.max_ocsp_bytes = max_ocsp_bytes
        self.cache_entries = cache_entries
        self.cache_dir = cache_dir
        self.retry_after = retry_after
        self._clock = clock
        self._client = httpx.Client(timeout=httpx.Timeout(timeout), follow_redirects=True, max_redirects=3,
                                    headers={"User-Agent": "certpilot-monitor"}, transport=transport)
        self._crls: OrderedDict[str, x509.CertificateRevocationList] = OrderedDict()
        self._failed: dict[str, tuple[float, Unanswered]] = {}
        self._lock = threading.Lock()
        self._url_locks: dict[str, threading.Lock] = {}
        self.fetches = 0  # CRLs and OCSP responses fetched from the network (not from a cache)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> RevocationChecker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def unreachable(self) -> list[Unanswered]:
        """The URLs that did not answer (and are being left alone), with why."""
        now = time.monotonic()
        with self._lock:
            return [u for until, u in self._failed.values() if until > now]

    # ------------------------------------------------------------------------------------------ check

    def check(self, certificate: x509.Certificate, issuer: x509.Certificate | None) -> Revocation:
        """The revocation status of ``certificate``, issued by ``issuer`` (without it nothing the CA
        says can be verified: unknown)."""
        crl_urls, ocsp_urls = _crl_urls(certificate), _ocsp_urls(certificate)
        if not crl_urls and not ocsp_urls:
            return Revocation(RevocationStatus.UNKNOWN, "the certificate names no CRL distribution point and no "
                                                        "OCSP responder")
        if issuer is None:
            return Revocation(RevocationStatus.UNKNOWN, f"its issuer's certificate ({_name(certificate.issuer)}) "
                                                        "was neither presented nor known: nothing can be verified")
        failures: list[str] = []
        for url in crl_urls:
            try:
                crl = self._crl(url, issuer)
            except _FetchError as exc:
                failures.append(exc.reason)
                continue
            entry = crl.get_revoked_certificate_by_serial_number(certificate.serial_number)
            number = self._crl_number(crl)
            if entry is None:
                return Revocation(RevocationStatus.GOOD, f"not on the CRL of {url}{number}, valid until "
                                                         f"{crl.next_update_utc:%Y-%m-%d %H:%M} UTC", "crl", url)
            reason = self._entry_reason(entry)
            why = f" ({reason})" if reason else ""
            return Revocation(RevocationStatus.REVOKED, f"revoked on {entry.revocation_date_utc:%Y-%m-%d %H:%M} UTC"
                                                        f"{why}, per the CRL of {url}{number}",
                              "crl", url, entry.revocation_date_utc, reason)
        for url in ocsp_urls:
            try:
                return self._ocsp(url, certificate, issuer)
            except _FetchError as exc:
                failures.append(exc.reason)
        return Revocation(RevocationStatus.UNKNOWN, "; ".join(failures) or "no usable CRL or OCSP answer")

    @staticmethod
    def _crl_number(crl: x509.CertificateRevocationList) -> str:
        try:
            return f" (number {crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number})"
        except (x509.ExtensionNotFound, ValueError):
            return ""

    @staticmethod
    def _entry_reason(entry: x509.RevokedCertificate) -> str | None:
        try:
            return _reason_name(entry.extensions.get_extension_for_class(x509.CRLReason).value.reason)
        except (x509.ExtensionNotFound, ValueError):
            return None

    # -------------------------------------------------------------------------------------------- CRL

    def _crl(self, url: str, issuer: x509.Certificate) -> x509.CertificateRevocationList:
        """The current CRL at ``url`` signed by ``issuer``: from the cache, else fetched. _FetchError."""
        with self._lock:
            url_lock = self._url_locks.setdefault(url, threading.Lock())
        with url_lock:  # one fetch per URL however many certificates ask at once
            crl = self._cached(url)
            if crl is None:
                crl = self._download_crl(url)
                if crl.next_update_utc is not None and crl.next_update_utc > self._clock():
                    self._keep(url, crl)
        return self._usable(url, crl, issuer)

    def _download_crl(self, url: str, timeout: float | None = None,
                      headers: dict[str, str] | None = None) -> x509.CertificateRevocationList:
        """The CRL at ``url`` from the network (never the cache), not yet checked. _FetchError."""
        der = self._fetch("CRL", url, "GET", None, self.max_crl_bytes, "application/pkix-crl", timeout, headers)
        try:
            return x509.load_der_x509_crl(der)
        except ValueError:
            try:
                return x509.load_pem_x509_crl(der)
            except ValueError:
                raise _FetchError(f"the CRL at {url} is not a CRL (neither DER nor PEM)", unreachable=False) from None

    def _usable(self, url: str, crl: x509.CertificateRevocationList,
                issuer: x509.Certificate) -> x509.CertificateRevocationList:
        if crl.issuer != issuer.subject:
            raise _FetchError(f"the CRL at {url} is issued by {_name(crl.issuer)}, not by the certificate's issuer "
                              f"{_name(issuer.subject)}", unreachable=False)
        public_key = issuer.public_key()
        if not isinstance(public_key, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey, dsa.DSAPublicKey,
                                       ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)) \
                or not crl.is_signature_valid(public_key):
            raise _FetchError(f"the CRL at {url} does not verify with the key of {_name(issuer.subject)}",
                              unreachable=False)
        if crl.next_update_utc is None or crl.next_update_utc <= self._clock():
            when = f"{crl.next_update_utc:%Y-%m-%d %H:%M} UTC" if crl.next_update_utc else "no nextUpdate"
            raise _FetchError(f"the CRL at {url} is stale ({when})", unreachable=False)
        return crl

    def _cached(self, url: str) -> x509.CertificateRevocationList | None:
        now = self._clock()
        with self._lock:
            crl = self._crls.get(url)
            if crl is not None:
                if crl.next_update_utc is not None and crl.next_update_utc > now:
                    self._crls.move_to_end(url)
                    return crl
                del self._crls[url]
        path = self._path(url)
        if path is None or not path.is_file():
            return None
        try:
            crl = x509.load_der_x509_crl(path.read_bytes())
        except (OSError, ValueError):
            return None
        if crl.next_update_utc is None or crl.next_update_utc <= now:
            return None
        self._remember(url, crl)
        return crl

    def _keep(self, url: str, crl: x509.CertificateRevocationList) -> None:
        self._remember(url, crl)
        path = self._path(url)
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                temporary = path.with_suffix(".tmp")
                temporary.write_bytes(crl.public_bytes(serialization.Encoding.DER))
                temporary.replace(path)
            except OSError:
                pass  # the cache is a saving, not a need

    def _remember(self, url: str, crl: x509.CertificateRevocationList) -> None:
        with self._lock:
            self._crls[url] = crl
            self._crls.move_to_end(url)
            while len(self._crls) > self.cache_entries:
                self._crls.popitem(last=False)

    def _path(self, url: str) -> Path | None:
        if self.cache_dir is None:
            return None
        return self.cache_dir / (hashlib.sha256(url.encode()).hexdigest()[:32] + ".crl")

    # ------------------------------------------------------------------------------------------- OCSP

    def _ocsp(self, url: str, certificate: x509.Certificate, issuer: x509.Certificate,
              timeout: float | None = None) -> Revocation:
        request = ocsp.OCSPRequestBuilder().add_certificate(certificate, issuer, hashes.SHA1()).build()
        body = self._fetch("OCSP", url, "POST", request.public_bytes(serialization.Encoding.DER), self.max_ocsp_bytes,
                           "application/ocsp-response", timeout)
        try:
            response = ocsp.load_der_ocsp_response(body)
        except ValueError:
            raise _FetchError(f"the OCSP responder {url} answered something that is not an OCSP response",
                              unreachable=False) from None
        if response.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
            raise _FetchError(f"the OCSP responder {url} answered {response.response_status.name}",
                              unreachable=False)
        if not self._signed_by_issuer_or_delegate(response, issuer):
            raise _FetchError(f"the OCSP response from {url} is signed neither by {_name(issuer.subject)} nor by a "
                              "responder it delegated", unreachable=False)
        single = next((r for r in response.responses if r.serial_number == certificate.serial_number
                       and r.issuer_key_hash == request.issuer_key_hash
                       and r.issuer_name_hash == request.issuer_name_hash), None)
        if single is None:
            raise _FetchError(f"the OCSP response from {url} does not answer for serial {certificate.serial_number:x}",
                              unreachable=False)
        now = self._clock()
        if single.next_update_utc is not None and single.next_update_utc <= now:
            raise _FetchError(f"the OCSP response from {url} is stale (next update "
                              f"{single.next_update_utc:%Y-%m-%d %H:%M} UTC)", unreachable=False)
        if single.this_update_utc > now + dt.timedelta(minutes=5):
            raise _FetchError(f"the OCSP response from {url} is dated in the future", unreachable=False)
        if single.certificate_status == ocsp.OCSPCertStatus.GOOD:
            return Revocation(RevocationStatus.GOOD, f"good, per the OCSP responder {url}", "ocsp", url)
        if single.certificate_status == ocsp.OCSPCertStatus.REVOKED:
            at = single.revocation_time_utc
            reason = _reason_name(single.revocation_reason)
            when = f" on {at:%Y-%m-%d %H:%M} UTC" if at else ""
            return Revocation(RevocationStatus.REVOKED, f"revoked{when}{f' ({reason})' if reason else ''}, per the "
                                                        f"OCSP responder {url}", "ocsp", url, at, reason)
        raise _FetchError(f"the OCSP responder {url} does not know the certificate (status unknown)",
                          unreachable=False)

    @staticmethod
    def _signed_by_issuer_or_delegate(response: ocsp.OCSPResponse, issuer: x509.Certificate) -> bool:
        algorithm = response.signature_hash_algorithm
        if _verify_signature(issuer.public_key(), response.signature, response.tbs_response_bytes, algorithm):
            return True
        for responder in response.certificates:
            try:
                eku = responder.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
                responder.verify_directly_issued_by(issuer)
            except (x509.ExtensionNotFound, InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
                continue
            if ExtendedKeyUsageOID.OCSP_SIGNING in eku and _verify_signature(
                    responder.public_key(), response.signature, response.tbs_response_bytes, algorithm):
                return True
        return False

    # ---------------------------------------------------------------------------------------- network

    def _fetch(self, what: str, url: str, method: str, body: bytes | None, limit: int, content_type: str,
               timeout: float | None = None, extra_headers: dict[str, str] | None = None) -> bytes:
        """The body at ``url``, read within ``timeout`` (default: the checker's) in all and at most
        ``limit`` bytes. _FetchError."""
        where = _where(url)
        now = time.monotonic()
        with self._lock:
            failed = self._failed.get(url)
        if failed is not None and failed[0] > now:
            raise _FetchError(f"{failed[1].reason} (not asked again for {self.retry_after:g} s)", unreachable=True)
        doing = "fetching the CRL" if what == "CRL" else "asking the OCSP responder"
        timeout = self.timeout if timeout is None else max(0.001, min(timeout, self.timeout))
        deadline = now + timeout
        headers = {"Accept": content_type, **(extra_headers or {})}
        if body is not None:
            headers["Content-Type"] = "application/ocsp-request"
        try:
            chunks: list[bytes] = []
            received = 0
            with self._client.stream(method, url, content=body, headers=headers,
                                     timeout=httpx.Timeout(timeout)) as response:
                if response.status_code != 200:
                    raise self._failure(what, url, f"{what} {url} ({where}): HTTP {response.status_code} while {doing}")
                for chunk in response.iter_bytes(_CHUNK):
                    received += len(chunk)
                    if received > limit:
                        raise _FetchError(f"{what} {url} ({where}): more than {limit} bytes: stopped reading",
                                          unreachable=False)
                    chunks.append(chunk)
                    if time.monotonic() > deadline:
                        raise httpx.ReadTimeout("deadline")
            with self._lock:
                self.fetches += 1
            return b"".join(chunks)
        except httpx.TimeoutException:
            raise self._failure(what, url, f"{what} {url} ({where}) did not answer within {timeout:.3g} s while "
                                           f"{doing}") from None
        except httpx.HTTPError as exc:
            raise self._failure(what, url, f"{what} {url} ({where}): {type(exc).__name__} while {doing}: "
                                           f"{exc}") from None

    def _failure(self, what: str, url: str, reason: str) -> _FetchError:
        with self._lock:
            self._failed[url] = (time.monotonic() + self.retry_after, Unanswered(url, what, _where(url), reason))
        return _FetchError(reason, unreachable=True)


# ------------------------------------------------------------------------------------ propagation

WATCH_REQUEST_TIMEOUT = 5.0  # seconds for one CRL or OCSP request while watching (less when the watch ends sooner)



class SharedTransport(httpx.BaseTransport):
    """One connection pool for many watches (each watch's client would otherwise build its own, with a TLS
    context loaded from the CA bundle: about 15 ms of CPU for an http:// URL that needs none). Closing a
    client that uses it leaves it open; ``shut`` closes it."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        return self.inner.handle_request(request)

    def close(self) -> None:
        pass

    def shut(self) -> None:
        self.inner.close()


def watch_revocation(certificate: x509.Certificate, issuer: x509.Certificate, revoked_at: dt.datetime, *,
                     timeout: float = 30.0, interval: float = 0.1, clock: Clock = utcnow,
                     request_timeout: float = WATCH_REQUEST_TIMEOUT,
                     transport: httpx.BaseTransport | None = None) -> Propagation:
    """Watch a revocation reach relying parties: read the CRL at the certificate's own CRL distribution
    point (fetched afresh every time, never from a cache; its issuer and signature checked against
    ``issuer``, and current) and ask the OCSP responder named in its AIA (a real OCSP request; the
    response verified as ``RevocationChecker`` does), every ``interval`` seconds until both list it as
    revoked or ``timeout`` seconds have passed. Seconds are counted from ``revoked_at`` to when each was
    first seen (``clock``, wall time). A certificate that names only one of the two is judged by that
    one. Never raises for the network or for what a CA sent: ``detail`` says what was seen and what did
    not answer, naming the URL. Every request has its own timeout, never past the watch's end."""
    if revoked_at.tzinfo is None:
        raise ValueError("revoked_at must be an aware UTC datetime")
    if not timeout > 0 or not interval > 0:
        raise ValueError(f"timeout and interval must be positive, not {timeout} and {interval}")
    crl_urls, ocsp_urls = _crl_urls(certificate), _ocsp_urls(certificate)
    crl_url, ocsp_url = (crl_urls[0] if crl_urls else None), (ocsp_urls[0] if ocsp_urls else None)
    if crl_url is None and ocsp_url is None:
        return Propagation(None, None, None, None, None, "the certificate names no CRL distribution point and no "
                                                         "OCSP responder: nothing to watch")
    serial = certificate.serial_number
    seen: dict[str, float] = {}  # "crl"/"ocsp" -> seconds from revoked_at
    last: dict[str, str] = {}  # what each said last
    started = time.monotonic()
    deadline = started + timeout
    no_cache = {"Cache-Control": "no-cache"}
    with RevocationChecker(timeout=request_timeout, retry_after=0.0, clock=clock, transport=transport) as checker:
        while True:
            if crl_url is not None and "crl" not in seen:
                budget = deadline - time.monotonic()
                try:
                    crl = checker._usable(crl_url, checker._download_crl(crl_url, budget, no_cache), issuer)
                except _FetchError as exc:
                    if not (exc.unreachable and budget < request_timeout and "crl" in last):
                        last["crl"] = exc.reason  # (a request cut short by the watch's end keeps the answer before)
                else:
                    if crl.get_revoked_certificate_by_serial_number(serial) is not None:
                        seen["crl"] = max(0.0, (clock() - revoked_at).total_seconds())
                        last["crl"] = f"the CRL at {crl_url}{checker._crl_number(crl)} lists it"
                    else:
                        last["crl"] = f"the CRL at {crl_url}{checker._crl_number(crl)} does not list it yet"
            if ocsp_url is not None and "ocsp" not in seen:
                budget = deadline - time.monotonic()
                try:
                    answer = checker._ocsp(ocsp_url, certificate, issuer, budget)
                except _FetchError as exc:
                    if not (exc.unreachable and budget < request_timeout and "ocsp" in last):
                        last["ocsp"] = exc.reason
                else:
                    if answer.status == RevocationStatus.REVOKED:
                        seen["ocsp"] = max(0.0, (clock() - revoked_at).total_seconds())
                        last["ocsp"] = f"the OCSP responder {ocsp_url} says revoked"
                    else:
                        last["ocsp"] = f"the OCSP responder {ocsp_url} still says {answer.status}"
            done = (crl_url is None or "crl" in seen) and (ocsp_url is None or "ocsp" in seen)
            if done or time.monotonic() + interval >= deadline:
                break
            time.sleep(interval)
    waited = time.monotonic() - started
    parts = []
    for key, url in (("crl", crl_url), ("ocsp", ocsp_url)):
        if url is None:
            parts.append(f"the certificate names no {'CRL distribution point' if key == 'crl' else 'OCSP responder'}")
        elif key in seen:
            parts.append(f"{last[key]} after {seen[key]:.3g} s")
        else:
            parts.append(f"not seen revoked within {waited:.3g} s: {last.get(key, 'not asked')}")
    crl_seconds, ocsp_seconds = seen.get("crl"), seen.get("ocsp")
    seconds = max(seen.values()) if done else None
    return Propagation(crl_url, ocsp_url, crl_seconds, ocsp_seconds, seconds, "; ".join(parts))
