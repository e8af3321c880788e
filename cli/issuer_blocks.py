"""Issuer blocks from the command line: `ca init` and `ca register-block` save a private CA's block,
`managed add` refuses an issuer block that does not exist. Both need a Prefect API (PREFECT_API_URL);
without one, nothing is written to any Prefect database and the user is told what to run later."""

from __future__ import annotations

import re

from blocks.loading import load_block
from certpilot.errors import BlockNotFoundError, PermanentError
from cli import prefect_api
from cli.console import usage_error, warn

PRIVATE_CA = "private-ca"  # PrivateCABlock's block type slug
NO_API = "PREFECT_API_URL is not set"


def block_name(ca_name: str) -> str:
    """The block document name of CA ``ca_name``: Prefect allows lower-case letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]", "-", ca_name.lower())


def private_ca_issuer(ca_name: str) -> str:
    """What managed certificates name CA ``ca_name``'s block by: ``--issuer private-ca/NAME``."""
    return f"{PRIVATE_CA}/{block_name(ca_name)}"


def register_command(ca_name: str) -> str:
    return f"certpilot ca register-block {ca_name}"


def register_private_ca(ca_name: str) -> str:
    """Save CA ``ca_name``'s issuer block (its block type registered first; an existing block of that
    name is replaced) and return its ``private-ca/NAME``. Needs a Prefect API."""
    if not prefect_api.configured():
        raise PermanentError(f"{NO_API}: point it at your Prefect server, then run "
                             f"`{register_command(ca_name)}`")
    from blocks.issuers import PrivateCABlock

    PrivateCABlock.register_type_and_schema()
    PrivateCABlock(ca_name=ca_name).save(block_name(ca_name), overwrite=True)
    return private_ca_issuer(ca_name)


def check_issuer_block(issuer: str) -> None:
    """A usage error when issuer block ``issuer`` (block-type-slug/name) does not exist in Prefect.
    Without a Prefect API it cannot be checked: a warning, and the caller goes on."""
    if "/" not in issuer:
        return  # not a block name at all: the core says what the form is
    if not prefect_api.configured():
        warn(f"{NO_API}: issuer block {issuer} was not checked; make sure it exists before renewing")
        return
    import blocks.issuers  # noqa: F401 - the issuer block types, so that loading finds their classes

    try:
        load_block(issuer)
    except BlockNotFoundError:
        slug, _, name = issuer.partition("/")
        how = (f"create it with `certpilot ca register-block {name}` (or `certpilot ca init {name}`)"
               if slug == PRIVATE_CA else "create it in the Prefect UI (Blocks)")
        raise usage_error(f"no issuer block {issuer} in Prefect: {how}", "--issuer") from None
