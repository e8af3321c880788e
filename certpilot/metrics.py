"""Prometheus metrics of the inventory: the text that /metrics serves.

Names follow the tools whose dashboards and alert rules operators already have:

- x509-certificate-exporter, one series per certificate in service: ``x509_cert_not_after``,
  ``x509_cert_not_before``, ``x509_cert_expired``, with its labels ``subject_CN``, ``subject_O``,
  ``issuer_CN``, ``issuer_O`` and ``serial_number`` (decimal, as that exporter writes it), and certpilot's
  own ``owner`` (empty when none), ``managed`` (``true``/``false``) and ``fingerprint`` (the SHA-256 that
  identifies the certificate in the inventory: ``certpilot inventory show FINGERPRINT``).
  "In service" means status ``active`` and not only seen at ghost locations (a certificate whose every
  location is a ghost is served nowhere any more; one with no location at all, e.g. issued but not yet
  seen on the wire, is in service), and not a CA certificate, except certpilot's own private CAs (root
  and issuing), whose expiry is the operator's to handle. Other CA certificates (intermediates and roots
  seen in served chains) belong to their CAs and would only add noise.
  Per private CA also ``x509_crl_next_update`` (labels ``issuer_CN``, ``ca``) of its current CRL.
- cert-manager, one set per active managed certificate: ``certmanager_certificate_expiration_timestamp_seconds``,
  ``certmanager_certificate_renewal_timestamp_seconds`` (0 while it has no certificate, as cert-manager
  writes 0 for a missing time) and ``certmanager_certificate_ready_status`` (one series per condition
  ``True``, ``False``, ``Unknown``; the current one is 1). Labels: ``name`` (the managed certificate),
  ``namespace`` (its owner, or ``certpilot`` when it has none), ``issuer_kind`` and ``issuer_name`` (the
  issuer block ``<kind>/<name>``, e.g. ``acme-issuer`` and ``letsencrypt``), ``issuer_group``
  (``certpilot``). Ready is True when its current certificate is valid now, its last renewal did not
  fail and no target's last deploy or verification failed; False otherwise; Unknown while nothing was
  ever issued or attempted. The renewal time is when its current certificate falls due under its renewal
  policy and the CA's fresh renewal window (ARI), as renew-due reckons it (certpilot.managed.schedule;
  a certificate that no longer covers changed names is due at once for renew-due, which cert-manager's
  renewal time does not show either).
- ``certpilot_*``: renewals and deployments by result and issued certificates (counters over the whole
  audit trail), the issuance latency histogram (``issuance_seconds`` of certificate.issued events that
  carry it), revocation propagation per private CA (seconds from its latest revocation until relying
  parties saw it, as certpilot's watch measured it: its CRL and its OCSP responder both said revoked,
  certpilot.propagation; without a measurement, to the first CRL published after it; so far while
  neither: certpilot publishes a CRL with each revocation, so a value above zero without a
  measurement means a revocation that has not reached the CRL), each discovery source's last
  complete run, open alerts by severity and state, the latest endpoint checks (by result, by problem,
  and each place serving a revoked certificate), inventory counts by status, the policy violations not
  waived per rule (``certpilot_policy_violations``, every rule of certpilot.policy.RULES, 0 included;
  certificate rules per certificate, endpoint rules per place; only certificates still active count) and
  the certificates in service with no owner (``certpilot_certificates_unowned``: active, not a CA); the
  SLIs when given.
  The counters are kept up to date incrementally: the process remembers, per engine, the tally of the
  audit trail up to the last event it read (AuditTally), and each render reads only the events after it.
  Likewise each certificate's label set, which only a change of owner or managed state alters.

Speed: 100,000 certificates make 300,000 per-certificate samples. prometheus-client's ``generate_latest``
formats about 60,000 samples a second here (5 s for them), so the families with one series per
certificate or per managed certificate are written by this module in the same text format (0.0.4:
``# HELP``, ``# TYPE``, samples, label values escaped as prometheus-client escapes them), with each
certificate's label set built once and shared by its three samples. Every other family goes through a
prometheus-client Collector, registry and ``generate_latest``. The inventory is read with a few
set-based queries of only the needed columns, the same number however large it is.
"""

from __future__ import annotations

import bisect
import datetime as dt
import itertools
import math
import re
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped
from sqlmodel import Session, col

