"""The Source role: where certificates live, and what was found there.

A source (a TLS scan, an SSH host, an AWS account, a Key Vault) yields Found items, each a
certificate as presented (leaf first, then the chain as given) at one locator with public details
(TLS version, whether the chain verified, the file's format...), and Problems for places it could
not read. ``record`` writes them to the inventory in batches and, after a source finished, flags as
ghosts its locations that this run did not see again; its frozen ``SourceSummary`` is a task result.
``discover_all`` gathers a run of several sources, each run by the caller's seam (a task run per
source in the discover flow, a thread per source in the CLI), into one ``DiscoveryResult``.

Given a policy (certpilot.policy), ``record`` applies it to each batch right after writing it, in a
transaction of its own: certificates without an owner get one by its ownership rules (SAN domain,
locator, source, tag), the certificates seen are evaluated against its rules, and each TLS place against
its endpoint rules (tls-min-version, chain-complete, hostname-match) from what the handshake recorded in
the location's details (``endpoint_facts``). Should that fail, what was found stays recorded and the
summary's ``policy_error`` says why.

Locators: ``tls://host:port?sni=name``, ``ssh://user@host:port/path``, ``aws-acm://region/arn``,
``aws-elbv2://region/listener-arn``, ``aws-iam://name``, ``azure-kv://vault/name/version``.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from sqlmodel import Session, col

from certpilot import audit, inventory, keystore, violations
from certpilot.clock import utcnow
from certpilot.database import write_session
from certpilot.errors import CertpilotError, PermanentError, redact
from certpilot.inventory import Observation
from certpilot.keys import key_matches_certificate, public_key_sha256
from certpilot.keystore import KeyRing
from certpilot.models import Location, SourceRun
from certpilot.policy import EndpointFacts, Facts, Policy
from certpilot.violations import EvaluationSummary
from certpilot.x509info import describe_certificate


@dataclass(frozen=True)
class Found:
    """Certificates (DER, leaf first) seen at ``locator``. ``key`` is set only when the operator asked
    a source to bring back the private key it found beside the certificate; it is stored sealed."""

    certificates: tuple[bytes, ...]
    locator: str
    details: dict[str, Any] = field(default_factory=dict)
    key: PrivateKeyTypes | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class Problem:
    """A place the source could not read, and why (no secret in ``reason``)."""

    locator: str
    reason: str


@runtime_checkable
class Source(Protocol):
    """``name`` identifies the source in Location.source and for ghost flagging (e.g. ``tls-scan:lab``,
    ``ssh:web1``); ``discover`` yields as it goes, so large sources are recorded in batches."""

    name: str

    def discover(self) -> Iterator[Found | Problem]: ...


def split(items: Iterable[Found | Problem]) -> tuple[list[Found], list[Problem]]:
    found: list[Found] = []
    problems: list[Problem] = []
    for item in items:
        if isinstance(item, Found):
            found.append(item)
        else:
            problems.append(item)
    return found, problems


# ----------------------------------------------------------------------------- recording a source's run

BATCH = 500  # observations per write transaction
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourceSummary:
    """What one source's run found: counts and problems, public facts only (a task returns it)."""

    source: str
    run_id: str
    places: int = 0  # locators with a certificate
    certificates: int = 0  # distinct certificates seen (leaves and chains)
    new_certificates: int = 0
    new_locations: int = 0
    keys_stored: int = 0
    ghosts: int = 0  # locations of this source flagged as ghosts by this run
    problems: tuple[Problem, ...] = ()
    owners_assigned: int = 0  # certificates given an owner by the policy's ownership rules
    violations: int = 0  # policy violations not waived, of the certificates seen and of the TLS places
    violations_by_rule: Mapping[str, int] = field(default_factory=dict)
    policy_error: str | None = None  # why the policy was not applied to (part of) what was found

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SourceSummary:
        """The summary ``as_dict`` wrote (a discover-chunk run's, read back by its discover run)."""
        return cls(data["source"], data["run_id"], data["places"], data["certificates"], data["new_certificates"],
                   data["new_locations"], data["keys_stored"], data["ghosts"],
                   tuple(Problem(p["locator"], p["reason"]) for p in data["problems"]), data["owners_assigned"],
                   data["violations"], dict(data["violations_by_rule"]), data["policy_error"])

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "run_id": self.run_id, "places": self.places,
                "certificates": self.certificates, "new_certificates": self.new_certificates,
                "new_locations": self.new_locations, "keys_stored": self.keys_stored, "ghosts": self.ghosts,
                "problems": [{"locator": p.locator, "reason": p.reason} for p in self.problems],
                "owners_assigned": self.owners_assigned, "violations": self.violations,
                "violations_by_rule": dict(self.violations_by_rule), "policy_error": self.policy_error}


