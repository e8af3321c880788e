"""The Azure Key Vault block: one vault, its credential and TLS trust; it builds the vault's Source and
its deployers (kind ``azure-kv``, settings in certpilot/target_kinds.py).

Real Azure: vault_url ``https://<name>.vault.azure.net``, and a service principal (tenant_id, client_id,
client_secret; authority_host for sovereign clouds) with the certificates get/list/import/delete
permissions (and purge, for purge_deleted) and secrets/get (rollback re-imports the previous version
from its secret). Lab and pre-issued tokens: static_token instead of the service principal.

Block secrets are encrypted in the Prefect database with a key kept in the same database unless the
server sets PREFECT_SERVER_ENCRYPTION_KEY, and any API client may read them with include_secrets:
protect the Prefect API accordingly.
"""

from __future__ import annotations

from typing import Any, ClassVar

from prefect.blocks.core import Block
from pydantic import Field, HttpUrl, SecretStr, model_validator

from certpilot.discovery import Source

DOCS = "https://github.com/certpilot/certpilot/blob/main/README.md#azure-key-vault"


class AzureKeyVaultBlock(Block):
    """An Azure Key Vault holding certificates: discovered as a source, deployed to as targets."""

    _block_type_name: ClassVar[str] = "Azure Key Vault"
    _block_type_slug: ClassVar[str] = "azure-key-vault"
    _description: ClassVar[str] = ("An Azure Key Vault and the service principal certpilot uses on it: its "
                                   "certificates are discovered, and deploy targets import new versions into it.")
    _documentation_url: ClassVar[HttpUrl | None] = HttpUrl(DOCS)
    _code_example: ClassVar[str] = """
```python
from blocks.targets import build_deployer
from blocks.azure import AzureKeyVaultBlock

vault = AzureKeyVaultBlock.load("BLOCK_NAME")
source = vault.source()
deployer = build_deployer(vault, "web-cert", "azure-kv", {"certificate_name": "web"})
```
"""

    vault_url: str = Field(description="The vault's URL, e.g. https://myvault.vault.azure.net.")
    tenant_id: str | None = Field(default=None, description="The service principal's Microsoft Entra tenant id.")
    client_id: str | None = Field(default=None, description="The service principal's application (client) id.")
    client_secret: SecretStr | None = Field(default=None, description="The service principal's client secret.")
    authority_host: str | None = Field(default=None, description="The Entra authority, for sovereign clouds "
                                                                 "(default login.microsoftonline.com).")
    static_token: SecretStr | None = Field(default=None, description="A pre-issued bearer token, instead of the "
                                                                     "service principal (loopback lab vaults).")
    ca_file: str | None = Field(default=None, description="Path of a PEM file of CAs to trust for the vault's TLS "
                                                          "(a vault behind a private CA or a TLS proxy).")
    ca_pem: str | None = Field(default=None, description="The same CAs as PEM text, instead of ca_file.")
    verify_challenge_resource: bool = Field(
        default=True, description="Check that the vault's authentication challenge names a Key Vault resource of "
                                  "the vault's own domain (turn off for lab vaults only).")
    connection_timeout: float = Field(default=10.0, gt=0, description="Seconds to wait for a connection.")
    read_timeout: float = Field(default=30.0, gt=0, description="Seconds to wait for each read of a response.")
    retry_total: int = Field(default=2, ge=0, le=10, description="Retries of a request after a connection or read "
                                                                 "failure (throttling and 5xx are left to the task).")

    @model_validator(mode="after")
    def _complete(self) -> AzureKeyVaultBlock:
        principal = (self.tenant_id, self.client_id, self.client_secret)
        if self.static_token is None and not all(principal):
            raise ValueError("give tenant_id, client_id and client_secret (or static_token for a lab vault)")
        if self.static_token is not None and any(principal):
            raise ValueError("give either static_token or the service principal, not both")
        if self.ca_file and self.ca_pem:
            raise ValueError("give ca_file or ca_pem, not both")
        return self

    def _credential(self) -> Any:
        if self.static_token is not None:
            from connectors.azure_kv import StaticTokenCredential

            return StaticTokenCredential(self.static_token.get_secret_value())
        from azure.identity import ClientSecretCredential

        options: dict[str, Any] = {"connection_timeout": self.connection_timeout, "read_timeout": self.read_timeout,
                                   "retry_total": self.retry_total}
        if self.authority_host:
            options["authority"] = self.authority_host
        assert self.tenant_id and self.client_id and self.client_secret
        return ClientSecretCredential(self.tenant_id, self.client_id, self.client_secret.get_secret_value(), **options)

    def connection(self) -> Any:
        """The connector's KeyVaultConnection (the credential is built here, secrets revealed only to it)."""
        from connectors.azure_kv import KeyVaultConnection, trust_file

        ca_file = self.ca_file or (trust_file(self.ca_pem) if self.ca_pem else None)
        return KeyVaultConnection(self.vault_url, self._credential(), ca_file=ca_file,
                                  verify_challenge_resource=self.verify_challenge_resource,
                                  connection_timeout=self.connection_timeout, read_timeout=self.read_timeout,
                                  retry_total=self.retry_total)

    def source(self) -> Source:
        from connectors.azure_kv import AzureKeyVaultSource

        return AzureKeyVaultSource(self.connection())