from certpilot import audit, propagation
from certpilot.clock import utcnow
from certpilot.database import read_session
from certpilot.managed import ARI_FRESH_FOR
from certpilot.models import (
    Alert,
    AuditEvent,
    Certificate,
    CertificateAuthority,
    EndpointCheck,
    Location,
    ManagedCertificate,
    PolicyViolation,
    SourceRun,
    Target,
)
from certpilot.policy import RULES
from certpilot.renewal import RenewalPolicy, RenewalWindow, renewal_time
from certpilot.sli import SliReport

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4  # what render() writes: the Prometheus text format 0.0.4
ISSUER_GROUP = "certpilot"  # cert-manager's issuer_group label of every managed certificate
DEFAULT_NAMESPACE = "certpilot"  # cert-manager's namespace label of a managed certificate without owner
# Upper bounds of the issuance latency histogram, in seconds: an ACME order takes seconds, a private
# CA milliseconds, a CA under load or a slow DNS-01 propagation minutes.
ISSUANCE_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
READY_CONDITIONS = ("True", "False", "Unknown")
# Audit actions counted, and the result label each becomes.
RENEWAL_RESULTS = {"renewal.failed": "failure"}  # success: certificate.issued of a managed certificate
DEPLOYMENT_RESULTS = {"target.deployed": "deployed", "target.failed": "failed", "target.rolled-back": "rolled_back"}


def render(engine: sa.Engine, now: dt.datetime | None = None, *, sli: SliReport | None = None) -> bytes:
    """The whole /metrics text (CONTENT_TYPE) for the inventory behind ``engine`` at ``now``; with the
    SLIs of ``sli`` (certpilot.sli.compute) as ``certpilot_sli_*`` gauges when given. The SLIs are not
    computed here: compute reads the window's audit trail and verifies the whole chain, seconds for a
    large inventory, so whoever serves /metrics computes them on its own schedule and passes the report."""
    now = now or utcnow()
    with read_session(engine) as session:
        current: dict[int, _Current] = {}
        text = _certificate_families(session, _own_cas(session), now, current, _labels.setdefault(engine, {}))
        text += _managed_families(session, current, now)
        tally = _tallies.get(engine, AuditTally()).extend(session)
        _tallies[engine] = tally
        summary = _Summary.read(session, tally, now)
    if sli is not None:
        summary.add(sli_families(sli))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(summary)
    text.append(generate_latest(registry))
    return b"".join(text)  # one join: the text is 100 MB for 100,000 certificates


# ------------------------------------------------------------------------------ the text format

def escape_label_value(value: str) -> str:
    """A label value as the text format needs it (backslash, double quote and newline escaped)."""
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    return value


def _family(name: str, documentation: str, kind: str, samples: list[bytes]) -> list[bytes]:
    """One metric family: its HELP and TYPE lines, then its samples, as pieces of the text: a sample is
    the pieces name, labels, value and newline, so that a certificate's label set is built once for its
    three families, and the text is joined once, with no string per line."""
    return [f"# HELP {name} {documentation}\n# TYPE {name} {kind}\n".encode(), *samples]


# ----------------------------------------------------------------- names (RFC 4514 strings)

# One attribute of an RFC 4514 name: its type, "=", its value up to the next unescaped "," or "+".
_ATTRIBUTE = re.compile(r"([^=,+]+)=((?:\\.|[^,+\\])*)[,+]?", re.S)
_ESCAPE = re.compile(rb"\\([0-9A-Fa-f]{2}|.)", re.S)


def _unescape(value: str) -> str:
    """An RFC 4514 value without its escapes: ``\\,`` is ``,``, ``\\C3\\A9`` is the UTF-8 of ``é``."""
    if "\\" not in value:
        return value
    raw = _ESCAPE.sub(lambda m: bytes([int(m[1], 16)]) if len(m[1]) == 2 else m[1], value.encode("utf-8"))
    return raw.decode("utf-8", errors="replace")


def name_attributes(dn: str) -> dict[str, str]:
    """The first value of each attribute type in an RFC 4514 distinguished name, as the inventory
    stores subjects and issuers (``CN=www.example.com,O=Example``: the most specific first). Escapes
    are undone (``\\,``, ``\\+``, ``\\22``...); a ``#``-hex value is kept as written."""
    out: dict[str, str] = {}
    for match in _ATTRIBUTE.finditer(dn):
        key = match[1].strip()
        if key not in out:
            out[key] = _unescape(match[2])
    return out


# The usual subject: CN first, perhaps O right after it, no escapes.
_CN_FIRST = re.compile(r"CN=([^,+\\]*)(?:,O=([^,+\\]*))?(?=[,+]|$)")


def common_name_and_organisation(dn: str) -> tuple[str, str]:
    """The CN and O of an RFC 4514 name ("" for a missing one), as ``name_attributes`` reads them,
    with a fast path for the usual subject."""
    usual = _CN_FIRST.match(dn)
    if usual is not None and (usual[2] is not None or "O=" not in dn):
        return usual[1], usual[2] or ""
    attributes = name_attributes(dn)
    return attributes.get("CN", ""), attributes.get("O", "")


# ---------------------------------------------------------------- per certificate (x509 exporter)

