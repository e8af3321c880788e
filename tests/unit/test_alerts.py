"""certpilot.alerts on SQLite and PostgreSQL: one alert per (object, condition), told once, again only
on escalation or resolution; suppression windows; acknowledgement; the severity bands."""

from __future__ import annotations

import datetime as dt

import pytest
import sqlalchemy as sa

from certpilot import alerts
from certpilot.alerts import Bands, Condition, Finding, Scope, Severity
from certpilot.database import read_session, write_session
from certpilot.errors import InvalidOptionError, NotFoundError, PermanentError

NOW = dt.datetime(2030, 1, 1, 12, 0, tzinfo=dt.timezone.utc)
EXPIRY = Scope(frozenset({Condition.EXPIRING, Condition.EXPIRED}))


def _expiring(n: int, severity: Severity = Severity.CRITICAL, owner: str = "payments") -> Finding:
    fingerprint = f"{n:064x}"
    return Finding(f"certificate:{fingerprint}", Condition.EXPIRING, severity, f"www{n}.example.test expires soon",
                   owner=owner, tags={"env": "prod"},
                   details={"certificate": f"www{n}.example.test", "fingerprint": fingerprint,
                            "not_after": "2030-01-04T12:00:00Z", "served_at": [f"tls://10.0.0.{n % 250}:443"]})


def _observe(engine: sa.Engine, findings: list[Finding], scope: Scope = EXPIRY,
             now: dt.datetime = NOW) -> list[alerts.Transition]:
    with write_session(engine) as session:
        return alerts.observe(session, findings, scope, now)


def _rows(engine: sa.Engine) -> list[alerts.AlertView]:
    with read_session(engine) as session:
        return alerts.list_alerts(session, alerts.STATES)


def test_many_sensors_and_runs_make_one_alert_told_once(engine: sa.Engine) -> None:
    told = []
    for run in range(10):
        for _source in range(3):
            told += _observe(engine, [_expiring(n) for n in range(5)], now=NOW + dt.timedelta(minutes=15 * run))
    assert sorted((t.kind, t.object) for t in told) == [("opened", f"certificate:{n:064x}") for n in range(5)]
    rows = _rows(engine)
    assert len(rows) == 5 and {r.state for r in rows} == {"open"}
    assert {r.first_seen for r in rows} == {NOW} and {r.last_seen for r in rows} == {NOW + dt.timedelta(minutes=135)}
    assert {r.notified_severity for r in rows} == {"critical"}
    opened = told[0]
    assert opened.owner == "payments" and opened.tags == {"env": "prod"} and opened.severity == Severity.CRITICAL


def test_escalation_tells_again_a_lower_severity_does_not(engine: sa.Engine) -> None:
    assert [t.kind for t in _observe(engine, [_expiring(1, Severity.TICKET)])] == ["opened"]
    up = _observe(engine, [_expiring(1, Severity.CRITICAL)])
    assert [(t.kind, t.severity, t.previous_severity) for t in up] == [("escalated", Severity.CRITICAL,
                                                                        Severity.TICKET)]
    assert _observe(engine, [_expiring(1, Severity.TICKET)]) == []  # flapping back: silent, keeps the highest
    assert _observe(engine, [_expiring(1, Severity.CRITICAL)]) == []
    [row] = _rows(engine)
    assert (row.state, row.severity, row.notified_severity) == ("escalated", "critical", "critical")
    assert [t.kind for t in _observe(engine, [_expiring(1, Severity.PAGE)])] == ["escalated"]


def test_same_finding_twice_in_one_call_is_one_alert_at_its_highest_severity(engine: sa.Engine) -> None:
    told = _observe(engine, [_expiring(1, Severity.TICKET), _expiring(1, Severity.PAGE), _expiring(1)])
    assert [(t.kind, t.severity) for t in told] == [("opened", Severity.PAGE)]
    assert len(_rows(engine)) == 1


