"""Adopting a discovered certificate, against a real Prefect server, a real sshd and a real nginx: discovery
reads nginx's configuration, the proposal turns the file nginx serves into an ssh-nginx target (paths,
endpoint, what the operator must add), `certpilot managed adopt` makes it managed, and renewing it issues
from the private CA, deploys to the proposed target and proves it served on the wire; each refusal is
precise and changes nothing, and a proposed target that still needs something is not added."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from typer.testing import CliRunner

from blocks.issuers import PrivateCABlock
from blocks.ssh import SshHostBlock
from certpilot import audit, inventory, keystore, managed, targets
from certpilot import ca as ca_module
from certpilot.database import read_session, write_session
from certpilot.keys import key_matches_certificate
from certpilot.models import Certificate, Location
from certpilot.sample_estate import Authority, issue_leaf, key_pem, pem
from certpilot.settings import load_settings
from certpilot.x509info import describe_certificate
from cli.main import app
from connectors.tls_verify import fetch_chain
from flows.discover import discover
from flows.renew import renew_certificate
from lab.nginx import NginxInstance
from lab.sshd import SshServer
from tests.flows.test_deploy_flow import block_types, ssh_host  # noqa: F401 - fixtures

SITE = "www.adopt.test"
CA_NAME = "adopt-ca"
ACTOR = audit.Actor("test")


class Estate:
    def __init__(self, engine: sa.Engine, nginx: NginxInstance, fingerprint: str) -> None:
        self.engine, self.nginx, self.fingerprint = engine, nginx, fingerprint

    def served(self) -> str:
        return fetch_chain("127.0.0.1", self.nginx.site(SITE).port, sni=SITE, timeout=5).fingerprint


@pytest.fixture
def estate(ssh_host: SshServer, block_types: None, engine: sa.Engine,  # noqa: F811
           ca: tuple[Authority, Authority], tmp_path: Path) -> Iterator[Estate]:
    """An nginx serving a certificate from a CA certpilot does not run, discovered over SSH by reading
    nginx's configuration; a private CA and its issuer block to adopt it with."""
    leaf, key = issue_leaf(ca[1], [SITE, "adopt.test"], dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=20))
    nginx = NginxInstance(ssh_host.home / tmp_path.name / "nginx", [SITE], user=ssh_host.user,
                          pairs={SITE: (pem(leaf, ca[1].certificate), key_pem(key))}).start()
    try:
        with write_session(engine) as session:
            ca_module.init_ca(session, keystore.load_key_ring(load_settings()), ACTOR, CA_NAME, "http://127.0.0.1:9")
        PrivateCABlock(ca_name=CA_NAME).save(CA_NAME, overwrite=True)
        SshHostBlock(address=ssh_host.host, port=ssh_host.port, user=ssh_host.user,
                     private_key=ssh_host.client_private_key, known_hosts=ssh_host.known_hosts_line,
                     discovery_globs=[str(nginx.conf)]).save("adopt-host", overwrite=True)
        result = discover(["ssh-host/adopt-host"])
        assert not result.failed, result.as_dict()
        yield Estate(engine, nginx, leaf.fingerprint(hashes.SHA256()).hex())
    finally:
        nginx.stop()


