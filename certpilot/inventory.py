"""The inventory's operations: upsert observations, query, show.

An observation is a certificate seen somewhere. Upserting one adds the certificate if its
fingerprint is new and adds or refreshes its Location; it never creates a second row for the same
certificate. Every change appends an audit event in the same transaction.
"""

from __future__ import annotations

import datetime as dt
import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, SQLModel, col, select

from certpilot import audit
from certpilot.clock import utcnow  # also imported from here (certpilot.report)
from certpilot.errors import AmbiguousError, NotFoundError
from certpilot.models import (AuditEvent, Certificate, Location, ManagedCertificate, PolicyViolation, PolicyWaiver,
                              PrivateKey, SubjectAltName, UTCDateTime)
from certpilot.names import normalise_dns_name
from certpilot.x509info import CertificateRecord

_CHUNK = 500  # bound on parameters per IN (...) list
_BULK = {"synchronize_session": False}  # the session holds no Certificate objects to keep in step
STATUSES = ("active", "superseded", "revoked", "expired")
_CERTIFICATE = SQLModel.metadata.tables[Certificate.__tablename__]
_SAN = SQLModel.metadata.tables[SubjectAltName.__tablename__]
_LOCATION = SQLModel.metadata.tables[Location.__tablename__]
_VIOLATION = SQLModel.metadata.tables[PolicyViolation.__tablename__]
_SEVERITY_RANK = {"low": 0, "medium": 1, "high": 2, "critical": 3}  # certpilot.policy.Severity, most severe last


@dataclass(frozen=True)
class Observation:
    record: CertificateRecord
    locator: str | None
    source: str
    details: dict[str, Any] | None = None  # public facts seen at the locator, kept on the Location


@dataclass(frozen=True)
class UpsertResult:
    new: frozenset[str]
    seen: frozenset[str]
    new_locations: int


def _chunks(items: Sequence[Any], size: int = _CHUNK) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def upsert(session: Session, observations: Sequence[Observation], actor: audit.Actor, *,
           owner: str | None = None, tags: dict[str, str] | None = None, now: dt.datetime | None = None) -> UpsertResult:
    """Add new certificates, add or refresh their locations, label them; all in the caller's transaction."""
    now = now or utcnow()
    records = {o.record.fingerprint_sha256: o.record for o in observations}
    fps = list(records)
    existing: dict[str, tuple[str | None, dict[str, str]]] = {}
    for chunk in _chunks(fps):
        for fp, cur_owner, cur_tags in session.execute(
                sa.select(col(Certificate.fingerprint_sha256), col(Certificate.owner), col(Certificate.tags))
                .where(col(Certificate.fingerprint_sha256).in_(chunk))):
            existing[fp] = (cur_owner, cur_tags or {})
    new_fps = [fp for fp in fps if fp not in existing]
    first_locator = {o.record.fingerprint_sha256: o.locator for o in reversed(observations)}
    changes: list[audit.Change] = []
    if new_fps:
        new_records = [records[fp] for fp in new_fps]
        stored_links = _stored_issuer_links(session, new_records)  # set on insert: no UPDATE per row
        rows = [_certificate_row(r, owner, tags or {}, now) for r in new_records]
        for row in rows:
            linked = stored_links.get(row["fingerprint_sha256"])
            if linked is not None:
                row["issuer_fingerprint"] = linked
        _insert_rows(session, _CERTIFICATE, rows)
        _insert_rows(session, _SAN, [{"certificate_fingerprint": r.fingerprint_sha256, "kind": kind, "value": value}
                                     for r in new_records for kind, value in dict.fromkeys(r.sans)])
        changes += [audit.Change("certificate.added", f"certificate:{r.fingerprint_sha256}", {
            "subject": r.subject, "issuer": r.issuer, "serial": r.serial_hex,
            "not_after": r.not_after.isoformat(), "locator": first_locator.get(r.fingerprint_sha256),
            "owner": owner, "tags": tags or {}}) for r in new_records]
        _link_issuers(session, new_records, stored_links)
    changes += _relabel(session, existing, owner, tags)
    location_changes, new_locations = _upsert_locations(session, observations, set(new_fps), actor, now)
    changes += location_changes
    audit.append(session, actor, changes, now)
    return UpsertResult(frozenset(new_fps), frozenset(fps), new_locations)


