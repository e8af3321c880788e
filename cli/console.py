"""Where the CLI writes: results to stdout (tables, or JSON with --json), notes and errors to stderr.

Exit codes, everywhere: 0 success, 1 the operation failed, 2 bad usage (an unknown option or choice,
a value out of range). One error style: ``error: <message>`` on stderr; with --json, a JSON object
``{"error": <message>, "exit_code": <code>}`` on stdout as well, so a script reads one stream.

Certificate fields and file names are data: they are printed as text, never as console markup.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.text import Text
from typer.core import TyperGroup

from certpilot.errors import CertpilotError, InvalidOptionError

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)
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


USAGE = 2
FAILED = 1


def report_error(message: str, code: int, as_json: bool, usage: str | None = None) -> None:
    """Say what failed, in the one error style (see the module docstring)."""
    if as_json:
        print_json({"error": message, "exit_code": code})
    if usage:
        err.print(Text(usage))
    err.print(Text.assemble(("error: ", "red"), message))


class CertpilotGroup(TyperGroup):
    """The root command group: maps every failure to its exit code and the one error style."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        argv = [str(a) for a in (sys.argv[1:] if args is None else args)]
        as_json = "--json" in argv
        try:
            code = super().main(args=argv, prog_name=prog_name, complete_var=complete_var,
                                standalone_mode=False, **extra)
        except typer.Abort:
            report_error("aborted", FAILED, as_json)
            code = FAILED
        except typer.TyperException as exc:  # click's errors, which typer bundles: usage errors exit 2
            code = getattr(exc, "exit_code", FAILED)
            context = getattr(exc, "ctx", None)
            usage = context.get_usage() if context is not None and code == USAGE else None
            report_error(exc.format_message() if hasattr(exc, "format_message") else str(exc), code, as_json, usage)
        except InvalidOptionError as exc:
            report_error(str(exc), USAGE, as_json)
            code = USAGE
        except CertpilotError as exc:
            report_error(str(exc), FAILED, as_json)
            code = FAILED
        if not standalone_mode:
            return code
        sys.exit(code if isinstance(code, int) else 0)
