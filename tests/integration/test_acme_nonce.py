"""badNonce: pebble rejecting 30% of good nonces. The acme package retries once (1 order in 30 failed
at pebble's default 5%); certpilot retries more, bounded, and never duplicates a certificate."""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
import sqlalchemy as sa
from sqlmodel import select

from certpilot import renewing
from certpilot.database import read_session
from certpilot.errors import AcmeServerError
from certpilot.issuance import build_csr
from certpilot.keys import generate_private_key
from certpilot.keystore import KeyRing
from certpilot.models import AcmeAccount
from certpilot.policy import DEFAULT_POLICY
from connectors.acme_issuer import AcmeIssuer
from connectors.challenges import Http01Responder
from tests.integration.acme_faults import ACTOR, BLOCK, expiring_estate, issuance_counts
from tests.integration.acme_servers import Pebble

ORDERS = 100


def test_a_hundred_renewals_all_issued_once(sqlite_engine: sa.Engine, pebble_nonce: Pebble,
                                            key_ring: Callable[[], KeyRing], http01_responder: Http01Responder,
                                            caplog: pytest.LogCaptureFixture) -> None:
    issuer = AcmeIssuer(sqlite_engine, "pebble-nonce", pebble_nonce.directory_url, key_ring=key_ring,
                        solver=http01_responder, ca_bundle=pebble_nonce.ca_bundle)
    names = [f"n{i}" for i in range(ORDERS)]
    expiring_estate(sqlite_engine, key_ring, names, "nonce.certpilot.test")
    serials_before, orders_before = set(pebble_nonce.issued()), pebble_nonce.orders()
    caplog.set_level(logging.DEBUG, logger="connectors.acme_issuer")

    def renew(name: str) -> renewing.Renewal:  # the renewal steps, each certificate stored in the inventory
        return renewing.renew_one(sqlite_engine, name, issuer, key_ring, ACTOR, policy=DEFAULT_POLICY)

    with ThreadPoolExecutor(4) as pool:  # one issuer, several threads: each has its own session and nonces
        renewals = list(pool.map(renew, names))

    counts = issuance_counts(sqlite_engine, pebble_nonce, serials_before)
    assert len(counts.ca_serials) == ORDERS  # the CA issued one certificate per renewal...
    assert counts.not_recorded == frozenset() and counts.per_managed == dict.fromkeys(names, 1)  # ...each recorded
    new_orders = pebble_nonce.orders() - orders_before
    assert len(new_orders) == ORDERS  # a rejected nonce creates no order: one order per renewal
    assert {pebble_nonce.issued()[serial] for serial in counts.ca_serials} == new_orders
    for name, renewal in zip(names, renewals, strict=True):
        assert renewal.name == name and renewal.replaces is not None  # each replaced the expiring one
        assert int(renewal.serial_hex, 16) in counts.ca_serials
        assert pebble_nonce.cert_status(int(renewal.serial_hex, 16))["Status"] == "Valid"
    retried = [r for r in caplog.records if "badNonce" in r.getMessage()]
    assert len(retried) >= 50  # ~30% of about a thousand requests: the retries really happened
    with read_session(sqlite_engine) as session:
        assert len(session.exec(select(AcmeAccount)).all()) == 1  # four threads, one account


def test_bad_nonce_retries_are_bounded(sqlite_engine: sa.Engine, pebble_nonce: Pebble,
                                       key_ring: Callable[[], KeyRing], http01_responder: Http01Responder) -> None:
    issuer = AcmeIssuer(sqlite_engine, "pebble-nonce", pebble_nonce.directory_url, key_ring=key_ring,
                        solver=http01_responder, ca_bundle=pebble_nonce.ca_bundle, bad_nonce_retries=0)
    failures = 0
    for i in range(12):  # with no retries, 30% of POSTs fail: 12 orders of ~7 POSTs cannot all pass
        try:
            issuer.issue(build_csr(generate_private_key("ec-p256"), [f"b{i}.nonce.certpilot.test"]), "tls-server")
        except AcmeServerError as error:
            assert error.code == "badNonce"
            failures += 1
    assert failures > 0
