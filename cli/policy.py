"""`certpilot policy check|show|waive|waivers|unwaive`: the certificate policy in force (a file named by
CERTPILOT_POLICY, $CERTPILOT_HOME/policy.yaml, a certpilot-policy block, or the built-in policy), the whole
inventory evaluated against it, and waivers (audited exceptions with an expiry).

``check`` stores what it finds (certpilot.violations) and lists it with the endpoint violations that
discovery and monitoring stored; it exits 1 while a violation it lists is not waived. A policy file
that does not parse is bad usage: ``path:line: problem``, exit 2.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from certpilot import violations
from certpilot.clock import utcnow
from certpilot.database import get_engine, read_session, write_session
from certpilot.inventory import iso
from certpilot.models import PolicyWaiver
from certpilot.policy import RULES, Policy, PolicyFileError, Violation, load_policy, policy_location
from certpilot.settings import load_settings
from cli.alerts import parse_when
from cli.console import FAILED, USAGE, JsonOption, cell, line, note, out, print_json, report_error, short_name, \
    usage_error
from cli.options import actor

app = typer.Typer(help="The certificate policy: check the inventory against it, show it, waive a rule for a scope.",
                  no_args_is_help=True)

_COLOURS = {"critical": "red", "high": "yellow", "medium": "", "low": "dim"}
_WHEN = "YYYY-MM-DD (to the end of that day, UTC), a time with a zone (2030-01-31T18:00Z) or a duration (30d)"


def _policy(as_json: bool) -> Policy:
    """The policy in force (blocks.policy.policy_in_force); a policy file that does not parse is bad usage
    (exit 2) naming its line. Prefect (2 s to import) is imported only when the policy is a block."""
    settings = load_settings()
    try:
        if settings.policy and settings.policy.startswith("block:"):
            from blocks.policy import policy_in_force  # noqa: PLC0415

            return policy_in_force(settings)
        return load_policy(settings)  # what policy_in_force does for a file, without importing Prefect
    except PolicyFileError as exc:
        report_error(str(exc), USAGE, as_json)
        raise typer.Exit(USAGE) from None


def _source(policy: Policy) -> str:
    if policy.sha256 is None:
        return f"the built-in policy (no policy file at {policy_location(load_settings())})"
    return f"{policy.source} (sha256 {policy.sha256[:16]})"


def _waiver_state(row: PolicyWaiver, now: dt.datetime) -> str:
    if row.revoked_at is not None:
        return "revoked"
    return "expired" if row.expires_at <= now else "active"


def _waiver_json(row: PolicyWaiver, now: dt.datetime) -> dict[str, Any]:
    return {"id": row.id, "rule": row.rule, "scope": row.scope, "reason": row.reason, "approver": row.approver,
            "expires_at": iso(row.expires_at), "created_by": row.created_by, "created_at": iso(row.created_at),
            "revoked_at": iso(row.revoked_at), "revoked_by": row.revoked_by, "state": _waiver_state(row, now)}


def _when(value: dt.datetime | None) -> str:
    return "-" if value is None else value.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M")


def _waiver_table(rows: list[PolicyWaiver], now: dt.datetime) -> Table:
    table = Table(show_edge=False, pad_edge=False)
    for column in ("id", "state", "rule", "scope", "expires (UTC)", "approver", "by", "reason"):
        table.add_column(column, no_wrap=column not in ("scope", "reason"))
    for row in rows:
        table.add_row(cell(row.id), cell(_waiver_state(row, now)), cell(row.rule), cell(row.scope),
                      cell(_when(row.expires_at)), cell(row.approver), cell(row.created_by), cell(row.reason))
    return table


def parse_expiry(text: str, now: dt.datetime) -> dt.datetime:
    """--expires: a date (the waiver lasts to the end of that day, UTC), a time with a zone, or a duration."""
    value = text.strip()
    try:
        day = dt.date.fromisoformat(value)
    except ValueError:
        return parse_when(value, "--expires", now)
    return dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), dt.timezone.utc)


# -------------------------------------------------------------------------------------------- check

@app.command("check")
def check_command(
    rule: Annotated[Optional[str], typer.Option(metavar="RULE", help="Only violations of this rule id.")] = None,
    owner: Annotated[Optional[str], typer.Option(metavar="OWNER", help="Only certificates of this owner.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Evaluate the whole inventory against the policy in force and store what it finds; list it with
    the endpoint violations discovery and monitoring found. Exit 1 while one listed is not waived."""
    if rule is not None and rule not in RULES:
        raise usage_error(f"unknown rule {rule!r}; the rules are {', '.join(RULES)}", "--rule")
    policy = _policy(as_json)
    now = utcnow()
    with write_session(get_engine()) as session:
        summary = violations.evaluate_certificates(session, policy, actor(), None, now)
    with read_session(get_engine()) as session:
        stored = violations.stored_violations(session)
        labels = violations.certificate_labels(session, sorted(stored))
    listed: list[tuple[Violation, str]] = []
    for fp, found in stored.items():
        label = labels.get(fp, {"subject": fp[:16], "sans": [], "owner": None})
        if owner is not None and label["owner"] != owner:
            continue
        listed += [(v, short_name(label)) for v in found if rule is None or v.rule == rule]
    listed.sort(key=lambda item: (item[0].waiver_id is not None, -item[0].severity.rank(), item[0].rule,
                                  item[1], item[0].place))
    open_ = [v for v, _ in listed if v.waiver_id is None]
    by_rule = {r: 0 for r in RULES}
    for v in open_:
        by_rule[v.rule] += 1
    result = {"evaluated": summary.evaluated, "violations": len(open_), "waived": len(listed) - len(open_),
              "certificates": len({v.fingerprint_sha256 for v, _ in listed if v.waiver_id is None}),
              "by_rule": by_rule, "expired_waivers": list(summary.expired_waivers), "errors": list(summary.errors)}
    if as_json:
        print_json({"policy": {"source": policy.source, "sha256": policy.sha256},
                    "violations": [v.as_dict() for v, _ in listed], "summary": result})
    else:
        if listed:
            table = Table(show_edge=False, pad_edge=False)
            for column in ("rule", "severity", "certificate", "place", "detail", "waived by"):
                table.add_column(column, no_wrap=column not in ("detail", "place"))
            for v, name in listed:
                table.add_row(cell(v.rule), cell(v.severity.value, _COLOURS.get(v.severity.value, "")), cell(name),
                              cell(v.place or "-"), cell(v.detail), cell(f"#{v.waiver_id}" if v.waiver_id else ""))
            out.print(table)
        counts = ", ".join(f"{r} {n}" for r, n in by_rule.items() if n)
        out.print(line(f"{summary.evaluated} certificate(s) evaluated against {_source(policy)}: "
                       f"{len(open_)} violation(s) not waived on {result['certificates']} certificate(s), "
                       f"{result['waived']} waived" + (f" ({counts})" if counts else "")))
        for waiver_id in summary.expired_waivers:
            note(f"waiver {waiver_id} has expired: the violations it covered are no longer waived")
        for problem in summary.errors:
            note(f"not evaluated: {problem}")
    if open_:
        raise typer.Exit(FAILED)


