"""Managed certificates: what should exist, when it is due, and the steps of renewing it.

A ManagedCertificate names the certificate an organisation wants (DNS names, IPs, key algorithm,
validity, the issuer block that signs it, owner, tags, renewal policy). Its current certificate is
the newest active one linked to it. Renewal is four steps, each a plain function a Prefect task
wraps: a new key (stored encrypted, referred to by a KeyRef), a CSR made with it, the issuer's
signature, and ``record_issued``, which checks what came back before the inventory takes it. A
failed renewal changes nothing in service: the current certificate stays active and the failure is
recorded on the row and in the audit trail. ``renew_one`` does all of it without Prefect.

No Prefect, no network here: the issuer is handed in (a connector built from its block).
"""

from __future__ import annotations

import datetime as dt
import re
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from cryptography import x509
from sqlmodel import Session, select

from certpilot import audit, inventory
from certpilot import names as name_rules
from certpilot.database import read_session, write_session
from certpilot.errors import CertpilotError, NotFoundError, PermanentError, TransientError
from certpilot.issuance import PROFILES, IssuedCertificate, Issuer, build_csr
from certpilot.keys import KEY_ALGORITHMS, generate_private_key
from certpilot.keystore import KeyRef, KeyRing, destroy_private_key, load_private_key, store_private_key
from certpilot.models import Certificate, ManagedCertificate, PrivateKey, SubjectAltName
from certpilot.renewal import RenewalDecision, RenewalPolicy, RenewalWindow, decide, renewal_time
from certpilot.x509info import describe_certificate, serial_hex, spki_sha256

ARI_FRESH_FOR = dt.timedelta(hours=24)  # a CA's renewal window older than this is asked for again
STEPS = ("load", "key", "csr", "issue", "store")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_ISSUER = re.compile(r"^[a-z0-9][a-z0-9-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_MAX_REASON = 600

KeyRingSource = Callable[[], KeyRing]


def certificate_tag(name: str) -> str:
    """The tag on every flow and task run that works on managed certificate ``name``: its history is
    one filter away in the Prefect UI."""
    return f"certificate:{name}"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


# ------------------------------------------------------------------------------------------- errors

class RenewalError(CertpilotError):
    """A renewal that failed at ``step``; the certificate in service (``kept``, a fingerprint) stays.

    The message says what failed where and that nothing in service changed; it never holds key
    material (``reason`` is sanitised), so it is safe in logs, state messages and result storage.
    """

    def __init__(self, name: str, step: str, issuer: str, reason: str, kept: str | None) -> None:
        self.name = name
        self.step = step
        self.issuer = issuer
        self.reason = reason
        self.kept = kept
        still = (f"certificate {kept[:16]} stays in service" if kept
                 else "no certificate was in service before, and none is now")
        super().__init__(f"renewal of {name!r} failed at step {step!r} (issuer {issuer}): {reason}; {still}")

    def __reduce__(self) -> tuple[Any, ...]:  # pickled into Prefect's result storage
        return (type(self), (self.name, self.step, self.issuer, self.reason, self.kept))


class TransientRenewalError(RenewalError, TransientError):
    """A renewal that may succeed if tried again (a busy CA or database, a timeout)."""


class PermanentRenewalError(RenewalError, PermanentError):
    """A renewal that cannot succeed as configured (a refused request, a wrong certificate back)."""


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, (TransientError, TimeoutError, ConnectionError))


def safe_reason(exc: BaseException) -> str:
    """One line about ``exc`` that is safe to store anywhere: no PEM, bounded length.

    certpilot's own errors carry their data in their message; anything else is named by its type and
    the place it was raised, so that an unexpected exception is still findable without a traceback."""
    text = str(exc) if isinstance(exc, CertpilotError) else f"{type(exc).__name__}: {exc}"
    if "-----BEGIN" in text or "PRIVATE KEY" in text:
        text = f"{type(exc).__name__} (its message held PEM text and was withheld)"
    if not isinstance(exc, CertpilotError):
        frames = traceback.extract_tb(exc.__traceback__)
        if frames:
            text += f" (at {'/'.join(frames[-1].filename.split('/')[-2:])}:{frames[-1].lineno})"
    text = " ".join(text.split())
    return text if len(text) <= _MAX_REASON else text[:_MAX_REASON - 3] + "..."


