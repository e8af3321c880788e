"""An ACME CA as a certpilot Issuer (RFC 8555, with ARI from RFC 9773), on the `acme` library.

The `acme` package signs and sends; this module drives the order itself so that it can poll briskly
(50 ms growing to 1 s, never sooner than a Retry-After, always within a deadline), retry a rejected
nonce more than once, wait out a short rate limit instead of hammering, send a request again after a
transient failure (a reset, an answer cut short, a 5xx, a 429; bounded, with backoff; see _Network), and
turn every problem document into a certpilot error that carries its type (certpilot.errors.AcmeProblemError
and friends). Every HTTP request has a timeout. Once an order's finalize is sent, the CA may be issuing:
from then on every transient failure is retried until the order's deadline, and a finalize sent again
reads the order instead of failing, so that a lost answer does not leave a certificate issued for
nothing (and a second one issued by the next attempt).

The account is registered once per (directory URL, issuer name) and reused: its key is sealed in
the keystore and its URL recorded in the AcmeAccount table (certpilot.acme_accounts). The key is
decrypted once per AcmeIssuer object and kept only in memory; it is never logged or put in an error.

An order is journalled (certpilot.issuance.OrderJournal): its URL is recorded as soon as the CA has
created it, and an issuance given a journal that holds an order resumes it (POST-as-GET) instead of
ordering again: a valid order's certificate is downloaded, a ready one finalized, a pending one
authorized; one the CA calls invalid, expired or unknown is replaced by a new order. So a run killed
mid-order and started again does not get the CA to issue twice.

Revocation is signed by the account, or by the certificate's own key (its JWK in the JWS header, no
account: RFC 8555 7.6) when the caller holds it, as a key-compromise revocation should be.

One AcmeIssuer may be used from several threads at once: each thread gets its own HTTP session and
nonce pool; the account is set up once under a lock.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import email.utils
import logging
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import josepy as jose
import requests
import sqlalchemy as sa
from acme import client as acme_client
from acme import errors as acme_errors
from acme import jws as acme_jws
from acme import messages
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from requests.utils import parse_header_links

from certpilot import acme_accounts, audit
from certpilot.clock import Clock, utcnow
from certpilot.database import read_session, write_session
from certpilot.errors import (
    ACME_ERROR_PREFIX,
    AcmeProblemError,
    AcmeServerError,
    AcmeSubproblem,
    CertpilotError,
    PermanentError,
    RateLimitedError,
    endpoint_label,
)
from certpilot.issuance import IssuedCertificate, OrderJournal
from certpilot.keys import ml_dsa_algorithm
from certpilot.keystore import KeyRing, load_private_key
from certpilot.names import parse_ip_address
from certpilot.renewal import RenewalWindow
from certpilot.x509info import spki_sha256
from connectors.challenges import Challenge, ChallengeSolver

__all__ = ["AcmeIssuer", "ari_cert_id", "REASON_CODES"]

logger = logging.getLogger(__name__)

# RFC 5280 CRLReason codes, as ACME's revokeCert takes them.
REASON_CODES: dict[x509.ReasonFlags, int] = {
    x509.ReasonFlags.unspecified: 0, x509.ReasonFlags.key_compromise: 1, x509.ReasonFlags.ca_compromise: 2,
    x509.ReasonFlags.affiliation_changed: 3, x509.ReasonFlags.superseded: 4,
    x509.ReasonFlags.cessation_of_operation: 5, x509.ReasonFlags.certificate_hold: 6,
    x509.ReasonFlags.remove_from_crl: 8, x509.ReasonFlags.privilege_withdrawn: 9,
    x509.ReasonFlags.aa_compromise: 10,
}
# Problems worth retrying later; everything else the CA says is final for this request.
_TRANSIENT_CODES = {"serverInternal", "badNonce"}
_USER_AGENT = "certpilot-acme (acme-python)"
_FIRST_POLL = 0.02
_MAX_POLL = 1.0
_POLL_GROWTH = 1.5
_RETRY_BACKOFF = 0.1  # the first wait before a request that failed transiently is sent again; doubles
_MAX_RETRY_BACKOFF = 2.0


def _garbled(exc: acme_errors.ClientError, *, to_post: bool = False) -> bool:
    """An answer that was not what the CA meant to send (cut short in its headers, so without its nonce or
    its body), as opposed to a refusal: worth asking again. ``to_post``: the answer to a POST, where every
    refusal of an ACME server is a problem document (RFC 8555 6.7): a 4xx without one is not the CA's word."""
    if isinstance(exc, acme_errors.ConflictError):
        return False
    status = _status_of(exc)
    if status is None or 200 <= status < 300:
        return True
    if not to_post:
        return False
    response = exc.args[0] if exc.args else None
    if isinstance(response, tuple):
        response = response[0] if response else None
    if not isinstance(response, requests.Response):
        return False
    try:
        response.json()
    except ValueError:
        return True
    return False


def _transient_transport(exc: requests.RequestException) -> bool:
    """A connection refused, reset or closed mid-answer: worth sending again. Not a timeout (the CA may be
    hung) nor a TLS failure (the wrong CA will not become the right one)."""
    if isinstance(exc, (requests.Timeout, requests.exceptions.SSLError)):
        return False
    return isinstance(exc, (requests.ConnectionError, requests.exceptions.ChunkedEncodingError,
                            requests.exceptions.ContentDecodingError))


