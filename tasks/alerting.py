"""Raising alerts and telling people, through Prefect notification blocks.

``raise_alerts(findings, scope)`` folds a sensor's findings into the inventory's alerts
(certpilot.alerts.record, in one write transaction), then delivers what changed to the channels the
alert policy routes it to (certpilot.alert_policy): CRITICAL alerts and resolutions to the route's
``notify`` blocks, PAGE alerts to its ``page`` blocks (or ``notify``). TICKET alerts wait for the
owner's daily digest (``send_digest``), one message per owner and channel per day.

Delivery never blocks or fails monitoring:
- each message has a deadline (DELIVERY_TIMEOUT seconds) and at most DELIVERY_ATTEMPTS attempts
  (a permanent refusal, such as an HTTP 4xx or a rejected SMTP login, is not retried);
- channels are served side by side, so a slow or dead channel does not delay the others;
- once a channel has failed BREAK_AFTER messages in a row after every attempt, its remaining
  messages of the same call are recorded as failed at once ("not tried: ..."), so a black-holed
  channel costs about two deadlines per call (its first messages are in flight side by side), not
  one per alert;
- delivery is at least once: a message whose answer missed the deadline is sent again, so a
  channel slower than the deadline may see it twice;
- every attempt's outcome is an AlertDelivery row (channel, ok, attempts, the redacted reason),
  visible with ``certpilot alerts list`` and in the inventory; nothing is raised.

Messages carry what the alert's details give (certificate, condition, severity, days left, where
it is served, owner, what to do) and a link to the Prefect UI run that raised them, when there is one.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

import blocks.notifications  # noqa: F401  (registers the e-mail block type, so load_block finds it)
from blocks.loading import load_block
from certpilot import alerts, audit
from certpilot.alert_policy import Policy, current_policy
from certpilot.alerts import Finding, Message, Scope, Severity, Transition
from certpilot.clock import utcnow
from certpilot.database import get_engine, read_session, write_session
from certpilot.errors import PermanentError, redact
from certpilot.models import Alert, AlertDelivery
from tasks.inventory import run_actor

DELIVERY_TIMEOUT = 5.0  # seconds per attempt of one message to one channel
DELIVERY_ATTEMPTS = 2
RETRY_DELAY = 0.5  # seconds between attempts
CONCURRENCY_PER_CHANNEL = 8  # messages in flight to one channel at once
BREAK_AFTER = 3  # messages failed in a row (after every attempt) before a channel is taken as down for the call
NO_CHANNEL = "(none)"  # the channel recorded when the policy routes an alert nowhere

_URL = re.compile(r"(https?|smtps?)://[^\s'\"<>]+")


@dataclass(frozen=True)
class AlertSummary:
    """What one raise_alerts call did."""

    opened: int
    escalated: int
    resolved: int
    suppressed: int
    delivered: int
    failed_deliveries: int


@dataclass(frozen=True)
class Outgoing:
    """One message for one channel: an alert's transition, or a digest (alert_id None)."""

    channel: str
    kind: str  # opened, escalated, resolved, digest
    message: Message
    alert_id: int | None
    owner: str | None


@dataclass(frozen=True)
class Delivered:
    outgoing: Outgoing
    ok: bool
    attempts: int
    error: str | None
    at: dt.datetime


# ---------------------------------------------------------------------------------------- delivery

def reason(exc: BaseException) -> str:
    """Why a delivery failed, safe to store: redacted, and URLs cut to scheme and host (a webhook's
    path or query is often its secret)."""
    if isinstance(exc, TimeoutError):
        return "no answer within the delivery deadline"
    return _URL.sub(lambda m: m.group(0).split("/", 3)[0] + "//" + m.group(0).split("/", 3)[2] + "/...",
                    redact(exc))


def _permanent(exc: BaseException) -> bool:
    if isinstance(exc, PermanentError):
        return True
    response = getattr(exc, "response", None)  # httpx.HTTPStatusError: a 4xx will not change by retrying
    status = getattr(response, "status_code", None)
    return isinstance(status, int) and 400 <= status < 500 and status not in (408, 429)


async def _notify(block: Any, message: Message) -> None:
    """One send through a Prefect notification block, raising when it failed (Apprise-based blocks
    only log failures unless asked to raise)."""
    raising = getattr(block, "raise_on_failure", None)
    send = getattr(block, "anotify", None) or block.notify
    if raising is not None:
        with raising():
            await send(message.body, message.subject)
    else:
        await send(message.body, message.subject)


