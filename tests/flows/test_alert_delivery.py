"""Alerts delivered through Prefect notification blocks to real loopback receivers: an HTTP webhook
receiver (CustomWebhookNotificationBlock) and an aiosmtpd SMTP server (blocks.notifications'
EmailNotification). One message per alert across repeated observations, another on escalation,
one on resolution; a channel that is down or black-holed is a failed delivery within its deadline
while the other channels still get their messages; the daily digest goes out once per owner."""

from __future__ import annotations

import datetime as dt
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from prefect import flow
from prefect.blocks.notifications import CustomWebhookNotificationBlock

import tasks.alerting
from blocks.notifications import EmailNotification
from certpilot import alert_policy
from certpilot.alerts import Condition, Finding, Scope, Severity
from certpilot.clock import utcnow
from certpilot.database import get_engine, read_session, write_session
from lab.receivers import BlackHole, SmtpReceiver, WebhookReceiver, closed_port
from tasks.alerting import AlertSummary, raise_alerts

EXPIRY = Scope(frozenset({Condition.EXPIRING, Condition.EXPIRED}))


def _finding(n: int, severity: Severity = Severity.CRITICAL, owner: str = "payments") -> Finding:
    not_after = utcnow() + dt.timedelta(days=3)
    return Finding(f"certificate:{n:064x}", Condition.EXPIRING, severity, f"pay{n}.example.test expires in 3 days",
                   owner=owner, tags={"env": "prod"},
                   details={"certificate": f"pay{n}.example.test", "not_after": not_after.isoformat(),
                            "served_at": [f"tls://127.0.0.1:{8000 + n}?sni=pay{n}.example.test"]})


@flow(name="alert-sensor")
def sensor(numbers: list[int], severity: str = "critical") -> AlertSummary:
    """A stand-in for the monitor flow: what it found, raised through the task."""
    return raise_alerts([_finding(n, Severity(severity)) for n in numbers], EXPIRY)


@pytest.fixture
def receivers(prefect_server: None) -> Iterator[tuple[WebhookReceiver, SmtpReceiver]]:
    with WebhookReceiver() as hook, SmtpReceiver() as smtp:
        yield hook, smtp


def _save_channels(hook_url: str, smtp_port: int, suffix: str) -> tuple[str, str]:
    CustomWebhookNotificationBlock(name=f"payments-{suffix}", url=hook_url,
                                   json_data={"subject": "{{subject}}", "body": "{{body}}"}
                                   ).save(f"payments-{suffix}", overwrite=True)
    EmailNotification(smtp_host="127.0.0.1", smtp_port=smtp_port, security="plain",
                      from_address="certpilot@example.test", to_addresses=["payments@example.test"],
                      timeout_seconds=2).save(f"payments-{suffix}", overwrite=True)
    return f"custom-webhook/payments-{suffix}", f"email-notification/payments-{suffix}"


def _load_policy(notify: list[str], page: list[str] | None = None) -> None:
    text = textwrap.dedent(f"""\
        routes:
          - match: {{owner: payments}}
            notify: [{", ".join(notify)}]
            page: [{", ".join(page or [])}]
        default:
          notify: [{notify[0]}]
        """)
    with write_session(get_engine()) as session:
        alert_policy.load_policy(session, text, "test", utcnow())


def _deliveries() -> list[sa.Row]:
    with read_session(get_engine()) as session:
        return list(session.execute(sa.text(
            "select alert_id, kind, channel, ok, attempts, error from alert_delivery order by id")).all())


