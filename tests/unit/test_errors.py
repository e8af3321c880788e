"""certpilot.errors: every error that takes arguments survives a pickle round-trip (Prefect pickles a
failed task's exception into result storage), message and attributes alike."""

from __future__ import annotations

import inspect
import pickle
from typing import Any

import pytest

from certpilot import errors
from certpilot.errors import (AcmeProblemError, AcmeServerError, AcmeSubproblem, AmbiguousError, AuditChainError,
                              BlockNotFoundError, CertpilotError, EndpointTimeoutError, EndpointUnreachableError,
                              HandshakeFailedError, InvalidDnsNameError, InvalidIpAddressError, InvalidNameError,
                              InvalidOptionError, InvalidUriError, KeyMismatchError, ParseError, PasswordError, RateLimitedError,
                              ServiceError, ServiceRefusedError, ServiceUnavailableError)

FP = "ab" * 32
SUBPROBLEMS = (AcmeSubproblem("urn:ietf:params:acme:error:caa", "CAA forbids it", "web.example.test"),)

# One instance of each error in certpilot.errors whose constructor is not (message,), with every
# argument given a value other than its default.
SAMPLES: list[CertpilotError] = [
    ParseError("not a certificate", "/etc/ssl/web.pem"),
    PasswordError("wrong password", "/etc/ssl/web.p12"),
    InvalidOptionError("--max-size", -1, "a positive number of bytes"),
    KeyMismatchError("cd" * 32, [FP, "ef" * 32]),
    AmbiguousError("abcd", [FP, "ab" * 31 + "cd"]),
    AuditChainError(7, "its contents do not match its hash (altered)"),
    AcmeProblemError("urn:ietf:params:acme:error:rejectedIdentifier", "forbidden by policy", status=400,
                     subproblems=SUBPROBLEMS, ca="pebble"),
    AcmeServerError("urn:ietf:params:acme:error:serverInternal", "try later", status=503, ca="pebble"),
    RateLimitedError("urn:ietf:params:acme:error:rateLimited", "50 certificates per week", retry_after=3600,
                     status=429, subproblems=SUBPROBLEMS, ca="letsencrypt"),
    InvalidNameError("bad name", "no spaces"),
    InvalidDnsNameError("-web.example.test", "a label begins with a hyphen"),
    InvalidIpAddressError("300.1.1.1", "not an IPv4 or IPv6 address"),
    EndpointUnreachableError("::1", 8443, "refused", "nothing listening"),
    EndpointTimeoutError("web.example.test", 443, 2.5, "during the handshake"),
    HandshakeFailedError("web.example.test", 443, "TLS alert: handshake_failure"),
    ServiceError("acm", "ImportCertificate", "ValidationException", "bad chain", "acm ImportCertificate in eu-west-1"),
    ServiceRefusedError("elbv2", "ModifyListener", "AccessDenied"),
    ServiceUnavailableError("keyvault", "import_certificate", "Throttled", "slow down"),
    BlockNotFoundError("ssh-host/web1", "no such block document"),
    InvalidUriError("spiffe://prod.example/ns//web", "not a SPIFFE ID: the path has an empty segment ('//')"),
]


def _attributes(exc: BaseException) -> dict[str, Any]:
    return {name: value for name, value in vars(exc).items() if not name.startswith("__")}


def _takes_arguments(cls: type[CertpilotError]) -> bool:
    """Its constructor is not Exception's (message,)."""
    return any(klass.__dict__.get("__init__") is not None for klass in cls.__mro__
               if klass.__module__ == errors.__name__)


def test_every_error_that_takes_arguments_has_a_sample() -> None:
    taking = {cls for _, cls in inspect.getmembers(errors, inspect.isclass)
              if issubclass(cls, CertpilotError) and _takes_arguments(cls)}
    assert taking == {type(sample) for sample in SAMPLES}


@pytest.mark.parametrize("error", SAMPLES, ids=lambda e: type(e).__name__)
def test_a_pickled_error_keeps_its_type_message_and_attributes(error: CertpilotError) -> None:
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error) and copy.args == error.args
    assert _attributes(error)  # the sample carries data: the comparison below is not vacuous
    assert _attributes(copy) == _attributes(error)


def test_acme_problems_keep_their_derived_fields() -> None:
    limited = pickle.loads(pickle.dumps(SAMPLES[8]))
    assert isinstance(limited, RateLimitedError)
    assert (limited.code, limited.retry_after, limited.subproblems, limited.ca) == (
        "rateLimited", 3600, SUBPROBLEMS, "letsencrypt")
    assert str(limited).startswith("letsencrypt: rateLimited: 50 certificates per week; web.example.test: caa:")
