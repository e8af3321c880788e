"""`ca init` and `ca register-block` save a private CA's issuer block, and `managed add` refuses an
issuer block that does not exist: against the session's real Prefect server (the test harness), so
that no setup step needs a line of Python."""

from __future__ import annotations

import json
import re

import sqlalchemy as sa
from typer.testing import CliRunner

from blocks.issuers import PrivateCABlock
from certpilot import managed
from certpilot.database import read_session
from cli.main import app


def _flat(text: str) -> str:
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def test_ca_init_saves_the_issuer_block_and_managed_add_checks_it(engine: sa.Engine) -> None:
    runner = CliRunner()
    init = runner.invoke(app, ["ca", "init", "blockca", "--base-url", "http://pki.example.com"])
    assert init.exit_code == 0, init.output
    assert "saved its issuer block private-ca/blockca: managed certificates name it with --issuer private-ca/blockca" \
        in _flat(init.stdout)
    assert PrivateCABlock.load("blockca").ca_name == "blockca"

    added = runner.invoke(app, ["managed", "add", "web", "--dns", "web.example.test", "--issuer", "private-ca/blockca",
                                "--owner", "platform"])
    assert added.exit_code == 0, added.output
    assert "warning" not in added.output

    missing = runner.invoke(app, ["managed", "add", "api", "--dns", "api.example.test", "--issuer", "private-ca/nope",
                                  "--owner", "platform"])
    assert missing.exit_code == 2
    assert ("no issuer block private-ca/nope in Prefect: create it with `certpilot ca register-block nope`"
            in _flat(missing.stderr))
    as_json = runner.invoke(app, ["managed", "add", "api", "--dns", "api.example.test", "--issuer", "acme-issuer/nope",
                                  "--owner", "platform", "--json"])
    assert as_json.exit_code == 2 and "no issuer block acme-issuer/nope" in json.loads(as_json.stdout)["error"]
    with read_session(engine) as session:
        assert [m.name for m in managed.list_managed(session)] == ["web"]  # nothing added for a missing block


def test_register_block_names_the_block_as_prefect_allows(engine: sa.Engine) -> None:
    runner = CliRunner()
    from certpilot import audit, ca, keystore
    from certpilot.database import write_session
    from certpilot.settings import load_settings

    with write_session(engine) as session:  # a CA made without the CLI: its block is registered afterwards
        ca.init_ca(session, keystore.load_key_ring(load_settings()), audit.Actor("test"), "Corp_CA.2", "http://pki.example.com")
    result = runner.invoke(app, ["ca", "register-block", "Corp_CA.2", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"ca": "Corp_CA.2", "issuer_block": "private-ca/corp-ca-2"}
    assert PrivateCABlock.load("corp-ca-2").ca_name == "Corp_CA.2"
    assert runner.invoke(app, ["ca", "register-block", "no-such-ca"]).exit_code == 1
