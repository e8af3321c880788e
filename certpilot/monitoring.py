"""Monitoring: what is served at every place against what should be, and what someone must be told.

Places (``places``): every endpoint location of the inventory (``tls://host:port?sni=name``, not a ghost)
and every target of an active managed certificate (``target:<managed>/<target>``). A place names what it
should serve (``expected``: the current certificate of the managed certificate it belongs to, for a
target else its desired one), the name the served leaf must match, and who owns it. A target's TLS
address comes from its deployer (the task layer fills it in); a target without one (a store: ACM, Key
Vault) is read back through its deployer instead.

What the probes saw at each place is an ``Observed`` (served certificate, TLS version, whether the chain
is complete to a trust anchor, whether the name matches, revocation status, or why nothing could be
read). ``evaluate`` turns places, observations and the inventory's certificates into an ``Evaluation``
at a given time: one ``Check`` per place (the EndpointCheck row), alert ``Finding``s, and the
certificates that nothing serves any more, shown apart.

Alert objects: place conditions (wrong certificate, incomplete chain, host name mismatch, weak TLS,
unreachable) are about the place (``place:<place>``); certificate conditions (expiring, expired, revoked
and served) are about the certificate (``certificate:<sha256>``), so one certificate seen at three places
by three sources is one alert. A certificate is served when a probe saw it this run, or when it has a
location that is not a ghost and that this run did not see serving something else, unless it was
superseded by its managed replacement. A certificate whose every location is a ghost, or that was
superseded (and is not seen on the wire), is not served any more: it raises no expiry alert.

The silent stalls, each a pure function of the time: ``renewal_findings`` (a managed certificate whose
last renewal failed, RENEWAL_FAILED; or past its renewal time by more than a grace without a renewal,
RENEWAL_OVERDUE), ``stale_sources`` (a discovery source whose last complete run is older than two of its
intervals), ``stuck_runs`` (a renewal or deploy run Pending, Running or Late beyond its deadline, as read
from Prefect by the task layer), ``unreachable_findings`` (a CA, a CRL or OCSP URL, an SSH host that did
not answer).

``record_checks`` replaces the EndpointCheck rows (one per place). ``apply_policy`` evaluates the
certificates served against the policy's rules and each place checked on the wire against its endpoint
rules (``endpoint_facts``: the TLS version, the chain, the host name), storing the violations per
certificate and per place. ``monitor_markdown`` is the monitor run's artifact. No Prefect, no network here.
"""

from __future__ import annotations

import datetime as dt
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col, select

from certpilot import audit, violations
from certpilot.alerts import (
    FIXED_SEVERITY,
    Bands,
    Condition,
    Finding,
    Scope,
    Severity,
    expiry_severity,
    renewal_failure_severity,
    renewal_overdue_severity,
)
from certpilot.managed import Scheduled
from certpilot.ca import CAUrls
from certpilot.models import (Certificate, CertificateAuthority, EndpointCheck, Location, ManagedCertificate, SourceRun,
                              SubjectAltName, Target)
from certpilot.names import is_ip_address
from certpilot.policy import EndpointFacts, Facts, Policy
from certpilot.views import escape

WEAK_TLS_VERSIONS = frozenset({"SSLv2", "SSLv3", "TLSv1", "TLSv1.1"})
PLACE_CONDITIONS = frozenset({Condition.WRONG_CERTIFICATE, Condition.CHAIN_INCOMPLETE, Condition.HOSTNAME_MISMATCH,
                              Condition.WEAK_TLS})
CERTIFICATE_CONDITIONS = frozenset({Condition.EXPIRING, Condition.EXPIRED, Condition.REVOKED_SERVED})
RENEWAL_CONDITIONS = frozenset({Condition.RENEWAL_FAILED, Condition.RENEWAL_OVERDUE})
NOT_A_PROBLEM_HERE = frozenset({Condition.EXPIRING})  # listed on a check, but the place is still ok
SHOWN = 50  # places listed in a finding's details
_CHUNK = 500


# ---------------------------------------------------------------------------------------------- records

