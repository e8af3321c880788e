"""ACME accounts: registered once per (directory, issuer name), reused, key sealed at rest; EAB."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path

import josepy as jose
import pytest
import sqlalchemy as sa
from sqlmodel import select

from certpilot import audit
from certpilot.database import read_session, write_session
from certpilot.errors import AcmeProblemError, PermanentError
from certpilot.issuance import build_csr
from certpilot.keys import generate_private_key
from certpilot.keystore import KeyRing, load_private_key
from certpilot.models import AcmeAccount, AuditEvent
from connectors.acme_issuer import AcmeIssuer
from connectors.challenges import Http01Responder
from tests.integration.acme_servers import EAB_EXAMPLE_CONFIG, Pebble, verified_chain
from tests.keyprobe import leaks


def _issuer(engine: sa.Engine, pebble: Pebble, key_ring: Callable[[], KeyRing], solver: Http01Responder,
            name: str = "pebble", **options: object) -> AcmeIssuer:
    return AcmeIssuer(engine, name, pebble.directory_url, key_ring=key_ring, solver=solver, ca_bundle=pebble.ca_bundle,
                      **options)  # type: ignore[arg-type]


def _rows(engine: sa.Engine) -> list[AcmeAccount]:
    with read_session(engine) as session:
        return list(session.exec(select(AcmeAccount)).all())


def test_account_is_registered_once_and_reused(engine: sa.Engine, pebble: Pebble, key_ring: Callable[[], KeyRing],
                                               http01_responder: Http01Responder) -> None:
    first = _issuer(engine, pebble, key_ring, http01_responder, contact=("mailto:pki@certpilot.test",))
    first.issue(build_csr(generate_private_key("ec-p256"), ["reuse-1.certpilot.test"]), "tls-server")
    account_url = first.account().account_url

    second = _issuer(engine, pebble, key_ring, http01_responder, contact=("mailto:pki@certpilot.test",))
    issued = second.issue(build_csr(generate_private_key("ec-p256"), ["reuse-2.certpilot.test"]), "tls-server")

    assert second.account().account_url == account_url
    rows = _rows(engine)
    assert len(rows) == 1
    assert rows[0].account_url == account_url and rows[0].directory_url == pebble.directory_url
    assert rows[0].contact == ["mailto:pki@certpilot.test"]
    verified_chain(issued.chain, pebble.roots()[0], "reuse-2.certpilot.test")
    with read_session(engine) as session:
        actions = [e.action for e in session.exec(select(AuditEvent).order_by(AuditEvent.seq)).all()]
    assert actions == ["key.stored", "acme_account.registered"]
    # Another issuer name on the same CA is another account.
    other = _issuer(engine, pebble, key_ring, http01_responder, name="pebble-team-b")
    assert other.account().account_url != account_url
    assert len(_rows(engine)) == 2


def test_account_key_is_sealed_at_rest(sqlite_engine: sa.Engine, certpilot_home: Path, pebble: Pebble,
                                       key_ring: Callable[[], KeyRing], http01_responder: Http01Responder) -> None:
    issuer = _issuer(sqlite_engine, pebble, key_ring, http01_responder)
    issuer.issue(build_csr(generate_private_key("ec-p256"), ["sealed.certpilot.test"]), "tls-server")
    record = issuer.account()
    with read_session(sqlite_engine) as session:
        account_key = load_private_key(session, record.key, key_ring())
    sqlite_engine.dispose()

    files = b"".join(p.read_bytes() for p in certpilot_home.glob("inventory.db*"))
    assert leaks(files, [account_key]) == []
    jwk_d = json.loads(jose.JWKEC(key=account_key).json_dumps())["d"].encode()  # the JWK form of the secret
    assert jwk_d not in files
    assert base64.b64encode(base64.urlsafe_b64decode(jwk_d + b"=" * (-len(jwk_d) % 4))) not in files


def test_forgotten_account_registers_the_same_key_again(sqlite_engine: sa.Engine, pebble: Pebble,
                                                        key_ring: Callable[[], KeyRing],
                                                        http01_responder: Http01Responder) -> None:
    first = _issuer(sqlite_engine, pebble, key_ring, http01_responder)
    real_url = first.account().account_url
    with write_session(sqlite_engine) as session:  # as if the CA had been reset and the URL were gone
        row = session.exec(select(AcmeAccount)).one()
        row.account_url = real_url.rsplit("/", 1)[0] + "/0000000000000000"
        session.add(row)

    second = _issuer(sqlite_engine, pebble, key_ring, http01_responder)
    second.issue(build_csr(generate_private_key("ec-p256"), ["forgotten.certpilot.test"]), "tls-server")

    assert second.account().account_url == real_url  # pebble knows the key: same account
    assert _rows(sqlite_engine)[0].account_url == real_url
    with read_session(sqlite_engine) as session:
        assert session.exec(select(AuditEvent).where(AuditEvent.action == "acme_account.reregistered")).first()


def _example_eab_key(kid: str) -> bytes:
    encoded = json.loads(EAB_EXAMPLE_CONFIG.read_text())["pebble"]["externalAccountMACKeys"][kid]
    return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))


def test_external_account_binding(sqlite_engine: sa.Engine, pebble_eab: Pebble, key_ring: Callable[[], KeyRing],
                                  http01_responder: Http01Responder) -> None:
    issuer = _issuer(sqlite_engine, pebble_eab, key_ring, http01_responder, eab=("kid-1", _example_eab_key("kid-1")),
                     actor=audit.Actor("test:eab"))

    issued = issuer.issue(build_csr(generate_private_key("ec-p256"), ["eab.certpilot.test"]), "tls-server")

    verified_chain(issued.chain, pebble_eab.roots()[0], "eab.certpilot.test")
    (row,) = _rows(sqlite_engine)
    assert row.eab_key_id == "kid-1"
    with read_session(sqlite_engine) as session:
        event = session.exec(select(AuditEvent).where(AuditEvent.action == "acme_account.registered")).one()
    assert event.actor == "test:eab" and "kid-1" in event.details
    hmac_text = json.loads(EAB_EXAMPLE_CONFIG.read_text())["pebble"]["externalAccountMACKeys"]["kid-1"]
    assert hmac_text not in event.details


def test_eab_key_as_base64url_text(sqlite_engine: sa.Engine, pebble_eab: Pebble, key_ring: Callable[[], KeyRing],
                                   http01_responder: Http01Responder) -> None:
    text = json.loads(EAB_EXAMPLE_CONFIG.read_text())["pebble"]["externalAccountMACKeys"]["kid-2"]
    issuer = _issuer(sqlite_engine, pebble_eab, key_ring, http01_responder, eab=("kid-2", text))  # as blocks pass it
    assert issuer.account().eab_key_id == "kid-2"


def test_eab_required_but_not_configured(sqlite_engine: sa.Engine, pebble_eab: Pebble,
                                         key_ring: Callable[[], KeyRing], http01_responder: Http01Responder) -> None:
    issuer = _issuer(sqlite_engine, pebble_eab, key_ring, http01_responder)
    with pytest.raises(PermanentError, match="external account binding"):
        issuer.account()
    assert _rows(sqlite_engine) == []


def test_eab_with_the_wrong_hmac_key_is_refused(sqlite_engine: sa.Engine, pebble_eab: Pebble,
                                                key_ring: Callable[[], KeyRing],
                                                http01_responder: Http01Responder) -> None:
    issuer = _issuer(sqlite_engine, pebble_eab, key_ring, http01_responder, eab=("kid-1", _example_eab_key("kid-2")))
    with pytest.raises(AcmeProblemError) as refused:
        issuer.account()
    assert refused.value.typ.startswith("urn:ietf:params:acme:error:")
    assert _example_eab_key("kid-2").hex() not in str(refused.value)
    assert _rows(sqlite_engine) == []