def _certificate_row(r: CertificateRecord, owner: str | None, tags: dict[str, str], now: dt.datetime) -> dict[str, Any]:
    return {
        "fingerprint_sha256": r.fingerprint_sha256, "subject": r.subject, "issuer": r.issuer,
        "serial_hex": r.serial_hex, "not_before": r.not_before, "not_after": r.not_after,
        "key_type": r.key_type, "key_size": r.key_size, "key_curve": r.key_curve, "spki_sha256": r.spki_sha256,
        "signature_algorithm": r.signature_algorithm, "is_ca": r.is_ca, "path_length": r.path_length,
        "key_usage": list(r.key_usage), "extended_key_usage": list(r.extended_key_usage),
        "subject_key_id": r.subject_key_id, "authority_key_id": r.authority_key_id,
        "crl_urls": list(r.crl_urls), "ocsp_urls": list(r.ocsp_urls), "ca_issuer_urls": list(r.ca_issuer_urls),
        "self_signed": r.self_signed, "issuer_fingerprint": r.fingerprint_sha256 if r.self_signed else None,
        "status": "active", "owner": owner, "tags": dict(tags), "notes": list(r.notes), "der": r.der,
        "created_at": now,
    }


def _relabel(session: Session, existing: dict[str, tuple[str | None, dict[str, str]]], owner: str | None,
             tags: dict[str, str] | None) -> list[audit.Change]:
    """Apply --owner/--tag to certificates already in the inventory, where they change something."""
    if owner is None and not tags:
        return []
    changes = []
    for fp, (cur_owner, cur_tags) in existing.items():
        new_owner = owner if owner is not None else cur_owner
        new_tags = {**cur_tags, **(tags or {})}
        if new_owner == cur_owner and new_tags == cur_tags:
            continue
        session.execute(sa.update(Certificate).where(col(Certificate.fingerprint_sha256) == fp)
                        .values(owner=new_owner, tags=new_tags), execution_options=_BULK)
        changes.append(audit.Change("certificate.labelled", f"certificate:{fp}",
                                    {"owner": [cur_owner, new_owner], "tags": [cur_tags, new_tags]}))
    return changes


def _upsert_locations(session: Session, observations: Sequence[Observation], new_fps: set[str],
                      actor: audit.Actor, now: dt.datetime) -> tuple[list[audit.Change], int]:
    wanted = {(o.record.fingerprint_sha256, o.locator): o for o in observations if o.locator}
    if not wanted:
        return [], 0
    fps = sorted({fp for fp, _ in wanted if fp not in new_fps})  # a certificate added just now has none yet
    known: dict[tuple[str, str], int] = {}
    for chunk in _chunks(fps):
        for loc_id, fp, locator in session.execute(
                sa.select(col(Location.id), col(Location.certificate_fingerprint), col(Location.locator))
                .where(col(Location.certificate_fingerprint).in_(chunk))):
            known[(fp, locator)] = loc_id
    fresh = [key for key in wanted if key not in known]
    _insert_rows(session, _LOCATION, [
        {"certificate_fingerprint": fp, "locator": locator, "source": wanted[(fp, locator)].source, "first_seen": now,
         "last_seen": now, "seen_by_run": actor.flow_run_id, "ghost": False, "details": wanted[(fp, locator)].details}
        for fp, locator in fresh])
    plain = [known[key] for key, o in wanted.items() if key in known and o.details is None]
    for chunk in _chunks(plain):
        session.execute(sa.update(Location).where(col(Location.id).in_(chunk))
                        .values(last_seen=now, ghost=False, seen_by_run=actor.flow_run_id), execution_options=_BULK)
    detailed = [{"location_id": known[key], "location_details": o.details} for key, o in wanted.items()
                if key in known and o.details is not None]
    if detailed:  # each row its own details: one executemany
        session.connection().execute(
            _LOCATION.update().where(_LOCATION.c.id == sa.bindparam("location_id"))
            .values(last_seen=now, ghost=False, seen_by_run=actor.flow_run_id, details=sa.bindparam("location_details")),
            detailed)
    changes = [audit.Change("location.added", f"certificate:{fp}", {"locator": locator,
                                                                     "source": wanted[(fp, locator)].source})
               for fp, locator in fresh if fp not in new_fps]
    return changes, len(fresh)


