"""The Source role: where certificates live, and what was found there.

A source (a TLS scan, an SSH host, an AWS account, a Key Vault) yields Found items, each a
certificate as presented (leaf first, then the chain as given) at one locator with public details
(TLS version, whether the chain verified, the file's format...), and Problems for places it could
not read. ``record`` writes them to the inventory in batches and, after a source finished, flags as
ghosts its locations that this run did not see again.

Locators: ``tls://host:port?sni=name``, ``ssh://user@host:port/path``, ``aws-acm://region/arn``,
``aws-elbv2://region/listener-arn``, ``aws-iam://name``, ``azure-kv://vault/name/version``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes


@dataclass(frozen=True)
class Found:
    """Certificates (DER, leaf first) seen at ``locator``. ``key`` is set only when the operator asked
    a source to bring back the private key it found beside the certificate; it is stored sealed."""

    certificates: tuple[bytes, ...]
    locator: str
    details: dict[str, Any] = field(default_factory=dict)
    key: PrivateKeyTypes | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class Problem:
    """A place the source could not read, and why (no secret in ``reason``)."""

    locator: str
    reason: str


@runtime_checkable
class Source(Protocol):
    """``name`` identifies the source in Location.source and for ghost flagging (e.g. ``tls-scan:lab``,
    ``ssh:web1``); ``discover`` yields as it goes, so large sources are recorded in batches."""

    name: str

    def discover(self) -> Iterator[Found | Problem]: ...


def split(items: Iterable[Found | Problem]) -> tuple[list[Found], list[Problem]]:
    found: list[Found] = []
    problems: list[Problem] = []
    for item in items:
        (found if isinstance(item, Found) else problems).append(item)  # type: ignore[arg-type]
    return found, problems
