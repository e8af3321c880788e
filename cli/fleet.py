"""The fleet commands: deploy a managed certificate to its targets, and discover certificates.

With a Prefect API configured (see cli.prefect_api) they run their flows there, so the runs are in
the operator's run history. Without one they run the same core path directly (certpilot.rollout's
deploy_everywhere, certpilot.discovery's discover_all) with a thread per target or source: no flow
run is created and nothing is written to the user's own Prefect database; blocks are still read
through Prefect. Either way the result is the same typed record (``--json`` prints it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, TypeVar

import typer
from rich.text import Text

from certpilot import rollout
from certpilot.database import get_engine, read_session
from certpilot.discovery import DiscoveryFailed, DiscoveryResult, PolicyNotApplied, SourceSummary, discover_all
from certpilot.errors import InvalidOptionError, TransientError
from certpilot.rollout import DeploymentFailed, DeploymentReport, DeployStep, Outcome, Step
from cli import prefect_api
from cli.console import JsonOption, err, out, print_json
from cli.options import actor
from cli.prefect_api import flow_result, no_history_note

T = TypeVar("T")
R = TypeVar("R")


class _StderrHandler(logging.Handler):
    """Each record's message on stderr, as plain text (never console markup)."""

    def emit(self, record: logging.LogRecord) -> None:
        err.print(Text(record.getMessage()))


def _stderr_log(level: int) -> logging.Logger:
    """A logger for the direct path: records at ``level`` and above go to stderr as plain text."""
    log = logging.getLogger(f"certpilot.cli.fleet.{logging.getLevelName(level).lower()}")
    if not log.handlers:
        log.addHandler(_StderrHandler(level))
        log.propagate = False
        log.setLevel(level)
    return log


def retrying(run_one: Callable[[T], R], delays: Sequence[float]) -> Callable[[T], R]:
    """``run_one`` retried after each of ``delays`` when it fails with a TransientError, as the tasks are."""
    def attempt(item: T) -> R:
        for delay in [*delays, None]:
            try:
                return run_one(item)
            except TransientError:
                if delay is None:
                    raise
                time.sleep(delay)
        raise AssertionError("unreachable")
    return attempt


def in_threads(run_one: Callable[[T], R]) -> Callable[[Sequence[T]], list[R | BaseException]]:
    """A seam for the core's orchestration: runs a batch at once, a thread each, and returns each one's
    result or the error it ended with."""
    def run(items: Sequence[T]) -> list[R | BaseException]:
        with ThreadPoolExecutor(max_workers=max(1, len(items))) as pool:
            futures = [pool.submit(run_one, item) for item in items]
        ended: list[R | BaseException] = []
        for future in futures:
            error = future.exception()
            ended.append(error if error is not None else future.result())
        return ended
    return run


# -------------------------------------------------------------------------------------------- deploy

def deploy_directly(plan: rollout.DeploymentPlan, canary: str | None, concurrency: int) -> DeploymentReport:
    from tasks.deployment import RETRY_DELAYS, deploy_one, roll_back_one

    who, log = actor(), _stderr_log(logging.CRITICAL)

    def run_one(step: Step) -> Outcome:
        if isinstance(step, DeployStep):
            return deploy_one(step.name, step.target, step.fingerprint, who, log)
        return roll_back_one(step.name, step.target, step.receipt, who, log)

    report = rollout.deploy_everywhere(plan, in_threads(retrying(run_one, RETRY_DELAYS)), canary=canary,
                                       concurrency=concurrency, log=log)
    if report.failed:
        raise DeploymentFailed(report)
    return report


def _print_outcomes(report: DeploymentReport) -> None:
    for o in report.outcomes:
        out.print(Text(f"{o.target:<24} {o.kind:<14} {o.action:<15} {o.detail}"))
    for name in report.not_attempted:
        out.print(Text(f"{name:<24} {'':<14} {'not attempted':<15} stopped after a failure"))


def deploy_command(
    managed_name: Annotated[str, typer.Argument(help="The managed certificate to deploy.")],
    fingerprint: Annotated[str | None, typer.Option(help="Deploy this certificate instead of the current one.")] = None,
    canary: Annotated[str | None, typer.Option(help="The target to deploy first (default: the first by name).")] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="Targets deployed at once after the canary.")] = 4,
    as_json: JsonOption = False,
) -> None:
    """Deploy a managed certificate to all its targets and verify it there; on a failure every changed
    target is rolled back. Runs the deploy-certificate flow when PREFECT_API_URL is set."""
    with read_session(get_engine()) as session:
        plan = rollout.plan(session, managed_name, fingerprint)  # fail fast, before starting Prefect
    if canary is not None and canary not in [t.name for t in plan.targets]:
        raise InvalidOptionError("--canary", canary, f"a target of {managed_name} "
                                 f"({', '.join(t.name for t in plan.targets) or 'it has none'})")
    try:
        if prefect_api.configured():
            from flows.deploy import deploy_certificate

            report = flow_result(deploy_certificate(managed_name, fingerprint, canary, concurrency,
                                                    return_state=True))
        else:
            no_history_note()
            report = deploy_directly(plan, canary, concurrency)
    except DeploymentFailed as failed:
        if not as_json:
            _print_outcomes(failed.report)
        raise
    if as_json:
        print_json(report.as_dict())
        return
    _print_outcomes(report)
    out.print(Text(f"{managed_name} ({report.fingerprint[:16]}) is served on {len(report.outcomes)} target(s)"))


# ------------------------------------------------------------------------------------------ discover

def _discover_directly(sources: list[str], batch_size: int) -> DiscoveryResult:
    from tasks.discovery import SOURCE_RETRY_DELAYS, run_source, with_bands

    who, log = actor(), _stderr_log(logging.WARNING)
    result = discover_all(sources, in_threads(retrying(lambda block: run_source(block, batch_size, who, log),
                                                       SOURCE_RETRY_DELAYS)), log)
    result, _ = with_bands(result)
    if result.failed:
        raise DiscoveryFailed(result)
    if result.policy_errors:
        _print_sources(result.sources)
        raise PolicyNotApplied(result.policy_errors)
    return result


def _print_sources(summaries: Sequence[SourceSummary]) -> None:
    for s in summaries:
        out.print(Text(f"{s.source}: {s.places} place(s), {s.certificates} certificate(s), "
                       f"{s.new_certificates} new, {s.ghosts} ghost(s), {len(s.problems)} problem(s); policy: "
                       f"{s.owners_assigned} owner(s) assigned, {s.violations} violation(s)"))


def discover_command(
    sources: Annotated[list[str], typer.Argument(help="Source block documents, block-type-slug/name.")],
    batch_size: Annotated[int, typer.Option(min=1, help="Observations written per transaction.")] = 500,
    as_json: JsonOption = False,
) -> None:
    """Run discovery with the given source blocks and record what they find. Runs the discover flow when
    PREFECT_API_URL is set."""
    try:
        if prefect_api.configured():
            from flows.discover import discover

            result = flow_result(discover(sources, batch_size, return_state=True))
        else:
            no_history_note()
            result = _discover_directly(sources, batch_size)
    except DiscoveryFailed as failed:
        if not as_json:
            _print_sources(failed.result.sources)
        raise
    if as_json:
        print_json(result.as_dict())
        return
    _print_sources(result.sources)
