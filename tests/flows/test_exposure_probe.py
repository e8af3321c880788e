"""The exposure probe against real TLS endpoints on loopback (the TLS farm): an unmanaged discovered location
that still serves an old certificate is an exposure; a location that serves something else now is clean;
places that cannot be probed (nothing listening, a file over SSH whose source has no block, a target whose
block is gone) are unverified, never clean; a ghost location is not probed at all. Files found over SSH by an
ssh-host block are read again through it."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from sqlmodel import col

from blocks.ssh import SshHostBlock
from certpilot import audit, inventory, keystore, managed, renewing, targets
from certpilot.clock import utcnow
from certpilot.database import get_engine, write_session
from certpilot.discovery import record
from certpilot.exposure import ExposureReport
from certpilot.issuance import IssuedCertificate
from certpilot.models import Location
from certpilot.sample_estate import key_pem, pem
from certpilot.x509info import describe_certificate
from lab.ports import free_port
from lab.sshd import SshServer
from lab.tls_farm import TlsFarm, issue_farm_leaf, plan
from tasks.exposure import probe_exposure
from tests.private_ca_service import key_ring

ACTOR = audit.Actor("test")


@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsFarm]:
    with TlsFarm.run(tmp_path_factory.mktemp("exposure-farm"), plan(2, expiry_days=(60,), domain="exp.test")) as running:
        yield running


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


@flow(name="exposure-check")
def _check(old: list[str]) -> ExposureReport:
    return probe_exposure(old, timeout=2.0)


def test_an_old_certificate_still_served_at_an_unmanaged_location_is_an_exposure(farm: TlsFarm) -> None:
    served_old, answers_anew = farm.of_kind("good")
    old_served = x509.load_der_x509_certificate(served_old.chain[0])  # what the farm still serves there
    later = utcnow() + dt.timedelta(days=60)
    v1, v1_key = issue_farm_leaf(farm.ca, ["shop.exp.test"], later)  # shop's old one, seen where the farm now
    v2, v2_key = issue_farm_leaf(farm.ca, ["shop.exp.test"], later)  # serves its own certificate
    unreachable, _ = issue_farm_leaf(farm.ca, ["gone.exp.test"], later)
    on_disk, _ = issue_farm_leaf(farm.ca, ["file.exp.test"], later)
    refused = f"tls://127.0.0.1:{free_port()}"
    with write_session(get_engine()) as session:
        row = managed.add(session, managed.ManagedSpec("shop", ("shop.exp.test",), "private-ca/corp", owner="shop-team"),
                          ACTOR)
        for leaf, key in ((v1, v1_key), (v2, v2_key)):
            ref = keystore.store_private_key(session, key, key_ring(), ACTOR, "generated")
            renewing.record_issued(session, row, IssuedCertificate((_der(leaf), _der(farm.ca.intermediate))), ref, ACTOR)
        targets.add(session, "shop", "nginx-1", "ssh-nginx", "ssh-host/exposure-missing",
                    {"certificate_path": "/etc/ssl/shop.pem", "key_path": "/etc/ssl/shop.key"}, ACTOR)
        inventory.upsert(session, [
            inventory.Observation(describe_certificate(old_served), served_old.locator, "tls-scan:lab"),
            inventory.Observation(describe_certificate(v1), answers_anew.locator, "tls-scan:lab"),
            inventory.Observation(describe_certificate(unreachable), refused, "tls-scan:lab"),
            inventory.Observation(describe_certificate(on_disk), "ssh://web9/etc/ssl/file.pem", "ssh:web9"),
            inventory.Observation(describe_certificate(on_disk), "tls://127.0.0.1:1?sni=ghost.exp.test", "tls-scan:lab"),
        ], ACTOR)
        session.execute(sa.update(Location).where(col(Location.locator) == "tls://127.0.0.1:1?sni=ghost.exp.test")
                        .values(ghost=True))
    old = [describe_certificate(c).fingerprint_sha256 for c in (old_served, v1, unreachable, on_disk)]

    state = _check(old, return_state=True)
    assert state.is_completed(), state.message
    report: ExposureReport = state.result()

    [exposed] = report.exposures
    assert (exposed.place, exposed.kind, exposed.managed, exposed.old) == (served_old.locator, "location", None, old[0])
    assert exposed.where == "discovered location (unmanaged), seen by tls-scan:lab"
    [clean] = report.clean
    assert (clean.place, clean.managed, clean.served, clean.old) == (answers_anew.locator, "shop",
                                                                     answers_anew.fingerprint, None)
    unverified = {r.place: r.error or "" for r in report.unverified}
    assert set(unverified) == {refused, "ssh://web9/etc/ssl/file.pem", "target:shop/nginx-1"}
    assert "refused" in unverified[refused]
    assert "not a TLS endpoint" in unverified["ssh://web9/etc/ssl/file.pem"] and "ssh:web9" in unverified[
        "ssh://web9/etc/ssl/file.pem"]
    assert "cannot build its deployer" in unverified["target:shop/nginx-1"]
    assert "ssh-host/exposure-missing" in unverified["target:shop/nginx-1"]
    assert all("ghost" not in r.place for r in report.results)  # a ghost location is not probed
    assert report.summary() == ("5 place(s) of 4 old certificate(s) checked: 1 still serve an old certificate, "
                                "3 could not be verified, 1 clean")

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    markdown = {a.key: str(a.data) for a in artifacts if a.key}["exposure"]
    assert "## Exposures: still serving an old certificate (1)" in markdown
    assert f"`{old[0][:16]}`" in markdown and "## Unverified: could not be probed (3)" in markdown


def test_files_found_over_ssh_are_read_again_through_the_block_that_found_them(farm: TlsFarm, tmp_path: Path) -> None:
    """Certificate files that discovery found through an ssh-host block are read again through it: one that
    still holds an old certificate (with its key, as haproxy keeps it) is an exposure, one that holds a new
    certificate now is clean, one that is gone is unverified and says so."""
    later = utcnow() + dt.timedelta(days=60)
    olds = {name: issue_farm_leaf(farm.ca, [f"{name}.files.exp.test"], later) for name in ("still", "renewed", "gone")}
    fresh, _ = issue_farm_leaf(farm.ca, ["renewed.files.exp.test"], later)
    with SshServer(tmp_path / "sshd") as server:
        ssl_dir = server.home / "etc" / "ssl"
        ssl_dir.mkdir(parents=True)
        for name, (cert, key) in olds.items():
            extra = key_pem(key) if name == "still" else b""
            (ssl_dir / f"{name}.pem").write_bytes(pem(cert, farm.ca.intermediate) + extra)
        for path in [ssl_dir.parent, ssl_dir, *ssl_dir.iterdir()]:
            server.chown(path)
        SshHostBlock.register_type_and_schema()
        block = SshHostBlock(address=server.host, port=server.port, user=server.user,
                             private_key=server.client_private_key, known_hosts=server.known_hosts_line,
                             discovery_globs=[f"{server.home}/etc/ssl/*.pem"])
        block.save("exposure-files", overwrite=True)
        found = record(get_engine(), block.source(), ACTOR, block="ssh-host/exposure-files")
        assert (found.places, found.problems) == (3, []), found
        (ssl_dir / "renewed.pem").write_bytes(pem(fresh, farm.ca.intermediate))  # replaced since discovery
        (ssl_dir / "gone.pem").unlink()
        old = [describe_certificate(cert).fingerprint_sha256 for cert, _ in olds.values()]

        state = _check(old, return_state=True)

    assert state.is_completed(), state.message
    report: ExposureReport = state.result()
    by_file = {Path(r.place).name: r for r in report.results}
    assert set(by_file) == {"still.pem", "renewed.pem", "gone.pem"} and {r.method for r in report.results} == {"ssh"}
    assert by_file["still.pem"].exposed and by_file["still.pem"].old == old[0]
    assert by_file["still.pem"].where == "discovered location (unmanaged), seen by ssh:exposure-files"
    renewed = by_file["renewed.pem"]
    assert (renewed.exposed, renewed.unverified, renewed.served) == (False, False,
                                                                     describe_certificate(fresh).fingerprint_sha256)
    gone = by_file["gone.pem"]
    assert gone.unverified and "through ssh-host/exposure-files" in (gone.error or "")
    assert "the file is gone" in (gone.error or "")
    assert "PRIVATE KEY" not in json.dumps(report.as_dict())  # the key read with still.pem goes nowhere
