"""Revocation propagation as a relying party sees it (seed metric M6): the private CA's real CRL and OCSP
served over HTTP on loopback, watched by connectors.revocation.watch_revocation at the URLs the
certificate carries, and the measurement recorded by certpilot.propagation."""

from __future__ import annotations

import datetime as dt
import json
import socket
import time
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from certpilot import audit, ca, sli
from certpilot.database import read_session, write_session
from certpilot.issuance import build_csr
from certpilot.models import Certificate
from certpilot.propagation import EVENT, measurements, record_propagation
from certpilot.x509info import fingerprint_sha256
from connectors.revocation import watch_revocation
from lab.ports import free_port
from tests.private_ca_service import ServedCA, key_ring, private_ca_served

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)

ACTOR = audit.Actor("test")


@pytest.fixture
def corp(engine: sa.Engine) -> Iterator[ServedCA]:
    with private_ca_served(engine) as served:
        yield served


def revoked_at(engine: sa.Engine, certificate: x509.Certificate) -> dt.datetime:
    with read_session(engine) as session:
        row = session.get(Certificate, fingerprint_sha256(certificate))
        assert row is not None and row.revoked_at is not None
        return row.revoked_at


def test_a_revocation_is_seen_on_the_crl_and_by_ocsp_and_recorded(corp: ServedCA, engine: sa.Engine) -> None:
    leaf = corp.issue("watched.example.test").leaf
    corp.revoke(leaf)
    when = revoked_at(engine, leaf)
    seen = watch_revocation(leaf, corp.issuing, when, timeout=10)
    assert seen.crl_url == f"{corp.url}/corp/issuing.crl" and seen.ocsp_url == f"{corp.url}/corp/ocsp"
    assert seen.crl_seconds is not None and seen.ocsp_seconds is not None and seen.seconds is not None
    assert seen.seconds == max(seen.crl_seconds, seen.ocsp_seconds)
    assert 0 <= seen.seconds < 5  # a bound: the CA publishes with the revocation, nothing to wait for
    assert "lists it" in seen.detail and "says revoked" in seen.detail

    fingerprint = fingerprint_sha256(leaf)
    with write_session(engine) as session:
        record_propagation(session, fingerprint, seen, ACTOR)
    with read_session(engine) as session:
        events = audit.list_events(session, object_prefix=f"certificate:{fingerprint}", action=EVENT)
        measured = measurements(session, [fingerprint])
        report = sli.compute(session, dt.timedelta(hours=1), dt.datetime.now(dt.timezone.utc))
    assert len(events) == 1
    details = json.loads(events[0].details)
    assert details["crl_url"] == seen.crl_url and details["ocsp_url"] == seen.ocsp_url
    assert details["seconds"] == pytest.approx(seen.seconds, abs=0.001)
    assert measured[fingerprint].seconds == pytest.approx(seen.seconds, abs=0.001)
    m6 = report.get("M6")
    assert m6.value == pytest.approx(seen.seconds, abs=0.001)
    assert m6.detail("measured") == 1 and "revocation_visible" in m6.definition


def test_a_crl_and_responder_that_do_not_answer_are_named(engine: sa.Engine) -> None:
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with write_session(engine) as session:
        ca.init_ca(session, key_ring(), ACTOR, "dark", closed)
        issued = ca.issue(session, key_ring(), ACTOR, "dark", build_csr(ec.generate_private_key(ec.SECP256R1()),
                                                                        ["dark.example.test"]), "tls-server")
        ca.revoke(session, key_ring(), ACTOR, fingerprint_sha256(issued.leaf), x509.ReasonFlags.key_compromise)
    started = time.monotonic()
    seen = watch_revocation(issued.leaf, issued.chain[1], revoked_at(engine, issued.leaf), timeout=1.0)
    assert time.monotonic() - started < 3
    assert seen.seconds is None and seen.crl_seconds is None and seen.ocsp_seconds is None
    assert f"{closed}/dark/issuing.crl" in seen.detail and f"{closed}/dark/ocsp" in seen.detail
    assert "not seen revoked within" in seen.detail


def test_a_responder_that_never_answers_costs_no_more_than_the_watch(engine: sa.Engine) -> None:
    """A server that accepts connections and never answers: each request ends with the watch."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", free_port()))
        silent.listen(16)
        base = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with write_session(engine) as session:
            ca.init_ca(session, key_ring(), ACTOR, "silent", base)
            issued = ca.issue(session, key_ring(), ACTOR, "silent", build_csr(ec.generate_private_key(ec.SECP256R1()),
                                                                              ["silent.example.test"]), "tls-server")
        started = time.monotonic()
        seen = watch_revocation(issued.leaf, issued.chain[1], dt.datetime.now(dt.timezone.utc), timeout=1.5,
                                request_timeout=10)
        took = time.monotonic() - started
    assert took < 3.5  # the two requests in a row, each cut at the watch's end, never the 10 s request timeout
    assert seen.seconds is None and "did not answer within" in seen.detail and base in seen.detail


def test_a_certificate_that_stays_good_is_not_seen_revoked(corp: ServedCA, engine: sa.Engine) -> None:
    leaf = corp.issue("good.example.test").leaf
    seen = watch_revocation(leaf, corp.issuing, dt.datetime.now(dt.timezone.utc), timeout=0.5, interval=0.05)
    assert seen.seconds is None and seen.crl_seconds is None and seen.ocsp_seconds is None
    assert "does not list it yet" in seen.detail and "still says good" in seen.detail
    # the same certificate once revoked: seen at once (nothing was cached from the watch before)
    corp.revoke(leaf)
    again = watch_revocation(leaf, corp.issuing, revoked_at(engine, leaf), timeout=10)
    assert again.seconds is not None and again.seconds < 5


def test_a_crl_signed_by_another_key_does_not_count(corp: ServedCA, engine: sa.Engine) -> None:
    leaf = corp.issue("forged.example.test").leaf
    corp.revoke(leaf)
    with write_session(engine) as session:
        other = ca.init_ca(session, key_ring(), ACTOR, "other", corp.url)
        _, other_issuing = ca.ca_certificates(session, other)
    seen = watch_revocation(leaf, other_issuing, revoked_at(engine, leaf), timeout=0.5)
    assert seen.seconds is None
    assert "not by the certificate's issuer" in seen.detail
