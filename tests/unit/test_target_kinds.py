"""The target-kind registry: one settings model per kind (keys, types, defaults, rules between keys), the
error that names what is wrong and what is valid, the registry in blocks/ covering every kind, and the
deployment-target block's form derived from the same models."""

from __future__ import annotations

import pickle
import uuid
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from pydantic import ValidationError

from blocks.aws import AwsAccountBlock
from blocks.azure import AzureKeyVaultBlock
from blocks.ssh import SshHostBlock
from blocks.targets import KINDS, DeploymentTargetBlock, build_deployer, kinds_of
from certpilot.deployment import PermanentDeployError
from certpilot.errors import redact
from certpilot.sample_estate import key_pem, make_ca
from certpilot.target_kinds import (
    SETTINGS,
    AcmSettings,
    HaproxySettings,
    KeyVaultSettings,
    ListenerSettings,
    NginxSettings,
    TargetKind,
    TargetSettingsError,
    TrustBundleSettings,
    UnknownTargetKindError,
    merged_settings,
    valid_keys,
    validate_settings,
)

LISTENER = "arn:aws:elasticloadbalancing:eu-west-1:123456789012:listener/app/web/1/2"
ACM = "arn:aws:acm:eu-west-1:123456789012:certificate/0f1e2d3c"
NGINX = {"certificate_path": "/etc/nginx/web.crt", "key_path": "/etc/nginx/web.key"}
MINIMAL: dict[TargetKind, dict[str, Any]] = {
    TargetKind.SSH_NGINX: NGINX, TargetKind.SSH_HAPROXY: {"pem_path": "/etc/haproxy/web.pem", "reload_command": "true"},
    TargetKind.AWS_ACM: {"region": "eu-west-1"}, TargetKind.AWS_ELBV2: {"listener_arn": LISTENER},
    TargetKind.AWS_IAM_ELBV2: {"listener_arn": LISTENER}, TargetKind.AZURE_KV: {"certificate_name": "web"},
    TargetKind.TRUST_BUNDLE: {"path": "/usr/local/share/ca-certificates/lab-ca.crt"},
}


def _refused(kind: str, settings: dict[str, Any]) -> TargetSettingsError:
    with pytest.raises(TargetSettingsError) as caught:
        validate_settings(kind, settings, "t1")
    return caught.value


def test_every_kind_has_one_model_and_one_registry_entry() -> None:
    assert set(SETTINGS) == set(KINDS) == set(TargetKind) == set(MINIMAL)
    for kind, spec in KINDS.items():
        assert spec.settings is SETTINGS[kind]
        assert kind in kinds_of(spec.connection)
    assert kinds_of(SshHostBlock) == [TargetKind.SSH_NGINX, TargetKind.SSH_HAPROXY, TargetKind.TRUST_BUNDLE]
    assert kinds_of(AzureKeyVaultBlock) == [TargetKind.AZURE_KV]
    assert [k.value for k in TargetKind] == ["ssh-nginx", "ssh-haproxy", "aws-acm", "aws-elbv2", "aws-iam-elbv2",
                                             "azure-kv", "trust-bundle"]


@pytest.mark.parametrize("kind", list(TargetKind))
def test_minimal_settings_validate_and_models_are_frozen(kind: TargetKind) -> None:
    settings = validate_settings(kind, MINIMAL[kind])
    assert isinstance(settings, SETTINGS[kind])
    assert validate_settings(kind, settings) is settings  # a model of the kind passes as it is
    with pytest.raises(ValidationError):
        settings.__setattr__(next(iter(MINIMAL[kind])), "/elsewhere")
    unknown = _refused(kind, {**MINIMAL[kind], "colour": "blue"})
    assert unknown.unknown == ("colour",) and "colour" not in unknown.valid_keys
    assert f"unknown {kind} setting(s) colour" in str(unknown) and all(k in str(unknown) for k in unknown.valid_keys)


def test_defaults_come_from_the_models() -> None:
    nginx = validate_settings("ssh-nginx", NGINX)
    assert isinstance(nginx, NginxSettings)
    assert (nginx.verify_port, nginx.verify_timeout, nginx.verify_consecutive, nginx.command_timeout) == (443, 10, 5, 60)
    assert (nginx.test_command, nginx.reload_command, nginx.file_mode) == ("nginx -t", "nginx -s reload", 0o644)
    assert validate_settings("ssh-nginx", {**NGINX, "certificate_mode": 0o640}).file_mode == 0o640  # type: ignore[attr-defined]
    haproxy = validate_settings("ssh-haproxy", {"pem_path": "/p.pem", "runtime_socket": "/s"})
    assert isinstance(haproxy, HaproxySettings) and haproxy.runtime_client == "auto" and haproxy.reload_command is None
    listener = validate_settings("aws-elbv2", {"listener_arn": LISTENER})
    assert isinstance(listener, ListenerSettings) and (listener.role, listener.listener_region) == ("default",
                                                                                                   "eu-west-1")
    acm = validate_settings("aws-acm", {"certificate_arn": ACM})
    assert isinstance(acm, AcmSettings) and acm.acm_region == "eu-west-1"
    vault = validate_settings("azure-kv", {"certificate_name": "web-1"})
    assert isinstance(vault, KeyVaultSettings) and (vault.tags, vault.purge_deleted) == ({}, False)
    bundle = validate_settings("trust-bundle", {"path": "/etc/ssl/lab-ca.pem"})
    assert isinstance(bundle, TrustBundleSettings)
    assert (bundle.file_mode, bundle.owner, bundle.group, bundle.reload_command) == (0o644, None, None, None)