def _epoch_seconds(session: Session, column: Any) -> sa.ColumnElement[int]:
    """A stored time as whole Unix seconds, computed by the database: 200,000 of them converted in
    Python (parse, attach UTC, timestamp, format a float) took longer than the rest of the render.
    Certificate validity times are whole seconds (RFC 5280)."""
    dialect = session.connection().dialect  # connected: it knows the server's version
    if dialect.name == "postgresql":
        return sa.cast(sa.func.floor(sa.extract("epoch", column)), sa.BigInteger)
    if (dialect.server_version_info or ()) >= (3, 38):  # unixepoch(): 0.04 s less than strftime for 200,000
        return sa.func.unixepoch(column, type_=sa.Integer)
    return sa.cast(sa.func.strftime("%s", column), sa.Integer)


_Row = tuple[str, str, str, str, int, int]  # fingerprint, subject, issuer, serial, NotBefore, NotAfter
# owner, managed, label set, NotBefore, NotAfter, and the two as sample values (b"1700000000\n")
_Cached = tuple[str | None, bool, bytes, int, int, bytes, bytes]
_CHUNK = 500  # at most this many fingerprints in one IN (...) query


def _own_cas(session: Session) -> set[str]:
    """The fingerprints of certpilot's private CAs' root and issuing certificates."""
    return {fp for row in session.connection().execute(sa.select(col(CertificateAuthority.root_fingerprint),
                                                                 col(CertificateAuthority.issuing_fingerprint)))
            for fp in row}


def _active(session: Session, own_cas: set[str]) -> tuple[Iterator[tuple[str, str | None, int | None]], set[str]]:
    """Fingerprint, owner and managed id of every active certificate that is not a CA certificate (but
    certpilot's own CAs', ``own_cas``), in no particular order, read while the session lasts; and the
    fingerprints of those seen only at ghost locations (not in service)."""
    # Certificates seen only at ghost locations: few, found through their ghost locations.
    ghost = sa.orm.aliased(Location)
    ghost_only = set(session.connection().execute(
        sa.select(col(ghost.certificate_fingerprint)).where(col(ghost.ghost).is_(True), ~sa.exists().where(
            col(Location.certificate_fingerprint) == col(ghost.certificate_fingerprint),
            col(Location.ghost).is_(False)))).scalars())
    result = session.connection().execute(
        sa.select(col(Certificate.fingerprint_sha256), col(Certificate.owner), col(Certificate.managed_certificate_id))
        .where(*_in_service(session, own_cas)))
    return _driver_rows(result), ghost_only


def _in_service(session: Session, own_cas: set[str]) -> list[Any]:
    """The conditions of a certificate with series: active, and not a CA certificate unless certpilot's own."""
    fingerprint = col(Certificate.fingerprint_sha256)
    not_ca = col(Certificate.is_ca).is_(False)
    status: Any = col(Certificate.status)
    if session.get_bind().dialect.name == "sqlite":
        # Unary plus keeps SQLite from following the (status, not_after) index row by row: reading the
        # table in storage order took half the time (0.3 s against 0.6 s for 100,000 certificates in
        # service). PostgreSQL's planner chooses by its statistics.
        status = sa.literal_column("+certificate.status")
    return [status == "active", sa.or_(not_ca, fingerprint.in_(own_cas)) if own_cas else not_ca]


def _described(session: Session, fingerprints: list[str], own_cas: set[str]) -> Iterator[_Row]:
    """Subject, issuer, serial and validity (Unix seconds) of the certificates ``fingerprints`` names:
    what a label set is made of, read only for certificates not in the cache: by fingerprint when they
    are a few (a scrape after new issuances), else in one pass over those in service (the first render).
    One query either way."""
    fingerprint = col(Certificate.fingerprint_sha256)
    query = sa.select(fingerprint, col(Certificate.subject), col(Certificate.issuer), col(Certificate.serial_hex),
                      _epoch_seconds(session, col(Certificate.not_before)),
                      _epoch_seconds(session, col(Certificate.not_after)))
    if len(fingerprints) > _CHUNK:
        wanted = set(fingerprints)
        yield from (row for row in _driver_rows(session.connection().execute(query.where(
            *_in_service(session, own_cas)))) if row[0] in wanted)
        return
    if fingerprints:
        yield from _driver_rows(session.connection().execute(query.where(fingerprint.in_(fingerprints))))


def _driver_rows(result: sa.CursorResult[Any], batch: int = 5000) -> Iterator[Any]:
    """The rows of ``result`` as its driver returns them, a batch at a time. Every column here is a str or
    an int as the driver gives it, which needs no result processing: the driver's own tuples spare
    100,000 SQLAlchemy Rows (0.13 s of CPU), and batches spare holding every row at once (60 MB)."""
    try:
        while rows := result.cursor.fetchmany(batch):
            yield from rows
    finally:
        result.close()


@dataclass(frozen=True)
class _Current:
    """A managed certificate's current certificate: its newest active one."""

    fingerprint: str
    not_before: int
    not_after: int


