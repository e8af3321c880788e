"""The TLS scan block: Prefect's block standard suite, its settings checked, and source() building a scanner
that really scans the farm with the block's trust bundle (no Prefect server needed: nothing is saved)."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization
from prefect.blocks.core import Block
from prefect.testing.standard_test_suites import BlockStandardTestSuite
from pydantic import ValidationError

from blocks.tls_scan import TlsScanBlock
from certpilot.discovery import Found, Source
from connectors.tls_scan import TlsScanSource
from lab.tls_farm import TlsFarm


class TestTlsScanBlock(BlockStandardTestSuite):
    @pytest.fixture
    def block(self) -> type[Block]:
        return TlsScanBlock

    @pytest.mark.skip(reason="certpilot's blocks carry no logo; the suite's check would fetch one over the network")
    def test_has_a_valid_image(self, block: type[Block]) -> None:
        super().test_has_a_valid_image(block)


def test_source_scans_with_the_blocks_settings(farm: TlsFarm) -> None:
    endpoint = farm.of_kind("sni")[0]
    pem = farm.ca.root.public_bytes(serialization.Encoding.PEM).decode()
    block = TlsScanBlock(targets=[f"127.0.0.1:{endpoint.port}"], sni_names=["alpha.sni.test"], concurrency=4,
                         timeout_seconds=2.0, trust_bundle_pem=pem)
    source = block.source()
    assert isinstance(source, TlsScanSource) and isinstance(source, Source)
    assert source.name == "tls-scan:unsaved" and source.concurrency == 4 and source.timeout == 2.0
    [item] = list(source.discover())
    assert isinstance(item, Found)
    assert item.locator == f"tls://127.0.0.1:{endpoint.port}?sni=alpha.sni.test"
    assert item.details["verified"] is True
    assert TlsScanBlock.get_block_type_slug() == "tls-scan"


def test_a_bad_trust_bundle_is_refused_without_echoing_it() -> None:
    with pytest.raises(ValidationError, match="trust_bundle_pem") as caught:
        TlsScanBlock(targets=["127.0.0.1"],
                     trust_bundle_pem="-----BEGIN PRIVATE KEY-----\nc2VjcmV0\n-----END PRIVATE KEY-----\n")
    assert "c2VjcmV0" not in str(caught.value)
    with pytest.raises(ValidationError):
        TlsScanBlock(targets=["127.0.0.1"], concurrency=0)
