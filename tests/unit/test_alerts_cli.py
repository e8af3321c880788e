"""`certpilot alerts list|ack|policy load|policy show` and `certpilot suppress add|list|end|load`, on
SQLite and PostgreSQL: the core only, no Prefect. Exit codes 0, 1 (failed), 2 (usage); --json."""

from __future__ import annotations

import datetime as dt
import json
import textwrap
from pathlib import Path

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner, Result

from certpilot import alerts
from certpilot.alerts import Condition, Finding, Scope, Severity
from certpilot.clock import utcnow
from certpilot.database import read_session, write_session
from cli.alerts import AlertState
from cli.main import app

pytestmark = pytest.mark.usefixtures("no_prefect_api")

runner = CliRunner()


def cli(*args: str) -> Result:
    return runner.invoke(app, list(args), env={"CERTPILOT_ACTOR": "cli:alice", "COLUMNS": "250"})


def ok(*args: str) -> str:
    result = cli(*args)
    assert result.exit_code == 0, result.output
    return result.stdout


def _seed(engine: sa.Engine) -> list[alerts.Transition]:
    findings = [Finding(f"certificate:{n:064x}", Condition.EXPIRING, severity, f"www{n}.example.test expires soon",
                        owner=owner, details={"certificate": f"www{n}.example.test"})
                for n, severity, owner in ((1, Severity.TICKET, "web"), (2, Severity.PAGE, "payments"),
                                           (3, Severity.CRITICAL, "payments"))]
    with write_session(engine) as session:
        return alerts.observe(session, findings, Scope(frozenset({Condition.EXPIRING})), utcnow())


def test_states_offered_are_exactly_the_cores() -> None:
    assert tuple(s.value for s in AlertState) == alerts.STATES


def test_alerts_list_and_ack(engine: sa.Engine) -> None:
    opened = {t.object[-1]: t.alert_id for t in _seed(engine)}
    rows = json.loads(ok("alerts", "list", "--json"))
    assert [(r["severity"], r["owner"]) for r in rows] == [("page", "payments"), ("critical", "payments"),
                                                           ("ticket", "web")]
    assert rows[0]["first_seen"].endswith("Z") and rows[0]["details"] == {"certificate": "www2.example.test"}
    assert [r["id"] for r in json.loads(ok("alerts", "list", "--owner", "web", "--json"))] == [opened["1"]]
    assert json.loads(ok("alerts", "list", "--state", "resolved", "--json")) == []
    table = ok("alerts", "list")
    assert "www2.example.test" in table and "3 alert(s)" in table

    acked = json.loads(ok("alerts", "ack", str(opened["2"]), "--json"))
    assert (acked["acknowledged_by"], acked["state"]) == ("cli:alice", "open")
    assert "acknowledged by cli:alice" in ok("alerts", "ack", str(opened["3"]))
    assert "(ack cli:alice)" in ok("alerts", "list")
    with read_session(engine) as session:
        events = session.execute(sa.text("select actor, action, object from audit_event order by seq")).all()
    assert [tuple(e) for e in events] == [("cli:alice", "alert.acknowledged", f"alert:{opened['2']}"),
                                          ("cli:alice", "alert.acknowledged", f"alert:{opened['3']}")]

    missing = cli("alerts", "ack", "9999", "--json")
    assert missing.exit_code == 1 and json.loads(missing.stdout) == {"error": "no alert with id 9999", "exit_code": 1}
    assert cli("alerts", "list", "--state", "closed").exit_code == 2
    assert cli("alerts", "ack", "seven").exit_code == 2


def test_policy_load_and_show(engine: sa.Engine, tmp_path: Path) -> None:
    assert "no alert policy loaded" in ok("alerts", "policy", "show")
    text = textwrap.dedent("""\
        routes:
          - match: {owner: payments}
            notify: [custom-webhook/payments]
            page: [pager-duty-webhook/payments]
        default:
          notify: [email-notification/ops]
        bands: {critical_days: 5, warning_days: 21}
        """)
    (tmp_path / "policy.yaml").write_text(text)
    loaded = ok("alerts", "policy", "load", str(tmp_path / "policy.yaml"))
    assert "1 route(s) and a default, 3 channel(s), bands 5/21 days, digest at 08:00 UTC" in loaded
    shown = json.loads(ok("alerts", "policy", "show", "--json"))
    assert shown["routes"] == [{"match": {"owner": "payments"}, "notify": ["custom-webhook/payments"],
                                "page": ["pager-duty-webhook/payments"]}]
    assert shown["text"] == text and shown["loaded_by"] == "cli:alice" and shown["bands"]["critical_days"] == 5
    assert ok("alerts", "policy", "show").splitlines()[1:] == text.rstrip("\n").splitlines()

    (tmp_path / "bad.yaml").write_text("default:\n  notify: [ops]\n")
    bad = cli("alerts", "policy", "load", str(tmp_path / "bad.yaml"))
    assert bad.exit_code == 1
    assert bad.stderr.startswith(f"error: {tmp_path / 'bad.yaml'}:2: 'ops' in default's notify is not a "
                                 "notification block reference")
    assert json.loads(ok("alerts", "policy", "show", "--json"))["id"] == shown["id"]  # refused: unchanged
    assert cli("alerts", "policy", "load", str(tmp_path / "missing.yaml")).exit_code == 2
    with read_session(engine) as session:
        assert session.execute(sa.text("select count(*) from audit_event where action = 'alert-policy.loaded'"
                                       )).scalar() == 1


