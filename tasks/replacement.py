"""Revoke-and-replace tasks: thin units over certpilot.replacing, certpilot.scope and certpilot.blast_radius.

- ``blast_radius`` (the dry run): the certificates in scope, what would be done with each and what it
  costs, published as the ``blast-radius`` markdown artifact; nothing is written.
- ``open_replacement``: opens (or resumes) the campaign: its items are the certificates in scope now.
- ``replace_certificate``: one task run per certificate, named ``replace-<name>`` (``revoke-<name>`` for
  a revoke-only certificate) and tagged ``certificate:<name>``, which advances its item to the end.
  Retrying it is safe (TransientError only): the item's state machine resumes where it stands.
- ``publish_replacement_report``: the ``revoke-and-replace`` artifact (per certificate: old and new
  fingerprint, targets verified, revoked at, error; the exposures; totals; duration).

Per run, not per certificate: each issuer block is loaded once (the flow builds the connectors), and
each target's block once (``Deployers``: one SSH login per host block, shared by every deployer built
from it, closed at the end of the run). A certificate's targets are deployed by ``target_steps``, a
thread per target of a wave, inside the certificate's own task run: a task run per target would cost
the server a record each.

Secrets: no task takes or returns a private key; items, reports and artifacts carry fingerprints, key
ids and redacted errors only.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import sqlalchemy as sa
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from sqlmodel import col

import blocks.aws  # noqa: F401  (registers the connector block types, so load_block finds them)
import blocks.azure  # noqa: F401
import blocks.ssh  # noqa: F401
from blocks.loading import load_block
from blocks.policy import policy_in_force
from blocks.targets import build_deployer
from certpilot import audit, replacing, rollout, targets
from certpilot.blast_radius import BlastRadius
from certpilot.database import get_engine, read_session
from certpilot.deployment import DeployBundle, Deployer
from certpilot.errors import NotFoundError, PermanentError, TransientError, redact
from certpilot.issuance import Issuer
from certpilot.managed import KeyRingSource
from certpilot.models import ManagedCertificate
from certpilot.rate_limits import RateLimits, limits_for
from certpilot.replacing import Campaign, CampaignReport, Item, Replacer
from certpilot.revoking import RevocationOutcome
from certpilot.rollout import DeployStep, Outcome, Step
from certpilot.scope import Scope
from certpilot.scope import resolve as resolve_scope
from connectors.revocation import SharedTransport
from tasks.deployment import RETRY_DELAYS, close
from tasks.history import tag_with_certificate
from tasks.inventory import retry_transient_only, run_actor
from tasks.renewal import (
    IssuerUnavailable,
    SharedSlotIssuer,
    claim_holder_alive,
    issuer_block,
    key_ring,
    load_issuer,
    run_holder,
)
from tasks.revocation import watch_and_record

REPLACE_RETRY_DELAYS: list[float] = [2, 10]  # before the first and the second retry of one certificate
# One certificate, end to end: an order that waits for its issuer's slot and for validation, a deployment
# to its targets with verification polling, a revocation. Every network call inside has its own timeout.
REPLACE_TIMEOUT_SECONDS = 3600
PROPAGATION_WATCH_SECONDS = 10.0  # after each revocation: until its CRL and OCSP both say revoked, at most this


# ------------------------------------------------------------------------------------------ issuers

def available_issuers(names: Sequence[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Each issuer block of ``names`` that loads ({name: block}), and why the others do not ({name: reason}).
    The connectors are not built (an ACME issuer may contact its CA then)."""
    blocks: dict[str, Any] = {}
    problems: dict[str, str] = {}
    for name in sorted(set(names)):
        try:
            blocks[name] = issuer_block(name)
        except Exception as exc:  # noqa: BLE001 - the scope says so for each of its certificates
            problems[name] = redact(exc)
    return blocks, problems


