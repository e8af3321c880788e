"""The CA's problem documents become certpilot errors carrying their type: from real pebble where it
produces them, and from the tests' front before pebble for the ones it does not (rate limits, CAA...)."""

from __future__ import annotations

import pickle
import time
from collections.abc import Callable

import httpx
import pytest
import sqlalchemy as sa

from certpilot.errors import (
    AcmeProblemError,
    AcmeServerError,
    AcmeSubproblem,
    PermanentError,
    RateLimitedError,
    TransientError,
)
from certpilot.issuance import IssuedCertificate, build_csr
from certpilot.keys import generate_private_key
from certpilot.keystore import KeyRing
from connectors.acme_issuer import AcmeIssuer
from connectors.challenges import Challenge, Http01Responder
from tests.integration.acme_servers import BLOCKED_DOMAINS, AcmeFront, Pebble, free_port, verified_chain

RATE_LIMITED = "urn:ietf:params:acme:error:rateLimited"


def _order(issuer: AcmeIssuer, *names: str) -> IssuedCertificate:
    return issuer.issue(build_csr(generate_private_key("ec-p256"), list(names)), "tls-server")


@pytest.fixture
def issuer(sqlite_engine: sa.Engine, pebble: Pebble, key_ring: Callable[[], KeyRing],
           http01_responder: Http01Responder) -> AcmeIssuer:
    return AcmeIssuer(sqlite_engine, "pebble", pebble.directory_url, key_ring=key_ring, solver=http01_responder,
                      ca_bundle=pebble.ca_bundle)


@pytest.fixture
def front_issuer(sqlite_engine: sa.Engine, acme_front: AcmeFront, pebble: Pebble, key_ring: Callable[[], KeyRing],
                 http01_responder: Http01Responder) -> AcmeIssuer:
    issuer = AcmeIssuer(sqlite_engine, "pebble-front", acme_front.directory_url, key_ring=key_ring,
                        solver=http01_responder, ca_bundle=pebble.ca_bundle, max_rate_limit_wait=5.0)
    issuer.account()
    acme_front.posts.clear()
    return issuer


def test_rejected_identifier_from_pebble_fails_at_once_with_the_cas_reason(issuer: AcmeIssuer) -> None:
    blocked = f"www.{BLOCKED_DOMAINS[0]}"
    with pytest.raises(AcmeProblemError) as refused:
        _order(issuer, "fine.certpilot.test", blocked)
    error = refused.value
    assert isinstance(error, PermanentError) and not isinstance(error, TransientError)
    assert error.typ == "urn:ietf:params:acme:error:rejectedIdentifier"
    assert error.code == "rejectedIdentifier"
    assert blocked in error.detail and "forbidden by policy" in error.detail
    assert error.status == 400
    assert str(error).startswith("pebble: rejectedIdentifier: ")
    copy = pickle.loads(pickle.dumps(error))  # Prefect persists a failed task's exception
    assert (copy.typ, copy.detail, copy.status) == (error.typ, error.detail, error.status)


def test_malformed_identifier_from_pebble(issuer: AcmeIssuer) -> None:
    with pytest.raises(AcmeProblemError) as refused:
        _order(issuer, "under_score.certpilot.test")
    assert refused.value.code == "malformed"