# ----------------------------------------------------------------------------------- definitions

@dataclass(frozen=True)
class ManagedSpec:
    """What a new managed certificate should be."""

    name: str
    dns_names: tuple[str, ...]
    issuer: str  # "<block-type-slug>/<block-name>", e.g. private-ca/internal
    ip_addresses: tuple[str, ...] = ()
    profile: str = "tls-server"
    key_algorithm: str = "ec-p256"
    validity_days: int | None = None  # None: the issuer's default
    owner: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    renew_before_days: int | None = None  # None: at two thirds of the lifetime
    use_ari: bool = True


def normalise_dns_name(name: str) -> str:
    """Lower-case, IDN U-labels as A-labels (xn--...), a leading wildcard kept: certpilot.names' one rule."""
    return name_rules.normalise_dns_name(name, wildcard=True)


def _normalise_ip(value: str) -> str:
    return name_rules.normalise_ip_address(value)


def _check_spec(spec: ManagedSpec) -> ManagedSpec:
    if not _NAME.match(spec.name):
        raise PermanentError(f"{spec.name!r} is not a usable name: letters, digits, '.', '_' and '-', "
                             "starting with a letter or digit, at most 128 characters")
    dns = tuple(dict.fromkeys(normalise_dns_name(n) for n in spec.dns_names))
    ips = tuple(dict.fromkeys(_normalise_ip(ip) for ip in spec.ip_addresses))
    if not dns and not ips:
        raise PermanentError(f"managed certificate {spec.name!r} needs at least one DNS name or IP address")
    if not _ISSUER.match(spec.issuer):
        raise PermanentError(f"issuer {spec.issuer!r} must name an issuer block as <block-type-slug>/<block-name>, "
                             "e.g. private-ca/internal or acme-issuer/letsencrypt")
    if spec.profile not in PROFILES:
        raise PermanentError(f"unknown profile {spec.profile!r}; choose one of {', '.join(PROFILES)}")
    if spec.key_algorithm not in KEY_ALGORITHMS:
        raise PermanentError(f"unknown key algorithm {spec.key_algorithm!r}; choose one of {', '.join(KEY_ALGORITHMS)}")
    if spec.validity_days is not None and spec.validity_days < 1:
        raise PermanentError(f"validity must be at least 1 day, not {spec.validity_days}")
    if spec.renew_before_days is not None and spec.renew_before_days < 0:
        raise PermanentError(f"renew-before cannot be negative ({spec.renew_before_days} days)")
    both = spec.validity_days is not None and spec.renew_before_days is not None
    if both and spec.renew_before_days >= spec.validity_days:  # type: ignore[operator]
        raise PermanentError(f"renew-before ({spec.renew_before_days} days) must be shorter than the validity "
                             f"({spec.validity_days} days), or every certificate is due as soon as it is issued")
    return ManagedSpec(spec.name, dns, spec.issuer, ips, spec.profile, spec.key_algorithm, spec.validity_days,
                       spec.owner, dict(spec.tags), spec.renew_before_days, spec.use_ari)


def add(session: Session, spec: ManagedSpec, actor: audit.Actor, now: dt.datetime | None = None) -> ManagedCertificate:
    """Define a managed certificate (validated); it is due at once, having no certificate yet."""
    spec = _check_spec(spec)
    now = now or utcnow()
    if session.exec(select(ManagedCertificate.id).where(ManagedCertificate.name == spec.name)).first() is not None:
        raise PermanentError(f"a managed certificate named {spec.name!r} already exists")
    row = ManagedCertificate(name=spec.name, dns_names=list(spec.dns_names), ip_addresses=list(spec.ip_addresses),
                             profile=spec.profile, key_algorithm=spec.key_algorithm, validity_days=spec.validity_days,
                             issuer=spec.issuer, owner=spec.owner, tags=dict(spec.tags),
                             renew_before_days=spec.renew_before_days, use_ari=spec.use_ari, status="active",
                             created_at=now)
    session.add(row)
    session.flush()
    audit.append(session, actor, [audit.Change("managed.added", f"managed:{spec.name}", {
        "dns_names": row.dns_names, "ip_addresses": row.ip_addresses, "issuer": row.issuer, "profile": row.profile,
        "key_algorithm": row.key_algorithm, "validity_days": row.validity_days, "owner": row.owner, "tags": row.tags,
        "renew_before_days": row.renew_before_days, "use_ari": row.use_ari})], now)
    return row


