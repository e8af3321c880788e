"""The error tree: one root, a transient branch (retry with backoff) and a permanent one (do not retry).

Every error carries the data that caused it, never key material or PEM text, so that it is safe to
log, to show in a Prefect state message and to persist as a flow's failure.
"""

from __future__ import annotations

import re
import traceback
from collections.abc import Callable
from typing import Any, NamedTuple

REDACTED_LENGTH = 600  # the longest message redact() returns
# What may be key material: PEM armour, the words of a key's PEM label, or a long unbroken run of
# base64 or hex (a DER key, a JWK's "d", a passphrase-like blob) that no error message needs.
_SECRET = re.compile(r"-----BEGIN|PRIVATE KEY|[A-Za-z0-9+/=_-]{120,}")


def redact(exc: BaseException) -> str:
    """The one place that decides what an error may show: one line, safe to log, to put in a Prefect
    state message or a report, and to persist.

    Any error's own message is shown, certpilot's or not (a missing block, a refused connection),
    unless it carries something that may be key material, in which case only its type is named. An
    exception that is not certpilot's is named by its type and the place it was raised, so that it
    is findable without a traceback. At most REDACTED_LENGTH characters.
    """
    message = " ".join(str(exc).split())
    ours = isinstance(exc, CertpilotError)
    if may_hold_secret(message):
        text = f"{type(exc).__name__} (its message may hold key material and was withheld)"
    elif ours:
        text = message or type(exc).__name__
    else:
        text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    if not ours:
        frames = traceback.extract_tb(exc.__traceback__)
        if frames:
            text += f" (at {'/'.join(frames[-1].filename.split('/')[-2:])}:{frames[-1].lineno})"
    return text if len(text) <= REDACTED_LENGTH else text[:REDACTED_LENGTH - 3] + "..."


def may_hold_secret(text: str) -> bool:
    """True when ``text`` may hold key material (PEM armour, a key's PEM label, a long base64 or hex
    run): the one test, used by ``redact`` and by connectors deciding whether a vendor's message may be
    kept in an error at all."""
    return bool(_SECRET.search(text))


class CertpilotError(Exception):
    """Root of every error certpilot raises on purpose."""


class TransientError(CertpilotError):
    """Worth retrying: a timeout, a refused connection, a busy database."""


class PermanentError(CertpilotError):
    """Retrying cannot help: bad input, a rejected request, a broken invariant."""


class ParseError(PermanentError):
    """Input that is not a certificate, key or bundle in any format certpilot reads.

    ``source`` names the input (a path or ``-``), ``detail`` says exactly what is wrong.
    """

    def __init__(self, detail: str, source: str | None = None) -> None:
        self.detail = detail
        self.source = source
        super().__init__(f"{source}: {detail}" if source else detail)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.detail, self.source))


class InvalidOptionError(PermanentError, ValueError):
    """An option given a value it cannot take (``--max-size -1``): ``option`` names it, ``value`` is
    what was given. A ValueError too, as cryptography raises for a wrong value."""

    def __init__(self, option: str, value: object, expected: str) -> None:
        self.option = option
        self.value = value
        self.expected = expected
        super().__init__(f"{option} must be {expected}, not {value!r}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.option, self.value, self.expected))


class PasswordError(ParseError):
    """An encrypted key or PKCS#12 file with no password, or the wrong one."""


class KeyMismatchError(PermanentError):
    """A private key that belongs to none of the certificates it was given with."""

    def __init__(self, key_spki_sha256: str, certificate_fingerprints: list[str]) -> None:
        self.key_spki_sha256 = key_spki_sha256
        self.certificate_fingerprints = certificate_fingerprints
        shown = ", ".join(fp[:16] for fp in certificate_fingerprints) or "none"
        super().__init__(
            f"private key (public key sha256 {key_spki_sha256[:16]}...) matches none of the "
            f"certificates given with it ({shown})"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.key_spki_sha256, self.certificate_fingerprints))


class NotFoundError(PermanentError):
    """No inventory object matches the identifier given."""


class AmbiguousError(PermanentError):
    """An identifier prefix that matches more than one inventory object."""

    def __init__(self, prefix: str, matches: list[str]) -> None:
        self.prefix = prefix
        self.matches = matches
        super().__init__(
            f"{prefix!r} matches {len(matches)} certificates: "
            + ", ".join(m[:16] for m in matches[:5])
            + (" ..." if len(matches) > 5 else "")
            + "; give more of the fingerprint"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.prefix, self.matches))


