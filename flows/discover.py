"""The discover flow: run each configured source, record what it finds, flag ghosts, publish the
inventory artifact.

One task per source (block document ``block-type-slug/name``), all at once on a bounded pool, each
retried on transient errors and writing its observations in batches. A source's ghosts (its
locations this run did not see) are flagged only when that source completed. The run fails, after
every source did what it could, when a source failed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

from prefect import flow, get_run_logger

from certpilot.discovery import DiscoveryFailed, DiscoveryResult, SourceSummary, discover_all
from flows.runners import thread_pool
from flows.settling import settle
from tasks.discovery import discover_source, publish_inventory

SOURCE_WORKERS = 4


@flow(name="discover", task_runner=thread_pool(SOURCE_WORKERS),
      description=__doc__.split("\n\n")[0])
def discover(sources: list[str], batch_size: int = 500) -> DiscoveryResult:
    """Discover certificates with each source block in ``sources`` (e.g. ``tls-scan-source/lab``)."""

    def run_as_tasks(blocks: Sequence[str]) -> list[SourceSummary | BaseException]:
        futures = [discover_source.with_options(task_run_name=f"discover-{block.replace('/', '-')}")
                   .submit(block, batch_size) for block in blocks]
        settled = [settle(future) for future in futures]
        return [cast(SourceSummary, s.value) if s.error is None else s.error for s in settled]

    result = publish_inventory(discover_all(sources, run_as_tasks, get_run_logger()))
    if result.failed:
        raise DiscoveryFailed(result)
    return result
