"""Revocation and resumable orders with an ACME CA, against real pebble.

Revocation through certpilot.revoking: signed by the account, or by the certificate's own key (a
second account that holds no authorisation for the names can revoke only that way), confirmed on
pebble's management API with the reason; once recorded, a second revocation is not sent; a CA that
does not answer fails naming it and records nothing.

Orders through an OrderJournal: a run killed after the order was placed (before its authorisations),
or after they were validated (before finalize), resumes that order and gets one certificate from it;
a journal naming an order the CA does not know places a new one."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from sqlmodel import select

from certpilot import audit, inventory, keystore, revoking
from certpilot.database import read_session, write_session
from certpilot.errors import AcmeProblemError, AcmeServerError, PermanentError
from certpilot.issuance import IssuedCertificate, build_csr
from certpilot.keys import generate_private_key
from certpilot.keystore import KeyRing
from certpilot.models import AuditEvent, Certificate
from certpilot.x509info import describe_certificate
from connectors.acme_issuer import AcmeIssuer
from connectors.challenges import Challenge, Http01Responder
from lab.ports import free_port
from tests.integration.acme_servers import Pebble

ACTOR = audit.Actor("test")


def _acme(engine: sa.Engine, pebble: Pebble, key_ring: Callable[[], KeyRing], solver: object, name: str) -> AcmeIssuer:
    return AcmeIssuer(engine, name, pebble.directory_url, key_ring=key_ring, solver=solver,  # type: ignore[arg-type]
                      ca_bundle=pebble.ca_bundle)


@pytest.fixture
def issuer(sqlite_engine: sa.Engine, pebble: Pebble, key_ring: Callable[[], KeyRing],
           http01_responder: Http01Responder) -> AcmeIssuer:
    return _acme(sqlite_engine, pebble, key_ring, http01_responder, "acme-issuer/pebble-revoke")


def _issue_and_record(engine: sa.Engine, issuer: AcmeIssuer, ring: KeyRing, name: str,
                      keep_key: bool = True) -> tuple[IssuedCertificate, PrivateKeyTypes]:
    """A certificate from pebble, in the inventory with its chain, and its key in the keystore."""
    key = generate_private_key("ec-p256")
    issued = issuer.issue(build_csr(key, [name]), "tls-server")
    with write_session(engine) as session:
        inventory.upsert(session, [inventory.Observation(describe_certificate(c), None, "issued")
                                   for c in issued.chain], ACTOR)
        if keep_key:
            keystore.store_private_key(session, key, ring, ACTOR, origin="generated")
    return issued, key


def _fingerprint(cert: x509.Certificate) -> str:
    return describe_certificate(cert).fingerprint_sha256


def _revoked_events(engine: sa.Engine, fingerprint: str) -> list[AuditEvent]:
    with read_session(engine) as session:
        return list(session.exec(select(AuditEvent).where(AuditEvent.action == "certificate.revoked",
                                                          AuditEvent.object == f"certificate:{fingerprint}")).all())


def test_revocation_signed_by_the_account_reaches_pebble_once(sqlite_engine: sa.Engine, issuer: AcmeIssuer,
                                                              pebble: Pebble, key_ring: Callable[[], KeyRing]) -> None:
    issued, _ = _issue_and_record(sqlite_engine, issuer, key_ring(), "account-revoke.certpilot.test")
    fingerprint = _fingerprint(issued.leaf)
    assert pebble.cert_status(issued.leaf.serial_number)["Status"] == "Valid"

    outcome = revoking.revoke(sqlite_engine, fingerprint, x509.ReasonFlags.superseded, issuer, key_ring, ACTOR)

    status = pebble.cert_status(issued.leaf.serial_number)
    assert (status["Status"], status["Reason"]) == ("Revoked", 4)  # superseded
    assert (outcome.already, outcome.signed_with, outcome.reason, outcome.issuer) == (
        False, "account", "superseded", "acme-issuer/pebble-revoke")
    with read_session(sqlite_engine) as session:
        row = session.get(Certificate, fingerprint)
        assert row is not None and (row.status, row.revocation_reason, row.revoked_at) == (
            "revoked", "superseded", outcome.revoked_at)
    [event] = _revoked_events(sqlite_engine, fingerprint)
    assert '"signed_with":"account"' in event.details

    again = revoking.revoke(sqlite_engine, fingerprint, x509.ReasonFlags.key_compromise, issuer, key_ring, ACTOR)
    assert again.already and (again.reason, again.revoked_at, again.signed_with) == (
        "superseded", outcome.revoked_at, "account")  # the first revocation's
    assert len(_revoked_events(sqlite_engine, fingerprint)) == 1
    assert pebble.cert_status(issued.leaf.serial_number)["Reason"] == 4  # not sent again
    issuer.revoke(issued.leaf, x509.ReasonFlags.superseded)  # the CA's alreadyRevoked is no error


def test_key_compromise_is_signed_by_the_certificates_own_key(sqlite_engine: sa.Engine, issuer: AcmeIssuer,
                                                              pebble: Pebble, key_ring: Callable[[], KeyRing],
                                                              http01_responder: Http01Responder) -> None:
    """Another account, with no authorisation for the names, is refused when it signs itself; with the
    certificate's key (held in the keystore) the revocation goes through."""
    stranger = _acme(sqlite_engine, pebble, key_ring, http01_responder, "acme-issuer/stranger")
    refused, _ = _issue_and_record(sqlite_engine, issuer, key_ring(), "not-yours.certpilot.test", keep_key=False)
    with pytest.raises(AcmeProblemError, match="unauthorized"):
        revoking.revoke(sqlite_engine, _fingerprint(refused.leaf), x509.ReasonFlags.key_compromise, stranger,
                        key_ring, ACTOR)  # no key in the keystore: signed by the stranger's account
    assert pebble.cert_status(refused.leaf.serial_number)["Status"] == "Valid"
    assert _revoked_events(sqlite_engine, _fingerprint(refused.leaf)) == []

    issued, key = _issue_and_record(sqlite_engine, issuer, key_ring(), "compromised.certpilot.test")
    outcome = revoking.revoke(sqlite_engine, _fingerprint(issued.leaf), x509.ReasonFlags.key_compromise, stranger,
                              key_ring, ACTOR)

    status = pebble.cert_status(issued.leaf.serial_number)
    assert (status["Status"], status["Reason"]) == ("Revoked", 1)  # keyCompromise
    assert (outcome.signed_with, outcome.reason) == ("certificate-key", "key-compromise")
    assert len(_revoked_events(sqlite_engine, _fingerprint(issued.leaf))) == 1
    stranger.revoke(issued.leaf, x509.ReasonFlags.key_compromise, key=key)  # the CA's alreadyRevoked: no error
    with pytest.raises(PermanentError, match="not that certificate's key"):
        stranger.revoke(issued.leaf, x509.ReasonFlags.key_compromise, key=generate_private_key("ec-p256"))


