"""Deploying to a real nginx over a real SSH connection: the certificate on the wire, the files and
their modes on the host, the previous pair kept and restored, and every fault ending with the old
certificate still served, nothing half-written and a precise error."""

from __future__ import annotations

import dataclasses
import os
import stat
from pathlib import Path

import paramiko
import pytest
from cryptography.hazmat.primitives import serialization

from certpilot.deployment import DeployBundle, DeployError, PermanentDeployError, Receipt
from certpilot.errors import KeyMismatchError
from certpilot.formats import load_bundle
from connectors.ssh import SshConnection, SshHostKeyError, is_temporary
from connectors.ssh_deploy import BACKUP_SUFFIX, RETIRED_SUFFIX, NginxDeployer
from connectors.tls_verify import fetch_chain
from lab.nginx import NginxInstance
from lab.sshd import SshServer, generate_client_key, openssh_public_line
from tests.integration.ssh.conftest import Pki, connect, served, served_steadily


def deployer(nginx: NginxInstance, ssh: SshConnection, pki: Pki, site: str) -> NginxDeployer:
    return NginxDeployer(f"web-{site}", ssh, {**nginx.deploy_settings(site), "verify_trust": pki.trust_pem})


def snapshot(nginx: NginxInstance, site: str) -> dict[str, tuple[bytes, int]]:
    """Every file in the site's directory: its bytes and its mode."""
    directory = nginx.site(site).certificate_path.parent
    return {p.name: (p.read_bytes(), stat.S_IMODE(p.stat().st_mode)) for p in sorted(directory.iterdir())}


def final_files(nginx: NginxInstance, site: str) -> dict[str, tuple[bytes, int]]:
    return {name: value for name, value in snapshot(nginx, site).items() if not is_temporary(name)}


def public_key_der(pem_bytes: bytes) -> bytes:
    bundle = load_bundle(pem_bytes)
    key = bundle.private_keys[0].public_key() if bundle.private_keys else bundle.certificates[0].public_key()
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_deploy_serves_the_new_certificate_keeps_the_previous_pair_and_rolls_back(
        nginx: NginxInstance, ssh: SshConnection, pki: Pki, sshd: SshServer) -> None:
    site = nginx.site("deploy.test")
    target = deployer(nginx, ssh, pki, "deploy.test")
    before = target.current()
    assert before is not None and served(site.port, site.name) == before
    old_pair = final_files(nginx, "deploy.test")
    bundle = pki.bundle("deploy.test")

    receipt = target.deploy(bundle)
    verification = target.verify(bundle.fingerprint)

    assert verification.method == "tls" and verification.fingerprint == bundle.fingerprint
    presented = fetch_chain("127.0.0.1", site.port, sni=site.name)
    assert presented.chain == (bundle.certificate.public_bytes(serialization.Encoding.DER),
                               pki.issuing.certificate.public_bytes(serialization.Encoding.DER))
    assert target.current() == bundle.fingerprint
    key_stat = site.key_path.stat()
    assert stat.S_IMODE(key_stat.st_mode) == 0o600 and key_stat.st_uid == sshd.uid
    assert stat.S_IMODE(site.certificate_path.stat().st_mode) == 0o644
    assert public_key_der(site.key_path.read_bytes()) == public_key_der(bundle.certificate_pem())
    # the previous pair, byte for byte, key still 0600
    files = final_files(nginx, "deploy.test")
    assert files["fullchain.pem" + BACKUP_SUFFIX] == old_pair["fullchain.pem"]
    assert files["privkey.pem" + BACKUP_SUFFIX] == (old_pair["privkey.pem"][0], 0o600)
    assert receipt.previous_fingerprint == before and receipt.fingerprint == bundle.fingerprint
    assert receipt.undo["certificate_backup"] == f"{site.certificate_path}{BACKUP_SUFFIX}"
    assert Receipt.from_dict(receipt.as_dict()) == receipt
    assert not [name for name in snapshot(nginx, "deploy.test") if is_temporary(name)]

    target.rollback(receipt)

    assert target.verify(before).fingerprint == before
    assert served_steadily(site.port, site.name) == {before}
    assert target.current() == before
    assert final_files(nginx, "deploy.test")["privkey.pem"] == old_pair["privkey.pem"]
    assert final_files(nginx, "deploy.test")["fullchain.pem"] == old_pair["fullchain.pem"]


