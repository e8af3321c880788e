"""certpilot.revoking without a network: which certificate an operator's words name, and a private CA
revocation recorded once (the CA's own event, no second one), repeated without a change."""

from __future__ import annotations

import datetime as dt

import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from sqlmodel import select

from certpilot import audit, ca, inventory, keystore, managed, renewing, revoking
from certpilot.clock import utcnow
from certpilot.database import read_session, write_session
from certpilot.errors import NotFoundError, PermanentError
from certpilot.models import AuditEvent, Certificate
from certpilot.sample_estate import Authority, make_ca
from certpilot.settings import load_settings
from certpilot.x509info import describe_certificate
from connectors.private_ca import PrivateCAIssuer

ACTOR = audit.Actor("test")


def _ring() -> keystore.KeyRing:
    return keystore.load_key_ring(load_settings())


def _leaf(authority: Authority, name: str, serial: int) -> x509.Certificate:
    now = utcnow()
    return (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, name)]))
            .issuer_name(authority.certificate.subject).public_key(ec.generate_private_key(ec.SECP256R1()).public_key())
            .serial_number(serial).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .sign(authority.key, hashes.SHA256()))


def _record(engine: sa.Engine, *certs: x509.Certificate) -> list[str]:
    with write_session(engine) as session:
        inventory.upsert(session, [inventory.Observation(describe_certificate(c), None, "test") for c in certs], ACTOR)
    return [describe_certificate(c).fingerprint_sha256 for c in certs]


def _find(engine: sa.Engine, text: str) -> str:
    with read_session(engine) as session:
        return revoking.find_certificate(session, text).fingerprint_sha256


def test_a_managed_name_a_fingerprint_prefix_or_a_serial(engine: sa.Engine) -> None:
    with write_session(engine) as session:
        ca.init_ca(session, _ring(), ACTOR, "unit", "http://127.0.0.1:9")
        managed.add(session, managed.ManagedSpec(name="web", dns_names=("web.unit.test",), issuer="private-ca/unit",
                                                 owner="platform"), ACTOR)
    issuer = PrivateCAIssuer(engine, "unit", _ring, actor=ACTOR)
    current = renewing.renew_one(engine, "web", issuer, _ring, ACTOR).fingerprint_sha256

    assert _find(engine, "web") == current == _find(engine, current[:8].upper()) == _find(engine, current)
    with pytest.raises(NotFoundError, match="at least 8 hex digits"):
        _find(engine, current[:7])
    with pytest.raises(NotFoundError, match="no managed certificate named 'wbe'"):
        _find(engine, "wbe")
    with read_session(engine) as session:
        serial = session.exec(select(Certificate.serial_hex)
                              .where(Certificate.fingerprint_sha256 == current)).one()
    colons = ":".join(("00" + serial)[i:i + 2] for i in range(0, len(serial) + 2, 2)).upper()  # a leading zero too
    assert _find(engine, f"serial:{colons}") == current

    outcome = revoking.revoke(engine, current, x509.ReasonFlags.key_compromise, issuer, _ring, ACTOR)

    assert (outcome.issuer, outcome.signed_with, outcome.managed, outcome.already) == ("unit", "ca", "web", False)
    with read_session(engine) as session:
        events = session.exec(select(AuditEvent).where(AuditEvent.action == "certificate.revoked")).all()
    assert [e.object for e in events] == [f"certificate:{current}"]  # the CA's event, and no second one
    # The name still finds it once revoked (it has no active certificate now), and revoking again changes nothing.
    assert _find(engine, "web") == current
    again = revoking.revoke(engine, current, x509.ReasonFlags.superseded, issuer, _ring, ACTOR)
    assert (again.already, again.reason, again.revoked_at, again.issuer) == (
        True, "key-compromise", outcome.revoked_at, "unit")
    assert revoking.RevocationReport(again).lines() == [
        f"{current} (serial {outcome.serial_hex}, managed certificate web) was already revoked on "
        f"{inventory.iso(outcome.revoked_at)} (reason key-compromise) by unit: nothing changed"]


def test_the_same_serial_from_two_cas_is_refused(engine: sa.Engine) -> None:
    one, two = make_ca("Unit CA One"), make_ca("Unit CA Two")
    _record(engine, one.certificate, two.certificate, _leaf(one, "a.unit.test", 0x0BADCAFE),
            _leaf(two, "b.unit.test", 0x0BADCAFE))
    with pytest.raises(PermanentError, match="belongs to 2 certificates of different CAs"):
        _find(engine, "serial:0badcafe")
    with pytest.raises(NotFoundError, match="no certificate with serial number 0badcaff"):
        _find(engine, "serial:0badcaff")
