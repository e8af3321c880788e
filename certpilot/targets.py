"""Targets: where a managed certificate is served, what each should serve and what was last proven.

Each Target records ``desired_fingerprint`` (set before a deploy touches it) and
``verified_fingerprint`` (set only after the target was seen serving it). Rollback inside a run is
best-effort, a killed process rolls nothing back, so a deploy run starts from these records and the
target itself (what it holds now) and brings a mixed fleet to one state: see ``Step``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from cryptography import x509
from sqlmodel import Session, col, select

from certpilot import audit, keystore
from certpilot.clock import utcnow
from certpilot.database import read_session
from certpilot.deployment import DeployBundle, Removal, key_to_pem
from certpilot.errors import NotFoundError, PermanentError
from certpilot.keystore import KeyRing
from certpilot.managed import current_certificate, get, in_service
from certpilot.models import Certificate, ManagedCertificate, Target
from certpilot.target_kinds import TargetKind, TargetSettingsError, parse_kind, unknown_keys

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def public_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Settings as the audit trail keeps them: PEM text (a trust bundle) shown by its digest only."""
    return {key: (f"<PEM sha256:{hashlib.sha256(value.encode()).hexdigest()[:16]}>"
                  if isinstance(value, str) and "-----BEGIN" in value else value) for key, value in settings.items()}


def _checked(name: str, kind: TargetKind | str, settings: Mapping[str, Any]) -> TargetKind:
    """The kind, checked (UnknownTargetKindError), and settings whose every key the kind has
    (TargetSettingsError). Whether they are complete depends on the block (a deployment-target block
    holds the rest): certpilot.target_kinds.validate_settings checks them whole when a deployer is built."""
    kind = parse_kind(kind)
    unknown = unknown_keys(kind, settings)
    if unknown:
        raise TargetSettingsError(kind, unknown=unknown, target=name)
    return kind


def add(session: Session, managed_name: str, name: str, kind: TargetKind | str, block: str,
        settings: Mapping[str, Any], actor: audit.Actor, now: dt.datetime | None = None) -> Target:
    """Add a target to managed certificate ``managed_name``. ``block`` is the Prefect block document
    (``block-type-slug/document-name``) that builds its connector; ``settings`` its target settings, whose
    keys must be the kind's."""
    if not _NAME.match(name):
        raise PermanentError(f"target name {name!r}: use letters, digits, '.', '_' and '-' (at most 128)")
    kind = _checked(name, kind, settings)
    if "/" not in block:
        raise PermanentError(f"target {name}: block {block!r} must be 'block-type-slug/document-name'")
    managed = get(session, managed_name)
    if kind is TargetKind.TRUST_BUNDLE and not managed.issuer.startswith("private-ca/"):
        raise PermanentError(f"target {name}: a trust-bundle target distributes the bundle of the private CA that "
                             f"issues its managed certificate, and {managed_name} is issued by {managed.issuer}")
    if session.exec(select(Target).where(Target.managed_certificate_id == managed.id, Target.name == name)).first():
        raise PermanentError(f"managed certificate {managed_name} already has a target named {name}")
    now = now or utcnow()
    assert managed.id is not None  # a stored row
    target = Target(managed_certificate_id=managed.id, name=name, kind=kind.value, block=block,
                    settings=dict(settings), updated_at=now)
    session.add(target)
    session.flush()
    audit.append(session, actor, [audit.Change("target.added", f"managed:{managed_name}",
                                               {"target": name, "kind": kind.value, "block": block,
                                                "settings": public_settings(settings)})], now)
    return target


def configure(session: Session, managed_name: str, name: str, kind: TargetKind | str, block: str,
              settings: Mapping[str, Any], actor: audit.Actor, now: dt.datetime | None = None) -> Target:
    """Add the target, or change its kind, block and settings when it exists (its records are kept)."""
    try:
        target = get_target(session, managed_name, name)
    except NotFoundError:
        return add(session, managed_name, name, kind, block, settings, actor, now)
    if (target.kind, target.block, target.settings) != (kind, block, dict(settings)):
        kind = _checked(name, kind, settings)
        _update(session, target, actor, "target.changed", {"block": block, "settings": public_settings(settings)}, now,
                kind=kind.value, block=block, settings=dict(settings))
        session.refresh(target)
    return target


def list_targets(session: Session, managed_name: str) -> list[Target]:
    managed = get(session, managed_name)
    return list(session.exec(select(Target).where(Target.managed_certificate_id == managed.id)
                             .order_by(col(Target.name))))


def managed_with_targets(session: Session) -> set[int]:
    """The ids of the managed certificates that have at least one target."""
    return set(session.exec(select(Target.managed_certificate_id).distinct()))


