"""The Azure Key Vault tests' fixtures: one lab vault (lab/keyvault.py) per session, emptied before each
test, driven by the real azure-keyvault-certificates SDK. Its list operations answer two items per
page, so every listing of more than two items goes through nextLink paging."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator

import pytest
from azure.keyvault.certificates import CertificateClient
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from certpilot.deployment import DeployBundle
from certpilot.sample_estate import Authority, issue_leaf
from connectors.azure_kv import AzureKeyVaultDeployer, KeyVaultConnection, StaticTokenCredential
from lab.keyvault import KeyVaultServer

PAGE_SIZE = 2


@pytest.fixture(scope="session")
def keyvault_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeyVaultServer]:
    with KeyVaultServer(tmp_path_factory.mktemp("keyvault"), page_size=PAGE_SIZE) as server:
        yield server


@pytest.fixture
def keyvault(keyvault_server: KeyVaultServer) -> Iterator[KeyVaultServer]:
    """The session's vault, empty, answering promptly, with no recorded requests."""
    keyvault_server.reset()
    yield keyvault_server
    keyvault_server.reset()


def lab_connection(server: KeyVaultServer, **options: object) -> KeyVaultConnection:
    settings: dict[str, object] = {"connection_timeout": 5.0, "read_timeout": 5.0, "retry_total": 1,
                                   "retry_backoff_max": 0.2}
    settings.update(options)
    return KeyVaultConnection(server.url, StaticTokenCredential(server.token), ca_file=str(server.ca_file),
                              verify_challenge_resource=False, **settings)  # type: ignore[arg-type]


@pytest.fixture
def connection(keyvault: KeyVaultServer) -> KeyVaultConnection:
    return lab_connection(keyvault)


@pytest.fixture
def sdk(connection: KeyVaultConnection) -> Iterator[CertificateClient]:
    """A plain SDK client on the lab vault, for reading back what the connector did."""
    client = connection.client()
    yield client
    client.close()


@pytest.fixture
def deployer(connection: KeyVaultConnection) -> Callable[..., AzureKeyVaultDeployer]:
    def make(certificate_name: str = "web", **settings: object) -> AzureKeyVaultDeployer:
        return AzureKeyVaultDeployer(f"kv-{certificate_name}", connection,
                                     {"certificate_name": certificate_name, **settings})
    return make


Issued = tuple[DeployBundle, PrivateKeyTypes]


@pytest.fixture
def issue(ca: tuple[Authority, Authority]) -> Callable[..., Issued]:
    """A fresh leaf from the session's issuing CA, as a DeployBundle (chain: the intermediate) and its key."""
    def make(name: str = "web.example.test", key: PrivateKeyTypes | None = None) -> Issued:
        cert, leaf_key = issue_leaf(ca[1], [name], dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=60), key=key)
        return DeployBundle.from_key("web", cert, [ca[1].certificate], leaf_key), leaf_key
    return make
