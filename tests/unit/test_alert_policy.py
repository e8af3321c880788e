"""certpilot.alert_policy: routes, bands and digest time parsed from YAML, refused with the line and
the problem when malformed, stored so that the newest rules; suppressions files likewise."""

from __future__ import annotations

import datetime as dt
import textwrap

import pytest
import sqlalchemy as sa

from certpilot import alert_policy
from certpilot.alert_policy import PolicyFileError, Route
from certpilot.alerts import Bands, Severity
from certpilot.database import read_session, write_session

NOW = dt.datetime(2030, 1, 1, 12, 0, tzinfo=dt.timezone.utc)

POLICY = textwrap.dedent("""\
    routes:
      - match: {owner: payments}
        notify: [custom-webhook/payments]
        page: [pager-duty-webhook/payments]
      - match: {tag: "env=staging"}
        notify: [email-notification/staging]
      - match: {owner: web, tag: "env=prod"}
        notify: [slack-webhook/web-prod]
    default:
      notify: [custom-webhook/ops]
    bands: {critical_days: 10, warning_days: 45}
    digest: {at: "07:30"}
    """)


def test_a_policy_routes_by_owner_and_tag_first_match_wins() -> None:
    policy = alert_policy.parse_policy(POLICY)
    assert policy.bands == Bands(10, 45) and policy.digest_at == dt.time(7, 30)
    assert policy.route("payments", {"env": "staging"}).notify == ("custom-webhook/payments",)
    assert policy.route("other", {"env": "staging"}).notify == ("email-notification/staging",)
    assert policy.route("web", {"env": "prod"}).notify == ("slack-webhook/web-prod",)
    assert policy.route("web", {"env": "dev"}) == policy.default == Route(("custom-webhook/ops",))
    assert policy.route(None, {}) == policy.default
    payments = policy.route("payments", {})
    assert payments.channels(Severity.PAGE) == ("pager-duty-webhook/payments",)
    assert payments.channels(Severity.CRITICAL) == ("custom-webhook/payments",)
    assert payments.channels(Severity.TICKET) == ()  # the daily digest takes it
    assert policy.default.channels(Severity.PAGE) == ("custom-webhook/ops",)  # no page channels: notify
    assert policy.channels() == ("custom-webhook/payments", "pager-duty-webhook/payments",
                                 "email-notification/staging", "slack-webhook/web-prod", "custom-webhook/ops")


def test_a_minimal_policy_takes_the_default_bands_and_digest() -> None:
    policy = alert_policy.parse_policy("default: {notify: [custom-webhook/ops]}\n")
    assert policy.routes == () and policy.bands == Bands() and policy.digest_at == dt.time(8, 0)


@pytest.mark.parametrize(("text", "line", "problem"), [
    ("routes: [\n", 2, "not valid YAML"),
    ("- just a list\n", 1, "the policy must be a mapping"),
    ("default: {notify: [custom-webhook/ops]}\ncolour: red\n", 2, "unknown key 'colour' in the policy"),
    ("routes: []\n", 1, "the policy needs 'default'"),
    ("default: {notify: [custom-webhook/ops]}\ndefault: {notify: []}\n", 2, "'default' given twice"),
    ("default:\n  notify: [ops]\n", 2, "'ops' in default's notify is not a notification block reference"),
    ("default:\n  notify: custom-webhook/ops\n", 2, "default's notify must be a list"),
    ("default: {notify: [custom-webhook/ops]}\nroutes:\n  - notify: [custom-webhook/a]\n", 3,
     "route 1 needs 'match'"),
    ("default: {notify: [custom-webhook/ops]}\nroutes:\n  - match: {owner: a}\n    notify: [custom-webhook/a]\n"
     "  - match: {team: b}\n    notify: [custom-webhook/b]\n", 5, "unknown key 'team' in route 2's match"),
    ("default: {notify: [custom-webhook/ops]}\nroutes:\n  - match: {tag: prod}\n    notify: [custom-webhook/a]\n", 3,
     "tag 'prod' must be key=value"),
    ("default: {notify: [custom-webhook/ops]}\nroutes:\n  - match: {owner: a}\n    notify: []\n", 3,
     "route 1 sends nowhere"),
    ("default: {notify: [custom-webhook/ops]}\nbands:\n  critical_days: 30\n  warning_days: 7\n", 3,
     "critical_days (30) must be fewer than warning_days (7)"),
    ("default: {notify: [custom-webhook/ops]}\nbands:\n  critical_days: soon\n", 3, "critical_days must be a number"),
    ("default: {notify: [custom-webhook/ops]}\nbands:\n  warning_days: -1\n", 3, "warning_days must be more than 0"),
    ("default: {notify: [custom-webhook/ops]}\ndigest:\n  at: '25:00'\n", 3, "digest's at '25:00' must be"),
])
def test_a_malformed_policy_is_refused_naming_the_line_and_the_problem(text: str, line: int, problem: str) -> None:
    with pytest.raises(PolicyFileError) as raised:
        alert_policy.parse_policy(text, "policy.yaml")
    assert raised.value.line == line, str(raised.value)
    assert problem in raised.value.problem, str(raised.value)
    assert str(raised.value).startswith(f"policy.yaml:{line}: ")


