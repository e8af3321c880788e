"""The policy in force from a certpilot-policy block saved in a real Prefect server (CERTPILOT_POLICY=
block:<name>): read by blocks.policy.policy_in_force and by `certpilot policy show`; a missing block is a
PermanentError naming it."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from blocks.policy import CertificatePolicy, policy_in_force, read_policy_block
from certpilot.errors import PermanentError
from certpilot.settings import load_settings
from cli.main import app

TEXT = "rules:\n  key-size: {rsa: 3072, severity: critical}\n"


def test_the_policy_in_force_comes_from_the_block(monkeypatch: pytest.MonkeyPatch) -> None:
    CertificatePolicy(yaml=TEXT).save("policy-block-test", overwrite=True)
    assert read_policy_block("policy-block-test") == TEXT
    monkeypatch.setenv("CERTPILOT_POLICY", "block:policy-block-test")
    policy = policy_in_force(load_settings())
    assert (policy.source, policy.text, policy.rule_severity("key-size")) == ("block:policy-block-test", TEXT,
                                                                             "critical")
    shown = CliRunner().invoke(app, ["policy", "show", "--json"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["source"] == "block:policy-block-test"


def test_a_missing_policy_block_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(PermanentError, match=r"policy block 'no-such-policy' \(CERTPILOT_POLICY=block:no-such-policy\) "
                                             r"not found"):
        read_policy_block("no-such-policy")
    monkeypatch.setenv("CERTPILOT_POLICY", "block:no-such-policy")
    result = CliRunner().invoke(app, ["policy", "check"])
    assert result.exit_code == 1 and "policy block 'no-such-policy'" in result.stderr