@dataclass(frozen=True)
class Place:
    """One place to check. ``host``/``port``/``sni``: where to handshake (None: read back through the
    target's deployer); ``hostname``: the name the leaf must match (None: not checked); ``expected``: the
    fingerprint that should be served there (None: nothing is expected, only what is served is judged)."""

    place: str
    host: str | None = None
    port: int | None = None
    sni: str | None = None
    hostname: str | None = None
    expected: str | None = None
    managed: str | None = None
    target: str | None = None
    block: str | None = None
    owner: str | None = None
    tags: Mapping[str, str] = field(default_factory=dict)

    @property
    def object(self) -> str:
        return f"place:{self.place}"

    @property
    def is_target(self) -> bool:
        return self.place.startswith("target:")


@dataclass(frozen=True)
class ServedCertificate:
    """The leaf a place serves, as far as it is known (a store's read-back gives only the fingerprint,
    completed from the inventory when it knows it)."""

    fingerprint: str
    subject: str = ""
    not_after: dt.datetime | None = None
    names: tuple[str, ...] = ()


@dataclass(frozen=True)
class Observed:
    """What a probe found at ``place``: the served certificate (None when nothing could be read, and
    ``error`` says why), its TLS version, the chain's problem, the host name's problem, and the
    revocation status (good, revoked, unknown) with the CA's words. ``method``: tls or api."""

    place: str
    served: ServedCertificate | None = None
    error: str | None = None
    tls_version: str | None = None
    chain_problem: str | None = None
    hostname_problem: str | None = None
    revocation: str | None = None
    revocation_detail: str | None = None
    method: str = "tls"


@dataclass(frozen=True)
class KnownCertificate:
    """A certificate of the inventory that has locations: what its alerts say about it and whom they go to."""

    fingerprint: str
    name: str  # how people know it: the managed certificate's name, else a DNS name, else the subject
    subject: str
    not_after: dt.datetime
    status: str
    owner: str | None
    tags: Mapping[str, str]
    managed: str | None
    names: tuple[str, ...]
    locations: tuple[tuple[str, bool], ...]  # (locator, ghost)


@dataclass(frozen=True)
class Check:
    """What one place showed (an EndpointCheck row). ``problems``: the conditions found there; ``ok``: it
    serves what it should, valid, complete, matching and on TLS 1.2 or later (expiring soon is listed
    but still ok)."""

    place: str
    served: str | None
    expected: str | None
    ok: bool
    problems: tuple[str, ...]
    tls_version: str | None
    revocation: str | None
    error: str | None
    subject: str = ""
    not_after: dt.datetime | None = None
    method: str = "tls"


@dataclass(frozen=True)
class NotServed:
    """A certificate that nothing serves any more, and why (no expiry alert for it)."""

    fingerprint: str
    name: str
    not_after: dt.datetime
    why: str
    locations: tuple[str, ...]


@dataclass(frozen=True)
class Evaluation:
    checks: tuple[Check, ...]
    findings: tuple[Finding, ...]
    not_served: tuple[NotServed, ...]


@dataclass(frozen=True)
class Reachability:
    """Whether a service answered: ``object`` its alert object (``issuer:<block>``, ``host:<host:port>``),
    ``what`` it is in words, ``where`` its address; ``error`` None when it answered."""

    object: str
    what: str
    where: str
    error: str | None = None
    owner: str | None = None


@dataclass(frozen=True)
class RunState:
    """A renewal or deploy flow run that has not ended, as Prefect shows it: ``state`` Pending, Running or
    Late, ``since`` when it entered it (a Late run: when it was due)."""

    id: str
    name: str
    flow: str
    state: str
    since: dt.datetime
    tags: tuple[str, ...] = ()
    url: str | None = None


# ------------------------------------------------------------------------------------------------ places

def parse_tls_locator(locator: str) -> tuple[str, int, str | None]:
    """``tls://host:port?sni=name`` (IPv6 in brackets) -> (host, port, sni); ValueError otherwise."""
    parts = urllib.parse.urlsplit(locator)
    if parts.scheme != "tls" or not parts.hostname:
        raise ValueError(f"{locator!r} is not a tls:// locator")
    port = parts.port or 443
    sni = urllib.parse.parse_qs(parts.query).get("sni", [None])[0]
    return parts.hostname, port, sni or None


def location_place(locator: str) -> Place:
    """The place of an endpoint location: where to handshake, and the name the leaf must match (its SNI, else
    its host unless that is an IP address). ValueError for a locator that is not ``tls://``."""
    host, port, sni = parse_tls_locator(locator)
    return Place(locator, host, port, sni, sni or (None if is_ip_address(host) else host))


