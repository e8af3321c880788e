"""SshConnection against the real sshd: client keys in every supported form, host keys checked against
known_hosts (hashed names, @revoked), commands with stdin and deadlines, atomic writes, and one
connection reused for many operations."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import stat
import time

import pytest
from cryptography.hazmat.primitives import serialization

from connectors.ssh import (RemoteCommandError, RemotePathError, SshAuthError, SshConnection, SshHostKeyError,
                            SshUnavailableError, trim_output)
from lab.sshd import SshServer, generate_client_key
from tests.integration.ssh.conftest import connect


@pytest.mark.parametrize("kind,form", [("ecdsa", "traditional-pem"), ("rsa", "pkcs8-pem"), ("ecdsa", "openssh"),
                                       ("ed25519", "pkcs8-pem")])
def test_client_keys_in_openssh_and_pem_forms(sshd: SshServer, kind: str, form: str) -> None:
    key = generate_client_key(kind)
    sshd.authorize(key)
    fmt = {"traditional-pem": serialization.PrivateFormat.TraditionalOpenSSL,
           "pkcs8-pem": serialization.PrivateFormat.PKCS8, "openssh": serialization.PrivateFormat.OpenSSH}[form]
    text = key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption()).decode()
    with SshConnection(sshd.host, sshd.port, sshd.user, text, sshd.known_hosts_line, connect_timeout=5) as ssh:
        assert ssh.run("id -un", check=True).stdout.decode().strip() == sshd.user


def test_an_encrypted_client_key_needs_its_passphrase(sshd: SshServer) -> None:
    key = generate_client_key("ecdsa")
    sshd.authorize(key)
    text = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                             serialization.BestAvailableEncryption(b"pass phrase")).decode()
    with pytest.raises(SshAuthError, match="a passphrase is needed"):
        SshConnection(sshd.host, sshd.port, sshd.user, text, sshd.known_hosts_line)
    with SshConnection(sshd.host, sshd.port, sshd.user, text, sshd.known_hosts_line, passphrase="pass phrase") as ssh:
        assert ssh.run("true").status == 0


def test_a_key_the_host_does_not_accept_is_a_permanent_error(sshd: SshServer) -> None:
    stranger = generate_client_key("ed25519").private_bytes(serialization.Encoding.PEM,
                                                            serialization.PrivateFormat.OpenSSH,
                                                            serialization.NoEncryption()).decode()
    with pytest.raises(SshAuthError, match=f"was not accepted for user '{sshd.user}'"):
        SshConnection(sshd.host, sshd.port, sshd.user, stranger, sshd.known_hosts_line, connect_timeout=5).open()


def _hashed(name: str) -> str:
    salt = os.urandom(20)
    digest = hmac.new(salt, name.encode(), hashlib.sha1).digest()
    return f"|1|{base64.b64encode(salt).decode()}|{base64.b64encode(digest).decode()}"


def test_known_hosts_with_hashed_names_and_revoked_keys(sshd: SshServer) -> None:
    hashed = f"# comment\n\n{_hashed(f'[127.0.0.1]:{sshd.port}')} {sshd.host_public_key_line}\n"
    with SshConnection(sshd.host, sshd.port, sshd.user, sshd.client_private_key, hashed) as ssh:
        assert ssh.run("true").status == 0
    revoked = f"{sshd.known_hosts_line}\n@revoked * {sshd.host_public_key_line}\n"
    with pytest.raises(SshHostKeyError, match="@revoked"):
        SshConnection(sshd.host, sshd.port, sshd.user, sshd.client_private_key, revoked).open()
    with pytest.raises(SshHostKeyError, match="known_hosts line 1: unreadable"):
        SshConnection(sshd.host, sshd.port, sshd.user, sshd.client_private_key, "[127.0.0.1]:22 ssh-ed25519 !!!")


def test_commands_stdin_exit_status_and_deadline(ssh: SshConnection) -> None:
    result = ssh.run("cat; echo oops >&2; exit 3", stdin=b"from stdin\n")
    assert (result.status, result.stdout, result.stderr) == (3, b"from stdin\n", b"oops\n")
    with pytest.raises(RemoteCommandError, match=r"`echo no good >&2; exit 4` exited with status 4: no good") as err:
        ssh.run("echo no good >&2; exit 4", check=True)
    assert err.value.status == 4
    started = time.monotonic()
    with pytest.raises(SshUnavailableError, match="did not finish within 0.3 s"):
        ssh.run("sleep 5", timeout=0.3)
    assert time.monotonic() - started < 2
    assert ssh.run("echo still usable").stdout == b"still usable\n"


def test_error_text_never_carries_pem() -> None:
    text = trim_output(b"bad\n-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg\n"
                       b"-----END PRIVATE KEY-----\nafter\n")
    assert text == "bad | [PEM removed] | after"


def test_atomic_write_sets_the_mode_first_and_replaces(ssh: SshConnection, sshd: SshServer) -> None:
    path = sshd.home / "atomic" / "key.pem"
    path.parent.mkdir()
    sshd.chown(path.parent)
    ssh.atomic_write(str(path), b"first\n", 0o600)
    ssh.atomic_write(str(path), b"second\n", 0o600)  # over an existing file: posix_rename
    assert path.read_bytes() == b"second\n" and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.stat().st_uid == sshd.uid
    assert os.listdir(path.parent) == ["key.pem"]
    assert ssh.read_file(str(path)) == b"second\n"
    with pytest.raises(RemotePathError, match="over the limit of 3"):
        ssh.read_file(str(path), max_bytes=3)
    with pytest.raises(RemotePathError, match="no such file"):
        ssh.read_file(str(path.parent / "missing"))
    assert ssh.stat(str(path.parent / "missing")) is None


def test_one_connection_serves_many_operations(sshd: SshServer) -> None:
    directory = sshd.home / "many"
    directory.mkdir()
    sshd.chown(directory)
    logins_before = _logins(sshd)
    with connect(sshd) as ssh:
        for index in range(50):
            ssh.atomic_write(f"{directory}/f{index}.pem", b"x" * 2000, 0o600)
        for index in range(10):
            assert ssh.run(f"test -f {directory}/f{index}.pem").status == 0
    assert len(os.listdir(directory)) == 50
    assert _logins(sshd) == logins_before + 1  # sshd saw one login for 60 operations, not one each


def _logins(sshd: SshServer) -> int:
    return sshd.log_path.read_text(errors="replace").count("Accepted publickey")


def test_a_host_that_does_not_answer_times_out(sshd: SshServer) -> None:
    import socket

    from lab.sshd import free_port

    silent = socket.socket()
    silent.bind(("127.0.0.1", free_port()))
    silent.listen(1)  # accepts, never speaks SSH
    try:
        started = time.monotonic()
        with pytest.raises(SshUnavailableError, match="cannot connect"):
            SshConnection("127.0.0.1", silent.getsockname()[1], sshd.user, sshd.client_private_key,
                          sshd.known_hosts_line, connect_timeout=0.5).open()
        assert time.monotonic() - started < 3
    finally:
        silent.close()