def ari_cert_id(certificate: x509.Certificate) -> str:
    """RFC 9773 CertID: base64url(AKI keyIdentifier) "." base64url(DER INTEGER bytes of the serial)."""
    try:
        aki = certificate.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except x509.ExtensionNotFound:
        raise PermanentError("the certificate has no authority key identifier, so it has no ARI CertID") from None
    if aki.key_identifier is None:
        raise PermanentError("the certificate's authority key identifier has no keyIdentifier, so it has no ARI CertID")
    serial = certificate.serial_number
    serial_bytes = serial.to_bytes(serial.bit_length() // 8 + 1, "big", signed=True)  # room for the sign bit

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")

    return f"{b64(aki.key_identifier)}.{b64(serial_bytes)}"


def retry_after_seconds(value: str | None, now: Callable[[], dt.datetime] | None = None) -> float | None:
    """A Retry-After header (delta-seconds or an HTTP date) as seconds from now, or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    current = (now or utcnow)()
    return max(0.0, (when - current).total_seconds())


class _NewOrder(messages.NewOrder):
    """newOrder with RFC 9773's ``replaces`` (the acme package does not send it)."""

    replaces: str | None = jose.field("replaces", omitempty=True)


class _EmptyObject(jose.JSONDeSerializable):
    """The ``{}`` a client POSTs to a challenge URL to say it is ready."""

    def to_partial_json(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_json(cls, jobj: Any) -> _EmptyObject:
        return cls()


@dataclass
class _Budget:
    """Per operation: when it must be done, and how long a rate limit may still be waited out."""

    deadline: float
    rate_limit_wait: float


def _asked(exc: requests.RequestException) -> str:
    """' to GET https://host:port/path (host:port)': the request that failed, for the message."""
    request = exc.request
    if request is None or not isinstance(request.url, str) or not request.url:
        return ""
    parts = urllib.parse.urlsplit(request.url)
    where = endpoint_label(parts.hostname or "?", parts.port or (443 if parts.scheme == "https" else 80))
    return f" to {request.method} {parts.scheme}://{parts.netloc}{parts.path} ({where})"


class _Network(acme_client.ClientNetwork):
    """The acme package's signing HTTP client, with certpilot's retry policy:

    - badNonce is retried up to ``bad_nonce_retries`` times (the package retries once), using the
      fresh nonce the error response carries;
    - rateLimited (or any 429) with a Retry-After that fits the operation's budget is waited out, then retried;
    - a transient failure of one request (the connection refused, reset or closed mid-answer, a 5xx, a 429
      without a usable Retry-After) is retried up to ``transient_retries`` times with a short backoff,
      within the operation's deadline: a GET or HEAD is sent again as it was, a POST is signed again
      with a fresh nonce. A timeout is not retried here (the CA may be hung: waiting again would
      multiply the time to fail). A POST whose answer was lost may have been acted on: the caller
      makes that safe where it matters (a finalize is never sent twice blindly: see _finalize);
    - once an order is ``committed`` (its finalize sent: the CA may be issuing), giving up would leave a
      certificate issued and never collected, and the next attempt would have a second one issued: so
      from then on every transient failure, timeouts included, is retried until the operation's deadline;
    - every problem document keeps its HTTP status and Retry-After (as seconds) for translation.
    """

    def __init__(self, *, key: jose.JWK | None, alg: jose.JWASignature, verify: bool | str, timeout: float,
                 bad_nonce_retries: int, sleep: Callable[[float], None], clock: Callable[[], float],
                 account_url: str | None = None, transient_retries: int = 0,
                 retry_backoff: float = _RETRY_BACKOFF) -> None:
        account = messages.RegistrationResource(uri=account_url, body=messages.Registration()) if account_url else None
        # acme types verify_ssl as bool and timeout as int, but hands both to requests, whose verify= takes a
        # CA bundle's path too (``verify`` as a str) and whose timeout= takes a float
        super().__init__(key=key, account=account, alg=alg, user_agent=_USER_AGENT,
                         verify_ssl=verify, timeout=timeout)  # type: ignore[arg-type]
        self.bad_nonce_retries = bad_nonce_retries
        self.transient_retries = transient_retries
        self.retry_backoff = retry_backoff
        self.budget: _Budget | None = None
        self._sleep, self._clock = sleep, clock
        self.requests = 0
        self.retried = 0  # requests sent again after a transient failure
        self.committed = False  # the order's finalize was sent: retry until the deadline (see above)

    def _send_request(self, method: str, url: str, *args: Any, **kwargs: Any) -> requests.Response:
        if method == "POST":  # post() retries a POST, signed again: the nonce of this one may be spent
            self.requests += 1
            return super()._send_request(method, url, *args, **kwargs)
        failures = 0
        while True:  # a GET or HEAD changes nothing at the CA: send it again as it was
            self.requests += 1
            try:
                response = super()._send_request(method, url, *args, **kwargs)
            except requests.RequestException as exc:
                if not self._retryable(exc) or not self._retry_later(failures, None, f"{method} {url}", exc):
                    raise
            else:
                status = response.status_code
                if not (status >= 500 or status == 429) or not self._retry_later(
                        failures, retry_after_seconds(response.headers.get("Retry-After")), f"{method} {url}",
                        f"HTTP {status}"):
                    return response
            failures += 1

    def _retry_later(self, failures: int, retry_after: float | None, what: str, why: object) -> bool:
        """Whether a request that failed transiently (``failures`` times before) is sent again; if so,
        sleeps first: the backoff, or the CA's Retry-After when that is longer and fits the budget."""
        if failures >= self.transient_retries and not self.committed:
            return False
        wait = self._backoff(failures)
        budget = self.budget
        if retry_after is not None and retry_after > wait:
            if budget is not None and retry_after > budget.rate_limit_wait:
                return False
            wait = retry_after
            if budget is not None:
                budget.rate_limit_wait -= wait
        if budget is not None and self._clock() + wait >= budget.deadline:
            return False
        logger.debug("%s failed transiently (%s): retry %d in %.2f s", what, why, failures + 1, wait)
        self.retried += 1
        self._sleep(wait)
        return True

    def _backoff(self, failures: int) -> float:
        return float(min(self.retry_backoff * (2 ** failures), _MAX_RETRY_BACKOFF))

    def _retryable(self, exc: requests.RequestException) -> bool:
        return _transient_transport(exc) or (self.committed and isinstance(exc, requests.Timeout))

    # acme's is a classmethod; this one keeps the nonce an error response carries, so it needs the instance
    # (ClientNetwork only ever calls it as self._check_response)
    def _check_response(self, response: requests.Response,  # type: ignore[override]
                        content_type: str | None = None) -> requests.Response:
        if not response.ok and self.REPLAY_NONCE_HEADER in response.headers:
            # RFC 8555 6.5: error responses carry a fresh nonce too; keep it for the retry.
            with contextlib.suppress(jose.DeserializationError):
                self._nonces.add(acme_jws.Header._fields["nonce"].decode(response.headers[self.REPLAY_NONCE_HEADER]))
        try:
            return super()._check_response(response, content_type=content_type)
        except messages.Error as problem:
            problem.http_status = response.status_code
            problem.retry_after = retry_after_seconds(response.headers.get("Retry-After"))
            raise

    def get(self, url: str, content_type: str = acme_client.ClientNetwork.JSON_CONTENT_TYPE,
            **kwargs: Any) -> requests.Response:
        failures = 0
        while True:  # _send_request retried a failed connection or a 5xx; here: an answer cut short
            try:
                return super().get(url, content_type, **kwargs)
            except acme_errors.ClientError as exc:
                if _garbled(exc) and self._retry_later(failures, None, f"GET {url}", f"{type(exc).__name__}: {exc}"):
                    failures += 1
                    continue
                raise

    def post(self, *args: Any, **kwargs: Any) -> requests.Response:
        bad_nonces = failures = 0
        what = f"POST {args[0] if args else kwargs.get('url', '')}"
        while True:
            try:
                return self._post_once(*args, **kwargs)
            except messages.Error as problem:
                if _code(problem) == "badNonce" and bad_nonces < self.bad_nonce_retries:
                    bad_nonces += 1
                    logger.debug("badNonce %d of %d allowed: retrying", bad_nonces, self.bad_nonce_retries)
                    continue
                wait = getattr(problem, "retry_after", None)
                status = getattr(problem, "http_status", None)
                budget = self.budget
                if ((_code(problem) == "rateLimited" or status == 429) and wait is not None and budget is not None
                        and wait <= budget.rate_limit_wait and self._clock() + wait < budget.deadline):
                    logger.info("rate limited by the CA (%s): waiting %.1f s as its Retry-After asks",
                                problem.detail or problem.title, wait)
                    budget.rate_limit_wait -= wait
                    self._sleep(max(wait, self._backoff(failures)))  # a Retry-After of 0 is no reason to hammer
                    failures += 1
                    continue
                if (status is not None and status >= 500) or (status == 429 and wait is None):
                    if self._retry_later(failures, None, what, f"HTTP {status} {_code(problem)}"):
                        failures += 1
                        continue
                raise
            except acme_errors.ClientError as exc:  # not a problem document: a proxy's 502, an answer cut short
                status = _status_of(exc)
                if (_garbled(exc, to_post=True) or (status is not None and (status >= 500 or status == 429))) \
                        and self._retry_later(
                        failures, None, what, f"HTTP {status}" if status else f"{type(exc).__name__}: {exc}"):
                    failures += 1
                    continue
                raise
            except requests.RequestException as exc:
                if self._retryable(exc) and self._retry_later(failures, None, what, exc):
                    failures += 1
                    continue
                raise


@dataclass
class _Account:
    jwk: jose.JWK = field(repr=False)
    alg: jose.JWASignature
    record: acme_accounts.AccountRecord


class AcmeIssuer:
    """An ACME CA (Let's Encrypt, pebble, a corporate ACME server) as a certpilot Issuer.

    ``key_ring`` returns the keystore's KeyRing when the account key is first sealed or opened;
    ``solver`` answers challenges (connectors.challenges); ``eab`` is (key id, HMAC key) for a CA
    that requires external account binding, the key as raw bytes or as the base64url text CAs hand
    out; ``ca_bundle`` is a PEM file to trust for the CA's HTTPS; ``preferred_chain`` picks, among
    the chains the CA offers, the one whose topmost certificate was issued by that common name;
    ``timeout`` bounds every HTTP request (seconds), ``order_timeout`` a whole order or revocation,
    ``max_rate_limit_wait`` the total Retry-After waited out in place before RateLimitedError;
    ``bad_nonce_retries`` how often one request is re-sent after badNonce; ``transient_retries`` how often
    after a transient failure (reset, 5xx, 429), the first after ``retry_backoff`` seconds, doubling;
    ``now`` the clock that decides whether a certificate has expired.
    """

    def __init__(self, engine: sa.Engine, name: str, directory_url: str, *, key_ring: Callable[[], KeyRing],
                 solver: ChallengeSolver, contact: Sequence[str] = (), eab: tuple[str, bytes | str] | None = None,
                 ca_bundle: str | Path | None = None, preferred_chain: str | None = None, timeout: float = 30.0,
                 account_key_algorithm: str = "ec-p256", order_timeout: float = 120.0,
                 max_rate_limit_wait: float = 30.0, bad_nonce_retries: int = 10, transient_retries: int = 6,
                 retry_backoff: float = _RETRY_BACKOFF, actor: audit.Actor | None = None, now: Clock = utcnow) -> None:
        if account_key_algorithm not in acme_accounts.ACCOUNT_KEY_ALGORITHMS:
            raise ValueError(f"account_key_algorithm must be one of {', '.join(acme_accounts.ACCOUNT_KEY_ALGORITHMS)}")
        self.engine = engine
        self.name = name
        self.directory_url = directory_url
        self.solver = solver
        self.contact = tuple(contact)
        self.preferred_chain = preferred_chain
        self.timeout = timeout
        self.order_timeout = order_timeout
        self.max_rate_limit_wait = max_rate_limit_wait
        self.bad_nonce_retries = bad_nonce_retries
        self.transient_retries = transient_retries
        self.retry_backoff = retry_backoff
        self.account_key_algorithm = account_key_algorithm
        self.actor = actor or audit.Actor(f"acme-issuer:{name}")
        self._key_ring = key_ring
        self._eab = (eab[0], _hmac_key(eab[1])) if eab else None
        self._verify: bool | str = str(ca_bundle) if ca_bundle else True
        self._lock = threading.Lock()
        self._local = threading.local()
        self._directory: messages.Directory | None = None
        self._account: _Account | None = None
        self._ari_cache: dict[str, tuple[RenewalWindow | None, float]] = {}
        self._clock: Callable[[], float] = time.monotonic  # for deadlines and the ARI cache
        self._now = now  # wall time, for decisions about certificates
        self._sleep: Callable[[float], None] = time.sleep

    def __repr__(self) -> str:
        return f"AcmeIssuer(name={self.name!r}, directory_url={self.directory_url!r})"

    # -- the Issuer role ------------------------------------------------------------------------------

    def issue(self, csr: x509.CertificateSigningRequest, profile: str, *, validity_days: int | None = None,
              replaces: x509.Certificate | None = None, journal: OrderJournal | None = None) -> IssuedCertificate:
        """Order, prove control of every identifier, finalize, download. The CA decides the lifetime:
        ``validity_days`` is not sent (Let's Encrypt rejects notBefore/notAfter in orders)."""
        uris = _uri_names(csr)
        if uris:  # refused here, before the CA is asked: an order cannot name them
            raise PermanentError(f"{self.name}: the CSR names URI {', '.join(uris)}; ACME has no URI identifiers "
                                 "(RFC 8555 orders DNS names and IP addresses): issue it from a private CA")
        post_quantum = ml_dsa_algorithm(csr.public_key())
        if post_quantum is not None:  # refused here, before the CA is asked
            raise PermanentError(f"{self.name}: the CSR's key is {post_quantum}, which no ACME or public CA "
                                 f"certifies; issue it from a certpilot private CA (certpilot ca init NAME "
                                 f"--algorithm {post_quantum})")
        if profile != "tls-server":
            raise PermanentError(f"{self.name}: ACME CAs issue TLS server certificates; "
                                 f"profile {profile!r} is not offered")
        identifiers = _identifiers(csr)
        if not identifiers:
            raise PermanentError(f"{self.name}: the CSR names no DNS name or IP address to order")
        return self._with_account("issue", lambda net: self._order(net, csr, identifiers, replaces, journal))

    def revoke(self, certificate: x509.Certificate, reason: x509.ReasonFlags, *,
               key: PrivateKeyTypes | None = None) -> None:
        """Revoke with an RFC 5280 reason: signed by the account (which must have ordered it or hold
        authorisations for its names), or, with ``key`` (the certificate's own private key), by that key,
        its JWK in the protected header and no account (RFC 8555 7.6: the proof a key-compromise
        revocation needs). Revoking a certificate the CA already revoked is not an error."""
        if reason not in REASON_CODES:
            raise PermanentError(f"{self.name}: unknown revocation reason {reason}")
        revocation = messages.Revocation(certificate=certificate, reason=REASON_CODES[reason])

        def send(net: _Network) -> None:
            try:
                response = self._post(net, self._directory_of(net)["revokeCert"], revocation)
            except messages.Error as problem:
                if _code(problem) == "alreadyRevoked":
                    logger.info("%s: serial %x was already revoked", self.name, certificate.serial_number)
                    return
                raise
            if response.status_code != 200:
                raise AcmeServerError("about:blank", f"revokeCert answered HTTP {response.status_code}", ca=self.name)

        if key is None:
            self._with_account("revoke", send)
            return
        if spki_sha256(key.public_key()) != spki_sha256(certificate.public_key()):
            raise PermanentError(f"{self.name}: the key given to sign the revocation of serial "
                                 f"{certificate.serial_number:x} is not that certificate's key")
        jwk, alg = _certificate_jwk(key, self.name)
        with self._edge("revoke"):
            net = self._network(jwk, alg, account_url=None)  # no account: the JWS carries the key's JWK
            net.budget = _Budget(self._clock() + self.order_timeout, self.max_rate_limit_wait)
            send(net)

    def renewal_info(self, certificate: x509.Certificate) -> RenewalWindow | None:
        """The CA's suggested renewal window (RFC 9773), or None when the CA has no renewalInfo, does
        not know the certificate, or the certificate has expired. A window is not fetched again before
        the Retry-After the CA sent with it has passed."""
        if certificate.not_valid_after_utc <= self._now():
            return None
        cert_id = ari_cert_id(certificate)
        with self._lock:
            cached = self._ari_cache.get(cert_id)
        if cached and self._clock() < cached[1]:
            return cached[0]
        with self._edge("renewalInfo"):
            net = self._anonymous_network()
            base = self._directory_of(net).to_partial_json().get("renewalInfo")
            if not base:
                return None
            try:
                response = net.get(base.rstrip("/") + "/" + cert_id, content_type=net.JSON_CONTENT_TYPE)
            except (messages.Error, acme_errors.ClientError) as exc:
                if _status_of(exc) == 404:  # the CA does not know this certificate
                    return None
                raise
            window = self._parse_renewal_info(response)
        if window.retry_after:
            with self._lock:
                self._ari_cache[cert_id] = (window, self._clock() + window.retry_after.total_seconds())
        return window

    # -- account ----------------------------------------------------------------------------------------

    def account(self) -> acme_accounts.AccountRecord:
        """The account this issuer signs with, registering it with the CA the first time."""
        with self._edge("account"):
            return self._ensure_account().record

    def _ensure_account(self) -> _Account:
        with self._lock:
            if self._account is not None:
                return self._account
            with read_session(self.engine) as session:
                record = acme_accounts.find_account(session, self.directory_url, self.name)
                key = load_private_key(session, record.key, self._key_ring()) if record else None
            if record is None or key is None:  # first use: register
                key = acme_accounts.generate_account_key(self.account_key_algorithm)
                jwk, alg = _jwk(key)
                account_url = self._register(jwk, alg)
                with write_session(self.engine) as session:
                    record = acme_accounts.find_account(session, self.directory_url, self.name)
                    if record is None:
                        record = acme_accounts.record_account(
                            session, name=self.name, directory_url=self.directory_url, account_url=account_url,
                            key=key, ring=self._key_ring(), actor=self.actor, contact=self.contact,
                            eab_key_id=self._eab[0] if self._eab else None)
                        logger.info("%s: registered ACME account %s", self.name, account_url)
                    else:  # another process registered first: use its account, drop ours
                        self._deactivate_quietly(jwk, alg, account_url)
                        key = load_private_key(session, record.key, self._key_ring())
            jwk, alg = _jwk(key)
            del key
            self._account = _Account(jwk, alg, record)
            return self._account

    def _register(self, jwk: jose.JWK, alg: jose.JWASignature) -> str:
        """newAccount for this key; returns the account URL (an existing one, if the key has one)."""
        net = self._network(jwk, alg, account_url=None)
        directory = self._directory_of(net)
        binding = None
        if self._eab:
            key_id, hmac_key = self._eab
            binding = messages.ExternalAccountBinding.from_data(
                account_public_key=jwk.public_key(), kid=key_id, hmac_key=jose.b64encode(hmac_key).decode("ascii"),
                directory=directory)
        elif getattr(directory.meta, "external_account_required", False):
            raise PermanentError(f"{self.name}: the CA requires external account binding: "
                                 "configure its EAB key id and HMAC key")
        registration = messages.NewRegistration.from_data(contact=self.contact, terms_of_service_agreed=True,
                                                         external_account_binding=binding)
        client = acme_client.ClientV2(directory, net)
        try:
            return client.new_account(registration).uri
        except acme_errors.ConflictError as existing:
            return existing.location

    def _deactivate_quietly(self, jwk: jose.JWK, alg: jose.JWASignature, account_url: str) -> None:
        try:
            net = self._network(jwk, alg, account_url=account_url)
            net.post(account_url, messages.UpdateRegistration.from_json({"status": "deactivated"}),
                     new_nonce_url=self._directory_of(net)["newNonce"])
        except Exception as exc:  # an orphan account at the CA is harmless
            logger.warning("%s: could not deactivate the surplus account %s: %s", self.name, account_url,
                           type(exc).__name__)

    def _reregister(self, stale: _Account) -> None:
        """The CA no longer knows the account URL (a reset CA): register the same key again."""
        with self._lock:
            if self._account is not stale:
                return  # another thread did it
            account_url = self._register(stale.jwk, stale.alg)
            with write_session(self.engine) as session:
                record = acme_accounts.update_account_url(session, stale.record, account_url, self.actor)
            self._account = _Account(stale.jwk, stale.alg, record)
            logger.warning("%s: the CA did not know account %s; registered the same key again as %s",
                           self.name, stale.record.account_url, account_url)

    # -- plumbing -------------------------------------------------------------------------------------

    def _network(self, jwk: jose.JWK | None, alg: jose.JWASignature, account_url: str | None) -> _Network:
        net = _Network(key=jwk, alg=alg, verify=self._verify, timeout=self.timeout,
                       bad_nonce_retries=self.bad_nonce_retries, sleep=self._sleep, clock=self._clock,
                       account_url=account_url, transient_retries=self.transient_retries,
                       retry_backoff=self.retry_backoff)
        return net

    def _anonymous_network(self) -> _Network:
        net = getattr(self._local, "anonymous", None)
        if net is None:
            net = self._local.anonymous = self._network(None, jose.ES256, None)
        return net

    def _account_network(self, account: _Account) -> _Network:
        """This thread's signing client for the account (its own HTTP session and nonces)."""
        net: _Network | None = getattr(self._local, "net", None)
        if net is None or getattr(self._local, "account", None) is not account:
            net = self._network(account.jwk, account.alg, account.record.account_url)
            self._local.net, self._local.account = net, account
        return net

    def _directory_of(self, net: _Network) -> messages.Directory:
        if self._directory is None:
            directory = messages.Directory.from_json(net.get(self.directory_url).json())
            self._directory = directory
        return self._directory

    def _with_account(self, what: str, operation: Callable[[_Network], Any]) -> Any:
        with self._edge(what):
            account = self._ensure_account()
            for attempt in (1, 2):
                net = self._account_network(account)
                net.budget = _Budget(self._clock() + self.order_timeout, self.max_rate_limit_wait)
                try:
                    return operation(net)
                except messages.Error as problem:
                    if _code(problem) != "accountDoesNotExist" or attempt == 2:
                        raise
                    self._reregister(account)
                    account = self._ensure_account()
                finally:
                    net.budget = None
                    net.committed = False
        raise AssertionError("unreachable")

    @contextlib.contextmanager
    def _edge(self, what: str) -> Iterator[None]:
        """Translate the acme package's, requests' and josepy's errors into certpilot's, in one place."""
        try:
            yield
        except CertpilotError:
            raise
        except messages.Error as problem:
            raise self._problem(problem) from problem
        except acme_errors.ConflictError as exc:
            raise AcmeProblemError(ACME_ERROR_PREFIX + "conflict",
                                   f"{what}: the CA answered 409 Conflict ({exc.location})",
                                   status=409, ca=self.name) from exc
        except acme_errors.ClientError as exc:
            status = _status_of(exc)
            detail = f"{what}: unexpected answer" + (f" HTTP {status}" if status else f": {exc}")
            if status is not None and status < 500 and status != 429:
                raise AcmeProblemError("about:blank", detail, status=status, ca=self.name) from exc
            raise AcmeServerError("about:blank", detail, status=status, ca=self.name) from exc
        except requests.Timeout as exc:
            raise AcmeServerError("timeout", f"{what}: no answer within {self.timeout:g} s{self._asked(exc)}",
                                  ca=self.name) from exc
        except requests.RequestException as exc:
            raise AcmeServerError("unreachable", f"{what}{self._asked(exc)}: {type(exc).__name__}: {exc}",
                                  ca=self.name) from exc
        except (acme_errors.Error, jose.Error) as exc:
            raise AcmeServerError("malformed", f"{what}: {type(exc).__name__}: {exc}", ca=self.name) from exc

    def _asked(self, exc: requests.RequestException) -> str:
        """The request that failed (_asked), or, when requests did not say (an answer cut short), the CA's
        host:port from its directory URL."""
        asked = _asked(exc)
        if asked:
            return asked
        parts = urllib.parse.urlsplit(self.directory_url)
        return f" ({endpoint_label(parts.hostname or '?', parts.port or (443 if parts.scheme == 'https' else 80))})"

    def _problem(self, problem: messages.Error, context: str = "") -> CertpilotError:
        subproblems = tuple(AcmeSubproblem(str(sub.typ), (sub.detail or "").strip(),
                                           sub.identifier.value if sub.identifier else None)
                            for sub in (problem.subproblems or ()))
        reason = (problem.detail or problem.title or problem.description or "").strip()
        detail = f"{context}: {reason}" if context else reason
        status = getattr(problem, "http_status", None)
        code = _code(problem)
        if code == "rateLimited" or status == 429:
            return RateLimitedError(str(problem.typ), detail, retry_after=getattr(problem, "retry_after", None),
                                    status=status, subproblems=subproblems, ca=self.name)
        if code in _TRANSIENT_CODES or (status is not None and status >= 500):
            return AcmeServerError(str(problem.typ), detail, status=status, subproblems=subproblems, ca=self.name)
        return AcmeProblemError(str(problem.typ), detail, status=status, subproblems=subproblems, ca=self.name)

    def _post(self, net: _Network, url: str, obj: jose.JSONDeSerializable | None) -> requests.Response:
        return net.post(url, obj, new_nonce_url=self._directory_of(net)["newNonce"])

    def _wait(self, net: _Network, response: requests.Response | None, delay: float, what: str) -> None:
        """Sleep before the next poll: ``delay``, or longer if the CA's Retry-After asks; never past the deadline."""
        budget = net.budget
        assert budget is not None
        asked = retry_after_seconds(response.headers.get("Retry-After")) if response is not None else None
        wait = max(delay, asked or 0.0)
        remaining = budget.deadline - self._clock()
        if remaining <= 0 or wait > remaining:
            raise AcmeServerError("timeout", f"{what} (gave up after the order timeout of {self.order_timeout:g} s)",
                                  ca=self.name)
        self._sleep(wait)

    # -- an order ---------------------------------------------------------------------------------------

    def _order(self, net: _Network, csr: x509.CertificateSigningRequest, identifiers: list[messages.Identifier],
               replaces: x509.Certificate | None, journal: OrderJournal | None) -> IssuedCertificate:
        """Resume the journal's order if it can still give this CSR its certificate; else place a new
        one, and record it in the journal before anything else happens to it."""
        resumed = self._resume(net, journal, identifiers) if journal is not None else None
        if resumed is not None:
            order_url, order = resumed
            try:
                return self._complete(net, order_url, order, csr)
            except _OtherKey:
                logger.warning("%s: order %s was finalized with another key than this CSR's: placing a new order",
                               self.name, order_url)
                net.committed = False
        directory = self._directory_of(net)
        replaces_id = None
        if replaces is not None and directory.to_partial_json().get("renewalInfo"):
            replaces_id = ari_cert_id(replaces)
        order_url, order = self._new_order(net, identifiers, replaces_id)
        if journal is not None:
            journal.record_order(order_url)
        try:
            return self._complete(net, order_url, order, csr)
        except _OtherKey:
            raise AcmeServerError("malformed", "the CA returned a certificate for another public key than the CSR's",
                                  ca=self.name) from None

    def _resume(self, net: _Network, journal: OrderJournal,
                identifiers: list[messages.Identifier]) -> tuple[str, messages.Order] | None:
        """The journal's order, read again (POST-as-GET), when it can still be completed for these
        identifiers (pending, ready, processing or valid); None when there is none, or when the CA says
        it is invalid, expired, unknown (404) or not this account's: then a new order is placed. A CA
        that does not answer raises: ordering again could issue twice."""
        order_url = journal.order_url()
        if not order_url:
            return None
        try:
            order = messages.Order.from_json(self._post(net, order_url, None).json())
        except (messages.Error, acme_errors.ClientError) as exc:
            status = _status_of(exc)
            code = _code(exc) if isinstance(exc, messages.Error) else None
            if status is None or status >= 500 or status == 429 or code in ("accountDoesNotExist", "rateLimited"):
                raise
            logger.info("%s: order %s cannot be resumed (HTTP %s%s): placing a new order", self.name, order_url,
                        status, f", {code}" if code else "")
            return None
        if order.status not in (messages.STATUS_PENDING, messages.STATUS_READY, messages.STATUS_PROCESSING,
                                messages.STATUS_VALID):
            logger.info("%s: order %s is %s: placing a new order", self.name, order_url, order.status.name)
            return None
        if _identifier_set(order.identifiers) != _identifier_set(identifiers):
            logger.info("%s: order %s is for other identifiers than this CSR's: placing a new order",
                        self.name, order_url)
            return None
        logger.info("%s: resuming order %s (%s)", self.name, order_url, order.status.name)
        return order_url, order

    def _complete(self, net: _Network, order_url: str, order: messages.Order,
                  csr: x509.CertificateSigningRequest) -> IssuedCertificate:
        """Take an order from where it is (pending, ready, processing or valid) to the certificate:
        authorize, finalize with ``csr``, poll, download. _OtherKey when the certificate it ends with is
        not for the CSR's public key."""
        if order.status == messages.STATUS_PENDING:
            order = self._authorize(net, order_url, order)
        response: requests.Response | None = None
        net.committed = order.status != messages.STATUS_READY  # processing or valid: the CA is issuing already
        if order.status == messages.STATUS_READY:
            net.committed = True  # from the moment finalize is sent, the CA may issue
            response, order = self._finalize(net, order_url, order, csr)
        delay = _FIRST_POLL
        while order.status in (messages.STATUS_PROCESSING, messages.STATUS_READY) or (
                order.status == messages.STATUS_VALID and not order.certificate):
            self._wait(net, response, delay, f"order {order_url} still {order.status}")
            delay = min(delay * _POLL_GROWTH, _MAX_POLL)
            response = self._post(net, order_url, None)
            order = messages.Order.from_json(response.json())
        certificate_url = order.certificate  # a valid order has it: the loop above waits for it
        if order.status != messages.STATUS_VALID or not certificate_url:
            if order.error is not None:
                raise self._problem(order.error, "finalize")
            raise AcmeProblemError(ACME_ERROR_PREFIX + "orderInvalid", f"order {order_url} ended {order.status}",
                                   ca=self.name)
        chain = self._download(net, certificate_url)
        if spki_sha256(chain[0].public_key()) != spki_sha256(csr.public_key()):
            raise _OtherKey()
        return IssuedCertificate(tuple(c.public_bytes(serialization.Encoding.DER) for c in chain))

    def _finalize(self, net: _Network, order_url: str, order: messages.Order,
                  csr: x509.CertificateSigningRequest) -> tuple[requests.Response, messages.Order]:
        """Finalize a ready order. A finalize whose answer was lost may have reached the CA, and sending it
        again is then refused (orderNotReady: the order is processing or valid already): the order is read
        instead, and issuance goes on from where it is. Never a second certificate for one order."""
        retried = net.retried
        try:
            response = self._post(net, order.finalize, messages.CertificateRequest(csr=csr))
        except messages.Error as problem:
            if _code(problem) != "orderNotReady" or net.retried == retried:  # not sent again: a true refusal
                raise
            response = self._post(net, order_url, None)
            order = messages.Order.from_json(response.json())
            logger.info("%s: order %s was finalized by an earlier request whose answer was lost; it is %s",
                        self.name, order_url, order.status.name)
            if order.status not in (messages.STATUS_PROCESSING, messages.STATUS_VALID):
                raise
            return response, order
        return response, messages.Order.from_json(response.json())

    def _new_order(self, net: _Network, identifiers: list[messages.Identifier],
                   replaces_id: str | None) -> tuple[str, messages.Order]:
        new_order_url = self._directory_of(net)["newOrder"]
        try:
            response = self._post(net, new_order_url, _NewOrder(identifiers=tuple(identifiers), replaces=replaces_id))
        except (messages.Error, acme_errors.ConflictError) as exc:
            code = _code(exc) if isinstance(exc, messages.Error) else "conflict"
            if replaces_id is None or code not in ("alreadyReplaced", "conflict", "malformed"):
                raise
            # RFC 9773 7: the certificate was already replaced (or the CA objects to ``replaces``):
            # order without it rather than not at all.
            logger.info("%s: newOrder refused replaces=%s (%s); ordering without it", self.name, replaces_id, code)
            response = self._post(net, new_order_url, _NewOrder(identifiers=tuple(identifiers)))
        order_url = response.headers.get("Location")
        if not order_url:
            raise AcmeServerError("malformed", "newOrder answered without a Location", ca=self.name)
        return order_url, messages.Order.from_json(response.json())

    def _authorize(self, net: _Network, order_url: str, order: messages.Order) -> messages.Order:
        """Answer a challenge for every pending authorisation (valid ones are reused), wait until the
        order is ready, and always clean up what was presented."""
        assert net.key is not None
        presented: list[Challenge] = []
        try:
            answers: list[messages.ChallengeBody] = []
            for authz_url in order.authorizations:
                authz = messages.Authorization.from_json(self._post(net, authz_url, None).json())
                if authz.status == messages.STATUS_VALID:
                    continue
                if authz.status != messages.STATUS_PENDING:
                    raise self._authorization_failure(authz)
                challb, challenge = self._choose(authz, net.key)
                self.solver.present(challenge)
                presented.append(challenge)
                answers.append(challb)
            for challb in answers:
                self._post(net, challb.uri, _EmptyObject())
            delay = _FIRST_POLL
            response: requests.Response | None = None
            while order.status == messages.STATUS_PENDING:
                if response is not None:
                    self._wait(net, response, delay, f"authorizations of order {order_url} still pending")
                    delay = min(delay * _POLL_GROWTH, _MAX_POLL)
                elif answers:
                    self._sleep(_FIRST_POLL / 2)  # the CA validates right after the answer; give it a moment
                response = self._post(net, order_url, None)
                order = messages.Order.from_json(response.json())
            if order.status == messages.STATUS_INVALID:
                for authz_url in order.authorizations:
                    authz = messages.Authorization.from_json(self._post(net, authz_url, None).json())
                    if authz.status != messages.STATUS_VALID:
                        raise self._authorization_failure(authz)
                if order.error is not None:
                    raise self._problem(order.error, "order")
                raise AcmeProblemError(ACME_ERROR_PREFIX + "orderInvalid", f"order {order_url} became invalid",
                                       ca=self.name)
            return order
        finally:
            for challenge in presented:
                try:
                    self.solver.cleanup(challenge)
                except Exception as exc:  # never hide the order's own outcome behind a cleanup failure
                    logger.warning("%s: cleanup of %s for %s failed: %s", self.name, challenge.type,
                                   challenge.identifier, exc)

    def _choose(self, authz: messages.Authorization, jwk: jose.JWK) -> tuple[messages.ChallengeBody, Challenge]:
        identifier = authz.identifier.value
        offered = {_challenge_type(c): c for c in authz.challenges}
        thumbprint = jose.b64encode(jwk.thumbprint()).decode("ascii")  # RFC 7638, SHA-256
        for wanted in self.solver.challenge_types:
            challb = offered.get(wanted)
            token = _token(challb) if challb is not None else None
            if challb is not None and token:
                return challb, Challenge(wanted, identifier, token, f"{token}.{thumbprint}")  # RFC 8555 8.1
        raise PermanentError(f"{self.name}: for {identifier} the CA offers "
                             f"{', '.join(sorted(offered)) or 'no challenge'}, "
                             f"and the solver answers only {', '.join(self.solver.challenge_types)}")

    def _authorization_failure(self, authz: messages.Authorization) -> CertpilotError:
        identifier = authz.identifier.value
        for challb in authz.challenges:
            if challb.error is not None:
                return self._problem(challb.error, f"{challb.chall.typ} for {identifier}")
        return AcmeProblemError(ACME_ERROR_PREFIX + "unauthorized",
                                f"authorization for {identifier} is {authz.status}", ca=self.name)

    def _download(self, net: _Network, certificate_url: str) -> list[x509.Certificate]:
        response = self._post(net, certificate_url, None)
        chain = x509.load_pem_x509_certificates(response.content)
        if not self.preferred_chain or _topmost_issuer_cn(chain) == self.preferred_chain:
            return chain
        links = parse_header_links(response.headers.get("Link", "")) if response.headers.get("Link") else []
        for link in links:
            if link.get("rel") == "alternate" and link.get("url"):
                alternate = x509.load_pem_x509_certificates(self._post(net, link["url"], None).content)
                if _topmost_issuer_cn(alternate) == self.preferred_chain:
                    return alternate
        logger.info("%s: no chain issued by %r offered; keeping the default chain", self.name, self.preferred_chain)
        return chain

    def _parse_renewal_info(self, response: requests.Response) -> RenewalWindow:
        try:
            body = response.json()
            window = body["suggestedWindow"]
            start = dt.datetime.fromisoformat(window["start"]).astimezone(dt.timezone.utc)
            end = dt.datetime.fromisoformat(window["end"]).astimezone(dt.timezone.utc)
        except (ValueError, KeyError, TypeError) as exc:
            raise AcmeServerError("malformed", f"renewalInfo: not a suggested window: {exc}", ca=self.name) from exc
        if end < start:
            raise AcmeServerError("malformed", "renewalInfo: the window ends before it starts", ca=self.name)
        seconds = retry_after_seconds(response.headers.get("Retry-After"))
        return RenewalWindow(start=start, end=end,
                             retry_after=dt.timedelta(seconds=seconds) if seconds is not None else None,
                             explanation_url=body.get("explanationURL"))


class _OtherKey(Exception):
    """An order's certificate is for another public key than the CSR's."""


def _identifier_set(identifiers: Sequence[messages.Identifier]) -> set[tuple[str, str]]:
    return {(str(i.typ.name), str(i.value).lower()) for i in identifiers}


def _certificate_jwk(key: PrivateKeyTypes, ca: str) -> tuple[jose.JWK, jose.JWASignature]:
    """The JWK and algorithm to sign a revocation with a certificate's own key (EC P-256, P-384,
    P-521 or RSA: what ACME CAs issue for)."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        alg = {"secp256r1": jose.ES256, "secp384r1": jose.ES384, "secp521r1": jose.ES512}.get(key.curve.name)
        if alg is not None:
            return jose.JWKEC(key=key), alg
    elif isinstance(key, rsa.RSAPrivateKey):
        return jose.JWKRSA(key=key), jose.RS256
    raise PermanentError(f"{ca}: a revocation cannot be signed with a {type(key).__name__.removeprefix('_')} "
                         "certificate key; revoke it with the account instead")


def _code(problem: messages.Error) -> str:
    """The problem type's short name, also for types the acme package does not list (alreadyReplaced)."""
    return str(problem.typ).removeprefix(ACME_ERROR_PREFIX)


def _token(challb: messages.ChallengeBody) -> str | None:
    """The challenge's token as sent: known types (http-01, dns-01) and others (tls-alpn-01, which
    the acme package no longer parses) alike."""
    chall = challb.chall
    if isinstance(getattr(chall, "token", None), bytes):
        return str(chall.encode("token"))
    token = getattr(chall, "jobj", {}).get("token")
    return token if isinstance(token, str) else None


def _hmac_key(value: bytes | str) -> bytes:
    if isinstance(value, bytes):
        return value
    try:
        return base64.urlsafe_b64decode(value.strip() + "=" * (-len(value.strip()) % 4))
    except (ValueError, UnicodeEncodeError):
        raise ValueError("the EAB HMAC key must be bytes or base64url text") from None


def _challenge_type(challb: messages.ChallengeBody) -> str:
    typ = getattr(challb.chall, "typ", None)
    if isinstance(typ, str):
        return typ
    return str(getattr(challb.chall, "jobj", {}).get("type", "unknown"))  # a type the acme package does not know


def _uri_names(csr: x509.CertificateSigningRequest) -> list[str]:
    """The CSR's URI SANs (an ACME order cannot carry them)."""
    try:
        return list(csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                    .get_values_for_type(x509.UniformResourceIdentifier))
    except x509.ExtensionNotFound:
        return []


def _identifiers(csr: x509.CertificateSigningRequest) -> list[messages.Identifier]:
    """What to order: the CSR's DNS and IP SANs, and its common name when that is a DNS name not among them."""
    try:
        sans = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns_names = list(sans.get_values_for_type(x509.DNSName))
        ips = [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        dns_names, ips = [], []
    for attribute in csr.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME):
        value = str(attribute.value)
        address = parse_ip_address(value)
        if address is None:
            if value.lower() not in (n.lower() for n in dns_names):
                dns_names.insert(0, value)
        elif str(address) not in ips:
            ips.append(str(address))
    return ([messages.Identifier(typ=messages.IDENTIFIER_FQDN, value=n) for n in dict.fromkeys(dns_names)]
            + [messages.Identifier(typ=messages.IDENTIFIER_IP, value=ip) for ip in dict.fromkeys(ips)])


def _jwk(key: PrivateKeyTypes) -> tuple[jose.JWK, jose.JWASignature]:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        alg = {"secp256r1": jose.ES256, "secp384r1": jose.ES384}.get(key.curve.name)
        if alg is None:
            raise PermanentError(f"ACME account keys on curve {key.curve.name} are not supported")
        return jose.JWKEC(key=key), alg
    if isinstance(key, rsa.RSAPrivateKey):
        return jose.JWKRSA(key=key), jose.RS256
    raise PermanentError(f"ACME account keys of type {type(key).__name__} are not supported")


def _status_of(exc: Exception) -> int | None:
    """The HTTP status behind an acme error: a problem document's, or a non-JSON answer's."""
    status = getattr(exc, "http_status", None)
    if status is None and exc.args:
        first = exc.args[0]
        if isinstance(first, tuple) and first:
            first = first[0]
        if isinstance(first, requests.Response):
            status = first.status_code
    return status


def _topmost_issuer_cn(chain: list[x509.Certificate]) -> str | None:
    if not chain:
        return None
    names = chain[-1].issuer.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(names[0].value) if names else None