def _serve_channel(channel: str, messages: Sequence[Outgoing], timeout: float, attempts: int,
                   load: Callable[[str], Any]) -> list[Delivered]:
    """Deliver ``messages`` to one channel, within its deadlines; never raises."""
    if channel == NO_CHANNEL:
        return [Delivered(m, False, 0, "no notification channel: the alert policy routes this alert nowhere "
                                       "(certpilot alerts policy load FILE)", utcnow()) for m in messages]
    try:
        block = load(channel)
    except Exception as exc:  # noqa: BLE001 - a missing or broken block fails its messages, not the run
        why = f"cannot load notification block {channel}: {reason(exc)}"
        return [Delivered(m, False, 0, why, utcnow()) for m in messages]
    broken: list[str] = []  # why the channel is taken as down for the rest of this call
    failures: list[str] = []  # messages that failed in a row after every attempt (a success clears it)

    async def one(item: Outgoing, gate: asyncio.Semaphore) -> Delivered:
        async with gate:
            tried, why, permanent = 0, "", False
            for attempt in range(1, attempts + 1):
                if broken:
                    return Delivered(item, False, tried, f"not tried: {channel} failed earlier in this run "
                                                         f"({broken[0]})", utcnow())
                tried = attempt
                try:
                    await asyncio.wait_for(_notify(block, item.message), timeout)
                    failures.clear()
                    return Delivered(item, True, tried, None, utcnow())
                except Exception as exc:  # noqa: BLE001 - any failure of a channel is recorded, never raised
                    why = f"no answer within {timeout:g} s" if isinstance(exc, TimeoutError) else reason(exc)
                    permanent = _permanent(exc)
                    if permanent:
                        break  # a refusal of this message (HTTP 4xx, a rejected recipient): retrying cannot help
                if attempt < attempts:
                    await asyncio.sleep(RETRY_DELAY)
            if not permanent:
                failures.append(why)
                if len(failures) >= BREAK_AFTER and not broken:
                    broken.append(why)  # down or hung: spare the rest of this call its deadlines
            return Delivered(item, False, tried, why, utcnow())

    async def everything() -> list[Delivered]:
        gate = asyncio.Semaphore(CONCURRENCY_PER_CHANNEL)
        return list(await asyncio.gather(*(one(m, gate) for m in messages)))

    # A loop of its own, closed without waiting for worker threads (a blocking send that missed its
    # deadline ends by its own socket timeout; asyncio.run would wait for it).
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(everything())
    finally:
        loop.close()


def deliver(outgoing: Sequence[Outgoing], timeout: float | None = None, attempts: int | None = None,
            load: Callable[[str], Any] = load_block) -> list[Delivered]:
    """Deliver every message, each channel in its own thread; the outcome of each, in no set order.
    ``timeout`` and ``attempts`` default to DELIVERY_TIMEOUT and DELIVERY_ATTEMPTS (read at the call)."""
    timeout = DELIVERY_TIMEOUT if timeout is None else timeout
    attempts = DELIVERY_ATTEMPTS if attempts is None else attempts
    by_channel: dict[str, list[Outgoing]] = {}
    for item in outgoing:
        by_channel.setdefault(item.channel, []).append(item)
    if not by_channel:
        return []
    with ThreadPoolExecutor(max_workers=min(16, len(by_channel)), thread_name_prefix="alert-channel") as pool:
        futures = [pool.submit(_serve_channel, channel, items, timeout, attempts, load)
                   for channel, items in by_channel.items()]
        return [delivered for future in futures for delivered in future.result()]


def record_deliveries(session: Any, delivered: Sequence[Delivered]) -> None:
    """AlertDelivery rows for every outcome, and each alert's count of messages that arrived."""
    if not delivered:
        return
    session.execute(sa.insert(AlertDelivery), [
        {"alert_id": d.outgoing.alert_id, "kind": d.outgoing.kind, "channel": d.outgoing.channel,
         "owner": d.outgoing.owner, "at": d.at, "ok": d.ok, "attempts": d.attempts, "error": d.error}
        for d in delivered])
    sent: dict[int, int] = {}
    for d in delivered:
        if d.ok and d.outgoing.alert_id is not None:
            sent[d.outgoing.alert_id] = sent.get(d.outgoing.alert_id, 0) + 1
    if sent:
        table = Alert.__table__  # type: ignore[attr-defined]
        session.connection().execute(
            sa.update(table).where(table.c.id == sa.bindparam("b_id")).values(
                notifications_sent=table.c.notifications_sent + sa.bindparam("b_sent")),
            [{"b_id": alert_id, "b_sent": count} for alert_id, count in sent.items()])


def outgoing_for(policy: Policy, transitions: Sequence[Transition], run_url: str | None = None) -> list[Outgoing]:
    """The messages the policy asks for: one per transition and channel of its route (none for
    TICKET, which waits for the digest; NO_CHANNEL when the route names no block)."""
    items = []
    for transition in transitions:
        if transition.severity == Severity.TICKET:
            continue
        channels = policy.route(transition.owner, transition.tags).channels(transition.severity) or (NO_CHANNEL,)
        message = alerts.render(transition, run_url)
        items += [Outgoing(channel, transition.kind, message, transition.alert_id, transition.owner)
                  for channel in channels]
    return items


# ------------------------------------------------------------------------------------ the two jobs