# -------------------------------------------------------------------------------------------- show

@app.command("show")
def show_command(as_json: JsonOption = False) -> None:
    """The policy in force: where it comes from, every rule with its settings and severity, the scopes
    that refine them, the private issuers, the ownership rules, and the waivers in force."""
    policy = _policy(as_json)
    now = utcnow()
    with read_session(get_engine()) as session:
        waivers = violations.list_waivers(session, now=now)
    described = policy.describe()
    if as_json:
        print_json({**described, "location": policy_location(load_settings()),
                    "waivers": [_waiver_json(w, now) for w in waivers]})
        return
    out.print(line(("policy in force: ", "bold"), _source(policy)))
    rules = Table(show_edge=False, pad_edge=False)
    for column in ("rule", "on", "severity", "about", "settings"):
        rules.add_column(column, no_wrap=column != "settings")
    for rule_id, settings in described["rules"].items():
        shown = "; ".join(f"{k}: {_setting(v)}" for k, v in settings["settings"].items())
        rules.add_row(cell(rule_id), cell("yes" if settings["enabled"] else "off"), cell(settings["severity"]),
                      cell(settings["about"]), cell(shown or "-"))
    out.print(rules)
    for scope in described["scopes"]:
        match = ", ".join(f"{k}={v}" for k, v in scope["match"].items()) or "every certificate"
        changes = "; ".join(f"{r} {_setting(o)}" for r, o in scope["rules"].items())
        out.print(line(f"scope {scope['name']} (line {scope['line']}): {match}: {changes}"))
    private = described["issuers"]["private"]
    out.print(line("private issuers: " + (", ".join(private) if private else
                                          "certpilot CAs and self-signed certificates only")))
    for rule in described["ownership"]:
        match = ", ".join(f"{k}={v}" for k, v in rule["match"].items()) or "every certificate"
        out.print(line(f"ownership (line {rule['line']}): {match} -> {rule['owner']}"))
    if waivers:
        out.print(line(("waivers in force:", "bold")))
        out.print(_waiver_table(waivers, now))
    else:
        out.print(line("no waivers in force"))


