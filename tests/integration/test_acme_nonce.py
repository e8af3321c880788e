"""badNonce: pebble rejecting 30% of good nonces. The acme package retries once (1 order in 30 failed
at pebble's default 5%); certpilot retries more, bounded, and never duplicates a certificate."""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
import sqlalchemy as sa
from sqlmodel import select

from certpilot.database import read_session
from certpilot.errors import AcmeServerError
from certpilot.issuance import build_csr
from certpilot.keys import generate_private_key
from certpilot.keystore import KeyRing
from certpilot.models import AcmeAccount
from certpilot.x509info import fingerprint_sha256
from connectors.acme_issuer import AcmeIssuer
from connectors.challenges import Http01Responder
from tests.integration.acme_servers import Pebble, san_dns_names, verified_chain

ORDERS = 20


def test_twenty_orders_all_succeed_without_duplicates(sqlite_engine: sa.Engine, pebble_nonce: Pebble,
                                                      key_ring: Callable[[], KeyRing],
                                                      http01_responder: Http01Responder,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    issuer = AcmeIssuer(sqlite_engine, "pebble-nonce", pebble_nonce.directory_url, key_ring=key_ring,
                        solver=http01_responder, ca_bundle=pebble_nonce.ca_bundle)
    names = [[f"n{i}.nonce.certpilot.test", f"www.n{i}.nonce.certpilot.test"] for i in range(ORDERS)]
    caplog.set_level(logging.DEBUG, logger="connectors.acme_issuer")

    with ThreadPoolExecutor(4) as pool:  # one issuer, several threads: each has its own session and nonces
        issued = list(pool.map(lambda n: issuer.issue(build_csr(generate_private_key("ec-p256"), n), "tls-server"),
                               names))

    fingerprints = {fingerprint_sha256(cert.leaf) for cert in issued}
    assert len(fingerprints) == ORDERS  # one certificate per order, none twice
    root = pebble_nonce.roots()[0]
    for wanted, cert in zip(names, issued, strict=True):
        assert sorted(san_dns_names(cert.leaf)) == sorted(wanted)
        verified_chain(cert.chain, root, wanted[0])
        assert pebble_nonce.cert_status(cert.leaf.serial_number)["Status"] == "Valid"
    retried = [r for r in caplog.records if "badNonce" in r.getMessage()]
    assert len(retried) >= 10  # ~30% of a few hundred requests: the retries really happened
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
