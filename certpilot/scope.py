"""The scope of a revocation campaign: which certificates, and what can be done about each.

A ``Scope`` is a set of criteria (managed certificate names, fingerprints, serial numbers, an issuer, a
public key, a DNS name or domain suffix, an owner or tag). Every criterion given must match (AND); a list
matches when any of its items does (OR). ``Scope.parse`` reads the CLI's ``--scope key=value`` items;
the constructor checks and normalises whatever it is given (a flow's parameters, a parsed item), so two
scopes that mean the same have the same ``key()``.

``resolve`` finds the certificates in scope with SQL over the inventory's indexes (fingerprint, serial,
issuer link, SPKI, SAN value, owner), never reading the whole table, and says for each what a
revoke-and-replace would do (``Action``) and why:

- REPLACE: the current certificate of an active managed certificate, still valid (revoked already or
  not: its replacement is what matters), its issuer block available;
- REVOKE: a certificate of a managed certificate that is no longer current (superseded, or its managed
  certificate retired) and still valid: revoke only, through the managed certificate's issuer;
- CANNOT: unmanaged (nothing can reissue or revoke it until it is adopted: ``why`` gives the command),
  or its issuer block is not available;
- NOTHING: expired, or revoked already and not current.

An issuer is a private CA's name, an issuer block name (``private-ca/corp``: the certificates of the
managed certificates that use it), the SHA-256 fingerprint of the issuing CA certificate, or its subject
DN. A public key is the SHA-256 of a SubjectPublicKeyInfo, or the fingerprint of a certificate whose key
it is. Names the operator typed that match nothing (a managed name, a fingerprint, a serial, an issuer, a
public key) are refused with NotFoundError naming them: in an emergency a typo must not pass for an
empty scope.

No Prefect, no network here.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col

from certpilot import inventory
from certpilot.ca import reason_name
from certpilot import names as name_rules
from certpilot.clock import utcnow
from certpilot.errors import InvalidNameError, NotFoundError, PermanentError
from certpilot.models import Certificate, CertificateAuthority, Location, ManagedCertificate, SubjectAltName, Target
from certpilot.x509info import serial_hex

__all__ = ["Action", "InScope", "LocationView", "Scope", "TargetView", "resolve"]

_CHUNK = 500
_HEX = frozenset("0123456789abcdef")
MIN_PREFIX = 8  # hex digits of a fingerprint prefix
SCOPE_KEYS = {"name": "names", "fingerprint": "fingerprints", "serial": "serials", "issuer": "issuer",
              "public-key": "public_key", "dns": "dns_name", "suffix": "domain_suffix", "owner": "owner",
              "tag": "tag"}
_LISTS = ("names", "fingerprints", "serials")


# ------------------------------------------------------------------------------------------------ scope

def _hex(value: str, what: str, *, minimum: int, maximum: int) -> str:
    text = value.strip().lower().replace(":", "").replace(" ", "")
    if not minimum <= len(text) <= maximum or not set(text) <= _HEX:
        raise PermanentError(f"{what} {value!r} is not {minimum} to {maximum} hex digits (colons allowed)")
    return text


def _fingerprint(value: str) -> str:
    return _hex(value, "fingerprint", minimum=MIN_PREFIX, maximum=64)


def _serial(value: str) -> str:
    text = value.strip().lower().replace(":", "").replace(" ", "")
    negative = text.startswith("-")
    text = text.removeprefix("-").removeprefix("0x")
    if not text or len(text) > 128 or not set(text) <= _HEX:
        raise PermanentError(f"serial {value!r} is not a hex serial number (colons allowed)")
    return serial_hex(-int(text, 16) if negative else int(text, 16))


def _dns(value: str) -> str:
    if name_rules.is_ip_address(value.strip()):
        return name_rules.normalise_ip_address(value)
    try:
        return name_rules.normalise_dns_name(value, wildcard=True)
    except InvalidNameError as exc:
        raise PermanentError(f"dns {value!r}: {exc}") from None


def _suffix(value: str) -> str:
    text = value.strip()
    text = text[2:] if text.startswith("*.") else text.lstrip(".")
    try:
        return name_rules.normalise_dns_name(text)
    except InvalidNameError as exc:
        raise PermanentError(f"suffix {value!r}: {exc}") from None


def _tag(value: str) -> str:
    key, eq, tag_value = value.strip().partition("=")
    if not key.strip():
        raise PermanentError(f"tag {value!r} names no key: give key=value or key")
    return f"{key.strip()}={tag_value.strip()}" if eq else key.strip()


def _text(value: str | None, what: str) -> str | None:
    if value is None:
        return None
    text = value.strip()
    if not text:
        raise PermanentError(f"{what} is empty")
    return text


def _items(values: Iterable[str] | str | None) -> list[str]:
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    return [v for value in values for v in (p.strip() for p in value.split(",")) if v]


@dataclass(frozen=True)
class Scope:
    """Which certificates a campaign is about. Every criterion given must match (AND); a list matches when
    any of its items does (OR). Values are checked and normalised on construction (PermanentError)."""

    names: tuple[str, ...] = ()          # managed certificate names
    fingerprints: tuple[str, ...] = ()   # SHA-256 hex, or unique prefixes (>= 8 hex)
    serials: tuple[str, ...] = ()        # hex serial numbers (any case, colons allowed)
    issuer: str | None = None            # a private CA name, an issuer block name, the issuing CA certificate's
                                         # SHA-256 fingerprint, or its subject DN
    public_key: str | None = None        # SPKI SHA-256 hex, or the fingerprint of a certificate whose key it is
    dns_name: str | None = None          # exact SAN (IDN-normalised with certpilot.names)
    domain_suffix: str | None = None     # e.g. example.com: the name itself and everything under it
    owner: str | None = None
    tag: str | None = None               # "key=value" or "key"

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "names", tuple(sorted(dict.fromkeys(_items(self.names)))))
        set_(self, "fingerprints", tuple(sorted(dict.fromkeys(_fingerprint(v) for v in _items(self.fingerprints)))))
        set_(self, "serials", tuple(sorted(dict.fromkeys(_serial(v) for v in _items(self.serials)))))
        set_(self, "issuer", _text(self.issuer, "issuer") if self.issuer else None)
        set_(self, "public_key", _hex(self.public_key, "public key", minimum=MIN_PREFIX, maximum=64)
             if self.public_key else None)
        set_(self, "dns_name", _dns(self.dns_name) if self.dns_name else None)
        set_(self, "domain_suffix", _suffix(self.domain_suffix) if self.domain_suffix else None)
        set_(self, "owner", _text(self.owner, "owner") if self.owner else None)
        set_(self, "tag", _tag(self.tag) if self.tag else None)

    def is_empty(self) -> bool:
        return not any(getattr(self, f.name) for f in fields(self))

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def key(self) -> str:
        """A stable SHA-256 hex of the canonical JSON: the same scope, however written, has the same key."""
        canonical = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def describe(self) -> str:
        """One line: the criteria given, as ``--scope`` items."""
        keys = {v: k for k, v in SCOPE_KEYS.items()}
        parts = []
        for f in fields(self):
            value = getattr(self, f.name)
            if value:
                parts.append(f"{keys[f.name]}={','.join(value) if isinstance(value, tuple) else value}")
        return " ".join(parts) or "(empty)"

    @classmethod
    def parse(cls, items: Sequence[str]) -> Scope:
        """CLI items ``key=value`` (keys: name, fingerprint, serial, issuer, public-key, dns, suffix, owner,
        tag); name, fingerprint and serial may repeat or take comma-separated lists; the others once."""
        values: dict[str, Any] = {}
        for item in items:
            key, eq, value = item.partition("=")
            key = key.strip().lower().replace("_", "-")
            if not eq or key not in SCOPE_KEYS:
                raise PermanentError(f"--scope {item!r}: give key=value with key one of {', '.join(SCOPE_KEYS)}")
            if not value.strip():
                raise PermanentError(f"--scope {item!r}: {key} has no value")
            field_name = SCOPE_KEYS[key]
            if field_name in _LISTS:
                values.setdefault(field_name, []).extend(_items(value))
            elif field_name in values:
                raise PermanentError(f"--scope {key} given twice ({values[field_name]!r} and {value.strip()!r}): "
                                     "it takes one value")
            else:
                values[field_name] = value.strip()
        given: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        return cls(**given)


# ---------------------------------------------------------------------------------------------- results

class Action(StrEnum):
    REPLACE = "replace"        # the current certificate of a managed certificate: reissue, deploy, verify, revoke
    REVOKE = "revoke"          # not current (superseded, or its managed certificate retired) but valid: revoke only
    CANNOT = "cannot"          # unmanaged or no issuer that can revoke/reissue it: ``why`` says, and how to adopt it
    NOTHING = "nothing"        # already revoked and not current, or expired


_ORDER = {Action.REPLACE: 0, Action.REVOKE: 1, Action.CANNOT: 2, Action.NOTHING: 3}


@dataclass(frozen=True)
class TargetView:
    name: str
    kind: str
    desired: str | None
    verified: str | None


@dataclass(frozen=True)
class LocationView:
    locator: str
    source: str
    last_seen: dt.datetime
    ghost: bool


@dataclass(frozen=True)
class InScope:
    fingerprint_sha256: str
    subject: str
    serial_hex: str
    issuer_dn: str
    issuer: str | None              # the issuer block that can reissue and revoke it (its managed certificate's)
    status: str                     # active, superseded, revoked, expired (effective at the time of resolving)
    not_after: dt.datetime
    managed: str | None
    current: bool
    owner: str | None
    tags: dict[str, str]
    dns_names: tuple[str, ...]
    spki_sha256: str
    targets: tuple[TargetView, ...]
    locations: tuple[LocationView, ...]
    action: Action
    why: str

    @property
    def label(self) -> str:
        """How people know it: the managed certificate's name, else its first DNS name, else its subject."""
        return self.managed or (self.dns_names[0] if self.dns_names else self.subject)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["not_after"] = inventory.iso(self.not_after)
        out["action"] = self.action.value
        out["dns_names"] = list(self.dns_names)
        out["targets"] = [asdict(t) for t in self.targets]
        out["locations"] = [{**asdict(loc), "last_seen": inventory.iso(loc.last_seen)} for loc in self.locations]
        return out


