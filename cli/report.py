"""The report commands."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from certpilot import inventory
from certpilot.database import get_engine, read_session
from cli.console import JsonOption, cell, line, out, print_json, short_name

app = typer.Typer(help="Reports.", no_args_is_help=True)


@app.command("expiry")
def report_expiry_command(show: Annotated[int, typer.Option(metavar="N", min=0, help=(
                              "How many of the soonest to list (0: only the counts)."))] = 20,
                          include_ca: Annotated[bool, typer.Option("--include-ca", help="Count CA certificates too.")] = False,
                          as_json: JsonOption = False) -> None:
    """How many certificates expire in each band, and the soonest of them."""
    from certpilot.report import expiry_report

    with read_session(get_engine()) as session:
        report = expiry_report(session, show=show, include_ca=include_ca)
    if as_json:
        print_json(report.as_dict())
        return
    out.print(line(("Expiry report", "bold"), f" at {inventory.iso(report.generated_at)}"))
    counts = line("  ")
    for i, (label, count) in enumerate(report.bands.items()):
        counts.append_text(line("   " if i else "", f"{label}: ", (count, "bold")))
    out.print(counts)
    if not report.soonest:
        return
    table = Table(show_edge=False, pad_edge=False)
    for column in ("band", "days", "expires (UTC)", "name", "owner", "places"):
        table.add_column(column, no_wrap=column != "name")
    for r in report.soonest:
        color = {"expired": "red", "7 days": "red", "30 days": "yellow"}.get(r["band"], "")
        table.add_row(cell(r["band"], color), cell(f"{r['days_left']:.0f}"), cell(r["not_after"][:10]),
                      cell(short_name(r)), cell(r["owner"] or ""), cell(len(r["locations"])))
    out.print(table)
