"""`certpilot target add` against real blocks in a Prefect test harness: the kind, the settings and the
block reference are checked at once, before anything is written; a wrong one is bad usage (exit 2)
naming what is valid. `target list` shows what was added, as JSON or as a table of plain text."""

from __future__ import annotations

import json
from typing import Any

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from blocks.aws import AwsAccountBlock
from blocks.ssh import SshHostBlock
from blocks.targets import DeploymentTargetBlock
from certpilot import audit, managed, targets
from certpilot.database import read_session, write_session
from cli.main import app

runner = CliRunner()
ACTOR = audit.Actor("test")
NGINX = {"certificate_path": "/etc/nginx/web.crt", "key_path": "/etc/nginx/web.key"}


@pytest.fixture(scope="module")
def saved_blocks() -> None:
    host = SshHostBlock(address="127.0.0.1", port=2222, user="deploy", private_key="not a key: never connected",
                        known_hosts="[127.0.0.1]:2222 ssh-ed25519 AAAA")
    host.save("cli-web-host", overwrite=True)
    AwsAccountBlock(account_alias="cli", regions=["eu-west-1"]).save("cli-aws", overwrite=True)
    DeploymentTargetBlock(kind="ssh-nginx", connection=SshHostBlock.load("cli-web-host"),
                          settings={**NGINX, "verify_port": 8443}).save("cli-web2-nginx", overwrite=True)


@pytest.fixture
def web(engine: sa.Engine, saved_blocks: None) -> str:
    with write_session(engine) as session:
        managed.add(session, managed.ManagedSpec(name="web", dns_names=("web.example.test",),
                                                 issuer="private-ca/internal", owner="platform"), ACTOR)
    return "web"


def _add(web: str, name: str, *args: str) -> Any:
    return runner.invoke(app, ["target", "add", web, name, *args])


def _names(engine: sa.Engine, web: str) -> list[str]:
    with read_session(engine) as session:
        return [t.name for t in targets.list_targets(session, web)]


def test_add_through_a_connection_block_prints_the_target_as_added(engine: sa.Engine, web: str) -> None:
    added = _add(web, "web1", "--kind", "ssh-nginx", "--block", "ssh-host/cli-web-host", "--set",
                 f"certificate_path={NGINX['certificate_path']}", "--set", f"key_path={NGINX['key_path']}",
                 "--set", "verify_port=8443", "--json")
    assert added.exit_code == 0, added.output
    row = json.loads(added.stdout)
    assert row == {"managed": "web", "name": "web1", "kind": "ssh-nginx", "block": "ssh-host/cli-web-host",
                   "settings": {**NGINX, "verify_port": 8443}, "desired": None, "verified": None,
                   "verified_at": None, "last_error": None}
    listed = runner.invoke(app, ["target", "list", web, "--json"])
    assert listed.exit_code == 0 and json.loads(listed.stdout) == [{k: v for k, v in row.items() if k != "managed"}]
    plain = _add(web, "web3", "--kind", "ssh-nginx", "--block", "deployment-target/cli-web2-nginx")
    assert plain.exit_code == 0 and "added target web3 (ssh-nginx via deployment-target/cli-web2-nginx)" in plain.stdout


def test_a_deployment_target_block_of_the_kind_holds_the_rest_of_the_settings(engine: sa.Engine, web: str) -> None:
    added = _add(web, "web2", "--kind", "ssh-nginx", "--block", "deployment-target/cli-web2-nginx",
                 "--set", "verify_port=9443", "--json")
    assert added.exit_code == 0, added.output
    assert json.loads(added.stdout)["settings"] == {"verify_port": 9443}  # the block's settings, overridden
    other_kind = _add(web, "lb2", "--kind", "ssh-haproxy", "--block", "deployment-target/cli-web2-nginx",
                      "--set", "pem_path=/x.pem", "--set", "reload_command=true")
    assert other_kind.exit_code == 2
    assert "deployment-target/cli-web2-nginx is a deployment target of kind ssh-nginx, not ssh-haproxy" in \
        other_kind.stderr
    bad_value = _add(web, "web4", "--kind", "ssh-nginx", "--block", "deployment-target/cli-web2-nginx",
                     "--set", "verify_port=https")
    assert bad_value.exit_code == 2 and "verify_port must be a valid integer" in bad_value.stderr
    assert _names(engine, web) == ["web2"]