# --------------------------------------------------------------------------------------------- resolving

def _chunks(items: Sequence[Any]) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start:start + _CHUNK]


def _names_clause(session: Session, names: Sequence[str]) -> sa.ColumnElement[bool]:
    m = ManagedCertificate
    found = dict(session.execute(sa.select(col(m.name), col(m.id)).where(col(m.name).in_(names))).tuples().all())
    unknown = [n for n in names if n not in found]
    if unknown:
        raise NotFoundError(f"no managed certificate named {', '.join(map(repr, unknown))}")
    return col(Certificate.managed_certificate_id).in_(list(found.values()))


def _certificate(session: Session, fingerprint: str) -> tuple[str, str, str | None, str | None]:
    """(fingerprint, subject, SKI, SPKI) of the certificate with this fingerprint or unique prefix: a whole one
    by its primary key, a prefix by certpilot.inventory.resolve (NotFoundError, AmbiguousError)."""
    c = Certificate
    if len(fingerprint) == 64:
        row = session.execute(sa.select(col(c.fingerprint_sha256), col(c.subject), col(c.subject_key_id),
                                        col(c.spki_sha256)).where(col(c.fingerprint_sha256) == fingerprint)).first()
        if row is None:
            raise NotFoundError(f"no certificate with fingerprint {fingerprint!r} in the inventory")
        return row[0], row[1], row[2], row[3]
    found = inventory.resolve(session, fingerprint)
    return found.fingerprint_sha256, found.subject, found.subject_key_id, found.spki_sha256