class MasterKeyError(PermanentError):
    """The master key is missing, malformed, or not the one that wrapped a stored key."""


class AuditChainError(PermanentError):
    """The audit chain is broken; ``seq`` is the first event that fails."""

    def __init__(self, seq: int, reason: str) -> None:
        self.seq = seq
        self.reason = reason
        super().__init__(f"audit chain broken at event {seq}: {reason}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.seq, self.reason))


# ACME (RFC 8555): the CA's problem documents, translated at the edge (connectors/acme_issuer.py).

ACME_ERROR_PREFIX = "urn:ietf:params:acme:error:"


class AcmeSubproblem(NamedTuple):
    """One identifier's part of a compound problem (RFC 8555 section 6.7.1)."""

    typ: str
    detail: str
    identifier: str | None = None


class _AcmeProblem:
    """What every ACME problem error carries: the problem type URN, the CA's reason, its parts."""

    typ: str
    detail: str
    status: int | None
    subproblems: tuple[AcmeSubproblem, ...]
    ca: str | None  # the CA's name, which begins the message

    def _fill(self, typ: str, detail: str, status: int | None, subproblems: tuple[AcmeSubproblem, ...],
              ca: str | None) -> str:
        self.typ, self.detail, self.status, self.subproblems = typ, detail, status, tuple(subproblems)
        self.ca = ca
        text = f"{ca}: " if ca else ""
        text += f"{self.code}: {detail}" if detail else self.code
        for sub in self.subproblems:
            text += f"; {sub.identifier or '?'}: {sub.typ.removeprefix(ACME_ERROR_PREFIX)}: {sub.detail}"
        return text

    @property
    def code(self) -> str:
        """The short name: ``rejectedIdentifier`` for urn:ietf:params:acme:error:rejectedIdentifier."""
        return self.typ.removeprefix(ACME_ERROR_PREFIX)

    def _keywords(self) -> dict[str, Any]:
        return {"status": self.status, "subproblems": self.subproblems, "ca": self.ca}

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_acme_problem, (type(self), self.typ, self.detail, self._keywords()))


def _rebuild_acme_problem(cls: Callable[..., _AcmeProblem], typ: str, detail: str,
                          keywords: dict[str, Any]) -> _AcmeProblem:
    """Unpickles an ACME problem error (its keyword-only arguments are why __reduce__ needs this)."""
    return cls(typ, detail, **keywords)


class AcmeProblemError(_AcmeProblem, PermanentError):
    """The CA refused, and asking again will not change its mind (rejectedIdentifier, caa,
    unauthorized, badCSR, a failed challenge...)."""

    def __init__(self, typ: str, detail: str = "", *, status: int | None = None,
                 subproblems: tuple[AcmeSubproblem, ...] = (), ca: str | None = None) -> None:
        super().__init__(self._fill(typ, detail, status, subproblems, ca))


class AcmeServerError(_AcmeProblem, TransientError):
    """The CA failed or was unreachable (serverInternal, badNonce after every retry, a timeout)."""

    def __init__(self, typ: str, detail: str = "", *, status: int | None = None,
                 subproblems: tuple[AcmeSubproblem, ...] = (), ca: str | None = None) -> None:
        super().__init__(self._fill(typ, detail, status, subproblems, ca))


class RateLimitedError(_AcmeProblem, TransientError):
    """The CA's rate limit: try again after ``retry_after`` seconds (None when it did not say)."""

    def __init__(self, typ: str, detail: str = "", *, retry_after: float | None = None,
                 status: int | None = None, subproblems: tuple[AcmeSubproblem, ...] = (),
                 ca: str | None = None) -> None:
        self.retry_after = retry_after
        text = self._fill(typ, detail, status, subproblems, ca)
        if retry_after is not None:
            text += f" (retry after {retry_after:.0f} s)"
        super().__init__(text)

    def _keywords(self) -> dict[str, Any]:
        return {**super()._keywords(), "retry_after": self.retry_after}


# Causes. Each names what went wrong and carries its data as attributes; the role that met it (a
# source, a deployer, a renewal) wraps it or lets it through. Connectors subclass these for their own
# transport (connectors.tls_verify.TlsUnreachableError is an EndpointUnreachableError).


