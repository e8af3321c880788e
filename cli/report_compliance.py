"""``certpilot report compliance``: per owner, certificates, policy violations by rule, waivers, and how
renewals went (M7 automated share, M2 success rate); as a table, JSON or CSV (certpilot.compliance).

``register(app)`` adds the command to the report group (cli/report.py)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from certpilot import inventory
from certpilot.clock import utcnow
from certpilot.database import get_engine, read_session
from certpilot.timespan import parse_timespan
from cli.console import JsonOption, cell, line, note, out, print_json, usage_error
from cli.files import write_new_file

__all__ = ["register", "report_compliance_command"]


def register(app: typer.Typer) -> None:
    app.command("compliance")(report_compliance_command)


def report_compliance_command(
        path: Annotated[Optional[Path], typer.Argument(metavar="[PATH]", help=(
            "With --csv: the file to write (a new file unless --force); without one, or '-', stdout."),
            show_default=False)] = None,
        as_csv: Annotated[bool, typer.Option("--csv", help=(
            "CSV for spreadsheets: one row per owner, a column per rule (open and waived), M7 and M2."))] = False,
        window: Annotated[str, typer.Option(metavar="DURATION", help=(
            "How far back to measure renewals (M7, M2), e.g. 30d, 12h, 2w."))] = "30d",
        force: Annotated[bool, typer.Option("--force", help="With --csv PATH: replace PATH if it exists.")] = False,
        as_json: JsonOption = False) -> None:
    """Per owner: certificates in service, compliant ones, policy violations by rule (open and waived),
    waivers and their expiry, the share of renewals made automatically (M7) and the renewal success rate
    (M2) over the window. Violations are those the last policy evaluation stored (certpilot policy check)."""
    from certpilot.compliance import compliance_report

    if as_csv and as_json:
        raise usage_error("choose one of --json and --csv", "--csv")
    if path is not None and not as_csv:
        raise usage_error(f"{path} is where --csv writes: add --csv", "PATH")
    try:
        span = parse_timespan(window)
    except ValueError as exc:
        raise usage_error(str(exc), "--window") from None
    if span.total_seconds() <= 0:
        raise usage_error(f"{window!r} is not a positive duration", "--window")
    with read_session(get_engine()) as session:
        report = compliance_report(session, utcnow(), span)
    if as_json:
        print_json(report.as_dict())
        return
    if as_csv:
        text = report.to_csv()
        if path is None or str(path) == "-":
            sys.stdout.write(text)
        else:
            write_new_file(path, text.encode("utf-8"), secret=False, force=force)
            note(f"wrote {len(report.owners)} owners to {path}")
        return
    out.print(line(("Compliance per owner", "bold"), f" at {inventory.iso(report.generated_at)}; renewals since "
                   f"{inventory.iso(report.start)}"))
    table = Table(show_edge=False, pad_edge=False)
    for column in ("owner", "certs", "managed", "compliant", "open violations", "waived", "waivers",
                   "automated (M7)", "renewals ok (M2)"):
        table.add_column(column, no_wrap=column in ("certs", "managed", "compliant"))
    for o in report.owners:
        table.add_row(
            cell(o.owner), cell(o.certificates), cell(o.managed),
            cell(f"{o.compliant_percent:.0f} %" if o.compliant_percent is not None else "-",
                 "yellow" if o.open_violations else ""),
            cell(", ".join(f"{r.rule}: {r.open}" for r in o.rules if r.open) or "-", "red" if o.open_violations else ""),
            cell(", ".join(f"{r.rule}: {r.waived}" for r in o.rules if r.waived) or "-"),
            cell(", ".join(f"#{w.id} {w.rule} {'expired' if w.expired else 'until'} {w.expires_at:%Y-%m-%d}"
                           for w in o.waivers) or "-"),
            cell(_shown(o.automated.shown, o.automated.ratio)), cell(_shown(o.renewals.shown, o.renewals.ratio)))
    out.print(table)


def _shown(value: str, ratio: str) -> str:
    return f"{value} ({ratio})" if ratio else value