def _fingerprints_clause(session: Session, fingerprints: Sequence[str]) -> sa.ColumnElement[bool]:
    full = [_certificate(session, fp)[0] for fp in fingerprints]
    return col(Certificate.fingerprint_sha256).in_(full)


def _serials_clause(session: Session, serials: Sequence[str]) -> sa.ColumnElement[bool]:
    known = set(session.execute(sa.select(col(Certificate.serial_hex)).where(col(Certificate.serial_hex).in_(serials))
                                .distinct()).scalars())
    unknown = [s for s in serials if s not in known]
    if unknown:
        raise NotFoundError(f"no certificate with serial {', '.join(unknown)} in the inventory")
    return col(Certificate.serial_hex).in_(serials)


def _issued_by(ca_rows: Sequence[tuple[str, str, str | None]]) -> sa.ColumnElement[bool]:
    """Certificates issued by these CA certificates (fingerprint, subject, SKI): linked to one, or not linked
    to any issuer but naming its subject (and its key identifier, where both carry one)."""
    c = Certificate
    clauses: list[sa.ColumnElement[bool]] = [col(c.issuer_fingerprint).in_([fp for fp, _, _ in ca_rows])]
    for fp, subject, ski in ca_rows:
        unlinked = sa.and_(col(c.issuer_fingerprint).is_(None), col(c.issuer) == subject,
                           col(c.fingerprint_sha256) != fp)
        if ski:
            unlinked = sa.and_(unlinked, sa.or_(col(c.authority_key_id).is_(None), col(c.authority_key_id) == ski))
        clauses.append(unlinked)
    return sa.or_(*clauses)