def _certificate_families(session: Session, own_cas: set[str], now: dt.datetime, current: dict[int, _Current],
                          labels_cache: dict[str, _Cached]) -> list[bytes]:
    """The x509_cert_* families of the certificates in service (``_active``); fills ``current`` with each managed certificate's current certificate (the newest active one, ghost
    or not) on the way.

    ``labels_cache`` (fingerprint -> owner, managed, label set, validity) keeps each certificate's label
    set and validity from one render to the next: a certificate's subject, issuer, serial and validity
    never change (its fingerprint is its identity), so only a certificate not seen by the last render is
    read in full (``_described``), parsed and escaped, and one whose owner or managed state changed gets
    a new label set. For 100,000 certificates that took a render from about 1.4 s to under 1 s, for about
    40 MB held; the first render reads and builds everything."""
    rows, ghost_only = _active(session, own_cas)
    issuers: dict[str, tuple[str, str]] = {}
    after: list[bytes] = []
    before: list[bytes] = []
    expired: list[bytes] = []
    now_ts = now.timestamp()
    escape = escape_label_value
    kept: dict[str, _Cached] = {}
    unknown: dict[str, tuple[str | None, int | None]] = {}

    def add(fp: str, managed_id: int | None, entry: _Cached) -> None:
        if managed_id is not None:
            held = current.get(managed_id)
            if held is None or (entry[3], fp) > (held.not_before, held.fingerprint):
                current[managed_id] = _Current(fp, entry[3], entry[4])
        kept[fp] = entry  # kept even when not in service now (seen only at ghosts): it may be seen again
        if fp in ghost_only:
            return
        labels = entry[2]
        after.extend((b"x509_cert_not_after", labels, entry[6]))
        before.extend((b"x509_cert_not_before", labels, entry[5]))
        expired.extend((b"x509_cert_expired", labels, b"1\n" if now_ts > entry[4] else b"0\n"))

    def label_set(fp: str, subject: str, issuer: str, serial_hex: str, owner: str | None, managed: bool) -> bytes:
        cn, org = common_name_and_organisation(subject)
        issued_by = issuers.get(issuer)
        if issued_by is None:
            issuer_cn, issuer_org = common_name_and_organisation(issuer)
            issued_by = issuers[issuer] = (escape(issuer_cn), escape(issuer_org))
        return (f'{{fingerprint="{fp}",issuer_CN="{issued_by[0]}",issuer_O="{issued_by[1]}",'
                f'managed="{"true" if managed else "false"}",owner="{escape(owner) if owner else ""}",'
                f'serial_number="{int(serial_hex, 16)}",subject_CN="{escape(cn)}",subject_O="{escape(org)}"}} '
                ).encode()

    cache_get, after_add, before_add, expired_add = labels_cache.get, after.extend, before.extend, expired.extend
    for fp, owner, managed_id in rows:  # add() written out: this loop runs once per certificate in service
        cached = cache_get(fp)
        if cached is None or cached[0] != owner or cached[1] != (managed_id is not None):
            unknown[fp] = (owner, managed_id)  # new, or its owner or managed state changed: read and build again
            continue
        if managed_id is not None:
            add(fp, managed_id, cached)
            continue
        kept[fp] = cached
        if fp in ghost_only:
            continue
        labels = cached[2]
        after_add((b"x509_cert_not_after", labels, cached[6]))
        before_add((b"x509_cert_not_before", labels, cached[5]))
        expired_add((b"x509_cert_expired", labels, b"1\n" if now_ts > cached[4] else b"0\n"))
    for fp, subject, issuer, serial_hex, not_before, not_after in _described(session, sorted(unknown), own_cas):
        owner, managed_id = unknown[fp]
        managed = managed_id is not None
        add(fp, managed_id, (owner, managed, label_set(fp, subject, issuer, serial_hex, owner, managed),
                             not_before, not_after, b"%d\n" % not_before, b"%d\n" % not_after))
    labels_cache.clear()  # what is no longer in service leaves the cache
    labels_cache.update(kept)
    return [*_family("x509_cert_not_after", "Unix time after which the certificate is no longer valid (NotAfter).",
                     "gauge", after),
            *_family("x509_cert_not_before", "Unix time from which the certificate is valid (NotBefore).", "gauge",
                     before),
            *_family("x509_cert_expired", "1 if the certificate has expired, 0 otherwise.", "gauge", expired)]


# --------------------------------------------------------- per managed certificate (cert-manager)