def test_one_message_per_alert_another_on_escalation_one_on_resolution(
        receivers: tuple[WebhookReceiver, SmtpReceiver], certpilot_home: Path) -> None:
    hook, smtp = receivers
    webhook, mail = _save_channels(hook.url, smtp.port, "main")
    _load_policy([webhook, mail])

    for _run in range(3):  # three monitor runs see the same two certificates
        sensor([1, 2])
    assert sensor([1, 2]) == AlertSummary(0, 0, 0, 0, 0, 0)
    requests, messages = hook.wait_for(2), smtp.wait_for(2)
    time.sleep(0.3)  # nothing more arrives
    assert len(hook.requests) == 2 and len(smtp.messages) == 2
    subjects = sorted(r.json()["subject"] for r in requests)
    assert subjects == ["[certpilot CRITICAL] expiring pay1.example.test",
                        "[certpilot CRITICAL] expiring pay2.example.test"]
    body = next(r.json()["body"] for r in requests if "pay1" in r.json()["subject"])
    for expected in ("pay1.example.test expires in 3 days", "condition: expiring", "severity: critical",
                     "days left: 3", "served at: tls://127.0.0.1:8001?sni=pay1.example.test", "owner: payments",
                     "what to do: renew it", "Prefect run: "):
        assert expected in body, body
    mail_subjects = sorted(str(m["Subject"]) for m in messages)
    assert mail_subjects == subjects and {str(m["To"]) for m in messages} == {"payments@example.test"}
    assert "days left: 3" in messages[0].get_content()

    escalated = sensor([1, 2], "page")  # a tighter band: both escalate, told once more each
    assert (escalated.escalated, escalated.delivered, escalated.failed_deliveries) == (2, 4, 0)
    sensor([1, 2], "page")
    assert sorted(r.json()["subject"] for r in hook.wait_for(4)[2:]) == [
        "[certpilot PAGE] escalated: expiring pay1.example.test", "[certpilot PAGE] escalated: expiring pay2.example.test"]
    smtp.wait_for(4)

    resolved = sensor([2], "page")  # certificate 1 was renewed: not found again
    assert (resolved.resolved, resolved.delivered) == (1, 2)
    assert [r.json()["subject"] for r in hook.wait_for(5)[4:]] == ["[certpilot PAGE] resolved: expiring pay1.example.test"]
    smtp.wait_for(5)
    time.sleep(0.3)
    assert (len(hook.requests), len(smtp.messages)) == (5, 5)

    rows = _deliveries()
    assert len(rows) == 10 and all(r.ok and r.attempts == 1 for r in rows)
    assert sorted({r.kind for r in rows}) == ["escalated", "opened", "resolved"]
    with read_session(get_engine()) as session:
        sent = dict(session.execute(sa.text("select object, notifications_sent from alert")).all())
    assert sent == {f"certificate:{1:064x}": 6, f"certificate:{2:064x}": 4}


