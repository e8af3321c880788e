"""The issuance gate before an ACME CA: a renewal the policy refuses reaches pebble not at all (the front
before it records every request the client POSTs: no account, no newOrder), fails at the policy step
naming the rule, and makes no key; the same renewal, once waived, orders and is issued through it."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa

from certpilot import audit, managed, renewing, violations
from certpilot.database import read_session, write_session
from certpilot.issuance import Issuer
from certpilot.keystore import KeyRing
from certpilot.models import PrivateKey
from connectors.acme_issuer import AcmeIssuer
from connectors.challenges import Http01Responder
from tests.integration.acme_servers import AcmeFront, Pebble

ISSUER = "acme-issuer/pebble-gate"
ACTOR = audit.Actor("test")


def _keys(engine: sa.Engine) -> int:
    with read_session(engine) as session:
        return session.execute(sa.select(sa.func.count()).select_from(PrivateKey)).scalar_one()


def test_a_renewal_the_policy_refuses_places_no_order_with_the_acme_ca(
        sqlite_engine: sa.Engine, acme_front: AcmeFront, pebble: Pebble, key_ring: Callable[[], KeyRing],
        http01_responder: Http01Responder, certpilot_home: Path) -> None:
    certpilot_home.mkdir(parents=True, exist_ok=True)
    (certpilot_home / "policy.yaml").write_text("rules:\n  san-denied: {patterns: ['*.staging.certpilot.test']}\n")
    with write_session(sqlite_engine) as session:
        for name, dns in (("shop", "shop.certpilot.test"), ("stage", "web.staging.certpilot.test")):
            managed.add(session, managed.ManagedSpec(name=name, dns_names=(dns,), issuer=ISSUER, owner="shop-team"),
                        ACTOR)
    built: list[str] = []

    def issuers(block: str) -> Issuer:
        built.append(block)
        return AcmeIssuer(sqlite_engine, "pebble-gate", acme_front.directory_url, key_ring=key_ring,
                          solver=http01_responder, ca_bundle=pebble.ca_bundle)

    steps = renewing.DirectSteps(sqlite_engine, issuers, key_ring, ACTOR)
    keys = _keys(sqlite_engine)
    acme_front.posts.clear()

    with pytest.raises(renewing.PermanentRenewalError) as caught:
        renewing.renew(steps, "stage")

    assert caught.value.step is renewing.Step.POLICY
    assert caught.value.reason.startswith("policy refuses managed certificate 'stage': san-denied: denied name "
                                          "web.staging.certpilot.test")
    assert acme_front.posts == []  # the CA was sent nothing: no account, no order
    assert built == [] and _keys(sqlite_engine) == keys  # no issuer built, no key made

    # A request the policy accepts goes to the CA: one newOrder, through the same front.
    renewed = renewing.renew(steps, "shop")
    orders = [path for path, _, _ in acme_front.posts if path == "/order-plz"]
    assert len(orders) == 1 and renewed.issuer == ISSUER

    # Waived, the refused one is ordered too.
    with write_session(sqlite_engine) as session:
        violations.grant_waiver(session, "san-denied", "certificate=stage", "staging goes public for the demo",
                                "ciso", dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=1), ACTOR)
    acme_front.posts.clear()
    renewing.renew(steps, "stage")
    assert [path for path, _, _ in acme_front.posts if path == "/order-plz"] == ["/order-plz"]