def _ca_rows(session: Session, condition: sa.ColumnElement[bool]) -> list[tuple[str, str, str | None]]:
    c = Certificate
    return [(fp, subject, ski) for fp, subject, ski in session.execute(
        sa.select(col(c.fingerprint_sha256), col(c.subject), col(c.subject_key_id)).where(condition)).all()]


def _issuer_clause(session: Session, issuer: str) -> sa.ColumnElement[bool]:
    c = Certificate
    authority = session.execute(sa.select(col(CertificateAuthority.issuing_fingerprint))
                                .where(col(CertificateAuthority.name) == issuer)).scalar_one_or_none()
    if authority is not None:  # a private CA of certpilot's: what its issuing CA signed
        return _issued_by(_ca_rows(session, col(c.fingerprint_sha256) == authority))
    m = ManagedCertificate
    if session.execute(sa.select(col(m.id)).where(col(m.issuer) == issuer).limit(1)).first() is not None:
        return col(c.managed_certificate_id).in_(sa.select(col(m.id)).where(col(m.issuer) == issuer))
    digits = issuer.lower().replace(":", "")
    if MIN_PREFIX <= len(digits) <= 64 and set(digits) <= _HEX:  # the issuing CA certificate's fingerprint
        fp, subject, ski, _ = _certificate(session, digits)
        return _issued_by([(fp, subject, ski)])
    rows = _ca_rows(session, sa.and_(col(c.subject) == issuer, col(c.is_ca).is_(True)))
    if rows:
        return _issued_by(rows)
    if session.execute(sa.select(col(c.fingerprint_sha256)).where(col(c.issuer) == issuer).limit(1)).first():
        return col(c.issuer) == issuer  # an issuer DN whose CA certificate the inventory does not hold
    raise NotFoundError(f"issuer {issuer!r} is neither a private CA, an issuer block used by a managed "
                        "certificate, a CA certificate's fingerprint, nor the issuer DN of any certificate")


