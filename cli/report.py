"""The report commands."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from certpilot import inventory
from certpilot.clock import utcnow
from certpilot.database import get_engine, read_session
from certpilot.timespan import parse_timespan
from cli.console import JsonOption, cell, line, out, print_json, short_name, usage_error
from cli.inventory import violations_cell

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
    for column in ("band", "days", "expires (UTC)", "name", "owner", "places", "violations"):
        table.add_column(column, no_wrap=column not in ("name", "violations"))
    for r in report.soonest:
        color = {"expired": "red", "7 days": "red", "30 days": "yellow"}.get(r["band"], "")
        table.add_row(cell(r["band"], color), cell(f"{r['days_left']:.0f}"), cell(r["not_after"][:10]),
                      cell(short_name(r)), cell(r["owner"] or ""), cell(len(r["locations"])),
                      violations_cell(r["violations"]))
    out.print(table)


@app.command("sli")
def report_sli_command(window: Annotated[str, typer.Option(metavar="DURATION", help=(
                           "How far back to measure, e.g. 30d, 12h, 2w."))] = "30d",
                       as_json: JsonOption = False) -> None:
    """The service level indicators M1 to M10 over a window: served certificates valid, renewal success,
    time to repair, issuance latency, key store availability, revocation propagation, automated rotations,
    chain errors, incidents, audit completeness. An indicator with nothing to measure says why."""
    from certpilot import sli

    try:
        span = parse_timespan(window)
    except ValueError as exc:
        raise usage_error(str(exc), "--window") from None
    if span.total_seconds() <= 0:
        raise usage_error(f"{window!r} is not a positive duration", "--window")
    with read_session(get_engine()) as session:
        report = sli.compute(session, span, utcnow())
    if as_json:
        print_json(report.as_dict())
        return
    out.print(line(("Service level indicators", "bold"), f" from {inventory.iso(report.start)} to {inventory.iso(report.end)}"))
    table = Table(show_edge=False, pad_edge=False)
    for column in ("SLI", "what", "value", "of", "details"):
        table.add_column(column, no_wrap=column in ("SLI", "value", "of"))
    for s in report.slis:
        color = "yellow" if s.value is None else ""
        table.add_row(cell(s.key), cell(s.name), cell(s.shown, color), cell(s.ratio), cell(s.shown_details))
    out.print(table)


from cli import report_compliance, report_risk  # noqa: E402 - the commands of their own modules, registered last

report_risk.register(app)
report_compliance.register(app)
from cli import report_forecast  # noqa: E402 - the forecast command, in its own module

report_forecast.register(app)
