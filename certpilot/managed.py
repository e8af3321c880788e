"""Managed certificates: what should exist, and when it is due.

A ManagedCertificate names the certificate an organisation wants (DNS names, IPs, key algorithm,
validity, the issuer block that signs it, owner, tags, renewal policy). Its current certificate is
the newest active one linked to it. ``schedule`` says when each is next to be renewed and why (a
due one: since when, not the time of asking). Renewing one is certpilot.renewing.

No Prefect, no network here.
"""
from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
import sqlalchemy as sa
from cryptography import x509
from sqlmodel import Session, col, select

from certpilot import audit
from certpilot import names as name_rules
from certpilot.clock import utcnow
from certpilot.errors import NotFoundError, PermanentError
from certpilot.issuance import PROFILES
from certpilot.keys import KEY_ALGORITHMS, ML_DSA_ALGORITHMS
from certpilot.keystore import KeyRing
from certpilot.models import Certificate, ManagedCertificate, SubjectAltName
from certpilot.renewal import RenewalDecision, RenewalPolicy, RenewalWindow, decide, renewal_time

ARI_FRESH_FOR = dt.timedelta(hours=24)  # a CA's renewal window older than this is asked for again
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_ISSUER = re.compile(r"^[a-z0-9][a-z0-9-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")

KeyRingSource = Callable[[], KeyRing]


def certificate_tag(name: str) -> str:
    """The tag on every flow and task run that works on managed certificate ``name``: its history is
    one filter away in the Prefect UI."""
    return f"certificate:{name}"


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
    uris: tuple[str, ...] = ()  # URI names, e.g. a SPIFFE ID (profile tls-client or mtls, a private CA)


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
    uris = tuple(dict.fromkeys(name_rules.normalise_uri(u) for u in spec.uris))
    if not dns and not ips and not uris:
        raise PermanentError(f"managed certificate {spec.name!r} needs at least one DNS name or IP address, or a URI "
                             "(a SPIFFE ID, for a machine identity)")
    _check_uris(spec, uris)
    if not _ISSUER.match(spec.issuer):
        raise PermanentError(f"issuer {spec.issuer!r} must name an issuer block as <block-type-slug>/<block-name>, "
                             "e.g. private-ca/internal or acme-issuer/letsencrypt")
    if spec.owner is None or not spec.owner.strip():
        raise PermanentError(f"managed certificate {spec.name!r} needs an owner (policy rule owner-required): give "
                             "one, or take it from the policy's ownership rules (Policy.owner_for)")
    if spec.profile not in PROFILES:
        raise PermanentError(f"unknown profile {spec.profile!r}; choose one of {', '.join(PROFILES)}")
    if spec.key_algorithm not in KEY_ALGORITHMS:
        raise PermanentError(f"unknown key algorithm {spec.key_algorithm!r}; choose one of {', '.join(KEY_ALGORITHMS)}")
    if spec.key_algorithm in ML_DSA_ALGORITHMS and not spec.issuer.startswith("private-ca/"):
        raise PermanentError(f"key algorithm {spec.key_algorithm} (post-quantum) is for certificates of a certpilot "
                             f"private CA (--issuer private-ca/NAME), not {spec.issuer}: no ACME or public CA issues "
                             "ML-DSA certificates")
    if spec.validity_days is not None and spec.validity_days < 1:
        raise PermanentError(f"validity must be at least 1 day, not {spec.validity_days}")
    if spec.renew_before_days is not None and spec.renew_before_days < 0:
        raise PermanentError(f"renew-before cannot be negative ({spec.renew_before_days} days)")
    if (spec.validity_days is not None and spec.renew_before_days is not None
            and spec.renew_before_days >= spec.validity_days):
        raise PermanentError(f"renew-before ({spec.renew_before_days} days) must be shorter than the validity "
                             f"({spec.validity_days} days), or every certificate is due as soon as it is issued")
    return ManagedSpec(spec.name, dns, spec.issuer, ips, spec.profile, spec.key_algorithm, spec.validity_days,
                       spec.owner, dict(spec.tags), spec.renew_before_days, spec.use_ari, uris)


