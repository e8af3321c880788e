"""`certpilot revoke-and-replace`: the emergency revoke-and-replace of every certificate in a scope.

With a Prefect API configured (cli.prefect_api) it runs the revoke-and-replace flow there, so the run,
its task run per certificate and its artifacts are in the operator's history. Without one it runs the
same core path in this process (certpilot.replacing over tasks.replacement's plain functions, a thread
per certificate, each issuer's orders bounded by its default slots); no flow run is created, the blocks
are still read through Prefect. A dry run (the default) prints the blast radius and changes nothing; a
real run prints the report and exits 1 when a replacement failed or an old certificate is still served
somewhere.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any

import typer

from certpilot.blast_radius import BlastRadius
from certpilot.errors import TransientError, redact
from certpilot.replacing import CampaignReport, Item, RevokeAndReplaceFailed
from certpilot.scope import Scope
from cli import prefect_api
from cli.console import JsonOption, line, out, print_json
from cli.fleet import _stderr_log
from cli.options import RevocationReason, actor

MAX_CONCURRENCY = 32
RETRY_DELAYS = (2.0, 10.0)  # before retrying one certificate that failed for a transient reason


def _flow_parameters(scope: Scope) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in scope.as_dict().items() if v}


def directly(scope: Scope, reason: str, revoke_first: bool, dry_run: bool,
             concurrency: int) -> BlastRadius | CampaignReport:
    """The flow's path without Prefect run history (see the module docstring)."""
    from certpilot import replacing
    from certpilot.clock import utcnow
    from certpilot.database import get_engine, read_session
    from certpilot.exposure import places_of, report, targets_of
    from tasks.exposure import observe
    from tasks.renewal import DEFAULT_ISSUER_SLOTS, IssuerUnavailable, key_ring
    from tasks.replacement import (Deployers, PropagationWatch, available_issuers, issuer_names, issuer_source,
                                   issuers_of, load_issuers, radius_of, replacer)

    log = _stderr_log(logging.WARNING)
    if dry_run:
        return radius_of(scope, revoke_first, log)
    prefect_api.no_history_note()
    who, engine, started = actor(), get_engine(), time.monotonic()
    blocks, _ = available_issuers(issuer_names())
    campaign = replacing.open_campaign(engine, scope, reason, revoke_first, who, available_issuers=sorted(blocks))
    needed = issuers_of([i for i in campaign.items if not i.finished])
    connectors = load_issuers(sorted(needed), who)
    width = max(1, min(concurrency, MAX_CONCURRENCY))
    slots = {name: threading.BoundedSemaphore(DEFAULT_ISSUER_SLOTS) for name, c in connectors.items()
             if not isinstance(c, IssuerUnavailable)}
    deployers, watch = Deployers(key_ring()), PropagationWatch(who, log)
    try:
        context = replacer(issuer_source(connectors, slots), deployers, 4, who, log, watch)

        def one(item: Item) -> Item:
            for delay in [*RETRY_DELAYS, None]:
                try:
                    return replacing.advance(context, item.id)
                except TransientError:
                    if delay is None:
                        raise
                    time.sleep(delay)
            raise AssertionError("unreachable")

        def run_items(items: Sequence[Item], size: int) -> list[Item | BaseException]:
            with ThreadPoolExecutor(max_workers=max(1, size), thread_name_prefix="replace") as pool:
                futures = [pool.submit(one, item) for item in items]
            return [f.exception() or f.result() for f in futures]

        campaign = replacing.run_campaign(engine, campaign, run_items, width, who, log)
    finally:
        deployers.close()
        watch.close()
    old = [i.old_fingerprint for i in campaign.items if i.action in ("replace", "revoke")]
    exposure, probe_error = None, None
    if old:
        try:
            with read_session(engine) as session:
                places = places_of(session, old)
                rows = targets_of(session, places)
            exposure = report(places, observe(places, rows), old, utcnow())
        except Exception as exc:  # noqa: BLE001 - the report says the probe did not complete, and why
            probe_error = redact(exc)
    result = CampaignReport.of(engine, campaign, exposure, time.monotonic() - started, probe_error)
    if not result.ok:
        raise RevokeAndReplaceFailed(result)
    return result


def revoke_and_replace_command(
    scope: Annotated[list[str], typer.Option("--scope", metavar="KEY=VALUE", help=(
        "A criterion, repeatable (all must match; name, fingerprint and serial take several values): name=, "
        "fingerprint=, serial=, issuer= (a CA compromise), public-key= (a key compromise), dns=, suffix=, owner=, "
        "tag=."))],
    reason: Annotated[RevocationReason, typer.Option(help="The RFC 5280 reason recorded for the old certificates.")]
    = RevocationReason.KEY_COMPROMISE,
    revoke_first: Annotated[bool, typer.Option("--revoke-first", help=(
        "Revoke each old certificate before its replacement exists (a key in an attacker's hands): its targets "
        "serve a revoked certificate until the replacement is deployed."))] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run/--no-dry-run", help=(
        "Only print the blast radius (the default); --no-dry-run replaces and revokes."))] = True,
    concurrency: Annotated[int, typer.Option(min=1, max=MAX_CONCURRENCY, help=(
        "Certificates replaced at once after the first (the canary certificate, alone)."))] = 8,
    as_json: JsonOption = False,
) -> None:
    """Revoke and replace every certificate in scope: new key, issue, deploy canary first, verify on the wire,
    then revoke the old one; a dry run (the default) only prints the blast radius. Runs the
    revoke-and-replace flow when PREFECT_API_URL is set."""
    parsed = Scope.parse(scope)
    try:
        if prefect_api.configured():
            from flows.revoke_and_replace import revoke_and_replace

            state = revoke_and_replace(**_flow_parameters(parsed), reason=reason.value, revoke_first=revoke_first,
                                       dry_run=dry_run, concurrency=concurrency, return_state=True)
            result = prefect_api.flow_result(state)
        else:
            result = directly(parsed, reason.value, revoke_first, dry_run, concurrency)
    except RevokeAndReplaceFailed as failed:
        _print(failed.report, as_json)
        raise
    _print(result, as_json)


def _print(result: BlastRadius | CampaignReport, as_json: bool) -> None:
    if as_json:
        print_json(result.as_dict())
        return
    lines = result.lines()
    if isinstance(result, BlastRadius):
        lines = ["DRY RUN: nothing was changed (--no-dry-run replaces and revokes)"] + lines
        if not result.items:
            lines.append(f"nothing matched the scope {result.scope.describe()}")
    for text in lines:
        out.print(line(text))