def test_only_the_latest_receipt_can_be_rolled_back(nginx: NginxInstance, ssh: SshConnection, pki: Pki) -> None:
    target = deployer(nginx, ssh, pki, "stale.test")
    first = target.deploy(pki.bundle("stale.test"))
    second_bundle = pki.bundle("stale.test")
    second = target.deploy(second_bundle)
    assert second.previous_fingerprint == first.fingerprint

    with pytest.raises(PermanentDeployError, match="a later deploy replaced the backup") as failure:
        target.rollback(first)
    assert "web-stale.test" in str(failure.value)
    assert target.current() == second_bundle.fingerprint  # nothing changed
    target.rollback(second)
    assert target.verify(first.fingerprint).fingerprint == first.fingerprint


def test_a_broken_nginx_configuration_fails_the_deploy_and_restores_the_pair(
        nginx: NginxInstance, ssh: SshConnection, pki: Pki) -> None:
    site = nginx.site("broken.test")
    target = deployer(nginx, ssh, pki, "broken.test")
    before, files_before = served(site.port, site.name), final_files(nginx, "broken.test")
    nginx.write_config(extra_http="    certpilot_bogus_directive on;\n")
    try:
        with pytest.raises(PermanentDeployError) as failure:
            target.deploy(pki.bundle("broken.test"))
    finally:
        nginx.write_config()
    message = str(failure.value)
    assert "web-broken.test: the configuration test failed" in message
    assert 'unknown directive "certpilot_bogus_directive"' in message
    assert "previous certificate and key were restored" in message
    after = final_files(nginx, "broken.test")
    assert after["fullchain.pem"] == files_before["fullchain.pem"]
    assert after["privkey.pem"] == files_before["privkey.pem"]  # same bytes, still 0600
    assert not [name for name in snapshot(nginx, "broken.test") if is_temporary(name)]
    assert served_steadily(site.port, site.name) == {before}
    assert target.current() == before