def _setting(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_setting(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_setting(v) for v in value) + "]"
    return str(value)


# -------------------------------------------------------------------------------------------- waivers

@app.command("waive")
def waive_command(
    rule: Annotated[str, typer.Argument(metavar="RULE", help="The rule id to waive: " + ", ".join(RULES) + ".")],
    scope: Annotated[str, typer.Option(metavar="SCOPE", help=(
        "What it covers: certificate=FINGERPRINT-PREFIX-or-managed-name, owner=X, domain=SUFFIX, tag:K=V, "
        "place=GLOB; several joined by ',' must all match; * for everything."))],
    reason: Annotated[str, typer.Option(metavar="TEXT", help="Why (kept with it and in the audit trail).")],
    approver: Annotated[str, typer.Option(metavar="NAME", help="Who approved the exception.")],
    expires: Annotated[str, typer.Option(metavar="WHEN", help="When it stops applying: " + _WHEN + ".")],
    as_json: JsonOption = False,
) -> None:
    """Waive RULE for what SCOPE names until --expires: its violations are still listed, marked waived,
    and gate nothing. Audited."""
    now = utcnow()
    expires_at = parse_expiry(expires, now)
    with write_session(get_engine()) as session:
        row = violations.grant_waiver(session, rule, scope, reason, approver, expires_at, actor(), now)
    if as_json:
        print_json(_waiver_json(row, now))
        return
    out.print(line(f"waiver {row.id}: {row.rule} for {row.scope} until {_when(row.expires_at)} UTC, approved by "
                   f"{row.approver}"))


@app.command("waivers")
def waivers_command(
    include_inactive: Annotated[bool, typer.Option("--all", help="Also the expired and revoked ones.")] = False,
    as_json: JsonOption = False,
) -> None:
    """The waivers in force (with --all, every one)."""
    now = utcnow()
    with read_session(get_engine()) as session:
        rows = violations.list_waivers(session, include_inactive=include_inactive, now=now)
    if as_json:
        print_json([_waiver_json(r, now) for r in rows])
        return
    out.print(_waiver_table(rows, now))
    out.print(line(f"{len(rows)} waiver(s)"))


@app.command("unwaive")
def unwaive_command(
    waiver_id: Annotated[int, typer.Argument(metavar="ID", help="The waiver's id (policy waivers).")],
    as_json: JsonOption = False,
) -> None:
    """Revoke a waiver now: the violations it covered are no longer waived. Audited."""
    now = utcnow()
    with write_session(get_engine()) as session:
        row = violations.revoke_waiver(session, waiver_id, actor(), now)
    already = row.revoked_at != now
    if as_json:
        print_json(_waiver_json(row, now))
        return
    if already:
        out.print(line(f"waiver {row.id} was already revoked at {_when(row.revoked_at)} UTC by {row.revoked_by}"))
    else:
        out.print(line(f"waiver {row.id} ({row.rule} for {row.scope}) revoked"))
