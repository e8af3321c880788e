"""Discovery tasks: run one source (built from its block) and record what it found.

A task per source, retried on transient errors; the source's observations are upserted in batches
inside the task (a task run per endpoint would not scale) and only counts and problems come back.
Keys reach the keystore sealed only when the source's block asks for them (import_keys).
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.blocks.core import Block

import blocks.aws  # noqa: F401  (registers the source block types, so Block.load finds them)
import blocks.azure  # noqa: F401
import blocks.ssh  # noqa: F401
import blocks.tls_scan  # noqa: F401
from certpilot import keystore
from certpilot.database import get_engine, read_session
from certpilot.discovery import record
from certpilot.report import expiry_report
from certpilot.settings import load_settings
from tasks.deployment import close
from tasks.inventory import retry_transient_only, run_actor

PROBLEMS_SHOWN = 20


@task(name="discover-source", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_transient_only)
def discover_source(block: str, batch_size: int = 500) -> dict[str, Any]:
    """Run the source configured by block document ``block`` (``block-type-slug/name``) and record it."""
    logger = get_run_logger()
    settings = load_settings()
    source = Block.load(block).source()  # type: ignore[attr-defined]
    try:
        report = record(get_engine(settings), source, run_actor(), batch_size=batch_size,
                        key_ring=lambda: keystore.load_key_ring(settings, announce=logger.warning))
    finally:
        close(source)
    for problem in report.problems[:PROBLEMS_SHOWN]:
        logger.warning("%s: %s", problem.locator, problem.reason)
    if len(report.problems) > PROBLEMS_SHOWN:
        logger.warning("... and %d more problem(s)", len(report.problems) - PROBLEMS_SHOWN)
    logger.info("%s: %d place(s), %d certificate(s), %d new, %d new location(s), %d ghost(s), %d problem(s)",
                source.name, report.places, report.certificates, report.new_certificates, report.new_locations,
                report.ghosts, len(report.problems))
    return report.summary()


@task(name="publish-inventory")
def publish_inventory(summaries: list[dict[str, Any]], failed: dict[str, str]) -> dict[str, int]:
    """The inventory artifact (key: inventory): each source's counts and problems, then expiry bands."""
    with read_session(get_engine()) as session:
        expiry = expiry_report(session, show=15)
    lines = ["# Inventory after discovery", "", "| source | places | certificates | new | ghosts | problems |",
             "|---|---|---|---|---|---|"]
    for s in summaries:
        lines.append(f"| {s['source']} | {s['places']} | {s['certificates']} | {s['new_certificates']} | "
                     f"{s['ghosts']} | {len(s['problems'])} |")
    lines += [f"| {block} | FAILED | | | | {reason.replace('|', '/')} |" for block, reason in failed.items()]
    lines += ["", "## Expiry", "", " | ".join(f"**{label}**: {count}" for label, count in expiry.bands.items()), "",
              "| band | days left | subject | places |", "|---|---|---|---|"]
    lines += [f"| {row['band']} | {row['days_left']:.0f} | {row['subject']} | {len(row['locations'])} |"
              for row in expiry.soonest]
    problems = [(s["source"], p) for s in summaries for p in s["problems"]]
    if problems:
        lines += ["", "## Problems", "", "| source | where | why |", "|---|---|---|"]
        lines += [f"| {src} | {p['locator']} | {p['reason'].replace('|', '/')} |" for src, p in problems[:100]]
    create_markdown_artifact(key="inventory", markdown="\n".join(lines),
                             description="What discovery found, per source, and what expires soon")
    return expiry.bands
