"""The target commands: where a managed certificate is served (its deployment targets)."""

from __future__ import annotations

import json
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from certpilot import targets
from certpilot.database import get_engine, read_session, write_session
from cli.console import out
from cli.options import actor

app = typer.Typer(help="Where a managed certificate is served: its deployment targets.", no_args_is_help=True)


def _settings(values: list[str] | None, as_json: str | None) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    if as_json:
        try:
            settings = json.loads(as_json)
        except json.JSONDecodeError as exc:
            raise typer.BadParameter(f"not JSON: {exc}", param_hint="--settings-json") from None
        if not isinstance(settings, dict):
            raise typer.BadParameter("must be a JSON object", param_hint="--settings-json")
    for value in values or []:
        key, sep, val = value.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{value!r} is not key=value", param_hint="--set")
        try:
            settings[key] = json.loads(val)  # numbers, booleans, lists as JSON; anything else as text
        except json.JSONDecodeError:
            settings[key] = val
    return settings


@app.command("add")
def target_add_command(
    managed_name: Annotated[str, typer.Argument(help="The managed certificate.")],
    name: Annotated[str, typer.Argument(help="The target's name, e.g. web1-nginx.")],
    kind: Annotated[str, typer.Option(help=f"One of: {', '.join(targets.KINDS)}.")],
    block: Annotated[str, typer.Option(help="The Prefect block document that connects to it: block-type-slug/name.")],
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="A target setting, key=value (repeatable).")] = None,
    settings_json: Annotated[Optional[str], typer.Option(help="Target settings as a JSON object.")] = None,
) -> None:
    """Add a deployment target to a managed certificate."""
    settings = _settings(set_, settings_json)
    with write_session(get_engine()) as session:
        targets.add(session, managed_name, name, kind, block, settings, actor())
    out.print(f"added target {name} ({kind} via {block}) to {managed_name}")


@app.command("list")
def target_list_command(
    managed_name: Annotated[str, typer.Argument(help="The managed certificate.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of a table.")] = False,
) -> None:
    """A managed certificate's targets: what each should serve, what was last verified there, and when."""
    with read_session(get_engine()) as session:
        rows = [{"name": t.name, "kind": t.kind, "block": t.block, "settings": t.settings,
                 "desired": t.desired_fingerprint, "verified": t.verified_fingerprint,
                 "verified_at": t.verified_at.isoformat() if t.verified_at else None, "last_error": t.last_error}
                for t in targets.list_targets(session, managed_name)]
    if as_json:
        out.print_json(json.dumps(rows, default=str))
        return
    table = Table(show_edge=False, pad_edge=False)
    for column in ("target", "kind", "block", "should serve", "verified", "verified at (UTC)", "last error"):
        table.add_column(column, no_wrap=column != "last error")
    for r in rows:
        state = "[green]" if r["desired"] and r["desired"] == r["verified"] else "[yellow]"
        table.add_row(r["name"], r["kind"], r["block"] or "", (r["desired"] or "-")[:16],
                      f"{state}{(r['verified'] or '-')[:16]}[/]", (r["verified_at"] or "-")[:19].replace("T", " "),
                      f"[red]{r['last_error']}[/]" if r["last_error"] else "")
    out.print(table)
    mixed = sum(1 for r in rows if r["desired"] != r["verified"])
    out.print(f"{len(rows)} target(s)" + (f", [yellow]{mixed} not verified serving what they should[/]" if mixed else ""))