def test_not_found_again_in_scope_resolves_and_a_return_is_a_new_incident(engine: sa.Engine) -> None:
    _observe(engine, [_expiring(1), _expiring(2)])
    other = Finding("source:tls-scan:lab", Condition.SOURCE_STALE, Severity.TICKET, "stale")
    _observe(engine, [other], Scope(frozenset({Condition.SOURCE_STALE})))
    # Only certificate 1 was checked this time, and it is fine: it resolves; 2 and the source stay.
    scoped = Scope(frozenset({Condition.EXPIRING}), frozenset({f"certificate:{1:064x}"}))
    told = _observe(engine, [], scoped, NOW + dt.timedelta(hours=1))
    assert [(t.kind, t.object) for t in told] == [("resolved", f"certificate:{1:064x}")]
    states = {r.object: (r.state, r.resolved_at) for r in _rows(engine)}
    assert states[f"certificate:{1:064x}"] == ("resolved", NOW + dt.timedelta(hours=1))
    assert states[f"certificate:{2:064x}"] == ("open", None) and states["source:tls-scan:lab"] == ("open", None)
    assert _observe(engine, [], scoped, NOW + dt.timedelta(hours=2)) == []  # resolved once
    again = _observe(engine, [_expiring(1)], now=NOW + dt.timedelta(hours=3))  # every object checked: 2 is fine
    assert sorted((t.kind, t.object) for t in again) == [("opened", f"certificate:{1:064x}"),
                                                         ("resolved", f"certificate:{2:064x}")]
    assert len([r for r in _rows(engine) if r.object == f"certificate:{1:064x}"]) == 2


def test_thousands_of_findings_in_a_few_statements(engine: sa.Engine) -> None:
    statements = []

    def count(*_args: object) -> None:
        statements.append(1)

    findings = [_expiring(n) for n in range(2000)]
    sa.event.listen(engine, "before_cursor_execute", count)
    try:
        assert len(_observe(engine, findings)) == 2000
        first = len(statements)
        statements.clear()
        assert _observe(engine, findings, now=NOW + dt.timedelta(minutes=15)) == []
        second = len(statements)
    finally:
        sa.event.remove(engine, "before_cursor_execute", count)
    # A handful of statements each (the driver's executemany batching aside), not one per finding.
    assert first < 40 and second < 40, (first, second)
    assert len(_rows(engine)) == 2000


def _suppress(engine: sa.Engine, scope: str, start: dt.datetime, end: dt.datetime) -> int:
    with write_session(engine) as session:
        return alerts.add_suppression(session, scope, start, end, "maintenance", "alice", start).id


@pytest.mark.parametrize("scope", ["owner=payments", f"certificate={1:064x}"[:24], "certificate=www1.example.test",
                                   "tag:env=prod", "condition=expiring", f"object=certificate:{1:064x}",
                                   "owner=payments,condition=expiring"])
def test_suppressed_alerts_are_recorded_silently_then_notify_when_the_window_expires(engine: sa.Engine,
                                                                                     scope: str) -> None:
    _suppress(engine, scope, NOW, NOW + dt.timedelta(hours=2))
    assert _observe(engine, [_expiring(1)]) == []
    assert _observe(engine, [_expiring(1, Severity.PAGE)], now=NOW + dt.timedelta(hours=1)) == []
    [row] = _rows(engine)
    assert row.state == "suppressed" and row.severity == "page" and row.notified_severity is None
    told = _observe(engine, [_expiring(1, Severity.PAGE)], now=NOW + dt.timedelta(hours=2))  # expired by time
    assert [(t.kind, t.severity) for t in told] == [("opened", Severity.PAGE)]
    assert _rows(engine)[0].state == "open"


def test_a_suppression_that_does_not_match_changes_nothing(engine: sa.Engine) -> None:
    _suppress(engine, "owner=someone-else", NOW, NOW + dt.timedelta(hours=2))
    _suppress(engine, "tag:env=staging", NOW, NOW + dt.timedelta(hours=2))
    _suppress(engine, "certificate=www2.example.test", NOW, NOW + dt.timedelta(hours=2))
    _suppress(engine, "owner=payments", NOW + dt.timedelta(hours=1), NOW + dt.timedelta(hours=2))  # not yet
    assert [t.kind for t in _observe(engine, [_expiring(1)])] == ["opened"]