def get(session: Session, name: str) -> ManagedCertificate:
    row = session.exec(select(ManagedCertificate).where(ManagedCertificate.name == name)).first()
    if row is None:
        raise NotFoundError(f"no managed certificate named {name!r}")
    return row


def list_managed(session: Session, include_retired: bool = False) -> list[ManagedCertificate]:
    query = select(ManagedCertificate)
    if not include_retired:
        query = query.where(ManagedCertificate.status == "active")
    return list(session.exec(query.order_by(ManagedCertificate.name)).all())


def current_certificate(session: Session, managed: ManagedCertificate) -> Certificate | None:
    """The newest active certificate this managed certificate produced (expired ones included)."""
    return session.exec(select(Certificate)
                        .where(Certificate.managed_certificate_id == managed.id, Certificate.status == "active")
                        .order_by(Certificate.not_before.desc(), Certificate.created_at.desc())  # type: ignore[attr-defined]
                        .limit(1)).first()


# --------------------------------------------------------------------------------------- schedule

@dataclass(frozen=True)
class CurrentCertificate:
    fingerprint_sha256: str
    serial_hex: str
    not_before: dt.datetime
    not_after: dt.datetime


@dataclass(frozen=True)
class Scheduled:
    """A managed certificate, its current certificate (if any) and when it should be renewed."""

    managed: ManagedCertificate
    current: CurrentCertificate | None
    decision: RenewalDecision


def _wanted_names(managed: ManagedCertificate) -> set[tuple[str, str]]:
    return {("DNS", n.lower()) for n in managed.dns_names} | {("IP", ip) for ip in managed.ip_addresses}


def ari_window(managed: ManagedCertificate, now: dt.datetime) -> RenewalWindow | None:
    """The CA's renewal window stored on the row, if the managed certificate uses ARI and it is fresh."""
    if not managed.use_ari or managed.ari_start is None or managed.ari_end is None or managed.ari_checked_at is None:
        return None
    if now - managed.ari_checked_at > ARI_FRESH_FOR:
        return None
    return RenewalWindow(managed.ari_start, managed.ari_end)


def schedule(session: Session, now: dt.datetime | None = None,
             managed: Sequence[ManagedCertificate] | None = None) -> list[Scheduled]:
    """When each active managed certificate is next to be renewed, and why; the soonest (the most
    overdue) first."""
    now = now or utcnow()
    rows = list(managed) if managed is not None else list_managed(session)
    ids = [m.id for m in rows]
    current: dict[int, CurrentCertificate] = {}
    for start in range(0, len(ids), 500):
        found = session.execute(
            sa.select(Certificate.managed_certificate_id, Certificate.fingerprint_sha256, Certificate.serial_hex,
                      Certificate.not_before, Certificate.not_after, Certificate.created_at)
            .where(Certificate.managed_certificate_id.in_(ids[start:start + 500]),  # type: ignore[union-attr]
                   Certificate.status == "active")).all()
        for row in sorted(found, key=lambda r: (r.not_before, r.created_at)):
            current[row.managed_certificate_id] = CurrentCertificate(row.fingerprint_sha256, row.serial_hex,
                                                                     row.not_before, row.not_after)
    names: dict[str, set[tuple[str, str]]] = {}
    fps = [c.fingerprint_sha256 for c in current.values()]
    for start in range(0, len(fps), 500):
        for fp, kind, value in session.execute(
                sa.select(SubjectAltName.certificate_fingerprint, SubjectAltName.kind, SubjectAltName.value)
                .where(SubjectAltName.certificate_fingerprint.in_(fps[start:start + 500]))):  # type: ignore[attr-defined]
            names.setdefault(fp, set()).add((kind, value.lower() if kind == "DNS" else value))
    out = []
    earliest = dt.datetime.min.replace(tzinfo=dt.timezone.utc)
    for m in rows:
        cur = current.get(m.id)  # type: ignore[arg-type]
        order = earliest  # when it fell (or falls) due: the most overdue come first
        if cur is None:
            decision = RenewalDecision(True, now, "no certificate issued yet")
        elif missing := sorted(_wanted_names(m) - names.get(cur.fingerprint_sha256, set())):
            decision = RenewalDecision(True, now, "its certificate does not cover "
                                       + ", ".join(f"{k}:{v}" for k, v in missing) + " (names changed)")
        else:
            policy = RenewalPolicy(renew_before=dt.timedelta(days=m.renew_before_days)
                                   if m.renew_before_days is not None else None)
            window = ari_window(m, now)
            decision = decide(cur.not_before, cur.not_after, policy, cur.fingerprint_sha256, now, window)
            order = min(renewal_time(cur.not_before, cur.not_after, policy, cur.fingerprint_sha256, window)[0],
                        cur.not_after)
        out.append((order, Scheduled(m, cur, decision)))
    out.sort(key=lambda item: (item[0], item[1].managed.name))
    return [s for _, s in out]