def _managed_families(session: Session, current: dict[int, _Current], now: dt.datetime) -> list[bytes]:
    failing_targets = set(session.connection().execute(sa.select(col(Target.managed_certificate_id)).distinct()
                                          .where(col(Target.last_error).is_not(None))).scalars())
    expiration: list[bytes] = []
    renewal: list[bytes] = []
    ready: list[bytes] = []
    policies: dict[int | None, RenewalPolicy] = {}  # by renew_before_days: a handful
    escape = escape_label_value
    for managed_id, name, issuer, owner, renew_before_days, use_ari, ari_start, ari_end, ari_checked_at, \
            last_error, last_attempt_at in session.connection().execute(
                sa.select(col(ManagedCertificate.id), col(ManagedCertificate.name), col(ManagedCertificate.issuer),
                          col(ManagedCertificate.owner), col(ManagedCertificate.renew_before_days),
                          col(ManagedCertificate.use_ari), col(ManagedCertificate.ari_start),
                          col(ManagedCertificate.ari_end), col(ManagedCertificate.ari_checked_at),
                          col(ManagedCertificate.last_error), col(ManagedCertificate.last_attempt_at))
                .where(col(ManagedCertificate.status) == "active")).tuples().all():
        kind, _, issuer_name = issuer.partition("/")
        labels = (f'issuer_group="{ISSUER_GROUP}",issuer_kind="{escape(kind)}",issuer_name="{escape(issuer_name)}",'
                  f'name="{escape(name)}",namespace="{escape(owner or DEFAULT_NAMESPACE)}"}} ').encode()
        cur = current.get(managed_id)
        renew_at = 0
        if cur is not None:
            window = (RenewalWindow(ari_start, ari_end) if use_ari and ari_start is not None and ari_end is not None
                      and ari_checked_at is not None and now - ari_checked_at <= ARI_FRESH_FOR else None)
            policy = policies.get(renew_before_days)
            if policy is None:
                policy = policies[renew_before_days] = RenewalPolicy(
                    renew_before=dt.timedelta(days=renew_before_days) if renew_before_days is not None else None)
            at, _reason = renewal_time(_utc(cur.not_before), _utc(cur.not_after), policy, cur.fingerprint, window)
            renew_at = min(int(at.timestamp()), cur.not_after)
        expiration += (b"certmanager_certificate_expiration_timestamp_seconds{", labels,
                       b"%d\n" % (cur.not_after if cur else 0))
        renewal += (b"certmanager_certificate_renewal_timestamp_seconds{", labels, b"%d\n" % renew_at)
        condition = ready_condition(cur.not_after if cur else None, last_error is not None or managed_id
                                    in failing_targets, last_attempt_at is not None, now)
        for c in READY_CONDITIONS:
            ready += (b'certmanager_certificate_ready_status{condition="%s",' % c.encode(), labels,
                      b"1\n" if c == condition else b"0\n")
    return [
        *_family("certmanager_certificate_expiration_timestamp_seconds",
                "The date after which the certificate expires. Expressed as a Unix Epoch Time.", "gauge", expiration),
        *_family("certmanager_certificate_renewal_timestamp_seconds", "The number of seconds before expiration time "
                "the certificate should renew. Expressed as a Unix Epoch Time.", "gauge", renewal),
        *_family("certmanager_certificate_ready_status", "The ready status of the certificate.", "gauge", ready),
    ]


def _utc(seconds: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc)


def ready_condition(not_after: int | None, failing: bool, attempted: bool, now: dt.datetime) -> str:
    """cert-manager's Ready condition of a managed certificate (``not_after`` of its current certificate
    in Unix seconds, None without one): False when its last renewal or a target's last deploy or
    verification failed, or when its certificate has expired or it has none after an attempt; Unknown
    while nothing was issued or attempted; otherwise True."""
    if failing:
        return "False"
    if not_after is None:
        return "False" if attempted else "Unknown"
    return "True" if not_after > now.timestamp() else "False"


# ------------------------------------------------------------------------------ certpilot_*

