"""Loading a saved block by its reference, a missing one named by its cause.

``load_block("ssh-host/web-1")`` returns the block saved under that reference; a reference to no
block (no such name, a block type Prefect does not know, or not ``<block-type-slug>/<name>`` at all)
is a certpilot.errors.BlockNotFoundError carrying the reference as ``block``, so the role that needed
the block (a target's deployment, a source, an issuer) says which block is missing instead of a
bare ValueError from Prefect.
"""

from __future__ import annotations

from typing import Any

from certpilot.errors import BlockNotFoundError

__all__ = ["load_block"]


def load_block(reference: str) -> Any:
    """The block saved as ``reference`` (``<block-type-slug>/<name>``); BlockNotFoundError if none is.
    The module that defines its type must have been imported (blocks.ssh, blocks.aws...)."""
    from prefect.blocks.core import Block  # noqa: PLC0415 (Prefect only when a block is loaded)

    slug, sep, name = reference.partition("/")
    if not (slug and sep and name):
        raise BlockNotFoundError(reference, "a block reference is <block-type-slug>/<block-name>")
    try:
        return Block.load(reference)
    except ValueError as exc:  # Prefect: "Unable to find block document named ..." or an unknown type
        raise BlockNotFoundError(reference, " ".join(str(exc).split())) from None
