"""Monitoring tasks: thin units over certpilot.monitoring and the probe connectors.

- ``plan_checks``: the places to check (certpilot.monitoring.places), each target given its TLS address by
  its deployer (built from its block, as a deploy run builds it) or left to be read back through it (a
  store: ACM, Key Vault); the trust anchors (the private CAs' roots, the trust bundles of the tls-scan
  blocks that discovered the endpoints, the ``trust_bundle_pem`` given, the system's store if asked).
- ``probe_places``: one task run per batch of places (connectors.endpoint_probe: handshakes at a bounded
  concurrency, chains, names, revocation); ``read_back_targets``: what each store target holds.
- ``check_services``: whether each issuer in use (an ACME directory, a private CA's CRL URL) and each SSH
  host (of targets and sources) answers.
- ``read_unfinished_runs`` and ``source_interval``: what only Prefect's API knows (renewal and deploy
  runs still Pending, Running or Late; the discover deployment's schedule).
- ``evaluate_checks``: the findings and the checks at one time, the EndpointCheck rows replaced, and the
  policy applied to what was seen (``evaluate_policy``: the certificates served, the places' endpoint rules).
- ``publish_monitor_report``: the ``monitor`` artifact.

No task is served from a cache (their inputs are large and not worth hashing) and every one has a
timeout; every network call below has its own (a task's timeout cannot interrupt blocking I/O).
"""

from __future__ import annotations

import datetime as dt
import logging
import ssl
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import sqlalchemy as sa
from cryptography import x509
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.hazmat.primitives import serialization
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    DeploymentFilterName,
    FlowFilter,
    FlowFilterId,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateName,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.client.schemas.sorting import FlowRunSort

import blocks.aws  # noqa: F401  (registers the block types, so load_block finds them)
import blocks.azure  # noqa: F401
import blocks.issuers  # noqa: F401
import blocks.ssh  # noqa: F401
import blocks.tls_scan  # noqa: F401
from blocks.loading import load_block
from blocks.policy import policy_in_force
from blocks.ssh import SshHostBlock
from blocks.targets import DeploymentTargetBlock, build_deployer
from certpilot import managed, monitoring
from certpilot.alert_policy import current_policy
from certpilot.alerts import Finding, Scope
from certpilot.clock import utcnow
from certpilot.database import get_engine, read_session, write_session
from certpilot.errors import BlockNotFoundError, CertpilotError, endpoint_label, redact
from certpilot.formats import load_bundle
from certpilot.monitoring import Evaluation, Observed, Place, Reachability, RunState
from certpilot.settings import load_settings
from connectors.endpoint_probe import ProbeResult, probe
from connectors.reachability import http_answers, ssh_answers
from connectors.revocation import RevocationChecker
from tasks.deployment import close
from tasks.inventory import run_actor

DEFAULT_SOURCE_INTERVAL = dt.timedelta(hours=6)  # the discover deployment's schedule in prefect.yaml
UNFINISHED = ("Pending", "Running", "Late")


@dataclass(frozen=True)
class MonitorPlan:
    """What a monitor run checks: places (targets with a TLS address filled in), the observations of
    places that cannot be checked (a target whose block is missing), trust anchors (DER) for every
    place and, by place, a target's own (its verify_trust)."""

    places: tuple[Place, ...]
    unchecked: tuple[Observed, ...] = ()
    anchors: tuple[bytes, ...] = ()
    trust: Mapping[str, tuple[bytes, ...]] = field(default_factory=dict)

    @property
    def on_the_wire(self) -> list[Place]:
        return [p for p in self.places if p.host is not None]

    @property
    def read_back(self) -> list[Place]:
        checked = {o.place for o in self.unchecked}
        return [p for p in self.places if p.host is None and p.place not in checked]


@dataclass(frozen=True)
class MonitorReport:
    """One run's evaluation, with every finding and the scope of what it checked."""

    at: dt.datetime
    evaluation: Evaluation
    findings: tuple[Finding, ...]
    scope: Scope
    failures: tuple[str, ...] = ()
    violations: Mapping[str, int] = field(default_factory=dict)  # found by this run, not waived, per rule


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _certificates(pem: str | None, what: str) -> list[bytes]:
    if not pem or not pem.strip():
        return []
    return [_der(c) for c in load_bundle(pem.encode(), source=what).certificates]


