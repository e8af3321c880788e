"""Real servers for the SSH tests, started once per session: an OpenSSH server on loopback (its own
config, host key and user certpilot-lab), one nginx with a site per test (each site in its own
directory, so a test can make one read-only) and one haproxy, both running as certpilot-lab so that the
deployers reload them over SSH as that user. Certificates come from the session's test CA."""

from __future__ import annotations

import datetime as dt
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from certpilot.deployment import DeployBundle
from certpilot.sample_estate import Authority, issue_leaf, key_pem, pem
from connectors.ssh import SshConnection
from connectors.tls_verify import fetch_chain
from lab.haproxy import HaproxyInstance
from lab.nginx import NginxInstance
from lab.sshd import SshServer

NGINX_SITES = ("deploy.test", "stale.test", "broken.test", "drop-key.test", "drop-cert.test", "readonly.test",
               "hostkey.test", "mismatch.test", "secret.test", "block.test")


@dataclass
class Pki:
    """The session's issuing CA, and every key it issued for, so that tests can look for leaks."""

    root: Authority
    issuing: Authority
    keys: list[PrivateKeyTypes] = field(default_factory=list, repr=False)

    @property
    def trust_pem(self) -> str:
        return pem(self.root.certificate).decode()

    def leaf(self, name: str) -> tuple[x509.Certificate, PrivateKeyTypes]:
        cert, key = issue_leaf(self.issuing, [name], dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=60))
        self.keys.append(key)
        return cert, key

    def bundle(self, name: str) -> DeployBundle:
        cert, key = self.leaf(name)
        return DeployBundle.from_key(name, cert, [self.issuing.certificate], key)

    def pair(self, name: str) -> tuple[bytes, bytes]:
        cert, key = self.leaf(name)
        return pem(cert, self.issuing.certificate), key_pem(key)


@pytest.fixture(scope="session")
def pki(ca: tuple[Authority, Authority]) -> Pki:
    return Pki(*ca)


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
    if shutil.which("sshd", path="/usr/sbin:/usr/bin:" + os.environ.get("PATH", "")) is None:
        pytest.fail("sshd is not installed: run `bash scripts/setup.sh --servers` (Debian openssh-server)")
    with SshServer(tmp_path_factory.mktemp("sshd")) as server:
        yield server


@pytest.fixture(scope="session")
def nginx(sshd: SshServer, pki: Pki) -> Iterator[NginxInstance]:
    pairs = {name: pki.pair(name) for name in NGINX_SITES}
    with NginxInstance(sshd.home / "nginx", NGINX_SITES, user=sshd.user, pairs=pairs) as instance:
        yield instance


@pytest.fixture(scope="session")
def haproxy(sshd: SshServer, pki: Pki) -> Iterator[HaproxyInstance]:
    cert_pem, key = pki.pair("lb.test")
    with HaproxyInstance(sshd.home / "haproxy", "lb.test", user=sshd.user, pair=(cert_pem, key)) as instance:
        yield instance


def connect(sshd: SshServer, cls: type[SshConnection] = SshConnection, **kwargs: object) -> SshConnection:
    options: dict[str, object] = {"connect_timeout": 5.0, "operation_timeout": 10.0, "command_timeout": 20.0}
    options.update(kwargs)
    return cls(sshd.host, sshd.port, sshd.user, sshd.client_private_key, sshd.known_hosts_line,
               **options)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def ssh(sshd: SshServer) -> Iterator[SshConnection]:
    """One connection shared by the session's tests, as one host's targets share one in production."""
    with connect(sshd) as connection:
        yield connection


def served(port: int, sni: str) -> str:
    """The fingerprint of the leaf served now at 127.0.0.1:port."""
    return fetch_chain("127.0.0.1", port, sni=sni, timeout=5.0).fingerprint


def served_steadily(port: int, sni: str, times: int = 5) -> set[str]:
    """The leaf fingerprints of ``times`` handshakes in a row."""
    return {served(port, sni) for _ in range(times)}
