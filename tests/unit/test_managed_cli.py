"""`certpilot managed add|list` and `certpilot renew --due --dry-run`, on SQLite and PostgreSQL: the
core only, no Prefect. (`renew NAME` and `renew --due` run flows: tests/flows/test_renew_flows.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from certpilot import audit, keystore, renewing
from cli.main import app
from certpilot.sample_estate import make_ca
from certpilot.settings import load_settings
from tests.sample_issuer import SampleIssuer

pytestmark = pytest.mark.usefixtures("no_prefect_api")  # as a user without a Prefect server

runner = CliRunner()


def _ok(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.stdout


def test_managed_add_and_list(engine: sa.Engine) -> None:
    out = _ok("managed", "add", "web", "--dns", "web.example.test", "--dns", "WWW.example.test", "--ip", "192.0.2.1",
              "--issuer", "private-ca/internal", "--owner", "team-web", "--tag", "env=prod", "--renew-before", "30d",
              "--validity-days", "90", "--key-algorithm", "ec-p384")
    assert out.strip() == "added managed certificate web (web.example.test, www.example.test, 192.0.2.1) from " \
                          "private-ca/internal: no certificate issued yet"
    _ok("managed", "add", "api", "--dns", "api.example.test", "--issuer", "acme-issuer/letsencrypt",
        "--owner", "platform", "--no-ari")
    renewing.renew_one(engine, "api", SampleIssuer(make_ca("CLI CA"), name="acme-issuer/letsencrypt"),
                      lambda: keystore.load_key_ring(load_settings()), audit.Actor("test"))

    rows = json.loads(_ok("managed", "list", "--json"))
    assert [r["name"] for r in rows] == ["web", "api"]  # soonest renewal first: web is due now
    web, api = rows
    assert web["due"] is True and web["reason"] == "no certificate issued yet" and web["current"] is None
    assert web["dns_names"] == ["web.example.test", "www.example.test"] and web["ip_addresses"] == ["192.0.2.1"]
    assert (web["renew_before_days"], web["validity_days"], web["key_algorithm"]) == (30, 90, "ec-p384")
    assert web["tags"] == {"env": "prod"} and web["owner"] == "team-web" and web["use_ari"] is True
    assert api["due"] is False and api["use_ari"] is False
    assert api["current"]["not_after"].endswith("Z") and api["next_renewal"] < api["current"]["not_after"]
    assert "67% of its 90-day lifetime" in api["reason"]

    table = _ok("managed", "list")
    assert "web" in table and "due now" in table and "2 managed certificate(s), 1 due" in table


def test_renew_due_dry_run_lists_what_is_due_and_changes_nothing(engine: sa.Engine) -> None:
    _ok("managed", "add", "web", "--dns", "web.example.test", "--issuer", "private-ca/internal", "--owner", "platform")
    _ok("managed", "add", "api", "--dns", "api.example.test", "--issuer", "private-ca/internal", "--owner", "platform")
    renewing.renew_one(engine, "api", SampleIssuer(make_ca("CLI CA")), lambda: keystore.load_key_ring(load_settings()),
                      audit.Actor("test"))
    out = _ok("renew", "--due", "--dry-run")
    assert "web  private-ca/internal  no certificate issued yet; first certificate" in out
    assert "api" not in out and "1 managed certificate(s) due; dry run: nothing renewed" in out
    rows = json.loads(_ok("renew", "--due", "--dry-run", "--within", "80d", "--json"))
    assert [r["name"] for r in rows] == ["web", "api"]  # within 80 days, api falls due too
    assert rows[1]["current"]["fingerprint_sha256"]
    # Stable: a due certificate's next_renewal is when it fell due, the same on every call, not "now".
    time.sleep(0.01)
    assert json.loads(_ok("renew", "--due", "--dry-run", "--within", "80d", "--json")) == rows
    with engine.connect() as conn:
        created = conn.execute(sa.text("select created_at from managed_certificate where name = 'web'")).scalar()
    assert rows[0]["next_renewal"].startswith(str(created)[:19].replace(" ", "T"))
    with engine.connect() as conn:
        assert conn.execute(sa.text("select count(*) from audit_event where action = 'renewal.failed'")).scalar() == 0


@pytest.mark.parametrize("args", [
    ["renew"],
    ["renew", "web", "--due"],
    ["renew", "web", "--dry-run"],
    ["renew", "--due", "--dry-run", "--within", "soon"],
    ["managed", "add", "web", "--dns", "web.example.test"],  # no --issuer
    ["managed", "add", "web", "--dns", "web.example.test", "--issuer", "private-ca/x", "--renew-before", "36h"],
    ["managed", "add", "web", "--dns", "web.example.test", "--issuer", "private-ca/x", "--tag", "novalue"],
])
def test_usage_errors_exit_2(engine: sa.Engine, args: list[str]) -> None:
    assert runner.invoke(app, args).exit_code == 2


def test_bad_definition_is_an_error_naming_the_problem(engine: sa.Engine) -> None:
    result = runner.invoke(app, ["managed", "add", "web", "--dns", "web.example.test", "--issuer", "internal",
                                 "--owner", "platform"])
    assert result.exit_code == 1 and result.stderr.startswith("error: ")
    assert "must name an issuer block as <block-type-slug>/<block-name>" in result.stderr


def test_main_prints_the_error_and_exits_1(database_url: str, tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "cli", "managed", "add", "web", "--dns", "bad name!",
                           "--issuer", "private-ca/x"], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 1
    assert "error: 'bad name!' is not a valid DNS name" in done.stderr


def test_managed_add_takes_its_owner_from_the_policys_ownership_rules_or_refuses(
        engine: sa.Engine, certpilot_home: Path) -> None:
    """Every managed certificate has an owner: --owner, else the first ownership rule of the policy that
    matches its names (or tags); without either, a refusal that says how to give one, and nothing added."""
    refused = runner.invoke(app, ["managed", "add", "web", "--dns", "web.example.test", "--issuer", "private-ca/x"])
    assert refused.exit_code == 1 and "Traceback" not in refused.output
    message = " ".join(refused.stderr.split())
    assert ("error: managed certificate web needs an owner: give --owner or add an ownership rule matching its names "
            f"to the policy (the built-in default is in force: write {certpilot_home / 'policy.yaml'})") in message

    policy = certpilot_home / "policy.yaml"
    certpilot_home.mkdir(parents=True, exist_ok=True)
    policy.write_text("ownership:\n"
                      "  - match: {domain: pay.example.test}\n    owner: payments\n"
                      "  - match: {tag: env=lab}\n    owner: lab-team\n"
                      "  - match: {domain: example.test}\n    owner: web-team\n")
    _ok("managed", "add", "shop", "--dns", "shop.pay.example.test", "--issuer", "private-ca/x")
    _ok("managed", "add", "web", "--dns", "web.example.test", "--issuer", "private-ca/x")
    _ok("managed", "add", "lab", "--dns", "lab.example.test", "--issuer", "private-ca/x", "--tag", "env=lab")
    _ok("managed", "add", "mine", "--dns", "mine.pay.example.test", "--issuer", "private-ca/x", "--owner", "me")
    other = runner.invoke(app, ["managed", "add", "other", "--dns", "other.example.org", "--issuer", "private-ca/x"])
    assert other.exit_code == 1
    assert f"add an ownership rule matching its names to the policy ({policy})" in " ".join(other.stderr.split())
    owners = {r["name"]: r["owner"] for r in json.loads(_ok("managed", "list", "--json"))}
    assert owners == {"shop": "payments", "web": "web-team", "lab": "lab-team", "mine": "me"}