def test_a_down_or_black_holed_channel_fails_within_its_deadline_and_the_others_still_get_theirs(
        receivers: tuple[WebhookReceiver, SmtpReceiver], certpilot_home: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    hook, smtp = receivers
    webhook, mail = _save_channels(hook.url, smtp.port, "ok")
    with BlackHole() as hole:
        CustomWebhookNotificationBlock(name="down", url=f"http://127.0.0.1:{closed_port()}/hook"
                                       ).save("down", overwrite=True)
        CustomWebhookNotificationBlock(name="hole", url=hole.url).save("hole", overwrite=True)
        EmailNotification(smtp_host="127.0.0.1", smtp_port=hole.port, security="plain", timeout_seconds=5,
                          from_address="certpilot@example.test", to_addresses=["x@example.test"]).save("hole",
                                                                                                       overwrite=True)
        _load_policy([webhook, mail, "custom-webhook/down", "custom-webhook/hole", "email-notification/hole",
                      "custom-webhook/never-saved"])
        monkeypatch.setattr(tasks.alerting, "DELIVERY_TIMEOUT", 2.0)
        started = time.monotonic()
        summary = sensor(list(range(20)))  # the run completes: a channel never fails monitoring
        elapsed = time.monotonic() - started
    assert (summary.opened, summary.delivered, summary.failed_deliveries) == (20, 40, 80)
    # About two attempts of at most 2 s each and a retry pause, the dead channels side by side (some 5 s, more on
    # a loaded machine); never a deadline per alert (20 alerts x 2 attempts x 2 s = 80 s per channel).
    assert elapsed < 30, elapsed
    rows = _deliveries()
    # Every alert reached both good channels; a message is sent again only when an attempt missed its deadline
    # (at least once delivery), so what arrived is at most the attempts made.
    assert len({r.json()["subject"] for r in hook.wait_for(20)}) == 20
    assert len({str(m["Subject"]) for m in smtp.wait_for(20)}) == 20
    for channel, arrived in ((webhook, hook.requests), (mail, smtp.messages)):
        assert 20 <= len(arrived) <= sum(r.attempts for r in rows if r.channel == channel and r.ok)
    failed = {}
    for row in rows:
        if not row.ok:
            failed.setdefault(row.channel, []).append(row)
    assert sorted(failed) == ["custom-webhook/down", "custom-webhook/hole", "custom-webhook/never-saved",
                              "email-notification/hole"]
    assert all(len(items) == 20 for items in failed.values())
    for channel in ("custom-webhook/hole", "email-notification/hole"):
        errors = {r.error for r in failed[channel]}
        assert "no answer within 2 s" in errors
        assert f"not tried: {channel} failed earlier in this run (no answer within 2 s)" in errors
        assert max(r.attempts for r in failed[channel]) == 2
    assert any("ConnectError" in (r.error or "") for r in failed["custom-webhook/down"])
    assert all(r.error.startswith("cannot load notification block custom-webhook/never-saved: block "
                                  "'custom-webhook/never-saved' not found") and r.attempts == 0
               for r in failed["custom-webhook/never-saved"])
    assert not any(str(hole.port) in (r.error or "") and "/hook" in (r.error or "") for r in rows)


def test_ticket_alerts_go_to_one_daily_digest_per_owner(receivers: tuple[WebhookReceiver, SmtpReceiver],
                                                        certpilot_home: Path) -> None:
    hook, smtp = receivers
    webhook, mail = _save_channels(hook.url, smtp.port, "digest")
    _load_policy([webhook])
    engine = get_engine()
    findings = [_finding(1, Severity.TICKET), _finding(2, Severity.TICKET),
                _finding(3, Severity.TICKET, owner="web"), _finding(4, Severity.CRITICAL, owner="web")]
    summary, _ = tasks.alerting.raise_and_deliver(engine, findings, EXPIRY, utcnow())
    assert (summary.opened, summary.delivered) == (4, 1)  # only the CRITICAL one at once
    hook.wait_for(1)
    morning = dt.datetime.combine(utcnow().date(), dt.time(7, 0), tzinfo=dt.timezone.utc)
    assert tasks.alerting.digest_and_deliver(engine, morning)[0].sent == 0  # before the digest time (08:00)
    first, _ = tasks.alerting.digest_and_deliver(engine, morning + dt.timedelta(hours=2))
    again, _ = tasks.alerting.digest_and_deliver(engine, morning + dt.timedelta(hours=5))
    assert (first.sent, first.alerts, again.sent, again.already_sent) == (2, 3, 0, 2)
    digests = {r.json()["subject"]: r.json()["body"] for r in hook.wait_for(3)[1:]}
    assert sorted(digests) == ["[certpilot] daily digest for payments: 2 ticket-level alert(s)",
                               "[certpilot] daily digest for web: 1 ticket-level alert(s)"]
    payments = digests["[certpilot] daily digest for payments: 2 ticket-level alert(s)"]
    assert "pay1.example.test" in payments and "pay2.example.test" in payments and "pay3" not in payments
    assert "served at tls://127.0.0.1:8001?sni=pay1.example.test" in payments
    tomorrow, _ = tasks.alerting.digest_and_deliver(engine, morning + dt.timedelta(days=1, hours=2))
    assert tomorrow.sent == 2