def left_behind(session: Session) -> list[str]:
    """The active managed certificates (by name) with a target that a deploy never finished: one that
    was deployed before (it has a desired fingerprint), whose last deploy or verification did not fail
    (no last error: a failed one was reported and rolled back), and that is not proven serving the
    managed certificate's current certificate. A run killed after storing a renewal or in the middle of
    its deployment leaves exactly these; renew-due deploys them again (the certificate is not due any
    more, so renewing alone would leave the old one served)."""
    rows = session.execute(
        sa.select(col(Target.managed_certificate_id), col(Target.verified_fingerprint))
        .join(ManagedCertificate, col(ManagedCertificate.id) == col(Target.managed_certificate_id))
        .where(col(ManagedCertificate.status) == "active", col(Target.desired_fingerprint).is_not(None),
               col(Target.last_error).is_(None))).all()
    verified: dict[int, set[str | None]] = {}
    for managed_id, fingerprint in rows:
        verified.setdefault(managed_id, set()).add(fingerprint)
    ids = sorted(verified)
    current: dict[int, str] = {}  # managed id -> its newest active certificate, as current_certificate says
    for start in range(0, len(ids), 500):
        found = session.execute(
            sa.select(col(Certificate.managed_certificate_id), col(Certificate.fingerprint_sha256))
            .where(col(Certificate.managed_certificate_id).in_(ids[start:start + 500]),
                   col(Certificate.status) == "active")
            .order_by(col(Certificate.not_before), col(Certificate.created_at))).all()
        current.update((managed_id, fingerprint) for managed_id, fingerprint in found)
    behind = [i for i in ids if i in current and verified[i] != {current[i]}]
    names: list[str] = []
    for start in range(0, len(behind), 500):
        names += session.exec(select(ManagedCertificate.name)
                              .where(col(ManagedCertificate.id).in_(behind[start:start + 500]))).all()
    return sorted(names)


def get_target(session: Session, managed_name: str, name: str) -> Target:
    for target in list_targets(session, managed_name):
        if target.name == name:
            return target
    raise NotFoundError(f"managed certificate {managed_name} has no target named {name}")


def _update(session: Session, target: Target, actor: audit.Actor, action: str, details: dict[str, Any],
            now: dt.datetime | None, **values: Any) -> None:
    now = now or utcnow()
    session.execute(sa.update(Target).where(col(Target.id) == target.id).values(updated_at=now, **values))
    managed = session.get(ManagedCertificate, target.managed_certificate_id)
    managed_name = managed.name if managed else target.managed_certificate_id
    audit.append(session, actor, [audit.Change(action, f"target:{managed_name}/{target.name}",
                                               {"kind": target.kind, **details})], now)


def set_desired(session: Session, target: Target, fingerprint: str, actor: audit.Actor,
                now: dt.datetime | None = None) -> None:
    if target.desired_fingerprint != fingerprint:
        _update(session, target, actor, "target.desired", {"fingerprint": fingerprint,
                                                          "was": target.desired_fingerprint}, now,
                desired_fingerprint=fingerprint)


def record_deployed(session: Session, target: Target, fingerprint: str, actor: audit.Actor,
                    now: dt.datetime | None = None) -> None:
    now = now or utcnow()
    _update(session, target, actor, "target.deployed", {"fingerprint": fingerprint}, now, deployed_at=now)


def record_verified(session: Session, target: Target, fingerprint: str, how: str, actor: audit.Actor,
                    now: dt.datetime | None = None) -> None:
    now = now or utcnow()
    _update(session, target, actor, "target.verified", {"fingerprint": fingerprint, "how": how}, now,
            verified_fingerprint=fingerprint, verified_at=now, last_error=None)


def record_failed(session: Session, target: Target, reason: str, actor: audit.Actor,
                  now: dt.datetime | None = None) -> None:
    _update(session, target, actor, "target.failed", {"reason": reason}, now, last_error=reason)


def record_rolled_back(session: Session, target: Target, fingerprint: str | None, verified: bool,
                       actor: audit.Actor, now: dt.datetime | None = None) -> None:
    """The target was put back to ``fingerprint``: that is what it should serve until the next deploy."""
    now = now or utcnow()
    values: dict[str, Any] = {"desired_fingerprint": fingerprint}
    if verified:
        values.update(verified_fingerprint=fingerprint, verified_at=now)
    _update(session, target, actor, "target.rolled-back", {"fingerprint": fingerprint, "verified": verified}, now,
            **values)


def record_removed(session: Session, target: Target, removal: Removal, actor: audit.Actor,
                   now: dt.datetime | None = None) -> None:
    """The target was taken off (restorable: ``removal`` names what was kept); it should serve nothing."""
    _update(session, target, actor, "target.removed", {"removal": removal.as_dict()}, now,
            desired_fingerprint=None, verified_fingerprint=None, verified_at=None, last_error=None)