def test_suppress_add_list_end(engine: sa.Engine) -> None:
    added = json.loads(ok("suppress", "add", "--scope", "owner=payments", "--until", "2h", "--reason", "migration",
                          "--json"))
    assert (added["state"], added["created_by"], added["scope"]) == ("active", "cli:alice", "owner=payments")
    until = dt.datetime.fromisoformat(added["ends_at"].replace("Z", "+00:00"))
    assert dt.timedelta(hours=1, minutes=59) < until - utcnow() <= dt.timedelta(hours=2)
    later = ok("suppress", "add", "--scope", "tag:env=staging", "--from", "2099-01-01T00:00:00Z",
               "--until", "2099-01-02T00:00:00+01:00", "--reason", "rebuild")
    assert "scheduled from 2099-01-01 00:00 until 2099-01-01 23:00 UTC" in later
    _seed(engine)
    states = {(r["owner"], r["state"]) for r in json.loads(ok("alerts", "list", "--json"))}
    assert states == {("payments", "suppressed"), ("web", "open")}
    listed = json.loads(ok("suppress", "list", "--json"))
    assert [(s["scope"], s["state"]) for s in listed] == [("owner=payments", "active"),
                                                          ("tag:env=staging", "scheduled")]
    assert "owner=payments" in ok("suppress", "list") and "2 suppression(s)" in ok("suppress", "list")
    assert "ended" in ok("suppress", "end", str(added["id"]))
    assert [s["scope"] for s in json.loads(ok("suppress", "list", "--json"))] == ["tag:env=staging"]
    assert [s["state"] for s in json.loads(ok("suppress", "list", "--all", "--json"))] == ["ended", "scheduled"]
    with read_session(engine) as session:
        actions = [r[0] for r in session.execute(sa.text("select action from audit_event order by seq")).all()]
    assert actions == ["suppression.added", "suppression.added", "suppression.ended"]
    assert cli("suppress", "end", "999").exit_code == 1


@pytest.mark.parametrize(("args", "message"), [
    (["--scope", "colour=red", "--until", "2h", "--reason", "r"], "scope must be owner=X"),
    (["--scope", "owner=a", "--until", "soon", "--reason", "r"], "'soon' is neither a time"),
    (["--scope", "owner=a", "--until", "2030-01-01T00:00:00", "--reason", "r"], "has no time zone"),
    (["--scope", "owner=a", "--until", "2000-01-01T00:00:00Z", "--reason", "r"], "--until must be in the future"),
    (["--scope", "owner=a", "--until", "2h", "--from", "3h", "--reason", "r"], "--until must be after"),
    (["--scope", "owner=a", "--until", "2h"], "Missing option '--reason'"),
])
def test_suppress_add_usage_errors_exit_2(engine: sa.Engine, args: list[str], message: str) -> None:
    result = cli("suppress", "add", *args)
    assert result.exit_code == 2 and message in result.stderr, result.output


def test_suppress_load(engine: sa.Engine, tmp_path: Path) -> None:
    (tmp_path / "s.yaml").write_text(textwrap.dedent("""\
        suppressions:
          - scope: owner=payments,condition=expiring
            end: 2099-01-02T06:00:00Z
            reason: planned migration
          - scope: certificate=www.example.test
            start: 2099-01-01T00:00:00Z
            end: 2099-01-03T00:00:00Z
            reason: decommissioning
        """))
    loaded = json.loads(ok("suppress", "load", str(tmp_path / "s.yaml"), "--json"))
    assert [(s["scope"], s["state"]) for s in loaded] == [("owner=payments,condition=expiring", "active"),
                                                          ("certificate=www.example.test", "scheduled")]
    (tmp_path / "past.yaml").write_text("suppressions:\n  - scope: owner=a\n    reason: r\n"
                                        "    end: 2001-01-01T00:00:00Z\n")
    past = cli("suppress", "load", str(tmp_path / "past.yaml"))
    assert past.exit_code == 1
    assert f"{tmp_path / 'past.yaml'}:2: end 2001-01-01T00:00:00Z must be in the future" in past.stderr
    (tmp_path / "bad.yaml").write_text("suppressions:\n  - scope: owner=a\n    end: 2099-01-01\n    reason: r\n"
                                       "  - scope: nothing\n    end: 2099-01-01T00:00:00Z\n    reason: r\n")
    bad = cli("suppress", "load", str(tmp_path / "bad.yaml"))
    assert bad.exit_code == 1 and f"{tmp_path / 'bad.yaml'}:3: suppression 1's end '2099-01-01' has no time zone" \
        in bad.stderr
    assert len(json.loads(ok("suppress", "list", "--json"))) == 2  # nothing of a refused file was added
