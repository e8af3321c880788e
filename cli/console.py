"""Where the CLI writes: results to stdout (tables, or JSON with --json), notes and errors to stderr.

Certificate fields and file names are data: they are printed as text, never as console markup.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer
from rich.console import Console

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False)
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of a table.")]


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, default=str) + "\n")


def short_name(row: dict[str, Any]) -> str:
    """The name people know a certificate by: its first DNS name, else its CN, else its subject."""
    dns = next((s[4:] for s in row["sans"] if s.startswith("DNS:")), None)
    if dns:
        return dns + (f" +{len(row['sans']) - 1}" if len(row["sans"]) > 1 else "")
    cn = next((part[3:] for part in row["subject"].split(",") if part.startswith("CN=")), None)
    return cn or row["subject"]