def _check_uris(spec: ManagedSpec, uris: tuple[str, ...]) -> None:
    """URI names go only where they can be issued: a tls-client or mtls certificate of a private CA (ACME
    orders DNS names and IP addresses only), one URI when it is a SPIFFE ID (an X.509-SVID has exactly one)."""
    if not uris:
        return
    if spec.issuer.startswith("acme-issuer/"):
        raise PermanentError(f"managed certificate {spec.name!r}: {spec.issuer} cannot issue URI names (ACME has no "
                             "URI identifiers, RFC 8555 orders DNS names and IP addresses): issue machine identities "
                             "from a private CA (--issuer private-ca/NAME)")
    if spec.profile == "tls-server":
        raise PermanentError(f"managed certificate {spec.name!r}: URI names need profile tls-client or mtls "
                             "(tls-server certificates carry DNS names and IP addresses only)")
    if len(uris) > 1 and any(name_rules.is_spiffe_id(u) for u in uris):
        raise PermanentError(f"managed certificate {spec.name!r}: {len(uris)} URIs with a SPIFFE ID among them; an "
                             "X.509-SVID carries exactly one URI name, its SPIFFE ID")


def add(session: Session, spec: ManagedSpec, actor: audit.Actor, now: dt.datetime | None = None) -> ManagedCertificate:
    """Define a managed certificate (validated: every one has an owner); it is due at once, having no
    certificate yet."""
    spec = _check_spec(spec)
    now = now or utcnow()
    if session.exec(select(ManagedCertificate.id).where(ManagedCertificate.name == spec.name)).first() is not None:
        raise PermanentError(f"a managed certificate named {spec.name!r} already exists")
    row = ManagedCertificate(name=spec.name, dns_names=list(spec.dns_names), ip_addresses=list(spec.ip_addresses),
                             uris=list(spec.uris), profile=spec.profile, key_algorithm=spec.key_algorithm,
                             validity_days=spec.validity_days,
                             issuer=spec.issuer, owner=spec.owner, tags=dict(spec.tags),
                             renew_before_days=spec.renew_before_days, use_ari=spec.use_ari, status="active",
                             created_at=now)
    session.add(row)
    session.flush()
    audit.append(session, actor, [audit.Change("managed.added", f"managed:{spec.name}", {
        "dns_names": row.dns_names, "ip_addresses": row.ip_addresses, **({"uris": row.uris} if row.uris else {}),
        "issuer": row.issuer, "profile": row.profile,
        "key_algorithm": row.key_algorithm, "validity_days": row.validity_days, "owner": row.owner, "tags": row.tags,
        "renew_before_days": row.renew_before_days, "use_ari": row.use_ari})], now)
    return row


def get(session: Session, name: str) -> ManagedCertificate:
    row = session.exec(select(ManagedCertificate).where(ManagedCertificate.name == name)).first()
    if row is None:
        raise NotFoundError(f"no managed certificate named {name!r}")
    return row