@dataclass(frozen=True)
class AuditTally:
    """What certpilot's counters count, over the audit trail up to event ``seq`` (whose hash is ``head``).

    The trail is append-only and hash-chained, so the tally of a later render is this one plus the
    events after ``seq``: each scrape reads only what was appended since the last (counting the whole
    trail, which grows by every issuance, would make every scrape slower than the one before)."""

    seq: int = 0
    head: str = audit.GENESIS
    actions: tuple[tuple[str, int], ...] = ()  # events per counted action (RENEWAL_RESULTS, DEPLOYMENT_RESULTS)
    issued: int = 0  # certificate.issued events
    renewed: int = 0  # ... of a managed certificate (their details name it)
    observed: int = 0  # ... that recorded issuance_seconds
    total_seconds: float = 0.0
    buckets: tuple[int, ...] = (0,) * len(ISSUANCE_BUCKETS)  # observations per bucket (not cumulative)

    def count(self, action: str) -> int:
        return dict(self.actions).get(action, 0)

    def extend(self, session: Session) -> AuditTally:
        """This tally with the events appended since; counted from the start instead when the trail no
        longer holds this tally's last event as it was (another or a rebuilt inventory)."""
        connection = session.connection()
        last = connection.execute(sa.select(col(AuditEvent.seq), col(AuditEvent.hash))
                                  .order_by(col(AuditEvent.seq).desc()).limit(1)).first()
        if last is None:
            return AuditTally()
        base = self
        if self.seq and connection.execute(sa.select(col(AuditEvent.hash)).where(col(AuditEvent.seq) == self.seq)
                                           ).scalar() != self.head:
            base = AuditTally()
        if last.seq == base.seq:
            return base
        appended = (col(AuditEvent.seq) > base.seq) & (col(AuditEvent.seq) <= last.seq)
        actions = dict(base.actions)
        for action, n in connection.execute(
                sa.select(col(AuditEvent.action), sa.func.count())
                .where(appended, col(AuditEvent.action).in_([*RENEWAL_RESULTS, *DEPLOYMENT_RESULTS]))
                .group_by(col(AuditEvent.action))).tuples().all():
            actions[action] = actions.get(action, 0) + n
        # One pass over the certificate.issued events, each JSON parsed once by the database: whether it
        # renewed a managed certificate, and the latency it recorded.
        details = col(AuditEvent.details)
        issued, renewed, latencies = base.issued, base.renewed, []
        for managed_name, seconds in connection.execute(
                sa.select(_json_text(session, details, "managed"), _json_text(session, details, "issuance_seconds"))
                .where(appended, col(AuditEvent.action) == "certificate.issued")).tuples().all():
            issued += 1
            renewed += managed_name is not None
            if seconds is not None:
                latencies.append(float(seconds))
        buckets = list(base.buckets)
        for value in latencies:
            index = bisect.bisect_left(ISSUANCE_BUCKETS, value)  # the first bound >= value
            if index < len(buckets):
                buckets[index] += 1
        return AuditTally(last.seq, last.hash, tuple(sorted(actions.items())), issued, renewed,
                          base.observed + len(latencies), base.total_seconds + math.fsum(latencies), tuple(buckets))


# The tally of each inventory's audit trail as of its last render (see AuditTally), by engine.
_tallies: weakref.WeakKeyDictionary[sa.Engine, AuditTally] = weakref.WeakKeyDictionary()
# Each certificate's label set as of the last render (see _certificate_families), by engine.
_labels: weakref.WeakKeyDictionary[sa.Engine, dict[str, _Cached]] = weakref.WeakKeyDictionary()


class _Summary(Collector):
    """certpilot's own families, read once per render; prometheus-client formats them."""

    def __init__(self) -> None:
        self._metrics: list[Metric] = []

    def collect(self) -> Iterator[Metric]:
        return iter(self._metrics)

    def add(self, metrics: Iterable[Metric]) -> None:
        self._metrics.extend(metrics)

    @classmethod
    def read(cls, session: Session, tally: AuditTally, now: dt.datetime) -> _Summary:
        summary = cls()
        summary._metrics = [*_audit_counters(tally), *_revocation(session, now), _sources(session),
                            *_alerts(session), *_endpoint_checks(session), *_inventory(session), *_policy(session)]
        return summary


# Each SLI's gauge: certpilot_sli_<name>, a percent as a ratio (0 to 1) as Prometheus names go.
SLI_METRICS = {
    "M1": "served_certificates_valid_ratio", "M2": "renewal_success_ratio", "M3": "incident_repair_seconds",
    "M4": "issuance_latency_seconds", "M5": "key_store_availability_ratio",
    "M6": "revocation_propagation_seconds", "M7": "automated_rotations_ratio", "M8": "chain_validation_errors",
    "M9": "certificate_incidents", "M10": "audit_completeness_ratio",
}


def sli_families(report: SliReport) -> list[Metric]:
    """One gauge per SLI that has a value (one without is left out: no number is made up), labelled with
    its key (M1...) and the report's window in seconds."""
    window = str(round(report.window.total_seconds()))
    families: list[Metric] = []
    for indicator in report.slis:
        if indicator.value is None:
            continue
        suffix = SLI_METRICS.get(indicator.key) or re.sub(r"[^a-z0-9]+", "_", indicator.name.lower()).strip("_")
        family = GaugeMetricFamily(f"certpilot_sli_{suffix}", f"{indicator.key}, {indicator.name}: "
                                   f"{indicator.definition}", labels=["sli", "window_seconds"])
        value = indicator.value / 100 if indicator.unit == "percent" else indicator.value
        family.add_metric([indicator.key, window], value)
        families.append(family)
    return families


def _json_text(session: Session, column: sa.ColumnElement[str] | Mapped[str], key: str) -> sa.ColumnElement[str]:
    """A top-level key of a JSON text column, as text, in SQL (SQLite and PostgreSQL)."""
    if session.get_bind().dialect.name == "postgresql":
        return sa.func.jsonb_extract_path_text(sa.cast(column, JSONB), key)
    return sa.func.json_extract(column, f"$.{key}")