def endpoint_label(host: str, port: int) -> str:
    """``host:port``, an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class InvalidNameError(PermanentError, ValueError):
    """A DNS name or an IP address that breaks certpilot's name rules (certpilot.names): ``value`` as
    given, ``reason`` what is wrong with it."""

    what = "a valid name"

    def __init__(self, value: str, reason: str) -> None:
        self.value, self.reason = value, reason
        super().__init__(f"{value!r} is not {self.what}: {reason}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.value, self.reason))


class InvalidDnsNameError(InvalidNameError):
    what = "a valid DNS name"


class InvalidIpAddressError(InvalidNameError):
    what = "an IP address"


class InvalidUriError(InvalidNameError):
    """A URI name (a SPIFFE ID, or another absolute URI) a certificate cannot carry; a long one is shown
    by its first 80 characters."""

    what = "a usable URI name"

    def __init__(self, value: str, reason: str) -> None:
        self.value, self.reason = value, reason
        shown = repr(value) if len(value) <= 120 else repr(value[:80]) + f"... ({len(value)} characters)"
        super(InvalidNameError, self).__init__(f"{shown} is not {self.what}: {reason}")


class EndpointError(CertpilotError):
    """Talking to the network endpoint ``host``:``port`` failed."""

    host: str
    port: int


class EndpointUnreachableError(EndpointError, TransientError):
    """No connection to ``host``:``port``. ``cause``: refused (nothing listening), unresolved (the name
    does not resolve), reset, or unreachable (no route, network down); ``detail`` says more."""

    def __init__(self, host: str, port: int, cause: str, detail: str = "") -> None:
        self.host, self.port, self.cause, self.detail = host, port, cause, detail
        super().__init__(f"{endpoint_label(host, port)}: cannot connect ({cause})" + (f": {detail}" if detail else ""))

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.host, self.port, self.cause, self.detail))


class EndpointTimeoutError(EndpointError, TransientError):
    """``host``:``port`` did not connect or answer within ``timeout`` seconds; ``detail`` says at which stage."""

    def __init__(self, host: str, port: int, timeout: float, detail: str = "") -> None:
        self.host, self.port, self.timeout, self.detail = host, port, timeout, detail
        super().__init__(f"{endpoint_label(host, port)}: no answer within {timeout:g} s"
                         + (f": {detail}" if detail else ""))

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.host, self.port, self.timeout, self.detail))


class HandshakeFailedError(EndpointError, TransientError):
    """``host``:``port`` answered, but the TLS (or other protocol) handshake failed: ``reason`` (a TLS
    alert, not TLS at all, closed mid-handshake, an oversized chain)."""

    def __init__(self, host: str, port: int, reason: str) -> None:
        self.host, self.port, self.reason = host, port, reason
        super().__init__(f"{endpoint_label(host, port)}: handshake failed: {reason}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.host, self.port, self.reason))


class ServiceError(CertpilotError):
    """A cloud API (AWS, Azure...) did not do what was asked. ``service`` (acm, elbv2, keyvault...),
    ``operation`` (its API call), ``code`` (the service's error code, or the client's error type),
    ``detail`` (the service's message, without request values), ``where`` (service, operation, region
    and resource as one phrase, for the message); ``message``, when given, is the whole message."""

    def __init__(self, service: str, operation: str, code: str, detail: str = "", where: str | None = None,
                 message: str | None = None) -> None:
        self.service, self.operation, self.code, self.detail, self.where = service, operation, code, detail, where
        super().__init__(message or f"{where or f'{service} {operation}'}: {code}" + (f": {detail}" if detail else ""))

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.service, self.operation, self.code, self.detail, self.where, str(self)))


class ServiceRefusedError(ServiceError, PermanentError):
    """The API refused the request and will refuse it again: access denied, invalid, not found."""


class ServiceUnavailableError(ServiceError, TransientError):
    """The API could not answer now: throttled, failing (5xx), not reached, or an answer not its own."""


class DeployError(TransientError):
    """Installing failed for a reason that may pass (connection dropped, timeout, throttled)."""


class PermanentDeployError(PermanentError):
    """Installing failed for a reason retrying will not fix (unknown host key, permission denied,
    bad configuration). A key that does not match its certificate never gets this far: see certpilot.deployment.DeployBundle."""


class BlockNotFoundError(PermanentError):
    """A Prefect block that a target, source or managed certificate refers to does not exist (or the
    reference is malformed). ``block`` is the reference as given (``<block-type-slug>/<name>``)."""

    def __init__(self, block: str, detail: str = "") -> None:
        self.block, self.detail = block, detail
        super().__init__(f"block {block!r} not found" + (f": {detail}" if detail else ""))

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.block, self.detail))