def due(session: Session, now: dt.datetime | None = None) -> list[tuple[ManagedCertificate, RenewalDecision]]:
    """The managed certificates due for renewal at ``now``, most overdue first."""
    return [(s.managed, s.decision) for s in schedule(session, now) if s.decision.due]


def record_renewal_info(session: Session, windows: dict[str, RenewalWindow | None], now: dt.datetime | None = None) -> int:
    """Store the CA's renewal window (ARI) per managed certificate name; None: the CA offers none."""
    now = now or utcnow()
    for name, window in windows.items():
        session.execute(sa.update(ManagedCertificate).where(ManagedCertificate.name == name).values(
            ari_start=window.start if window else None, ari_end=window.end if window else None, ari_checked_at=now))
    return len(windows)


def stale_renewal_info(session: Session, now: dt.datetime | None = None) -> list[tuple[ManagedCertificate, Certificate]]:
    """Managed certificates that use ARI, have a current certificate, and whose window is missing or old."""
    now = now or utcnow()
    wanted = {m.id: m for m in list_managed(session)
              if m.use_ari and (m.ari_checked_at is None or now - m.ari_checked_at > ARI_FRESH_FOR / 2)}
    newest: dict[int, Certificate] = {}
    ids = list(wanted)
    for start in range(0, len(ids), 500):
        for cert in session.exec(select(Certificate).where(
                Certificate.managed_certificate_id.in_(ids[start:start + 500]),  # type: ignore[union-attr]
                Certificate.status == "active")).all():
            held = newest.get(cert.managed_certificate_id)  # type: ignore[arg-type]
            if held is None or (cert.not_before, cert.created_at) > (held.not_before, held.created_at):
                newest[cert.managed_certificate_id] = cert  # type: ignore[index]
    return [(wanted[i], newest[i]) for i in ids if i in newest]  # type: ignore[index]


# ------------------------------------------------------------------------------------------ steps

def new_key(engine: sa.Engine, name: str, key_ring: KeyRingSource, actor: audit.Actor,
            now: dt.datetime | None = None) -> KeyRef:
    """Generate the managed certificate's next key and store it encrypted; only its reference leaves."""
    with read_session(engine) as session:
        algorithm = get(session, name).key_algorithm
    key = generate_private_key(algorithm)  # outside the write transaction: an RSA key takes a while
    with write_session(engine) as session:
        return store_private_key(session, key, key_ring(), actor, origin="generated", now=now)


def new_csr(engine: sa.Engine, name: str, key_ref: KeyRef, key_ring: KeyRingSource) -> x509.CertificateSigningRequest:
    """A CSR for the managed certificate's names, signed with the stored key ``key_ref``."""
    with read_session(engine) as session:
        managed = get(session, name)
        key = load_private_key(session, key_ref, key_ring())
    return build_csr(key, managed.dns_names, managed.ip_addresses)


def current_x509(engine: sa.Engine, name: str) -> x509.Certificate | None:
    """The certificate in service, parsed: what an issuer is told the new one replaces (ARI)."""
    with read_session(engine) as session:
        cur = current_certificate(session, get(session, name))
    return None if cur is None else x509.load_der_x509_certificate(cur.der)


@dataclass(frozen=True)
class Renewal:
    """What one renewal produced: public facts only."""

    name: str
    issuer: str
    fingerprint_sha256: str
    serial_hex: str
    not_after: dt.datetime
    replaces: str | None
    key_ref: str

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "issuer": self.issuer, "fingerprint_sha256": self.fingerprint_sha256,
                "serial": self.serial_hex, "not_after": inventory.iso(self.not_after), "replaces": self.replaces,
                "key_ref": self.key_ref}