def _public_key_clause(session: Session, public_key: str) -> sa.ColumnElement[bool]:
    c = Certificate
    spkis: set[str] = set()
    if len(public_key) == 64 and session.execute(
            sa.select(col(c.fingerprint_sha256)).where(col(c.spki_sha256) == public_key).limit(1)).first():
        spkis.add(public_key)
    try:
        holder_spki = _certificate(session, public_key)[3]
    except NotFoundError:
        if not spkis:
            raise NotFoundError(f"public key {public_key!r}: no certificate in the inventory carries a public key "
                                "with this SHA-256, nor has this fingerprint") from None
    else:
        if holder_spki:
            spkis.add(holder_spki)
    return col(c.spki_sha256).in_(sorted(spkis))


def _san_clause(kinds: Sequence[str], match: sa.ColumnElement[bool]) -> sa.ColumnElement[bool]:
    san = SubjectAltName
    return col(Certificate.fingerprint_sha256).in_(
        sa.select(col(san.certificate_fingerprint)).where(col(san.kind).in_(kinds), match))


def _owner_clause(owner: str) -> sa.ColumnElement[bool]:
    """The certificate's owner, else its managed certificate's (as monitoring and alerts see it)."""
    c, m = Certificate, ManagedCertificate
    return sa.or_(col(c.owner) == owner,
                  sa.and_(col(c.owner).is_(None),
                          col(c.managed_certificate_id).in_(sa.select(col(m.id)).where(col(m.owner) == owner))))


def _tag_clause(tag: str) -> sa.ColumnElement[bool]:
    """The certificate's tag, else its managed certificate's (the certificate's own wins)."""
    key, eq, value = tag.partition("=")
    c, m = Certificate, ManagedCertificate
    own = col(c.tags)[key].as_string()
    inherited = col(m.tags)[key].as_string()
    own_match = own == value if eq else own.is_not(None)
    inherited_match = inherited == value if eq else inherited.is_not(None)
    return sa.or_(own_match, sa.and_(own.is_(None), col(c.managed_certificate_id).in_(
        sa.select(col(m.id)).where(inherited_match))))


def where(session: Session, scope: Scope) -> list[sa.ColumnElement[bool]]:
    """The SQL conditions on Certificate for ``scope`` (all must hold). Raises PermanentError for an empty
    scope and NotFoundError for a name, fingerprint, serial, issuer or public key that matches nothing."""
    if scope.is_empty():
        raise PermanentError("the scope is empty: name at least one criterion (names, fingerprints, serials, "
                             "issuer, public key, DNS name, domain suffix, owner or tag)")
    clauses: list[sa.ColumnElement[bool]] = []
    if scope.names:
        clauses.append(_names_clause(session, scope.names))
    if scope.fingerprints:
        clauses.append(_fingerprints_clause(session, scope.fingerprints))
    if scope.serials:
        clauses.append(_serials_clause(session, scope.serials))
    if scope.issuer:
        clauses.append(_issuer_clause(session, scope.issuer))
    if scope.public_key:
        clauses.append(_public_key_clause(session, scope.public_key))
    if scope.dns_name:
        kinds = ["IP"] if name_rules.is_ip_address(scope.dns_name) else ["DNS"]
        clauses.append(_san_clause(kinds, col(SubjectAltName.value) == scope.dns_name))
    if scope.domain_suffix:
        value = col(SubjectAltName.value)
        clauses.append(_san_clause(["DNS"], sa.or_(value == scope.domain_suffix,
                                                   value.endswith("." + scope.domain_suffix, autoescape=True))))
    if scope.owner:
        clauses.append(_owner_clause(scope.owner))
    if scope.tag:
        clauses.append(_tag_clause(scope.tag))
    return clauses


@dataclass(frozen=True)
class _Managed:
    id: int
    name: str
    issuer: str
    status: str
    owner: str | None
    tags: Mapping[str, str]


def _managed_rows(session: Session, ids: Sequence[int]) -> dict[int, _Managed]:
    m = ManagedCertificate
    out = {}
    for chunk in _chunks(ids):
        for row in session.execute(sa.select(col(m.id), col(m.name), col(m.issuer), col(m.status), col(m.owner),
                                             col(m.tags)).where(col(m.id).in_(chunk))):
            out[row[0]] = _Managed(row[0], row[1], row[2], row[3], row[4], dict(row[5] or {}))
    return out