@dataclass
class DiscoveryReport:
    """The counts of one source's run as ``record`` makes them; ``summary()`` is the frozen result."""

    source: str
    run_id: str
    places: int = 0
    certificates: int = 0
    new_certificates: int = 0
    new_locations: int = 0
    keys_stored: int = 0
    ghosts: int = 0
    problems: list[Problem] = field(default_factory=list)
    owners_assigned: int = 0
    violations: int = 0
    violations_by_rule: dict[str, int] = field(default_factory=dict)
    policy_error: str | None = None

    def summary(self) -> SourceSummary:
        return SourceSummary(self.source, self.run_id, self.places, self.certificates, self.new_certificates,
                             self.new_locations, self.keys_stored, self.ghosts, tuple(self.problems),
                             self.owners_assigned, self.violations, dict(sorted(self.violations_by_rule.items())),
                             self.policy_error)

    def count(self, summary: EvaluationSummary) -> None:
        self.violations += summary.violations
        for rule, n in summary.by_rule.items():
            if n:
                self.violations_by_rule[rule] = self.violations_by_rule.get(rule, 0) + n


@dataclass(frozen=True)
class SourceFailure:
    """A source (block document ``block``) whose run failed, and why (redacted)."""

    block: str
    reason: str


@dataclass(frozen=True)
class DiscoveryResult:
    """A discovery run: each completed source's summary, each failed source, and the inventory's expiry
    bands after it (band label to count)."""

    sources: tuple[SourceSummary, ...] = ()
    failed: tuple[SourceFailure, ...] = ()
    bands: Mapping[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"sources": [s.as_dict() for s in self.sources],
                "failed": {f.block: f.reason for f in self.failed}, "bands": dict(self.bands)}

    @property
    def policy_errors(self) -> list[str]:
        """Why the policy was not applied to what a source found, per source that says so."""
        return [f"{s.source}: {s.policy_error}" for s in self.sources if s.policy_error]


class PolicyNotApplied(PermanentError):
    """What the sources found was recorded, but the policy was not applied to all of it."""

    def __init__(self, errors: Sequence[str]) -> None:
        self.errors = tuple(errors)
        super().__init__("every source was recorded, but the policy was not applied: " + "; ".join(self.errors))

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.errors,))


class DiscoveryFailed(PermanentError):
    """Some sources of a discovery run failed; the others were recorded (``result``)."""

    def __init__(self, result: DiscoveryResult) -> None:
        self.result = result
        total = len(result.sources) + len(result.failed)
        super().__init__(f"{len(result.failed)} of {total} source(s) failed (the others were recorded): "
                         + "; ".join(f"{f.block}: {f.reason}" for f in result.failed))

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.result,))


RunSources = Callable[[Sequence[str]], Sequence[SourceSummary | BaseException]]
"""Runs the sources named (block documents) at once and returns, in order, each one's summary or the
error it ended with. It never raises for a source."""