def test_already_revoked_at_the_ca_is_recorded_as_revoked(sqlite_engine: sa.Engine, issuer: AcmeIssuer,
                                                          pebble: Pebble, key_ring: Callable[[], KeyRing]) -> None:
    issued, _ = _issue_and_record(sqlite_engine, issuer, key_ring(), "revoked-elsewhere.certpilot.test")
    issuer.revoke(issued.leaf, x509.ReasonFlags.superseded)  # by someone else, say: the inventory does not know

    outcome = revoking.revoke(sqlite_engine, _fingerprint(issued.leaf), x509.ReasonFlags.superseded, issuer, key_ring,
                              ACTOR)

    assert not outcome.already
    with read_session(sqlite_engine) as session:
        row = session.get(Certificate, _fingerprint(issued.leaf))
        assert row is not None and row.status == "revoked"
    assert len(_revoked_events(sqlite_engine, _fingerprint(issued.leaf))) == 1


def test_a_ca_that_does_not_answer_is_named_and_nothing_is_recorded(sqlite_engine: sa.Engine, issuer: AcmeIssuer,
                                                                    key_ring: Callable[[], KeyRing],
                                                                    http01_responder: Http01Responder) -> None:
    issued, _ = _issue_and_record(sqlite_engine, issuer, key_ring(), "ca-gone.certpilot.test")
    port = free_port()  # nothing listens there
    gone = AcmeIssuer(sqlite_engine, "acme-issuer/gone", f"https://127.0.0.1:{port}/dir", key_ring=key_ring,
                      solver=http01_responder, timeout=3)
    with pytest.raises(AcmeServerError) as raised:
        revoking.revoke(sqlite_engine, _fingerprint(issued.leaf), x509.ReasonFlags.key_compromise, gone, key_ring,
                        ACTOR)
    assert "acme-issuer/gone" in str(raised.value) and f"127.0.0.1:{port}" in str(raised.value)
    with read_session(sqlite_engine) as session:
        row = session.get(Certificate, _fingerprint(issued.leaf))
        assert row is not None and (row.status, row.revoked_at, row.revocation_reason) == ("active", None, None)
    assert _revoked_events(sqlite_engine, _fingerprint(issued.leaf)) == []