def _current(session: Session, ids: Sequence[int]) -> dict[int, str]:
    """The current certificate of each managed certificate: its newest that is not superseded (one that was
    revoked while current stays current until a replacement is recorded)."""
    c = Certificate
    out: dict[int, tuple[Any, str]] = {}
    for chunk in _chunks(ids):
        for managed_id, fp, not_before, created_at in session.execute(
                sa.select(col(c.managed_certificate_id), col(c.fingerprint_sha256), col(c.not_before),
                          col(c.created_at))
                .where(col(c.managed_certificate_id).in_(chunk), col(c.status).in_(("active", "revoked")))):
            order = (not_before, created_at, fp)
            if managed_id not in out or order > out[managed_id][0]:
                out[managed_id] = (order, fp)
    return {k: fp for k, (_, fp) in out.items()}


def _targets(session: Session, ids: Sequence[int]) -> dict[int, list[TargetView]]:
    t = Target
    out: dict[int, list[TargetView]] = {}
    for chunk in _chunks(ids):
        for managed_id, name, kind, desired, verified in session.execute(
                sa.select(col(t.managed_certificate_id), col(t.name), col(t.kind), col(t.desired_fingerprint),
                          col(t.verified_fingerprint)).where(col(t.managed_certificate_id).in_(chunk))
                .order_by(col(t.name))):
            out.setdefault(managed_id, []).append(TargetView(name, kind, desired, verified))
    return out


def _locations(session: Session, fps: Sequence[str]) -> dict[str, list[LocationView]]:
    loc = Location
    out: dict[str, list[LocationView]] = {}
    for chunk in _chunks(fps):
        for fp, locator, source, last_seen, ghost in session.execute(
                sa.select(col(loc.certificate_fingerprint), col(loc.locator), col(loc.source), col(loc.last_seen),
                          col(loc.ghost)).where(col(loc.certificate_fingerprint).in_(chunk))
                .order_by(col(loc.locator))):
            out.setdefault(fp, []).append(LocationView(locator, source, last_seen, bool(ghost)))
    return out


def _dns_names(session: Session, fps: Sequence[str]) -> dict[str, list[str]]:
    san = SubjectAltName
    out: dict[str, list[str]] = {}
    for chunk in _chunks(fps):
        for fp, value in session.execute(
                sa.select(col(san.certificate_fingerprint), col(san.value))
                .where(col(san.certificate_fingerprint).in_(chunk), col(san.kind) == "DNS").order_by(col(san.value))):
            out.setdefault(fp, []).append(value)
    return out


def _day(value: dt.datetime | None) -> str:
    return "?" if value is None else f"{value:%Y-%m-%d %H:%M} UTC"


def decide(*, fingerprint: str, status: str, not_after: dt.datetime, revoked_at: dt.datetime | None,
           revocation_reason: str | None, managed: str | None, managed_status: str | None, issuer: str | None,
           current: bool, targets: int, private_ca: str | None, now: dt.datetime,
           available_issuers: Collection[str] | None) -> tuple[Action, str]:
    """What a revoke-and-replace does with one certificate, and why (a pure function of the time)."""
    revoked = status == "revoked"
    revoked_words = f"revoked already on {_day(revoked_at)} ({reason_name(revocation_reason) or 'no reason recorded'})"
    if not_after < now:
        return Action.NOTHING, f"expired on {_day(not_after)}: no client trusts it any more, nothing to revoke"
    if revoked and not current:
        return Action.NOTHING, f"{revoked_words} and no longer current"
    if managed is None:
        how = (f"unmanaged: nothing can reissue or revoke it until it is adopted: certpilot managed adopt "
               f"{fingerprint} --name NAME --issuer BLOCK")
        if private_ca:
            how += f" (it was issued by certpilot's private CA {private_ca!r}: `certpilot ca revoke` revokes it alone)"
        return Action.CANNOT, how
    assert issuer is not None
    if available_issuers is not None and issuer not in available_issuers:
        return Action.CANNOT, (f"its issuer block {issuer!r} (of {managed!r}) is not available: nothing can "
                               f"{'reissue' if current else 'revoke'} it until the block loads")
    if current and managed_status == "active":
        where = f"deploy to its {targets} target(s), verify" if targets else "no target to deploy to"
        if revoked:
            return Action.REPLACE, (f"current certificate of {managed!r}, {revoked_words}: its replacement is what "
                                    f"matters: reissue with a new key, {where}")
        return Action.REPLACE, f"current certificate of {managed!r}: reissue with a new key, {where}, then revoke it"
    if managed_status != "active":
        return Action.REVOKE, f"{managed!r} is {managed_status}: valid until {_day(not_after)}, revoke only"
    return Action.REVOKE, (f"superseded (no longer current for {managed!r}) but valid until {_day(not_after)}: "
                           "revoke only")


