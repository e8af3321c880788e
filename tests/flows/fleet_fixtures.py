"""Fixtures for flows over a lab fleet (lab.fleet): an inventory of the test's own, with the block types
the revocation flows load registered, and a factory of fleets (one sshd fronting nginx and haproxy
instances, managed certificates of a private CA whose CRL and OCSP the fleet serves over HTTP) with
their SSH host block and issuer block saved for the flows. Import the fixtures into a test module:

    from tests.flows.fleet_fixtures import inventory, make_fleet  # noqa: F401 (fixtures)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from blocks.issuers import AcmeIssuerBlock, PrivateCABlock
from blocks.ssh import SshHostBlock
from certpilot import keystore
from certpilot.database import get_engine
from certpilot.settings import load_settings
from lab.fleet import Fleet

CA_NAME = "fleet-ca"
BLOCK = "fleet-hosts"


def ring() -> keystore.KeyRing:
    return keystore.load_key_ring(load_settings())


@pytest.fixture
def inventory(prefect_server: None, certpilot_home: Path) -> Iterator[sa.Engine]:
    """This test's inventory (its own CERTPILOT_HOME), with the block types the flows load registered."""
    SshHostBlock.register_type_and_schema()
    PrivateCABlock.register_type_and_schema()
    AcmeIssuerBlock.register_type_and_schema()
    yield get_engine()


@pytest.fixture
def make_fleet(inventory: sa.Engine, tmp_path: Path) -> Iterator[Callable[..., Fleet]]:
    """``make_fleet(certificates=3, nginx=2, haproxy=1, ...)`` (lab.fleet.Fleet's options): a started fleet
    of the private CA ``ca_name`` (default CA_NAME), its SSH host block (``block``, default BLOCK) and the
    CA's issuer block ``private-ca/<ca_name>`` saved; every fleet made is stopped after the test."""
    built: list[Fleet] = []

    def make(**options: Any) -> Fleet:
        options = {"ca_name": CA_NAME, "block": BLOCK, **options}
        fleet = Fleet(tmp_path / f"fleet{len(built)}", inventory, ring, **options)
        built.append(fleet)
        fleet.start()
        fleet.save_block()
        if fleet.issuer is None:  # the fleet's own private CA
            PrivateCABlock(ca_name=fleet.ca_name).save(fleet.ca_name, overwrite=True)
        return fleet

    try:
        yield make
    finally:
        for fleet in built:
            fleet.stop()