def issuer_names() -> list[str]:
    """The issuer blocks of every managed certificate in the inventory."""
    with read_session(get_engine()) as session:
        return sorted(session.execute(sa.select(col(ManagedCertificate.issuer)).distinct()).scalars())


def rate_limits(blocks: dict[str, Any]) -> dict[str, RateLimits | None]:
    """The published rate limits of each issuer block (by its ACME directory; None: none known)."""
    return {name: limits_for(getattr(block, "directory_url", None)) for name, block in blocks.items()}


def load_issuers(names: Sequence[str], actor: audit.Actor) -> dict[str, Issuer | IssuerUnavailable]:
    """Each issuer block built into its connector, once for the run (or why it cannot be)."""
    engine, ring = get_engine(), key_ring()
    out: dict[str, Issuer | IssuerUnavailable] = {}
    for name in sorted(set(names)):
        try:
            out[name] = load_issuer(name, engine, ring, actor)
        except Exception as exc:  # noqa: BLE001 - its certificates fail at their first CA step, with this reason
            out[name] = IssuerUnavailable(name, redact(exc))
    return out


def issuer_source(connectors: Mapping[str, Issuer | IssuerUnavailable], slots: Mapping[str, threading.BoundedSemaphore],
                  paused: Mapping[str, str] | None = None) -> Callable[[str], Issuer]:
    """The run's issuer by block name: its connector taking one of ``slots[name]`` per order
    (SharedSlotIssuer); PermanentError naming why for one that is paused or could not be loaded."""
    def issuer_for(name: str) -> Issuer:
        if paused and name in paused:
            raise PermanentError(paused[name])
        found = connectors.get(name)
        if isinstance(found, IssuerUnavailable):
            raise PermanentError(found.reason)
        if found is None or name not in slots:
            raise PermanentError(f"issuer block {name} was not loaded for this run")
        return SharedSlotIssuer(found, slots[name])
    return issuer_for


def issuers_of(items: Sequence[Item]) -> set[str]:
    """The issuer blocks of the items' managed certificates (each reissues and revokes through its own)."""
    names = sorted({i.managed for i in items if i.managed})
    with read_session(get_engine()) as session:
        return set(session.execute(sa.select(col(ManagedCertificate.issuer))
                                   .where(col(ManagedCertificate.name).in_(names))).scalars())


# ------------------------------------------------------------------------------------------ dry run

def radius_of(scope: Scope, revoke_first: bool, log: Any) -> BlastRadius:
    """What a revoke-and-replace of ``scope`` would do and cost, from the inventory; each issuer block is
    loaded (not built) to know whether it is available and what rate limits it publishes."""
    blocks, problems = available_issuers(issuer_names())
    for name, why in problems.items():
        log.warning("issuer block %s is not available: %s", name, why)
    with read_session(get_engine()) as session:
        found = resolve_scope(session, scope, available_issuers=set(blocks))
    return BlastRadius.of(scope, found, rate_limits(blocks), revoke_first)


@task(name="blast-radius", cache_policy=NO_CACHE, timeout_seconds=600)
def blast_radius(scope: Scope, revoke_first: bool) -> BlastRadius:
    """What a revoke-and-replace of ``scope`` would do, and what it costs (the dry run), published as the
    ``blast-radius`` artifact of the run. Nothing is generated, ordered, deployed, revoked or written."""
    radius = radius_of(scope, revoke_first, get_run_logger())
    create_markdown_artifact(key="blast-radius", markdown=radius.markdown(),
                             description=f"Dry run: {radius.summary()}"[:500])
    return radius


# ------------------------------------------------------------------------------------------ the campaign

@task(name="open-replacement", cache_policy=NO_CACHE, timeout_seconds=600)
def open_replacement(scope: Scope, reason: str, revoke_first: bool, issuers: Sequence[str]) -> Campaign:
    """Open the campaign for ``scope`` (or resume the one not yet done): its items, public facts only.
    ``issuers``: the issuer blocks that load. NothingInScope when the scope matches no certificate."""
    return replacing.open_campaign(get_engine(), scope, reason, revoke_first, run_actor(), available_issuers=issuers)


