"""`certpilot policy check|show|waive|waivers|unwaive` on SQLite and PostgreSQL, through the CLI app: the
inventory (real certificates) evaluated and stored, --json fields, exit codes 0/1/2, a bad policy file
named with its line, waivers granted and revoked with their audit events. The core only, no Prefect."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric import rsa
from typer.testing import CliRunner, Result

from certpilot import audit
from certpilot.database import read_session, write_session
from certpilot.policy import RULES
from cli.main import app
from tests.unit.test_violations import leaf, public_ca, put  # noqa: F401 - public_ca: a fixture

pytestmark = pytest.mark.usefixtures("no_prefect_api")

runner = CliRunner()
ENV = {"CERTPILOT_ACTOR": "cli:alice", "COLUMNS": "250"}
VIOLATION_KEYS = {"rule", "fingerprint_sha256", "severity", "detail", "place", "waiver_id"}


def cli(*args: str, **env: str) -> Result:
    return runner.invoke(app, list(args), env={**ENV, **env})


def as_json(*args: str, code: int = 0, **env: str) -> Any:
    result = cli(*args, "--json", **env)
    assert result.exit_code == code, result.output
    return json.loads(result.stdout)


@pytest.fixture
def estate(engine: sa.Engine, public_ca: Any) -> dict[str, str]:
    """weak: RSA-1024, owned by web; unowned: no owner; clean: owned by payments, breaks nothing."""
    weak = leaf(public_ca, ["weak.example.com"], key=rsa.generate_private_key(public_exponent=65537, key_size=1024))
    with write_session(engine) as session:
        return {"weak": put(session, weak, ("tls://weak.example.com:443", "tls-scan:lab"), owner="web"),
                "unowned": put(session, leaf(public_ca, ["nobody.example.com"])),
                "clean": put(session, leaf(public_ca, ["pay.example.com"]), owner="payments")}


def test_check_evaluates_stores_and_exits_1_while_a_violation_is_not_waived(engine: sa.Engine,
                                                                            estate: dict[str, str]) -> None:
    report = as_json("policy", "check", code=1)
    assert report["policy"] == {"source": "built-in", "sha256": None}
    assert all(set(v) == VIOLATION_KEYS for v in report["violations"])
    assert sorted((v["rule"], v["fingerprint_sha256"], v["severity"]) for v in report["violations"]) == sorted([
        ("key-size", estate["weak"], "high"), ("owner-required", estate["unowned"], "medium")])
    summary = report["summary"]
    assert (summary["evaluated"], summary["violations"], summary["waived"], summary["certificates"]) == (3, 2, 0, 2)
    assert summary["by_rule"] == {**{rule: 0 for rule in RULES}, "key-size": 1, "owner-required": 1}
    with read_session(engine) as session:  # stored
        stored = session.execute(sa.text("select certificate_fingerprint, rule from policy_violation")).all()
    assert sorted(tuple(r) for r in stored) == sorted([(estate["weak"], "key-size"),
                                                       (estate["unowned"], "owner-required")])

    only = as_json("policy", "check", "--rule", "key-size", code=1)
    assert [v["rule"] for v in only["violations"]] == ["key-size"] and only["summary"]["violations"] == 1
    assert as_json("policy", "check", "--owner", "payments")["violations"] == []  # exit 0: nothing listed

    text = cli("policy", "check")
    assert text.exit_code == 1
    assert "key-size" in text.stdout and "weak.example.com" in text.stdout and "RSA key" in text.stdout
    assert "3 certificate(s) evaluated against the built-in policy" in text.stdout
    assert "2 violation(s) not waived on 2 certificate(s), 0 waived" in text.stdout

    bad = cli("policy", "check", "--rule", "key-length")
    assert bad.exit_code == 2 and "unknown rule 'key-length'" in bad.stderr


def test_waive_list_and_unwaive(engine: sa.Engine, estate: dict[str, str]) -> None:
    as_json("policy", "check", code=1)
    granted = as_json("policy", "waive", "key-size", "--scope", f"certificate={estate['weak'][:12]}",
                      "--reason", "HSM limit", "--approver", "ciso", "--expires", "30d")
    assert (granted["rule"], granted["approver"], granted["created_by"], granted["state"]) == ("key-size", "ciso",
                                                                                              "cli:alice", "active")
    report = as_json("policy", "check", code=1)  # owner-required is still open
    waived = [v for v in report["violations"] if v["rule"] == "key-size"]
    assert [v["waiver_id"] for v in waived] == [granted["id"]] and report["summary"]["waived"] == 1
    assert cli("policy", "check", "--rule", "key-size").exit_code == 0  # only a waived one listed
    assert f"#{granted['id']}" in cli("policy", "check", "--rule", "key-size").stdout

    dated = as_json("policy", "waive", "owner-required", "--scope", "domain=example.com", "--reason", "inventory "
                    "clean-up", "--approver", "ciso", "--expires", "2099-01-31")
    assert dated["expires_at"] == "2099-02-01T00:00:00Z"  # to the end of that day, UTC
    assert as_json("policy", "check")["summary"] == {
        "evaluated": 3, "violations": 0, "waived": 2, "certificates": 0, "by_rule": {rule: 0 for rule in RULES},
        "expired_waivers": [], "errors": []}
    assert [w["id"] for w in as_json("policy", "waivers")] == [granted["id"], dated["id"]]
    listed = cli("policy", "waivers")
    assert listed.exit_code == 0 and "HSM limit" in listed.stdout and "2 waiver(s)" in listed.stdout

    revoked = as_json("policy", "unwaive", str(granted["id"]))
    assert (revoked["state"], revoked["revoked_by"]) == ("revoked", "cli:alice")
    assert "was already revoked" in cli("policy", "unwaive", str(granted["id"])).stdout
    assert cli("policy", "unwaive", "999").exit_code == 1
    assert [w["id"] for w in as_json("policy", "waivers")] == [dated["id"]]
    assert [w["state"] for w in as_json("policy", "waivers", "--all")] == ["revoked", "active"]
    assert as_json("policy", "check", code=1)["summary"]["by_rule"]["key-size"] == 1
    with read_session(engine) as session:
        events = session.execute(sa.text("select actor, action, object from audit_event "
                                         "where action like 'policy.%' order by seq")).all()
        audit.verify(session)
    assert [tuple(e) for e in events] == [("cli:alice", "policy.waiver_granted", f"policy-waiver:{granted['id']}"),
                                          ("cli:alice", "policy.waiver_granted", f"policy-waiver:{dated['id']}"),
                                          ("cli:alice", "policy.waiver_revoked", f"policy-waiver:{granted['id']}")]


@pytest.mark.parametrize(("args", "message"), [
    (["key-length", "--scope", "*", "--reason", "r", "--approver", "a", "--expires", "1d"], "RULE must be one of"),
    (["key-size", "--scope", "colour=red", "--reason", "r", "--approver", "a", "--expires", "1d"], "unknown term"),
    (["key-size", "--scope", "*", "--reason", "r", "--approver", "a", "--expires", "2000-01-01"],
     "--expires must be in the future"),
    (["key-size", "--scope", "*", "--reason", "r", "--approver", "a", "--expires", "soon"], "'soon' is neither"),
    (["key-size", "--scope", "*", "--reason", "r", "--expires", "1d"], "Missing option '--approver'"),
])
def test_waive_usage_errors_exit_2(engine: sa.Engine, args: list[str], message: str) -> None:
    result = cli("policy", "waive", *args)
    assert result.exit_code == 2 and message in result.stderr, result.output
    assert as_json("policy", "waivers", "--all") == []


POLICY = textwrap.dedent("""\
    rules:
      key-size: {rsa: 3072, severity: critical}
      tags-required: {tags: [env]}
    issuers:
      private: ["CN=Corp Issuing*"]
    ownership:
      - match: {domain: pay.example.com}
        owner: payments
    """)


def test_show_gives_the_policy_in_force_and_its_waivers(engine: sa.Engine, tmp_path: Path) -> None:
    builtin = as_json("policy", "show")
    assert (builtin["source"], builtin["sha256"], builtin["waivers"]) == ("built-in", None, [])
    assert set(builtin["rules"]) == set(RULES) and builtin["rules"]["tags-required"]["enabled"] is False
    assert "the built-in policy (no policy file at" in cli("policy", "show").stdout

    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    as_json("policy", "waive", "tags-required", "--scope", "owner=web", "--reason", "r", "--approver", "a",
            "--expires", "1d")
    shown = as_json("policy", "show", CERTPILOT_POLICY=str(path))
    assert (shown["source"], len(shown["sha256"])) == (str(path), 64)
    assert shown["rules"]["key-size"] == {"enabled": True, "severity": "critical", "about": "certificate",
                                          "settings": {"rsa": 3072, "ec": 256, "dsa": 2048}}
    assert shown["issuers"] == {"private": ["CN=Corp Issuing*"]}
    assert shown["ownership"] == [{"owner": "payments", "match": {"domain": "pay.example.com"}, "line": 7}]
    assert [w["rule"] for w in shown["waivers"]] == ["tags-required"]
    text = cli("policy", "show", CERTPILOT_POLICY=str(path)).stdout
    assert f"policy in force: {path} (sha256 " in text and "ownership (line 7): domain=pay.example.com -> payments" \
        in text and "tags-required" in text


def test_a_bad_policy_file_is_named_with_its_line_and_exits_2(engine: sa.Engine, estate: dict[str, str],
                                                              tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("rules:\n  key-size: {rsa: 2048}\n  no-such-rule: on\n")
    for command in ("check", "show"):
        result = cli("policy", command, CERTPILOT_POLICY=str(path))
        assert result.exit_code == 2 and f"error: {path}:3: unknown rule 'no-such-rule'" in result.stderr
        assert "Traceback" not in result.output
    report = as_json("policy", "check", code=2, CERTPILOT_POLICY=str(path))
    assert report["exit_code"] == 2 and report["error"].startswith(f"{path}:3: unknown rule")
    with read_session(engine) as session:  # nothing evaluated with a policy that does not parse
        assert session.execute(sa.text("select count(*) from policy_violation")).scalar_one() == 0

    missing = cli("policy", "check", CERTPILOT_POLICY=str(tmp_path / "missing.yaml"))
    assert missing.exit_code == 1 and "missing.yaml (CERTPILOT_POLICY) does not exist" in missing.stderr

    path.write_text(POLICY)  # a good one: RSA below 3072 and a missing env tag are found
    report = as_json("policy", "check", code=1, CERTPILOT_POLICY=str(path))
    assert report["policy"]["source"] == str(path)
    assert {(v["rule"], v["severity"]) for v in report["violations"] if v["fingerprint_sha256"] == estate["weak"]} \
        == {("key-size", "critical"), ("tags-required", "low")}