def raise_and_deliver(engine: sa.Engine, findings: Sequence[Finding], scope: Scope, now: dt.datetime,
                      run_url: str | None = None, timeout: float | None = None,
                      attempts: int | None = None, actor: audit.Actor | None = None) -> tuple[AlertSummary, list[Delivered]]:
    """``raise_alerts`` without Prefect's task machinery: observe, deliver, record. ``timeout`` and
    ``attempts`` default to DELIVERY_TIMEOUT and DELIVERY_ATTEMPTS. Each transition is also an audit
    event on the alert's object (``alert.opened``, ``alert.escalated``, ``alert.resolved``), so a
    certificate's history shows what monitoring found and when it was told."""
    with write_session(engine) as session:
        observation = alerts.record(session, findings, scope, now)
        audit.append(session, actor or audit.Actor("certpilot-monitor"), [
            audit.Change(f"alert.{t.kind}", t.object, {"alert": t.alert_id, "condition": t.condition.value,
                                                       "severity": t.severity.value, "summary": t.summary})
            for t in observation.transitions], now)
        policy = current_policy(session)
    delivered = deliver(outgoing_for(policy, observation.transitions, run_url), timeout, attempts)
    with write_session(engine) as session:
        record_deliveries(session, delivered)
    kinds = [t.kind for t in observation.transitions]
    summary = AlertSummary(kinds.count("opened"), kinds.count("escalated"), kinds.count("resolved"),
                           observation.suppressed, sum(d.ok for d in delivered), sum(not d.ok for d in delivered))
    return summary, delivered


@dataclass(frozen=True)
class DigestSummary:
    sent: int
    failed: int
    already_sent: int  # owner and channel pairs whose digest went out earlier today
    alerts: int  # ticket-level alerts in today's digests


def digest_and_deliver(engine: sa.Engine, now: dt.datetime, timeout: float | None = None,
                       attempts: int | None = None, force: bool = False) -> tuple[DigestSummary, list[Delivered]]:
    """Today's digests, once the policy's digest time has passed (or ``force``): each owner's open
    ticket-level alerts, one message per owner and channel per UTC day. A failed digest is tried
    again at the next call that day."""
    with read_session(engine) as session:
        policy = current_policy(session)
        if not force and now.time() < policy.digest_at:
            return DigestSummary(0, 0, 0, 0), []
        table = Alert.__table__  # type: ignore[attr-defined]
        rows = session.execute(sa.select(table).where(table.c.state.in_(("open", "escalated")),
                                                      table.c.severity == Severity.TICKET.value)).all()
        day = now.replace(hour=0, minute=0, second=0, microsecond=0)
        sent = AlertDelivery.__table__  # type: ignore[attr-defined]
        done = {(r.owner, r.channel) for r in session.execute(sa.select(sent.c.owner, sent.c.channel).where(
            sent.c.kind == "digest", sent.c.ok.is_(True), sent.c.at >= day)).all()}
    groups: dict[tuple[str | None, str], list[alerts.AlertView]] = {}
    for row in rows:
        view = alerts.AlertView.of(row)
        for channel in policy.route(view.owner, view.tags).notify or (NO_CHANNEL,):
            groups.setdefault((view.owner, channel), []).append(view)
    pending = {key: items for key, items in groups.items() if key not in done}
    outgoing = [Outgoing(channel, "digest", alerts.render_digest(owner, items, now), None, owner)
                for (owner, channel), items in sorted(pending.items(), key=lambda kv: (kv[0][0] or "", kv[0][1]))]
    delivered = deliver(outgoing, timeout, attempts)
    with write_session(engine) as session:
        record_deliveries(session, delivered)
    return DigestSummary(sum(d.ok for d in delivered), sum(not d.ok for d in delivered), len(groups) - len(pending),
                         sum(len(items) for items in pending.values())), delivered


def _run_url() -> str | None:
    try:
        return flow_run.get_flow_run_ui_url() if flow_run.get_id() else None
    except Exception:  # noqa: BLE001 - a link is a convenience; no UI URL configured is fine
        return None


def _log_failures(delivered: Sequence[Delivered]) -> None:
    logger = get_run_logger()
    failed: dict[str, list[Delivered]] = {}
    for d in delivered:
        if not d.ok:
            failed.setdefault(d.outgoing.channel, []).append(d)
    for channel, items in failed.items():
        logger.warning("%d message(s) to %s not delivered: %s", len(items), channel, items[0].error)


@task(name="raise-alerts", cache_policy=NO_CACHE, timeout_seconds=900)
def raise_alerts(findings: list[Finding], scope: Scope) -> AlertSummary:
    """Record the findings as alerts and tell whoever the policy routes their changes to."""
    summary, delivered = raise_and_deliver(get_engine(), findings, scope, utcnow(), _run_url(), actor=run_actor())
    _log_failures(delivered)
    get_run_logger().info("alerts: %d opened, %d escalated, %d resolved, %d suppressed; %d delivered, %d failed",
                          summary.opened, summary.escalated, summary.resolved, summary.suppressed, summary.delivered,
                          summary.failed_deliveries)
    return summary


@task(name="send-digest", cache_policy=NO_CACHE, timeout_seconds=600)
def send_digest(now: dt.datetime | None = None) -> DigestSummary:
    """The daily digest of ticket-level alerts, per owner, once a day after the policy's digest time."""
    summary, delivered = digest_and_deliver(get_engine(), now or utcnow())
    _log_failures(delivered)
    return summary

