"""Discovery tasks: run one source (built from its block) and record what it found.

A task per source, retried on transient errors; the source's observations are upserted in batches
inside the task (a task run per endpoint would not scale) and only counts and problems come back.
Keys reach the keystore sealed only when the source's block asks for them (import_keys).
``run_source`` is the plain function the task wraps; the CLI calls it directly when there is no
Prefect API. ``registered_sources`` finds every saved block configured as a source, for a discover
run given no source names (the scheduled one).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.client.orchestration import get_client
from prefect.exceptions import PrefectHTTPStatusError

import blocks.aws  # noqa: F401  (registers the source block types, so load_block finds them)
import blocks.azure  # noqa: F401
import blocks.ssh  # noqa: F401
import blocks.tls_scan  # noqa: F401
from blocks.loading import load_block
from blocks.policy import policy_in_force
from blocks.sources import SourceKind, configured_as_source
from certpilot import audit, keystore, violations
from certpilot.database import get_engine, read_session
from certpilot.discovery import DiscoveryResult, SourceSummary, record
from certpilot.errors import CertpilotError, redact
from certpilot.policy import Policy
from certpilot.policy_artifact import policy_markdown, worst_certificates
from certpilot.report import ExpiryReport, expiry_report
from certpilot.settings import Settings, load_settings
from tasks.deployment import close
from tasks.inventory import retry_transient_only, run_actor

PROBLEMS_SHOWN = 20
WORST_SHOWN = 20  # certificates listed in the policy artifact
SOURCE_RETRY_DELAYS: list[float] = [5, 30]  # seconds before the first and the second retry of a source


def run_source(block: str, batch_size: int, actor: audit.Actor,
               log: logging.Logger | logging.LoggerAdapter[Any]) -> SourceSummary:
    """Run the source configured by block document ``block`` (``block-type-slug/name``) and record it."""
    settings = load_settings()
    policy, policy_error = _policy(settings, log)
    source = load_block(block).source()  # a source block (see blocks/): it builds the connector
    try:
        report = record(get_engine(settings), source, actor, batch_size=batch_size, block=block,
                        key_ring=lambda: keystore.load_key_ring(settings, announce=log.warning),
                        policy=policy, policy_error=policy_error)
    finally:
        close(source)
    for problem in report.problems[:PROBLEMS_SHOWN]:
        log.warning("%s: %s", problem.locator, problem.reason)
    if len(report.problems) > PROBLEMS_SHOWN:
        log.warning("... and %d more problem(s)", len(report.problems) - PROBLEMS_SHOWN)
    log.info("%s: %d place(s), %d certificate(s), %d new, %d new location(s), %d ghost(s), %d problem(s)",
             source.name, report.places, report.certificates, report.new_certificates, report.new_locations,
             report.ghosts, len(report.problems))
    log.info("%s: policy: %d owner(s) assigned, %d violation(s) not waived %s", source.name, report.owners_assigned,
             report.violations, dict(sorted(report.violations_by_rule.items())) or "")
    if report.policy_error:
        log.error("POLICY NOT APPLIED to %s: %s", source.name, report.policy_error)
    return report.summary()


def _policy(settings: Settings, log: logging.Logger | logging.LoggerAdapter[Any]) -> tuple[Policy | None, str | None]:
    """The policy in force, or why there is none (discovery records what it finds all the same)."""
    try:
        return policy_in_force(settings), None
    except CertpilotError as exc:
        log.error("the policy was not loaded (discovery goes on without it): %s", redact(exc))
        return None, f"the policy was not loaded: {redact(exc)}"


@task(name="registered-sources", timeout_seconds=120)
def registered_sources(kinds: Sequence[SourceKind]) -> list[str]:
    """Every saved block of ``kinds`` configured as a source (``block-type-slug/name``), sorted. A block
    type never registered on this server has no saved blocks."""
    found: list[str] = []
    with get_client(sync_client=True) as client:
        for kind in dict.fromkeys(kinds):
            try:
                documents = client.read_block_documents_by_type(kind.value, include_secrets=False)
            except PrefectHTTPStatusError as exc:
                if exc.response.status_code == 404:
                    continue
                raise
            found += [f"{kind.value}/{d.name}" for d in documents
                      if d.name and not d.is_anonymous and configured_as_source(kind, d.data)]
    return sorted(found)


# A source's run: an hour is room for tens of thousands of endpoints or files (every connection and
# command has its own, much shorter, timeout in the source's block).
@task(name="discover-source", retries=len(SOURCE_RETRY_DELAYS), retry_delay_seconds=SOURCE_RETRY_DELAYS,
      retry_condition_fn=retry_transient_only, timeout_seconds=3600)
def discover_source(block: str, batch_size: int = 500) -> SourceSummary:
    """Run the source configured by block document ``block`` (``block-type-slug/name``) and record it."""
    return run_source(block, batch_size, run_actor(), get_run_logger())


def inventory_markdown(result: DiscoveryResult, expiry: ExpiryReport, note: str | None = None) -> str:
    """The inventory artifact: ``note`` (e.g. why nothing was discovered), each source's counts and
    problems, then expiry bands and the soonest."""
    lines = ["# Inventory after discovery", ""] + ([f"**{note}**", ""] if note else [])
    lines += ["| source | places | certificates | new | ghosts | problems |", "|---|---|---|---|---|---|"]
    for s in result.sources:
        lines.append(f"| {s.source} | {s.places} | {s.certificates} | {s.new_certificates} | "
                     f"{s.ghosts} | {len(s.problems)} |")
    lines += [f"| {f.block} | FAILED | | | | {f.reason.replace('|', '/')} |" for f in result.failed]
    lines += ["", "## Expiry", "", " | ".join(f"**{label}**: {count}" for label, count in expiry.bands.items()), "",
              "| band | days left | subject | places |", "|---|---|---|---|"]
    lines += [f"| {row['band']} | {row['days_left']:.0f} | {row['subject']} | {len(row['locations'])} |"
              for row in expiry.soonest]
    problems = [(s.source, p) for s in result.sources for p in s.problems]
    if problems:
        lines += ["", "## Problems", "", "| source | where | why |", "|---|---|---|"]
        lines += [f"| {src} | {p.locator} | {p.reason.replace('|', '/')} |" for src, p in problems[:100]]
    return "\n".join(lines)


def with_bands(result: DiscoveryResult, show: int = 15) -> tuple[DiscoveryResult, ExpiryReport]:
    """The result with the inventory's expiry bands now, and the expiry report they come from."""
    with read_session(get_engine()) as session:
        expiry = expiry_report(session, show=show)
    return replace(result, bands=dict(expiry.bands)), expiry


@task(name="publish-inventory", timeout_seconds=600)
def publish_inventory(result: DiscoveryResult, note: str | None = None) -> DiscoveryResult:
    """The inventory artifact (key: inventory), headed by ``note`` if given; returns the result with the
    expiry bands it shows."""
    result, expiry = with_bands(result)
    create_markdown_artifact(key="inventory", markdown=inventory_markdown(result, expiry, note),
                             description="What discovery found, per source, and what expires soon")
    return result


@task(name="publish-policy", timeout_seconds=300)
def publish_policy(result: DiscoveryResult) -> dict[str, int]:
    """The policy artifact (key: policy): what this discovery run assigned and found per source, the
    inventory's violations by rule (not waived) and its worst certificates. Returns the counts by rule."""
    try:
        source: str | None = policy_in_force().source
    except CertpilotError as exc:
        source = f"none: {redact(exc)}"
    with read_session(get_engine()) as session:
        by_rule = violations.open_counts_by_rule(session)
        worst = worst_certificates(session, WORST_SHOWN)
    create_markdown_artifact(key="policy", markdown=policy_markdown(by_rule, worst, result.sources, source),
                             description="Policy violations by rule, and the worst certificates")
    return by_rule
