"""A symbolic link at a path certpilot writes or backs up is not followed. Whoever can write the
directory could otherwise point key_path (or the certificate, the PEM, a backup) at any file the SSH
user can read and have its contents copied into a ``.certpilot-previous`` backup, or into the served
files by a restore. Such a deploy is refused before anything is written, naming the path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from certpilot.deployment import PermanentDeployError
from connectors.ssh import RemotePathError, SshConnection
from connectors.ssh_deploy import BACKUP_SUFFIX, HaproxyDeployer, NginxDeployer
from lab.sshd import SshServer
from tests.integration.ssh.conftest import Pki

SECRET = b"-----BEGIN SECRET-----\nnot certpilot's to copy\n-----END SECRET-----\n"


def _secret(sshd: SshServer, name: str) -> Path:
    """A file of the test's (root's, when root), which the SSH user can read but must never copy."""
    directory = Path(sshd.home) / f"{name}-elsewhere"
    directory.mkdir()
    secret = directory / "secret.txt"
    secret.write_bytes(SECRET)
    secret.chmod(0o644)
    return secret


def _directory(sshd: SshServer, name: str, files: dict[str, bytes]) -> Path:
    directory = Path(sshd.home) / name
    directory.mkdir()
    for filename, data in files.items():
        (directory / filename).write_bytes(data)
    for path in (directory, *directory.iterdir()):
        sshd.chown(path)
    return directory


def _deploy_error(target: NginxDeployer | HaproxyDeployer, pki: Pki) -> Exception | None:
    """What deploy raised (None: it went through), to look at the files first."""
    try:
        target.deploy(pki.bundle("link.test"))
    except Exception as exc:  # noqa: BLE001 - checked by the caller
        return exc
    return None


def _holding_the_secret(directory: Path) -> list[str]:
    """Regular files (not links) in ``directory`` that hold the secret's bytes."""
    return [p.name for p in directory.iterdir() if not p.is_symlink() and SECRET in p.read_bytes()]


@pytest.mark.parametrize("linked", ["privkey.pem", "fullchain.pem"])
def test_nginx_refuses_a_symlink_at_its_paths_and_copies_nothing(sshd: SshServer, ssh: SshConnection, pki: Pki,
                                                                 linked: str) -> None:
    cert, key = pki.pair("link.test")
    directory = _directory(sshd, f"link-nginx-{linked}", {"fullchain.pem": cert, "privkey.pem": key})
    secret = _secret(sshd, f"link-nginx-{linked}")
    (directory / linked).unlink()
    (directory / linked).symlink_to(secret)
    target = NginxDeployer("web-link", ssh, {"certificate_path": str(directory / "fullchain.pem"),
                                             "key_path": str(directory / "privkey.pem"), "test_command": "true",
                                             "reload_command": "true"})

    failure = _deploy_error(target, pki)

    assert _holding_the_secret(directory) == []
    assert not (directory / (linked + BACKUP_SUFFIX)).exists()
    assert isinstance(failure, RemotePathError) and isinstance(failure, PermanentDeployError)
    assert str(failure).startswith(f"web-link: ssh {ssh.where}: {directory / linked}: ")
    assert "symbolic link" in str(failure)
    assert os.readlink(directory / linked) == str(secret) and secret.read_bytes() == SECRET  # left as it was


def test_haproxy_refuses_a_symlink_at_pem_path_and_copies_nothing(sshd: SshServer, ssh: SshConnection,
                                                                  pki: Pki) -> None:
    directory = _directory(sshd, "link-haproxy", {})
    secret = _secret(sshd, "link-haproxy")
    (directory / "lb.pem").symlink_to(secret)
    target = HaproxyDeployer("lb-link", ssh, {"pem_path": str(directory / "lb.pem"), "reload_command": "true"})

    failure = _deploy_error(target, pki)

    assert _holding_the_secret(directory) == []
    assert sorted(p.name for p in directory.iterdir()) == ["lb.pem"]
    assert isinstance(failure, RemotePathError) and "symbolic link" in str(failure)
    assert os.readlink(directory / "lb.pem") == str(secret)


def test_a_backup_that_is_a_symlink_is_not_restored_through(sshd: SshServer, ssh: SshConnection, pki: Pki) -> None:
    cert, key = pki.pair("link.test")
    directory = _directory(sshd, "link-rollback", {"lb.pem": cert + key})
    target = HaproxyDeployer("lb-link", ssh, {"pem_path": str(directory / "lb.pem"), "reload_command": "true"})
    receipt = target.deploy(pki.bundle("link.test"))
    backup = directory / ("lb.pem" + BACKUP_SUFFIX)
    backup.unlink()
    backup.symlink_to(_secret(sshd, "link-rollback"))

    with pytest.raises(PermanentDeployError):
        target.rollback(receipt)
    with pytest.raises(RemotePathError, match="symbolic link"):
        ssh.copy(str(backup), str(directory / "copy.pem"))

    assert _holding_the_secret(directory) == []