def resolve(session: Session, scope: Scope, *, now: dt.datetime | None = None,
            available_issuers: Collection[str] | None = None) -> list[InScope]:
    """The certificates in ``scope``, each with its action and why: REPLACE first (by managed name), then
    REVOKE, CANNOT and NOTHING. ``available_issuers``: the issuer block names that load (None: not known,
    every managed certificate's issuer is taken as available)."""
    now = now or utcnow()
    c = Certificate
    rows = session.execute(
        sa.select(col(c.fingerprint_sha256), col(c.subject), col(c.serial_hex), col(c.issuer),
                  col(c.issuer_fingerprint), col(c.status), col(c.not_after), col(c.revoked_at),
                  col(c.revocation_reason), col(c.owner), col(c.tags), col(c.managed_certificate_id),
                  col(c.spki_sha256))
        .where(*where(session, scope))).all()
    fps = [r.fingerprint_sha256 for r in rows]
    managed_ids = sorted({r.managed_certificate_id for r in rows if r.managed_certificate_id is not None})
    managed = _managed_rows(session, managed_ids)
    current = _current(session, managed_ids)
    targets = _targets(session, managed_ids)
    locations = _locations(session, fps)
    dns = _dns_names(session, fps)
    private_cas = dict(session.execute(sa.select(col(CertificateAuthority.issuing_fingerprint),
                                                 col(CertificateAuthority.name))).tuples().all())
    out = []
    for r in rows:
        m = managed.get(r.managed_certificate_id) if r.managed_certificate_id is not None else None
        is_current = m is not None and m.status == "active" and current.get(m.id) == r.fingerprint_sha256
        its_targets = tuple(targets.get(m.id, ())) if m else ()
        action, why = decide(fingerprint=r.fingerprint_sha256, status=r.status, not_after=r.not_after,
                             revoked_at=r.revoked_at, revocation_reason=r.revocation_reason,
                             managed=m.name if m else None, managed_status=m.status if m else None,
                             issuer=m.issuer if m else None, current=is_current, targets=len(its_targets),
                             private_ca=private_cas.get(r.issuer_fingerprint), now=now,
                             available_issuers=available_issuers)
        out.append(InScope(
            fingerprint_sha256=r.fingerprint_sha256, subject=r.subject, serial_hex=r.serial_hex, issuer_dn=r.issuer,
            issuer=m.issuer if m else None, status=inventory.effective_status(r.status, r.not_after, now),
            not_after=r.not_after, managed=m.name if m else None, current=is_current,
            owner=r.owner or (m.owner if m else None), tags={**(m.tags if m else {}), **(r.tags or {})},
            dns_names=tuple(dns.get(r.fingerprint_sha256, ())), spki_sha256=r.spki_sha256 or "",
            targets=its_targets, locations=tuple(locations.get(r.fingerprint_sha256, ())), action=action, why=why))
    out.sort(key=lambda i: (_ORDER[i.action], i.managed or "\uffff", i.label, i.fingerprint_sha256))
    return out