def _owner_and_tags(cert_owner: str | None, cert_tags: Mapping[str, str] | None, managed_owner: str | None,
                    managed_tags: Mapping[str, str] | None) -> tuple[str | None, dict[str, str]]:
    return cert_owner or managed_owner, {**(managed_tags or {}), **(cert_tags or {})}


def current_fingerprints(schedule: Sequence[Scheduled]) -> dict[str, str]:
    """Each managed certificate's current certificate, by managed name."""
    return {s.managed.name: s.current.fingerprint_sha256 for s in schedule if s.current is not None}


def places(session: Session, schedule: Sequence[Scheduled]) -> list[Place]:
    """Every endpoint location (not a ghost) and every target of an active managed certificate, by place."""
    current = current_fingerprints(schedule)
    m, c, loc = ManagedCertificate, Certificate, Location
    found: dict[str, Place] = {}
    rows = session.execute(
        sa.select(col(loc.locator), col(c.owner), col(c.tags), col(m.name), col(m.owner), col(m.tags))
        .join(c, col(c.fingerprint_sha256) == col(loc.certificate_fingerprint))
        .outerjoin(m, col(m.id) == col(c.managed_certificate_id))
        .where(col(loc.ghost).is_(False), col(loc.locator).like("tls://%"))
        .order_by(col(loc.locator), col(loc.last_seen).desc())).all()
    for locator, cert_owner, cert_tags, managed_name, managed_owner, managed_tags in rows:
        held = found.get(locator)
        if held is not None and (held.managed or not managed_name):
            continue  # the newest location first; one that belongs to a managed certificate wins
        try:
            endpoint = location_place(locator)
        except ValueError:
            continue
        owner, tags = _owner_and_tags(cert_owner, cert_tags, managed_owner, managed_tags)
        found[locator] = replace(endpoint, expected=current.get(managed_name) if managed_name else None,
                                 managed=managed_name, owner=owner, tags=tags)
    for target, name, owner, tags in session.execute(
            sa.select(Target, col(m.name), col(m.owner), col(m.tags))
            .join(m, col(m.id) == col(Target.managed_certificate_id))
            .where(col(m.status) == "active").order_by(col(m.name), col(Target.name))).all():
        place = f"target:{name}/{target.name}"
        found[place] = Place(place, expected=current.get(name) or target.desired_fingerprint, managed=name,
                             target=target.name, block=target.block, owner=owner, tags=dict(tags or {}))
    return list(found.values())


def known_certificates(session: Session, also: Iterable[str] = ()) -> dict[str, KnownCertificate]:
    """Every certificate with a location (and those in ``also``, e.g. what the probes saw served), by
    fingerprint, with its locations and the names people know it by."""
    located: dict[str, list[tuple[str, bool]]] = {}
    for fingerprint, locator, ghost in session.execute(
            sa.select(col(Location.certificate_fingerprint), col(Location.locator), col(Location.ghost))):
        located.setdefault(fingerprint, []).append((locator, bool(ghost)))
    return _describe(session, sorted(set(located) | set(also)), located)


def served_from_inventory(session: Session, fingerprints: Iterable[str]) -> dict[str, ServedCertificate]:
    """What the inventory knows of the certificates with these fingerprints (a store's read-back)."""
    return {k.fingerprint: ServedCertificate(k.fingerprint, k.subject, k.not_after, k.names)
            for k in _describe(session, sorted(set(fingerprints)), {}).values()}


def _describe(session: Session, fingerprints: Sequence[str],
              located: Mapping[str, list[tuple[str, bool]]]) -> dict[str, KnownCertificate]:
    c, m = Certificate, ManagedCertificate
    known: dict[str, KnownCertificate] = {}
    for start in range(0, len(fingerprints), _CHUNK):
        chunk = fingerprints[start:start + _CHUNK]
        dns: dict[str, list[str]] = {}
        for fingerprint, value in session.execute(
                sa.select(col(SubjectAltName.certificate_fingerprint), col(SubjectAltName.value))
                .where(col(SubjectAltName.certificate_fingerprint).in_(chunk), col(SubjectAltName.kind) == "DNS")):
            dns.setdefault(fingerprint, []).append(value)
        for row in session.execute(
                sa.select(col(c.fingerprint_sha256), col(c.subject), col(c.not_after), col(c.status), col(c.owner),
                          col(c.tags), col(m.name), col(m.owner), col(m.tags))
                .outerjoin(m, col(m.id) == col(c.managed_certificate_id))
                .where(col(c.fingerprint_sha256).in_(chunk))).all():
            names = tuple(sorted(dns.get(row[0], ()))[:10])
            owner, tags = _owner_and_tags(row[4], row[5], row[7], row[8])
            known[row[0]] = KnownCertificate(row[0], row[6] or (names[0] if names else row[1]), row[1], row[2],
                                             row[3], owner, tags, row[6], names, tuple(sorted(located.get(row[0], ()))))
    return known


