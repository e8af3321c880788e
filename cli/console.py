"""Where the CLI writes: results to stdout (tables, or JSON with --json), notes and errors to stderr.

Exit codes, everywhere: 0 success, 1 the operation failed, 2 bad usage (an unknown option or choice,
a value out of range). One error style: ``error: <message>`` on stderr; with --json, a JSON object
``{"error": <message>, "exit_code": <code>}`` on stdout as well, so a script reads one stream.

Certificate fields and file names are data: they are printed as text, never as console markup
(``line``, ``cell`` and ``shown`` build rich Text; nothing from the inventory goes into a markup
string), and control characters in them are shown escaped (``\\n``), so one record stays one line.

Help texts name placeholders in upper case (NAME, FILE, DURATION...), never Python types: the root
group sets a metavar on every parameter that has none (``plain_placeholders``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.text import Text
from typer.core import TyperGroup

from certpilot.errors import CertpilotError, InvalidOptionError

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of text.")]

USAGE = 2
FAILED = 1

_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7f, *range(0x80, 0xa0))} | {
    ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"}


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, default=str) + "\n")


def shown(value: object) -> str:
    """A value as plain text on one line: control characters (a newline in a file name) escaped."""
    return str(value).translate(_CONTROL)


def cell(value: object, style: str = "") -> Text:
    """A table cell holding data: never parsed as markup."""
    return Text(shown(value), style=style)


def line(*parts: object | tuple[object, str]) -> Text:
    """One line of output from data and (data, style) pairs: never parsed as markup."""
    text = Text()
    for part in parts:
        if isinstance(part, tuple):
            text.append(shown(part[0]), style=part[1])
        else:
            text.append(shown(part))
    return text


def note(message: str, console: Console = err) -> None:
    """A note on stderr (what happened on the side, or what to do next)."""
    console.print(line(("note: ", "yellow"), message))


def warn(message: str) -> None:
    err.print(line(("warning: ", "yellow"), message))


def short_name(row: dict[str, Any]) -> str:
    """The name people know a certificate by: its first DNS name, else its CN, else its first other SAN
    (a SPIFFE ID: machine identities often have no CN), else its subject."""
    dns = next((s[4:] for s in row["sans"] if s.startswith("DNS:")), None)
    if dns:
        return dns + (f" +{len(row['sans']) - 1}" if len(row["sans"]) > 1 else "")
    cn = next((part[3:] for part in row["subject"].split(",") if part.startswith("CN=")), None)
    other = next((s.partition(":")[2] for s in row["sans"]), None)
    return cn or other or row["subject"]


def report_error(message: str, code: int, as_json: bool, usage: str | None = None, **extra: Any) -> None:
    """Say what failed, in the one error style (see the module docstring). ``extra`` members (the
    broken event's ``seq``...) go into the JSON object beside "error" and "exit_code"."""
    if as_json:
        print_json({"error": message, "exit_code": code, **extra})
    if usage:
        err.print(Text(usage))
    err.print(Text.assemble(("error: ", "red"), shown(message)))


def usage_error(message: str, option: str | None = None) -> typer.BadParameter:
    """A usage error (exit 2) naming the option it is about, to raise."""
    return typer.BadParameter(message, param_hint=option)


def _placeholder(param: Any) -> str:
    """The upper-case placeholder of a parameter that has no metavar: its choices, else its name."""
    descriptor = getattr(param, "type_descriptor", None)
    choices = descriptor.choices if descriptor is not None and descriptor.is_choice else None
    if choices:
        return "|".join(str(getattr(c, "value", c)) for c in choices)
    if descriptor is not None and descriptor.is_path and param.param_type_name == "option":
        return "FILE"
    return (param.name or "value").upper().replace("_", "-")


def plain_placeholders(command: Any) -> None:
    """Give every parameter of ``command`` and its subcommands an upper-case metavar (flags none), so
    help texts show NAME or FILE, never ``<str>`` or ``<list[str]>``."""
    for param in command.params:
        _plain(param)
    original = command.get_help_option

    def help_option(ctx: Any) -> Any:
        option = original(ctx)
        if option is not None:
            _plain(option)
        return option

    command.get_help_option = help_option
    for sub in getattr(command, "commands", {}).values():
        plain_placeholders(sub)


def _plain(param: Any) -> None:
    if param.param_type_name == "argument":
        if param.metavar is None:
            param.metavar = _placeholder(param)
        param.display_type_rich = lambda ctx: None  # the name column already says NAME
    elif getattr(param, "is_flag", False) or getattr(param, "count", False):
        if param.metavar is None:
            param.metavar = ""
    elif param.metavar is None:
        param.metavar = _placeholder(param)


class CertpilotGroup(TyperGroup):
    """The root command group: maps every failure to its exit code and the one error style."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        plain_placeholders(self)

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, windows_expand_args: bool = True, **extra: Any) -> Any:
        argv = [str(a) for a in (sys.argv[1:] if args is None else args)]
        as_json = "--json" in argv
        try:
            code = super().main(args=argv, prog_name=prog_name, complete_var=complete_var,
                                standalone_mode=False, windows_expand_args=windows_expand_args, **extra)
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