def _issuer_matches(r: CertificateRecord, candidates: dict[str, list[tuple[str, str | None]]]) -> list[str]:
    """The candidate CA certificates that can have issued ``r``: the issuer's subject equals the child's
    issuer name and, where both carry key identifiers, the issuer's SKI equals the child's AKI."""
    return [fp for fp, ski in candidates.get(r.issuer, [])
            if fp != r.fingerprint_sha256 and (ski is None or r.authority_key_id is None or ski == r.authority_key_id)]


def _stored_issuer_links(session: Session, records: Sequence[CertificateRecord]) -> dict[str, str]:
    """For certificates about to be added: fingerprint -> its issuer already in the inventory, if any."""
    wanted_names = sorted({r.issuer for r in records if not r.self_signed})
    candidates: dict[str, list[tuple[str, str | None]]] = {}
    for chunk in _chunks(wanted_names):
        for fp, subject, ski in session.execute(
                sa.select(col(Certificate.fingerprint_sha256), col(Certificate.subject), col(Certificate.subject_key_id))
                .where(col(Certificate.subject).in_(chunk), col(Certificate.is_ca).is_(True))):
            candidates.setdefault(subject, []).append((fp, ski))
    links = {}
    for r in records:
        if not r.self_signed:
            match = _issuer_matches(r, candidates)
            if match:
                links[r.fingerprint_sha256] = match[0]
    return links


def _link_issuers(session: Session, records: Sequence[CertificateRecord], stored_links: dict[str, str]) -> None:
    """Once new certificates are inserted: point those not linked to a stored issuer at an issuer added
    with them, and new CA certificates at the children already stored.

    A link needs the issuer's subject to equal the child's issuer name and, where both carry key
    identifiers, the issuer's SKI to equal the child's AKI.
    """
    candidates: dict[str, list[tuple[str, str | None]]] = {}
    for r in records:
        if r.is_ca:
            candidates.setdefault(r.subject, []).append((r.fingerprint_sha256, r.subject_key_id))
    updates = []
    if candidates:
        for r in records:
            if r.self_signed or r.fingerprint_sha256 in stored_links:
                continue
            match = _issuer_matches(r, candidates)
            if match:
                updates.append({"fp": r.fingerprint_sha256, "issuer_fp": match[0]})
    if updates:
        table = _CERTIFICATE  # executemany needs the Core table
        session.execute(sa.update(table).where(table.c.fingerprint_sha256 == sa.bindparam("fp"))
                        .values(issuer_fingerprint=sa.bindparam("issuer_fp")), updates)
    for r in records:
        if not r.is_ca:
            continue
        condition = sa.and_(col(Certificate.issuer_fingerprint).is_(None), col(Certificate.issuer) == r.subject,
                            col(Certificate.fingerprint_sha256) != r.fingerprint_sha256)
        if r.subject_key_id:
            condition = sa.and_(condition, sa.or_(col(Certificate.authority_key_id).is_(None),
                                                  col(Certificate.authority_key_id) == r.subject_key_id))
        session.execute(sa.update(Certificate).where(condition).values(issuer_fingerprint=r.fingerprint_sha256),
                        execution_options=_BULK)


