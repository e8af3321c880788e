"""The discover flow: run each configured source, record what it finds, flag ghosts, apply the policy,
publish the inventory and policy artifacts.

Its sources are the block documents named in ``sources`` or, when none are named (the scheduled
deployment), every saved block configured as a source of the chosen ``kinds``: TLS scans, SSH hosts
with discovery globs, AWS accounts, Key Vaults. With none registered the run says so, in its log, its
inventory artifact and its Completed state's message, and discovers nothing.

One task per source (block document ``block-type-slug/name``), all at once on a bounded pool, each
retried on transient errors and writing its observations in batches. A source's ghosts (its
locations this run did not see) are flagged only when that source completed. The run fails, after
every source did what it could, when a source failed. Each source's batches are given owners by
the policy's ownership rules and evaluated against its rules (its TLS places against the endpoint
rules); the ``policy`` artifact shows the violations by rule and the worst certificates, and a policy
that could not be applied fails the run after everything was recorded. Each managed certificate whose
records the run changed (its certificate seen in a new place, a place gone ghost...) gets its history
artifact, ``certificate-<name>`` (up to HISTORY_ARTIFACTS per run).

A TLS scan larger than its block's ``chunk_addresses`` (a /16...) is scanned in chunks when discover
runs from a deployment beside a discover-chunk deployment (a work pool, or certpilot serve): one
discover-chunk run per chunk, CHUNKS_AT_ONCE in flight, so the workers of the pool share the scan
(flows.fan_out). Each chunk records what it finds as part of this run; this run then adds their
summaries up and flags the source's ghosts, only if every chunk completed. Called directly, or with
no discover-chunk deployment, a scan runs whole in one task as any source.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

from uuid import UUID

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.states import Completed, State

from blocks.sources import SourceKind
from certpilot.discovery import DiscoveryFailed, DiscoveryResult, PolicyNotApplied, SourceSummary, discover_all
from certpilot.errors import PermanentError
from flows.fan_out import deployment_beside, run_all
from flows.runners import thread_pool
from flows.settling import settle
from tasks.discovery import (discover_part, discover_source, finish_scan, part_summaries, publish_inventory,
                             publish_part, publish_policy, registered_sources, scan_chunks)
from tasks.history import audit_head, publish_certificate_history

SOURCE_WORKERS = 4
CHUNK_DEPLOYMENT = "discover-chunk/discover-chunk"
CHUNKS_AT_ONCE = 4  # discover-chunk runs in flight per discover run
HISTORY_ARTIFACTS = 100  # managed certificates given a history artifact per run (first runs see every one)
ALL_KINDS = tuple(SourceKind)
NO_SOURCES = ("no source block is registered ({kinds}): nothing to discover. Save a source block in the Blocks "
              "page (a TLS scan, an SSH host with discovery globs, an AWS account or an Azure Key Vault), or name "
              "block documents in 'sources'")


@flow(name="discover", task_runner=thread_pool(SOURCE_WORKERS), description=__doc__.split("\n\n")[1],
      timeout_seconds=4 * 3600)
def discover(sources: tuple[str, ...] = (), batch_size: int = 500,
             kinds: tuple[SourceKind, ...] = ALL_KINDS) -> DiscoveryResult | State[DiscoveryResult]:
    """Discover certificates with the source blocks named, or with every registered one.

    Args:
        sources: Source block documents, `block-type-slug/name` (e.g. `tls-scan/lab`, `ssh-host/web-1`).
            Empty: every saved block of the kinds below that is configured as a source.
        batch_size: Observations written to the inventory per transaction.
        kinds: The kinds of source block used when no sources are named.
    """
    logger = get_run_logger()
    blocks = list(sources)
    if not blocks:
        blocks = registered_sources(kinds)
        if not blocks:
            message = NO_SOURCES.format(kinds=", ".join(kinds) or "no kind chosen")
            logger.warning(message)
            return Completed(message=message, data=publish_inventory(DiscoveryResult(), note=message))
        logger.info("discovering with every registered source: %s", ", ".join(blocks))
    head = audit_head()

    def run_as_tasks(names: Sequence[str]) -> list[SourceSummary | BaseException]:
        deployment = deployment_beside(CHUNK_DEPLOYMENT)
        chunked = {block: chunks for block in names if deployment is not None and (chunks := scan_chunks(block))}
        futures = {block: discover_source.with_options(task_run_name=f"discover-{block.replace('/', '-')}")
                   .submit(block, batch_size) for block in names if block not in chunked}
        ended: dict[str, SourceSummary | BaseException] = {}
        for block, chunks in chunked.items():  # the whole sources run meanwhile, on the task runner
            assert deployment is not None
            ended[block] = _scan_in_chunks(deployment, block, chunks, batch_size)
        for block, future in futures.items():
            settled = settle(future)
            ended[block] = cast(SourceSummary, settled.value) if settled.error is None else settled.error
        return [ended[block] for block in names]

    result = publish_inventory(discover_all(blocks, run_as_tasks, logger))
    policy = publish_policy(result, return_state=True)
    if not policy.is_completed():
        logger.warning("the policy artifact was not published: %s", policy.message)
    history = publish_certificate_history(None, head, limit=HISTORY_ARTIFACTS, return_state=True)
    if not history.is_completed():
        logger.warning("the certificates' history artifacts were not published: %s", history.message)
    if result.failed:
        raise DiscoveryFailed(result)
    if result.policy_errors:
        raise PolicyNotApplied(result.policy_errors)
    return result


def _scan_in_chunks(deployment: UUID, block: str, chunks: list[list[str]], batch_size: int,
                    ) -> SourceSummary | BaseException:
    """Scan TLS scan ``block`` as discover-chunk runs of ``deployment``, one per chunk, then end its run
    here (``finish_scan``): its summary, or the error naming the chunks that failed."""
    run_id = str(flow_run.get_id())
    get_run_logger().info("%s: %d chunk(s), %d at once, each a discover-chunk run", block, len(chunks), CHUNKS_AT_ONCE)
    name = block.replace("/", "-")
    ended = run_all(deployment, [(f"{name}-chunk-{index + 1}-of-{len(chunks)}",
                                  {"block": block, "targets": chunk, "run_id": run_id, "batch_size": batch_size})
                                 for index, chunk in enumerate(chunks)], CHUNKS_AT_ONCE)
    summaries = part_summaries([e.run_id for e in ended if e.completed and e.run_id is not None])
    failed = [e.why for e in ended if not e.completed]
    failed += [f"{e.name} left no summary" for e in ended if e.completed and e.run_id not in summaries]
    state = finish_scan(block, [summaries[e.run_id] for e in ended if e.run_id in summaries], failed,
                        return_state=True)
    if failed:
        return PermanentError(f"{len(failed)} of {len(chunks)} chunk(s) of {block} failed (what the others found is "
                              f"recorded; no ghost flagged): {'; '.join(failed[:5])}")
    if not state.is_completed():
        return PermanentError(f"{block}: its chunks were scanned but the scan could not be ended: {state.message}")
    return state.result()


@flow(name="discover-chunk", description=__doc__.split("\n\n")[-1], timeout_seconds=3600)
def discover_chunk(block: str, targets: list[str], run_id: str, batch_size: int = 500) -> SourceSummary:
    """Scan a chunk of a TLS scan block's targets and record what it finds, as part of a discover run
    (which started this run and ends the source's run once every chunk is over).

    Args:
        block: The TLS scan block document (`tls-scan/name`).
        targets: The chunk: its addresses, ranges or host names, as the block's chunks() made it.
        run_id: The discover run this chunk is part of: its places are recorded as seen by it.
        batch_size: Observations written to the inventory per transaction.
    """
    summary = discover_part(block, targets, run_id, batch_size)
    publish_part(summary)
    return summary