def targets(session: Session) -> dict[str, Target]:
    """The targets of active managed certificates, by place (``target:<managed>/<target>``)."""
    m = ManagedCertificate
    return {f"target:{name}/{target.name}": target for target, name in session.execute(
        sa.select(Target, col(m.name)).join(m, col(m.id) == col(Target.managed_certificate_id))
        .where(col(m.status) == "active")).all()}


def private_ca_roots(session: Session) -> list[bytes]:
    """The DER of the root certificate of every private CA in the inventory: trust anchors of the monitor."""
    root = col(CertificateAuthority.root_fingerprint) == col(Certificate.fingerprint_sha256)
    return list(session.execute(sa.select(col(Certificate.der)).join(CertificateAuthority, root)).scalars())


def private_ca_crl_urls(session: Session) -> dict[str, str]:
    """Where each private CA's CRL is served, by CA name (``certpilot serve`` answers there)."""
    return {row.name: CAUrls.of(row.base_url, row.name).crl
            for row in session.execute(sa.select(col(CertificateAuthority.name), col(CertificateAuthority.base_url)))}


def source_runs(session: Session) -> list[SourceRun]:
    return list(session.exec(select(SourceRun).order_by(col(SourceRun.source))).all())


def owners(schedule: Sequence[Scheduled]) -> dict[str, tuple[str | None, dict[str, str]]]:
    """(owner, tags) of each managed certificate, by name."""
    return {s.managed.name: (s.managed.owner, dict(s.managed.tags or {})) for s in schedule}


# -------------------------------------------------------------------------------------------- evaluation

def _iso(value: dt.datetime | None) -> str | None:
    return value.astimezone(dt.timezone.utc).isoformat().replace("+00:00", "Z") if value else None


def _when(value: dt.datetime) -> str:
    return value.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _place_finding(place: Place, condition: Condition, summary: str, **details: Any) -> Finding:
    facts: dict[str, Any] = {"place": place.place, "served_at": [place.place]}
    if place.managed:
        facts["managed"] = place.managed
        facts["certificate"] = place.managed
    facts.update({k: v for k, v in details.items() if v is not None})
    return Finding(place.object, condition, FIXED_SEVERITY[condition], summary, place.owner, dict(place.tags), facts)


