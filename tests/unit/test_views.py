"""The operators' views (certpilot.views) and the executive chart (certpilot.charts), without Prefect:
what each view counts at a fixed time, escaping of what the inventory holds, the trend's calendar
days, and a chart that is a real PNG of the promised size."""

from __future__ import annotations

import base64
import datetime as dt
import re
import struct

import sqlalchemy as sa

from certpilot import audit, inventory, managed, sli, targets, views
from certpilot.charts import trend_png
from certpilot.database import read_session, write_session
from certpilot.models import Alert
from certpilot.sample_estate import issue_leaf, make_ca
from certpilot.x509info import describe_certificate

UTC = dt.timezone.utc
NOW = dt.datetime(2026, 3, 10, 9, 30, tzinfo=UTC)
ACTOR = audit.Actor("cli:bob")
NGINX = {"certificate_path": "/etc/nginx/web.crt", "key_path": "/etc/nginx/web.key"}


def test_escape_keeps_inventory_text_as_text() -> None:
    assert views.escape("a|b *c* _d_ [e](f) `g` ~h~ \\") == "a\\|b \\*c\\* \\_d\\_ \\[e\\](f) \\`g\\` \\~h\\~ \\\\"
    assert views.escape("<script>alert(1)</script> & co") == "&lt;script&gt;alert(1)&lt;/script&gt; &amp; co"
    assert views.escape("two\nlines\r\tand  tabs") == "two lines and tabs"


def test_on_call_bands_and_what_is_in_progress(engine: sa.Engine) -> None:
    authority = make_ca("Views Test CA")
    with write_session(engine) as session:
        for name, hours in (("in5h", 5), ("in23h", 23), ("in71h", 71), ("in73h", 73), ("gone", -2)):
            cert, _ = issue_leaf(authority, [f"{name}.example.test"], NOW + dt.timedelta(hours=hours), now=NOW)
            inventory.upsert(session, [inventory.Observation(describe_certificate(cert), f"tls://{name}:443", "tls")],
                             ACTOR, owner="team|pay", now=NOW)
        managed.add(session, managed.ManagedSpec(name="web", dns_names=("web.example.test",), issuer="sample/ca",
                                                 owner="platform"), ACTOR, now=NOW)
        row = managed.get(session, "web")
        row.last_error, row.last_attempt_at = "issue: <b>refused</b>", NOW - dt.timedelta(hours=2)
        session.add(row)
        target = targets.add(session, "web", "edge", "ssh-nginx", "ssh-host/edge", NGINX, ACTOR, now=NOW)
        targets.set_desired(session, target, "ab" * 32, ACTOR, now=NOW)
        session.add_all([Alert(object=f"managed:web{h}", condition="renewal-failed", severity=severity, state=state,
                               summary=f"{severity} {state}", first_seen=NOW - dt.timedelta(hours=h), last_seen=NOW)
                         for severity, state, h in (("critical", "open", 3), ("page", "escalated", 1),
                                                    ("ticket", "open", 4), ("page", "suppressed", 5))])
    with read_session(engine) as session:
        view = views.on_call_view(session, NOW)
    assert view.expiring == ((6, 1), (24, 2), (72, 3))
    assert [c.name for c in view.soonest] == ["in5h.example.test", "in23h.example.test", "in71h.example.test"]
    assert [round(c.hours_left) for c in view.soonest] == [5, 23, 71] and view.soonest[0].places == 1
    assert [(f.name, f.error, f.current_not_after) for f in view.failing_renewals] == [
        ("web", "issue: <b>refused</b>", None)]
    [deployment] = view.deployments
    assert (deployment.managed, deployment.target, deployment.desired, deployment.verified) == ("web", "edge",
                                                                                                 "ab" * 32, None)
    # open and escalated PAGE and CRITICAL ones, pages first; a ticket and a suppressed page are not on call
    assert [a.summary for a in view.alerts] == ["page escalated", "critical open"]
    text = views.on_call_markdown(view)
    assert "issue: &lt;b&gt;refused&lt;/b&gt;" in text and "<b>" not in text
    assert "| 5.0 | 2026-03-10 14:30 UTC | in5h.example.test |" in text and "team\\|pay" in text
    assert f"| web | edge | ssh-nginx | {'ab' * 8} | never |" in text
    assert "## Revocations since 2026-03-03 09:30 UTC\n\nNone." in text


def test_executive_trend_counts_calendar_days_and_draws_a_png(engine: sa.Engine) -> None:
    events = [("certificate.issued", {"managed": "a"}, NOW - dt.timedelta(days=2, hours=1)),
              ("certificate.issued", {"managed": "b"}, NOW - dt.timedelta(hours=9, minutes=29)),  # 00:01 today
              ("renewal.failed", {"step": "issue"}, NOW - dt.timedelta(hours=9, minutes=31)),  # 23:59 yesterday
              ("certificate.issued", {"ca": "corp"}, NOW - dt.timedelta(hours=1)),  # not a renewal
              ("certificate.issued", {"managed": "old"}, NOW - dt.timedelta(days=8))]  # before the window
    with write_session(engine) as session:
        for action, details, at in events:
            audit.append(session, ACTOR, [audit.Change(action, "certificate:" + "0" * 64, details)], at)
        session.add(Alert(object="place:x", condition="unreachable", severity="critical", state="open", summary="x",
                          first_seen=NOW - dt.timedelta(minutes=5), last_seen=NOW))
    with read_session(engine) as session:
        report = sli.compute(session, dt.timedelta(days=7), NOW)
        view = views.executive_view(session, report)
    assert view.trend_bin == dt.timedelta(days=1) and len(view.trend) == 8  # 3 March (part) to 10 March (part)
    assert view.trend[0].start == dt.datetime(2026, 3, 3, tzinfo=UTC)
    busy = {d.start.date().isoformat(): (d.renewed, d.failed, d.incidents) for d in view.trend
            if d.renewed or d.failed or d.incidents}
    assert busy == {"2026-03-08": (1, 0, 0), "2026-03-09": (0, 1, 0), "2026-03-10": (1, 0, 1)}
    assert len(view.expiring_weeks) == views.WEEKS_AHEAD and view.open_alerts[:2] == (("page", 0), ("critical", 1))

    png = trend_png(view)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24]) == (720, 230)
    text = views.executive_markdown(view, png)
    [encoded] = re.findall(r"\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", text)
    assert base64.b64decode(encoded) == png
    assert "| 2026-03-09 | 0 | 1 | 0 |" in text and "| renewal success (M2) | 66.7 % (2 of 3) |" in text
    assert "data:image" not in views.executive_markdown(view)  # without a chart, only the tables
