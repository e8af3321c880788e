"""The Deployer role: put a certificate where it is served, prove it, undo it.

A deployer is built for one target (an nginx site on an SSH host, an ACM certificate, a Key Vault
certificate...) from that target's settings. ``deploy`` installs a bundle and returns a Receipt,
public facts only, that ``rollback`` uses to put back exactly what was there before. ``verify``
proves that the target now serves the expected certificate (on the wire for endpoints, by an API
read-back for stores) and raises VerificationError otherwise. ``current`` says which certificate the
target holds now, for reconciling a mixed fleet.

Retiring a target takes two steps, so that it can be undone until the operator confirms: ``remove``
takes the certificate off the target but keeps what it took (backup files, a soft-deleted vault
certificate, a stored certificate taken off a listener) and returns a Removal naming it; ``restore``
puts that back; ``purge`` destroys what was kept, after which nothing can be restored.

Secrets: a DeployBundle carries the key only as a function that unseals it; a deployer calls it at
the moment it writes the key and keeps nothing. Receipts, errors and logs never hold key material.

A bundle whose key is not its certificate's cannot be built (KeyMismatchError): building one unseals
the key once to check it (certpilot.keys.key_matches_certificate), so no deployer checks it again and a
mismatched pair never reaches a target.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from certpilot.clock import utcnow
from certpilot.errors import DeployError as DeployError  # the deploy errors live with the others; the
from certpilot.errors import KeyMismatchError, PermanentError  # role's module names them too
from certpilot.errors import PermanentDeployError as PermanentDeployError
from certpilot.keys import key_matches_certificate, public_key_sha256

if TYPE_CHECKING:
    from certpilot.target_kinds import TargetKind


def fingerprint(certificate: x509.Certificate) -> str:
    return hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest()


def key_to_pem(key: PrivateKeyTypes) -> bytes:
    """PKCS#8 PEM, unencrypted: only ever written to a 0600 file on a target or sent to a store's API."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@dataclass(frozen=True)
class DeployBundle:
    """What a deployer installs: a certificate, the intermediates that chain it (issuer first, no
    root), and a function returning the private key as PKCS#8 PEM, called only when it is written.

    Building one checks, once, that the key is the certificate's: KeyMismatchError if not, and
    PermanentDeployError if the key cannot be read. The key is dropped right after the check."""

    name: str  # the managed certificate's name (used for default file names and store entries)
    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    key_pem: Callable[[], bytes] = field(repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            key = serialization.load_pem_private_key(self.key_pem(), password=None)
        except (ValueError, TypeError):
            raise PermanentDeployError(f"deploy bundle {self.name}: the private key of {self.fingerprint[:16]} is "
                                       "not a readable unencrypted PEM key") from None
        try:
            if not key_matches_certificate(key, self.certificate):
                raise KeyMismatchError(public_key_sha256(key), [self.fingerprint])
        finally:
            del key

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.certificate)

    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def chain_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.chain)

    def fullchain_pem(self) -> bytes:
        """The leaf then its intermediates: what nginx's ssl_certificate and ACM's reimport want."""
        return self.certificate_pem() + self.chain_pem()

    @classmethod
    def from_key(cls, name: str, certificate: x509.Certificate, chain: Sequence[x509.Certificate],
                 key: PrivateKeyTypes) -> DeployBundle:
        """A bundle over a key held in memory (tests, benchmarks); flows build theirs from the keystore."""
        return cls(name, certificate, tuple(chain), lambda: key_to_pem(key))


BundleLookup = Callable[[str], "DeployBundle | None"]
"""Finds the bundle (certificate, chain, sealed key) of a fingerprint in the inventory, or None. Given to
deployers whose rollback must re-install the previous certificate with its key (ACM re-import)."""