def evaluate(places_checked: Sequence[Place], observed: Sequence[Observed], known: Mapping[str, KnownCertificate],
             now: dt.datetime, bands: Bands = Bands()) -> Evaluation:
    """The checks, findings and certificates not served any more, at ``now``. Every place gets a check;
    one without an observation is reported as not checked."""
    seen = {o.place: o for o in observed}
    checks: list[Check] = []
    findings: list[Finding] = []
    served_at: dict[str, list[str]] = {}
    served_facts: dict[str, ServedCertificate] = {}
    place_owner: dict[str, Place] = {}
    revoked_by_ca: dict[str, str] = {}
    answered: set[str] = set()
    for place in places_checked:
        o = seen.get(place.place) or Observed(place.place, error="not checked (the probe gave no answer for it)")
        if o.served is None:
            error = o.error or "nothing served"
            findings.append(_place_finding(place, Condition.UNREACHABLE, f"{place.place} did not answer: {error}",
                                           error=error))
            checks.append(Check(place.place, None, place.expected, False, (Condition.UNREACHABLE.value,), None,
                                None, error, method=o.method))
            continue
        answered.add(place.place)
        served = o.served
        served_at.setdefault(served.fingerprint, []).append(place.place)
        if served.fingerprint not in served_facts or served_facts[served.fingerprint].not_after is None:
            served_facts[served.fingerprint] = served
        place_owner.setdefault(served.fingerprint, place)
        problems: list[Condition] = []
        what = f"{served.subject or served.fingerprint[:16]} ({served.fingerprint[:16]})"
        if place.expected and served.fingerprint != place.expected:
            problems.append(Condition.WRONG_CERTIFICATE)
            findings.append(_place_finding(
                place, Condition.WRONG_CERTIFICATE, f"{place.place} serves {what}, not the expected "
                f"{place.expected[:16]}", fingerprint=served.fingerprint, expected=place.expected))
        if o.chain_problem:
            problems.append(Condition.CHAIN_INCOMPLETE)
            findings.append(_place_finding(place, Condition.CHAIN_INCOMPLETE, f"{place.place}: {o.chain_problem}",
                                           fingerprint=served.fingerprint))
        if o.hostname_problem:
            problems.append(Condition.HOSTNAME_MISMATCH)
            findings.append(_place_finding(place, Condition.HOSTNAME_MISMATCH, f"{place.place}: {o.hostname_problem}",
                                           fingerprint=served.fingerprint, hostname=place.hostname))
        if o.tls_version in WEAK_TLS_VERSIONS:
            problems.append(Condition.WEAK_TLS)
            findings.append(_place_finding(place, Condition.WEAK_TLS, f"{place.place} speaks {o.tls_version}, "
                                           "below TLS 1.2", tls_version=o.tls_version))
        if served.not_after is not None:
            expiry = expiry_severity(served.not_after, now, bands)
            if expiry is not None:
                problems.append(expiry[0])
        if o.revocation == "revoked":
            problems.append(Condition.REVOKED_SERVED)
            revoked_by_ca[served.fingerprint] = o.revocation_detail or "revoked"
        ok = not set(problems) - NOT_A_PROBLEM_HERE
        checks.append(Check(place.place, served.fingerprint, place.expected, ok, tuple(p.value for p in problems),
                            o.tls_version, o.revocation, None, served.subject, served.not_after, o.method))

    not_served: list[NotServed] = []
    for fingerprint in sorted(set(known) | set(served_at)):
        cert = known.get(fingerprint)
        wire = served_at.get(fingerprint, [])
        still = [] if cert is None or cert.status == "superseded" else [
            locator for locator, ghost in cert.locations if not ghost and locator not in answered]
        where = sorted(set(wire) | set(still))
        if not where:
            if cert is not None and cert.locations:
                not_served.append(NotServed(fingerprint, cert.name, cert.not_after, _why_not_served(cert, answered),
                                            tuple(loc for loc, _ in cert.locations)))
            continue
        findings += _certificate_findings(fingerprint, cert, served_facts.get(fingerprint),
                                          place_owner.get(fingerprint), where, revoked_by_ca.get(fingerprint), now,
                                          bands)
    return Evaluation(tuple(checks), tuple(findings), tuple(not_served))


def _why_not_served(cert: KnownCertificate, answered: set[str]) -> str:
    if cert.status == "superseded":
        return "superseded by its managed replacement"
    if all(ghost for _, ghost in cert.locations):
        return "every location is a ghost (not seen again by its source)"
    return "its places now serve another certificate"


def _certificate_findings(fingerprint: str, cert: KnownCertificate | None, seen: ServedCertificate | None,
                          place: Place | None, where: Sequence[str], revoked: str | None, now: dt.datetime,
                          bands: Bands) -> list[Finding]:
    not_after = cert.not_after if cert is not None else (seen.not_after if seen is not None else None)
    if cert is not None:
        name, owner, tags, names, managed = cert.name, cert.owner, dict(cert.tags), cert.names, cert.managed
    else:
        names = seen.names if seen is not None else ()
        name = names[0] if names else (seen.subject if seen is not None and seen.subject else fingerprint[:16])
        owner, tags, managed = (place.owner, dict(place.tags), place.managed) if place is not None else (None, {}, None)
    if revoked is None and cert is not None and cert.status == "revoked":
        revoked = "revoked in the inventory"
    details: dict[str, Any] = {"certificate": name, "fingerprint": fingerprint, "not_after": _iso(not_after),
                               "served_at": list(where[:SHOWN]), "places": len(where), "names": list(names)}
    if managed:
        details["managed"] = managed
    obj = f"certificate:{fingerprint}"
    places = f"{len(where)} place{'s' if len(where) != 1 else ''}"
    out = []
    expiry = expiry_severity(not_after, now, bands) if not_after is not None else None
    if expiry is not None and not_after is not None:
        condition, severity = expiry
        if condition is Condition.EXPIRED:
            summary = f"{name} expired on {_when(not_after)} and is still served at {places}"
        else:
            left = (not_after - now).total_seconds() / 86400
            summary = f"{name} expires on {_when(not_after)} ({left:.1f} days left), served at {places}"
        out.append(Finding(obj, condition, severity, summary, owner, tags, details))
    if revoked is not None:
        out.append(Finding(obj, Condition.REVOKED_SERVED, FIXED_SEVERITY[Condition.REVOKED_SERVED],
                           f"{name} is revoked ({revoked}) and still served at {places}", owner, tags,
                           {**details, "revocation": revoked}))
    return out