def uncovered_names(leaf: x509.Certificate, managed: ManagedCertificate) -> list[str]:
    """The managed certificate's names that ``leaf`` does not carry as a SAN."""
    try:
        sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        sans = x509.SubjectAlternativeName([])
    have = {("DNS", n.lower().rstrip(".")) for n in sans.get_values_for_type(x509.DNSName)}
    have |= {("IP", str(ip)) for ip in sans.get_values_for_type(x509.IPAddress)}
    return [f"{kind}:{value}" for kind, value in sorted(_wanted_names(managed) - have)]


def record_issued(session: Session, managed: ManagedCertificate, issued: IssuedCertificate, key_ref: KeyRef,
                  actor: audit.Actor, now: dt.datetime | None = None) -> Renewal:
    """Check what the issuer returned and, only if it is right, make it the current certificate.

    The leaf must carry the public key of ``key_ref`` and every managed name; anything else is refused
    (PermanentError) and the inventory is left as it was. Then the leaf and its chain are upserted,
    the leaf is linked to the managed certificate and to the one it replaces, which is superseded.
    """
    now = now or utcnow()
    row = session.get(ManagedCertificate, managed.id)
    if row is None:
        raise NotFoundError(f"managed certificate {managed.name!r} no longer exists")
    if not issued.chain_der:
        raise PermanentError(f"the issuer returned no certificate for {row.name!r}")
    leaf = issued.leaf
    serial = serial_hex(leaf.serial_number)
    key_row = session.get(PrivateKey, key_ref.id)
    if key_row is None or key_row.destroyed_at is not None:
        raise PermanentError(f"the key {key_ref} that the certificate for {row.name!r} was requested with is "
                             "missing or destroyed: refusing to store a certificate without its key")
    leaf_spki = spki_sha256(leaf.public_key())
    if leaf_spki != key_row.spki_sha256:
        raise PermanentError(f"the certificate issued for {row.name!r} (serial {serial}) carries public key "
                             f"sha256 {leaf_spki[:16]}..., not that of {key_ref} ({key_row.spki_sha256[:16]}...) "
                             "whose CSR was sent: refusing to store it")
    missing = uncovered_names(leaf, row)
    if missing:
        raise PermanentError(f"the certificate issued for {row.name!r} (serial {serial}) does not cover "
                             f"{', '.join(missing)}: refusing to store it")
    if leaf.not_valid_after_utc <= now:
        raise PermanentError(f"the certificate issued for {row.name!r} (serial {serial}) expired at "
                             f"{leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC: refusing to store it")
    records = [describe_certificate(c) for c in issued.chain]
    fp = records[0].fingerprint_sha256
    existing = session.get(Certificate, fp)
    if existing is not None and existing.managed_certificate_id == row.id:  # recorded already (a retried store)
        return Renewal(row.name, row.issuer, fp, existing.serial_hex, existing.not_after,
                       existing.replaces_fingerprint, str(key_ref))
    previous = [c for c, in session.execute(sa.select(Certificate.fingerprint_sha256).where(
        Certificate.managed_certificate_id == row.id, Certificate.status == "active",
        Certificate.fingerprint_sha256 != fp).order_by(Certificate.not_before.desc()))]  # type: ignore[attr-defined]
    replaces = previous[0] if previous else None
    if len(records) > 1:
        inventory.upsert(session, [inventory.Observation(r, None, "issued") for r in records[1:]], actor, now=now)
    inventory.upsert(session, [inventory.Observation(records[0], None, "issued")], actor,
                     owner=row.owner, tags=row.tags or None, now=now)
    session.execute(sa.update(Certificate).where(Certificate.fingerprint_sha256 == fp).values(
        managed_certificate_id=row.id, replaces_fingerprint=replaces, status="active"))
    if previous:
        session.execute(sa.update(Certificate).where(Certificate.fingerprint_sha256.in_(previous))  # type: ignore[attr-defined]
                        .values(status="superseded"))
    row.last_attempt_at = now
    row.last_error = None
    row.ari_start = row.ari_end = row.ari_checked_at = None  # the window was for the certificate replaced
    session.add(row)
    session.flush()
    changes = [audit.Change("certificate.issued", f"certificate:{fp}", {
        "managed": row.name, "issuer": row.issuer, "serial": serial, "not_after": leaf.not_valid_after_utc.isoformat(),
        "key": str(key_ref), "replaces": replaces, "profile": row.profile})]
    changes += [audit.Change("certificate.superseded", f"certificate:{old}", {"managed": row.name, "by": fp})
                for old in previous]
    audit.append(session, actor, changes, now)
    return Renewal(row.name, row.issuer, fp, serial, leaf.not_valid_after_utc, replaces, str(key_ref))




