"""The kinds of source block, for the discover flow: which saved blocks are discovery sources.

A saved block of a source kind is a source when it is configured as one: every TLS scan and Key Vault
block; an SSH host block that has ``discovery_globs`` (one saved only to deploy to has none); an AWS
account block that discovers at least one of ACM, ELBv2 listeners and IAM. ``configured_as_source``
reads that from the block document's saved data, without its secrets.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from enum import StrEnum
from typing import Any

from prefect.blocks.core import Block

from blocks.aws import AwsAccountBlock
from blocks.azure import AzureKeyVaultBlock
from blocks.ssh import SshHostBlock
from blocks.tls_scan import TlsScanBlock

__all__ = ["SOURCE_BLOCKS", "SourceKind", "configured_as_source"]


class SourceKind(StrEnum):
    """A kind of discovery source: the slug of its block type."""

    TLS_SCAN = "tls-scan"
    SSH_HOST = "ssh-host"
    AWS_ACCOUNT = "aws-account"
    AZURE_KEY_VAULT = "azure-key-vault"


SOURCE_BLOCKS: dict[SourceKind, type[Block]] = {
    SourceKind.TLS_SCAN: TlsScanBlock, SourceKind.SSH_HOST: SshHostBlock,
    SourceKind.AWS_ACCOUNT: AwsAccountBlock, SourceKind.AZURE_KEY_VAULT: AzureKeyVaultBlock}


def _aws_discovers(data: Mapping[str, Any]) -> bool:
    return any(data.get(flag, True) for flag in ("discover_acm", "discover_elbv2", "discover_iam"))


_CONFIGURED: dict[SourceKind, Callable[[Mapping[str, Any]], bool]] = {
    SourceKind.TLS_SCAN: lambda data: True,
    SourceKind.SSH_HOST: lambda data: bool(data.get("discovery_globs")),
    SourceKind.AWS_ACCOUNT: _aws_discovers,
    SourceKind.AZURE_KEY_VAULT: lambda data: True,
}


def configured_as_source(kind: SourceKind, data: Mapping[str, Any]) -> bool:
    """Whether a saved block of ``kind`` with these fields (its block document's data) discovers anything."""
    return _CONFIGURED[kind](data)