# The conditions each part of a monitor run decides: a part that could not run leaves its conditions out
# of the run's scope, so that its alerts neither resolve nor open by mistake.
CHECKS: Mapping[str, frozenset[Condition]] = {
    "places": PLACE_CONDITIONS | CERTIFICATE_CONDITIONS | {Condition.UNREACHABLE},
    "services": frozenset({Condition.UNREACHABLE}),
    "renewals": RENEWAL_CONDITIONS,
    "runs": frozenset({Condition.RUN_STUCK}),
    "sources": frozenset({Condition.SOURCE_STALE}),
}


def monitor_scope(failed: Iterable[str] = ()) -> Scope:
    """What a monitor run checked: every condition it decides, but those of the parts in ``failed``."""
    left_out = frozenset().union(*(CHECKS[part] for part in failed if part in CHECKS))
    return Scope(frozenset().union(*CHECKS.values()) - left_out)


# --------------------------------------------------------------------------------------------- stalls

def renewal_findings(schedule: Sequence[Scheduled], now: dt.datetime, grace: dt.timedelta) -> list[Finding]:
    """RENEWAL_FAILED for each managed certificate whose last renewal attempt failed (severity by the
    time its current certificate has left); otherwise RENEWAL_OVERDUE for one due for longer than
    ``grace`` (renew-due runs hourly: a due certificate is normally renewed within the hour)."""
    out = []
    for s in schedule:
        m, current = s.managed, s.current
        not_after = current.not_after if current is not None else None
        details: dict[str, Any] = {"certificate": m.name, "managed": m.name, "names": list(m.dns_names),
                                   "issuer": m.issuer}
        if current is not None:
            details.update(fingerprint=current.fingerprint_sha256, not_after=_iso(current.not_after))
        if m.last_error:
            severity = renewal_failure_severity(not_after, now) if not_after is not None else Severity.TICKET
            kept = f"; {current.fingerprint_sha256[:16]} (expires {_when(current.not_after)}) stays in service" \
                if current is not None else "; it has no certificate in service"
            out.append(Finding(f"managed:{m.name}", Condition.RENEWAL_FAILED, severity,
                               f"renewal of {m.name} failed: {m.last_error}"[:400] + kept, m.owner, dict(m.tags),
                               {**details, "error": m.last_error[:400],
                                "last_attempt_at": _iso(m.last_attempt_at)}))
        elif s.decision.due and now - s.decision.renew_at > grace:
            severity = renewal_overdue_severity(not_after, now) if not_after is not None else Severity.TICKET
            late = (now - s.decision.renew_at).total_seconds() / 3600
            out.append(Finding(f"managed:{m.name}", Condition.RENEWAL_OVERDUE, severity,
                               f"{m.name} was due for renewal on {_when(s.decision.renew_at)} ({late:.1f} h ago) "
                               f"and has not been renewed: {s.decision.reason}", m.owner, dict(m.tags),
                               {**details, "due_since": _iso(s.decision.renew_at)}))
    return out