def record_restored(session: Session, target: Target, fingerprint: str | None, how: str | None, actor: audit.Actor,
                    now: dt.datetime | None = None) -> None:
    """What ``removal`` took was put back; ``how`` is the verification's method, None when not proven served."""
    now = now or utcnow()
    values: dict[str, Any] = {"desired_fingerprint": fingerprint}
    if how is not None:
        values.update(verified_fingerprint=fingerprint, verified_at=now, last_error=None)
    _update(session, target, actor, "target.restored", {"fingerprint": fingerprint, "verified": how}, now, **values)


def record_purged(session: Session, target: Target, removal: Removal, actor: audit.Actor,
                  now: dt.datetime | None = None) -> None:
    """What the removal kept was destroyed: nothing can be restored there."""
    _update(session, target, actor, "target.purged", {"removal": removal.as_dict()}, now)


def delete(session: Session, managed_name: str, name: str, actor: audit.Actor, details: dict[str, Any],
           now: dt.datetime | None = None) -> None:
    """Delete the target's record (audited with ``details``: what was done on the target itself)."""
    target = get_target(session, managed_name, name)
    audit.append(session, actor, [audit.Change("target.deleted", f"target:{managed_name}/{name}", {
        "kind": target.kind, "block": target.block, "settings": public_settings(target.settings),
        "desired": target.desired_fingerprint, "verified": target.verified_fingerprint, **details})], now)
    session.delete(target)
    session.flush()


@dataclass(frozen=True)
class Plan:
    """What a deploy run of managed certificate ``name`` will do: serve ``fingerprint`` on ``targets``."""

    name: str
    fingerprint: str
    targets: list[dict[str, Any]]  # name, kind, desired, verified: public facts for the run's record


def plan(session: Session, managed_name: str, fingerprint: str | None = None) -> Plan:
    """Deploy the given certificate, or the managed certificate's current one, to all its targets (a retired
    one, or one being retired, is refused: certpilot.managed.in_service)."""
    managed = in_service(session, managed_name)
    if fingerprint is None:
        current = current_certificate(session, managed)
        if current is None:
            raise NotFoundError(f"managed certificate {managed_name} has no certificate yet: renew it first")
        fingerprint = current.fingerprint_sha256
    else:
        cert = session.get(Certificate, fingerprint)
        if cert is None or cert.managed_certificate_id != managed.id:
            raise NotFoundError(f"certificate {fingerprint[:16]} is not one of managed certificate {managed_name}'s")
    targets = [{"name": t.name, "kind": t.kind, "desired": t.desired_fingerprint, "verified": t.verified_fingerprint}
               for t in list_targets(session, managed_name)]
    return Plan(managed_name, fingerprint, targets)


# ------------------------------------------------------------------------------------------- bundles

def chain_of(session: Session, fingerprint: str) -> tuple[Certificate, list[Certificate]]:
    """The certificate and its intermediates from the inventory (issuer links), without the root."""
    leaf = session.get(Certificate, fingerprint)
    if leaf is None:
        raise NotFoundError(f"certificate {fingerprint[:16]} is not in the inventory")
    chain: list[Certificate] = []
    cur = leaf
    while cur.issuer_fingerprint and cur.issuer_fingerprint != cur.fingerprint_sha256 and len(chain) < 8:
        parent = session.get(Certificate, cur.issuer_fingerprint)
        if parent is None or parent.self_signed:
            break
        chain.append(parent)
        cur = parent
    return leaf, chain


def bundle(engine: sa.Engine, name: str, fingerprint: str, key_ring: Callable[[], KeyRing]) -> DeployBundle | None:
    """The deployable bundle of ``fingerprint``, or None when its key is not in the keystore. Building it
    checks that the stored key is the certificate's (KeyMismatchError: see DeployBundle); after that the
    key is unsealed only when the deployer calls ``key_pem()``, each time in a session of its own."""
    with read_session(engine) as session:
        leaf, chain = chain_of(session, fingerprint)
        if leaf.spki_sha256 is None:
            return None
        ref = keystore.find_key(session, leaf.spki_sha256)
        certificate = x509.load_der_x509_certificate(leaf.der)
        intermediates = tuple(x509.load_der_x509_certificate(c.der) for c in chain)
    if ref is None:
        return None

    def key_pem() -> bytes:
        with read_session(engine) as session:
            return key_to_pem(keystore.load_private_key(session, ref, key_ring()))

    return DeployBundle(name, certificate, intermediates, key_pem)


def lookup(engine: sa.Engine, name: str, key_ring: Callable[[], KeyRing]) -> Callable[[str], DeployBundle | None]:
    """A BundleLookup over the inventory and keystore, for deployers whose rollback re-installs a
    previous certificate with its key."""
    def find(fingerprint: str) -> DeployBundle | None:
        try:
            return bundle(engine, name, fingerprint, key_ring)
        except NotFoundError:
            return None
    return find