def _insert_rows(session: Session, table: sa.Table, rows: Sequence[dict[str, Any]]) -> None:
    """INSERT ``rows`` (dicts with the same keys) in the session's transaction, the quickest way the
    backend has: COPY on PostgreSQL (psycopg), one executemany of a plain INSERT on SQLite. Values go
    through the columns' own bind processing, as a Core insert would; errors surface as SQLAlchemy's."""
    if not rows:
        return
    conn = session.connection()
    dialect = conn.dialect
    if dialect.driver not in ("psycopg", "pysqlite"):
        conn.execute(table.insert(), list(rows))
        return
    names = list(rows[0])
    converters = [(index, converter) for index, name in enumerate(names)
                  if (converter := _bind_converter(table.c[name].type, dialect)) is not None]
    pick = operator.itemgetter(*names)
    data: list[Any] = []
    for row in rows:
        values = list(pick(row)) if len(names) > 1 else [pick(row)]
        for index, converter in converters:
            values[index] = converter(values[index])
        data.append(values)
    quote = dialect.identifier_preparer.quote
    columns = ", ".join(quote(name) for name in names)
    target = dialect.identifier_preparer.format_table(table)
    if dialect.driver == "pysqlite":
        conn.exec_driver_sql(f"INSERT INTO {target} ({columns}) VALUES ({', '.join('?' for _ in names)})",
                             [tuple(values) for values in data])
        return
    statement = f"COPY {target} ({columns}) FROM STDIN"
    dbapi_error = dialect.loaded_dbapi.Error
    driver = conn.connection.driver_connection  # psycopg's connection; None only once it is closed
    if driver is None:
        raise sa.exc.ResourceClosedError("the session's database connection is closed")
    try:
        with driver.cursor() as cursor, cursor.copy(statement) as copy:
            for values in data:
                copy.write_row(values)
    except dbapi_error as exc:
        raise sa.exc.DBAPIError.instance(statement, None, exc, dbapi_error, dialect=dialect) from None


def _bind_converter(type_: sa.types.TypeEngine[Any], dialect: sa.Dialect) -> Callable[[Any], Any] | None:
    """The column type's bind processing for ``dialect`` (None: values pass as they are), remembering
    its result for the values that repeat across rows: times (one "now" per upsert), booleans, and
    empty JSON lists and objects."""
    process = type_.dialect_impl(dialect).bind_processor(dialect)
    if process is None:
        return None
    seen: dict[Any, Any] = {}
    if isinstance(type_, sa.JSON):
        def convert_json(value: Any) -> Any:
            if not value and type(value) in (list, dict):
                key = type(value)
                if key not in seen:
                    seen[key] = process(value)
                return seen[key]
            return process(value)
        return convert_json
    if isinstance(type_, (UTCDateTime, sa.Boolean)):
        def convert_repeating(value: Any) -> Any:
            key = (value.__class__, value)
            try:
                return seen[key]
            except KeyError:
                result = seen[key] = process(value)
                return result
        return convert_repeating
    return process


# ---------------------------------------------------------------------------------------------- queries

@dataclass(frozen=True)
class CertificateQuery:
    expiring_within: dt.timedelta | None = None
    expired: bool = False
    issuer: str | None = None  # case-insensitive substring of the issuer DN
    san: str | None = None  # a SAN value; "*.example.com" matches the wildcard itself, ".example.com" any name below
    owner: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    status: str | None = None  # active, superseded, revoked, expired
    unmanaged: bool = False
    is_ca: bool | None = None  # None: both
    in_service: bool = False  # neither revoked nor superseded (expired ones included)
    limit: int | None = None
    include_expired: bool = False  # with expiring_within: those already expired too
    unowned: bool = False  # only certificates with no owner (CA certificates left out: they are their CA's)
    violating: bool = False  # only certificates with a policy violation not waived (any rule, or ``rule``)
    rule: str | None = None  # with violating (or alone): a violation of this rule id, not waived