class DroppingConnection(SshConnection):
    """Closes the SSH transport after ``after`` bytes of the upload for ``path``, as a network cut would."""

    def __init__(self, *args: object, path: str, after: int, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.drop_path, self.drop_after, self.dropped = path, after, False

    def _write_chunks(self, file: paramiko.SFTPFile, data: bytes, path: str) -> None:
        if path != self.drop_path:
            return super()._write_chunks(file, data, path)
        file.write(data[: self.drop_after])
        file.flush()
        self.dropped = True
        transport = self._connection
        assert transport is not None
        transport.close()
        file.write(data[self.drop_after:])
        file.flush()


@pytest.mark.parametrize("which", ["key", "certificate"])
def test_a_connection_dropped_mid_upload_changes_nothing(
        nginx: NginxInstance, sshd: SshServer, pki: Pki, which: str) -> None:
    name = f"drop-{'key' if which == 'key' else 'cert'}.test"
    site = nginx.site(name)
    path = str(site.key_path if which == "key" else site.certificate_path)
    before, files_before = served(site.port, site.name), final_files(nginx, name)
    dropping = connect(sshd, DroppingConnection, path=path, after=100)
    target = NginxDeployer(f"web-{name}", dropping, nginx.deploy_settings(name))
    try:
        with pytest.raises(DeployError) as failure:
            target.deploy(pki.bundle(name))
    finally:
        dropping.close()
    assert dropping.dropped
    assert not isinstance(failure.value, PermanentDeployError)  # transient: worth a retry
    message = str(failure.value)
    assert message.startswith(f"web-{name}: ssh {sshd.user}@127.0.0.1:{sshd.port}: {path}: upload interrupted")
    after = final_files(nginx, name)
    assert after["fullchain.pem"] == files_before["fullchain.pem"]
    assert after["privkey.pem"] == files_before["privkey.pem"]
    leftovers = [n for n in snapshot(nginx, name) if is_temporary(n)]
    assert all(n.startswith(".") for n in leftovers)  # hidden, and skipped by discovery
    assert served_steadily(site.port, site.name) == {before}

    # the retry, on a new connection, deploys and clears what the cut left behind
    with connect(sshd) as fresh:
        retry = NginxDeployer(f"web-{name}", fresh, {**nginx.deploy_settings(name), "verify_trust": pki.trust_pem})
        bundle = pki.bundle(name)
        retry.deploy(bundle)
        retry.verify(bundle.fingerprint)
    assert not [n for n in snapshot(nginx, name) if is_temporary(n)]


def _auth_lines(sshd: SshServer) -> int:
    text = sshd.log_path.read_text(errors="replace")
    return sum(text.count(marker) for marker in ("Accepted publickey", "Failed publickey",
                                                 "Connection closed by authenticating user"))


@pytest.mark.parametrize("case", ["changed", "unknown"])
def test_an_unknown_or_changed_host_key_is_refused_before_anything_is_sent(
        nginx: NginxInstance, sshd: SshServer, pki: Pki, case: str) -> None:
    site = nginx.site("hostkey.test")
    other = openssh_public_line(generate_client_key("ed25519"))
    known_hosts = (f"[127.0.0.1]:{sshd.port} {other}" if case == "changed"
                   else f"[127.0.0.1]:{sshd.port + 1} {sshd.host_public_key_line}\nother.example {other}")
    before, files_before = served(site.port, site.name), final_files(nginx, "hostkey.test")
    auth_before = _auth_lines(sshd)
    connection = SshConnection("127.0.0.1", sshd.port, sshd.user, sshd.client_private_key, known_hosts,
                               connect_timeout=5.0)
    target = NginxDeployer("web-hostkey.test", connection, nginx.deploy_settings("hostkey.test"))

    with pytest.raises(SshHostKeyError) as failure:
        target.deploy(pki.bundle("hostkey.test"))

    assert isinstance(failure.value, PermanentDeployError)
    message = str(failure.value)
    assert message.startswith(f"web-hostkey.test: ssh {sshd.user}@127.0.0.1:{sshd.port}: host key refused: ")
    assert "SHA256:" in message
    assert ("host key changed" if case == "changed" else "unknown host") in message
    assert _auth_lines(sshd) == auth_before  # the client key was never offered
    assert final_files(nginx, "hostkey.test") == files_before
    assert served_steadily(site.port, site.name) == {before}


def test_a_read_only_directory_is_a_permanent_error_naming_the_path(
        nginx: NginxInstance, ssh: SshConnection, pki: Pki, sshd: SshServer) -> None:
    site = nginx.site("readonly.test")
    directory = site.certificate_path.parent
    assert directory.stat().st_uid == sshd.uid and sshd.uid != 0  # root would ignore the mode
    target = deployer(nginx, ssh, pki, "readonly.test")
    before, files_before = served(site.port, site.name), final_files(nginx, "readonly.test")
    os.chmod(directory, 0o555)
    try:
        with pytest.raises(PermanentDeployError) as failure:
            target.deploy(pki.bundle("readonly.test"))
    finally:
        os.chmod(directory, 0o755)
    message = str(failure.value)
    assert message.startswith("web-readonly.test: ") and str(directory) in message
    assert f"permission denied for user {sshd.user!r}" in message
    assert final_files(nginx, "readonly.test") == files_before
    assert not [n for n in snapshot(nginx, "readonly.test") if is_temporary(n)]
    assert served_steadily(site.port, site.name) == {before}


def test_a_key_that_does_not_match_is_refused_before_anything_is_written(
        nginx: NginxInstance, ssh: SshConnection, pki: Pki) -> None:
    target = deployer(nginx, ssh, pki, "mismatch.test")
    files_before = final_files(nginx, "mismatch.test")
    cert, _ = pki.leaf("mismatch.test")
    _, other_key = pki.leaf("mismatch.test")
    with pytest.raises(KeyMismatchError, match="matches none of the certificates"):  # checked as the bundle is built
        target.deploy(DeployBundle.from_key("mismatch.test", cert, [pki.issuing.certificate], other_key))
    after = final_files(nginx, "mismatch.test")
    assert after["fullchain.pem"] == files_before["fullchain.pem"]
    assert after["privkey.pem"] == files_before["privkey.pem"]


def test_settings_are_checked(ssh: SshConnection) -> None:
    with pytest.raises(PermanentDeployError, match="needs the setting"):
        NginxDeployer("web-x", ssh, {"certificate_path": "/tmp/x.pem"})
    with pytest.raises(PermanentDeployError, match="unknown ssh-nginx setting.*certifcate_path"):
        NginxDeployer("web-x", ssh, {"certificate_path": "/a", "key_path": "/b", "certifcate_path": "/c"})


def test_remove_moves_the_pair_aside_restore_puts_it_back_purge_deletes_it(
        sshd: SshServer, ssh: SshConnection, pki: Pki) -> None:
    directory = sshd.home / "remove-site"
    directory.mkdir()
    sshd.chown(directory)
    cert_path, key_path = directory / "fullchain.pem", directory / "privkey.pem"
    settings = {"certificate_path": str(cert_path), "key_path": str(key_path), "test_command": "true",
                "reload_command": "true"}
    target = NginxDeployer("web-remove", ssh, settings)
    first = target.deploy(pki.bundle("remove.test"))  # no previous pair: nothing to roll back to
    assert first.previous_fingerprint is None and not first.undo["had_previous"]
    with pytest.raises(PermanentDeployError, match="nothing to roll back to"):
        target.rollback(first)
    second = target.deploy(pki.bundle("remove.test"))
    key_bytes = key_path.read_bytes()
    removal = target.remove()
    assert removal.fingerprint == second.fingerprint
    assert sorted(p.name for p in directory.iterdir()) == sorted([
        "fullchain.pem" + BACKUP_SUFFIX, "privkey.pem" + BACKUP_SUFFIX,
        "fullchain.pem" + RETIRED_SUFFIX, "privkey.pem" + RETIRED_SUFFIX])
    retired_key = directory / ("privkey.pem" + RETIRED_SUFFIX)
    assert retired_key.read_bytes() == key_bytes and stat.S_IMODE(retired_key.stat().st_mode) == 0o600
    assert target.current() is None
    assert "nginx was not reloaded" in removal.note and removal.served is False  # nothing listens on :443 here
    assert target.remove().undo == removal.undo  # again: the same files, already aside

    assert "2 file(s) moved back" in target.restore(removal)
    assert target.current() == second.fingerprint and key_path.read_bytes() == key_bytes
    assert not any(p.name.endswith(RETIRED_SUFFIX) for p in directory.iterdir())
    with pytest.raises(PermanentDeployError, match="neither .* nor its retired copy"):
        target.restore(dataclasses.replace(removal, undo={"files": {str(cert_path) + ".x": str(cert_path) + ".y"}}))

    removal = target.remove()
    target.purge(removal)
    assert sorted(p.name for p in directory.iterdir()) == ["fullchain.pem" + BACKUP_SUFFIX,
                                                           "privkey.pem" + BACKUP_SUFFIX]
    with pytest.raises(PermanentDeployError, match="nothing to restore"):
        target.restore(removal)
    NginxDeployer("web-remove", ssh, {**settings, "remove_previous": True}).purge(removal)
    assert list(directory.iterdir()) == []


def test_the_deployer_reports_when_the_host_is_down(nginx: NginxInstance, sshd: SshServer, pki: Pki,
                                                    tmp_path: Path) -> None:
    from lab.sshd import free_port

    connection = SshConnection("127.0.0.1", free_port(), sshd.user, sshd.client_private_key, sshd.known_hosts_line,
                               connect_timeout=2.0)
    target = NginxDeployer("web-down", connection, nginx.deploy_settings("deploy.test"))
    with pytest.raises(DeployError, match="cannot connect") as failure:
        target.current()
    assert not isinstance(failure.value, PermanentDeployError)
