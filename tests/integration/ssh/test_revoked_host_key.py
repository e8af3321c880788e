"""A host key known_hosts marks @revoked is refused right after the key exchange, before the client
key is offered: the sshd's own log (lab.sshd runs it with -e, LogLevel INFO) shows whether that key
was ever accepted."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization

from connectors.ssh import SshConnection, SshHostKeyError, key_sha256, load_client_key
from lab.sshd import SshServer, generate_client_key


def _auth_lines_for(sshd: SshServer, fingerprint: str) -> list[str]:
    """The sshd's log lines about a client key: accepted, failed, or offered ("Postponed")."""
    text = sshd.log_path.read_text(errors="replace")
    return [line for line in text.splitlines() if fingerprint in line]


@pytest.mark.parametrize("listed", [True, False], ids=["also-listed-as-known", "only-revoked"])
def test_a_revoked_host_key_is_refused_before_the_client_key_is_offered(sshd: SshServer, listed: bool) -> None:
    key = generate_client_key("ed25519")  # a key of this test only, to find in the sshd's log
    sshd.authorize(key)
    text = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                             serialization.NoEncryption()).decode()
    fingerprint = key_sha256(load_client_key(text))
    revoked = (f"{sshd.known_hosts_line}\n" if listed else "") + f"@revoked * {sshd.host_public_key_line}\n"

    with pytest.raises(SshHostKeyError, match="@revoked"):
        SshConnection(sshd.host, sshd.port, sshd.user, text, revoked, connect_timeout=5).open()

    assert _auth_lines_for(sshd, fingerprint) == []  # the key was never offered, let alone accepted
    # the same key, with the host key trusted, is accepted and logged: the log does show such lines
    with SshConnection(sshd.host, sshd.port, sshd.user, text, sshd.known_hosts_line, connect_timeout=5) as ssh:
        assert ssh.run("true").status == 0
    assert any("Accepted publickey" in line for line in _auth_lines_for(sshd, fingerprint))