def system_anchors() -> list[bytes]:
    """The system's trusted roots (DER), as Python's default context loads them."""
    context = ssl.create_default_context()
    return [bytes(der) for der in context.get_ca_certs(binary_form=True)]


def _anchors(ders: Sequence[bytes]) -> list[x509.Certificate]:
    """Trust anchors parsed; old roots that cryptography frowns upon (a negative serial number: some system
    roots have one) are anchors still, and one that does not parse at all is left out."""
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        for der in ders:
            try:
                out.append(x509.load_der_x509_certificate(der))
            except ValueError:
                continue
    return out


def _load(cache: dict[str, Any], reference: str) -> Any:
    if reference not in cache:
        try:
            cache[reference] = load_block(reference)
        except Exception as exc:  # noqa: BLE001 - a missing or broken block is that place's problem
            cache[reference] = exc
    found = cache[reference]
    if isinstance(found, Exception):
        raise found
    return found


def target_place(place: Place, target: Any, cache: dict[str, Any]) -> tuple[Place, tuple[bytes, ...]]:
    """The place of a target, with the TLS address and name its deployer verifies (none for a store),
    and the target's own trust anchors. Raises when its deployer cannot be built. ``cache``: blocks loaded
    so far, by reference (shared by the calls of one task)."""
    if not target.block:
        raise ValueError(f"target {target.name} of {place.managed} names no block")
    deployer = build_deployer(_load(cache, target.block), target.name, target.kind, dict(target.settings))
    try:
        endpoint = getattr(deployer, "endpoint", None)
        if endpoint is None:
            return place, ()
        return (replace(place, host=endpoint.host, port=endpoint.port, sni=endpoint.sni, hostname=endpoint.hostname),
                tuple(_der(c) for c in endpoint.trust))
    finally:
        close(deployer)


@task(name="plan-checks", cache_policy=NO_CACHE, timeout_seconds=300)
def plan_checks(trust_bundle_pem: str | None = None, use_system_trust: bool = True) -> MonitorPlan:
    """The places to check and the trust anchors to judge their chains by."""
    log = get_run_logger()
    engine = get_engine()
    now = utcnow()
    with read_session(engine) as session:
        schedule = managed.schedule(session, now)
        found = monitoring.places(session, schedule)
        rows = monitoring.targets(session)
        anchors = monitoring.private_ca_roots(session)
        runs = monitoring.source_runs(session)
    anchors += _certificates(trust_bundle_pem, "trust_bundle_pem")
    cache: dict[str, Any] = {}
    for run in runs:  # the trust the operator gave the scans that discovered the endpoints
        if run.block and run.block.startswith("tls-scan/"):
            try:
                anchors += _certificates(_load(cache, run.block).trust_bundle_pem, run.block)
            except Exception as exc:  # noqa: BLE001 - a scan block gone since: its trust is gone too
                log.warning("trust bundle of %s not used: %s", run.block, redact(exc))
    if use_system_trust:
        anchors += system_anchors()
    places: list[Place] = []
    unchecked: list[Observed] = []
    trust: dict[str, tuple[bytes, ...]] = {}
    for place in found:
        target = rows.get(place.place)
        if target is None:
            places.append(place)
            continue
        try:
            place, own = target_place(place, target, cache)
        except Exception as exc:  # noqa: BLE001 - the place is reported as not checkable, the others go on
            unchecked.append(Observed(place.place, error=f"cannot build its deployer: {redact(exc)}", method="api"))
        else:
            if own:
                trust[place.place] = own
        places.append(place)
    log.info("%d place(s) to check: %d on the wire, %d read back, %d not checkable; %d trust anchor(s)",
             len(places), sum(1 for p in places if p.host), sum(1 for p in places if p.host is None) - len(unchecked),
             len(unchecked), len(set(anchors)))
    return MonitorPlan(tuple(places), tuple(unchecked), tuple(dict.fromkeys(anchors)), trust)


