"""The discover flow against a real Prefect server, a TLS farm and a real sshd: one task per source,
locations recorded with their details, ghosts flagged by the next complete run, problems reported in
the inventory artifact, and a failing source failing the run after the others were recorded."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from sqlmodel import select

from blocks.ssh import SshHostBlock
from blocks.tls_scan import TlsScanBlock
from certpilot.database import get_engine, read_session
from certpilot.models import Location
from certpilot.sample_estate import Authority, issue_leaf, key_pem, pem
from flows.discover import discover
from lab import tls_farm
from lab.sshd import SshServer, openssh_public_line
from tests.flows.test_renew_flows import _artifacts, _task_runs


@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tls_farm.TlsFarm]:
    with tls_farm.TlsFarm.run(tmp_path_factory.mktemp("farm"), tls_farm.plan(6, hostile=("silent",))) as running:
        yield running


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory, ca: tuple[Authority, Authority]) -> Iterator[SshServer]:
    """An SSH host with two certificate files (one beside its key) under its home."""
    with SshServer(tmp_path_factory.mktemp("sshd")) as server:
        etc = server.home / "etc" / "ssl"
        etc.mkdir(parents=True)
        for name in ("api", "mail"):
            cert, key = issue_leaf(ca[1], [f"{name}.host.test"], dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=9))
            (etc / f"{name}.crt").write_bytes(pem(cert, ca[1].certificate))
            if name == "api":
                (etc / f"{name}.key").write_bytes(key_pem(key))
                (etc / f"{name}.key").chmod(0o600)
        for path in [etc.parent, etc, *etc.iterdir()]:
            server.chown(path)
        yield server


@pytest.fixture
def sources(farm: tls_farm.TlsFarm, host: SshServer, prefect_server: None, certpilot_home: Path) -> list[str]:
    TlsScanBlock.register_type_and_schema()
    SshHostBlock.register_type_and_schema()
    TlsScanBlock(targets=[f"127.0.0.1:{e.port}" for e in farm.endpoints], timeout_seconds=1.0,
                 trust_bundle_pem=farm.ca.root.public_bytes(serialization.Encoding.PEM).decode()).save("farm",
                                                                                                      overwrite=True)
    SshHostBlock(address=host.host, port=host.port, user=host.user, private_key=host.client_private_key,
                 known_hosts=host.known_hosts_line, discovery_globs=[f"{host.home}/etc/**/*.crt"]).save("files",
                                                                                                        overwrite=True)
    return ["tls-scan/farm", "ssh-host/files"]


def _locations() -> dict[str, Location]:
    with read_session(get_engine()) as session:
        return {loc.locator: loc for loc in session.exec(select(Location))}


def test_discover_records_every_source_then_flags_ghosts(sources: list[str], farm: tls_farm.TlsFarm,
                                                         host: SshServer) -> None:
    state = discover(sources, return_state=True)
    assert state.is_completed(), state.message
    good = [e for e in farm.endpoints if e.fingerprint]
    locations = _locations()
    for endpoint in good:
        loc = locations[endpoint.locator]
        assert loc.certificate_fingerprint == endpoint.fingerprint and loc.source == "tls-scan:farm"
        assert loc.details["verified"] is True and loc.details["tls_version"].startswith("TLSv1.")
    ssh = {k: v for k, v in locations.items() if k.startswith("ssh://")}
    assert sorted(Path(k.split(str(host.port), 1)[1]).name for k in ssh) == ["api.crt", "mail.crt"]
    run_id = state.state_details.flow_run_id
    assert sorted(t.name for t in _task_runs(run_id) if t.name.startswith("discover-")) == [
        "discover-ssh-host-files", "discover-tls-scan-farm"]
    artifact = _artifacts(run_id, "inventory")[0].data
    assert "| tls-scan:farm | 6 |" in artifact and "silent" in artifact.lower()

    # The farm's scope shrinks: the next complete run flags the endpoints it no longer sees, and only those.
    TlsScanBlock(targets=[f"127.0.0.1:{e.port}" for e in good[:2]], timeout_seconds=1.0).save("farm", overwrite=True)
    second = discover(sources)
    assert [s.ghosts for s in second.sources if s.source == "tls-scan:farm"] == [4]
    ghosts = {k for k, v in _locations().items() if v.ghost}
    assert ghosts == {e.locator for e in good[2:]}


def test_a_failing_source_fails_the_run_after_the_others_are_recorded(sources: list[str], host: SshServer) -> None:
    SshHostBlock(address=host.host, port=host.port, user=host.user, private_key=host.client_private_key,
                 known_hosts=f"[{host.host}]:{host.port} " + _other_host_key(),  # not this host's key
                 discovery_globs=["/etc/*.crt"]).save("impostor", overwrite=True)
    state = discover(["ssh-host/impostor", "tls-scan/farm"], return_state=True)
    assert state.is_failed()
    assert "ssh-host/impostor" in state.message and "host key" in state.message.lower()
    assert any(loc.source == "tls-scan:farm" for loc in _locations().values())


def _other_host_key() -> str:
    return openssh_public_line(ed25519.Ed25519PrivateKey.generate())