def discover_all(blocks: Sequence[str], run_sources: RunSources,
                 log: logging.Logger | logging.LoggerAdapter[Any] = _log) -> DiscoveryResult:
    """Run every source in ``blocks`` through ``run_sources`` and gather what each ended with. The
    result's ``failed`` says which failed (``DiscoveryFailed(result)`` is the run's error); its bands
    are left for the caller, who reads them from the inventory after every source was recorded."""
    if not blocks:
        log.warning("no sources given: name source block documents in the 'sources' parameter "
                    "(e.g. tls-scan-source/lab); nothing discovered")
        return DiscoveryResult()
    summaries: list[SourceSummary] = []
    failed: list[SourceFailure] = []
    for block, ended in zip(blocks, run_sources(blocks), strict=True):
        if isinstance(ended, SourceSummary):
            summaries.append(ended)
            continue
        failed.append(SourceFailure(block, redact(ended)))
        log.error("DISCOVERY FAILED for %s: %s", block, failed[-1].reason)
    return DiscoveryResult(tuple(summaries), tuple(failed))


def observations(found: Found, source: str) -> list[Observation]:
    """The leaf at its locator (with the details and the chain's fingerprints) and the chain's
    certificates without a location: they were presented there, not installed there."""
    certs = [x509.load_der_x509_certificate(der) for der in found.certificates]
    records = [describe_certificate(cert) for cert in certs]
    details = {**found.details, "chain": [r.fingerprint_sha256 for r in records[1:]]}
    return [Observation(records[0], found.locator, source, details),
            *(Observation(r, None, source) for r in records[1:])]


def record(engine: sa.Engine, source: Source, actor: audit.Actor, *,
           key_ring: Callable[[], KeyRing] | None = None, batch_size: int = BATCH,
           now: Callable[[], dt.datetime] | None = None, block: str | None = None,
           policy: Policy | None = None, policy_error: str | None = None, part: bool = False) -> DiscoveryReport:
    """Run ``source`` and write what it finds, a batch per transaction; then flag as ghosts the
    source's locations this run did not see. Keys a source brought back are stored sealed when
    ``key_ring`` is given and dropped otherwise.

    The run is ``actor.flow_run_id`` (a fresh id without Prefect). If the source fails part-way,
    what was found is kept and nothing is flagged: ghosts are judged only by a complete run.
    The source's SourceRun row (``block``: the block document that configures it) records when the
    run started, and when it completed or failed and why (redacted): a source that stops completing
    is seen as stale by the monitor.

    ``part``: ``source`` is one chunk of a larger scan whose run is ``actor.flow_run_id``, recorded by
    several runs at once: its places are marked seen by that run, and neither the source's run row nor
    its ghosts are touched (``finish_parts`` does both once every chunk is recorded).
    """
    clock = now or utcnow
    run_id = actor.flow_run_id or f"scan-{uuid.uuid4().hex}"
    actor = audit.Actor(actor.name, run_id)
    if part:
        report = _record(engine, source, actor, run_id, key_ring, batch_size, clock, policy, flag=False)
        report.policy_error = report.policy_error or policy_error
        return report
    note_source_run(engine, source.name, block, actor.flow_run_id, clock(), started=True)
    try:
        report = _record(engine, source, actor, run_id, key_ring, batch_size, clock, policy)
        report.policy_error = report.policy_error or policy_error
    except BaseException as exc:
        note_source_run(engine, source.name, block, actor.flow_run_id, clock(), error=redact(exc))
        raise
    note_source_run(engine, source.name, block, actor.flow_run_id, clock())
    return report


