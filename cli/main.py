"""The ``certpilot`` command: the command groups mounted on one app, and the process entry point.

Exit codes: 0 success, 1 the operation failed (a file that did not import, a broken audit chain, no
such certificate), 2 bad usage.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from certpilot.database import get_engine
from certpilot.settings import load_settings
from cli import audit, ca, fleet, inventory, keys, managed, report, targets
from cli.console import CertpilotGroup, err, out

app = typer.Typer(cls=CertpilotGroup, help="certpilot: certificate lifecycle management.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
app.add_typer(inventory.app, name="inventory")
app.add_typer(keys.app, name="keys")
app.add_typer(audit.app, name="audit")
app.add_typer(report.app, name="report")
app.add_typer(ca.app, name="ca")
app.add_typer(managed.app, name="managed")
app.command("renew")(managed.renew_command)
app.add_typer(targets.app, name="target")
app.command("deploy")(fleet.deploy_command)
app.command("discover")(fleet.discover_command)


@app.command("sample-estate")
def sample_estate_command(directory: Annotated[Path, typer.Argument(help="Where to write it (created).")]) -> None:
    """Write a freshly generated sample estate: a CA, hosts with shared certificates, one broken file."""
    from certpilot.sample_estate import write_estate

    estate = write_estate(directory)
    out.print(f"wrote {estate.files} files under {estate.root}: {estate.leaves} leaf certificates on 3 hosts, "
              f"a CA chain, and {len(estate.broken)} broken file ({estate.broken[0]})")


@app.command("db-upgrade")
def db_upgrade_command() -> None:
    """Create or migrate the inventory database to the latest schema."""
    from certpilot.database import current_revision

    settings = load_settings()
    engine = get_engine(settings)
    out.print(f"inventory at {engine.url.render_as_string(hide_password=True)} is at revision {current_revision(engine)}")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)

if __name__ == "__main__":
    main()