def in_service(session: Session, name: str) -> ManagedCertificate:
    """The managed certificate ``name``, refused (PermanentError) when it is retired or being retired:
    such a one is not renewed or deployed (certpilot.retiring)."""
    row = get(session, name)
    if row.status == "retiring":
        raise PermanentError(f"managed certificate {name} is being retired: restore it (`certpilot managed restore "
                             f"{name}`) before renewing or deploying it")
    if row.status != "active":
        raise PermanentError(f"managed certificate {name} is {row.status}: it is no longer renewed or deployed")
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
                        .order_by(col(Certificate.not_before).desc(), col(Certificate.created_at).desc())
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
    return ({("DNS", n.lower()) for n in managed.dns_names} | {("IP", ip) for ip in managed.ip_addresses}
            | {("URI", u) for u in managed.uris or ()})


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
    current: dict[int | None, CurrentCertificate] = {}  # by ManagedCertificate.id
    for start in range(0, len(ids), 500):
        found = session.execute(
            sa.select(col(Certificate.managed_certificate_id), col(Certificate.fingerprint_sha256),
                      col(Certificate.serial_hex), col(Certificate.not_before), col(Certificate.not_after),
                      col(Certificate.created_at))
            .where(col(Certificate.managed_certificate_id).in_(ids[start:start + 500]),
                   col(Certificate.status) == "active")).all()
        for row in sorted(found, key=lambda r: (r.not_before, r.created_at)):
            current[row.managed_certificate_id] = CurrentCertificate(row.fingerprint_sha256, row.serial_hex,
                                                                     row.not_before, row.not_after)
    carried: dict[str, set[tuple[str, str]]] = {}
    fps = [c.fingerprint_sha256 for c in current.values()]
    for start in range(0, len(fps), 500):
        for fp, kind, value in session.execute(
                sa.select(col(SubjectAltName.certificate_fingerprint), col(SubjectAltName.kind),
                          col(SubjectAltName.value))
                .where(col(SubjectAltName.certificate_fingerprint).in_(fps[start:start + 500]))):
            carried.setdefault(fp, set()).add((kind, value.lower() if kind == "DNS" else value))
    out = []
    earliest = dt.datetime.min.replace(tzinfo=dt.timezone.utc)
    for m in rows:
        cur = current.get(m.id)
        order = earliest  # when it fell (or falls) due: the most overdue come first
        # A due one's renew_at is when it fell due, not ``now``: asking twice gives the same answer.
        if cur is None:  # due since it was defined
            decision = RenewalDecision(True, m.created_at, "no certificate issued yet")
        elif missing := sorted(_wanted_names(m) - carried.get(cur.fingerprint_sha256, set())):
            # due since its names changed, which is not recorded: at the latest since its certificate began
            decision = RenewalDecision(True, cur.not_before, "its certificate does not cover "
                                       + ", ".join(f"{k}:{v}" for k, v in missing) + " (names changed)")
        else:
            policy = RenewalPolicy(renew_before=dt.timedelta(days=m.renew_before_days)
                                   if m.renew_before_days is not None else None)
            window = ari_window(m, now)
            decision = decide(cur.not_before, cur.not_after, policy, cur.fingerprint_sha256, now, window)
            order = min(renewal_time(cur.not_before, cur.not_after, policy, cur.fingerprint_sha256, window)[0],
                        cur.not_after)
            if decision.due:
                decision = RenewalDecision(True, order, decision.reason)
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
        session.execute(sa.update(ManagedCertificate).where(col(ManagedCertificate.name) == name).values(
            ari_start=window.start if window else None, ari_end=window.end if window else None, ari_checked_at=now))
    return len(windows)


def stale_renewal_info(session: Session, now: dt.datetime | None = None) -> list[tuple[ManagedCertificate, Certificate]]:
    """Managed certificates that use ARI, have a current certificate, and whose window is missing or old."""
    now = now or utcnow()
    wanted = {m.id: m for m in list_managed(session)
              if m.use_ari and (m.ari_checked_at is None or now - m.ari_checked_at > ARI_FRESH_FOR / 2)}
    newest: dict[int | None, Certificate] = {}  # by ManagedCertificate.id, as ``wanted``
    ids = list(wanted)
    for start in range(0, len(ids), 500):
        for cert in session.exec(select(Certificate).where(
                col(Certificate.managed_certificate_id).in_(ids[start:start + 500]),
                col(Certificate.status) == "active")).all():
            held = newest.get(cert.managed_certificate_id)
            if held is None or (cert.not_before, cert.created_at) > (held.not_before, held.created_at):
                newest[cert.managed_certificate_id] = cert
    return [(wanted[i], newest[i]) for i in ids if i in newest]


def uncovered_names(leaf: x509.Certificate, managed: ManagedCertificate) -> list[str]:
    """The managed certificate's names that ``leaf`` does not carry as a SAN."""
    try:
        sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        sans = x509.SubjectAlternativeName([])
    have = {("DNS", n.lower().rstrip(".")) for n in sans.get_values_for_type(x509.DNSName)}
    have |= {("IP", str(ip)) for ip in sans.get_values_for_type(x509.IPAddress)}
    have |= {("URI", u) for u in sans.get_values_for_type(x509.UniformResourceIdentifier)}
    return [f"{kind}:{value}" for kind, value in sorted(_wanted_names(managed) - have)]
