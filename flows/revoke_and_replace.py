"""The revoke-and-replace flow: an emergency run over every certificate a scope matches.

The scope is the run form's criteria (managed names, fingerprints, serial numbers, an issuer, a public
key, a DNS name or domain suffix, an owner, a tag: all given must match). A dry run, the default,
changes nothing: it publishes the blast radius (artifact ``blast-radius``: each certificate in scope,
its owner, targets and discovered locations, what would be reissued or revoked, what cannot be, the CA
rate-limit budget, what revoking first costs). A real run opens a campaign (or resumes the one not yet
done for the same scope, reason and order), then per managed certificate: a new key, issue, deploy
(canary target first, then waves, verified on the wire, rolled back on failure), then revoke the old
certificate; the first replacement alone before the others (the canary certificate), then at most
``concurrency`` at once, one task run each (``replace-<name>``, tagged ``certificate:<name>``).
Afterwards every target and discovered location of the old certificates is probed: a place still
serving one is an exposure. The report is the artifact ``revoke-and-replace``.

Resumable: a run killed at any point and started again with the same scope converges (certpilot.replacing).
A replacement that fails is not revoked (unless ``revoke_first``); the run fails loudly, naming every
certificate whose replacement failed and every exposure, after doing all it could.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Annotated, Any, Literal, cast

from prefect import flow, get_run_logger
from prefect.futures import PrefectFuture, as_completed
from prefect.runtime import flow_run
from prefect.states import Completed, State
from pydantic import Field

from certpilot.blast_radius import BlastRadius
from certpilot.database import get_engine
from certpilot.errors import PermanentError
from certpilot.managed import certificate_tag
from certpilot.replacing import Campaign, CampaignReport, Item, RevokeAndReplaceFailed, run_campaign
from certpilot.scope import Action, Scope
from flows.runners import thread_pool
from flows.settling import settle
from flows.tagging import tag_flow_run
from tasks.exposure import probe_exposure
from tasks.history import audit_head, publish_certificate_history
from tasks.inventory import run_actor
from tasks.renewal import (
    DEFAULT_ISSUER_SLOTS,
    IssuerUnavailable,
    ensure_issuer_limits,
    hold_issuer_slots,
    key_ring,
    limit_name,
)
from tasks.replacement import (
    Deployers,
    PropagationWatch,
    available_issuers,
    blast_radius,
    issuer_names,
    issuer_source,
    issuers_of,
    load_issuers,
    open_replacement,
    publish_replacement_report,
    replace_certificate,
    replacer,
)

MAX_CONCURRENCY = 32  # certificates replaced at once, whatever a run asks for
TARGET_CONCURRENCY = 4  # one certificate's targets deployed at once after its canary target
# The run holds its issuers' concurrency slots under a lease this long, renewed while it runs: a run that is
# killed holds them until the lease expires, so this is how long the run started after it may wait for them
# (Prefect's own default is 300 s; its server takes no less than 60).
ISSUER_LEASE_SECONDS = 60.0
Text = Annotated[str, Field(min_length=1, max_length=512)]  # a criterion of the run form: one value
Values = Annotated[list[Annotated[str, Field(min_length=1, max_length=256)]], Field(max_length=10_000)]  # any of them
Reason = Literal["key-compromise", "superseded", "affiliation-changed", "cessation-of-operation",
                 "privilege-withdrawn", "unspecified"]


def scope_of(names: Sequence[str] | None = None, fingerprints: Sequence[str] | None = None,
             serials: Sequence[str] | None = None, issuer: str | None = None, public_key: str | None = None,
             dns_name: str | None = None, domain_suffix: str | None = None, owner: str | None = None,
             tag: str | None = None) -> Scope:
    """The scope the run's parameters describe. PermanentError for a value that is not one, or for no
    criterion at all (an emergency run over everything is never what was meant)."""
    scope = Scope(names=tuple(names or ()), fingerprints=tuple(fingerprints or ()), serials=tuple(serials or ()),
                  issuer=issuer or None, public_key=public_key or None, dns_name=dns_name or None,
                  domain_suffix=domain_suffix or None, owner=owner or None, tag=tag or None)
    if scope.is_empty():
        raise PermanentError("the scope is empty: name at least one criterion (names, fingerprints, serials, issuer, "
                             "public_key, dns_name, domain_suffix, owner or tag)")
    return scope


def run_name() -> str:
    """``revoke-and-replace-<the scope, as --scope items>``, short enough to read in the runs list."""
    parameters = dict(flow_run.get_parameters() or {})
    wanted = ("names", "fingerprints", "serials", "issuer", "public_key", "dns_name", "domain_suffix", "owner", "tag")
    try:
        summary = scope_of(**{k: parameters.get(k) for k in wanted}).describe()
    except Exception:  # noqa: BLE001 - the run itself reports the bad scope
        summary = "invalid-scope"
    summary = summary if len(summary) <= 80 else summary[:77] + "..."
    return f"revoke-and-replace-{summary}" + ("-dry-run" if parameters.get("dry_run", True) else "")


def _windowed(context: Any) -> Any:
    """The campaign's seam (certpilot.replacing.RunItems): a task run per item, at most ``width`` running
    at once (a new one starts as soon as one ends), each settled: its Item or the error it ended with."""

    def run(items: Sequence[Item], width: int) -> list[Item | BaseException]:
        results: dict[int, Item | BaseException] = {}
        running: dict[PrefectFuture[Item], int] = {}
        queue = list(enumerate(items))
        while queue or running:
            while queue and len(running) < max(1, width):
                index, item = queue.pop(0)
                running[replace_certificate.submit(item.label, item, context)] = index
            finished = next(as_completed(list(running)))
            index = running.pop(finished)
            settled = settle(finished)
            results[index] = cast(Item, settled.value) if settled.error is None else settled.error
        return [results[i] for i in range(len(items))]

    return run


@flow(name="revoke-and-replace", flow_run_name=run_name, task_runner=thread_pool(MAX_CONCURRENCY),
      description=__doc__.split("\n\n")[1], timeout_seconds=6 * 3600)
def revoke_and_replace(
    names: Values | None = None,
    fingerprints: Values | None = None,
    serials: Values | None = None,
    issuer: Text | None = None,
    public_key: Text | None = None,
    dns_name: Text | None = None,
    domain_suffix: Text | None = None,
    owner: Text | None = None,
    tag: Text | None = None,
    reason: Reason = "key-compromise",
    revoke_first: bool = False,
    dry_run: bool = True,
    concurrency: Annotated[int, Field(ge=1, le=MAX_CONCURRENCY)] = 8,
) -> BlastRadius | CampaignReport | State[Any]:
    """Revoke and replace every certificate in scope: new key, issue, deploy canary first, verify on the
    wire, then revoke the old one. Dry run by default: it only publishes the blast radius.

    Args:
        names: Managed certificate names (any of them).
        fingerprints: Certificate SHA-256 fingerprints, or unique prefixes of at least 8 hex digits (any of them).
        serials: Certificate serial numbers in hex, colons allowed (any of them).
        issuer: A CA compromise: everything an issuer issued. A private CA name, an issuer block
            (`private-ca/corp`), the issuing CA certificate's SHA-256 fingerprint, or its subject DN.
        public_key: A key compromise: every certificate with this public key. Its SPKI SHA-256, or the
            fingerprint of a certificate that has it.
        dns_name: Certificates naming exactly this DNS name.
        domain_suffix: Certificates naming this domain or any name under it (e.g. `example.com`).
        owner: Certificates of this owner.
        tag: Certificates with this tag, `key=value` or `key`.
        reason: The RFC 5280 revocation reason recorded for the old certificates.
        revoke_first: Revoke each old certificate before its replacement exists (a key in an attacker's hands);
            its targets serve a revoked certificate until the replacement is deployed. Default: replace,
            verify, then revoke.
        dry_run: Only publish the blast radius (what is in scope, what would be done, what it costs): nothing
            is generated, ordered, deployed, revoked or written.
        concurrency: Certificates replaced at once after the first (the canary certificate, alone).
    """
    logger = get_run_logger()
    scope = scope_of(names, fingerprints, serials, issuer, public_key, dns_name, domain_suffix, owner, tag)
    if dry_run:
        return _dry_run(scope, revoke_first)
    started = time.monotonic()
    head = audit_head()
    blocks, problems = available_issuers(issuer_names())
    for name, why in problems.items():
        logger.warning("issuer block %s is not available (its certificates cannot be replaced): %s", name, why)
    campaign = open_replacement(scope, reason, revoke_first, sorted(blocks))
    tag_flow_run(*[certificate_tag(name) for name in campaign.managed_names])
    logger.info("campaign %d%s: %d certificate(s): %s", campaign.id, " (resumed)" if campaign.resumed else "",
                len(campaign.items), ", ".join(f"{len(campaign.of_action(a))} {a}" for a in Action))
    try:
        campaign = _run(campaign, concurrency)
    finally:
        names_touched = campaign.managed_names
        history = publish_certificate_history(names_touched, head, return_state=True) if names_touched else None
        if history is not None and not history.is_completed():
            logger.warning("the certificates' history artifacts were not published: %s", history.message)
    old = [i.old_fingerprint for i in campaign.items if i.action in (Action.REPLACE, Action.REVOKE)]
    exposure, probe_error = None, None
    if old:
        probed = probe_exposure(old, publish=False, return_state=True)
        if probed.is_completed():
            exposure = probed.result()
        else:
            probe_error = probed.message or "the exposure probe ended without a result"
    report = CampaignReport.of(get_engine(), campaign, exposure, time.monotonic() - started, probe_error)
    publish_replacement_report(report)
    for line in report.lines():
        (logger.error if "FAILED" in line or "EXPOSED" in line else logger.info)("%s", line)
    if not report.ok:
        raise RevokeAndReplaceFailed(report)
    return report


def _dry_run(scope: Scope, revoke_first: bool) -> State[Any]:
    logger = get_run_logger()
    radius = blast_radius(scope, revoke_first)
    managed = sorted({i.managed for i in radius.items if i.managed})
    if managed:
        tag_flow_run(*[certificate_tag(name) for name in managed])
    for line in radius.lines():
        logger.info("DRY RUN: %s", line)
    if not radius.items:
        message = f"DRY RUN: nothing matched the scope {scope.describe()}: no certificate would be replaced or revoked"
        logger.warning("%s", message)
        return Completed(message=message, data=radius)
    return Completed(message=f"DRY RUN, nothing changed: {radius.summary()}", data=radius)


def _run(campaign: Campaign, concurrency: int) -> Campaign:
    """Every unfinished item of the campaign, with the issuers it needs loaded once and throttled by their
    concurrency limits (the slots held for the whole run, shared by its task runs), and each target's
    block loaded once (one SSH login per host)."""
    engine, actor, logger = get_engine(), run_actor(), get_run_logger()
    needed = issuers_of([i for i in campaign.items if not i.finished])
    limits = ensure_issuer_limits(sorted(needed), DEFAULT_ISSUER_SLOTS) if needed else {}
    connectors = load_issuers(sorted(needed), actor)
    paused = {i: f"issuer {i} is paused: its concurrency limit {limit_name(i)} has 0 slots"
              for i in needed if limits.get(limit_name(i), 1) < 1}
    usable = {i for i, c in connectors.items() if i not in paused and not isinstance(c, IssuerUnavailable)}
    width = max(1, min(concurrency, MAX_CONCURRENCY))
    deployers, watch = Deployers(key_ring()), PropagationWatch(actor, logger)
    held = {i: min(limits.get(limit_name(i), 1), width) for i in usable}
    if held:
        taking = ", ".join(f"{n} of {limit_name(i)}" for i, n in sorted(held.items()))
        logger.info("taking %s of the issuers' concurrency slots (a run killed holding them keeps them for up to "
                    "%g s)", taking, ISSUER_LEASE_SECONDS)
    try:
        with hold_issuer_slots(held, lease_seconds=ISSUER_LEASE_SECONDS) as slots:
            context = replacer(issuer_source(connectors, slots, paused), deployers, TARGET_CONCURRENCY, actor, logger,
                               watch)
            return run_campaign(engine, campaign, _windowed(context), width, actor, logger)
    finally:
        deployers.close()
        watched = watch.close()
        if watched:
            logger.info("%d revocation(s) watched until their CRL and OCSP responder showed them, and recorded", watched)