def probe_timeout(places: int, concurrency: int, timeout: float) -> float:
    """A probe task's own timeout: every wave of handshakes at its timeout, and revocation's fetches."""
    waves = -(-max(places, 1) // max(concurrency, 1))
    return waves * timeout + 4 * timeout + 60


@task(name="probe-places", cache_policy=NO_CACHE, timeout_seconds=900)
def probe_places(places: list[Place], anchors: Sequence[bytes], trust: Mapping[str, Sequence[bytes]],
                 timeout: float = 5.0, concurrency: int = 200) -> ProbeResult:
    """Handshake with a batch of places, inspect what each serves, ask about its revocation."""
    here = {p.place for p in places}
    own = {place: _anchors(ders) for place, ders in trust.items() if place in here}
    cache = load_settings().home / "crl-cache"
    with RevocationChecker(timeout=timeout, cache_dir=cache) as checker:
        result = probe(places, anchors=_anchors(anchors), trust=own, timeout=timeout, concurrency=concurrency,
                       revocation=checker)
    failed = sum(1 for o in result.observed if o.served is None)
    get_run_logger().info("%d place(s) probed: %d answered, %d did not", len(result.observed),
                          len(result.observed) - failed, failed)
    return result


@task(name="read-back-targets", cache_policy=NO_CACHE, timeout_seconds=600)
def read_back_targets(places: list[Place]) -> list[Observed]:
    """What each store target (ACM, a load balancer listener, Key Vault) holds, read through its deployer."""
    with read_session(get_engine()) as session:
        rows = monitoring.targets(session)
    return read_back(places, rows)


def read_back(places: Sequence[Place], rows: Mapping[str, Any]) -> list[Observed]:
    """What each target place holds, read through its deployer's current(); ``rows``: the Target rows by place.
    A deployer that cannot be built or read is that place's error, not the batch's."""
    engine = get_engine()
    cache: dict[str, Any] = {}
    held: dict[str, str | None | Exception] = {}
    for place in places:
        target = rows[place.place]
        try:
            if not target.block:
                raise ValueError(f"target {target.name} of {place.managed} names no block")
            deployer = build_deployer(_load(cache, target.block), target.name, target.kind, dict(target.settings))
            try:
                held[place.place] = deployer.current()
            finally:
                close(deployer)
        except Exception as exc:  # noqa: BLE001 - one store that does not answer is that place's problem
            held[place.place] = exc
    with read_session(engine) as session:
        known = monitoring.served_from_inventory(session, [v for v in held.values() if isinstance(v, str)])
    out = []
    for where, value in held.items():
        if isinstance(value, Exception):
            out.append(Observed(where, error=f"read-back failed: {redact(value)}", method="api"))
        elif value is None:
            out.append(Observed(where, error="holds no certificate", method="api"))
        else:
            out.append(Observed(where, known.get(value, monitoring.ServedCertificate(value)), method="api"))
    return out


@task(name="check-services", cache_policy=NO_CACHE, timeout_seconds=600)
def check_services(timeout: float = 5.0) -> list[Reachability]:
    """Whether each issuer in use by an active managed certificate (its ACME directory, a private CA's CRL
    URL) and each SSH host of a target or a source answers, ``timeout`` seconds each, eight at a time."""
    log = get_run_logger()
    with read_session(get_engine()) as session:
        issuers = sorted({m.issuer for m in managed.list_managed(session)})
        crl_urls = monitoring.private_ca_crl_urls(session)
        references = sorted({t.block for t in monitoring.targets(session).values() if t.block}
                            | {r.block for r in monitoring.source_runs(session) if r.block})
    cache: dict[str, Any] = {}
    asks: list[tuple[str, str, str, Callable[[], str | None]]] = []  # (object, what, where, ask)
    for issuer in issuers:
        try:
            block = _load(cache, issuer)
        except Exception as exc:  # noqa: BLE001 - the renewal reports a missing issuer block
            log.warning("issuer %s not checked: %s", issuer, redact(exc))
            continue
        if getattr(block, "directory_url", None):
            what, url = f"the ACME directory of {issuer}", block.directory_url
            verify = block.ca_bundle or True
            asks.append((f"issuer:{issuer}", what, url, partial(http_answers, url, what, timeout, verify)))
        elif getattr(block, "ca_name", None) in crl_urls:
            what, url = f"the CRL of {issuer}", crl_urls[block.ca_name]
            asks.append((f"issuer:{issuer}", what, url, partial(http_answers, url, what, timeout)))
    hosts: dict[tuple[str, int], str] = {}
    for reference in references:
        try:
            block = _load(cache, reference)
        except Exception:  # noqa: BLE001 - the target's or the source's own run reports a missing block
            continue
        connection = block.connection if isinstance(block, DeploymentTargetBlock) else block
        if isinstance(connection, SshHostBlock):
            hosts.setdefault((connection.address, connection.port), reference)
    for (address, port), reference in sorted(hosts.items()):
        what = f"the SSH host of {reference}"
        asks.append((f"host:{endpoint_label(address, port)}", what, endpoint_label(address, port),
                     partial(ssh_answers, address, port, what, timeout)))
    with ThreadPoolExecutor(max_workers=8, thread_name_prefix="check-services") as pool:
        answers = list(pool.map(lambda ask: ask[3](), asks))
    results = [Reachability(obj, what, where, error)
               for (obj, what, where, _), error in zip(asks, answers, strict=True)]
    for result in results:
        if result.error:
            log.warning("%s", result.error)
    return results


def _flow_names(client: Any, flow_ids: set[Any]) -> dict[Any, str]:
    if not flow_ids:
        return {}
    return {f.id: f.name for f in client.read_flows(flow_filter=FlowFilter(id=FlowFilterId(any_=list(flow_ids))))}


@task(name="read-unfinished-runs", cache_policy=NO_CACHE, timeout_seconds=120)
def read_unfinished_runs(flows: list[str]) -> list[RunState]:
    """The runs of ``flows`` that are Pending, Running or Late, as Prefect's API shows them."""
    out = []
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=list(flows))),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(name=FlowRunFilterStateName(any_=list(UNFINISHED)))),
            sort=FlowRunSort.EXPECTED_START_TIME_ASC, limit=200)
        names = _flow_names(client, {run.flow_id for run in runs})
        ui = _ui_url()
        for run in runs:
            state = run.state
            if state is None:
                continue
            since = state.timestamp
            if state.name == "Late" and run.expected_start_time is not None:
                since = run.expected_start_time
            out.append(RunState(str(run.id), run.name, names.get(run.flow_id, "?"), state.name or str(state.type),
                                since.astimezone(dt.timezone.utc), tuple(run.tags or ()),
                                f"{ui}/runs/flow-run/{run.id}" if ui else None))
    return out


