"""The certificate policy as a Prefect block, and the one way tasks and the CLI get the policy in force.

``CERTPILOT_POLICY=block:<name>`` makes the ``certpilot-policy`` block ``<name>`` the policy (its YAML is
checked when the block is saved); otherwise the policy comes from a file (certpilot.policy.load_policy).
``policy_in_force()`` is what tasks and the CLI call; they pass the Policy down to the core. Register the
type with ``prefect block register -m blocks.policy``. Nothing here is secret.
"""

from __future__ import annotations

from typing import ClassVar

from prefect.blocks.core import Block
from pydantic import Field, HttpUrl, field_validator

from blocks.loading import load_block
from certpilot.errors import BlockNotFoundError, PermanentError
from certpilot.policy import Policy, PolicyFileError, load_policy, parse_policy
from certpilot.settings import Settings

__all__ = ["SLUG", "CertificatePolicy", "policy_in_force", "read_policy_block"]

DOCS = "https://github.com/certpilot/certpilot/blob/main/README.md#policy"
SLUG = "certpilot-policy"


class CertificatePolicy(Block):
    """certpilot's certificate policy: rules with stable ids, scopes, private issuers and ownership rules, as
    YAML (the format of certpilot/policy.py). In force where CERTPILOT_POLICY=block:<this block's name>."""

    _block_type_name: ClassVar[str] = "Certificate policy"
    _block_type_slug: ClassVar[str] = SLUG
    _description: ClassVar[str] = ("The certificate policy certpilot evaluates on import, discovery, monitoring "
                                   "and before issuance: rules, scopes, private issuers and ownership, as YAML.")
    _documentation_url: ClassVar[HttpUrl | None] = HttpUrl(DOCS)
    _code_example: ClassVar[str] = """
```python
from blocks.policy import CertificatePolicy

certificate_policy_block = CertificatePolicy.load("BLOCK_NAME")
print(certificate_policy_block.yaml)
```
"""

    yaml: str = Field(description="The policy, YAML: rules, scopes, issuers and ownership (see certpilot/policy.py). "
                                  "Checked when saved.")

    @field_validator("yaml")
    @classmethod
    def _parses(cls, value: str) -> str:
        try:
            parse_policy(value, "yaml")
        except PolicyFileError as exc:
            raise ValueError(str(exc)) from None
        return value


def read_policy_block(name: str) -> str:
    """The YAML of the certpilot-policy block ``name``; PermanentError naming it when there is none."""
    try:
        block = load_block(f"{SLUG}/{name}")
    except BlockNotFoundError as exc:
        raise PermanentError(f"policy block {name!r} (CERTPILOT_POLICY=block:{name}) not found: save a "
                             f"{SLUG} block named {name} (prefect block register -m blocks.policy, then the "
                             f"Prefect UI's Blocks), or set CERTPILOT_POLICY to a file ({exc.detail})") from None
    if not isinstance(block, CertificatePolicy):
        raise PermanentError(f"block {SLUG}/{name} is a {type(block).__name__}, not a certificate policy")
    return block.yaml


def policy_in_force(settings: Settings | None = None) -> Policy:
    """The policy in force (certpilot.policy.load_policy, reading a block with ``read_policy_block``)."""
    return load_policy(settings, read_policy_block)
