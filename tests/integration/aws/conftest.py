"""One real moto server for the AWS tests of a session, reset before every test, and a small PKI.

Tests talk to it through certpilot's own AwsAccount (bounded clients, translated errors) and set up
their estate with lab.moto's plain boto3 helpers."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from certpilot.deployment import DeployBundle
from certpilot.sample_estate import Authority, issue_leaf, make_ca
from connectors.aws import AwsAccount
from lab.moto import ACCESS_KEY_ID, SECRET_ACCESS_KEY, MotoServer

REGIONS = ("eu-west-1", "us-east-2")


@pytest.fixture(scope="session")
def moto_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    with MotoServer.start(tmp_path_factory.mktemp("moto-aws")) as server:
        yield server


@pytest.fixture
def moto(moto_lab: MotoServer) -> MotoServer:
    """The session's moto server, emptied."""
    moto_lab.reset()
    return moto_lab


@pytest.fixture
def account(moto: MotoServer) -> AwsAccount:
    """certpilot's view of the moto account in two regions, with small timeouts and one retry."""
    return AwsAccount(regions=REGIONS, access_key_id=ACCESS_KEY_ID, secret_access_key=SECRET_ACCESS_KEY,
                      endpoint_url=moto.url, connect_timeout=2, read_timeout=10, max_attempts=2)


@pytest.fixture(scope="session")
def pki() -> tuple[Authority, Authority]:
    root = make_ca("AWS Test Root CA")
    return root, make_ca("AWS Test Issuing CA", parent=root)


class Leaves:
    """Fresh leaves from the test PKI, each remembered with its key so a lookup can find it again."""

    def __init__(self, pki: tuple[Authority, Authority]) -> None:
        self.pki = pki
        self.bundles: dict[str, DeployBundle] = {}
        self.keys: list[PrivateKeyTypes] = []

    def bundle(self, name: str, dns: str, days: int = 60) -> DeployBundle:
        cert, key = issue_leaf(self.pki[1], [dns], dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=days))
        bundle = DeployBundle.from_key(name, cert, [self.pki[1].certificate], key)
        self.bundles[bundle.fingerprint] = bundle
        self.keys.append(key)
        return bundle

    def lookup(self, fp: str) -> DeployBundle | None:
        return self.bundles.get(fp)

    def import_kwargs(self, bundle: DeployBundle) -> dict[str, bytes]:
        return {"Certificate": bundle.certificate_pem(), "PrivateKey": bundle.key_pem(),
                "CertificateChain": bundle.chain_pem()}


@pytest.fixture
def leaves(pki: tuple[Authority, Authority]) -> Leaves:
    return Leaves(pki)


def der(cert: x509.Certificate) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.DER)