def test_required_keys_types_and_rules_between_keys() -> None:
    missing = _refused("ssh-nginx", {"certificate_path": "/a"})
    assert missing.missing == ("key_path",) and "ssh-nginx needs the setting(s) key_path" in str(missing)
    assert missing.bad_keys == ("key_path",) and str(missing).startswith("t1: ")
    wrong = _refused("ssh-nginx", {**NGINX, "verify_port": "https", "certificate_mode": "0999"})
    assert set(wrong.invalid) == {"verify_port", "certificate_mode"}
    assert "verify_port must be a valid integer" in str(wrong) and "certificate_mode must be a file mode" in str(wrong)
    assert "same file" in str(_refused("ssh-nginx", {"certificate_path": "/a", "key_path": "/a"}))
    assert "needs runtime_socket or reload_command" in str(_refused("ssh-haproxy", {"pem_path": "/p.pem"}))
    assert "runtime_client must be 'auto', 'socat' or 'python3'" in str(
        _refused("ssh-haproxy", {"pem_path": "/p.pem", "runtime_socket": "/s", "runtime_client": "nc"}))
    assert "aws-acm needs a region (or a certificate_arn)" in str(_refused("aws-acm", {}))
    assert "certificate_arn is in eu-west-1, not us-east-2" in str(
        _refused("aws-acm", {"certificate_arn": ACM, "region": "us-east-2"}))
    assert "is not an ACM certificate ARN" in str(_refused("aws-acm", {"certificate_arn": LISTENER}))
    assert "must be an ELBv2 listener ARN" in str(_refused("aws-iam-elbv2", {"listener_arn": ACM}))
    assert "the listener is in eu-west-1, not us-east-2" in str(
        _refused("aws-elbv2", {"listener_arn": LISTENER, "region": "us-east-2"}))
    assert "role must be 'default' or 'sni'" in str(_refused("aws-elbv2", {"listener_arn": LISTENER, "role": "all"}))
    assert "certificate_name must be 1 to 127 letters" in str(_refused("azure-kv", {"certificate_name": "a b"}))
    assert "tags.owner must be a valid string" in str(_refused("azure-kv", {"certificate_name": "w",
                                                                             "tags": {"owner": 7}}))
    assert "path must be an absolute path to a file" in str(_refused("trust-bundle", {"path": "ca.pem"}))
    assert "mode must not let group or others write the file" in str(
        _refused("trust-bundle", {"path": "/ca.pem", "mode": "0664"}))
    assert "owner must be a user or group name" in str(
        _refused("trust-bundle", {"path": "/ca.pem", "owner": "root; rm -rf /"}))


def test_verify_trust_holds_ca_certificates_only_and_no_error_echoes_it() -> None:
    ca = make_ca("Kinds Trust CA")
    pem = ca.certificate.public_bytes(serialization.Encoding.PEM).decode()
    nginx = validate_settings("ssh-nginx", {**NGINX, "trust_pem": pem})  # trust_pem: another name for it
    assert isinstance(nginx, NginxSettings) and nginx.trust() == (ca.certificate,)
    assert "trust_pem" in valid_keys("ssh-nginx") and "verify_trust" in valid_keys("ssh-nginx")
    secret = key_pem(ca.key).decode()
    with_key = _refused("ssh-nginx", {**NGINX, "verify_trust": pem + secret})
    assert "verify_trust holds a private key" in str(with_key) and "PRIVATE KEY" not in str(with_key)
    garbage = _refused("ssh-nginx", {**NGINX, "verify_trust": "-----BEGIN CERTIFICATE-----\nAAAA\n"})
    assert "verify_trust is not PEM text" in str(garbage) and "AAAA" not in str(garbage)
    both = _refused("ssh-nginx", {**NGINX, "verify_trust": pem, "trust_pem": pem})
    assert "give verify_trust or trust_pem" in str(both)


