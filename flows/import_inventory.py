"""The import-inventory flow: bring certificates from files and directories into the inventory,
then publish the expiry report. Fails loudly, after importing everything it could, when any file
could not be imported."""

from __future__ import annotations

from dataclasses import dataclass

from prefect import flow

from certpilot.errors import PermanentError
from certpilot.importer import ImportSummary
from tasks.inventory import import_files, publish_expiry_report


@dataclass(frozen=True)
class InventoryImport:
    """What an import-inventory run did, and the inventory's expiry bands after it."""

    summary: ImportSummary
    bands: dict[str, int]


@flow(name="import-inventory", description=__doc__)
def import_inventory(paths: list[str], owner: str | None = None, tags: dict[str, str] | None = None,
                     import_keys: bool = False, password_secret: str | None = None) -> InventoryImport:
    """Import ``paths``; ``password_secret`` names a Prefect Secret block holding the PKCS#12/key password."""
    summary = import_files(paths, owner, tags or {}, import_keys, password_secret)
    bands = publish_expiry_report()
    if summary.failed:
        shown = "; ".join(f"{f.source}: {f.error}" for f in summary.failures[:5])
        raise PermanentError(f"{summary.failed} of {summary.files} file(s) could not be imported "
                             f"(the rest were): {shown}")
    return InventoryImport(summary, bands)
