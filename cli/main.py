"""The ``certpilot`` command: the command groups mounted on one app, and the process entry point.

Exit codes: 0 success, 1 the operation failed (a file that did not import, a broken audit chain, no
such certificate), 2 bad usage (an unknown option or choice, a value out of range).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from certpilot.database import get_engine
from certpilot.settings import load_settings
from cli import alerts as alerts_cli
from cli import policy as policy_cli
from cli import audit, ca, fleet, inventory, keys, managed, replace, report, revoke, serve, status, targets
from cli.console import CertpilotGroup, JsonOption, err, line, out, print_json

app = typer.Typer(cls=CertpilotGroup, help="certpilot: certificate lifecycle management.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
app.add_typer(inventory.app, name="inventory")
app.add_typer(keys.app, name="keys")
app.add_typer(audit.app, name="audit")
app.add_typer(report.app, name="report")
app.add_typer(ca.app, name="ca")
app.add_typer(managed.app, name="managed")
app.command("renew")(managed.renew_command)
app.command("revoke")(revoke.revoke_command)
app.command("revoke-and-replace")(replace.revoke_and_replace_command)
app.add_typer(targets.app, name="target")
app.command("deploy")(fleet.deploy_command)
app.command("discover")(fleet.discover_command)
app.command("status")(status.status_command)
app.command("serve")(serve.serve_command)
app.command("exporter")(serve.exporter_command)
app.add_typer(alerts_cli.app, name="alerts")
app.add_typer(alerts_cli.suppress_app, name="suppress")
app.add_typer(policy_cli.app, name="policy")


def version() -> str:
    """certpilot's version: the installed distribution's, else the package's own."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    import certpilot

    try:
        return installed("certpilot")
    except PackageNotFoundError:
        return certpilot.__version__


def _print_version(value: bool) -> None:
    if value:
        out.print(line(f"certpilot {version()}"))
        raise typer.Exit()


@app.callback()
def root(show_version: Annotated[Optional[bool], typer.Option(
        "--version", callback=_print_version, is_eager=True, help="Print certpilot's version and exit.")] = None) -> None:
    """certpilot: certificate lifecycle management."""


@app.command("sample-estate")
def sample_estate_command(directory: Annotated[Path, typer.Argument(metavar="DIRECTORY", help="Where to write it (created).")],
                          as_json: JsonOption = False) -> None:
    """Write a freshly generated sample estate: a CA, hosts with shared certificates, one broken file."""
    from certpilot.sample_estate import write_estate

    estate = write_estate(directory)
    if as_json:
        print_json({"root": str(estate.root), "files": estate.files, "leaves": estate.leaves,
                    "broken": [str(b) for b in estate.broken]})
        return
    out.print(line(f"wrote {estate.files} files under {estate.root}: {estate.leaves} leaf certificates on 3 hosts, "
                   f"a CA chain, and {len(estate.broken)} broken file ({estate.broken[0]})"))


@app.command("db-upgrade")
def db_upgrade_command(as_json: JsonOption = False) -> None:
    """Create or migrate the inventory database to the latest schema."""
    from certpilot.database import current_revision

    settings = load_settings()
    engine = get_engine(settings)
    url, revision = engine.url.render_as_string(hide_password=True), current_revision(engine)
    if as_json:
        print_json({"database": url, "revision": revision})
        return
    out.print(line(f"inventory at {url} is at revision {revision}"))


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print(line("interrupted"))
        sys.exit(130)

if __name__ == "__main__":
    main()
