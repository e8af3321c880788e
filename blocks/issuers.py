"""Issuer blocks: where a certificate comes from, as operators configure it in the Prefect UI.

A managed certificate names its issuer as ``<block-type-slug>/<block-name>``, e.g.
``private-ca/internal`` or ``acme-issuer/letsencrypt``. Each block holds configuration and secrets
(SecretStr, shown masked) and has one factory, ``get_issuer(engine, key_ring)``, that builds the
connector; renewal logic lives in certpilot.managed and the tasks.

Block secrets are encrypted in the Prefect database with a key kept in the same database unless the
server sets PREFECT_SERVER_ENCRYPTION_KEY, and any API client may read them with include_secrets:
protect the Prefect API accordingly.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Literal

import sqlalchemy as sa
from prefect.blocks.core import Block
from pydantic import Field, HttpUrl, SecretStr, model_validator

from blocks.loading import load_block
from certpilot import audit
from certpilot.errors import BlockNotFoundError, redact
from certpilot.issuance import Issuer
from certpilot.managed import KeyRingSource

DOCS = "https://github.com/certpilot/certpilot/blob/main/README.md#issuers"

_responders: dict[tuple[str, int], Any] = {}
_responders_lock = threading.Lock()


def _shared_http01_responder(address: str, port: int) -> Any:
    """One http-01 responder per address and port in this process, shared by every ACME issuer."""
    from connectors.challenges import Http01Responder

    with _responders_lock:
        if (address, port) not in _responders:
            _responders[(address, port)] = Http01Responder(address, port)
        return _responders[(address, port)]


class PrivateCABlock(Block):
    """certpilot's own private CA, kept in the inventory database (created with `certpilot ca init`).

    Its issuing key is decrypted only while it signs; nothing secret is configured here."""

    _block_type_name: ClassVar[str] = "Private CA"
    _block_type_slug: ClassVar[str] = "private-ca"
    _description: ClassVar[str] = ("certpilot's private certificate authority in the inventory database: "
                                   "issues certificates for internal names.")
    _documentation_url: ClassVar[HttpUrl | None] = HttpUrl(DOCS)
    _code_example: ClassVar[str] = """
