"""The deployment target block: one target's kind and settings as a form in the Prefect UI, over the
connection block it deploys through (an SSH host, an AWS account or a Key Vault).

A Target in the inventory names the block that builds its deployer. Naming a DeploymentTargetBlock
(``deployment-target/web1-nginx``) keeps the target's settings in that block, edited in the UI; the
Target row's own settings, if any, override them key by key. Naming a connection block directly keeps
the settings on the row (``certpilot target add --set``). Either way the inventory records what the
target should serve and what was last verified there.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from prefect.blocks.core import Block
from pydantic import Field

from blocks.aws import AwsAccountBlock
from blocks.azure import AzureKeyVaultBlock
from blocks.ssh import SshHostBlock
from certpilot.deployment import BundleLookup, Deployer
from certpilot.errors import PermanentError

Kind = Literal["ssh-nginx", "ssh-haproxy", "aws-acm", "aws-elbv2", "aws-iam-elbv2", "azure-kv"]
_CONNECTIONS: dict[str, type[Block]] = {"ssh-nginx": SshHostBlock, "ssh-haproxy": SshHostBlock,
                                        "aws-acm": AwsAccountBlock, "aws-elbv2": AwsAccountBlock,
                                        "aws-iam-elbv2": AwsAccountBlock, "azure-kv": AzureKeyVaultBlock}


class DeploymentTargetBlock(Block):
    """Where a certificate is served: the kind of target, its connection and its settings."""

    _block_type_name: ClassVar[str] = "Deployment target"
    _block_type_slug: ClassVar[str] = "deployment-target"
    _description: ClassVar[str] = ("One place a certificate is deployed to (an nginx site, a haproxy frontend, an "
                                   "ACM certificate, a load balancer listener, a Key Vault certificate): its kind, "
                                   "the connection block it goes through, and its settings.")

    kind: Kind = Field(description="What the target is; it decides which settings apply (see the connector docs).")
    connection: SshHostBlock | AwsAccountBlock | AzureKeyVaultBlock = Field(
        description="The SSH host, AWS account or Key Vault the target is reached through.")
    settings: dict[str, Any] = Field(default_factory=dict, description="The target's settings: paths, reload and "
                                     "test commands, listener ARN, certificate name, verify endpoint...")

    def deployer(self, name: str, kind: str, settings: dict[str, Any],
                 lookup: BundleLookup | None = None) -> Deployer:
        if kind != self.kind:
            raise PermanentError(f"target {name} is of kind {kind} but its block describes a {self.kind} target")
        if not isinstance(self.connection, _CONNECTIONS[self.kind]):
            raise PermanentError(f"target {name}: a {self.kind} target needs a {_CONNECTIONS[self.kind].__name__} "
                                 f"connection, not a {type(self.connection).__name__}")
        return self.connection.deployer(name, kind, {**self.settings, **settings}, lookup)  # type: ignore[attr-defined]
