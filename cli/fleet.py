"""The fleet commands: deploy a managed certificate to its targets, and discover certificates.

They run their flows (against PREFECT_API_URL, or a temporary local Prefect without it).
"""

from __future__ import annotations

from typing import Annotated, Any, Optional

import typer

from certpilot import targets
from certpilot.database import get_engine, read_session
from cli.console import err, out


def prefect_note() -> None:
    from prefect.settings import PREFECT_API_URL  # the environment, a Prefect profile or a test harness

    if not PREFECT_API_URL.value():
        err.print("[yellow]note:[/] PREFECT_API_URL is not set: starting a temporary local Prefect for this run "
                  "(10 to 20 s); point it at your Prefect server to keep the run history there")


def _run(state: Any, what: str) -> Any:
    if not state.is_completed():
        err.print(f"[red]{what} failed:[/] {state.message}")
        raise typer.Exit(1)
    return state.result()


def deploy_command(
    managed_name: Annotated[str, typer.Argument(help="The managed certificate to deploy.")],
    fingerprint: Annotated[Optional[str], typer.Option(help="Deploy this certificate instead of the current one.")] = None,
    canary: Annotated[Optional[str], typer.Option(help="The target to deploy first (default: the first by name).")] = None,
    concurrency: Annotated[int, typer.Option(help="Targets deployed at once after the canary.")] = 4,
) -> None:
    """Deploy a managed certificate to all its targets and verify it there (deploy-certificate flow); on a
    failure every changed target is rolled back."""
    from flows.deploy import deploy_certificate

    with read_session(get_engine()) as session:
        targets.plan(session, managed_name, fingerprint)  # fail fast, before starting Prefect
    prefect_note()
    result = _run(deploy_certificate(managed_name, fingerprint, canary, concurrency, return_state=True), "deployment")
    for o in result["outcomes"]:
        out.print(f"{o['target']:<24} {o['kind']:<14} {o['action']:<15} {o['detail']}")
    out.print(f"{managed_name} ({result['fingerprint'][:16]}) is served on {len(result['outcomes'])} target(s)")


def discover_command(
    sources: Annotated[list[str], typer.Argument(help="Source block documents, block-type-slug/name.")],
) -> None:
    """Run discovery with the given source blocks (discover flow) and record what they find."""
    from flows.discover import discover

    prefect_note()
    result = _run(discover(sources, return_state=True), "discovery")
    for s in result["sources"]:
        out.print(f"{s['source']}: {s['places']} place(s), {s['certificates']} certificate(s), "
                  f"{s['new_certificates']} new, {s['ghosts']} ghost(s), {len(s['problems'])} problem(s)")
