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
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

from prefect import flow, get_run_logger
from prefect.states import Completed, State

from blocks.sources import SourceKind
from certpilot.discovery import DiscoveryFailed, DiscoveryResult, PolicyNotApplied, SourceSummary, discover_all
from flows.runners import thread_pool
from flows.settling import settle
from tasks.discovery import discover_source, publish_inventory, publish_policy, registered_sources
from tasks.history import audit_head, publish_certificate_history

SOURCE_WORKERS = 4
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
        futures = [discover_source.with_options(task_run_name=f"discover-{block.replace('/', '-')}")
                   .submit(block, batch_size) for block in names]
        settled = [settle(future) for future in futures]
        return [cast(SourceSummary, s.value) if s.error is None else s.error for s in settled]

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