class Deployers:
    """Deployers of targets, each built from its block loaded once for the run: every deployer made from
    one SSH host block shares its one SSH connection. ``close`` closes them all (end of the run)."""

    def __init__(self, ring: KeyRingSource) -> None:
        self.ring = ring
        self._blocks: dict[str, Any] = {}
        self._built: list[Deployer] = []
        self._lock = threading.Lock()

    def block(self, reference: str) -> Any:
        with self._lock:
            if reference not in self._blocks:
                self._blocks[reference] = load_block(reference)
            return self._blocks[reference]

    def target(self, name: str, target_name: str) -> tuple[Any, Deployer]:
        """The target's row and its deployer."""
        engine = get_engine()
        with read_session(engine) as session:
            target = targets.get_target(session, name, target_name)
        if not target.block:
            raise NotFoundError(f"target {target_name} of {name} names no block")
        deployer = build_deployer(self.block(target.block), target.name, target.kind, dict(target.settings),
                                  lookup=targets.lookup(engine, name, self.ring))
        with self._lock:
            self._built.append(deployer)
        return target, deployer

    def close(self) -> None:
        with self._lock:
            built, self._built = self._built, []
        for deployer in built:
            try:
                close(deployer)
            except Exception:  # noqa: BLE001 - closing a connection that dropped
                pass


def target_steps(deployers: Deployers, actor: audit.Actor, log: Any) -> rollout.RunSteps:
    """certpilot.rollout's seam for one certificate's deployment: the targets of a wave at once, a thread
    each, over the run's shared deployers; a transient failure of a target's step is retried after each
    of tasks.deployment.RETRY_DELAYS."""
    engine = get_engine()

    def one(step: Step) -> Outcome:
        target, deployer = deployers.target(step.name, step.target)
        if isinstance(step, DeployStep):
            fingerprint = step.fingerprint

            def bundle() -> DeployBundle:
                found = targets.bundle(engine, step.name, fingerprint, deployers.ring)
                if found is None:
                    raise NotFoundError(f"the key of certificate {fingerprint[:16]} is not in the keystore: "
                                        "cannot deploy it")
                return found

            return rollout.bring_to(engine, target, deployer, bundle, fingerprint, actor)
        return rollout.roll_back(engine, target, deployer, step.receipt, actor)

    def attempt(step: Step) -> Outcome:
        for delay in [*RETRY_DELAYS, None]:
            try:
                return one(step)
            except TransientError:
                if delay is None:
                    raise
                log.warning("target %s of %s: transient failure, retrying in %g s", step.target, step.name, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def run(steps: Sequence[Step]) -> list[Outcome | BaseException]:
        if len(steps) == 1:
            try:
                return [attempt(steps[0])]
            except Exception as exc:  # noqa: BLE001 - the seam returns each step's error
                return [exc]
        with ThreadPoolExecutor(max_workers=len(steps), thread_name_prefix="replace-target") as pool:
            futures = [pool.submit(attempt, step) for step in steps]
        return [f.exception() or f.result() for f in futures]

    return run


class PropagationWatch:
    """Watches each revocation of the run reach relying parties (its CRL and its OCSP responder), up to
    PROPAGATION_WATCH_SECONDS, and records it (M6), on threads of its own, sharing one connection pool:
    a certificate's replacement does not wait for its watch. ``close`` waits for every watch (end of run)."""

    def __init__(self, actor: audit.Actor, log: Any, workers: int = 8) -> None:
        self.actor, self.log = actor, log
        self.transport = SharedTransport()
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="revocation-watch")
        self.futures: list[Future[None]] = []

    def submit(self, outcome: RevocationOutcome) -> None:
        self.futures.append(self.pool.submit(self._watch, outcome))

    def _watch(self, outcome: RevocationOutcome) -> None:
        label = outcome.managed or outcome.fingerprint_sha256[:16]
        try:
            propagation = watch_and_record(outcome, PROPAGATION_WATCH_SECONDS, self.actor, self.transport)
        except Exception as exc:  # noqa: BLE001 - a watch that fails is reported, the revocation stands
            self.log.warning("%s: revoked, but its propagation was not measured: %s", label, redact(exc))
            return
        if propagation is not None and propagation.seconds is None:
            self.log.warning("%s: revoked, but not seen by both its CRL and its OCSP responder within %g s: %s",
                             label, PROPAGATION_WATCH_SECONDS, propagation.detail)

    def close(self) -> int:
        """Wait for every watch; how many there were."""
        self.pool.shutdown(wait=True)
        self.transport.shut()
        return len(self.futures)