def finish_parts(engine: sa.Engine, source: str, block: str | None, actor: audit.Actor, parts: Sequence[SourceSummary],
                 failed: Sequence[str], now: dt.datetime | None = None) -> SourceSummary:
    """End a scan recorded in chunks (``record(..., part=True)``) by run ``actor.flow_run_id``: when no
    chunk ``failed`` (each a reason), flag the source's ghosts (its locations no chunk saw) and note the
    run completed; else note it failed, naming the chunks, and flag nothing: ghosts are judged only by a
    complete run. Returns the chunks' summaries added up, as one source's."""
    now = now or utcnow()
    run_id = actor.flow_run_id or f"scan-{uuid.uuid4().hex}"
    ghosts = 0
    if failed:
        note_source_run(engine, source, block, run_id, now,
                        error=f"{len(failed)} chunk(s) failed: {'; '.join(failed[:5])}"[:1000])
    else:
        with write_session(engine) as session:
            ghosts = flag_ghosts(session, source, run_id, audit.Actor(actor.name, run_id), now)
        note_source_run(engine, source, block, run_id, now)
    by_rule: dict[str, int] = {}
    for part in parts:
        for rule, count in part.violations_by_rule.items():
            by_rule[rule] = by_rule.get(rule, 0) + count
    return SourceSummary(source, run_id, sum(p.places for p in parts), sum(p.certificates for p in parts),
                         sum(p.new_certificates for p in parts), sum(p.new_locations for p in parts),
                         sum(p.keys_stored for p in parts), ghosts, tuple(x for p in parts for x in p.problems),
                         sum(p.owners_assigned for p in parts), sum(p.violations for p in parts),
                         dict(sorted(by_rule.items())), next((p.policy_error for p in parts if p.policy_error), None))


def note_source_run(engine: sa.Engine, source: str, block: str | None, flow_run_id: str | None, now: dt.datetime, *,
                    started: bool = False, error: str | None = None) -> None:
    """Record that ``source`` started a run (``started``), or ended it: failed with ``error`` (redacted),
    else completed."""
    with write_session(engine) as session:
        row = session.get(SourceRun, source) or SourceRun(source=source)
        row.block = block or row.block
        row.flow_run_id = flow_run_id or row.flow_run_id
        if started:
            row.last_started_at = now
        elif error is not None:
            row.last_failed_at, row.last_error = now, error
        else:
            row.last_completed_at, row.last_error = now, None
        session.add(row)


def _record(engine: sa.Engine, source: Source, actor: audit.Actor, run_id: str,
            key_ring: Callable[[], KeyRing] | None, batch_size: int,
            clock: Callable[[], dt.datetime], policy: Policy | None, flag: bool = True) -> DiscoveryReport:
    report = DiscoveryReport(source.name, run_id)
    seen: set[str] = set()
    evaluated: set[str] = set()  # certificates this run evaluated already (one may be seen in several batches)
    batch: list[Found] = []

    def flush() -> None:
        if not batch:
            return
        obs: list[Observation] = []
        keys = []
        for found in batch:
            try:
                obs += observations(found, source.name)
            except ValueError as exc:  # a source handed over bytes that are not a certificate
                report.problems.append(Problem(found.locator, f"not a certificate: {exc}"))
                continue
            if found.key is not None and key_ring is not None:
                keys.append((found.key, x509.load_der_x509_certificate(found.certificates[0]), found.locator))
        with write_session(engine) as session:
            result = inventory.upsert(session, obs, actor, now=clock())
            for key, leaf, locator in keys:
                if not key_matches_certificate(key, leaf):
                    report.problems.append(Problem(locator, "the key found beside it does not match the certificate"))
                    continue
                if key_ring is not None and keystore.find_key(session, public_key_sha256(key)) is None:
                    keystore.store_private_key(session, key, key_ring(), actor, "discovered", clock())
                    report.keys_stored += 1
        report.places += sum(1 for o in obs if o.locator)
        report.new_certificates += len(result.new)
        report.new_locations += result.new_locations
        seen.update(result.seen)
        if policy is not None:
            fresh = [fp for fp in dict.fromkeys(o.record.fingerprint_sha256 for o in obs) if fp not in evaluated]
            evaluated.update(fresh)
            _apply_policy(engine, policy, fresh, [o for o in obs if o.locator], actor, clock(), report)
        batch.clear()

    for item in source.discover():
        if isinstance(item, Problem):
            report.problems.append(item)
            continue
        batch.append(item)
        if len(batch) >= batch_size:
            flush()
    flush()
    report.certificates = len(seen)
    if flag:
        with write_session(engine) as session:
            report.ghosts = flag_ghosts(session, source.name, run_id, actor, clock())
    return report


