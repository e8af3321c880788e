"""A private CA's trust bundle: what relying parties need to trust the certificates it issues.

The bundle of a certpilot CA is its root, then every issuing CA certificate under that root that is not
expired or revoked, newest first, as PEM. While an issuing CA is being rotated the old one stays in the
bundle until it expires, so a relying party holding only the bundle verifies certificates of either.
Its identity is the SHA-256 of the PEM bytes: a target of kind trust-bundle (certpilot.target_kinds)
is proven by reading the file back and comparing that digest.

A trust-bundle target belongs to a managed certificate like every target: it distributes the bundle
of the CA that issued that managed certificate's certificate (``for_certificate``), to the hosts that
must trust its peers (a service's own hosts, for mutual TLS). ``targets_of_ca`` lists the trust-bundle
targets that distribute a CA's bundle; ``distribute`` brings each to the CA's bundle of now (`certpilot
ca distribute`, after the CA's certificates change: a new issuing CA), through certpilot.rollout like
any deploy, with the deployers the caller builds. No network here, no Prefect.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlmodel import Session, col, select

from certpilot import audit, rollout, targets
from certpilot.clock import utcnow
from certpilot.database import read_session
from certpilot.deployment import DeployBundle, Deployer
from certpilot.errors import NotFoundError, PermanentError, redact
from certpilot.keystore import KeyRing
from certpilot.managed import current_certificate
from certpilot.models import Certificate, CertificateAuthority, ManagedCertificate, Target

__all__ = ["KIND", "BundleTarget", "Distributed", "TrustBundle", "distribute", "for_certificate", "of_ca", "source",
           "targets_of_ca"]

KIND = "trust-bundle"  # certpilot.target_kinds.TargetKind.TRUST_BUNDLE


@dataclass(frozen=True)
class TrustBundle:
    """CA ``ca``'s bundle: its root, then its issuing CA certificates in force (newest first)."""

    ca: str
    certificates: tuple[x509.Certificate, ...]

    @property
    def pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.certificates)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.pem).hexdigest()

    def describe(self) -> str:
        """A few public words for a receipt or a verification: the CA, how many certificates, the digest."""
        return f"CA {self.ca}'s bundle: {len(self.certificates)} certificate(s), sha256 {self.sha256[:16]}"

    def as_dict(self) -> dict[str, Any]:
        return {"ca": self.ca, "sha256": self.sha256,
                "certificates": [{"subject": c.subject.rfc4514_string(),
                                  "not_after": c.not_valid_after_utc.isoformat()} for c in self.certificates]}


def of_ca(session: Session, name: str, now: dt.datetime | None = None) -> TrustBundle:
    """CA ``name``'s bundle at ``now``: the root, then every CA certificate the root signed that is active and
    not expired (the CA's current issuing certificate first, then the others newest first)."""
    now = now or utcnow()
    ca = session.exec(select(CertificateAuthority).where(CertificateAuthority.name == name)).first()
    if ca is None:
        raise NotFoundError(f"no CA named {name!r}")
    root = session.get(Certificate, ca.root_fingerprint)
    if root is None:
        raise NotFoundError(f"CA {name}: its root certificate {ca.root_fingerprint[:16]} is missing from the inventory")
    issuing = session.exec(select(Certificate).where(
        col(Certificate.issuer_fingerprint) == ca.root_fingerprint, col(Certificate.is_ca).is_(True),
        col(Certificate.fingerprint_sha256) != ca.root_fingerprint, col(Certificate.status) == "active",
        col(Certificate.not_after) > now)).all()
    issuing = sorted(issuing, key=lambda c: (c.fingerprint_sha256 != ca.issuing_fingerprint, -c.not_before.timestamp(),
                                              c.fingerprint_sha256))
    return TrustBundle(name, tuple(x509.load_der_x509_certificate(c.der) for c in [root, *issuing]))


def _root_of(session: Session, fingerprint: str) -> Certificate:
    cert = session.get(Certificate, fingerprint)
    if cert is None:
        raise NotFoundError(f"certificate {fingerprint[:16]} is not in the inventory")
    for _ in range(8):
        if cert.self_signed or not cert.issuer_fingerprint or cert.issuer_fingerprint == cert.fingerprint_sha256:
            return cert
        parent = session.get(Certificate, cert.issuer_fingerprint)
        if parent is None:
            break
        cert = parent
    return cert