def _ui_url() -> str | None:
    from prefect.settings import PREFECT_UI_URL

    value = PREFECT_UI_URL.value()
    return str(value).rstrip("/") if value else None


@task(name="source-interval", cache_policy=NO_CACHE, timeout_seconds=60)
def source_interval(hours: float | None = None, deployment: str = "discover/discover") -> dt.timedelta:
    """How often discovery runs: ``hours`` when given, else the discover deployment's interval schedule or
    the gap between its next two scheduled runs, else DEFAULT_SOURCE_INTERVAL (6 h)."""
    if hours is not None:
        return dt.timedelta(hours=hours)
    flow_name, _, name = deployment.partition("/")
    with get_client(sync_client=True) as client:
        found = client.read_deployments(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
                                        deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[name])))
        if not found:
            return DEFAULT_SOURCE_INTERVAL
        for schedule in found[0].schedules or ():
            interval = getattr(schedule.schedule, "interval", None)
            if isinstance(interval, dt.timedelta):
                return interval
        scheduled = FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))
        upcoming = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[found[0].id])),
                                         flow_run_filter=FlowRunFilter(state=scheduled),
                                         sort=FlowRunSort.EXPECTED_START_TIME_ASC, limit=2)
    times = [r.expected_start_time for r in upcoming if r.expected_start_time is not None]
    if len(times) == 2 and times[1] > times[0]:
        return times[1] - times[0]
    return DEFAULT_SOURCE_INTERVAL