def test_an_empty_policy_is_refused() -> None:
    with pytest.raises(PolicyFileError, match="policy.yaml: empty file"):
        alert_policy.parse_policy("", "policy.yaml")


def test_the_newest_stored_policy_rules_and_loading_is_audited(engine: sa.Engine) -> None:
    with read_session(engine) as session:
        before = alert_policy.stored_policy(session)
    assert before.id is None and before.policy == alert_policy.DEFAULT_POLICY and before.policy.channels() == ()
    with write_session(engine) as session:
        first = alert_policy.load_policy(session, POLICY, "alice", NOW, "policy.yaml")
    with write_session(engine) as session:
        again = alert_policy.load_policy(session, POLICY, "bob", NOW + dt.timedelta(hours=1))  # unchanged
        newer = alert_policy.load_policy(session, "default: {notify: [custom-webhook/new]}\n", "carol", NOW)
    assert again.id == first.id and newer.id != first.id
    with read_session(engine) as session:
        current = alert_policy.stored_policy(session)
        events = session.execute(sa.text("select actor, action, object from audit_event order by seq")).all()
    assert current.policy.default.notify == ("custom-webhook/new",) and current.loaded_by == "carol"
    assert [tuple(e) for e in events] == [("alice", "alert-policy.loaded", f"alert-policy:{first.id}"),
                                          ("carol", "alert-policy.loaded", f"alert-policy:{newer.id}")]
    with write_session(engine) as session, pytest.raises(PolicyFileError, match="bad.yaml:1: "):
        alert_policy.load_policy(session, "routes: 3\n", "dave", NOW, "bad.yaml")
    with read_session(engine) as session:
        assert alert_policy.stored_policy(session).id == newer.id  # a refused policy changes nothing


def test_a_suppressions_file() -> None:
    specs = alert_policy.parse_suppressions(textwrap.dedent("""\
        suppressions:
          - scope: owner=payments,condition=expiring
            start: 2030-01-01T00:00:00Z
            end: 2030-01-02T06:00:00+02:00
            reason: planned migration
          - scope: tag:env=staging
            end: "2030-02-01T00:00:00Z"
            reason: staging rebuild
        """))
    assert [(s.scope, s.starts_at, s.ends_at, s.reason, s.line) for s in specs] == [
        ("owner=payments,condition=expiring", dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc),
         dt.datetime(2030, 1, 2, 4, tzinfo=dt.timezone.utc), "planned migration", 2),
        ("tag:env=staging", None, dt.datetime(2030, 2, 1, tzinfo=dt.timezone.utc), "staging rebuild", 6)]


@pytest.mark.parametrize(("text", "line", "problem"), [
    ("suppressions:\n  - scope: colour=red\n    end: 2030-01-01T00:00:00Z\n    reason: r\n", 2, "scope must be"),
    ("suppressions:\n  - scope: owner=a\n    end: tomorrow\n    reason: r\n", 3, "is not an ISO 8601 time"),
    ("suppressions:\n  - scope: owner=a\n    end: 2030-01-01T00:00:00\n    reason: r\n", 3, "has no time zone"),
    ("suppressions:\n  - scope: owner=a\n    end: 2030-01-01T00:00:00Z\n", 2, "suppression 1 needs 'reason'"),
    ("suppressions:\n  - scope: owner=a\n    start: 2030-01-02T00:00:00Z\n    end: 2030-01-01T00:00:00Z\n"
     "    reason: r\n", 4, "suppression 1 ends before it starts"),
    ("suppressions:\n  - scope: owner=a\n    end: 2030-01-01T00:00:00Z\n    reason: r\n    who: me\n", 5,
     "unknown key 'who'"),
    ("windows: []\n", 1, "unknown key 'windows'"),
])
def test_a_malformed_suppressions_file_is_refused_naming_the_line(text: str, line: int, problem: str) -> None:
    with pytest.raises(PolicyFileError) as raised:
        alert_policy.parse_suppressions(text, "s.yaml")
    assert (raised.value.line, problem in raised.value.problem) == (line, True), str(raised.value)