```python
from blocks.issuers import PrivateCABlock

private_ca_block = PrivateCABlock.load("BLOCK_NAME")
issuer = private_ca_block.get_issuer(engine, key_ring)
```
"""

    ca_name: str = Field(description="The CA's name in the inventory, as given to `certpilot ca init`.")

    def get_issuer(self, engine: sa.Engine, key_ring: KeyRingSource, *, actor: audit.Actor | None = None) -> Issuer:
        """The connector: a PrivateCAIssuer signing with this CA (``actor`` is recorded on what it issues)."""
        from connectors.private_ca import PrivateCAIssuer

        return PrivateCAIssuer(engine, self.ca_name, key_ring, actor=actor)


class AcmeIssuerBlock(Block):
    """An ACME CA (RFC 8555): Let's Encrypt, ZeroSSL, Google Trust Services, pebble, a corporate ACME server."""

    _block_type_name: ClassVar[str] = "ACME issuer"
    _block_type_slug: ClassVar[str] = "acme-issuer"
    _description: ClassVar[str] = ("An ACME certificate authority with its account settings and the challenge "
                                   "(http-01 or dns-01) that proves control of the names.")
    _documentation_url: ClassVar[HttpUrl | None] = HttpUrl(DOCS)
    _code_example: ClassVar[str] = """
```python
from blocks.issuers import AcmeIssuerBlock

acme_issuer_block = AcmeIssuerBlock.load("BLOCK_NAME")
issuer = acme_issuer_block.get_issuer(engine, key_ring)
```
"""

    directory_url: str = Field(description="The CA's ACME directory URL, e.g. https://acme-v02.api.letsencrypt.org/directory.")
    contact: list[str] = Field(default_factory=list, description="Account contact URLs, e.g. mailto:pki@example.com.")
    eab_key_id: str | None = Field(default=None, description="External account binding key id, when the CA requires one.")
    eab_hmac_key: SecretStr | None = Field(default=None, description="External account binding HMAC key (base64url).")
    ca_bundle: str | None = Field(default=None, description="Path of a PEM file of roots to trust for the directory's TLS, "
                                                            "instead of the system's.")
    challenge: Literal["http-01", "dns-01"] = Field(default="http-01", description="How control of each name is proven.")
    http01_address: str = Field(default="0.0.0.0", description="http-01: the address the challenge responder listens on.")
    http01_port: int = Field(default=80, ge=0, le=65535, description="http-01: the port the challenge responder listens on.")
    dns_provider: Literal["route53", "challtestsrv"] = Field(default="route53",
                                                             description="dns-01: where the TXT records are set.")
    challtestsrv_url: str | None = Field(default=None, description="dns-01 with challtestsrv: its management API URL "
                                                                   "(tests and demos).")
    route53_hosted_zone_id: str | None = Field(default=None, description="dns-01 with Route53: the hosted zone id.")
    aws_access_key_id: str | None = Field(default=None, description="dns-01 with Route53: the access key id "
                                                                    "(empty: the default credential chain).")
    aws_secret_access_key: SecretStr | None = Field(default=None, description="dns-01 with Route53: the secret access key.")
    aws_session_token: SecretStr | None = Field(default=None, description="dns-01 with Route53: a session token, if any.")
    aws_region: str = Field(default="us-east-1", description="dns-01 with Route53: the AWS region of the API endpoint.")
    aws_endpoint_url: str | None = Field(default=None, description="dns-01 with Route53: another API endpoint (moto in tests).")
    preferred_chain: str | None = Field(default=None, description="The issuer name of the root whose chain to prefer, "
                                                                  "when the CA offers alternates.")
    timeout_seconds: float = Field(default=30.0, gt=0, description="Timeout of every request to the CA, in seconds.")

    @model_validator(mode="after")
    def _complete(self) -> AcmeIssuerBlock:
        if (self.eab_key_id is None) != (self.eab_hmac_key is None):
            raise ValueError("external account binding needs both eab_key_id and eab_hmac_key")
        if self.challenge == "dns-01":
            if self.dns_provider == "challtestsrv" and not self.challtestsrv_url:
                raise ValueError("dns-01 through challtestsrv needs challtestsrv_url")
            if self.dns_provider == "route53" and not self.route53_hosted_zone_id:
                raise ValueError("dns-01 through Route53 needs route53_hosted_zone_id")
        return self

    @property
    def issuer_name(self) -> str:
        """How managed certificates name this issuer: ``acme-issuer/<block name>``."""
        return f"{self._block_type_slug}/{self._block_document_name or 'unsaved'}"

    def _route53_client(self) -> Any:
        import boto3
        from botocore.config import Config

        secret = self.aws_secret_access_key.get_secret_value() if self.aws_secret_access_key else None
        token = self.aws_session_token.get_secret_value() if self.aws_session_token else None
        return boto3.client("route53", aws_access_key_id=self.aws_access_key_id, aws_secret_access_key=secret,
                            aws_session_token=token, region_name=self.aws_region, endpoint_url=self.aws_endpoint_url,
                            config=Config(connect_timeout=10, read_timeout=30, retries={"max_attempts": 3}))

    def _solver(self) -> Any:
        from connectors.challenges import ChallTestSrvDns, Dns01Solver, Route53Dns

        if self.challenge == "http-01":
            return _shared_http01_responder(self.http01_address, self.http01_port)
        if self.dns_provider == "challtestsrv":
            return Dns01Solver(ChallTestSrvDns(self.challtestsrv_url or ""))
        return Dns01Solver(Route53Dns(self._route53_client(), self.route53_hosted_zone_id or ""))

    def get_issuer(self, engine: sa.Engine, key_ring: KeyRingSource, *, actor: audit.Actor | None = None) -> Issuer:
        """The connector: an AcmeIssuer with this account and challenge (``actor`` is not used: the CA
        records nothing in the inventory)."""
        from connectors.acme_issuer import AcmeIssuer

        eab = None
        if self.eab_key_id and self.eab_hmac_key:
            eab = (self.eab_key_id, self.eab_hmac_key.get_secret_value())
        return AcmeIssuer(engine, self.issuer_name, self.directory_url, key_ring=key_ring, solver=self._solver(),
                          contact=tuple(self.contact), eab=eab, ca_bundle=self.ca_bundle,
                          preferred_chain=self.preferred_chain, timeout=self.timeout_seconds)


def acme_directory_urls(names: Sequence[str], warn: Callable[[str], None]) -> dict[str, str]:
    """The directory URL of each ACME issuer block (``acme-issuer/...``) among ``names``; a block that cannot
    be loaded is told to ``warn`` (naming it and why) and left out: one unreadable block stops nothing."""
    found = {}
    for name in names:
        if name.partition("/")[0] != "acme-issuer":
            continue
        try:
            url = getattr(load_block(name), "directory_url", None)
        except BlockNotFoundError as exc:
            warn(str(exc))
            continue
        except Exception as exc:  # noqa: BLE001 - one unreadable block does not stop the others
            warn(f"issuer block {name} could not be read: {redact(exc)}")
            continue
        if isinstance(url, str):
            found[name] = url
    return found
