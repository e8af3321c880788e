"""Several certificates of ONE server instance deployed at once, as a fleet run does (revoke-and-replace
replaces many certificates concurrently, and several are served by the same nginx or haproxy): every
deploy succeeds and every site serves its own new certificate. Each deployer has its own SSH connection,
as deployers built from different block objects do.

What went wrong before the deployers took their instance's lock: nginx's configuration test and reload
read every site's files, so a site whose swap was half done (new key beside the old certificate) failed
another site's deploy ("key values mismatch"); haproxy keeps one certificate transaction per process, so a
concurrent `set ssl cert` was refused as locked, or taken into another file's transaction and served under
that other file's SNI."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from connectors.ssh import SshConnection
from connectors.ssh_deploy import HaproxyDeployer, NginxDeployer
from lab.haproxy import HaproxyInstance
from lab.nginx import NginxInstance
from lab.sshd import SshServer
from tests.integration.ssh.conftest import Pki, connect, served_steadily

SITES = tuple(f"site{i}.many.test" for i in range(6))


@pytest.fixture
def connections(sshd: SshServer) -> Iterator[list[SshConnection]]:
    opened = [connect(sshd).open() for _ in SITES]
    try:
        yield opened
    finally:
        for connection in opened:
            connection.close()


def _all_at_once(deploy: list[object]) -> list[BaseException | None]:
    with ThreadPoolExecutor(len(deploy)) as pool:
        futures = [pool.submit(d) for d in deploy]  # type: ignore[arg-type]
    return [f.exception() for f in futures]


def test_the_sites_of_one_nginx_deployed_at_once(sshd: SshServer, pki: Pki, tmp_path: Path,
                                                 connections: list[SshConnection]) -> None:
    pairs = {name: pki.pair(name) for name in SITES}
    with NginxInstance(sshd.home / f"nginx-{tmp_path.name}", SITES, user=sshd.user, pairs=pairs) as nginx:
        deployers = [NginxDeployer(f"web-{name}", ssh, {**nginx.deploy_settings(name), "verify_trust": pki.trust_pem})
                     for name, ssh in zip(SITES, connections, strict=True)]
        for _ in range(2):
            bundles = [pki.bundle(name) for name in SITES]
            errors = _all_at_once([lambda d=d, b=b: d.deploy(b) for d, b in zip(deployers, bundles, strict=True)])
            assert errors == [None] * len(SITES)
            for name, deployer, bundle in zip(SITES, deployers, bundles, strict=True):
                deployer.verify(bundle.fingerprint)
                assert served_steadily(nginx.site(name).port, name) == {bundle.fingerprint}


def test_the_certificates_of_one_haproxy_deployed_at_once(sshd: SshServer, pki: Pki, tmp_path: Path,
                                                          connections: list[SshConnection]) -> None:
    pairs = {name: pki.pair(name) for name in SITES}
    with HaproxyInstance(sshd.home / f"haproxy-{tmp_path.name}", SITES[0], also_serves=SITES[1:], user=sshd.user,
                         pairs=pairs) as haproxy:
        deployers = [HaproxyDeployer(f"lb-{name}", ssh,
                                     {**haproxy.deploy_settings(name), "verify_trust": pki.trust_pem})
                     for name, ssh in zip(SITES, connections, strict=True)]
        for _ in range(2):
            bundles = [pki.bundle(name) for name in SITES]
            errors = _all_at_once([lambda d=d, b=b: d.deploy(b) for d, b in zip(deployers, bundles, strict=True)])
            assert errors == [None] * len(SITES)
            for name, deployer, bundle in zip(SITES, deployers, bundles, strict=True):
                deployer.verify(bundle.fingerprint)
                assert served_steadily(haproxy.port, name) == {bundle.fingerprint}
        assert "# transaction" not in haproxy.runtime("show ssl cert")