def test_ending_a_suppression_early_and_resolving_while_suppressed(engine: sa.Engine) -> None:
    first = _suppress(engine, "certificate=www1.example.test", NOW, NOW + dt.timedelta(days=1))
    _suppress(engine, "certificate=www2.example.test", NOW, NOW + dt.timedelta(days=1))
    assert _observe(engine, [_expiring(1), _expiring(2)]) == []
    with write_session(engine) as session:
        ended = alerts.end_suppression(session, first, "bob", NOW + dt.timedelta(minutes=5))
    assert ended.state(NOW + dt.timedelta(minutes=5)) == "ended"
    told = _observe(engine, [_expiring(1)], now=NOW + dt.timedelta(minutes=10))  # 2 not found: resolves silently
    assert [(t.kind, t.object) for t in told] == [("opened", f"certificate:{1:064x}")]
    assert {r.object: r.state for r in _rows(engine)}[f"certificate:{2:064x}"] == "resolved"
    with read_session(engine) as session:
        listed = alerts.list_suppressions(session, NOW + dt.timedelta(minutes=10))
        everything = alerts.list_suppressions(session, NOW + dt.timedelta(minutes=10), include_past=True)
        actions = session.execute(sa.text("select action, actor from audit_event order by seq")).all()
    assert [s.scope for s in listed] == ["certificate=www2.example.test"] and len(everything) == 2
    assert [tuple(a) for a in actions] == [("suppression.added", "alice"), ("suppression.added", "alice"),
                                           ("suppression.ended", "bob")]


def test_an_open_alert_becomes_suppressed_when_a_window_starts(engine: sa.Engine) -> None:
    _observe(engine, [_expiring(1, Severity.TICKET)])
    _suppress(engine, "owner=payments", NOW + dt.timedelta(minutes=1), NOW + dt.timedelta(hours=1))
    assert _observe(engine, [_expiring(1, Severity.PAGE)], now=NOW + dt.timedelta(minutes=2)) == []
    assert _rows(engine)[0].state == "suppressed"
    told = _observe(engine, [_expiring(1, Severity.PAGE)], now=NOW + dt.timedelta(hours=1))
    assert [(t.kind, t.previous_severity) for t in told] == [("escalated", Severity.TICKET)]


def test_acknowledged_alerts_notify_only_on_page_and_on_resolution(engine: sa.Engine) -> None:
    [opened] = _observe(engine, [_expiring(1, Severity.TICKET)])
    with write_session(engine) as session:
        view = alerts.acknowledge(session, opened.alert_id, "carol", NOW)
        alerts.acknowledge(session, opened.alert_id, "dave", NOW)  # again: no change, no second event
    assert (view.acknowledged_by, view.acknowledged_at) == ("carol", NOW)
    assert _observe(engine, [_expiring(1, Severity.CRITICAL)]) == []
    assert [t.kind for t in _observe(engine, [_expiring(1, Severity.PAGE)])] == ["escalated"]
    assert [t.kind for t in _observe(engine, [])] == ["resolved"]
    with read_session(engine) as session:
        events = session.execute(sa.text("select action, actor, object from audit_event")).all()
    assert [tuple(e) for e in events] == [("alert.acknowledged", "carol", f"alert:{opened.alert_id}")]
    with write_session(engine) as session, pytest.raises(PermanentError, match="already resolved"):
        alerts.acknowledge(session, opened.alert_id, "carol", NOW)
    with write_session(engine) as session, pytest.raises(NotFoundError, match="no alert with id 999"):
        alerts.acknowledge(session, 999, "carol", NOW)


