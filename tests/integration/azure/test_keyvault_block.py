"""The Azure Key Vault block: Prefect's block standard suite, secrets masked, configuration checked, and
its factories building a source and a deployer that work against the lab vault (no Prefect server:
nothing is saved)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from azure.identity import ClientSecretCredential
from prefect.blocks.core import Block
from prefect.testing.standard_test_suites import BlockStandardTestSuite
from pydantic import ValidationError

from blocks.azure import AzureKeyVaultBlock
from blocks.targets import build_deployer
from certpilot.deployment import DeployBundle, Deployer, PermanentDeployError
from certpilot.discovery import Found, Source
from lab.keyvault import KeyVaultServer


class TestAzureKeyVaultBlockStandard(BlockStandardTestSuite):
    @pytest.fixture
    def block(self) -> type[Block]:
        return AzureKeyVaultBlock

    @pytest.mark.skip(reason="certpilot's blocks carry no logo; the suite's check would fetch one over the network")
    def test_has_a_valid_image(self, block: type[Block]) -> None:
        super().test_has_a_valid_image(block)


def _lab_block(keyvault: KeyVaultServer) -> AzureKeyVaultBlock:
    return AzureKeyVaultBlock(vault_url=keyvault.url, static_token=keyvault.token,
                              ca_pem=keyvault.ca_file.read_text(), verify_challenge_resource=False,
                              connection_timeout=5, read_timeout=5, retry_total=1)


def test_lab_block_builds_a_source_and_a_deployer_that_work(
        keyvault: KeyVaultServer, issue: Callable[..., tuple[DeployBundle, object]]) -> None:
    block = _lab_block(keyvault)
    deployer = build_deployer(block, "kv-web", "azure-kv", {"certificate_name": "web"})
    assert isinstance(deployer, Deployer) and deployer.kind == "azure-kv"
    bundle, _ = issue()
    deployer.deploy(bundle)
    source = block.source()
    assert isinstance(source, Source) and source.name == f"azure-kv:{keyvault.host}"
    found = list(source.discover())
    assert len(found) == 1 and isinstance(found[0], Found)
    assert found[0].locator.startswith(f"azure-kv://{keyvault.host}/web/")
    with pytest.raises(PermanentDeployError, match="an Azure Key Vault deploys kind azure-kv, not 'ssh-nginx'"):
        build_deployer(block, "kv-web", "ssh-nginx", {"certificate_name": "web"})


def test_block_masks_secrets_and_checks_its_configuration(keyvault: KeyVaultServer) -> None:
    block = AzureKeyVaultBlock(vault_url="https://certpilot-test.vault.azure.net", tenant_id="tenant-1",
                               client_id="client-1", client_secret="sp-secret-value-123",
                               authority_host="login.microsoftonline.us")
    shown = repr(block) + str(block.model_dump()) + block.model_dump_json()
    assert "sp-secret-value-123" not in shown and "**********" in shown
    connection = block.connection()
    assert isinstance(connection.credential, ClientSecretCredential)
    assert connection.host == "certpilot-test.vault.azure.net" and "sp-secret" not in repr(connection)
    lab = _lab_block(keyvault)
    assert keyvault.token not in repr(lab) + repr(lab.connection())
    with pytest.raises(ValidationError, match="tenant_id, client_id and client_secret"):
        AzureKeyVaultBlock(vault_url="https://v.vault.azure.net", tenant_id="t")
    with pytest.raises(ValidationError, match="not both"):
        AzureKeyVaultBlock(vault_url="https://v.vault.azure.net", static_token="x", tenant_id="t", client_id="c",
                           client_secret="s")
    with pytest.raises(PermanentDeployError, match="vault_url must be https"):
        AzureKeyVaultBlock(vault_url="http://v.vault.azure.net", static_token="x").connection()
    assert AzureKeyVaultBlock.get_block_type_slug() == "azure-key-vault"
