"""Deploying to a real haproxy over SSH: the runtime API swaps the certificate in memory (the process
serving traffic is the same before and after), the combined PEM file is written 0600, and rollback
serves the previous certificate again; a certificate haproxy refuses is aborted and nothing stays."""

from __future__ import annotations

import stat

import pytest

from certpilot.deployment import PermanentDeployError
from certpilot.formats import load_bundle
from certpilot.x509info import fingerprint_sha256
from connectors.ssh import SshConnection
from connectors.ssh_deploy import BACKUP_SUFFIX, RETIRED_SUFFIX, HaproxyDeployer
from lab.haproxy import HaproxyInstance
from lab.sshd import SshServer
from tests.integration.ssh.conftest import Pki, served, served_steadily


@pytest.mark.parametrize("client", ["auto", "python3"])  # auto finds socat on this host
def test_runtime_api_swap_without_reload_and_rollback(haproxy: HaproxyInstance, ssh: SshConnection, pki: Pki,
                                                      client: str) -> None:
    target = HaproxyDeployer("lb-1", ssh, {**haproxy.deploy_settings(), "runtime_client": client,
                                           "verify_trust": pki.trust_pem})
    before = served(haproxy.port, "lb.test")
    assert target.current() == before
    file_before = haproxy.pem_path.read_bytes()
    worker = haproxy.worker_pid()
    bundle = pki.bundle("lb.test")

    receipt = target.deploy(bundle)
    target.verify(bundle.fingerprint)

    assert haproxy.worker_pid() == worker  # swapped in memory: no reload, no new process
    assert served_steadily(haproxy.port, "lb.test") == {bundle.fingerprint}
    written = load_bundle(haproxy.pem_path.read_bytes())
    assert [fingerprint_sha256(c) for c in written.certificates] == [
        bundle.fingerprint, fingerprint_sha256(pki.issuing.certificate)]
    assert len(written.private_keys) == 1
    assert stat.S_IMODE(haproxy.pem_path.stat().st_mode) == 0o600
    backup = haproxy.pem_path.with_name(haproxy.pem_path.name + BACKUP_SUFFIX)
    assert backup.read_bytes() == file_before and stat.S_IMODE(backup.stat().st_mode) == 0o600
    assert receipt.previous_fingerprint == before and receipt.undo["method"] == "runtime-api"
    assert target.current() == bundle.fingerprint

    target.rollback(receipt)

    target.verify(before)
    assert haproxy.worker_pid() == worker
    assert served_steadily(haproxy.port, "lb.test") == {before}
    assert load_bundle(haproxy.pem_path.read_bytes()).certificates == load_bundle(file_before).certificates
    assert stat.S_IMODE(haproxy.pem_path.stat().st_mode) == 0o600
    assert "# transaction" not in haproxy.runtime("show ssl cert")  # no transaction left open


def test_a_certificate_haproxy_does_not_know_is_refused_and_nothing_stays(
        haproxy: HaproxyInstance, ssh: SshConnection, pki: Pki) -> None:
    stray = haproxy.pem_path.with_name("not-in-the-config.pem")
    target = HaproxyDeployer("lb-stray", ssh, {**haproxy.deploy_settings(), "pem_path": str(stray)})
    before = served(haproxy.port, "lb.test")
    with pytest.raises(PermanentDeployError) as failure:
        target.deploy(pki.bundle("lb.test"))
    message = str(failure.value)
    assert message.startswith("lb-stray: the runtime API swap failed") and "the new file was removed" in message
    assert f"set ssl cert {stray}" in message
    assert not stray.exists()
    assert served_steadily(haproxy.port, "lb.test") == {before}
    assert "# transaction" not in haproxy.runtime("show ssl cert")  # the transaction was aborted


def test_settings_are_checked(ssh: SshConnection) -> None:
    with pytest.raises(PermanentDeployError, match="needs runtime_socket or reload_command"):
        HaproxyDeployer("lb-x", ssh, {"pem_path": "/tmp/x.pem"})
    with pytest.raises(PermanentDeployError, match="runtime_client must be"):
        HaproxyDeployer("lb-x", ssh, {"pem_path": "/tmp/x.pem", "runtime_socket": "/s", "runtime_client": "nc"})


def test_without_a_runtime_socket_the_reload_command_is_used(haproxy: HaproxyInstance, ssh: SshConnection,
                                                             pki: Pki) -> None:
    settings = {**haproxy.deploy_settings(), "verify_trust": pki.trust_pem}
    del settings["runtime_socket"]
    target = HaproxyDeployer("lb-reload", ssh, settings)
    before, worker = served(haproxy.port, "lb.test"), haproxy.worker_pid()
    bundle = pki.bundle("lb.test")

    receipt = target.deploy(bundle)
    target.verify(bundle.fingerprint)

    assert receipt.undo["method"] == "reload"
    assert haproxy.worker_pid() != worker  # SIGUSR2: the master started a new worker
    target.rollback(receipt)
    target.verify(before)


def test_remove_moves_the_pem_aside_restore_puts_it_back_purge_deletes_it(
        sshd: SshServer, ssh: SshConnection, pki: Pki) -> None:
    directory = sshd.home / "remove-lb"
    directory.mkdir()
    sshd.chown(directory)
    pem_path = directory / "lb.pem"
    target = HaproxyDeployer("lb-remove", ssh, {"pem_path": str(pem_path), "reload_command": "true"})
    target.deploy(pki.bundle("remove.test"))
    second = target.deploy(pki.bundle("remove.test"))
    removal = target.remove()
    assert removal.fingerprint == second.fingerprint and "haproxy was not reloaded" in removal.note
    assert sorted(p.name for p in directory.iterdir()) == ["lb.pem" + BACKUP_SUFFIX, "lb.pem" + RETIRED_SUFFIX]
    assert stat.S_IMODE((directory / ("lb.pem" + RETIRED_SUFFIX)).stat().st_mode) == 0o600
    assert target.current() is None
    target.restore(removal)
    assert target.current() == second.fingerprint
    target.purge(target.remove())
    assert [p.name for p in directory.iterdir()] == ["lb.pem" + BACKUP_SUFFIX]