def replacer(issuers: Callable[[str], Any], deployers: Deployers, target_concurrency: int, actor: audit.Actor,
             log: Any, watch: PropagationWatch | None = None) -> Replacer:
    """What the run's certificates share: the inventory, the issuers, the deployers, who acts, the log,
    the watch that measures each revocation's propagation, the policy in force (read here, once:
    the issuance gate of each replacement applies it; a policy that cannot be read stops the run), and
    the run's holder of renewal claims (the flow run, or the CLI's process)."""
    return Replacer(get_engine(), issuers, deployers.ring, actor, target_steps(deployers, actor, log),
                    target_concurrency, log, on_revoked=watch.submit if watch is not None else None,
                    policy=policy_in_force(), holder=run_holder(), alive=claim_holder_alive)


def _certificate_run_name() -> str:
    from prefect.runtime import task_run

    parameters = task_run.get_parameters()
    item = parameters.get("item")
    verb = "revoke" if getattr(item, "action", "") == "revoke" else "replace"
    return f"{verb}-{parameters.get('name')}"


@task(name="replace-certificate", task_run_name=_certificate_run_name, cache_policy=NO_CACHE,
      on_running=[tag_with_certificate], retries=len(REPLACE_RETRY_DELAYS), retry_delay_seconds=REPLACE_RETRY_DELAYS,
      retry_condition_fn=retry_transient_only, timeout_seconds=REPLACE_TIMEOUT_SECONDS)
def replace_certificate(name: str, item: Item, context: Replacer) -> Item:
    """Advance one certificate of the campaign to its end: new key, issue, deploy and verify, revoke
    the old one (or revoke only); from wherever it stands. Raises ReplacementFailed (its item marked
    failed, the old certificate not revoked unless revoke_first) or a TransientError (retried)."""
    done = replacing.advance(context, item.id)
    if done.new_fingerprint:
        get_run_logger().info("%s: %s replaced by %s, old one revoked at %s", name, done.old_fingerprint[:16],
                              done.new_fingerprint[:16], done.revoked_at)
    else:
        get_run_logger().info("%s: %s revoked at %s", name, done.old_fingerprint[:16], done.revoked_at)
    return done


# ------------------------------------------------------------------------------------------ report

@task(name="publish-replacement-report", timeout_seconds=300)
def publish_replacement_report(report: CampaignReport) -> str:
    """Publish the run's report as the ``revoke-and-replace`` markdown artifact. Returns its text."""
    markdown = report.markdown()
    t = report.totals()
    create_markdown_artifact(key="revoke-and-replace", markdown=markdown,
                             description=f"{t['replaced']} replaced, {t['revoked']} revoked, {t['failed']} failed, "
                                         f"{t['exposures']} exposure(s)")
    return markdown


__all__ = ["Deployers", "PropagationWatch", "available_issuers", "blast_radius", "issuer_names", "issuer_source", "issuers_of", "key_ring",
           "load_issuers", "open_replacement", "publish_replacement_report", "radius_of", "rate_limits",
           "replace_certificate", "replacer", "target_steps"]
