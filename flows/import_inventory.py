"""The import-inventory flow: bring certificates from files and directories into the inventory,
give them owners by the policy's ownership rules and evaluate them against its rules, then publish the
expiry report. Fails loudly, after importing everything it could, when any file could not be imported
or the policy could not be applied.

The password of encrypted keys and PKCS#12 files is a Prefect Secret block, picked in the run form:
the flow hands the import task the block's name only, and the task reads the value."""

from __future__ import annotations

from dataclasses import dataclass

from prefect import flow
from prefect.blocks.system import Secret

from certpilot.errors import PermanentError
from certpilot.importer import ImportSummary
from tasks.inventory import import_files, publish_expiry_report


@dataclass(frozen=True)
class InventoryImport:
    """What an import-inventory run did, and the inventory's expiry bands after it."""

    summary: ImportSummary
    bands: dict[str, int]


def _secret_name(secret: Secret | None) -> str | None:
    """The saved name of the Secret block given; PermanentError for an unsaved one (its value would
    otherwise have to travel to the task as an argument)."""
    if secret is None:
        return None
    name = secret._block_document_name  # noqa: SLF001 - Prefect's only record of a loaded block's name
    if not name:
        raise PermanentError("password_secret must be a saved Secret block (pick one in the run form, or pass "
                             "Secret.load(NAME)): an unsaved one has no name for the import task to read it by")
    return name


@flow(name="import-inventory", description=__doc__.split("\n\n")[0], timeout_seconds=4 * 3600)
def import_inventory(paths: list[str], owner: str | None = None, tags: dict[str, str] | None = None,
                     import_keys: bool = False, password_secret: Secret | None = None) -> InventoryImport:
    """Import certificates (PEM, DER, PKCS#7, PKCS#12) from files and directories.

    Args:
        paths: Files and directories on the machine that runs the flow; directories are walked for certificate files.
        owner: The owner recorded on every certificate imported.
        tags: Tags recorded on every certificate imported (name: value).
        import_keys: Also import the private keys found beside the certificates (stored encrypted).
        password_secret: The Secret block holding the password of encrypted keys and PKCS#12 files.
    """
    summary = import_files(paths, owner, tags or {}, import_keys, _secret_name(password_secret))
    bands = publish_expiry_report()
    if summary.failed:
        shown = "; ".join(f"{f.source}: {f.error}" for f in summary.failures[:5])
        raise PermanentError(f"{summary.failed} of {summary.files} file(s) could not be imported "
                             f"(the rest were): {shown}")
    if summary.policy_error:
        raise PermanentError(f"every file was imported, but the policy was not applied to all: {summary.policy_error}")
    return InventoryImport(summary, bands)