# ------------------------------------------------------------------------------------ resumed orders

class Killed(BaseException):
    """Stands for the process dying at that point (like SystemExit, no handler of ours catches it)."""


class Journal:
    """An OrderJournal in memory; ``kill_after_record``: the process dies right after the order is recorded."""

    def __init__(self, urls: list[str] | None = None, kill_after_record: bool = False) -> None:
        self.urls = list(urls or [])
        self.kill_after_record = kill_after_record

    def order_url(self) -> str | None:
        return self.urls[-1] if self.urls else None

    def record_order(self, url: str) -> None:
        self.urls.append(url)
        if self.kill_after_record:
            self.kill_after_record = False
            raise Killed()


class DiesAfterValidation:
    """The responder, but the process dies when it cleans up the first answer: the CA has validated
    every authorisation by then (the order is ready) and finalize has not been sent."""

    def __init__(self, responder: Http01Responder) -> None:
        self.responder = responder
        self.challenge_types: tuple[str, ...] = responder.challenge_types
        self.died = False

    def present(self, challenge: Challenge) -> None:
        self.responder.present(challenge)

    def cleanup(self, challenge: Challenge) -> None:
        self.responder.cleanup(challenge)
        if not self.died:
            self.died = True
            raise Killed()


def test_an_order_killed_before_its_authorizations_is_resumed_not_placed_again(issuer: AcmeIssuer,
                                                                                pebble: Pebble) -> None:
    key = generate_private_key("ec-p256")
    csr = build_csr(key, ["resume-pending.certpilot.test", "www.resume-pending.certpilot.test"])
    journal = Journal(kill_after_record=True)
    with pytest.raises(Killed):
        issuer.issue(csr, "tls-server", journal=journal)
    [order_url] = journal.urls

    issued = issuer.issue(csr, "tls-server", journal=journal)

    assert journal.urls == [order_url]  # no second order: every new order is recorded
    assert pebble.cert_status(issued.leaf.serial_number)["Status"] == "Valid"
    # The order is now valid: resuming it again downloads the same certificate, still without a new order.
    again = issuer.issue(csr, "tls-server", journal=journal)
    assert again.leaf.serial_number == issued.leaf.serial_number and journal.urls == [order_url]


def test_an_order_killed_after_validation_is_finalized_on_resume(sqlite_engine: sa.Engine, pebble: Pebble,
                                                                 key_ring: Callable[[], KeyRing],
                                                                 http01_responder: Http01Responder) -> None:
    dying = _acme(sqlite_engine, pebble, key_ring, DiesAfterValidation(http01_responder), "acme-issuer/dying")
    csr = build_csr(generate_private_key("ec-p256"), ["resume-ready.certpilot.test"])
    journal = Journal()
    with pytest.raises(Killed):
        dying.issue(csr, "tls-server", journal=journal)

    issued = dying.issue(csr, "tls-server", journal=journal)

    assert len(journal.urls) == 1
    assert pebble.cert_status(issued.leaf.serial_number)["Status"] == "Valid"
    assert dying.issue(csr, "tls-server", journal=journal).leaf.serial_number == issued.leaf.serial_number


def test_a_journal_naming_an_unknown_order_places_a_new_one(issuer: AcmeIssuer, pebble: Pebble) -> None:
    unknown = f"https://127.0.0.1:{pebble.port}/my-order/no-such-order"
    journal = Journal([unknown])
    csr = build_csr(generate_private_key("ec-p256"), ["resume-unknown.certpilot.test"])

    issued = issuer.issue(csr, "tls-server", journal=journal)

    assert journal.urls[0] == unknown and len(journal.urls) == 2 and journal.urls[1] != unknown
    assert pebble.cert_status(issued.leaf.serial_number)["Status"] == "Valid"
    # An order for other names (the journal of another request) is not finalized with this CSR.
    other = build_csr(generate_private_key("ec-p256"), ["resume-other.certpilot.test"])
    issuer.issue(other, "tls-server", journal=journal)
    assert len(journal.urls) == 3