def for_certificate(session: Session, fingerprint: str, now: dt.datetime | None = None) -> TrustBundle:
    """The bundle of the certpilot CA whose root anchors certificate ``fingerprint`` (a leaf it issued, by
    any of its issuing certificates). PermanentError when no certpilot CA issued it."""
    top = _root_of(session, fingerprint)
    name = session.exec(select(CertificateAuthority.name)
                        .where(CertificateAuthority.root_fingerprint == top.fingerprint_sha256)).first()
    if name is None:
        raise PermanentError(f"certificate {fingerprint[:16]} chains to {top.subject}, which is not a certpilot CA's "
                             "root: a trust-bundle target distributes the bundle of the private CA that issues its "
                             "managed certificate")
    return of_ca(session, name, now)


def source(engine: sa.Engine, clock: Callable[[], dt.datetime] = utcnow) -> Callable[[str], TrustBundle]:
    """``for_certificate`` over the inventory, each call in a read session of its own: what a trust-bundle
    deployer is given to know which bundle goes with the certificate it deploys or verifies."""
    def find(fingerprint: str) -> TrustBundle:
        with read_session(engine) as session:
            return for_certificate(session, fingerprint, clock())
    return find


@dataclass(frozen=True)
class BundleTarget:
    """A trust-bundle target that distributes a CA's bundle: its managed certificate, its name, and the
    certificate it is deployed with (the managed certificate's current one)."""

    managed: str
    target: str
    fingerprint: str


def targets_of_ca(session: Session, name: str) -> list[BundleTarget]:
    """Every trust-bundle target of an active managed certificate whose current certificate CA ``name``
    issued, by managed certificate and target name."""
    ca = session.exec(select(CertificateAuthority).where(CertificateAuthority.name == name)).first()
    if ca is None:
        raise NotFoundError(f"no CA named {name!r}")
    rows = session.exec(select(Target, ManagedCertificate)
                        .where(col(Target.managed_certificate_id) == col(ManagedCertificate.id),
                               col(Target.kind) == KIND, col(ManagedCertificate.status) == "active")
                        .order_by(col(ManagedCertificate.name), col(Target.name))).all()
    found = []
    for target, managed in rows:
        current = current_certificate(session, managed)
        root = _root_of(session, current.fingerprint_sha256) if current is not None else None
        if current is not None and root is not None and root.fingerprint_sha256 == ca.root_fingerprint:
            found.append(BundleTarget(managed.name, target.name, current.fingerprint_sha256))
    return found


@dataclass(frozen=True)
class Distributed:
    """What ``distribute`` did at one trust-bundle target."""

    target: BundleTarget
    outcome: rollout.Outcome

    def as_dict(self) -> dict[str, Any]:
        return {"managed": self.target.managed, **self.outcome.as_dict()}


def distribute(engine: sa.Engine, name: str, deployer_for: Callable[[BundleTarget], Deployer],
               key_ring: Callable[[], KeyRing], actor: audit.Actor,
               log: rollout.Log = logging.getLogger(__name__)) -> list[Distributed]:
    """Bring every trust-bundle target of CA ``name`` (``targets_of_ca``) to the CA's bundle of now: each
    through certpilot.rollout.bring_to with its managed certificate's current certificate (rewritten only
    where the file differs, read back and verified, put back if that fails), one after the other; a
    target that fails does not stop the others. ``deployer_for`` builds a target's deployer (from its
    block); it is closed after use."""
    with read_session(engine) as session:
        found = targets_of_ca(session, name)
        rows = {(t.managed, t.target): targets.get_target(session, t.managed, t.target) for t in found}
    done = []
    for item in found:
        try:
            deployer = deployer_for(item)
        except Exception as exc:  # noqa: BLE001 - a target whose block cannot be had is a failed target
            outcome = rollout.Outcome(item.target, KIND, rollout.Action.FAILED, None, f"deployer: {redact(exc)}")
            done.append(Distributed(item, outcome))
            log.error("trust bundle %s of %s: %s", item.target, item.managed, outcome.detail)
            continue

        def bundle(item: BundleTarget = item) -> DeployBundle:
            found_bundle = targets.bundle(engine, item.managed, item.fingerprint, key_ring)
            if found_bundle is None:
                raise NotFoundError(f"the key of certificate {item.fingerprint[:16]} is not in the keystore")
            return found_bundle

        try:
            outcome = rollout.bring_to(engine, rows[(item.managed, item.target)], deployer, bundle, item.fingerprint,
                                       actor)
        except rollout.TargetFailed as exc:
            outcome = exc.outcome
            log.error("trust bundle %s of %s: %s: %s", item.target, item.managed, outcome.action, outcome.detail)
        finally:
            closer = getattr(deployer, "close", None)
            if callable(closer):
                closer()
        done.append(Distributed(item, outcome))
    return done