def _where(q: CertificateQuery, now: dt.datetime) -> list[sa.ColumnElement[bool]]:
    c = _CERTIFICATE.c
    clauses: list[sa.ColumnElement[bool]] = []
    if q.expiring_within is not None:
        clauses += [c.not_after <= now + q.expiring_within, c.status == "active"]
        if not q.include_expired:
            clauses.append(c.not_after >= now)
    if q.expired or q.status == "expired":
        clauses += [c.not_after < now, c.status == "active"]
    elif q.status == "active":
        clauses += [c.not_after >= now, c.status == "active"]
    elif q.status:
        if q.status not in STATUSES:
            raise ValueError(f"unknown status {q.status!r}; choose one of {', '.join(STATUSES)}")
        clauses.append(c.status == q.status)
    if q.issuer:
        clauses.append(sa.func.lower(c.issuer).contains(q.issuer.lower(), autoescape=True))
    if q.owner:
        clauses.append(c.owner == q.owner)
    for key, value in q.tags.items():
        clauses.append(c.tags[key].as_string() == value)
    if q.unmanaged:
        clauses.append(c.managed_certificate_id.is_(None))
    if q.unowned:
        clauses += [c.owner.is_(None), c.is_ca.is_(False)]
    if q.violating or q.rule:
        v = _VIOLATION.c
        open_ = [v.waiver_id.is_(None)] + ([v.rule == q.rule] if q.rule else [])
        clauses.append(c.fingerprint_sha256.in_(sa.select(v.certificate_fingerprint).where(*open_)))
    if q.is_ca is not None:
        clauses.append(c.is_ca.is_(q.is_ca))
    if q.in_service:
        clauses.append(c.status == "active")
    if q.san:
        value = _normalise_name(q.san)
        san = _SAN.c
        match = san.value.endswith(value, autoescape=True) if value.startswith(".") else san.value == value
        clauses.append(c.fingerprint_sha256.in_(sa.select(san.certificate_fingerprint).where(match)))
    return clauses


def _normalise_name(name: str) -> str:
    """IDN U-labels are stored as A-labels (xn--...): accept either (certpilot.names converts them)."""
    if name.isascii():
        return name.lower()
    prefix = "*." if name.startswith("*.") else ("." if name.startswith(".") else "")
    return prefix + normalise_dns_name(name[len(prefix):])


def effective_status(status: str, not_after: dt.datetime, now: dt.datetime) -> str:
    return "expired" if status == "active" and not_after < now else status


def list_certificates(session: Session, q: CertificateQuery, now: dt.datetime | None = None) -> list[dict[str, Any]]:
    """Certificates matching ``q``, soonest expiry first, as plain dicts (the --json shape)."""
    now = now or utcnow()
    c = _CERTIFICATE.c
    columns = [c.fingerprint_sha256, c.subject, c.issuer, c.serial_hex, c.not_before, c.not_after, c.key_type,
               c.key_size, c.key_curve, c.signature_algorithm, c.is_ca, c.owner, c.tags, c.status,
               c.managed_certificate_id]
    query = sa.select(*columns).where(*_where(q, now)).order_by(c.not_after, c.fingerprint_sha256)
    if q.limit:
        query = query.limit(q.limit)
    rows = session.execute(query).all()
    fps = [row.fingerprint_sha256 for row in rows]
    sans = _sans_for(session, fps)
    locations = _locations_for(session, fps)
    violations = violations_for(session, fps)
    return [{
        "fingerprint_sha256": row.fingerprint_sha256, "subject": row.subject, "issuer": row.issuer,
        "serial": row.serial_hex, "not_before": iso(row.not_before), "not_after": iso(row.not_after),
        "days_left": round((row.not_after - now).total_seconds() / 86400, 1),
        "sans": sans.get(row.fingerprint_sha256, []), "key_type": row.key_type, "key_size": row.key_size,
        "key_curve": row.key_curve, "signature_algorithm": row.signature_algorithm, "is_ca": row.is_ca,
        "owner": row.owner, "tags": row.tags or {}, "status": effective_status(row.status, row.not_after, now),
        "managed": row.managed_certificate_id is not None, "locations": locations.get(row.fingerprint_sha256, []),
        "violations": violations.get(row.fingerprint_sha256, []),
    } for row in rows]


