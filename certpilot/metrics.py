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
  ever issued or attempted. The renewal time is the one renew-due acts on (certpilot.managed.schedule).
- ``certpilot_*``: renewals and deployments by result and issued certificates (counters over the whole
  audit trail), the issuance latency histogram (``issuance_seconds`` of certificate.issued events that
  carry it), revocation propagation per private CA, each discovery source's last complete run, open
  alerts by severity and state, the latest endpoint checks, inventory counts by status.

Speed: 100,000 certificates make 300,000 per-certificate samples. prometheus-client's ``generate_latest``
formats about 60,000 samples a second here (5 s for them), so the families with one series per
certificate or per managed certificate are written by this module in the same text format (0.0.4:
``# HELP``, ``# TYPE``, samples, label values escaped as prometheus-client escapes them), with each
certificate's label set built once and shared by its three samples. Every other family goes through a
prometheus-client Collector, registry and ``generate_latest``. The inventory is read with a few
set-based queries of only the needed columns.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import sqlalchemy as sa
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped
from sqlmodel import Session, col

from certpilot import managed as managed_certificates
from certpilot.clock import utcnow
from certpilot.database import read_session
from certpilot.models import (
    Alert,
    AuditEvent,
    Certificate,
    CertificateAuthority,
    EndpointCheck,
    Location,
    ManagedCertificate,
    SourceRun,
    Target,
)

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


def render(engine: sa.Engine, now: dt.datetime | None = None) -> bytes:
    """The whole /metrics text (CONTENT_TYPE) for the inventory behind ``engine`` at ``now``."""
    now = now or utcnow()
    with read_session(engine) as session:
        certificates = _certificate_families(session, now)
        managed = _managed_families(session, now)
        summary = _Summary.read(session, now)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(summary)
    return b"".join([certificates.encode(), managed.encode(), generate_latest(registry)])


# ------------------------------------------------------------------------------ the text format

def escape_label_value(value: str) -> str:
    """A label value as the text format needs it (backslash, double quote and newline escaped)."""
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    return value


def _family(name: str, documentation: str, kind: str, samples: Iterable[str]) -> str:
    """One metric family: its HELP and TYPE lines, then its sample lines (each ending in a newline)."""
    head = f"# HELP {name} {documentation}\n# TYPE {name} {kind}\n"
    return head + "".join(samples)


def _seconds(value: dt.datetime | None) -> str:
    return floatToGoString(value.timestamp()) if value is not None else "0.0"


# ----------------------------------------------------------------- names (RFC 4514 strings)

_ESCAPABLE = frozenset(' "#+,;<=>\\')


def name_attributes(dn: str) -> dict[str, str]:
    """The first value of each attribute type in an RFC 4514 distinguished name, as the inventory
    stores subjects and issuers (``CN=www.example.com,O=Example``): the most specific comes first.
    Escapes are undone (``\\,``, ``\\+``, ``\\22``...); a ``#``-hex value is kept as written."""
    if "\\" not in dn:
        out: dict[str, str] = {}
        for part in dn.replace("+", ",").split(","):
            key, sep, value = part.partition("=")
            if sep and key not in out:
                out[key] = value
        return out
    return _escaped_name_attributes(dn)


def _escaped_name_attributes(dn: str) -> dict[str, str]:
    out: dict[str, str] = {}
    key: str | None = None
    text: list[str] = []
    raw = bytearray()  # \XX escapes are UTF-8 bytes: gathered, then decoded together
    i = 0

    def flush_raw() -> None:
        if raw:
            text.append(raw.decode("utf-8", errors="replace"))
            raw.clear()

    def finish() -> None:
        flush_raw()
        if key is not None and key not in out:
            out[key] = "".join(text)

    while i < len(dn):
        ch = dn[i]
        if key is None:
            end = dn.find("=", i)
            if end < 0:
                break
            key, i = dn[i:end], end + 1
            text = []
            continue
        if ch == "\\" and i + 1 < len(dn):
            pair = dn[i + 1:i + 3]
            if dn[i + 1] in _ESCAPABLE:
                flush_raw()
                text.append(dn[i + 1])
                i += 2
                continue
            if len(pair) == 2 and all(c in "0123456789abcdefABCDEF" for c in pair):
                raw.append(int(pair, 16))
                i += 3
                continue
        if ch in ",+":
            finish()
            key = None
            i += 1
            continue
        flush_raw()
        text.append(ch)
        i += 1
    finish()
    return out


# ---------------------------------------------------------------- per certificate (x509 exporter)

def _certificate_families(session: Session, now: dt.datetime) -> str:
    own_cas = {fp for row in session.execute(sa.select(col(CertificateAuthority.root_fingerprint),
                                                       col(CertificateAuthority.issuing_fingerprint)))
               for fp in row}
    fingerprint = col(Certificate.fingerprint_sha256)
    located = sa.exists().where(col(Location.certificate_fingerprint) == fingerprint)
    live = sa.exists().where(col(Location.certificate_fingerprint) == fingerprint, col(Location.ghost).is_(False))
    in_service = (col(Certificate.status) == "active") & (sa.not_(located) | live)
    not_ca = col(Certificate.is_ca).is_(False)
    rows = session.execute(
        sa.select(fingerprint, col(Certificate.subject), col(Certificate.issuer), col(Certificate.serial_hex),
                  col(Certificate.not_before), col(Certificate.not_after), col(Certificate.owner),
                  col(Certificate.managed_certificate_id))
        .where(in_service, not_ca | fingerprint.in_(own_cas) if own_cas else not_ca)
        .order_by(col(Certificate.not_after), fingerprint)).all()
    issuers: dict[str, tuple[str, str]] = {}
    after: list[str] = []
    before: list[str] = []
    expired: list[str] = []
    now_ts = now.timestamp()
    for fp, subject, issuer, serial_hex, not_before, not_after, owner, managed_id in rows:
        names = name_attributes(subject)
        issued_by = issuers.get(issuer)
        if issued_by is None:
            issuer_names = name_attributes(issuer)
            issued_by = issuers[issuer] = (escape_label_value(issuer_names.get("CN", "")),
                                           escape_label_value(issuer_names.get("O", "")))
        labels = (f'{{fingerprint="{fp}",issuer_CN="{issued_by[0]}",issuer_O="{issued_by[1]}",'
                  f'managed="{"false" if managed_id is None else "true"}",owner="{escape_label_value(owner or "")}",'
                  f'serial_number="{int(serial_hex, 16)}",subject_CN="{escape_label_value(names.get("CN", ""))}",'
                  f'subject_O="{escape_label_value(names.get("O", ""))}"}} ')
        not_after_ts = not_after.timestamp()
        after.append(f"x509_cert_not_after{labels}{floatToGoString(not_after_ts)}\n")
        before.append(f"x509_cert_not_before{labels}{floatToGoString(not_before.timestamp())}\n")
        expired.append(f"x509_cert_expired{labels}{'1.0' if now_ts > not_after_ts else '0.0'}\n")
    return "".join([
        _family("x509_cert_not_after", "Unix time after which the certificate is no longer valid (NotAfter).",
                "gauge", after),
        _family("x509_cert_not_before", "Unix time from which the certificate is valid (NotBefore).", "gauge", before),
        _family("x509_cert_expired", "1 if the certificate has expired, 0 otherwise.", "gauge", expired),
    ])


# --------------------------------------------------------- per managed certificate (cert-manager)

def _managed_families(session: Session, now: dt.datetime) -> str:
    failing_targets = set(session.execute(sa.select(col(Target.managed_certificate_id)).distinct()
                                          .where(col(Target.last_error).is_not(None))).scalars())
    expiration: list[str] = []
    renewal: list[str] = []
    ready: list[str] = []
    for scheduled in managed_certificates.schedule(session, now):
        m, current = scheduled.managed, scheduled.current
        kind, _, issuer_name = m.issuer.partition("/")
        labels = (f'issuer_group="{ISSUER_GROUP}",issuer_kind="{escape_label_value(kind)}",'
                  f'issuer_name="{escape_label_value(issuer_name)}",name="{escape_label_value(m.name)}",'
                  f'namespace="{escape_label_value(m.owner or DEFAULT_NAMESPACE)}"')
        expiration.append(f"certmanager_certificate_expiration_timestamp_seconds{{{labels}}} "
                          f"{_seconds(current.not_after if current else None)}\n")
        renewal.append(f"certmanager_certificate_renewal_timestamp_seconds{{{labels}}} "
                       f"{_seconds(scheduled.decision.renew_at if current else None)}\n")
        condition = ready_condition(m, current.not_after if current else None, m.id in failing_targets, now)
        ready.extend(f'certmanager_certificate_ready_status{{condition="{c}",{labels}}} '
                     f'{"1.0" if c == condition else "0.0"}\n' for c in READY_CONDITIONS)
    return "".join([
        _family("certmanager_certificate_expiration_timestamp_seconds",
                "The date after which the certificate expires. Expressed as a Unix Epoch Time.", "gauge", expiration),
        _family("certmanager_certificate_renewal_timestamp_seconds",
                "The number of seconds before expiration time the certificate should renew.", "gauge", renewal),
        _family("certmanager_certificate_ready_status", "The ready status of the certificate.", "gauge", ready),
    ])


def ready_condition(managed: ManagedCertificate, not_after: dt.datetime | None, target_failing: bool,
                    now: dt.datetime) -> str:
    """cert-manager's Ready condition of a managed certificate: True, False or Unknown."""
    if managed.last_error is not None or target_failing:
        return "False"
    if not_after is None:
        return "Unknown" if managed.last_attempt_at is None else "False"
    return "True" if not_after > now else "False"


# ------------------------------------------------------------------------------ certpilot_*

@dataclass(frozen=True)
class _IssuanceLatency:
    observed: int
    total_seconds: float
    cumulative: tuple[int, ...]  # per ISSUANCE_BUCKETS bound


class _Summary(Collector):
    """certpilot's own families, read once per render; prometheus-client formats them."""

    def __init__(self) -> None:
        self._metrics: list[Metric] = []

    def collect(self) -> Iterator[Metric]:
        return iter(self._metrics)

    @classmethod
    def read(cls, session: Session, now: dt.datetime) -> _Summary:
        summary = cls()
        summary._metrics = [*_audit_counters(session), *_revocation(session, now), _sources(session),
                            *_alerts(session), *_endpoint_checks(session), *_inventory(session)]
        return summary


def _json_text(session: Session, column: sa.ColumnElement[str] | Mapped[str], key: str) -> sa.ColumnElement[str]:
    """A top-level key of a JSON text column, as text, in SQL (SQLite and PostgreSQL)."""
    if session.get_bind().dialect.name == "postgresql":
        return sa.func.jsonb_extract_path_text(sa.cast(column, JSONB), key)
    return sa.func.json_extract(column, f"$.{key}")


def _audit_counters(session: Session) -> list[Metric]:
    counts = dict(session.execute(
        sa.select(col(AuditEvent.action), sa.func.count())
        .where(col(AuditEvent.action).in_([*RENEWAL_RESULTS, *DEPLOYMENT_RESULTS]))
        .group_by(col(AuditEvent.action))).tuples().all())
    details = col(AuditEvent.details)
    seconds = sa.cast(_json_text(session, details, "issuance_seconds"), sa.Float)
    issued = session.execute(
        sa.select(sa.func.count(), sa.func.count(_json_text(session, details, "managed")), sa.func.count(seconds),
                  sa.func.coalesce(sa.func.sum(seconds), 0.0),
                  *[sa.func.count(sa.case((seconds <= bound, 1))) for bound in ISSUANCE_BUCKETS])
        .where(col(AuditEvent.action) == "certificate.issued")).one()
    all_issued, renewed, observed, total = int(issued[0]), int(issued[1]), int(issued[2]), float(issued[3])
    latency = _IssuanceLatency(observed, total, tuple(int(n) for n in issued[4:]))

    issued_total = CounterMetricFamily("certpilot_certificates_issued", "Certificates issued and recorded "
                                       "(renewals of managed certificates and certificates signed by a private CA).",
                                       value=all_issued)
    renewals = CounterMetricFamily("certpilot_renewals", "Renewals of managed certificates, by result.",
                                   labels=["result"])
    renewals.add_metric(["success"], renewed)
    for action, result in RENEWAL_RESULTS.items():
        renewals.add_metric([result], counts.get(action, 0))
    deployments = CounterMetricFamily("certpilot_deployments", "Deployments to targets, by result.", labels=["result"])
    for action, result in DEPLOYMENT_RESULTS.items():
        deployments.add_metric([result], counts.get(action, 0))
    histogram = HistogramMetricFamily(
        "certpilot_issuance_duration_seconds", "Time from the start of an issuance to the certificate, for issued "
        "certificates that recorded it (issuance_seconds in their certificate.issued audit event).",
        buckets=[*((floatToGoString(b), n) for b, n in zip(ISSUANCE_BUCKETS, latency.cumulative, strict=True)),
                 ("+Inf", latency.observed)],
        sum_value=latency.total_seconds)
    return [issued_total, renewals, deployments, histogram]


def _revocation(session: Session, now: dt.datetime) -> list[Metric]:
    """Per private CA: how long its latest revocation took to reach a published CRL, and its CRL's
    nextUpdate. While no CRL was published since the latest revocation, the time elapsed so far."""
    propagation = GaugeMetricFamily(
        "certpilot_revocation_propagation_seconds", "Per private CA: seconds from its latest revocation to the "
        "first CRL it published after it (so far, while none is published yet).", labels=["ca"])
    next_update = GaugeMetricFamily("x509_crl_next_update", "Unix time of the nextUpdate field of the private CA's "
                                    "current CRL.", labels=["ca", "issuer_CN"])
    cas = session.execute(sa.select(col(CertificateAuthority.name), col(CertificateAuthority.issuing_fingerprint),
                                    col(CertificateAuthority.crl_next_update), col(Certificate.subject))
                          .join(Certificate, col(Certificate.fingerprint_sha256)
                                == col(CertificateAuthority.issuing_fingerprint))
                          .order_by(col(CertificateAuthority.name))).all()
    for name, issuing, crl_next_update, subject in cas:
        if crl_next_update is not None:
            next_update.add_metric([name, name_attributes(subject).get("CN", "")], crl_next_update.timestamp())
        revoked = session.execute(sa.select(sa.func.max(col(Certificate.revoked_at)))
                                  .where(col(Certificate.issuer_fingerprint) == issuing,
                                         col(Certificate.status) == "revoked")).scalar()
        if revoked is None:
            continue
        published = session.execute(sa.select(sa.func.min(col(AuditEvent.at)))
                                    .where(col(AuditEvent.action) == "ca.crl_issued",
                                           col(AuditEvent.object) == f"ca:{name}",
                                           col(AuditEvent.at) >= revoked)).scalar()
        propagation.add_metric([name], ((published or now) - revoked).total_seconds())
    return [propagation, next_update]


def _sources(session: Session) -> Metric:
    family = GaugeMetricFamily("certpilot_source_last_success_timestamp_seconds", "Unix time at which the "
                               "discovery source last completed a run (0: never).", labels=["source"])
    for source, completed in session.execute(sa.select(col(SourceRun.source), col(SourceRun.last_completed_at))
                                             .order_by(col(SourceRun.source))):
        family.add_metric([source], completed.timestamp() if completed else 0.0)
    return family


def _alerts(session: Session) -> list[Metric]:
    family = GaugeMetricFamily("certpilot_alerts_open", "Alerts not resolved, by severity and state "
                               "(open, escalated, suppressed).", labels=["severity", "state"])
    for severity, state, count in session.execute(
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
    for place, ok, error, found, revocation, fingerprint, status in session.execute(
            sa.select(col(EndpointCheck.place), col(EndpointCheck.ok), col(EndpointCheck.error),
                      col(EndpointCheck.problems), col(EndpointCheck.revocation),
                      col(EndpointCheck.served_fingerprint), col(served.status))
            .outerjoin(served, col(served.fingerprint_sha256) == col(EndpointCheck.served_fingerprint))
            .where(sa.or_(col(EndpointCheck.ok).is_(False), col(EndpointCheck.revocation) == "revoked",
                          col(served.status) == "revoked"))
            .order_by(col(EndpointCheck.place))):
        if not ok:
            results["error" if error is not None else "problem"] += 1
            for condition in set(found or ()):
                by_condition[condition] = by_condition.get(condition, 0) + 1
        if revocation == "revoked" or status == "revoked":
            revoked.add_metric([place, fingerprint or ""], 1.0)
    results["ok"] = session.execute(sa.select(sa.func.count()).select_from(EndpointCheck)
                                    .where(col(EndpointCheck.ok).is_(True))).scalar_one()
    for result, count in results.items():
        checks.add_metric([result], count)
    for condition, count in sorted(by_condition.items()):
        problems.add_metric([condition], count)
    return [checks, problems, revoked]


def _inventory(session: Session) -> list[Metric]:
    certificates = GaugeMetricFamily("certpilot_certificates", "Certificates in the inventory, by status.",
                                     labels=["status"])
    for status, count in session.execute(sa.select(col(Certificate.status), sa.func.count())
                                         .group_by(col(Certificate.status)).order_by(col(Certificate.status))):
        certificates.add_metric([status], count)
    managed = GaugeMetricFamily("certpilot_managed_certificates", "Managed certificates, by status.",
                                labels=["status"])
    for status, count in session.execute(sa.select(col(ManagedCertificate.status), sa.func.count())
                                         .group_by(col(ManagedCertificate.status))
                                         .order_by(col(ManagedCertificate.status))):
        managed.add_metric([status], count)
    return [certificates, managed]