def test_merged_settings_override_key_by_key_and_under_either_name() -> None:
    ca = make_ca("Merge CA")
    pem = ca.certificate.public_bytes(serialization.Encoding.PEM).decode()
    base = validate_settings("ssh-nginx", {**NGINX, "verify_trust": pem, "verify_port": 8443})
    merged = merged_settings("ssh-nginx", base, {"verify_port": 9443, "trust_pem": None})
    assert isinstance(merged, NginxSettings)
    assert (merged.verify_port, merged.verify_trust, merged.certificate_path) == (9443, None, NGINX["certificate_path"])
    assert "unknown ssh-nginx setting(s) colour" in str(pytest.raises(TargetSettingsError, merged_settings,
                                                                      "ssh-nginx", base, {"colour": 1}).value)


def test_errors_pickle_with_their_data_and_redact_shows_them() -> None:
    error = _refused("azure-kv", {"vault": "x"})
    again = pickle.loads(pickle.dumps(error))
    assert (again.kind, again.unknown, again.missing, again.target, str(again)) == (
        error.kind, ("vault",), ("certificate_name",), "t1", str(error))
    assert isinstance(again, PermanentDeployError) and redact(again) == str(error)
    with pytest.raises(UnknownTargetKindError) as unknown:
        validate_settings("ftp", {})
    assert unknown.value.valid == tuple(k.value for k in TargetKind)
    assert str(pickle.loads(pickle.dumps(unknown.value))) == "unknown target kind 'ftp'; one of " + ", ".join(
        unknown.value.valid)


def _ssh_block() -> SshHostBlock:
    return SshHostBlock(address="127.0.0.1", user="deploy", private_key="not used", known_hosts="not used")


def test_the_registry_refuses_a_connection_that_cannot_reach_the_kind() -> None:
    aws = AwsAccountBlock(account_alias="lab", regions=["eu-west-1"])
    with pytest.raises(PermanentDeployError, match="web1: an AWS account deploys kinds aws-acm, aws-elbv2, "
                                                   "aws-iam-elbv2, not 'ssh-nginx'"):
        build_deployer(aws, "web1", "ssh-nginx", NGINX)
    with pytest.raises(TargetSettingsError, match="web1: ssh-nginx needs the setting.s. key_path"):
        build_deployer(_ssh_block(), "web1", "ssh-nginx", {"certificate_path": "/a"})


def test_the_deployment_target_form_derives_from_the_models() -> None:
    schema = DeploymentTargetBlock.model_json_schema()
    definitions = schema["definitions"]
    assert set(schema["required"]) == {"kind", "connection", "settings"}  # never all defaults (a 409 in Prefect)
    assert schema["properties"]["kind"]["$ref"].endswith("/TargetKind")
    assert definitions["TargetKind"]["enum"] == [k.value for k in TargetKind]  # a select in the form
    options = [ref["$ref"].rsplit("/", 1)[-1] for ref in schema["properties"]["settings"]["anyOf"]]
    assert sorted(options) == sorted({model.__name__ for model in SETTINGS.values()})
    nginx = definitions["NginxSettings"]
    assert set(nginx["required"]) == {"certificate_path", "key_path"}
    assert NginxSettings.model_json_schema()["additionalProperties"] is False  # Prefect drops it from block schemas
    assert nginx["properties"]["verify_port"]["default"] == 443 and nginx["properties"]["key_path"]["description"]
    assert nginx["title"] == "ssh-nginx settings"
    assert definitions["HaproxySettings"]["properties"]["runtime_client"]["enum"] == ["auto", "socat", "python3"]
    block_schema = DeploymentTargetBlock._to_block_schema(block_type_id=uuid.uuid4())
    assert {"kind", "connection", "settings"} <= set(block_schema.fields["properties"])


def test_the_deployment_target_block_validates_settings_by_its_kind() -> None:
    block = DeploymentTargetBlock(kind="ssh-haproxy", connection=_ssh_block(),
                                  settings={"pem_path": "/p.pem", "runtime_socket": "/s"})
    assert isinstance(block.settings, HaproxySettings)
    with pytest.raises(ValidationError, match="ssh-nginx needs the setting.s. certificate_path, key_path"):
        DeploymentTargetBlock(kind="ssh-nginx", connection=_ssh_block(),
                              settings={"pem_path": "/p.pem", "runtime_socket": "/s"})  # haproxy's, not nginx's
    with pytest.raises(ValidationError, match=r"kind aws-acm goes through an AWS account \(AwsAccountBlock\), not a SshHostBlock"):
        DeploymentTargetBlock(kind="aws-acm", connection=_ssh_block(), settings={"region": "eu-west-1"})
    with pytest.raises(ValidationError, match="kind ssh-nginx takes NginxSettings, not HaproxySettings"):
        DeploymentTargetBlock(kind="ssh-nginx", connection=_ssh_block(), settings=block.settings)