def _audit_counters(tally: AuditTally) -> list[Metric]:
    issued_total = CounterMetricFamily("certpilot_certificates_issued", "Certificates issued and recorded "
                                       "(renewals of managed certificates and certificates signed by a private CA).",
                                       value=tally.issued)
    renewals = CounterMetricFamily("certpilot_renewals", "Renewals of managed certificates, by result.",
                                   labels=["result"])
    renewals.add_metric(["success"], tally.renewed)
    for action, result in RENEWAL_RESULTS.items():
        renewals.add_metric([result], tally.count(action))
    deployments = CounterMetricFamily("certpilot_deployments", "Deployments to targets, by result.", labels=["result"])
    for action, result in DEPLOYMENT_RESULTS.items():
        deployments.add_metric([result], tally.count(action))
    cumulative = list(itertools.accumulate(tally.buckets))
    histogram = HistogramMetricFamily(
        "certpilot_issuance_duration_seconds", "Time from the start of an issuance to the certificate, for issued "
        "certificates that recorded it (issuance_seconds in their certificate.issued audit event).",
        buckets=[*((floatToGoString(b), n) for b, n in zip(ISSUANCE_BUCKETS, cumulative, strict=True)),
                 ("+Inf", tally.observed)],
        sum_value=tally.total_seconds)
    return [issued_total, renewals, deployments, histogram]


def _revocation(session: Session, now: dt.datetime) -> list[Metric]:
    """Per private CA: how long its latest revocation took to become visible, and its CRL's nextUpdate.
    Visible: as measured by a relying party's watch (certificate.revocation_visible: its CRL and its OCSP
    both said revoked); without a measurement, until the CA's first CRL published after it. While
    neither has happened, the time elapsed so far."""
    propagation_seconds = GaugeMetricFamily(
        "certpilot_revocation_propagation_seconds", "Per private CA: seconds from its latest revocation until "
        "relying parties saw it (its CRL and OCSP both said revoked, as certpilot measured it), else until the "
        "first CRL the CA published after it (so far, while neither).", labels=["ca"])
    next_update = GaugeMetricFamily("x509_crl_next_update", "Unix time of the nextUpdate field of the private CA's "
                                    "current CRL.", labels=["ca", "issuer_CN"])
    cas = session.connection().execute(sa.select(col(CertificateAuthority.name), col(CertificateAuthority.issuing_fingerprint),
                                    col(CertificateAuthority.crl_next_update), col(Certificate.subject))
                          .join(Certificate, col(Certificate.fingerprint_sha256)
                                == col(CertificateAuthority.issuing_fingerprint))
                          .order_by(col(CertificateAuthority.name))).all()
    for name, issuing, crl_next_update, subject in cas:
        if crl_next_update is not None:
            next_update.add_metric([name, name_attributes(subject).get("CN", "")], crl_next_update.timestamp())
        latest = session.connection().execute(sa.select(col(Certificate.fingerprint_sha256), col(Certificate.revoked_at))
                                              .where(col(Certificate.issuer_fingerprint) == issuing,
                                                     col(Certificate.status) == "revoked",
                                                     col(Certificate.revoked_at).is_not(None))
                                              .order_by(col(Certificate.revoked_at).desc()).limit(1)).first()
        if latest is None:
            continue
        fingerprint, revoked = latest
        watched = propagation.measurements(session, [fingerprint], since=revoked.replace(microsecond=0)).get(fingerprint)
        if watched is not None:
            seconds = watched.seconds if watched.seconds is not None else (now - revoked).total_seconds()
            propagation_seconds.add_metric([name], max(0.0, seconds))
            continue
        # A CRL is dated in whole seconds (its thisUpdate), so the one published with a revocation
        # may be dated up to a second before the revocation time.
        published = session.connection().execute(sa.select(sa.func.min(col(AuditEvent.at)))
                                                 .where(col(AuditEvent.action) == "ca.crl_issued",
                                                        col(AuditEvent.object) == f"ca:{name}",
                                                        col(AuditEvent.at) >= revoked.replace(microsecond=0))
                                                 ).scalar()
        propagation_seconds.add_metric([name], max(0.0, ((published or now) - revoked).total_seconds()))
    return [propagation_seconds, next_update]


def _sources(session: Session) -> Metric:
    family = GaugeMetricFamily("certpilot_source_last_success_timestamp_seconds", "Unix time at which the "
                               "discovery source last completed a run (0: never).", labels=["source"])
    for source, completed in session.connection().execute(sa.select(col(SourceRun.source), col(SourceRun.last_completed_at))
                                             .order_by(col(SourceRun.source))):
        family.add_metric([source], completed.timestamp() if completed else 0.0)
    return family


