"""The target commands: where a managed certificate is served (its deployment targets).

``target add`` checks everything before it writes: the kind (one of certpilot.target_kinds.TargetKind),
the settings (every key the kind's, the required ones there, values of the right type), and the block,
loaded through Prefect: a connection block of the kind (an SSH host for ssh-nginx...) or a
deployment-target block of the same kind, whose settings the target's own override key by key. Any of
them wrong is bad usage (exit 2), and the message names what is valid.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Optional

import typer
from rich.table import Table
from rich.text import Text

from blocks.loading import load_block
from certpilot import targets
from certpilot.database import get_engine, read_session, write_session
from certpilot.errors import BlockNotFoundError, PermanentError
from certpilot.models import Target
from certpilot.target_kinds import TargetKind, merged_settings, unknown_keys, valid_keys, validate_settings
from cli.console import JsonOption, out, print_json
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


def _load_block(reference: str) -> Any:
    """The block ``reference`` names, loaded through Prefect; a usage error when there is none."""
    import blocks.targets  # noqa: F401  (registers the block types a target may name, so load_block knows them)

    slug, sep, name = reference.partition("/")
    if not sep or not slug or not name:
        raise typer.BadParameter(f"{reference!r} must be <block-type-slug>/<block-name>", param_hint="--block")
    try:
        return load_block(reference)
    except BlockNotFoundError as exc:  # Prefect: "Unable to find block document named ..."
        raise typer.BadParameter(f"no block {reference!r} ({exc.detail})", param_hint="--block") from None
    except KeyError as exc:  # a block type the server knows but no imported class defines
        raise typer.BadParameter(f"no block {reference!r} ({exc})", param_hint="--block") from None


def check(kind: TargetKind, reference: str, settings: dict[str, Any], name: str) -> None:
    """Raise a usage error unless ``settings`` and the block ``reference`` make a target of ``kind``."""
    unknown = unknown_keys(kind, settings)
    if unknown:
        raise typer.BadParameter(f"unknown {kind} setting(s) {', '.join(unknown)}; valid keys: "
                                 f"{', '.join(valid_keys(kind))}", param_hint="--set")
    from blocks.targets import CONNECTIONS, KINDS, DeploymentTargetBlock

    block = _load_block(reference)
    spec = KINDS[kind]
    try:
        if isinstance(block, DeploymentTargetBlock):
            if block.kind != kind:
                raise typer.BadParameter(f"{reference} is a deployment target of kind {block.kind}, not {kind}",
                                         param_hint="--block")
            merged_settings(kind, block.settings, settings, name)
        elif isinstance(block, spec.connection):
            validate_settings(kind, settings, name)
        else:
            raise typer.BadParameter(f"{reference} is a {type(block).__name__}; kind {kind} goes through "
                                     f"{CONNECTIONS[spec.connection]} ({spec.connection.__name__}) or a "
                                     f"deployment-target block of kind {kind}", param_hint="--block")
    except PermanentError as exc:  # TargetSettingsError: names what is wrong and the valid keys
        raise typer.BadParameter(str(exc), param_hint="--set") from None


def _row(target: Target) -> dict[str, Any]:
    return {"name": target.name, "kind": target.kind, "block": target.block, "settings": target.settings,
            "desired": target.desired_fingerprint, "verified": target.verified_fingerprint,
            "verified_at": target.verified_at.isoformat() if target.verified_at else None,
            "last_error": target.last_error}


@app.command("add")
def target_add_command(
    managed_name: Annotated[str, typer.Argument(help="The managed certificate.")],
    name: Annotated[str, typer.Argument(help="The target's name, e.g. web1-nginx.")],
    kind: Annotated[TargetKind, typer.Option(help="What the target is.")],
    block: Annotated[str, typer.Option(help="The Prefect block it goes through, <block-type-slug>/<block-name>: a "
                                            "connection block of the kind (ssh-host, aws-account, azure-key-vault) "
                                            "or a deployment-target block of the same kind.")],
    set_: Annotated[Optional[list[str]], typer.Option("--set", metavar="KEY=VALUE",
                                                      help="A target setting (repeatable).")] = None,
    settings_json: Annotated[Optional[str], typer.Option(metavar="JSON", help="Target settings as a JSON object.")]
    = None,
    as_json: JsonOption = False,
) -> None:
    """Add a deployment target to a managed certificate (its settings and block are checked first)."""
    settings = _settings(set_, settings_json)
    check(kind, block, settings, name)
    with write_session(get_engine()) as session:
        row = _row(targets.add(session, managed_name, name, kind, block, settings, actor()))
    if as_json:
        print_json({"managed": managed_name, **row})
        return
    out.print(Text(f"added target {name} ({kind} via {block}) to {managed_name}"))


@app.command("list")
def target_list_command(
    managed_name: Annotated[str, typer.Argument(help="The managed certificate.")],
    as_json: JsonOption = False,
) -> None:
    """A managed certificate's targets: what each should serve, what was last verified there, and when."""
    with read_session(get_engine()) as session:
        rows = [_row(t) for t in targets.list_targets(session, managed_name)]
    if as_json:
        print_json(rows)
        return
    table = Table(show_edge=False, pad_edge=False)
    for column in ("target", "kind", "block", "should serve", "verified", "verified at (UTC)", "last error"):
        table.add_column(column, no_wrap=column != "last error")
    for r in rows:
        state = "green" if r["desired"] and r["desired"] == r["verified"] else "yellow"
        table.add_row(Text(r["name"]), Text(r["kind"]), Text(r["block"] or ""), Text((r["desired"] or "-")[:16]),
                      Text((r["verified"] or "-")[:16], style=state),
                      Text((r["verified_at"] or "-")[:19].replace("T", " ")),
                      Text(r["last_error"] or "", style="red"))
    out.print(table)
    mixed = sum(1 for r in rows if r["desired"] != r["verified"])
    summary = Text(f"{len(rows)} target(s)")
    if mixed:
        summary.append(f", {mixed} not verified serving what they should", style="yellow")
    out.print(summary)


@app.command("remove")
def target_remove_command(
    managed_name: Annotated[str, typer.Argument(help="The managed certificate.")],
    name: Annotated[str, typer.Argument(help="The target to remove.")],
    keep_files: Annotated[bool, typer.Option("--keep-files", help=(
        "Only delete the target's record: leave its files, stores and server as they are."))] = False,
    as_json: JsonOption = False,
) -> None:
    """Remove one target: take the certificate off it (its files moved aside then deleted, its store entry
    deleted) and delete its record, audited. The server is reloaded only by the target's remove_command:
    see the output for what it still serves."""
    from certpilot import retiring
    from tasks.deployment import close, deployer_for

    engine = get_engine()
    with read_session(engine) as session:
        targets.get_target(session, managed_name, name)  # NotFoundError before any block is loaded
    deployer = None if keep_files else deployer_for(managed_name, name)[1]
    try:
        outcome = retiring.remove_target(engine, managed_name, name, deployer, actor())
    finally:
        if deployer is not None:
            close(deployer)
    if as_json:
        print_json({"managed": managed_name, **outcome.as_dict(), "deleted": True})
        return
    out.print(Text(f"removed target {name} ({outcome.kind}) of {managed_name}: {outcome.detail}"))
