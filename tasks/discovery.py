"""Discovery tasks: run one source (built from its block) and record what it found.

A task per source, retried on transient errors; the source's observations are upserted in batches
inside the task (a task run per endpoint would not scale) and only counts and problems come back.
Keys reach the keystore sealed only when the source's block asks for them (import_keys).
``run_source`` is the plain function the task wraps; the CLI calls it directly when there is no
Prefect API. ``registered_sources`` finds every saved block configured as a source, for a discover
run given no source names (the scheduled one).

A TLS scan too large for one process is scanned in chunks (``scan_chunks``), each by a discover-chunk
run: ``discover_part`` records one chunk as part of the discover run that started it (the places it
finds are seen by that run; no ghosts flagged), ``publish_part`` leaves its summary as a table
artifact of the chunk's run, which ``part_summaries`` reads back through the Prefect API, and
``finish_scan`` ends the source's run once every chunk is over (ghosts flagged only if none failed).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Any
from uuid import UUID

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterType
from prefect.exceptions import PrefectHTTPStatusError

import blocks.aws  # noqa: F401  (registers the source block types, so load_block finds them)
import blocks.azure  # noqa: F401
import blocks.ssh  # noqa: F401
from blocks.tls_scan import TlsScanBlock
from blocks.loading import load_block
from blocks.policy import policy_in_force
from blocks.sources import SourceKind, configured_as_source
from certpilot import audit, keystore, violations
from certpilot.database import get_engine, read_session
from certpilot.discovery import DiscoveryResult, SourceSummary, finish_parts, record
from certpilot.errors import CertpilotError, PermanentError, redact
from certpilot.policy import Policy
from certpilot.policy_artifact import policy_markdown, worst_certificates
from certpilot.report import ExpiryReport, expiry_report
from certpilot.settings import Settings, load_settings
from tasks.deployment import close
from tasks.inventory import retry_transient_only, run_actor

PROBLEMS_SHOWN = 20
WORST_SHOWN = 20  # certificates listed in the policy artifact
SOURCE_RETRY_DELAYS: list[float] = [5, 30]  # seconds before the first and the second retry of a source


def run_source(block: str, batch_size: int, actor: audit.Actor, log: logging.Logger | logging.LoggerAdapter[Any],
               *, targets: Sequence[str] | None = None) -> SourceSummary:
    """Run the source configured by block document ``block`` (``block-type-slug/name``) and record it;
    ``targets``: only those of a TLS scan block (one of its chunks), recorded as part of ``actor``'s run."""
    settings = load_settings()
    policy, policy_error = _policy(settings, log)
    configured = load_block(block)
    if targets is not None and not isinstance(configured, TlsScanBlock):
        raise PermanentError(f"block {block!r} is a {type(configured).__name__}: only TLS scans are scanned in chunks")
    source = configured.source(targets) if targets is not None else configured.source()  # it builds the connector
    try:
        report = record(get_engine(settings), source, actor, batch_size=batch_size, block=block,
                        key_ring=lambda: keystore.load_key_ring(settings, announce=log.warning),
                        policy=policy, policy_error=policy_error, part=targets is not None)
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


@task(name="scan-chunks", timeout_seconds=120)
def scan_chunks(block: str) -> list[list[str]] | None:
    """The chunks of TLS scan block ``block`` when it has more than one (None: one run scans it whole,
    or it is not a TLS scan)."""
    configured = load_block(block)
    if not isinstance(configured, TlsScanBlock):
        return None
    chunks = configured.chunks()
    return chunks if len(chunks) > 1 else None


@task(name="discover-part", task_run_name="discover-part-{block}", retries=len(SOURCE_RETRY_DELAYS),
      retry_delay_seconds=SOURCE_RETRY_DELAYS, retry_condition_fn=retry_transient_only, timeout_seconds=3600)
def discover_part(block: str, targets: list[str], run_id: str, batch_size: int = 500) -> SourceSummary:
    """Scan ``targets``, a chunk of TLS scan block ``block``, and record what it finds as part of the
    discover run ``run_id``."""
    return run_source(block, batch_size, audit.Actor(run_actor().name, run_id), get_run_logger(), targets=targets)


PART_ARTIFACT = "discover-part"  # the table artifact of a discover-chunk run: its summary, for its discover run


@task(name="publish-part", timeout_seconds=120)
def publish_part(summary: SourceSummary) -> None:
    """The chunk's summary as a table artifact of its run (one row: counts, and problems up to MAX_PART_PROBLEMS)."""
    shown = replace(summary, problems=summary.problems[:MAX_PART_PROBLEMS])
    create_table_artifact(table=[shown.as_dict()], description=f"{PART_ARTIFACT}: {summary.places} place(s), "
                          f"{len(summary.problems)} problem(s) ({len(shown.problems)} listed)")


MAX_PART_PROBLEMS = 200


def part_summaries(run_ids: Sequence[UUID]) -> dict[UUID, SourceSummary]:
    """The summaries the discover-chunk runs ``run_ids`` published (``publish_part``), by run."""
    out: dict[UUID, SourceSummary] = {}
    with get_client(sync_client=True) as client:
        for run_id in run_ids:
            for artifact in client.read_artifacts(artifact_filter=ArtifactFilter(
                    flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]), type=ArtifactFilterType(any_=["table"]))):
                if (artifact.description or "").startswith(PART_ARTIFACT) and isinstance(artifact.data, str):
                    out[run_id] = SourceSummary.from_dict(json.loads(artifact.data)[0])
    return out


@task(name="finish-scan", task_run_name="finish-scan-{block}", timeout_seconds=600)
def finish_scan(block: str, parts: list[SourceSummary], failed: list[str]) -> SourceSummary:
    """End the chunked scan of ``block`` by this run: ghosts flagged when no chunk ``failed``, its source
    run noted completed or failed; the chunks' summaries added up."""
    configured = load_block(block)
    source = f"tls-scan:{configured._block_document_name}"
    return finish_parts(get_engine(), source, block, run_actor(), parts, failed)


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
