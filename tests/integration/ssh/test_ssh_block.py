"""The SSH host block: Prefect's block standard suite, secrets masked, and its factories building a
source and deployers that work against the real sshd and nginx (no Prefect server: nothing is saved)."""

from __future__ import annotations

import pytest
from prefect.blocks.core import Block
from prefect.testing.standard_test_suites import BlockStandardTestSuite
from pydantic import SecretStr

from blocks.ssh import SshHostBlock
from blocks.targets import build_deployer
from certpilot.deployment import Deployer, PermanentDeployError
from certpilot.discovery import Found, Source
from connectors.ssh_deploy import HaproxyDeployer, NginxDeployer
from connectors.ssh_source import SshSource
from lab.nginx import NginxInstance
from lab.sshd import SshServer
from tests.integration.ssh.conftest import Pki, served_steadily


class TestSshHostBlockStandard(BlockStandardTestSuite):
    @pytest.fixture
    def block(self) -> type[Block]:
        return SshHostBlock

    @pytest.mark.skip(reason="certpilot's blocks carry no logo; the suite's check would fetch one over the network")
    def test_has_a_valid_image(self, block: type[Block]) -> None:
        super().test_has_a_valid_image(block)


def make_block(sshd: SshServer, **kwargs: object) -> SshHostBlock:
    return SshHostBlock(address=sshd.host, port=sshd.port, user=sshd.user,
                        private_key=SecretStr(sshd.client_private_key), known_hosts=sshd.known_hosts_line,
                        connect_timeout=5.0, command_timeout=20.0, **kwargs)  # type: ignore[arg-type]


def test_secrets_are_masked(sshd: SshServer) -> None:
    block = make_block(sshd, pkcs12_passwords=[SecretStr("p12-password")])
    shown = repr(block) + str(block.model_dump())
    assert "p12-password" not in shown and "OPENSSH PRIVATE KEY" not in shown
    schema = SshHostBlock._to_block_schema()
    assert {"private_key", "private_key_passphrase", "pkcs12_passwords"} <= set(schema.fields["secret_fields"])


def test_the_block_deploys_through_one_shared_connection(sshd: SshServer, nginx: NginxInstance, pki: Pki) -> None:
    block = make_block(sshd)
    settings = {**nginx.deploy_settings("block.test"), "trust_pem": pki.trust_pem}  # as the flows name it
    deployer = build_deployer(block, "web-block", "ssh-nginx", settings)
    other = build_deployer(block, "lb-block", "ssh-haproxy", {"pem_path": "/nonexistent/x.pem", "runtime_socket": "/s"})
    assert isinstance(deployer, NginxDeployer) and isinstance(deployer, Deployer)
    assert isinstance(other, HaproxyDeployer)
    assert deployer.ssh is other.ssh  # many targets of one host: one SSH login
    bundle = pki.bundle("block.test")
    receipt = deployer.deploy(bundle)
    assert "complete to a trust anchor" in deployer.verify(bundle.fingerprint).detail
    assert served_steadily(nginx.site("block.test").port, "block.test") == {bundle.fingerprint}
    deployer.rollback(receipt)
    assert receipt.previous_fingerprint is not None
    deployer.verify(receipt.previous_fingerprint)
    with pytest.raises(PermanentDeployError,
                       match="an SSH host deploys kinds ssh-haproxy, ssh-nginx, trust-bundle, not 'aws-acm'"):
        build_deployer(block, "x", "aws-acm", {})
    block.connection().close()


def test_the_block_builds_its_source(sshd: SshServer, nginx: NginxInstance) -> None:
    block = make_block(sshd, alias="lab-host", discovery_globs=[f"{nginx.prefix}/sites/block.test/*.pem"],
                       pkcs12_passwords=SecretStr("one"))
    source = block.source()
    assert isinstance(source, SshSource) and isinstance(source, Source)
    assert source.name == "ssh:lab-host"
    items = list(source.discover())
    assert [type(i) for i in items] == [Found]
    assert items[0].details["key_path"] == str(nginx.site("block.test").key_path)
    assert items[0].key is None
    block.connection().close()