def test_list_alerts_by_state_and_owner(engine: sa.Engine) -> None:
    _observe(engine, [_expiring(1, Severity.TICKET), _expiring(2, Severity.PAGE, owner="web"), _expiring(3)])
    with read_session(engine) as session:
        assert [r.severity for r in alerts.list_alerts(session)] == ["page", "critical", "ticket"]
        assert [r.owner for r in alerts.list_alerts(session, owner="web")] == ["web"]
        assert alerts.list_alerts(session, ["resolved"]) == []
        with pytest.raises(InvalidOptionError, match="--state must be one of"):
            alerts.list_alerts(session, ["closed"])


@pytest.mark.parametrize("bad", ["", "owner", "colour=red", "tag:env", "condition=melting", "owner=a,,tag:x=y"])
def test_bad_scopes_are_refused_naming_the_forms(bad: str) -> None:
    with pytest.raises(InvalidOptionError, match="scope must be"):
        alerts.parse_scope(bad)


def test_suppression_windows_are_checked(engine: sa.Engine) -> None:
    with write_session(engine) as session:
        with pytest.raises(InvalidOptionError, match="--until must be after"):
            alerts.add_suppression(session, "owner=x", NOW + dt.timedelta(hours=2), NOW + dt.timedelta(hours=1), "r",
                                   "alice", NOW)
        with pytest.raises(InvalidOptionError, match="--until must be in the future"):
            alerts.add_suppression(session, "owner=x", NOW - dt.timedelta(hours=2), NOW - dt.timedelta(hours=1),
                                   "r", "alice", NOW)
        with pytest.raises(InvalidOptionError, match="--reason"):
            alerts.add_suppression(session, "owner=x", NOW, NOW + dt.timedelta(hours=1), " ", "alice", NOW)


def test_expiry_bands() -> None:
    def at(days: float) -> tuple[Condition, Severity] | None:
        return alerts.expiry_severity(NOW + dt.timedelta(days=days), NOW)

    assert at(-1) == at(0) == (Condition.EXPIRED, Severity.PAGE)
    assert at(0.5) == at(6.99) == (Condition.EXPIRING, Severity.CRITICAL)
    assert at(7) == at(29.9) == (Condition.EXPIRING, Severity.TICKET)
    assert at(30) is None
    wide = Bands(critical_days=14, warning_days=60)
    assert alerts.expiry_severity(NOW + dt.timedelta(days=10), NOW, wide) == (Condition.EXPIRING, Severity.CRITICAL)
    assert alerts.expiry_severity(NOW + dt.timedelta(days=45), NOW, wide) == (Condition.EXPIRING, Severity.TICKET)
    with pytest.raises(InvalidOptionError):
        Bands(critical_days=30, warning_days=7)


def test_renewal_failure_and_overdue_severities() -> None:
    def failed(hours: float) -> Severity:
        return alerts.renewal_failure_severity(NOW + dt.timedelta(hours=hours), NOW)

    assert failed(11.9) == failed(-1) == Severity.PAGE
    assert failed(12) == failed(72) == Severity.CRITICAL
    assert failed(72.1) == Severity.TICKET
    assert alerts.renewal_overdue_severity(NOW + dt.timedelta(hours=71), NOW) == Severity.CRITICAL
    assert alerts.renewal_overdue_severity(NOW + dt.timedelta(days=10), NOW) == Severity.TICKET
    assert alerts.highest([Severity.TICKET, Severity.PAGE, Severity.CRITICAL]) == Severity.PAGE


def test_message_says_what_where_who_and_what_to_do(engine: sa.Engine) -> None:
    [opened] = _observe(engine, [_expiring(7)])
    message = alerts.render(opened)
    assert message.subject == "[certpilot CRITICAL] expiring www7.example.test"
    for expected in ("www7.example.test expires soon", "condition: expiring", "severity: critical", "days left: 3",
                     "served at: tls://10.0.0.7:443", "owner: payments", "what to do: renew it",
                     f"alert id: {opened.alert_id}"):
        assert expected in message.body
