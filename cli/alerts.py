"""`certpilot alerts list|ack|policy load|policy show` and `certpilot suppress add|list|end|load`:
the inventory's alerts, the alert policy (routes, bands, digest time) and suppression windows.
Acknowledging, suppressing and loading a policy are audited."""

from __future__ import annotations

import datetime as dt
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from certpilot import alert_policy, alerts
from certpilot.clock import utcnow
from certpilot.database import get_engine, read_session, write_session
from certpilot.errors import InvalidOptionError
from certpilot.timespan import parse_timespan
from cli.console import JsonOption, cell, line, out, print_json, usage_error
from cli.files import read_text_file
from cli.options import actor

app = typer.Typer(help="Alerts: one per certificate (or object) and condition, told once, escalating.",
                  no_args_is_help=True)
policy_app = typer.Typer(help="The alert policy: routes to notification blocks, expiry bands, digest time.",
                         no_args_is_help=True)
app.add_typer(policy_app, name="policy")
suppress_app = typer.Typer(help="Suppression windows: matching alerts are recorded but notify no one until they end.",
                           no_args_is_help=True)


class AlertState(StrEnum):  # exactly certpilot.alerts.STATES (tests/unit/test_alerts_cli.py checks)
    OPEN = "open"
    ESCALATED = "escalated"
    SUPPRESSED = "suppressed"
    RESOLVED = "resolved"


def _iso(value: dt.datetime | None) -> str:
    return "-" if value is None else value.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M")


def parse_when(text: str, option: str, now: dt.datetime) -> dt.datetime:
    """A time as given on the command line: ISO 8601 with a zone (2030-01-31T18:00Z), or a duration
    from now (2h, 3d, 1d12h)."""
    value = text.strip()
    try:
        return now + parse_timespan(value)
    except ValueError:
        pass
    try:
        moment = dt.datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise usage_error(f"{text!r} is neither a time such as 2030-01-31T18:00:00Z nor a duration such as 2h or 3d",
                          option) from None
    if moment.tzinfo is None:
        raise usage_error(f"{text!r} has no time zone: add Z (UTC) or an offset such as +02:00", option)
    return moment.astimezone(dt.timezone.utc)


# -------------------------------------------------------------------------------------------- alerts

@app.command("list")
def alerts_list_command(
    state: Annotated[Optional[list[AlertState]], typer.Option(
        "--state", help="Only alerts in this state (repeatable). Default: open, escalated and suppressed.")] = None,
    owner: Annotated[Optional[str], typer.Option(metavar="OWNER", help="Only this owner's alerts.")] = None,
    limit: Annotated[int, typer.Option(metavar="N", min=1, help="At most N alerts.")] = 500,
    as_json: JsonOption = False,
) -> None:
    """Alerts, most urgent first, then the most recently seen."""
    states = [s.value for s in state] if state else ["open", "escalated", "suppressed"]
    with read_session(get_engine()) as session:
        rows = alerts.list_alerts(session, states, owner, limit)
    if as_json:
        print_json([r.as_json() for r in rows])
        return
    table = Table(show_edge=False, pad_edge=False)
    for column in ("id", "severity", "state", "condition", "object", "owner", "summary", "last seen (UTC)", "told"):
        table.add_column(column, no_wrap=column not in ("summary", "object"))
    colours = {"page": "red", "critical": "yellow", "ticket": ""}
    for r in rows:
        name = r.details.get("certificate") or r.object
        state_text = r.state + (f" (ack {r.acknowledged_by})" if r.acknowledged_by else "")
        table.add_row(cell(r.id), cell(r.severity, colours.get(r.severity, "")), cell(state_text), cell(r.condition),
                      cell(name), cell(r.owner or "-"), cell(r.summary), cell(_iso(r.last_seen)),
                      cell(r.notifications_sent))
    out.print(table)
    out.print(line(f"{len(rows)} alert(s)"))


@app.command("ack")
def alerts_ack_command(
    alert_id: Annotated[int, typer.Argument(metavar="ID", help="The alert's id (alerts list).")],
    as_json: JsonOption = False,
) -> None:
    """Acknowledge an alert: it is told about again only if it escalates to PAGE, and when it resolves."""
    who = actor().name
    with write_session(get_engine()) as session:
        view = alerts.acknowledge(session, alert_id, who, utcnow())
    if as_json:
        print_json(view.as_json())
        return
    out.print(line(f"alert {view.id} ({view.condition} on {view.details.get('certificate') or view.object}) "
                   f"acknowledged by {view.acknowledged_by} at {_iso(view.acknowledged_at)} UTC"))


# -------------------------------------------------------------------------------------------- policy

def _policy_json(stored: alert_policy.StoredPolicy) -> dict[str, Any]:
    policy = stored.policy

    def route(r: alert_policy.Route) -> dict[str, Any]:
        match = {k: v for k, v in (("owner", r.owner), ("tag", "=".join(r.tag) if r.tag else None)) if v}
        return {"match": match, "notify": list(r.notify), "page": list(r.page)}

    return {"id": stored.id, "loaded_by": stored.loaded_by,
            "loaded_at": stored.loaded_at.isoformat().replace("+00:00", "Z") if stored.loaded_at else None,
            "sha256": policy.sha256, "problem": stored.problem,
            "routes": [route(r) for r in policy.routes], "default": {"notify": list(policy.default.notify),
                                                                     "page": list(policy.default.page)},
            "bands": {"critical_days": policy.bands.critical_days, "warning_days": policy.bands.warning_days},
            "digest": {"at": policy.digest_at.strftime("%H:%M")}, "channels": list(policy.channels())}


