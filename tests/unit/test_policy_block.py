"""The certpilot-policy block: Prefect's block standard suite, and its YAML checked when it is made, a bad
policy refused naming its line (no Prefect server needed: nothing is saved here; tests/flows/test_policy_block.py
saves and loads one)."""

from __future__ import annotations

import pytest
from prefect.blocks.core import Block
from prefect.testing.standard_test_suites import BlockStandardTestSuite
from pydantic import ValidationError

from blocks.policy import CertificatePolicy


class TestCertificatePolicy(BlockStandardTestSuite):
    @pytest.fixture
    def block(self) -> type[Block]:
        return CertificatePolicy

    @pytest.mark.skip(reason="certpilot's blocks carry no logo; the suite's check would fetch one over the network")
    def test_has_a_valid_image(self, block: type[Block]) -> None:
        super().test_has_a_valid_image(block)


def test_the_policy_is_checked_when_the_block_is_made() -> None:
    assert CertificatePolicy.get_block_type_slug() == "certpilot-policy"
    text = "rules:\n  key-size: {rsa: 3072}\n"
    assert CertificatePolicy(yaml=text).yaml == text
    with pytest.raises(ValidationError, match=r"yaml:2: unknown rule 'key-length'"):
        CertificatePolicy(yaml="rules:\n  key-length: {rsa: 3072}\n")
