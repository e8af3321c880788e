"""The audit commands: verify and list the hash-chained audit trail."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from certpilot import audit, inventory
from certpilot.database import get_engine, read_session
from certpilot.errors import AuditChainError
from cli.console import FAILED, JsonOption, line, out, print_json, report_error, usage_error

app = typer.Typer(help="The hash-chained audit trail.", no_args_is_help=True)


def _head(value: str | None) -> str | None:
    """--expect-head: an event hash (64 hex digits), else a usage error before the chain is read."""
    if value is None:
        return None
    head = value.strip().lower()
    if not audit.HASH.match(head):
        raise usage_error(f"{value!r} is not an event hash: give the 64 hex digits `audit verify` printed",
                          "--expect-head")
    return head


@app.command("verify")
def audit_verify_command(
    expect_head: Annotated[Optional[str], typer.Option(metavar="HASH", help=(
        "The head hash recorded earlier (64 hex digits): detects removal of the newest events."))] = None,
    as_json: JsonOption = False,
) -> None:
    """Check the whole hash chain; name the first broken or missing link."""
    head = _head(expect_head)
    try:
        with read_session(get_engine()) as session:
            status = audit.verify(session, expected_head=head)
    except AuditChainError as exc:
        report_error(str(exc), FAILED, as_json, ok=False, seq=exc.seq)
        raise typer.Exit(FAILED) from None
    if as_json:
        print_json({"ok": True, "events": status.events, "head": status.head_hash})
    else:
        out.print(line(f"audit chain intact: {status.events} event(s), head {status.head_hash}"))


@app.command("list")
def audit_list_command(
    object: Annotated[Optional[str], typer.Option("--object", metavar="OBJECT",
                                                  help="Object or its prefix, e.g. certificate:ab12.")] = None,
    action: Annotated[Optional[str], typer.Option(metavar="ACTION", help="Only this action, e.g. certificate.added.")] = None,
    limit: Annotated[int, typer.Option(metavar="N", min=1, help="The newest N events.")] = 50,
    as_json: JsonOption = False,
) -> None:
    """The newest audit events, oldest first."""
    with read_session(get_engine()) as session:
        events = audit.list_events(session, object_prefix=object, action=action, limit=limit)
    rows = [{"seq": e.seq, "at": inventory.iso(e.at), "actor": e.actor, "action": e.action, "object": e.object,
             "flow_run_id": e.flow_run_id, "details": json.loads(e.details), "hash": e.hash} for e in events]
    if as_json:
        print_json(rows)
        return
    for r in rows:
        out.print(line(f"#{r['seq']:<6} {r['at']}  {r['actor']:<20} {r['action']:<30} {r['object'][:40]}"))