def _alerts(session: Session) -> list[Metric]:
    family = GaugeMetricFamily("certpilot_alerts_open", "Alerts not resolved, by severity and state "
                               "(open, escalated, suppressed).", labels=["severity", "state"])
    for severity, state, count in session.connection().execute(
            sa.select(col(Alert.severity), col(Alert.state), sa.func.count())
            .where(col(Alert.state) != "resolved").group_by(col(Alert.severity), col(Alert.state))
            .order_by(col(Alert.severity), col(Alert.state))):
        family.add_metric([severity, state], count)
    return [family]


def _endpoint_checks(session: Session) -> list[Metric]:
    checks = GaugeMetricFamily("certpilot_endpoint_checks", "Places checked by the latest monitor runs, by result "
                               "(ok; problem: served but wrong; error: nothing could be checked).", labels=["result"])
    problems = GaugeMetricFamily("certpilot_endpoint_problems", "Places where the latest check found a problem, "
                                 "by condition.", labels=["condition"])
    revoked = GaugeMetricFamily("certpilot_revoked_certificate_served", "1 for each place where the latest check "
                                "found a revoked certificate served (by CRL or OCSP, or revoked in the inventory).",
                                labels=["place", "fingerprint"])
    results = {"ok": 0, "problem": 0, "error": 0}
    by_condition: dict[str, int] = {}
    served = sa.orm.aliased(Certificate)
    for place, ok, error, found, revocation, fingerprint, status in session.connection().execute(
            sa.select(col(EndpointCheck.place), col(EndpointCheck.ok), col(EndpointCheck.error),
                      col(EndpointCheck.problems), col(EndpointCheck.revocation),
                      col(EndpointCheck.served_fingerprint), col(served.status))
            .outerjoin(served, col(served.fingerprint_sha256) == col(EndpointCheck.served_fingerprint))
            .where(sa.or_(col(EndpointCheck.ok).is_(False), col(EndpointCheck.revocation) == "revoked",
                          col(served.status) == "revoked"))
            .order_by(col(EndpointCheck.place))).all():
        if not ok:
            results["error" if error is not None else "problem"] += 1
            for condition in set(found or ()):
                by_condition[condition] = by_condition.get(condition, 0) + 1
        if revocation == "revoked" or status == "revoked" or "revoked-served" in (found or ()):
            revoked.add_metric([place, fingerprint or ""], 1.0)
    results["ok"] = session.connection().execute(sa.select(sa.func.count()).select_from(EndpointCheck)
                                    .where(col(EndpointCheck.ok).is_(True))).scalar_one()
    for result, count in results.items():
        checks.add_metric([result], count)
    for condition, count in sorted(by_condition.items()):
        problems.add_metric([condition], count)
    return [checks, problems, revoked]


def _inventory(session: Session) -> list[Metric]:
    certificates = GaugeMetricFamily("certpilot_certificates", "Certificates in the inventory, by status.",
                                     labels=["status"])
    for status, count in session.connection().execute(sa.select(col(Certificate.status), sa.func.count())
                                         .group_by(col(Certificate.status)).order_by(col(Certificate.status))):
        certificates.add_metric([status], count)
    managed = GaugeMetricFamily("certpilot_managed_certificates", "Managed certificates, by status.",
                                labels=["status"])
    for status, count in session.connection().execute(sa.select(col(ManagedCertificate.status), sa.func.count())
                                         .group_by(col(ManagedCertificate.status))
                                         .order_by(col(ManagedCertificate.status))):
        managed.add_metric([status], count)
    return [certificates, managed]



def _policy(session: Session) -> list[Metric]:
    violations = GaugeMetricFamily("certpilot_policy_violations", "Policy violations not waived, by rule: "
                                   "certificate rules per certificate, endpoint rules per place (active "
                                   "certificates only).", labels=["rule"])
    counts = {rule: 0 for rule in RULES}
    for rule, count in session.connection().execute(
            sa.select(col(PolicyViolation.rule), sa.func.count())
            .join(Certificate, col(Certificate.fingerprint_sha256) == col(PolicyViolation.certificate_fingerprint))
            .where(col(PolicyViolation.waiver_id).is_(None), col(Certificate.status) == "active")
            .group_by(col(PolicyViolation.rule))):
        counts[rule] = count
    for rule, count in counts.items():
        violations.add_metric([rule], count)
    unowned = GaugeMetricFamily("certpilot_certificates_unowned", "Active certificates (not CA certificates) with "
                                "no owner: alerts about them reach no one in particular.")
    unowned.add_metric([], session.connection().execute(
        sa.select(sa.func.count()).select_from(Certificate).where(
            col(Certificate.owner).is_(None), col(Certificate.status) == "active",
            col(Certificate.is_ca).is_(False))).scalar_one())
    return [violations, unowned]