@dataclass(frozen=True)
class Receipt:
    """What one deploy changed on one target: enough for rollback, nothing secret (it is a task result).

    ``undo`` is the deployer's own JSON-able record: backup file names, the previous ARN or version.
    """

    target: str
    kind: str
    fingerprint: str  # what was deployed
    previous_fingerprint: str | None  # what the target held before, if known
    undo: dict[str, Any] = field(default_factory=dict)
    at: dt.datetime = field(default_factory=utcnow)

    def as_dict(self) -> dict[str, Any]:
        return {"target": self.target, "kind": self.kind, "fingerprint": self.fingerprint,
                "previous_fingerprint": self.previous_fingerprint, "undo": dict(self.undo), "at": self.at.isoformat()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Receipt:
        return cls(data["target"], data["kind"], data["fingerprint"], data.get("previous_fingerprint"),
                   dict(data.get("undo") or {}), dt.datetime.fromisoformat(data["at"]))


@dataclass(frozen=True)
class Removal:
    """What ``remove`` took off one target and where it kept it, for ``restore`` (until ``purge``):
    public facts only (it is an audit event's details and a task result).

    ``undo`` is the deployer's own JSON-able record (backup file names, the vault certificate's name,
    the listener's stored certificates). ``served`` says whether the target's endpoint still served the
    removed certificate just after the removal (None: not an endpoint, or not checked); ``note`` what
    the operator must know about the target's state (e.g. nginx still serves it from memory).
    """

    target: str
    kind: str
    fingerprint: str | None  # the certificate the target held (None: it held none)
    undo: dict[str, Any] = field(default_factory=dict)
    served: bool | None = None
    note: str = ""
    at: dt.datetime = field(default_factory=utcnow)

    def as_dict(self) -> dict[str, Any]:
        return {"target": self.target, "kind": self.kind, "fingerprint": self.fingerprint, "undo": dict(self.undo),
                "served": self.served, "note": self.note, "at": self.at.isoformat()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Removal:
        return cls(data["target"], data["kind"], data.get("fingerprint"), dict(data.get("undo") or {}),
                   data.get("served"), data.get("note") or "", dt.datetime.fromisoformat(data["at"]))


@dataclass(frozen=True)
class Verification:
    """Proof that a target serves ``fingerprint``: where it was checked and how."""

    target: str
    fingerprint: str
    method: str  # "tls" (handshakes on the wire) or "api" (read back from the store)
    detail: str = ""  # e.g. "8 consecutive handshakes on 127.0.0.1:8443 sni=a.test in 0.21 s"


class VerificationError(PermanentError):
    """The target does not serve what it should: ``served`` is what it serves, if anything."""

    def __init__(self, target: str, expected: str, served: str | None, reason: str) -> None:
        self.target, self.expected, self.served, self.reason = target, expected, served, reason
        super().__init__(f"{target}: verification failed: {reason} (expected {expected[:16]}, "
                         f"served {served[:16] if served else 'nothing'})")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.target, self.expected, self.served, self.reason))


@runtime_checkable
class Deployer(Protocol):
    """One target. Errors raised are DeployError (transient), PermanentDeployError or VerificationError,
    with messages that name the target and hold no secret. A deployer holding a connection also has
    ``close()``; whoever built it calls it when done."""

    name: str  # the target's name
    kind: TargetKind

    def deploy(self, bundle: DeployBundle) -> Receipt: ...

    def verify(self, fingerprint: str) -> Verification: ...

    def rollback(self, receipt: Receipt) -> None: ...

    def remove(self) -> Removal:
        """Take the certificate off the target, keeping what was taken for ``restore``. Idempotent: a
        target removed before (and not restored) gives the same Removal again."""
        ...

    def restore(self, removal: Removal) -> str:
        """Put back what ``removal`` took (before ``purge``); what was done, in a few words."""
        ...

    def purge(self, removal: Removal) -> None:
        """Destroy what ``removal`` kept: nothing can be restored after. Idempotent."""
        ...

    def current(self) -> str | None: ...