def stale_sources(runs: Iterable[SourceRun], interval: dt.timedelta, now: dt.datetime) -> list[Finding]:
    """SOURCE_STALE for each discovery source (SourceRun rows) whose last complete run is older than two
    ``interval``s, or that has failed and never completed."""
    out = []
    for run in runs:
        completed, failed = run.last_completed_at, run.last_failed_at
        if completed is not None and now - completed <= 2 * interval:
            continue
        if completed is None and failed is None:
            continue  # its first run has not ended yet
        error = f"; last error: {run.last_error}" if run.last_error else ""
        if completed is None:
            summary = f"discovery source {run.source} has never completed a run{error}"
        else:
            hours = (now - completed).total_seconds() / 3600
            summary = (f"discovery source {run.source} last completed a run {hours:.1f} h ago, more than two of its "
                       f"intervals ({interval.total_seconds() / 3600:g} h){error}")
        out.append(Finding(f"source:{run.source}", Condition.SOURCE_STALE, FIXED_SEVERITY[Condition.SOURCE_STALE],
                           summary[:600], None, {}, {"source": run.source, "block": run.block,
                                                     "last_completed_at": _iso(completed),
                                                     "last_failed_at": _iso(failed), "error": run.last_error}))
    return out


def stuck_runs(runs: Iterable[RunState], deadlines: Mapping[str, dt.timedelta], now: dt.datetime,
               owners: Mapping[str, tuple[str | None, Mapping[str, str]]]) -> list[Finding]:
    """RUN_STUCK for each run in its state longer than its flow's deadline (``deadlines`` by flow name;
    flows not named are not judged). ``owners``: managed name -> (owner, tags), for runs tagged
    ``certificate:<name>``."""
    out = []
    for run in runs:
        deadline = deadlines.get(run.flow)
        if deadline is None or now - run.since <= deadline:
            continue
        name = next((t.removeprefix("certificate:") for t in run.tags if t.startswith("certificate:")), None)
        owner, tags = owners.get(name, (None, {})) if name else (None, {})
        minutes = (now - run.since).total_seconds() / 60
        details: dict[str, Any] = {"flow": run.flow, "flow_run": run.name, "state": run.state,
                                   "since": _iso(run.since), "deadline_minutes": deadline.total_seconds() / 60}
        if name:
            details.update(certificate=name, managed=name)
        if run.url:
            details["run_url"] = run.url
        out.append(Finding(f"flow-run:{run.id}", Condition.RUN_STUCK, FIXED_SEVERITY[Condition.RUN_STUCK],
                           f"{run.flow} run {run.name} has been {run.state} for {minutes:.0f} min, beyond its "
                           f"deadline of {deadline.total_seconds() / 60:.0f} min", owner, dict(tags), details))
    return out


def unreachable_findings(results: Iterable[Reachability]) -> list[Finding]:
    """UNREACHABLE for each service that did not answer."""
    return [Finding(r.object, Condition.UNREACHABLE, FIXED_SEVERITY[Condition.UNREACHABLE],
                    f"{r.what} ({r.where}) did not answer: {r.error}"[:600], r.owner, {},
                    {"service": r.what, "where": r.where, "error": r.error})
            for r in results if r.error is not None]


# -------------------------------------------------------------------------------------------- records

def record_checks(session: Session, checks: Sequence[Check], now: dt.datetime, flow_run_id: str | None) -> None:
    """Replace the EndpointCheck rows with ``checks`` (one per place; places no longer checked go)."""
    table = EndpointCheck.__table__  # type: ignore[attr-defined]
    session.connection().execute(sa.delete(table))
    rows = [{"place": c.place, "checked_at": now, "served_fingerprint": c.served, "expected_fingerprint": c.expected,
             "ok": c.ok, "problems": list(c.problems), "tls_version": c.tls_version, "revocation": c.revocation,
             "error": c.error[:600] if c.error else None, "flow_run_id": flow_run_id} for c in checks]
    for start in range(0, len(rows), _CHUNK):
        session.connection().execute(sa.insert(table), rows[start:start + _CHUNK])


# --------------------------------------------------------------------------------------------- policy

def endpoint_facts(places_checked: Sequence[Place], observed: Sequence[Observed],
                   facts: Mapping[str, Facts]) -> list[EndpointFacts]:
    """What each place checked on the wire showed, for the endpoint rules: its TLS version, whether the
    chain was complete (the probe judges every chain it reads), whether the leaf matches the place's host
    name (None when the place has no name to match). Places read back through an API (a store), places
    that served nothing, and places whose certificate ``facts`` does not hold (not in the inventory, a CA
    certificate) have none."""
    seen = {o.place: o for o in observed}
    out = []
    for place in places_checked:
        o = seen.get(place.place)
        if o is None or o.served is None or o.method != "tls":
            continue
        certificate = facts.get(o.served.fingerprint)
        if certificate is None:
            continue
        out.append(EndpointFacts(place.place, certificate, o.tls_version, o.chain_problem is None,
                                 None if not place.hostname else o.hostname_problem is None))
    return out