def record_failure(session: Session, managed: ManagedCertificate | str, step: str, reason: str, actor: audit.Actor,
                   now: dt.datetime | None = None, unused_key: KeyRef | None = None) -> str | None:
    """Record a failed renewal on the row and in the audit trail; the current certificate stays active.

    ``unused_key``, a key generated for this attempt that no certificate carries, is destroyed: the
    next attempt makes its own. Returns the fingerprint of the certificate that stays in service.
    """
    now = now or utcnow()
    name = managed if isinstance(managed, str) else managed.name
    row = get(session, name)
    kept = current_certificate(session, row)
    row.last_attempt_at = now
    row.last_error = f"{step}: {reason}"[:_MAX_REASON + 32]
    session.add(row)
    session.flush()
    audit.append(session, actor, [audit.Change("renewal.failed", f"managed:{name}", {
        "step": step, "error": reason, "issuer": row.issuer,
        "kept": kept.fingerprint_sha256 if kept else None})], now)
    if unused_key is not None:
        key_row = session.get(PrivateKey, unused_key.id)
        in_use = key_row is not None and session.exec(select(Certificate.fingerprint_sha256).where(
            Certificate.spki_sha256 == key_row.spki_sha256).limit(1)).first() is not None
        if key_row is not None and not in_use:
            destroy_private_key(session, unused_key, actor, now)
    return kept.fingerprint_sha256 if kept else None


def renewal_error(name: str, step: str, issuer: str, exc: BaseException, kept: str | None) -> RenewalError:
    if isinstance(exc, RenewalError):
        return exc
    kind = TransientRenewalError if is_transient(exc) else PermanentRenewalError
    return kind(name, step, issuer, safe_reason(exc), kept)


def fail(engine: sa.Engine, name: str, step: str, issuer: str, exc: BaseException, actor: audit.Actor,
         now: dt.datetime | None = None, unused_key: KeyRef | None = None) -> RenewalError:
    """Record ``exc`` as the failure of renewing ``name`` at ``step`` and return the error to raise."""
    reason = safe_reason(exc) if not isinstance(exc, RenewalError) else exc.reason
    try:
        with write_session(engine) as session:
            kept = record_failure(session, name, step, reason, actor, now, unused_key)
    except Exception as record_exc:  # the renewal failed either way: say so, and why it is not recorded
        kept = None
        reason += f" (recording this failure also failed: {safe_reason(record_exc)})"
    kind = TransientRenewalError if is_transient(exc) else PermanentRenewalError
    return kind(name, step, issuer, reason, kept)


def renew_one(engine: sa.Engine, name: str, issuer: Issuer, key_ring: KeyRingSource, actor: audit.Actor,
              now: dt.datetime | None = None) -> Renewal:
    """Renew one managed certificate with ``issuer``, all steps, no Prefect.

    Raises TransientRenewalError or PermanentRenewalError (recorded first) naming the step that failed;
    the certificate in service is untouched then.
    """
    step, ref = "load", None
    issuer_name = getattr(issuer, "name", type(issuer).__name__)
    try:
        with read_session(engine) as session:
            managed = get(session, name)
        issuer_name = managed.issuer
        replaces = current_x509(engine, name)
        step = "key"
        ref = new_key(engine, name, key_ring, actor, now)
        step = "csr"
        csr = new_csr(engine, name, ref, key_ring)
        step = "issue"
        issued = issuer.issue(csr, managed.profile, validity_days=managed.validity_days, replaces=replaces)
        step = "store"
        with write_session(engine) as session:
            return record_issued(session, managed, issued, ref, actor, now)
    except Exception as exc:
        if step == "load" and isinstance(exc, NotFoundError):
            raise
        raise fail(engine, name, step, issuer_name, exc, actor, now, unused_key=ref) from None