def test_failed_challenge_carries_the_validation_error(issuer: AcmeIssuer, http01_responder: Http01Responder,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    serve = http01_responder.present  # serve a key authorisation that is not the one asked for
    tokens: list[str] = []

    def present_wrong(c: Challenge) -> None:
        tokens.append(c.token)
        serve(Challenge(c.type, c.identifier, c.token, "wrong." + c.token))

    monkeypatch.setattr(http01_responder, "present", present_wrong)
    with pytest.raises(AcmeProblemError) as failed:
        _order(issuer, "wrong-answer.certpilot.test")
    assert failed.value.code == "unauthorized"
    assert "http-01 for wrong-answer.certpilot.test" in failed.value.detail
    assert tokens  # the responder served an answer ... and took it down after the failure too
    for token in tokens:
        answer = httpx.get(f"http://{http01_responder.address}:{http01_responder.port}"
                           f"/.well-known/acme-challenge/{token}", timeout=5)
        assert answer.status_code == 404


def test_rate_limit_with_short_retry_after_is_waited_out(front_issuer: AcmeIssuer, acme_front: AcmeFront,
                                                         pebble: Pebble) -> None:
    acme_front.inject("/order-plz", 429, {"type": RATE_LIMITED, "detail": "too many new orders recently"},
                      {"Retry-After": "1"})
    started = time.monotonic()

    issued = _order(front_issuer, "patient.certpilot.test")

    assert time.monotonic() - started >= 1.0
    verified_chain(issued.chain, pebble.roots()[0], "patient.certpilot.test")
    order_posts = [at for path, _, at in acme_front.posts if path == "/order-plz"]
    assert len(order_posts) == 2  # one refused, one after the wait: no hammering
    assert order_posts[1] - order_posts[0] >= 1.0


def test_rate_limit_beyond_the_bound_fails_at_once_with_retry_after(front_issuer: AcmeIssuer,
                                                                    acme_front: AcmeFront) -> None:
    acme_front.inject("/order-plz", 429, {"type": RATE_LIMITED, "detail": "50 certificates per week"},
                      {"Retry-After": "3600"})
    started = time.monotonic()
    with pytest.raises(RateLimitedError) as limited:
        _order(front_issuer, "impatient.certpilot.test")
    assert time.monotonic() - started < 1.0
    error = limited.value
    assert isinstance(error, TransientError)
    assert error.typ == RATE_LIMITED and error.retry_after == 3600 and error.status == 429
    assert "50 certificates per week" in str(error) and "retry after 3600 s" in str(error)
    assert [path for path, _, _ in acme_front.posts].count("/order-plz") == 1
    copy = pickle.loads(pickle.dumps(error))  # retry_after is a field, kept through Prefect's result storage
    assert type(copy) is RateLimitedError and (copy.retry_after, copy.typ, str(copy)) == (3600, RATE_LIMITED, str(error))


def test_rate_limit_with_an_http_date(front_issuer: AcmeIssuer, acme_front: AcmeFront) -> None:
    acme_front.inject("/order-plz", 429, {"type": RATE_LIMITED, "detail": "slow down"},
                      {"Retry-After": "Wed, 21 Oct 2099 07:28:00 GMT"})
    with pytest.raises(RateLimitedError) as limited:
        _order(front_issuer, "dated.certpilot.test")
    assert limited.value.retry_after is not None and limited.value.retry_after > 3600


def test_caa_compound_problem_with_subproblems(front_issuer: AcmeIssuer, acme_front: AcmeFront) -> None:
    acme_front.inject("/order-plz", 403, {
        "type": "urn:ietf:params:acme:error:compound", "detail": "Some identifiers were rejected",
        "subproblems": [
            {"type": "urn:ietf:params:acme:error:caa", "detail": "CAA record forbids issuance",
             "identifier": {"type": "dns", "value": "caa.certpilot.test"}},
            {"type": "urn:ietf:params:acme:error:rejectedIdentifier", "detail": "on the block list",
             "identifier": {"type": "dns", "value": "www.caa.certpilot.test"}}]})
    with pytest.raises(AcmeProblemError) as refused:
        _order(front_issuer, "caa.certpilot.test", "www.caa.certpilot.test")
    assert refused.value.code == "compound"
    assert refused.value.subproblems == (
        AcmeSubproblem("urn:ietf:params:acme:error:caa", "CAA record forbids issuance", "caa.certpilot.test"),
        AcmeSubproblem("urn:ietf:params:acme:error:rejectedIdentifier", "on the block list", "www.caa.certpilot.test"))
    assert "caa.certpilot.test: caa: CAA record forbids issuance" in str(refused.value)


@pytest.mark.parametrize(("status", "typ", "error_class"), [
    (403, "urn:ietf:params:acme:error:caa", AcmeProblemError),
    (403, "urn:ietf:params:acme:error:unauthorized", AcmeProblemError),
    (400, "urn:ietf:params:acme:error:badCSR", AcmeProblemError),
    (500, "urn:ietf:params:acme:error:serverInternal", AcmeServerError),
    (503, "urn:ietf:params:acme:error:unavailable", AcmeServerError),
])
def test_problem_types_map_to_permanent_or_transient(front_issuer: AcmeIssuer, acme_front: AcmeFront, status: int,
                                                     typ: str, error_class: type[Exception]) -> None:
    front_issuer.retry_backoff = 0.01
    front_issuer.order_timeout = 1.5
    # A refusal is final; a 5xx to a finalize is sent again until the order's deadline (the CA may have
    # acted: giving up would leave a certificate issued for nothing), then fails as the CA's error.
    acme_front.inject("/finalize-order/", status, {"type": typ, "detail": "the CA says no"}, times=10_000)
    with pytest.raises(error_class) as failed:
        _order(front_issuer, "mapped.certpilot.test")
    assert failed.value.typ == typ and failed.value.status == status  # type: ignore[attr-defined]
    finalizes = [path.split("/")[1] for path, _, _ in acme_front.posts].count("finalize-order")
    if status < 500:
        assert finalizes == 1
    else:
        assert finalizes > 1 + front_issuer.transient_retries


def test_a_5xx_before_finalize_is_retried_a_bounded_number_of_times(front_issuer: AcmeIssuer,
                                                                    acme_front: AcmeFront) -> None:
    front_issuer.retry_backoff = 0.01
    acme_front.inject("/order-plz", 503, {"type": "urn:ietf:params:acme:error:serverInternal"}, times=10_000)
    with pytest.raises(AcmeServerError) as failed:
        _order(front_issuer, "bounded.certpilot.test")
    assert failed.value.status == 503
    sent = [path.split("/")[1] for path, _, _ in acme_front.posts].count("order-plz")
    assert sent == 1 + front_issuer.transient_retries


def test_a_5xx_once_is_retried_and_the_order_completes(front_issuer: AcmeIssuer, acme_front: AcmeFront) -> None:
    front_issuer.retry_backoff = 0.01
    acme_front.inject("/finalize-order/", 503, {"type": "urn:ietf:params:acme:error:serverInternal"}, times=2)
    issued = _order(front_issuer, "retried.certpilot.test")
    assert issued.leaf.subject.rfc4514_string() == "CN=retried.certpilot.test"
    assert [path.split("/")[1] for path, _, _ in acme_front.posts].count("finalize-order") == 3


def test_unreachable_ca_is_transient(sqlite_engine: sa.Engine, key_ring: Callable[[], KeyRing],
                                     http01_responder: Http01Responder) -> None:
    issuer = AcmeIssuer(sqlite_engine, "nowhere", f"https://127.0.0.1:{free_port()}/dir", key_ring=key_ring,
                        solver=http01_responder, timeout=2.0, retry_backoff=0.01)  # refused: sent again, briefly
    with pytest.raises(AcmeServerError) as failed:
        issuer.account()
    assert failed.value.code == "unreachable"
