"""SSH errors are named by their cause and carry its data as attributes, not only as prose: a host that
cannot be reached (name not resolved, connection refused or timed out, no SSH handshake) is a
transient SshUnreachableError with ``host``, ``port`` and ``cause``, also the core's
EndpointUnreachableError; a host key known_hosts does not
vouch for (unknown, changed, revoked) a permanent UntrustedHostKeyError with ``host``, ``port``,
``problem``, ``key_type`` and the offered ``fingerprint``. Both survive pickling (Prefect moves
exceptions between processes) and for_target (deployers prefix their name)."""

from __future__ import annotations

import base64
import hashlib
import pickle
import socket
from collections.abc import Iterator

import pytest

from certpilot.deployment import DeployError, PermanentDeployError
from certpilot.errors import EndpointUnreachableError, TransientError
from connectors.ssh import (SshConnection, SshHostKeyError, SshUnavailableError, SshUnreachableError,
                            UntrustedHostKeyError)
from lab.sshd import SshServer, free_port, generate_client_key, openssh_public_line


def _open(sshd: SshServer, host: str, port: int, known_hosts: str | None = None) -> None:
    SshConnection(host, port, sshd.user, sshd.client_private_key, known_hosts or sshd.known_hosts_line,
                  connect_timeout=0.5).open()


def _survives_pickling_and_naming(error: Exception, *attributes: str) -> None:
    for twin in (pickle.loads(pickle.dumps(error)), error.for_target("web-1")):  # type: ignore[attr-defined]
        assert type(twin) is type(error)
        assert {a: getattr(twin, a) for a in attributes} == {a: getattr(error, a) for a in attributes}
    assert str(pickle.loads(pickle.dumps(error))) == str(error)
    assert str(error.for_target("web-1")) == f"web-1: {error}"  # type: ignore[attr-defined]


def _unreachable(sshd: SshServer, host: str, port: int) -> SshUnreachableError:
    with pytest.raises(SshUnreachableError) as failure:
        _open(sshd, host, port)
    error = failure.value
    assert isinstance(error, SshUnavailableError) and isinstance(error, DeployError)  # transient: retried
    assert not isinstance(error, PermanentDeployError)
    # the core's cause-named error too: code handling unreachable endpoints handles SSH hosts the same way
    assert isinstance(error, EndpointUnreachableError) and isinstance(error, TransientError)
    assert (error.host, error.port) == (host, port)
    assert error.detail == error.reason and "cannot connect" in error.detail
    assert "cannot connect" in str(error) and f"{host}:{port}" in str(error)
    _survives_pickling_and_naming(error, "host", "port", "cause", "detail", "where")
    return error


def test_a_refused_connection(sshd: SshServer) -> None:
    port = free_port()  # nothing listens there
    assert _unreachable(sshd, "127.0.0.1", port).cause == "refused"


def test_a_name_that_does_not_resolve(sshd: SshServer) -> None:
    assert _unreachable(sshd, "certpilot-no-such-host.invalid", 22).cause == "dns"


@pytest.fixture
def full_backlog() -> Iterator[int]:
    """A port whose listen queue is full: the kernel drops new SYNs, so connecting times out."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    queued = socket.create_connection(("127.0.0.1", port), timeout=1)  # fills the queue; never accepted
    try:
        yield port
    finally:
        queued.close()
        listener.close()


def test_a_connection_that_times_out(sshd: SshServer, full_backlog: int) -> None:
    assert _unreachable(sshd, "127.0.0.1", full_backlog).cause == "timeout"


def test_a_server_that_never_speaks_ssh(sshd: SshServer) -> None:
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)  # accepts, never sends a banner
    try:
        assert _unreachable(sshd, "127.0.0.1", silent.getsockname()[1]).cause == "handshake"
    finally:
        silent.close()


def _host_key_fingerprint(sshd: SshServer) -> str:
    blob = base64.b64decode(sshd.host_public_key_line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


@pytest.mark.parametrize("problem", ["unknown", "changed", "revoked"])
def test_a_host_key_known_hosts_does_not_vouch_for(sshd: SshServer, problem: str) -> None:
    other = openssh_public_line(generate_client_key("ed25519"))
    known_hosts = {"unknown": f"other.example {other}",
                   "changed": f"[127.0.0.1]:{sshd.port} {other}",
                   "revoked": f"{sshd.known_hosts_line}\n@revoked * {sshd.host_public_key_line}"}[problem]
    with pytest.raises(UntrustedHostKeyError) as failure:
        _open(sshd, "127.0.0.1", sshd.port, known_hosts)
    error = failure.value
    assert isinstance(error, SshHostKeyError) and isinstance(error, PermanentDeployError)
    assert (error.host, error.port, error.problem) == ("127.0.0.1", sshd.port, problem)
    assert (error.key_type, error.fingerprint) == ("ssh-ed25519", _host_key_fingerprint(sshd))
    assert error.fingerprint in str(error)
    if problem == "changed":
        assert error.expected_fingerprint is not None and error.expected_fingerprint in str(error)
        assert error.expected_fingerprint != error.fingerprint
    else:
        assert error.expected_fingerprint is None
    _survives_pickling_and_naming(error, "host", "port", "problem", "key_type", "fingerprint",
                                  "expected_fingerprint", "where")


def test_an_unreadable_known_hosts_is_still_a_host_key_error(sshd: SshServer) -> None:
    with pytest.raises(SshHostKeyError, match="known_hosts line 1: unreadable") as failure:
        _open(sshd, "127.0.0.1", sshd.port, "[127.0.0.1]:22 ssh-ed25519 !!!")
    assert not isinstance(failure.value, UntrustedHostKeyError)  # no key was offered: nothing to name
    assert str(pickle.loads(pickle.dumps(failure.value))) == str(failure.value)