def _retired(block: str | None) -> bool:
    """Whether a source's block no longer exists (the operator removed the source: it is not stale)."""
    if not block:
        return False
    try:
        load_block(block)
    except BlockNotFoundError:
        return True
    except Exception:  # noqa: BLE001 - a block that cannot be read now is still a source
        return False
    return False


@task(name="evaluate-checks", cache_policy=NO_CACHE, timeout_seconds=600)
def evaluate_checks(places: list[Place], observed: list[Observed], services: list[Reachability],
                    runs: list[RunState], deadlines: Mapping[str, dt.timedelta], interval: dt.timedelta | None,
                    grace: dt.timedelta, failed: list[str], failures: list[str]) -> MonitorReport:
    """Everything found at one time: the places' checks (the EndpointCheck rows are replaced), the
    certificates' alerts, the stalls. ``failed`` names the parts of the run that could not run (their
    conditions are left out of the scope, so that their alerts do not resolve by mistake), ``failures``
    says what happened to them."""
    engine = get_engine()
    now = utcnow()
    with read_session(engine) as session:
        schedule = managed.schedule(session, now)
        served = {o.served.fingerprint for o in observed if o.served is not None}
        known = monitoring.known_certificates(session, served)
        bands = current_policy(session).bands
        sources = monitoring.source_runs(session)
    evaluation = monitoring.evaluate(places, observed, known, now, bands)
    findings = list(evaluation.findings)
    findings += monitoring.renewal_findings(schedule, now, grace)
    findings += monitoring.unreachable_findings(services)
    findings += monitoring.stuck_runs(runs, deadlines, now, monitoring.owners(schedule))
    if interval is not None:
        findings += monitoring.stale_sources([r for r in sources if not _retired(r.block)], interval, now)
    if "places" not in failed:
        with write_session(engine) as session:
            monitoring.record_checks(session, evaluation.checks, now, run_actor().flow_run_id)
    found, problem = evaluate_policy(places, observed, now, get_run_logger())
    return MonitorReport(now, evaluation, tuple(findings), monitoring.monitor_scope(failed),
                         tuple(failures) + ((problem,) if problem else ()), found)


def evaluate_policy(places: Sequence[Place], observed: Sequence[Observed], now: dt.datetime,
                    log: logging.Logger | logging.LoggerAdapter[Any]) -> tuple[dict[str, int], str | None]:
    """The policy in force applied to what the run saw (certpilot.monitoring.apply_policy): the violations
    found per rule (not waived), or why the policy could not be applied (the run reports it as a part that
    failed; everything else stands)."""
    try:
        policy = policy_in_force()
        with write_session(get_engine()) as session:
            certificates, endpoints = monitoring.apply_policy(session, policy, places, observed, run_actor(), now)
    except (CertpilotError, sa.exc.SQLAlchemyError) as exc:
        return {}, f"applying the policy: {redact(exc)}"
    found = {rule: certificates.by_rule.get(rule, 0) + endpoints.by_rule.get(rule, 0)
             for rule in sorted(set(certificates.by_rule) | set(endpoints.by_rule))}
    found = {rule: count for rule, count in found.items() if count}
    errors = certificates.errors + endpoints.errors
    if errors:
        return found, f"applying the policy: {len(errors)} not evaluated: " + "; ".join(errors[:3])
    log.info("policy %s: %d certificate(s) and %d place(s) evaluated, %d violation(s) not waived %s", policy.source,
             certificates.evaluated, endpoints.evaluated, certificates.violations + endpoints.violations, found or "")
    return found, None


@task(name="publish-monitor-report", cache_policy=NO_CACHE, timeout_seconds=120)
def publish_monitor_report(report: MonitorReport) -> None:
    create_markdown_artifact(key="monitor", markdown=monitoring.monitor_markdown(
        report.evaluation, report.findings, report.failures, report.at),
        description="What each place serves against what it should, the problems found, and the certificates "
                    "nothing serves any more")
