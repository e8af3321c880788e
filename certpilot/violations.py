"""Policy violations in the inventory: what the policy engine (certpilot.policy, pure) is told about each
certificate, where its findings are kept, waivers, and ownership rules applied.

- Facts: ``facts_for`` reads what the rules look at from the inventory, in batches of 500: names from the
  SubjectAltName rows (DNS, IP, URI), key and signature from the Certificate, where it is seen from its
  Locations that are not ghosts, and from its managed certificate (if any) the issuer block, profile,
  renewal window and, where the certificate has none, the owner and tags. A certificate is private when
  it chains (by ``issuer_fingerprint``) to a certpilot CA's issuing or root certificate, is self-signed,
  or its issuer matches the policy's private issuer patterns (``Policy.is_public``); its issuer's names
  are its DN, its managed certificate's issuer block and ``private-ca/<block name>`` for a certpilot CA
  (the block ``certpilot ca register-block`` saves). ``request_facts`` and ``csr_facts`` describe a
  certificate not issued yet, for the issuance gate (``gate``).
- Storing: each evaluation replaces the rows of what it evaluated (a certificate's rules: place ""; an
  endpoint's: its place) in bulk; a violation that persists keeps its ``first_seen``; a fixed one is gone.
  ``EvaluationSummary.violations`` counts the violations not waived, ``waived`` the others.
- Waivers: granted and revoked with an audit event each (``policy.waiver_granted``, ``policy.waiver_revoked``);
  the first evaluation after one expired records it once (``policy.waiver_expired``). A waived violation is
  stored with its ``waiver_id``; a waiver granted, revoked or found expired applies to the stored rows at
  once (those it waived are waived by another waiver in force that covers them, or no longer waived).
- Ownership: ``apply_ownership`` gives certificates without an owner (their own or their managed
  certificate's) the owner of the first ownership rule that matches them; never replaces an owner.

No Prefect, no network here.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from sqlmodel import Session, SQLModel, col, select

from certpilot import audit
from certpilot.clock import utcnow
from certpilot.errors import (CertpilotError, InvalidDnsNameError, InvalidOptionError, NotFoundError, PermanentError,
                              redact)
from certpilot.managed import ari_window
from certpilot.models import (Certificate, CertificateAuthority, Location, ManagedCertificate, PolicyViolation,
                              PolicyWaiver, SubjectAltName)
from certpilot.names import normalise_dns_name
from certpilot.policy import (DEFAULT_POLICY, RULES, EndpointFacts, Facts, Policy, PolicyViolationError, Severity,
                              Violation, Waiver, parse_waiver_scope)
from certpilot.renewal import RenewalPolicy, renewal_time

__all__ = ["EvaluationSummary", "active_waivers", "apply_ownership", "certificate_labels", "csr_facts",
           "evaluate_certificates", "evaluate_endpoints", "facts_for", "forget_places", "gate", "grant_waiver", "list_waivers",
           "open_counts_by_rule", "own_and_evaluate", "request_facts", "revoke_waiver", "stored_violations"]

_CHUNK = 500  # bound on parameters per IN (...) list
_MAX_CHAIN = 8  # issuer links followed up from a certificate, looking for a certpilot CA
_BULK = {"synchronize_session": False}
_CERTIFICATE = SQLModel.metadata.tables[Certificate.__tablename__]
_SAN = SQLModel.metadata.tables[SubjectAltName.__tablename__]
_LOCATION = SQLModel.metadata.tables[Location.__tablename__]
_MANAGED = SQLModel.metadata.tables[ManagedCertificate.__tablename__]
_VIOLATION = SQLModel.metadata.tables[PolicyViolation.__tablename__]
_WAIVER = SQLModel.metadata.tables[PolicyWaiver.__tablename__]
PRIVATE_CA_BLOCK = "private-ca"  # blocks.issuers.PrivateCABlock's slug: a certpilot CA's issuer block
ACME_DEFAULT_DAYS = 90  # what an ACME CA gives when a managed certificate asks no validity (Let's Encrypt)
_DAY = dt.timedelta(days=1)
_SECOND = dt.timedelta(seconds=1)


def _chunks(items: Sequence[Any], size: int = _CHUNK) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def ca_block_name(ca_name: str) -> str:
    """The block document name of certpilot CA ``ca_name`` (Prefect allows lower-case letters, digits and
    dashes): ``private-ca/<this>`` is how managed certificates name it (cli/issuer_blocks.py)."""
    return re.sub(r"[^a-z0-9-]", "-", ca_name.lower())


def _dns(name: str) -> str:
    try:
        return normalise_dns_name(name, wildcard=True)
    except InvalidDnsNameError:
        return name.strip().lower()


# ------------------------------------------------------------------------------------------ facts

@dataclass
class _Loaded:
    facts: Facts
    evaluated: bool  # active and not a CA certificate: what evaluations look at


def _private_cas(session: Session) -> dict[str, str]:
    """Fingerprint of every certpilot CA's root and issuing certificate -> the CA's name."""
    out: dict[str, str] = {}
    for name, root, issuing in session.execute(sa.select(col(CertificateAuthority.name),
                                                         col(CertificateAuthority.root_fingerprint),
                                                         col(CertificateAuthority.issuing_fingerprint))):
        out[root] = name
        out[issuing] = name
    return out


def _ca_names(session: Session, links: dict[str, str | None]) -> dict[str, str]:
    """For each certificate in ``links`` (fingerprint -> its issuer's fingerprint): the certpilot CA it
    chains to, when it does. Issuers not yet known are read in batches, a level at a time."""
    cas = _private_cas(session)
    if not cas:
        return {}
    parents = dict(links)
    wanted = sorted({p for p in parents.values() if p and p not in parents and p not in cas})
    for _ in range(_MAX_CHAIN):
        if not wanted:
            break
        found: dict[str, str | None] = {}
        for chunk in _chunks(wanted):
            for fp, issuer_fp in session.execute(
                    sa.select(_CERTIFICATE.c.fingerprint_sha256, _CERTIFICATE.c.issuer_fingerprint)
                    .where(_CERTIFICATE.c.fingerprint_sha256.in_(chunk))):
                found[fp] = issuer_fp
        for fp in wanted:
            parents.setdefault(fp, found.get(fp))
        wanted = sorted({p for p in found.values() if p and p not in parents and p not in cas})
    out: dict[str, str] = {}
    for fp in links:
        node: str | None = links[fp]
        for _ in range(_MAX_CHAIN + 1):
            if node is None:
                break
            if node in cas:
                out[fp] = cas[node]
                break
            parent = parents.get(node)
            node = parent if parent != node else None  # a self-signed certificate ends the chain
    return out


def _load(session: Session, policy: Policy, fingerprints: Sequence[str] | None, now: dt.datetime) -> list[_Loaded]:
    c = _CERTIFICATE.c
    columns = (c.fingerprint_sha256, c.issuer, c.not_before, c.not_after, c.key_type, c.key_size, c.key_curve,
               c.signature_algorithm, c.is_ca, c.self_signed, c.issuer_fingerprint, c.owner, c.tags,
               c.managed_certificate_id, c.extended_key_usage, c.status)
    rows: list[Any] = []
    if fingerprints is None:
        rows = list(session.execute(sa.select(*columns).where(c.status == "active", c.is_ca.is_(False))
                                    .order_by(c.fingerprint_sha256)))
    else:
        wanted = list(dict.fromkeys(fingerprints))
        by_fp: dict[str, Any] = {}
        for chunk in _chunks(wanted):
            for row in session.execute(sa.select(*columns).where(c.fingerprint_sha256.in_(chunk))):
                by_fp[row.fingerprint_sha256] = row
        rows = [by_fp[fp] for fp in wanted if fp in by_fp]
    if not rows:
        return []
    fps = [r.fingerprint_sha256 for r in rows]
    sans: dict[str, list[tuple[str, str]]] = {}
    places: dict[str, list[tuple[str, str]]] = {}
    for chunk in _chunks(fps):
        for fp, kind, value in session.execute(sa.select(_SAN.c.certificate_fingerprint, _SAN.c.kind, _SAN.c.value)
                                               .where(_SAN.c.certificate_fingerprint.in_(chunk))):
            sans.setdefault(fp, []).append((kind, value))
        for fp, locator, source in session.execute(
                sa.select(_LOCATION.c.certificate_fingerprint, _LOCATION.c.locator, _LOCATION.c.source)
                .where(_LOCATION.c.certificate_fingerprint.in_(chunk), _LOCATION.c.ghost.is_(False))
                .order_by(_LOCATION.c.id)):
            places.setdefault(fp, []).append((locator, source))
    managed_ids = sorted({r.managed_certificate_id for r in rows if r.managed_certificate_id is not None})
    managed: dict[int, ManagedCertificate] = {}
    for chunk in _chunks(managed_ids):
        for definition in session.exec(select(ManagedCertificate).where(col(ManagedCertificate.id).in_(chunk))):
            if definition.id is not None:
                managed[definition.id] = definition
    cas = _ca_names(session, {r.fingerprint_sha256: r.issuer_fingerprint for r in rows})
    out = []
    for r in rows:
        fp = r.fingerprint_sha256
        m = managed.get(r.managed_certificate_id) if r.managed_certificate_id is not None else None
        ca_name = cas.get(fp)
        public = policy.is_public(r.issuer, private_ca=ca_name is not None, self_signed=bool(r.self_signed))
        names = [r.issuer]
        if m is not None:
            names.append(m.issuer)
        if ca_name is not None:
            names.append(f"{PRIVATE_CA_BLOCK}/{ca_block_name(ca_name)}")
        eku = set(r.extended_key_usage or ())
        profile = m.profile if m is not None else (
            "tls-client" if not public and "clientAuth" in eku and "serverAuth" not in eku else None)
        in_service = m is not None and m.status == "active"
        renew_before = None
        if in_service and m is not None:
            renew_policy = RenewalPolicy(renew_before=dt.timedelta(days=m.renew_before_days)
                                         if m.renew_before_days is not None else None)
            at, _ = renewal_time(r.not_before, r.not_after, renew_policy, fp, ari_window(m, now))
            renew_before = max(r.not_after - at, dt.timedelta(0))
        tags = {**(m.tags if m is not None else {}), **(r.tags or {})}
        found = sorted(sans.get(fp, []))  # the table keeps no order: sorted, the same on every backend
        seen = places.get(fp, [])
        facts = Facts(
            fingerprint_sha256=fp,
            dns_names=tuple(dict.fromkeys(_dns(v) for k, v in found if k == "DNS")),
            ip_addresses=tuple(v for k, v in found if k == "IP"),
            uris=tuple(v for k, v in found if k == "URI"),
            key_type=r.key_type, key_size=r.key_size, key_curve=r.key_curve,
            signature_algorithm=r.signature_algorithm, not_before=r.not_before, not_after=r.not_after,
            public=public, issuer=r.issuer, issuer_names=tuple(dict.fromkeys(names)), profile=profile,
            owner=r.owner or (m.owner if m is not None else None), tags=tags, managed=in_service,
            is_ca=bool(r.is_ca), sources=tuple(dict.fromkeys(s for _, s in seen)),
            locators=tuple(loc for loc, _ in seen), renew_before=renew_before,
            managed_name=m.name if m is not None else None)
        out.append(_Loaded(facts, r.status == "active" and not r.is_ca))
    return out


def facts_for(session: Session, policy: Policy, fingerprints: Sequence[str] | None = None,
              now: dt.datetime | None = None) -> list[Facts]:
    """What the rules look at, for each certificate of ``fingerprints`` in the inventory (in that order;
    unknown ones are left out), or with None for every active certificate that is not a CA certificate
    (those are not evaluated). Read in batches of 500."""
    return [loaded.facts for loaded in _load(session, policy, fingerprints, now or utcnow())]


def _key_of(algorithm: str) -> tuple[str, int | None, str | None]:
    """(key_type, key_size, key_curve) of a certpilot.keys algorithm name: rsa-2048, ec-p256, ed25519..."""
    name = algorithm.lower()
    if name.startswith("rsa-") and name[4:].isdigit():
        return "RSA", int(name[4:]), None
    curves = {"ec-p256": ("secp256r1", 256), "ec-p384": ("secp384r1", 384), "ec-p521": ("secp521r1", 521)}
    if name in curves:
        return "EC", curves[name][1], curves[name][0]
    if name == "ed25519":
        return "Ed25519", 256, None
    if name == "ed448":
        return "Ed448", 456, None
    return algorithm, None, None


def _public_key_of(key: Any) -> tuple[str, int | None, str | None]:
    """(key_type, key_size, key_curve) as certpilot.x509info names a certificate's key."""
    if isinstance(key, rsa.RSAPublicKey):
        return "RSA", key.key_size, None
    if isinstance(key, ec.EllipticCurvePublicKey):
        return "EC", key.key_size, key.curve.name
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "Ed25519", 256, None
    if isinstance(key, ed448.Ed448PublicKey):
        return "Ed448", 456, None
    if isinstance(key, dsa.DSAPublicKey):
        return "DSA", key.key_size, None
    return type(key).__name__, None, None


def _request_days(managed: ManagedCertificate, now: dt.datetime) -> int:
    """The validity a renewal asks for: the managed certificate's, else its issuer's default (the private
    CA's profile default; an ACME CA's 90 days, within the CA/B Forum maximum in force)."""
    from certpilot.ca import CA_PROFILES, max_validity_days  # certpilot.ca imports much of the core

    if managed.validity_days is not None:
        return managed.validity_days
    if managed.issuer.startswith(PRIVATE_CA_BLOCK + "/"):
        profile = CA_PROFILES.get(managed.profile) or CA_PROFILES["tls-server"]
        return profile.default_days
    return min(ACME_DEFAULT_DAYS, max_validity_days(now))


def request_facts(session: Session, managed: ManagedCertificate, policy: Policy, now: dt.datetime,
                  key_algorithm: str | None = None) -> Facts:
    """What renewing ``managed`` would ask its issuer for: its names, its key (``key_algorithm`` or its
    own), the validity it asks (or its issuer's default) from ``now``, its issuer block (and, for a
    certpilot CA, the issuing certificate's DN; else the DN of the CA that issued its current
    certificate), profile, owner and tags. ``managed`` need not be stored yet (no id: no current
    certificate, nowhere seen)."""
    issuer = managed.issuer
    names = [issuer]
    private_ca = issuer.startswith(PRIVATE_CA_BLOCK + "/")
    if private_ca:
        block = issuer.partition("/")[2]
        for name, issuing_fp in session.execute(sa.select(col(CertificateAuthority.name),
                                                          col(CertificateAuthority.issuing_fingerprint))):
            if ca_block_name(name) == block:
                dn = session.execute(sa.select(_CERTIFICATE.c.subject)
                                     .where(_CERTIFICATE.c.fingerprint_sha256 == issuing_fp)).scalar_one_or_none()
                if dn:
                    names.append(dn)
    locators: list[str] = []
    sources: list[str] = []
    if managed.id is not None:
        current = session.execute(
            sa.select(_CERTIFICATE.c.fingerprint_sha256, _CERTIFICATE.c.issuer)
            .where(_CERTIFICATE.c.managed_certificate_id == managed.id, _CERTIFICATE.c.status == "active")
            .order_by(_CERTIFICATE.c.not_before.desc(), _CERTIFICATE.c.created_at.desc()).limit(1)).first()
        if current is not None:
            if not private_ca:
                names.append(current.issuer)
            for locator, source in session.execute(
                    sa.select(_LOCATION.c.locator, _LOCATION.c.source)
                    .where(_LOCATION.c.certificate_fingerprint == current.fingerprint_sha256,
                           _LOCATION.c.ghost.is_(False)).order_by(_LOCATION.c.id)):
                locators.append(locator)
                sources.append(source)
    key_type, key_size, key_curve = _key_of(key_algorithm or managed.key_algorithm)
    days = _request_days(managed, now)
    return Facts(
        fingerprint_sha256=None,
        dns_names=tuple(dict.fromkeys(_dns(n) for n in managed.dns_names)),
        ip_addresses=tuple(managed.ip_addresses or ()), uris=tuple(managed.uris or ()),
        key_type=key_type, key_size=key_size, key_curve=key_curve, signature_algorithm=None,
        not_before=now, not_after=now + days * _DAY - _SECOND,
        public=policy.is_public(issuer, private_ca=private_ca, self_signed=False),
        issuer=issuer, issuer_names=tuple(dict.fromkeys(names)), profile=managed.profile,
        owner=managed.owner, tags=dict(managed.tags or {}), managed=True,
        sources=tuple(dict.fromkeys(sources)), locators=tuple(locators),
        renew_before=dt.timedelta(days=managed.renew_before_days) if managed.renew_before_days is not None else None,
        managed_name=managed.name)


def csr_facts(csr: x509.CertificateSigningRequest, issuer: str, profile: str, validity_days: int,
              owner: str | None, tags: Mapping[str, str], now: dt.datetime) -> Facts:
    """What signing ``csr`` would issue: its names (DNS, IP, URI) and key, ``validity_days`` from ``now``,
    from ``issuer`` (an issuer block; ``private-ca/...`` is private), under ``profile``. Not managed."""
    try:
        sans = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        sans = x509.SubjectAlternativeName([])
    key_type, key_size, key_curve = _public_key_of(csr.public_key())
    return Facts(
        fingerprint_sha256=None,
        dns_names=tuple(dict.fromkeys(_dns(n) for n in sans.get_values_for_type(x509.DNSName))),
        ip_addresses=tuple(str(ip) for ip in sans.get_values_for_type(x509.IPAddress)),
        uris=tuple(sans.get_values_for_type(x509.UniformResourceIdentifier)),
        key_type=key_type, key_size=key_size, key_curve=key_curve, signature_algorithm=None,
        not_before=now, not_after=now + validity_days * _DAY - _SECOND,
        public=not issuer.startswith(PRIVATE_CA_BLOCK + "/"), issuer=issuer, issuer_names=(issuer,),
        profile=profile, owner=owner, tags=dict(tags), managed=False)


def certificate_labels(session: Session, fingerprints: Sequence[str]) -> dict[str, dict[str, Any]]:
    """What people know each certificate by: {"subject", "sans" (["DNS:x", ...]), "owner" (its own, else
    its managed certificate's)}, for cli.console.short_name and filters."""
    out: dict[str, dict[str, Any]] = {}
    wanted = list(dict.fromkeys(fingerprints))
    c = _CERTIFICATE.c
    for chunk in _chunks(wanted):
        for fp, subject, owner, managed_owner in session.execute(
                sa.select(c.fingerprint_sha256, c.subject, c.owner, _MANAGED.c.owner)
                .select_from(_CERTIFICATE.outerjoin(_MANAGED, _MANAGED.c.id == c.managed_certificate_id))
                .where(c.fingerprint_sha256.in_(chunk))):
            out[fp] = {"subject": subject, "sans": [], "owner": owner or managed_owner}
        for fp, kind, value in session.execute(sa.select(_SAN.c.certificate_fingerprint, _SAN.c.kind, _SAN.c.value)
                                               .where(_SAN.c.certificate_fingerprint.in_(chunk))):
            if fp in out:
                out[fp]["sans"].append(f"{kind}:{value}")
    return out


# ------------------------------------------------------------------------------------------ evaluating

@dataclass(frozen=True)
class EvaluationSummary:
    """What one evaluation found: ``evaluated`` certificates (or places), ``violations`` not waived,
    ``waived`` ones, the violations not waived per rule, and the waivers it found newly expired."""

    evaluated: int
    violations: int
    waived: int
    by_rule: dict[str, int] = field(default_factory=dict)
    expired_waivers: tuple[int, ...] = ()
    errors: tuple[str, ...] = ()  # what could not be evaluated, and why (the rest was)

    def as_dict(self) -> dict[str, Any]:
        return {"evaluated": self.evaluated, "violations": self.violations, "waived": self.waived,
                "by_rule": dict(self.by_rule), "expired_waivers": list(self.expired_waivers),
                "errors": list(self.errors)}


def _as_waiver(row: Any) -> Waiver | None:
    try:
        return Waiver(row.id, row.rule, row.scope, row.reason, row.approver, row.expires_at)
    except PermanentError:  # a stored waiver the engine no longer reads (a rule renamed): applies to nothing
        return None


def _evaluation_waivers(session: Session) -> list[Waiver]:
    """Every waiver not revoked, expired ones included: the engine says which lapsed in the detail."""
    rows = session.execute(sa.select(_WAIVER).where(_WAIVER.c.revoked_at.is_(None)).order_by(_WAIVER.c.id))
    return [w for w in (_as_waiver(r) for r in rows) if w is not None]


def _note_expired(session: Session, actor: audit.Actor, now: dt.datetime) -> tuple[int, ...]:
    """Record (once, audited) the waivers that have expired since an evaluation last looked."""
    w = _WAIVER.c
    rows = session.execute(sa.select(w.id, w.rule, w.scope, w.approver, w.expires_at)
                           .where(w.revoked_at.is_(None), w.expiry_noted_at.is_(None), w.expires_at <= now)
                           .order_by(w.id)).all()
    if not rows:
        return ()
    ids = [r.id for r in rows]
    session.execute(sa.update(PolicyWaiver).where(col(PolicyWaiver.id).in_(ids)).values(expiry_noted_at=now),
                    execution_options=_BULK)
    unwaived = _unwaive(session, ids, {r.rule for r in rows}, now)
    audit.append(session, actor, [audit.Change("policy.waiver_expired", f"policy-waiver:{r.id}", {
        "rule": r.rule, "scope": r.scope, "approver": r.approver, "expires_at": _iso(r.expires_at),
        "violations_unwaived": unwaived.get(r.id, 0)}) for r in rows], now)
    return tuple(ids)


def _unwaive(session: Session, waiver_ids: Sequence[int], rules: set[str], now: dt.datetime) -> dict[int, int]:
    """The stored violations these waivers (expired or revoked) waived are no longer waived, unless another
    waiver in force covers them. Returns how many each of them waived."""
    v = _VIOLATION.c
    counts: dict[int, int] = {waiver_id: n for waiver_id, n in session.execute(
        sa.select(v.waiver_id, sa.func.count()).where(v.waiver_id.in_(list(waiver_ids))).group_by(v.waiver_id))}
    if not counts:
        return {}
    session.execute(sa.update(PolicyViolation).where(col(PolicyViolation.waiver_id).in_(list(waiver_ids)))
                    .values(waiver_id=None), execution_options=_BULK)
    for waiver in active_waivers(session, now):
        if waiver.rule in rules:
            _apply_waiver(session, waiver)
    return counts


def _store(session: Session, found: Sequence[Violation], first_seen: Mapping[tuple[str, str, str], dt.datetime],
           now: dt.datetime) -> tuple[int, int, dict[str, int]]:
    rows: dict[tuple[str, str, str], dict[str, Any]] = {}
    for v in found:
        if v.fingerprint_sha256 is None:
            continue
        key = (v.fingerprint_sha256, v.place, v.rule)
        rows[key] = {"certificate_fingerprint": v.fingerprint_sha256, "place": v.place, "rule": v.rule,
                     "severity": v.severity.value, "detail": v.detail, "waiver_id": v.waiver_id,
                     "first_seen": first_seen.get(key, now), "last_seen": now}
    if rows:
        session.execute(sa.insert(_VIOLATION), list(rows.values()))
    by_rule: dict[str, int] = {}
    waived = 0
    for row in rows.values():
        if row["waiver_id"] is None:
            by_rule[row["rule"]] = by_rule.get(row["rule"], 0) + 1
        else:
            waived += 1
    return sum(by_rule.values()), waived, {rule: by_rule[rule] for rule in RULES if rule in by_rule}


def evaluate_certificates(session: Session, policy: Policy, actor: audit.Actor,
                          fingerprints: Sequence[str] | None = None,
                          now: dt.datetime | None = None) -> EvaluationSummary:
    """Evaluate the certificate rules of ``policy`` for ``fingerprints`` (None: the whole inventory) and
    store what they find, replacing those certificates' rows (place ""): a violation that persists keeps
    its first_seen, a fixed one is dropped. Certificates that are not active, and CA certificates, are not
    evaluated (their certificate rows are dropped). Waivers that expired since the last evaluation are
    recorded and audited once."""
    now = now or utcnow()
    return _evaluate_loaded(session, policy, actor, fingerprints, _load(session, policy, fingerprints, now), now)


def own_and_evaluate(session: Session, policy: Policy, actor: audit.Actor, fingerprints: Sequence[str] | None = None,
                     now: dt.datetime | None = None, *, ownership: bool = True) -> tuple[int, EvaluationSummary]:
    """``apply_ownership`` (unless ``ownership`` is false) then ``evaluate_certificates``, reading the
    certificates once (the rules see the owners just assigned). Returns the owners assigned and the summary."""
    now = now or utcnow()
    loaded = _load(session, policy, fingerprints, now)
    owners, loaded = _assign_owners(session, policy, actor, loaded, now) if ownership else (0, loaded)
    return owners, _evaluate_loaded(session, policy, actor, fingerprints, loaded, now)


def _evaluate_loaded(session: Session, policy: Policy, actor: audit.Actor, fingerprints: Sequence[str] | None,
                     everything: list[_Loaded], now: dt.datetime) -> EvaluationSummary:
    expired = _note_expired(session, actor, now)
    waivers = _evaluation_waivers(session)
    loaded = [item for item in everything if item.evaluated]
    v = _VIOLATION.c
    first_seen: dict[tuple[str, str, str], dt.datetime] = {}
    if fingerprints is None:
        for fp, rule, seen in session.execute(sa.select(v.certificate_fingerprint, v.rule, v.first_seen)
                                              .where(v.place == "")):
            first_seen[(fp, "", rule)] = seen
        session.execute(sa.delete(PolicyViolation).where(col(PolicyViolation.place) == ""), execution_options=_BULK)
    else:
        for chunk in _chunks(list(dict.fromkeys(fingerprints))):
            for fp, rule, seen in session.execute(sa.select(v.certificate_fingerprint, v.rule, v.first_seen)
                                                  .where(v.place == "", v.certificate_fingerprint.in_(chunk))):
                first_seen[(fp, "", rule)] = seen
            session.execute(sa.delete(PolicyViolation).where(col(PolicyViolation.place) == "",
                                                             col(PolicyViolation.certificate_fingerprint).in_(chunk)),
                            execution_options=_BULK)
    found: list[Violation] = []
    errors: list[str] = []
    for item in loaded:
        try:
            found += policy.evaluate(item.facts, now, waivers)
        except (CertpilotError, ValueError, TypeError, ArithmeticError) as exc:  # one certificate, not the batch
            errors.append(f"certificate {item.facts.fingerprint_sha256}: {redact(exc)}")
    unwaived, waived, by_rule = _store(session, found, first_seen, now)
    return EvaluationSummary(len(loaded) - len(errors), unwaived, waived, by_rule, expired, tuple(errors))


def evaluate_endpoints(session: Session, policy: Policy, endpoints: Sequence[EndpointFacts], actor: audit.Actor,
                       now: dt.datetime | None = None) -> EvaluationSummary:
    """Evaluate the endpoint rules of ``policy`` at each place of ``endpoints`` (what discovery or
    monitoring saw there) and store what they find, replacing every row of those places (whichever
    certificate they were about): a violation that persists keeps its first_seen."""
    now = now or utcnow()
    expired = _note_expired(session, actor, now)
    waivers = _evaluation_waivers(session)
    latest = {e.place: e for e in endpoints if e.certificate.fingerprint_sha256 is not None}
    places = sorted(latest)
    v = _VIOLATION.c
    first_seen: dict[tuple[str, str, str], dt.datetime] = {}
    for chunk in _chunks(places):
        for fp, place, rule, seen in session.execute(sa.select(v.certificate_fingerprint, v.place, v.rule,
                                                               v.first_seen).where(v.place.in_(chunk))):
            first_seen[(fp, place, rule)] = seen
        session.execute(sa.delete(PolicyViolation).where(col(PolicyViolation.place).in_(chunk)),
                        execution_options=_BULK)
    found: list[Violation] = []
    errors: list[str] = []
    for e in latest.values():
        try:
            found += policy.evaluate_endpoint(e, now, waivers)
        except (CertpilotError, ValueError, TypeError, ArithmeticError) as exc:  # one place, not the batch
            errors.append(f"{e.place}: {redact(exc)}")
    unwaived, waived, by_rule = _store(session, found, first_seen, now)
    return EvaluationSummary(len(places) - len(errors), unwaived, waived, by_rule, expired, tuple(errors))


def forget_places(session: Session, seen: Sequence[tuple[str, str]]) -> int:
    """Drop the endpoint violations of each (certificate fingerprint, place) in ``seen`` where no source
    finds that certificate any more (its locations there are ghosts): what was wrong there is history.
    Returns how many rows were dropped."""
    dropped = 0
    by_place: dict[str, set[str]] = {}
    for fp, place in seen:
        by_place.setdefault(place, set()).add(fp)
    for chunk in _chunks(sorted(by_place)):
        still = {(fp, place) for fp, place in session.execute(  # another source still sees it there
            sa.select(_LOCATION.c.certificate_fingerprint, _LOCATION.c.locator)
            .where(_LOCATION.c.locator.in_(chunk), _LOCATION.c.ghost.is_(False)))}
        rows = session.execute(sa.select(_VIOLATION.c.id, _VIOLATION.c.certificate_fingerprint, _VIOLATION.c.place)
                               .where(_VIOLATION.c.place.in_(chunk))).all()
        ids = [row.id for row in rows if row.certificate_fingerprint in by_place[row.place]
               and (row.certificate_fingerprint, row.place) not in still]
        for part in _chunks(ids):
            session.execute(sa.delete(PolicyViolation).where(col(PolicyViolation.id).in_(part)),
                            execution_options=_BULK)
        dropped += len(ids)
    return dropped


def gate(session: Session, policy: Policy, facts: Facts, what: str, now: dt.datetime | None = None) -> None:
    """The issuance gate: PolicyViolationError(what, ...) naming every request rule ``facts`` (a request
    for a certificate) breaks that no waiver in force covers. Nothing is written."""
    now = now or utcnow()
    refused = [v for v in policy.evaluate_request(facts, now, active_waivers(session, now)) if v.waiver_id is None]
    if refused:
        raise PolicyViolationError(what, refused)


def stored_violations(session: Session, fingerprints: Sequence[str] | None = None, *,
                      include_waived: bool = True) -> dict[str, list[Violation]]:
    """The violations stored for each certificate (None: every one), certificate rules and the endpoint
    rules of the places serving it, most severe first."""
    v = _VIOLATION.c
    query = sa.select(v.certificate_fingerprint, v.rule, v.severity, v.detail, v.place, v.waiver_id)
    if not include_waived:
        query = query.where(v.waiver_id.is_(None))
    rows: list[Any] = []
    if fingerprints is None:
        rows = list(session.execute(query))
    else:
        for chunk in _chunks(list(dict.fromkeys(fingerprints))):
            rows += session.execute(query.where(v.certificate_fingerprint.in_(chunk))).all()
    out: dict[str, list[Violation]] = {}
    for row in rows:
        out.setdefault(row.certificate_fingerprint, []).append(Violation(
            row.rule, Severity(row.severity), row.detail, row.certificate_fingerprint, row.place, row.waiver_id))
    for found in out.values():
        found.sort(key=lambda x: (x.waiver_id is not None, -x.severity.rank(), x.rule, x.place))
    return out


def open_counts_by_rule(session: Session) -> dict[str, int]:
    """The stored violations not waived, per rule (every rule id present, 0 for none): the metrics' gauge."""
    v = _VIOLATION.c
    counts: dict[str, int] = {rule: n for rule, n in session.execute(
        sa.select(v.rule, sa.func.count()).where(v.waiver_id.is_(None)).group_by(v.rule))}
    return {rule: int(counts.get(rule, 0)) for rule in RULES}


# ------------------------------------------------------------------------------------------ waivers

def _iso(value: dt.datetime | None) -> str | None:
    return None if value is None else value.astimezone(dt.timezone.utc).isoformat().replace("+00:00", "Z")


def _covered_rows(session: Session, waiver: Waiver) -> list[int]:
    """The stored violations of the waiver's rule, not waived, that it covers (ids)."""
    v = _VIOLATION.c
    rows = session.execute(sa.select(v.id, v.certificate_fingerprint, v.place, v.rule, v.severity, v.detail)
                           .where(v.rule == waiver.rule, v.waiver_id.is_(None))).all()
    if not rows:
        return []
    facts = {f.fingerprint_sha256: f for f in facts_for(session, DEFAULT_POLICY,
                                                        sorted({r.certificate_fingerprint for r in rows}))}
    ids = []
    for r in rows:
        f = facts.get(r.certificate_fingerprint)
        if f is not None and waiver.covers(Violation(r.rule, Severity(r.severity), r.detail,
                                                     r.certificate_fingerprint, r.place), f):
            ids.append(r.id)
    return ids


def _apply_waiver(session: Session, waiver: Waiver) -> int:
    """Mark the stored violations ``waiver`` covers (not waived yet) as waived by it; returns how many."""
    covered = _covered_rows(session, waiver)
    for chunk in _chunks(covered):
        session.execute(sa.update(PolicyViolation).where(col(PolicyViolation.id).in_(chunk))
                        .values(waiver_id=waiver.id), execution_options=_BULK)
    return len(covered)


def grant_waiver(session: Session, rule: str, scope: str, reason: str, approver: str, expires_at: dt.datetime,
                 actor: audit.Actor, now: dt.datetime | None = None) -> PolicyWaiver:
    """An exception to ``rule`` for what ``scope`` names (certpilot.policy.parse_waiver_scope), approved by
    ``approver`` for ``reason`` until ``expires_at`` (in the future). Audited (policy.waiver_granted); the
    stored violations it covers are marked waived at once. InvalidOptionError naming what is wrong."""
    now = now or utcnow()
    if rule not in RULES:
        raise InvalidOptionError("RULE", rule, "one of " + ", ".join(RULES))
    try:
        parse_waiver_scope(scope)
    except PermanentError as exc:
        raise InvalidOptionError("--scope", scope, "a waiver scope: " + str(exc).split(": ", 1)[-1]) from None
    if not reason.strip():
        raise InvalidOptionError("--reason", reason, "a non-empty reason")
    if not approver.strip():
        raise InvalidOptionError("--approver", approver, "the name of who approved it")
    if expires_at.tzinfo is None:
        raise ValueError("waivers need aware UTC datetimes")
    if expires_at <= now:
        raise InvalidOptionError("--expires", _iso(expires_at), "in the future")
    row = PolicyWaiver(rule=rule, scope=scope.strip(), reason=reason.strip(), approver=approver.strip(),
                       expires_at=expires_at, created_by=actor.name, created_at=now)
    session.add(row)
    session.flush()
    assert row.id is not None
    covered = _apply_waiver(session, Waiver(row.id, row.rule, row.scope, row.reason, row.approver, row.expires_at))
    audit.append(session, actor, [audit.Change("policy.waiver_granted", f"policy-waiver:{row.id}", {
        "rule": row.rule, "scope": row.scope, "reason": row.reason, "approver": row.approver,
        "expires_at": _iso(row.expires_at), "violations_waived": covered})], now)
    return row


def revoke_waiver(session: Session, waiver_id: int, actor: audit.Actor, now: dt.datetime | None = None) -> PolicyWaiver:
    """End waiver ``waiver_id`` now (audited, policy.waiver_revoked): the violations it waived are no longer
    waived. Revoking one already revoked changes nothing. NotFoundError when there is no such waiver."""
    now = now or utcnow()
    row = session.get(PolicyWaiver, waiver_id)
    if row is None:
        raise NotFoundError(f"no policy waiver with id {waiver_id}")
    if row.revoked_at is not None:
        return row
    row.revoked_at, row.revoked_by = now, actor.name
    session.add(row)
    session.flush()
    unwaived = _unwaive(session, [waiver_id], {row.rule}, now)
    audit.append(session, actor, [audit.Change("policy.waiver_revoked", f"policy-waiver:{row.id}", {
        "rule": row.rule, "scope": row.scope, "expires_at": _iso(row.expires_at),
        "violations_unwaived": unwaived.get(waiver_id, 0)})], now)
    return row


def list_waivers(session: Session, *, include_inactive: bool = False,
                 now: dt.datetime | None = None) -> list[PolicyWaiver]:
    """Waivers in force at ``now`` (with ``include_inactive``, the expired and revoked ones too), by id."""
    now = now or utcnow()
    query = select(PolicyWaiver)
    if not include_inactive:
        query = query.where(col(PolicyWaiver.revoked_at).is_(None), col(PolicyWaiver.expires_at) > now)
    return list(session.exec(query.order_by(col(PolicyWaiver.id))).all())


def active_waivers(session: Session, now: dt.datetime) -> list[Waiver]:
    """The waivers in force at ``now``, as the engine takes them."""
    return [w for w in (_as_waiver(r) for r in list_waivers(session, now=now)) if w is not None]


# ------------------------------------------------------------------------------------------ ownership

def apply_ownership(session: Session, policy: Policy, actor: audit.Actor, fingerprints: Sequence[str] | None = None,
                    now: dt.datetime | None = None) -> int:
    """Give each certificate of ``fingerprints`` (None: every active certificate) that has no owner, its
    own or its managed certificate's, the owner of the first ownership rule of ``policy`` that matches
    it. CA certificates and inactive ones are left alone; an owner is never replaced. One audit event
    (certificate.owner_assigned) lists the fingerprints given to each owner. Returns how many were."""
    if not policy.ownership:
        return 0
    now = now or utcnow()
    return _assign_owners(session, policy, actor, _load(session, policy, fingerprints, now), now)[0]


def _assign_owners(session: Session, policy: Policy, actor: audit.Actor, loaded: list[_Loaded],
                   now: dt.datetime) -> tuple[int, list[_Loaded]]:
    """apply_ownership on certificates read already; returns the count and ``loaded`` with the owners given."""
    if not policy.ownership:
        return 0, loaded
    assigned: dict[str, list[str]] = {}
    given: dict[str, str] = {}
    for item in loaded:
        f = item.facts
        if not item.evaluated or f.owner or f.fingerprint_sha256 is None:
            continue
        owner = policy.owner_for(f)
        if owner:
            assigned.setdefault(owner, []).append(f.fingerprint_sha256)
            given[f.fingerprint_sha256] = owner
    count = 0
    for owner, fps in assigned.items():
        for chunk in _chunks(fps):
            result = session.execute(sa.update(Certificate).where(col(Certificate.fingerprint_sha256).in_(chunk),
                                                                  col(Certificate.owner).is_(None))
                                     .values(owner=owner), execution_options=_BULK)
            count += int(getattr(result, "rowcount", 0) or 0)
    if assigned:
        audit.append(session, actor, [audit.Change("certificate.owner_assigned", f"policy:{policy.source}", {
            "policy_sha256": policy.sha256, "owners": {owner: sorted(fps) for owner, fps in sorted(assigned.items())},
            "certificates": sum(len(fps) for fps in assigned.values())})], now)
    return count, [_Loaded(replace(item.facts, owner=given[fp]), item.evaluated)
                   if (fp := item.facts.fingerprint_sha256) is not None and fp in given else item for item in loaded]
