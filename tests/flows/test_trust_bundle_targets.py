"""A trust-bundle target end to end, through Prefect blocks: `certpilot target add ... --kind trust-bundle`
on a managed certificate of a lab fleet (a real sshd fronting nginx), the deploy-certificate flow
bringing the nginx site and the trust bundle together, and `certpilot ca distribute` re-deploying the
bundle after it changed, each file read back on the host."""

from __future__ import annotations

import json
from collections.abc import Callable

import sqlalchemy as sa
from typer.testing import CliRunner

from certpilot import targets, trust_bundle
from certpilot.database import read_session
from cli.main import app
from flows.deploy import deploy_certificate
from lab.fleet import Fleet
from tests.flows.fleet_fixtures import BLOCK, CA_NAME, inventory, make_fleet  # noqa: F401 (fixtures)

runner = CliRunner()


def test_target_add_the_deploy_flow_and_ca_distribute(inventory: sa.Engine,  # noqa: F811
                                                      make_fleet: Callable[..., Fleet]) -> None:  # noqa: F811
    fleet = make_fleet(certificates=1, nginx=1, haproxy=0)
    [name] = fleet.names
    path = fleet.sshd.home / f"{CA_NAME}-bundle.pem"
    added = runner.invoke(app, ["target", "add", name, "trust", "--kind", "trust-bundle", "--block",
                                f"ssh-host/{BLOCK}", "--set", f"path={path}", "--set", "mode=0640", "--json"])
    assert added.exit_code == 0, added.output
    assert json.loads(added.stdout)["settings"] == {"path": str(path), "mode": "0640"}
    refused = runner.invoke(app, ["target", "add", name, "trust2", "--kind", "trust-bundle", "--block",
                                  f"ssh-host/{BLOCK}", "--set", f"path={path}", "--set", "mode=0666"])
    assert refused.exit_code == 2 and "mode must not let group or others write the file" in refused.stderr

    state = deploy_certificate(name, return_state=True)
    assert state.is_completed(), state.message
    with read_session(inventory) as session:
        bundle = trust_bundle.of_ca(session, CA_NAME)
        rows = {t.name: t for t in targets.list_targets(session, name)}
    assert path.read_bytes() == bundle.pem and oct(path.stat().st_mode & 0o777) == "0o640"
    assert rows["trust"].verified_fingerprint == rows["trust"].desired_fingerprint is not None

    path.write_bytes(b"# tampered with\n")  # the host's copy no longer holds the bundle
    done = runner.invoke(app, ["ca", "distribute", CA_NAME, "--json"])
    assert done.exit_code == 0, done.output
    report = json.loads(done.stdout)
    assert report["sha256"] == bundle.sha256 and report["failed"] == 0
    assert [(t["managed"], t["target"], t["action"]) for t in report["targets"]] == [(name, "trust", "deployed")]
    assert path.read_bytes() == bundle.pem
