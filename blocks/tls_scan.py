"""The TLS scan block: which hosts, ranges, ports and SNI names the discover flow handshakes with.

``source()`` builds a connectors.tls_scan.TlsScanSource named ``tls-scan:<block name>``. Nothing here is
secret: the trust bundle is public CA certificates (PEM) against which each presented chain is verified.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from prefect.blocks.core import Block
from pydantic import ConfigDict, Field, HttpUrl, field_validator

from certpilot.discovery import Source
from certpilot.errors import ParseError
from certpilot.formats import load_bundle

DOCS = "https://github.com/certpilot/certpilot/blob/main/README.md#discovery"


class TlsScanBlock(Block):
    """Endpoints to discover certificates on by TLS handshake: host names, IP addresses and CIDR ranges."""

    model_config = ConfigDict(hide_input_in_errors=True)  # a pasted bundle could hold a key: never echo it

    _block_type_name: ClassVar[str] = "TLS scan"
    _block_type_slug: ClassVar[str] = "tls-scan"
    _description: ClassVar[str] = ("Host names, addresses and CIDR ranges, ports and SNI names to scan for "
                                   "TLS certificates, with the CA certificates their chains are verified against.")
    _documentation_url: ClassVar[HttpUrl | None] = HttpUrl(DOCS)
    _code_example: ClassVar[str] = """
```python
from blocks.tls_scan import TlsScanBlock

tls_scan_block = TlsScanBlock.load("BLOCK_NAME")
for item in tls_scan_block.source().discover():
    print(item)
```
"""

    targets: list[str] = Field(description="Host names, IPv4/IPv6 addresses or CIDR ranges, each optionally with "
                                           "a port: www.example.com, 10.0.0.0/28, [2001:db8::1]:8443.")
    ports: list[int] = Field(default_factory=lambda: [443], description="Ports scanned on targets given without one.")
    sni_names: list[str] = Field(default_factory=list, description="Server names sent in the handshake; every "
                                                                   "address is scanned with each (none: no SNI).")
    concurrency: int = Field(default=200, ge=1, le=5000, description="Connections open at once.")
    timeout_seconds: float = Field(default=3.0, gt=0, le=120, description="Per connection: connect, handshake and "
                                                                          "reads together, in seconds.")
    trust_bundle_pem: str | None = Field(default=None, description="PEM CA certificates that chains are verified "
                                                                   "against (e.g. your private roots).")
    use_system_trust: bool = Field(default=False, description="Also verify against the system's CA certificates.")
    chunk_addresses: int = Field(default=1024, ge=1, le=65536, description=(
        "Addresses per chunk of a large scan: deployed on a work pool, discover scans each chunk in a "
        "discover-chunk run of its own, which the workers share (a /16 in chunks of 1,024: 64 runs)."))

    @field_validator("trust_bundle_pem")
    @classmethod
    def _parses(cls, value: str | None) -> str | None:
        if value and value.strip():
            try:
                bundle = load_bundle(value.encode(), source="trust_bundle_pem")
            except ParseError as exc:
                raise ValueError(str(exc)) from None
            if not bundle.certificates:
                raise ValueError("trust_bundle_pem holds no certificate")
            if bundle.private_keys:
                raise ValueError("trust_bundle_pem holds a private key: give CA certificates only")
        return value

    def chunks(self) -> list[list[str]]:
        """The targets in chunks of at most ``chunk_addresses`` addresses (connectors.tls_scan.chunk_targets)."""
        from connectors.tls_scan import chunk_targets

        return chunk_targets(self.targets, self.chunk_addresses)

    def source(self, targets: Sequence[str] | None = None) -> Source:
        """The scan of every target, or of ``targets`` only (one of ``chunks()``), with this block's
        ports, SNI names, limits and trust, under the block's source name either way."""
        from connectors.tls_scan import TlsScanSource

        trust = (load_bundle(self.trust_bundle_pem.encode(), source="trust_bundle_pem").certificates
                 if self.trust_bundle_pem and self.trust_bundle_pem.strip() else ())
        return TlsScanSource(self._block_document_name or "unsaved", self.targets if targets is None else targets,
                             ports=tuple(self.ports),
                             sni=tuple(self.sni_names), concurrency=self.concurrency, timeout=self.timeout_seconds,
                             trust=trust, use_system_trust=self.use_system_trust)
