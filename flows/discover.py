"""The discover flow: run each configured source, record what it finds, flag ghosts, publish the
inventory artifact.

One task per source (block document ``block-type-slug/name``), all at once on a bounded pool, each
retried on transient errors and writing its observations in batches. A source's ghosts (its
locations this run did not see) are flagged only when that source completed. The run fails, after
every source did what it could, when a source failed.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.futures import wait
from prefect.task_runners import ThreadPoolTaskRunner

from certpilot.errors import PermanentError
from certpilot.rollout import safe
from tasks.discovery import discover_source, publish_inventory

SOURCE_WORKERS = 4


@flow(name="discover", task_runner=ThreadPoolTaskRunner(max_workers=SOURCE_WORKERS),
      description=__doc__.split("\n\n")[0])
def discover(sources: list[str], batch_size: int = 500) -> dict[str, Any]:
    """Discover certificates with each source block in ``sources`` (e.g. ``tls-scan-source/lab``)."""
    logger = get_run_logger()
    if not sources:
        logger.warning("no sources given: name source block documents in the 'sources' parameter "
                       "(e.g. tls-scan-source/lab); nothing discovered")
    futures = [discover_source.with_options(task_run_name=f"discover-{block.replace('/', '-')}")
               .submit(block, batch_size) for block in sources]
    wait(futures)
    summaries: list[dict[str, Any]] = []
    failed: dict[str, str] = {}
    for block, future in zip(sources, futures):
        if future.state.is_completed():
            summaries.append(future.result())
            continue
        try:
            exc = future.result(raise_on_failure=False)
        except Exception as raised:
            exc = raised
        failed[block] = safe(exc) if isinstance(exc, BaseException) else (future.state.message or "failed")
        logger.error("DISCOVERY FAILED for %s: %s", block, failed[block])
    bands = publish_inventory(summaries, failed)
    result = {"sources": summaries, "failed": failed, "bands": bands}
    if failed:
        raise PermanentError(f"{len(failed)} of {len(sources)} source(s) failed (the others were recorded): "
                             + "; ".join(f"{b}: {r}" for b, r in failed.items()))
    return result