@policy_app.command("load")
def policy_load_command(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="The policy, YAML (see certpilot/alert_policy.py).")],
    as_json: JsonOption = False,
) -> None:
    """Check a policy file and make it the policy in force (for every machine using this inventory)."""
    text = read_text_file(file)
    with write_session(get_engine()) as session:
        stored = alert_policy.load_policy(session, text, actor().name, utcnow(), str(file))
    if as_json:
        print_json(_policy_json(stored))
        return
    policy = stored.policy
    out.print(line(f"alert policy {stored.id} in force: {len(policy.routes)} route(s) and a default, "
                   f"{len(policy.channels())} channel(s), bands {policy.bands.critical_days:g}/"
                   f"{policy.bands.warning_days:g} days, digest at {policy.digest_at.strftime('%H:%M')} UTC"))


@policy_app.command("show")
def policy_show_command(as_json: JsonOption = False) -> None:
    """The alert policy in force, as loaded (or the built-in default: nowhere to send)."""
    with read_session(get_engine()) as session:
        stored = alert_policy.stored_policy(session)
    if as_json:
        print_json({**_policy_json(stored), "text": stored.text})
        return
    if stored.text is None:
        out.print(line("no alert policy loaded: alerts are recorded but sent nowhere "
                       "(certpilot alerts policy load FILE)"))
        return
    out.print(line(f"# alert policy {stored.id}, loaded by {stored.loaded_by} at {_iso(stored.loaded_at)} UTC"))
    if stored.problem:
        out.print(line((f"# does not parse any more, the built-in default rules: {stored.problem}", "red")))
    for text_line in stored.text.rstrip("\n").splitlines():
        out.print(line(text_line))


# ---------------------------------------------------------------------------------------- suppress

def _suppression_row(view: alerts.SuppressionView, now: dt.datetime) -> list[Any]:
    return [cell(view.id), cell(view.state(now)), cell(view.scope), cell(_iso(view.starts_at)),
            cell(_iso(view.ends_at)), cell(view.created_by), cell(view.reason)]


@suppress_app.command("add")
def suppress_add_command(
    scope: Annotated[str, typer.Option(metavar="SCOPE", help=(
        "What to suppress: owner=X, certificate=NAME-or-fingerprint, tag:K=V, condition=C, object=O; "
        "several joined by ',' must all match."))],
    until: Annotated[str, typer.Option(metavar="WHEN", help="When it ends: a time (2030-01-31T18:00Z) or a duration "
                                                            "from now (2h, 3d).")],
    reason: Annotated[str, typer.Option(metavar="TEXT", help="Why (kept with it and in the audit trail).")],
    start: Annotated[Optional[str], typer.Option("--from", metavar="WHEN",
                                                 help="When it starts (default: now).")] = None,
    as_json: JsonOption = False,
) -> None:
    """Suppress matching alerts for a window: they are recorded, and notify when the window ends."""
    now = utcnow()
    starts_at = parse_when(start, "--from", now) if start else now
    ends_at = parse_when(until, "--until", now)
    with write_session(get_engine()) as session:
        view = alerts.add_suppression(session, scope, starts_at, ends_at, reason, actor().name, now)
    if as_json:
        print_json(view.as_json(now))
        return
    out.print(line(f"suppression {view.id} ({view.scope}) {view.state(now)} from {_iso(view.starts_at)} "
                   f"until {_iso(view.ends_at)} UTC"))


@suppress_app.command("list")
def suppress_list_command(
    include_past: Annotated[bool, typer.Option("--all", help="Also the expired and ended ones.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Suppression windows active or to come (with --all, every one)."""
    now = utcnow()
    with read_session(get_engine()) as session:
        views = alerts.list_suppressions(session, now, include_past)
    if as_json:
        print_json([v.as_json(now) for v in views])
        return
    table = Table(show_edge=False, pad_edge=False)
    for column in ("id", "state", "scope", "from (UTC)", "until (UTC)", "by", "reason"):
        table.add_column(column, no_wrap=column not in ("scope", "reason"))
    for view in views:
        table.add_row(*_suppression_row(view, now))
    out.print(table)
    out.print(line(f"{len(views)} suppression(s)"))


@suppress_app.command("end")
def suppress_end_command(
    suppression_id: Annotated[int, typer.Argument(metavar="ID", help="The suppression's id (suppress list).")],
    as_json: JsonOption = False,
) -> None:
    """End a suppression now: the alerts it held notify at their next observation."""
    now = utcnow()
    with write_session(get_engine()) as session:
        view = alerts.end_suppression(session, suppression_id, actor().name, now)
    if as_json:
        print_json(view.as_json(now))
        return
    out.print(line(f"suppression {view.id} ({view.scope}) {view.state(now)}"))


@suppress_app.command("load")
def suppress_load_command(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="suppressions: [{scope, start, end, reason}], YAML.")],
    as_json: JsonOption = False,
) -> None:
    """Add every suppression a file gives; a malformed file is refused whole, naming the line."""
    text = read_text_file(file)
    specs = alert_policy.parse_suppressions(text, str(file))
    now, who = utcnow(), actor().name
    views = []
    with write_session(get_engine()) as session:
        for spec in specs:
            try:
                views.append(alerts.add_suppression(session, spec.scope, spec.starts_at or now, spec.ends_at,
                                                    spec.reason, who, now))
            except InvalidOptionError as exc:
                field = {"--until": "end", "--from": "start", "--reason": "reason"}.get(exc.option, exc.option)
                raise alert_policy.PolicyFileError(str(file), spec.line,
                                                   f"{field} {exc.value} must be {exc.expected}") from None
    if as_json:
        print_json([v.as_json(now) for v in views])
        return
    for view in views:
        out.print(line(f"suppression {view.id} ({view.scope}) {view.state(now)} until {_iso(view.ends_at)} UTC"))
    out.print(line(f"{len(views)} suppression(s) added from {file}"))
