"""Values reaching haproxy's runtime API are one argument each: haproxy's CLI splits commands at ';'
and a line at its end, and arguments at spaces unless escaped with a backslash. A pem_path holding a
';' would run a second command (here: disable the frontend), so it is refused before anything is
written or sent; a pem_path with a space is escaped and works (checked against the real haproxy)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest

from certpilot.deployment import PermanentDeployError
from connectors.ssh import SshConnection
from connectors.ssh_deploy import HaproxyDeployer
from lab.haproxy import HaproxyInstance
from lab.sshd import SshServer
from tests.integration.ssh.conftest import Pki, served, served_steadily


def frontend_status(haproxy: HaproxyInstance, frontend: str = "tls") -> str:
    """The frontend's status as haproxy's ``show stat`` reports it: OPEN, or STOP once disabled."""
    text = haproxy.runtime("show stat").lstrip("# ")
    for row in csv.DictReader(io.StringIO(text)):
        if row["pxname"] == frontend and row["svname"] == "FRONTEND":
            return row["status"]
    raise AssertionError(f"no frontend {frontend!r} in show stat: {text[:200]}")


@pytest.mark.parametrize("injected", [";disable frontend tls", "\ndisable frontend tls"])
def test_a_pem_path_that_would_run_a_second_command_is_refused(
        haproxy: HaproxyInstance, ssh: SshConnection, pki: Pki, injected: str) -> None:
    pem_path = f"{haproxy.pem_path}{injected}"
    before = served(haproxy.port, "lb.test")
    assert frontend_status(haproxy) == "OPEN"
    try:
        with pytest.raises(PermanentDeployError) as failure:
            target = HaproxyDeployer("lb-inject", ssh, {**haproxy.deploy_settings(), "pem_path": pem_path})
            target.deploy(pki.bundle("lb.test"))
        assert frontend_status(haproxy) == "OPEN"  # no second command ran
        message = str(failure.value)
        assert message.startswith("lb-inject: pem_path ") and "haproxy's runtime API" in message
        assert served_steadily(haproxy.port, "lb.test") == {before}
        assert [p.name for p in haproxy.pem_path.parent.iterdir()
                if p.name.startswith(haproxy.pem_path.name) and p != haproxy.pem_path
                and not p.name.endswith(".certpilot-previous")] == []  # nothing was written
    finally:  # before the fix, leave the session's haproxy as it was for the other tests
        haproxy.runtime("enable frontend tls")
        haproxy.runtime(f"abort ssl cert {haproxy.pem_path}")


def test_a_runtime_socket_socat_cannot_take_is_refused(ssh: SshConnection) -> None:
    with pytest.raises(PermanentDeployError, match="runtime_socket .* socat"):
        HaproxyDeployer("lb-sock", ssh, {"pem_path": "/x.pem", "runtime_socket": "/run/a,fork",
                                         "runtime_client": "socat"})
    with pytest.raises(PermanentDeployError, match="runtime_socket"):
        HaproxyDeployer("lb-sock", ssh, {"pem_path": "/x.pem", "runtime_socket": "/run/a\nb"})


@pytest.mark.parametrize("client", ["auto", "python3"])
def test_a_pem_path_with_a_space_is_deployed_through_the_runtime_api(
        sshd: SshServer, ssh: SshConnection, pki: Pki, client: str) -> None:
    prefix = Path(sshd.home) / f"haproxy with space {client}"
    with HaproxyInstance(prefix, "lb.test", user=sshd.user, pair=pki.pair("lb.test")) as spaced:
        target = HaproxyDeployer("lb-space", ssh, {**spaced.deploy_settings(), "runtime_client": client,
                                                   "verify_trust": pki.trust_pem})
        assert " " in target.pem_path and " " in str(target.runtime_socket)
        before, worker = served(spaced.port, "lb.test"), spaced.worker_pid()
        bundle = pki.bundle("lb.test")

        receipt = target.deploy(bundle)
        target.verify(bundle.fingerprint)

        assert spaced.worker_pid() == worker  # swapped through the runtime API, not reloaded
        assert served_steadily(spaced.port, "lb.test") == {bundle.fingerprint}
        target.rollback(receipt)
        assert served_steadily(spaced.port, "lb.test") == {before}
        assert "# transaction" not in spaced.runtime("show ssl cert")
