"""ACME Renewal Information (RFC 9773) against the tests' own renewalInfo front before real pebble."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import pytest
import sqlalchemy as sa

from certpilot.issuance import IssuedCertificate, build_csr
from certpilot.keys import generate_private_key
from certpilot.keystore import KeyRing
from connectors.acme_issuer import AcmeIssuer, ari_cert_id
from connectors.challenges import Http01Responder
from tests.integration.acme_servers import AcmeFront, Pebble, verified_chain

NOW = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


@pytest.fixture
def front_issuer(sqlite_engine: sa.Engine, acme_front: AcmeFront, pebble: Pebble, key_ring: Callable[[], KeyRing],
                 http01_responder: Http01Responder) -> AcmeIssuer:
    return AcmeIssuer(sqlite_engine, "pebble-ari", acme_front.directory_url, key_ring=key_ring,
                      solver=http01_responder, ca_bundle=pebble.ca_bundle)


def _issue(issuer: AcmeIssuer, name: str, replaces: IssuedCertificate | None = None) -> IssuedCertificate:
    return issuer.issue(build_csr(generate_private_key("ec-p256"), [name]), "tls-server",
                        replaces=replaces.leaf if replaces else None)


def test_renewal_info_window_and_retry_after(front_issuer: AcmeIssuer, acme_front: AcmeFront) -> None:
    issued = _issue(front_issuer, "ari.certpilot.test")
    cert_id = ari_cert_id(issued.leaf)
    start, end = NOW + dt.timedelta(days=20), NOW + dt.timedelta(days=22)
    acme_front.windows[cert_id] = (start, end, 3600)

    window = front_issuer.renewal_info(issued.leaf)

    assert window is not None
    assert (window.start, window.end) == (start, end)
    assert window.retry_after == dt.timedelta(hours=1)
    assert window.explanation_url == "https://certpilot.test/why"
    assert acme_front.renewal_info_requests == [cert_id]
    # Within the Retry-After the CA asked for, the window is not fetched again.
    acme_front.windows[cert_id] = (NOW, NOW + dt.timedelta(days=1), 3600)
    assert front_issuer.renewal_info(issued.leaf) == window
    assert acme_front.renewal_info_requests == [cert_id]


def test_window_is_fetched_again_when_no_retry_after(front_issuer: AcmeIssuer, acme_front: AcmeFront) -> None:
    issued = _issue(front_issuer, "ari-again.certpilot.test")
    cert_id = ari_cert_id(issued.leaf)
    acme_front.windows[cert_id] = (NOW, NOW + dt.timedelta(days=1), None)
    assert front_issuer.renewal_info(issued.leaf) is not None
    urgent = (NOW - dt.timedelta(days=1), NOW - dt.timedelta(hours=1), None)  # the CA wants it replaced now
    acme_front.windows[cert_id] = urgent
    window = front_issuer.renewal_info(issued.leaf)
    assert window is not None and (window.start, window.end) == urgent[:2]
    assert acme_front.renewal_info_requests == [cert_id, cert_id]


def test_unknown_certificate_has_no_window(front_issuer: AcmeIssuer, acme_front: AcmeFront) -> None:
    issued = _issue(front_issuer, "ari-unknown.certpilot.test")
    assert front_issuer.renewal_info(issued.leaf) is None  # the front answers 404 for it
    assert acme_front.renewal_info_requests == [ari_cert_id(issued.leaf)]


def test_an_expired_certificate_has_no_window_by_the_issuers_clock(
        front_issuer: AcmeIssuer, acme_front: AcmeFront, sqlite_engine: sa.Engine, pebble: Pebble,
        key_ring: Callable[[], KeyRing], http01_responder: Http01Responder) -> None:
    """The clock is passed in: an issuer whose time is past the certificate's expiry does not ask the CA."""
    issued = _issue(front_issuer, "ari-expired.certpilot.test")
    acme_front.windows[ari_cert_id(issued.leaf)] = (NOW, NOW + dt.timedelta(days=1), None)
    later = issued.leaf.not_valid_after_utc + dt.timedelta(seconds=1)
    in_the_future = AcmeIssuer(sqlite_engine, "pebble-ari", acme_front.directory_url, key_ring=key_ring,
                               solver=http01_responder, ca_bundle=pebble.ca_bundle, now=lambda: later)
    assert in_the_future.renewal_info(issued.leaf) is None
    assert acme_front.renewal_info_requests == []
    assert front_issuer.renewal_info(issued.leaf) is not None  # by today's clock it has one


def test_renewal_order_sends_replaces_and_pebble_accepts_it(front_issuer: AcmeIssuer, acme_front: AcmeFront,
                                                            pebble: Pebble) -> None:
    old = _issue(front_issuer, "ari-renew.certpilot.test")
    acme_front.posts.clear()

    new = _issue(front_issuer, "ari-renew.certpilot.test", replaces=old)

    new_orders = [payload for path, payload, _ in acme_front.posts if path == "/order-plz"]
    assert len(new_orders) == 1
    assert new_orders[0] is not None and new_orders[0]["replaces"] == ari_cert_id(old.leaf)
    # pebble 2.4 has no ARI and ignores the unknown field: the order went through.
    verified_chain(new.chain, pebble.roots()[0], "ari-renew.certpilot.test")
    assert new.leaf.serial_number != old.leaf.serial_number


@pytest.mark.parametrize("status", [409, 403])
def test_already_replaced_orders_without_replaces(front_issuer: AcmeIssuer, acme_front: AcmeFront, status: int) -> None:
    old = _issue(front_issuer, "ari-twice.certpilot.test")
    acme_front.posts.clear()
    acme_front.inject("/order-plz", status, {"type": "urn:ietf:params:acme:error:alreadyReplaced",
                                           "detail": "already replaced by another order"})

    _issue(front_issuer, "ari-twice.certpilot.test", replaces=old)

    new_orders = [payload for path, payload, _ in acme_front.posts if path == "/order-plz"]
    assert [bool(p and "replaces" in p) for p in new_orders] == [True, False]


def test_directory_without_renewal_info(sqlite_engine: sa.Engine, pebble: Pebble, key_ring: Callable[[], KeyRing],
                                        http01_responder: Http01Responder) -> None:
    issuer = AcmeIssuer(sqlite_engine, "pebble", pebble.directory_url, key_ring=key_ring, solver=http01_responder,
                        ca_bundle=pebble.ca_bundle)
    old = _issue(issuer, "no-ari.certpilot.test")
    assert issuer.renewal_info(old.leaf) is None
    _issue(issuer, "no-ari.certpilot.test", replaces=old)  # no renewalInfo: replaces is not sent