def apply_policy(session: Session, policy: Policy, places_checked: Sequence[Place], observed: Sequence[Observed],
                 actor: audit.Actor, now: dt.datetime) -> tuple[violations.EvaluationSummary,
                                                                violations.EvaluationSummary]:
    """Evaluate the certificates served at the places checked, then those places' endpoint rules; the
    violations are stored (certificate rules per certificate, endpoint rules per place). Returns the two
    evaluations' summaries (certificates, places)."""
    served = sorted({o.served.fingerprint for o in observed if o.served is not None})
    certificates = violations.evaluate_certificates(session, policy, actor, served, now)
    facts = {f.fingerprint_sha256: f for f in violations.facts_for(session, policy, served, now)
             if f.fingerprint_sha256 is not None}
    endpoints = violations.evaluate_endpoints(session, policy, endpoint_facts(places_checked, observed, facts),
                                              actor, now)
    return certificates, endpoints


# ------------------------------------------------------------------------------------------- artifact

def monitor_markdown(evaluation: Evaluation, findings: Sequence[Finding], failures: Sequence[str], now: dt.datetime,
                     shown: int = 200) -> str:
    """The monitor run's artifact: what each place serves against what it should, the problems found, the
    certificates not served any more (apart), and what could not be checked."""
    checks = evaluation.checks
    bad = [c for c in checks if not c.ok]
    lines = [f"# Monitor run at {_when(now)}", "",
             f"**{len(checks)}** places checked: **{len(checks) - len(bad)}** ok, "
             f"**{sum(1 for c in bad if c.error)}** unreachable, **{sum(1 for c in bad if not c.error)}** with a "
             f"problem; **{len(findings)}** findings; **{len(evaluation.not_served)}** certificates not served any "
             "more.", ""]
    if failures:
        lines += ["## Checks that failed (their alerts were neither raised nor resolved)", ""]
        lines += [f"- {escape(f)}" for f in failures] + [""]
    lines += ["## Served against expected", "", "| place | serves | expected | expires | TLS | revocation | "
              "problems |", "|---|---|---|---|---|---|---|"]
    ordered = sorted(checks, key=lambda c: (c.ok, c.place))
    for c in ordered[:shown]:
        serves = f"{c.subject or ''} {c.served[:16]}" if c.served else f"nothing: {c.error or ''}"
        lines.append(f"| {escape(c.place)} | {escape(serves)} | {escape((c.expected or 'anything')[:16])} | "
                     f"{escape(_when(c.not_after) if c.not_after else '')} | {escape(c.tls_version or '')} | "
                     f"{escape(c.revocation or '')} | {escape(', '.join(c.problems) or 'ok')} |")
    if len(ordered) > shown:
        lines.append(f"| ... and {len(ordered) - shown} more | | | | | | |")
    if findings:
        lines += ["", "## Findings", "", "| severity | condition | object | summary | owner |", "|---|---|---|---|---|"]
        for f in sorted(findings, key=lambda f: (-f.severity.rank(), f.condition.value, f.object))[:shown]:
            lines.append(f"| {f.severity.value} | {f.condition.value} | {escape(f.object)} | {escape(f.summary)} | "
                         f"{escape(f.owner or '')} |")
    lines += ["", "## Not served any more (no expiry alert)", ""]
    if evaluation.not_served:
        lines += ["| certificate | fingerprint | expires | why | locations |", "|---|---|---|---|---|"]
        for n in evaluation.not_served[:shown]:
            lines.append(f"| {escape(n.name)} | {n.fingerprint[:16]} | {escape(_when(n.not_after))} | "
                         f"{escape(n.why)} | "
                         f"{escape(', '.join(n.locations[:5]))} |")
        if len(evaluation.not_served) > shown:
            lines.append(f"| ... and {len(evaluation.not_served) - shown} more | | | | |")
    else:
        lines.append("None.")
    return "\n".join(lines)