def count_certificates(session: Session, q: CertificateQuery, now: dt.datetime | None = None) -> int:
    return session.execute(sa.select(sa.func.count()).select_from(Certificate).where(*_where(q, now or utcnow()))).scalar_one()


def iso(value: dt.datetime | None) -> str | None:
    return None if value is None else value.astimezone(dt.timezone.utc).isoformat().replace("+00:00", "Z")


def _sans_for(session: Session, fps: Sequence[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for chunk in _chunks(fps):
        for fp, kind, value in session.execute(
                sa.select(col(SubjectAltName.certificate_fingerprint), col(SubjectAltName.kind), col(SubjectAltName.value))
                .where(col(SubjectAltName.certificate_fingerprint).in_(chunk))):
            out.setdefault(fp, []).append(f"{kind}:{value}")
    return out


def _locations_for(session: Session, fps: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for chunk in _chunks(fps):
        for loc in session.execute(
                sa.select(col(Location.certificate_fingerprint), col(Location.locator), col(Location.source),
                          col(Location.first_seen), col(Location.last_seen), col(Location.ghost))
                .where(col(Location.certificate_fingerprint).in_(chunk)).order_by(col(Location.id))):
            out.setdefault(loc.certificate_fingerprint, []).append({
                "locator": loc.locator, "source": loc.source, "first_seen": iso(loc.first_seen),
                "last_seen": iso(loc.last_seen), "ghost": loc.ghost})
    return out


def violations_for(session: Session, fps: Sequence[str], *, waivers: bool = False) -> dict[str, list[dict[str, Any]]]:
    """The stored policy violations of each certificate (waived ones too, with their ``waiver_id``), most
    severe first, in the --json shape: rule, fingerprint_sha256, severity, detail, place ("" for a rule about
    the certificate, else the locator of the place an endpoint rule is about), waiver_id. With ``waivers``,
    a waived one also says who waived it, why and until when (``waived_by``, ``waiver_reason``,
    ``waiver_expires_at``)."""
    out: dict[str, list[dict[str, Any]]] = {}
    v = _VIOLATION.c
    waiver_ids: set[int] = set()
    for chunk in _chunks(fps):
        for row in session.execute(sa.select(v.certificate_fingerprint, v.rule, v.severity, v.detail, v.place,
                                             v.waiver_id).where(v.certificate_fingerprint.in_(chunk))):
            out.setdefault(row.certificate_fingerprint, []).append({
                "rule": row.rule, "fingerprint_sha256": row.certificate_fingerprint, "severity": row.severity,
                "detail": row.detail, "place": row.place, "waiver_id": row.waiver_id})
            if row.waiver_id is not None:
                waiver_ids.add(row.waiver_id)
    for found in out.values():
        found.sort(key=lambda f: (f["waiver_id"] is not None, -_SEVERITY_RANK.get(f["severity"], -1), f["rule"],
                                  f["place"]))
    if waivers:
        granted = {w.id: w for w in session.exec(select(PolicyWaiver).where(
            col(PolicyWaiver.id).in_(sorted(waiver_ids))))} if waiver_ids else {}
        for found in out.values():
            for f in found:
                w = granted.get(f["waiver_id"]) if f["waiver_id"] is not None else None
                f.update({"waived_by": w.approver if w else None, "waiver_reason": w.reason if w else None,
                          "waiver_expires_at": iso(w.expires_at) if w else None})
    return out


def open_rules(violations: Sequence[dict[str, Any]]) -> list[str]:
    """The rule ids of the violations not waived, each once, most severe first (a table's column)."""
    return list(dict.fromkeys(f["rule"] for f in violations if f["waiver_id"] is None))


def resolve(session: Session, ident: str) -> Certificate:
    """A certificate by its SHA-256 fingerprint or a unique prefix of it (colons and case ignored)."""
    prefix = ident.replace(":", "").strip().lower()
    if len(prefix) < 4 or any(ch not in "0123456789abcdef" for ch in prefix):
        raise NotFoundError(f"{ident!r} is not a SHA-256 fingerprint or a prefix of at least 4 hex digits")
    matches = session.exec(select(Certificate).where(col(Certificate.fingerprint_sha256).startswith(prefix))
                           .limit(6)).all()
    if not matches:
        raise NotFoundError(f"no certificate with fingerprint {ident!r} in the inventory")
    if len(matches) > 1:
        raise AmbiguousError(ident, [m.fingerprint_sha256 for m in matches])
    return matches[0]


def chain_of(session: Session, cert: Certificate, limit: int = 10) -> list[Certificate]:
    """The certificate and its issuers as linked in the inventory, leaf first."""
    chain = [cert]
    while len(chain) < limit and chain[-1].issuer_fingerprint and chain[-1].issuer_fingerprint != chain[-1].fingerprint_sha256:
        parent = session.get(Certificate, chain[-1].issuer_fingerprint)
        if parent is None or parent in chain:
            break
        chain.append(parent)
    return chain


def show(session: Session, ident: str, now: dt.datetime | None = None) -> dict[str, Any]:
    """Every field of one certificate, with its chain, locations, key reference and history."""
    now = now or utcnow()
    cert = resolve(session, ident)
    fp = cert.fingerprint_sha256
    chain = chain_of(session, cert)
    top = chain[-1]
    key = session.exec(select(PrivateKey).where(col(PrivateKey.spki_sha256) == cert.spki_sha256)).first() if cert.spki_sha256 else None
    managed = session.get(ManagedCertificate, cert.managed_certificate_id) if cert.managed_certificate_id else None
    history = session.exec(select(AuditEvent).where(col(AuditEvent.object) == f"certificate:{fp}")
                           .order_by(col(AuditEvent.seq))).all()
    return {
        "fingerprint_sha256": fp, "subject": cert.subject, "issuer": cert.issuer, "serial": cert.serial_hex,
        "not_before": iso(cert.not_before), "not_after": iso(cert.not_after),
        "days_left": round((cert.not_after - now).total_seconds() / 86400, 1),
        "status": effective_status(cert.status, cert.not_after, now), "revocation_reason": cert.revocation_reason,
        "revoked_at": iso(cert.revoked_at), "sans": _sans_for(session, [fp]).get(fp, []),
        "key_type": cert.key_type, "key_size": cert.key_size, "key_curve": cert.key_curve,
        "spki_sha256": cert.spki_sha256, "signature_algorithm": cert.signature_algorithm, "is_ca": cert.is_ca,
        "path_length": cert.path_length, "key_usage": cert.key_usage, "extended_key_usage": cert.extended_key_usage,
        "subject_key_id": cert.subject_key_id, "authority_key_id": cert.authority_key_id,
        "crl_urls": cert.crl_urls, "ocsp_urls": cert.ocsp_urls, "ca_issuer_urls": cert.ca_issuer_urls,
        "self_signed": cert.self_signed, "owner": cert.owner, "tags": cert.tags, "notes": cert.notes,
        "managed_certificate": managed.name if managed else None,
        "replaces": cert.replaces_fingerprint,
        "private_key": None if key is None else {"ref": f"key:{key.id}", "algorithm": key.algorithm,
                                                  "destroyed_at": iso(key.destroyed_at)},
        "chain": [{"fingerprint_sha256": c.fingerprint_sha256, "subject": c.subject, "not_after": iso(c.not_after)}
                  for c in chain],
        "chain_complete": top.self_signed,
        "locations": _locations_for(session, [fp]).get(fp, []),
        "violations": violations_for(session, [fp], waivers=True).get(fp, []),
        "history": [{"seq": e.seq, "at": iso(e.at), "actor": e.actor, "action": e.action,
                     "flow_run_id": e.flow_run_id} for e in history],
        "created_at": iso(cert.created_at),
    }
