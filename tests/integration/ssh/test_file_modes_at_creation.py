"""A private key's file must never exist, not even empty, with a mode another local user could open it
by: an open descriptor outlives a later chmod. So the mode a temporary upload has at the instant the
server creates it is observed here, on the real file (the sshd runs on this machine): the test's SFTP
client is the real one, which stats the file the moment the server answers the request that created
it, before the client can send anything else (a chmod, a write)."""

from __future__ import annotations

import os
import stat

import paramiko
import pytest
from paramiko.sftp import CMD_OPEN, SFTP_FLAG_CREATE

from connectors.ssh import TEMP_MARKER, SshConnection
from connectors.ssh_deploy import BACKUP_SUFFIX, HaproxyDeployer, NginxDeployer
from lab.sshd import SshServer
from tests.integration.ssh.conftest import Pki, connect


class _CreationWatch(paramiko.SFTPClient):
    """The real SFTP client; records the server-side mode of each file an open request created, as
    os.stat sees it when the server's answer arrives."""

    created: list[tuple[str, int]]

    def _request(self, t: int, *args: object) -> object:
        answer = super()._request(t, *args)
        if t == CMD_OPEN and int(args[1]) & SFTP_FLAG_CREATE:  # type: ignore[call-overload]
            path = args[0].decode() if isinstance(args[0], bytes) else str(args[0])
            self.created.append((path, stat.S_IMODE(os.stat(path).st_mode)))
        return answer


class WatchedConnection(SshConnection):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.created: list[tuple[str, int]] = []

    def sftp(self) -> paramiko.SFTPClient:
        client = super().sftp()
        if not isinstance(client, _CreationWatch):
            client.__class__ = _CreationWatch
            client.created = self.created  # type: ignore[attr-defined]
        return client


def _final_name(path: str) -> str:
    """``.privkey.pem.certpilot-tmp-1a2b3c4d`` -> ``privkey.pem``"""
    name = os.path.basename(path)
    assert TEMP_MARKER in name and name.startswith("."), f"{path} was created under its final name"
    return name[1:].split(TEMP_MARKER)[0]


def _site(sshd: SshServer, name: str, files: dict[str, bytes]) -> str:
    directory = sshd.home / name
    directory.mkdir()
    for filename, data in files.items():
        (directory / filename).write_bytes(data)
    for path in (directory, *directory.iterdir()):
        sshd.chown(path)
    return str(directory)


def test_keys_and_their_backups_are_created_0600_before_the_first_byte(sshd: SshServer, pki: Pki) -> None:
    old_cert, old_key = pki.pair("modes.test")
    web_dir = _site(sshd, "modes-nginx", {"fullchain.pem": old_cert, "privkey.pem": old_key})
    lb_dir = _site(sshd, "modes-haproxy", {"lb.pem": old_cert + old_key})
    with connect(sshd, WatchedConnection) as ssh:
        assert isinstance(ssh, WatchedConnection)
        NginxDeployer("web-modes", ssh, {"certificate_path": f"{web_dir}/fullchain.pem",
                                         "key_path": f"{web_dir}/privkey.pem", "test_command": "true",
                                         "reload_command": "true"}).deploy(pki.bundle("modes.test"))
        HaproxyDeployer("lb-modes", ssh, {"pem_path": f"{lb_dir}/lb.pem",
                                          "reload_command": "true"}).deploy(pki.bundle("modes.test"))
        created = [(_final_name(path), mode) for path, mode in ssh.created]

    secret = {"privkey.pem", "privkey.pem" + BACKUP_SUFFIX, "lb.pem", "lb.pem" + BACKUP_SUFFIX}
    assert secret <= {name for name, _ in created}  # every key-bearing file was seen being created
    assert [(name, oct(mode)) for name, mode in created if name in secret and mode != 0o600] == []
    # the certificate and its backup are public, and were created with their final mode straight away
    assert {name: oct(mode) for name, mode in created if name not in secret} == {
        "fullchain.pem": "0o644", "fullchain.pem" + BACKUP_SUFFIX: "0o644"}


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o644])
def test_atomic_write_creates_the_file_with_its_final_mode(sshd: SshServer, mode: int) -> None:
    directory = _site(sshd, f"modes-{mode:o}", {})
    with connect(sshd, WatchedConnection) as ssh:
        assert isinstance(ssh, WatchedConnection)
        ssh.atomic_write(f"{directory}/file.pem", b"x" * 100_000, mode)
        assert [(_final_name(path), oct(m)) for path, m in ssh.created] == [("file.pem", oct(mode))]
    assert stat.S_IMODE(os.stat(f"{directory}/file.pem").st_mode) == mode