def _apply_policy(engine: sa.Engine, policy: Policy, fingerprints: list[str], placed: list[Observation],
                  actor: audit.Actor, now: dt.datetime, report: DiscoveryReport) -> None:
    """Ownership rules, then the certificate rules for ``fingerprints``, then the endpoint rules for the TLS
    places among ``placed`` (leaves at their locators), in one transaction; a failure is noted in
    ``report`` (the first one) and leaves what was found recorded."""
    try:
        with write_session(engine) as session:
            owners, evaluated = violations.own_and_evaluate(session, policy, actor, fingerprints, now)
            leaves = list(dict.fromkeys(o.record.fingerprint_sha256 for o in placed))
            facts = {f.fingerprint_sha256: f for f in violations.facts_for(session, policy, leaves, now)}
            endpoints = [e for o in placed if (e := endpoint_facts(
                o.locator or "", facts.get(o.record.fingerprint_sha256), o.details or {})) is not None]
            evaluations = [evaluated]
            if endpoints:
                evaluations.append(violations.evaluate_endpoints(session, policy, endpoints, actor, now))
    except (CertpilotError, sa.exc.SQLAlchemyError) as exc:
        report.policy_error = report.policy_error or (
            f"policy not applied to a batch of {len(fingerprints)} certificate(s) and {len(placed)} place(s): "
            f"{exc.__class__.__name__}: {(str(exc).splitlines() or [''])[0][:300]}")
        return
    report.owners_assigned += owners
    for summary in evaluations:
        report.count(summary)
        if summary.errors and report.policy_error is None:
            report.policy_error = f"{len(summary.errors)} not evaluated: " + "; ".join(summary.errors[:3])


# verify_reason of a TLS scan (connectors.tls_scan) when the presented chain lacks an intermediate.
_MISSING_ISSUER = ("unable to get local issuer certificate", "unable to get issuer certificate")


def endpoint_facts(place: str, certificate: Facts | None, details: Mapping[str, Any]) -> EndpointFacts | None:
    """What a TLS handshake at ``place`` recorded (a location's details, as connectors.tls_scan writes them),
    for the endpoint rules; None for a place that is not a TLS endpoint (a file, a store) or whose
    certificate is not evaluated (a CA certificate). The chain is complete when it verified, incomplete
    when an issuer was neither presented nor trusted, unknown otherwise (no trust anchors configured, or
    a failure of another kind: expired, self-signed); the host name is known only when there was a name
    to match."""
    if certificate is None or not place.startswith("tls://") or "tls_version" not in details:
        return None
    verified, reason = details.get("verified"), str(details.get("verify_reason") or "")
    chain: bool | None = True if verified is True else (False if any(m in reason for m in _MISSING_ISSUER) else None)
    matches = details.get("hostname_matches")
    return EndpointFacts(place, certificate, details.get("tls_version") or None, chain,
                         matches if isinstance(matches, bool) else None)


def flag_ghosts(session: Session, source: str, run_id: str, actor: audit.Actor, now: dt.datetime) -> int:
    """Flag the locations of ``source`` not seen by run ``run_id`` as ghosts (those it saw were
    unflagged as they were recorded) and drop the endpoint violations of those certificates there. Returns
    how many were newly flagged; each is audited."""
    stale = session.execute(
        sa.select(col(Location.id), col(Location.certificate_fingerprint), col(Location.locator)).where(
            col(Location.source) == source, col(Location.ghost).is_(False),
            sa.or_(col(Location.seen_by_run).is_(None), col(Location.seen_by_run) != run_id))).all()
    if not stale:
        return 0
    ids = [row[0] for row in stale]
    for start in range(0, len(ids), BATCH):
        session.execute(sa.update(Location).where(col(Location.id).in_(ids[start:start + BATCH]))
                        .values(ghost=True), execution_options={"synchronize_session": False})
    audit.append(session, actor, [audit.Change("location.ghost", f"certificate:{fp}", {"locator": locator,
                                                                                       "source": source})
                                  for _, fp, locator in stale], now)
    violations.forget_places(session, [(fp, locator) for _, fp, locator in stale])  # the endpoint rules' rows there
    return len(stale)
