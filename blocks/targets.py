"""The target-kind registry, and the deployment target block: one target's kind and settings as a form
in the Prefect UI, over the connection block it deploys through (an SSH host, an AWS account or a Key
Vault).

``KINDS`` maps each TargetKind to its KindSpec: the connection block type that reaches it, its settings
model (certpilot.target_kinds) and the factory of its deployer. ``build_deployer(block, ...)`` is the one
dispatch, for a connection block and for a DeploymentTargetBlock alike: connection blocks only connect.

A Target in the inventory names the block that builds its deployer. Naming a DeploymentTargetBlock
(``deployment-target/web1-nginx``) keeps the target's settings in that block, edited in the UI; the
Target row's own settings, if any, override them key by key. Naming a connection block directly keeps
the settings on the row (``certpilot target add --set``). Either way the inventory records what the
target should serve and what was last verified there.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from prefect.blocks.core import Block
from pydantic import BaseModel, Field, model_validator

from blocks.aws import AwsAccountBlock
from blocks.azure import AzureKeyVaultBlock
from blocks.ssh import SshHostBlock
from certpilot.deployment import BundleLookup, Deployer, PermanentDeployError
from certpilot.errors import PermanentError
from certpilot.target_kinds import (
    SETTINGS,
    AcmSettings,
    HaproxySettings,
    KeyVaultSettings,
    ListenerSettings,
    NginxSettings,
    TargetKind,
    TargetSettings,
    TrustBundleSettings,
    merged_settings,
    parse_kind,
    validate_settings,
)

__all__ = ["CONNECTIONS", "KINDS", "DeploymentTargetBlock", "KindSpec", "build_deployer"]

Factory = Callable[[Any, str, Any, "BundleLookup | None"], Deployer]


@dataclass(frozen=True)
class KindSpec:
    """What a kind of target is built from: the connection block that reaches it, its settings model, and
    ``factory(connection block, target name, settings, lookup)`` that builds its deployer."""

    connection: type[Block]
    settings: type[TargetSettings]
    factory: Factory


def _nginx(block: SshHostBlock, name: str, settings: NginxSettings, lookup: BundleLookup | None) -> Deployer:
    from connectors.ssh_deploy import NginxDeployer  # rollback restores the backups on the host: no lookup

    return NginxDeployer(name, block.connection(), settings)


def _haproxy(block: SshHostBlock, name: str, settings: HaproxySettings, lookup: BundleLookup | None) -> Deployer:
    from connectors.ssh_deploy import HaproxyDeployer

    return HaproxyDeployer(name, block.connection(), settings)


def _acm(block: AwsAccountBlock, name: str, settings: AcmSettings, lookup: BundleLookup | None) -> Deployer:
    from connectors.aws_deploy import AcmDeployer

    return AcmDeployer(block.account(), name, settings, lookup)


def _elbv2(block: AwsAccountBlock, name: str, settings: ListenerSettings, lookup: BundleLookup | None) -> Deployer:
    from connectors.aws_deploy import ElbListenerDeployer

    return ElbListenerDeployer(block.account(), name, settings, lookup)


def _iam_elbv2(block: AwsAccountBlock, name: str, settings: ListenerSettings,
               lookup: BundleLookup | None) -> Deployer:
    from connectors.aws_deploy import IamListenerDeployer

    return IamListenerDeployer(block.account(), name, settings, lookup)


def _key_vault(block: AzureKeyVaultBlock, name: str, settings: KeyVaultSettings,
               lookup: BundleLookup | None) -> Deployer:
    from connectors.azure_kv import AzureKeyVaultDeployer

    return AzureKeyVaultDeployer(name, block.connection(), settings, lookup)


def _trust_bundle(block: SshHostBlock, name: str, settings: TrustBundleSettings,
                  lookup: BundleLookup | None) -> Deployer:
    from certpilot import trust_bundle
    from certpilot.database import get_engine
    from connectors.ssh_trust_bundle import TrustBundleDeployer  # the bundle comes from the inventory, not lookup

    return TrustBundleDeployer(name, block.connection(), settings, trust_bundle.source(get_engine()))


KINDS: dict[TargetKind, KindSpec] = {
    TargetKind.SSH_NGINX: KindSpec(SshHostBlock, SETTINGS[TargetKind.SSH_NGINX], _nginx),
    TargetKind.SSH_HAPROXY: KindSpec(SshHostBlock, SETTINGS[TargetKind.SSH_HAPROXY], _haproxy),
    TargetKind.AWS_ACM: KindSpec(AwsAccountBlock, SETTINGS[TargetKind.AWS_ACM], _acm),
    TargetKind.AWS_ELBV2: KindSpec(AwsAccountBlock, SETTINGS[TargetKind.AWS_ELBV2], _elbv2),
    TargetKind.AWS_IAM_ELBV2: KindSpec(AwsAccountBlock, SETTINGS[TargetKind.AWS_IAM_ELBV2], _iam_elbv2),
    TargetKind.AZURE_KV: KindSpec(AzureKeyVaultBlock, SETTINGS[TargetKind.AZURE_KV], _key_vault),
    TargetKind.TRUST_BUNDLE: KindSpec(SshHostBlock, SETTINGS[TargetKind.TRUST_BUNDLE], _trust_bundle),
}

CONNECTIONS: dict[type[Block], str] = {SshHostBlock: "an SSH host", AwsAccountBlock: "an AWS account",
                                       AzureKeyVaultBlock: "an Azure Key Vault"}
"""The connection block types, as messages name them."""


def kinds_of(connection: type[Block]) -> list[TargetKind]:
    """The kinds a connection block type deploys."""
    return [kind for kind, spec in KINDS.items() if issubclass(connection, spec.connection)]


def build_deployer(block: Block, name: str, kind: TargetKind | str,
             settings: TargetSettings | Mapping[str, Any], lookup: BundleLookup | None = None) -> Deployer:
    """The deployer of target ``name`` of ``kind`` through ``block``: a connection block (SSH host, AWS
    account, Key Vault) with the target's own ``settings``, or a DeploymentTargetBlock whose settings
    ``settings`` override key by key. The settings are validated by the kind's model.
    UnknownTargetKindError, TargetSettingsError, or PermanentDeployError for a block that cannot reach
    that kind."""
    if isinstance(block, DeploymentTargetBlock):
        overrides = settings.model_dump(exclude_unset=True) if isinstance(settings, BaseModel) else settings
        return block.deployer(name, kind, overrides, lookup)
    connection = block
    kind = parse_kind(kind)
    spec = KINDS[kind]
    if not isinstance(connection, spec.connection):
        own = kinds_of(type(connection))
        what = CONNECTIONS.get(type(connection), f"a {type(connection).__name__}")
        raise PermanentDeployError(f"{name}: {what} deploys kind{'s' if len(own) > 1 else ''} "
                                   f"{', '.join(sorted(own))}, not {kind.value!r}")
    return spec.factory(connection, name, validate_settings(kind, settings, name), lookup)


class DeploymentTargetBlock(Block):
    """Where a certificate is served: the kind of target, its connection and its settings."""

    _block_type_name: ClassVar[str] = "Deployment target"
    _block_type_slug: ClassVar[str] = "deployment-target"
    _description: ClassVar[str] = ("One place a certificate is deployed to (an nginx site, a haproxy frontend, an "
                                   "ACM certificate, a load balancer listener, a Key Vault certificate, a private "
                                   "CA's trust bundle on a host): its kind, "
                                   "the connection block it goes through, and its settings.")

    kind: TargetKind = Field(description="What the target is; it decides which connection and settings apply.")
    connection: SshHostBlock | AwsAccountBlock | AzureKeyVaultBlock = Field(
        description="The block the target is reached through: " + "; ".join(
            f"{label} for {', '.join(kinds_of(block_type))}" for block_type, label in CONNECTIONS.items()) + ".")
    settings: (NginxSettings | HaproxySettings | AcmSettings | ListenerSettings | KeyVaultSettings
               | TrustBundleSettings) = Field(
        description="The target's settings, those of its kind: paths, reload and test commands, listener ARN, "
                    "certificate name, verify endpoint...")

    @model_validator(mode="before")
    @classmethod
    def _settings_of_its_kind(cls, data: Any) -> Any:
        """Settings given as a dict are validated by the kind's model (not by whichever model of the union
        happens to accept them)."""
        if isinstance(data, Mapping) and "kind" in data and isinstance(data.get("settings"), Mapping):
            try:
                data = {**data, "settings": validate_settings(data["kind"], data["settings"])}
            except PermanentError as exc:
                raise ValueError(str(exc)) from None
        return data

    @model_validator(mode="after")
    def _consistent(self) -> DeploymentTargetBlock:
        spec = KINDS[self.kind]
        if not isinstance(self.settings, spec.settings):
            raise ValueError(f"kind {self.kind} takes {spec.settings.__name__}, not {type(self.settings).__name__}")
        if not isinstance(self.connection, spec.connection):
            raise ValueError(f"kind {self.kind} goes through {CONNECTIONS[spec.connection]} "
                             f"({spec.connection.__name__}), not a {type(self.connection).__name__}")
        return self

    def deployer(self, name: str, kind: TargetKind | str, settings: Mapping[str, Any],
                 lookup: BundleLookup | None = None) -> Deployer:
        """The deployer of target ``name``: this block's settings, overridden key by key by ``settings``
        (the Target row's own)."""
        if kind != self.kind:
            raise PermanentError(f"target {name} is of kind {kind} but its block describes a {self.kind} target")
        return build_deployer(self.connection, name, self.kind, merged_settings(self.kind, self.settings, settings),
                              lookup)