def _adopt(*args: str, input: str | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["managed", "adopt", *args], input=input)
    return result.exit_code, result.output


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_adopt_what_nginx_serves_then_renew_it_onto_the_proposed_target(estate: Estate) -> None:
    fp, site = estate.fingerprint, estate.nginx.site(SITE)
    with read_session(estate.engine) as session:
        [location] = session.exec(sa.select(Location).where(
            Location.certificate_fingerprint == fp)).scalars().all()  # type: ignore[call-overload]
    assert location.details["served_by"][0]["config"] == str(estate.nginx.conf)

    # The proposal alone (--json without --yes): nothing changes.
    code, output = _adopt(fp[:16], "--name", "www", "--issuer", f"private-ca/{CA_NAME}", "--json")
    assert code == 0, output
    shown = json.loads(output)
    assert shown["adopted"] is None
    proposal = shown["proposal"]
    assert (proposal["dns_names"], proposal["key_algorithm"], proposal["key"]) == (["adopt.test", SITE], "ec-p256",
                                                                                   None)
    [target] = proposal["targets"]
    assert (target["name"], target["kind"], target["block"], target["ready"]) == (
        "adopt-host-nginx", "ssh-nginx", "ssh-host/adopt-host", False)
    assert target["settings"] == {"certificate_path": str(site.certificate_path), "key_path": str(site.key_path),
                                  "verify_port": site.port, "verify_host": "127.0.0.1", "verify_sni": SITE}
    assert [n.split(":")[0] for n in target["needs"]] == ["test_command, reload_command"]
    with read_session(estate.engine) as session:
        assert managed.list_managed(session, include_retired=True) == []

    # Asked, and declined: nothing changes either.
    code, output = _adopt(fp, "--name", "www", "--issuer", f"private-ca/{CA_NAME}", input="n\n")  # no owner
    assert code == 1 and "NOT READY: needs test_command" in output  # the proposal is shown, then refused
    assert "it has no owner and no ownership rule of the policy matches it: give one (--owner)" in output
    assert "error: managed certificate www needs an owner" in output and "give --owner" in output
    code, output = _adopt(fp, "--name", "www", "--issuer", f"private-ca/{CA_NAME}", "--owner", "web-team",
                          input="n\n")
    assert code == 0 and "not adopted: nothing changed" in output and "NOT READY: needs test_command" in output
    assert "owner: web-team" in output

    # Adopted with what the proposal said was missing.
    code, output = _adopt(fp, "--name", "www", "--issuer", f"private-ca/{CA_NAME}", "--yes", "--json",
                          "--owner", "web-team",
                          "--set", f"adopt-host-nginx:test_command={estate.nginx.test_command}",
                          "--set", f"reload_command={estate.nginx.reload_command}")
    assert code == 0, output
    adopted = json.loads(output)["adopted"]
    assert adopted == {"name": "www", "fingerprint": fp, "targets": ["adopt-host-nginx"], "skipped": [], "key": None}
    with read_session(estate.engine) as session:
        row = managed.get(session, "www")
        assert (row.dns_names, row.issuer, row.key_algorithm, row.owner) == (
            ["adopt.test", SITE], f"private-ca/{CA_NAME}", "ec-p256", "web-team")
        assert managed.current_certificate(session, row).fingerprint_sha256 == fp
        [added] = targets.list_targets(session, "www")
        assert (added.desired_fingerprint, added.settings["test_command"]) == (fp, estate.nginx.test_command)
    code, output = _adopt(fp, "--name", "www2", "--issuer", f"private-ca/{CA_NAME}", "--yes")
    assert code == 1 and "already managed, as www" in output

    # The first renewal issues from the private CA, deploys to the proposed target and verifies it.
    state = renew_certificate("www", return_state=True)
    assert state.is_completed(), state.message
    renewal = state.result()
    new = renewal.renewal.fingerprint_sha256
    assert renewal.deployment is not None and renewal.deployment.fingerprint == new != fp
    assert estate.served() == new
    on_disk = x509.load_pem_x509_certificates(site.certificate_path.read_bytes())
    key = serialization.load_pem_private_key(site.key_path.read_bytes(), None)
    assert key_matches_certificate(key, on_disk[0]) and site.key_path.stat().st_mode & 0o777 == 0o600
    with read_session(estate.engine) as session:
        issued = session.get(Certificate, new)
        assert issued.replaces_fingerprint == fp and session.get(Certificate, fp).status == "superseded"
        authority = ca_module.get_ca(session, CA_NAME)
        assert issued.issuer_fingerprint == authority.issuing_fingerprint


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_refusals_are_precise_and_a_target_that_needs_more_is_not_added(estate: Estate,
                                                                       ca: tuple[Authority, Authority]) -> None:
    fp = estate.fingerprint
    issuer = f"private-ca/{CA_NAME}"
    expired, _ = issue_leaf(ca[1], ["old.adopt.test"], dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=1))
    with write_session(estate.engine) as session:
        inventory.upsert(session, [inventory.Observation(describe_certificate(expired), "file:///old.pem", "import")],
                         ACTOR)
        managed.add(session, managed.ManagedSpec(name="taken", dns_names=("taken.test",), issuer=issuer,
                                                 owner="platform"), ACTOR)
    expired_fp = expired.fingerprint(hashes.SHA256()).hex()

    code, output = _adopt("f" * 64, "--name", "www", "--issuer", issuer, "--yes")
    assert code == 1 and "no certificate" in output.lower() and "ffffffff" in output
    code, output = _adopt(expired_fp, "--name", "old", "--issuer", issuer, "--yes")
    assert code == 1 and "expired on" in output and "managed add" in output
    code, output = _adopt(fp, "--name", "taken", "--issuer", issuer, "--yes")
    assert code == 1 and "'taken' already exists" in output
    code, output = _adopt(fp, "--name", "www", "--issuer", "private-ca/nowhere", "--yes")
    assert code == 2 and "no issuer block private-ca/nowhere" in output
    code, output = _adopt(fp, "--name", "www", "--issuer", issuer, "--yes", "--set", "web:reload_command=x")
    assert code == 2 and "no proposed target named 'web'" in output
    code, output = _adopt(fp, "--name", "www", "--issuer", issuer, "--yes")
    assert code == 1 and "managed certificate www needs an owner" in output and "give --owner" in output
    code, output = _adopt(fp, "--name", "www", "--issuer", issuer, "--yes", "--json",  # still needs its commands
                          "--owner", "web-team")
    assert code == 0, output
    assert json.loads(output)["adopted"]["targets"] == [] and "needs test_command" in output
    with read_session(estate.engine) as session:
        assert [m.name for m in managed.list_managed(session)] == ["taken", "www"]
        assert targets.list_targets(session, "www") == []
    code, output = _adopt(fp, "--name", "again", "--issuer", issuer, "--yes")
    assert code == 1 and "already managed, as www" in output