@pytest.mark.parametrize(("args", "says"), [
    (["--kind", "ssh-nginx", "--block", "ssh-host/nowhere", "--set", "certificate_path=/a", "--set", "key_path=/b"],
     "no block 'ssh-host/nowhere'"),
    (["--kind", "ssh-nginx", "--block", "nowhere", "--set", "certificate_path=/a", "--set", "key_path=/b"],
     "'nowhere' must be <block-type-slug>/<block-name>"),
    (["--kind", "aws-acm", "--block", "ssh-host/cli-web-host", "--set", "region=eu-west-1"],
     "ssh-host/cli-web-host is a SshHostBlock; kind aws-acm goes through an AWS account (AwsAccountBlock)"),
    (["--kind", "ssh-nginx", "--block", "aws-account/cli-aws", "--set", "certificate_path=/a", "--set", "key_path=/b"],
     "aws-account/cli-aws is a AwsAccountBlock; kind ssh-nginx goes through an SSH host (SshHostBlock)"),
    (["--kind", "ssh-nginx", "--block", "ssh-host/cli-web-host", "--set", "certificate_path=/a"],
     "ssh-nginx needs the setting(s) key_path (valid keys: certificate_mode, certificate_path"),
    (["--kind", "aws-elbv2", "--block", "aws-account/cli-aws", "--set", "listener_arn=arn:aws:acm:x"],
     "listener_arn must be an ELBv2 listener ARN"),
    (["--kind", "aws-elbv2", "--block", "aws-account/cli-aws"],
     "aws-elbv2 needs the setting(s) listener_arn (valid keys: listener_arn, region, role)"),
])
def test_a_wrong_block_or_settings_is_bad_usage_and_writes_nothing(engine: sa.Engine, web: str, args: list[str],
                                                                   says: str) -> None:
    result = _add(web, "t1", *args, "--json")
    assert result.exit_code == 2, result.output
    error = json.loads(result.stdout)
    assert error["exit_code"] == 2 and says in error["error"] and says in " ".join(result.stderr.split())
    assert _names(engine, web) == []


def test_target_list_shows_data_as_text_never_as_markup(engine: sa.Engine, web: str) -> None:
    with write_session(engine) as session:
        target = targets.add(session, web, "web1", "ssh-nginx", "ssh-host/[bold]x[/]", NGINX, ACTOR)
        targets.record_failed(session, target, "deploy: [red]CN=[/]x[/] failed", ACTOR)
        targets.set_desired(session, target, "ab" * 32, ACTOR)
    listed = runner.invoke(app, ["target", "list", web], env={"COLUMNS": "200"})
    assert listed.exit_code == 0, listed.output
    assert "ssh-host/[bold]x[/]" in listed.stdout and "deploy: [red]CN=[/]x[/] failed" in listed.stdout
    assert "1 target(s), 1 not verified serving what they should" in listed.stdout


def test_a_deployment_target_made_as_the_ui_makes_it_loads_with_its_kinds_settings(saved_blocks: None) -> None:
    """The server keeps the block's schema (its form: kind a select, connection a picker of saved blocks,
    settings one of the kinds' models); a document posted as the UI posts it (plain data, the connection
    as a reference) loads with the settings of its kind, and one whose settings are not its kind's fails."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import BlockDocumentCreate

    from certpilot.target_kinds import HaproxySettings

    host = SshHostBlock.load("cli-web-host")
    with get_client(sync_client=True) as client:
        block_type = client.read_block_type_by_slug("deployment-target")
        schema = client.read_block_schema_by_checksum(DeploymentTargetBlock._calculate_schema_checksum())
        fields = schema.fields
        assert fields["required"] == ["kind", "connection", "settings"]
        assert fields["definitions"]["TargetKind"]["enum"][:2] == ["ssh-nginx", "ssh-haproxy"]
        assert {ref["block_type_slug"] for ref in fields["block_schema_references"]["connection"]} == {
            "ssh-host", "aws-account", "azure-key-vault"}
        assert [option["$ref"].rsplit("/", 1)[-1] for option in fields["properties"]["settings"]["anyOf"]] == [
            "NginxSettings", "HaproxySettings", "AcmSettings", "ListenerSettings", "KeyVaultSettings",
            "TrustBundleSettings"]
        for name, settings in (("cli-ui-lb", {"pem_path": "/p.pem", "runtime_socket": "/s"}),
                               ("cli-ui-wrong", {"pem_path": "/p.pem", "runtime_socket": "/s", "key_path": "/k"})):
            client.create_block_document(BlockDocumentCreate(
                name=name, block_type_id=block_type.id, block_schema_id=schema.id,
                data={"kind": "ssh-haproxy", "connection": {"$ref": {"block_document_id": str(host._block_document_id)}},
                      "settings": settings}))
    loaded = DeploymentTargetBlock.load("cli-ui-lb")
    assert isinstance(loaded.settings, HaproxySettings) and loaded.settings.runtime_client == "auto"
    assert isinstance(loaded.connection, SshHostBlock) and loaded.connection.address == "127.0.0.1"
    with pytest.raises(RuntimeError, match="Unable to load 'cli-ui-wrong'") as refused:  # Prefect's wrapping
        DeploymentTargetBlock.load("cli-ui-wrong")
    assert "unknown ssh-haproxy setting(s) key_path" in str(refused.value.__cause__)
