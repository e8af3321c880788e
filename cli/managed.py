"""The managed commands (what should exist and when it renews) and renew."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from certpilot import inventory
from certpilot.clock import utcnow
from certpilot.database import get_engine, read_session, write_session
from certpilot.status import next_renewal
from certpilot.timespan import parse_timespan
from cli.console import JsonOption, cell, line, out, print_json
from cli.issuer_blocks import check_issuer_block
from cli.options import KeyAlgorithm, Profile, RevocationReason, actor, parse_tags, whole_days

app = typer.Typer(help="Managed certificates: what should exist, and when it renews.", no_args_is_help=True)


def schedule_rows(scheduled: list[Any]) -> list[dict[str, Any]]:
    """The --json shape of a schedule. ``next_renewal`` is stable: for a certificate already due, when
    it fell due (as the schedule decides it), never the moment of asking."""
    rows = []
    for s in scheduled:
        when = next_renewal(s)
        rows.append({
            "name": s.managed.name, "dns_names": s.managed.dns_names, "ip_addresses": s.managed.ip_addresses,
            "uris": s.managed.uris or [],
            "issuer": s.managed.issuer, "profile": s.managed.profile, "key_algorithm": s.managed.key_algorithm,
            "validity_days": s.managed.validity_days, "owner": s.managed.owner, "tags": s.managed.tags or {},
            "renew_before_days": s.managed.renew_before_days, "use_ari": s.managed.use_ari,
            "current": None if s.current is None else {
                "fingerprint_sha256": s.current.fingerprint_sha256, "serial": s.current.serial_hex,
                "not_before": inventory.iso(s.current.not_before), "not_after": inventory.iso(s.current.not_after)},
            "due": when.due, "next_renewal": inventory.iso(when.at), "reason": when.reason,
            "last_attempt_at": inventory.iso(s.managed.last_attempt_at), "last_error": s.managed.last_error,
        })
    return rows


@app.command("add")
def managed_add_command(
    name: Annotated[str, typer.Argument(metavar="NAME", help="The managed certificate's name: letters, digits, '.', '_', '-'.")],
    dns: Annotated[Optional[list[str]], typer.Option("--dns", metavar="NAME", help="A DNS name, repeatable (the first is the CN).")] = None,
    ip: Annotated[Optional[list[str]], typer.Option("--ip", metavar="ADDRESS", help="An IP address, repeatable.")] = None,
    uri: Annotated[Optional[list[str]], typer.Option("--uri", metavar="URI", help=(
        "A URI name, repeatable: a SPIFFE ID such as spiffe://prod.example/ns/api/sa/web for a machine identity "
        "(profile tls-client or mtls, from a private CA; an X.509-SVID has exactly one)."))] = None,
    *,  # keyword-only from here (typer passes every option by name), so a required option needs no default
    issuer: Annotated[str, typer.Option(metavar="BLOCK", help=(
        "The issuer block, BLOCK-TYPE/NAME, e.g. private-ca/internal; it must exist in Prefect "
        "(`certpilot ca register-block` saves a private CA's)."))],
    profile: Annotated[Profile, typer.Option(help="What the certificate is for.")] = Profile.TLS_SERVER,
    key_algorithm: Annotated[KeyAlgorithm, typer.Option(help="The key to generate at each renewal.")] = KeyAlgorithm.EC_P256,
    validity_days: Annotated[Optional[int], typer.Option(metavar="DAYS", min=1, help="Lifetime to ask for (default: the issuer's).")] = None,
    owner: Annotated[Optional[str], typer.Option(metavar="TEAM", help=(
        "Who owns it (default: the owner the policy's first matching ownership rule gives; one is required)."))]
    = None,
    tag: Annotated[Optional[list[str]], typer.Option(metavar="KEY=VALUE", help="A tag, repeatable.")] = None,
    renew_before: Annotated[Optional[str], typer.Option(metavar="DURATION", help=(
        "Renew at the latest this long before expiry, e.g. 30d (default: at two thirds of the lifetime)."))] = None,
    no_ari: Annotated[bool, typer.Option("--no-ari", help="Ignore the CA's renewal window (ARI) even if it offers one.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Define a managed certificate; having no certificate yet, it is due at once. Every managed certificate
    has an owner: --owner, else the policy's ownership rules (`certpilot policy show`)."""
    from certpilot import managed

    tags, renew_before_days = parse_tags(tag), whole_days(renew_before, "--renew-before")  # usage errors first
    if owner is None:
        owner = owner_from_policy(name, dns or [], ip or [], uri or [], issuer, tags)
    spec = managed.ManagedSpec(name=name, dns_names=tuple(dns or ()), ip_addresses=tuple(ip or ()), issuer=issuer,
                               profile=profile.value, key_algorithm=key_algorithm.value, validity_days=validity_days,
                               owner=owner, tags=tags, renew_before_days=renew_before_days,
                               use_ari=not no_ari, uris=tuple(uri or ()))
    check_issuer_block(issuer)
    engine = get_engine()
    with write_session(engine) as session:
        managed.add(session, spec, actor())
    with read_session(engine) as session:
        [row] = schedule_rows(managed.schedule(session, managed=[managed.get(session, name)]))
    if as_json:
        print_json(row)
        return
    names = ", ".join(row["dns_names"] + row["ip_addresses"] + row["uris"])
    out.print(line(f"added managed certificate {name} ({names}) from {row['issuer']}: {row['reason']}"))


def owner_from_policy(name: str, dns: list[str], ips: list[str], uris: list[str], issuer: str,
                      tags: dict[str, str]) -> str:
    """The owner the policy in force gives a new managed certificate (its first ownership rule matching
    the names, issuer and tags asked for); PermanentError saying how to give one when none matches."""
    from blocks.policy import policy_in_force
    from certpilot import managed, violations
    from certpilot.clock import utcnow
    from certpilot.errors import PermanentError
    from certpilot.models import ManagedCertificate

    policy = policy_in_force()
    # A bad name is named as such (normalised as managed.add does), before any word about its owner.
    names = [managed.normalise_dns_name(n) for n in dns]
    wanted = ManagedCertificate(name=name, dns_names=names, ip_addresses=list(ips), uris=list(uris), issuer=issuer,
                                tags=tags)
    with read_session(get_engine()) as session:
        facts = violations.request_facts(session, wanted, policy, utcnow())
    owner = policy.owner_for(facts)
    if owner is None:
        raise PermanentError(f"managed certificate {name} needs an owner: give --owner or add an ownership rule "
                             f"matching its names to the policy ({policy_file(policy)})")
    return owner


def policy_file(policy: Any) -> str:
    """Where the policy in force is (its file or block), or where one would be read from when none is."""
    from certpilot.policy import policy_location
    from certpilot.settings import load_settings

    if policy.source == "built-in":
        return f"the built-in default is in force: write {policy_location(load_settings())}"
    return str(policy.source)


@app.command("list")
def managed_list_command(as_json: JsonOption = False) -> None:
    """Managed certificates, soonest renewal first, with why."""
    from certpilot import managed

    with read_session(get_engine()) as session:
        rows = schedule_rows(managed.schedule(session))
    if as_json:
        print_json(rows)
        return
    table = Table(show_edge=False, pad_edge=False)
    for column in ("name", "issuer", "expires (UTC)", "next renewal (UTC)", "why", "last error"):
        table.add_column(column, no_wrap=column not in ("why", "last error"))
    for r in rows:
        expires = r["current"]["not_after"][:16].replace("T", " ") if r["current"] else "-"
        when = cell("due now", "yellow") if r["due"] else cell(r["next_renewal"][:16].replace("T", " "))
        table.add_row(cell(r["name"]), cell(r["issuer"]), cell(expires), when, cell(r["reason"]),
                      cell(r["last_error"] or "", "red"))
    out.print(table)
    out.print(line(f"{len(rows)} managed certificate(s), {sum(r['due'] for r in rows)} due"))


def renew_command(
    name: Annotated[Optional[str], typer.Argument(help="The managed certificate to renew now.")] = None,
    due: Annotated[bool, typer.Option("--due", help="Renew every managed certificate that is due (the renew-due flow).")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="With --due: list what is due and why; change nothing.")] = False,
    within: Annotated[Optional[str], typer.Option(help="With --due: also what falls due within this time, e.g. 7d.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Renew one managed certificate, or all that are due. With PREFECT_API_URL set the renew-certificate
    or renew-due flow runs there; without it the renewal runs directly, with no Prefect run history."""
    from certpilot import managed
    from cli import renewals

    if (name is None) == (not due):
        raise typer.BadParameter("give a managed certificate's NAME, or --due")
    if dry_run and not due:
        raise typer.BadParameter("--dry-run goes with --due")
    ahead = dt.timedelta(0)
    if within:
        try:
            ahead = parse_timespan(within)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--within") from None
    if dry_run:
        at = utcnow() + ahead
        with read_session(get_engine()) as session:  # next_renewal of a due one: when it fell due, stable
            rows = [r for r in schedule_rows(managed.schedule(session, at)) if r["due"]]
        if as_json:
            print_json(rows)
            return
        for r in rows:
            current = f"replaces {r['current']['fingerprint_sha256'][:12]} (expires {r['current']['not_after']})" \
                if r["current"] else "first certificate"
            out.print(line(f"{r['name']}  {r['issuer']}  {r['reason']}; {current}"))
        out.print(line(f"{len(rows)} managed certificate(s) due; dry run: nothing renewed"))
        return
    if name is not None:
        renewal = renewals.renew_now(name)
        if as_json:
            print_json(renewal.as_dict())
        else:
            renewals.print_renewal(renewal)
        return
    summary = renewals.renew_due_now(ahead)
    if as_json:
        print_json(summary.as_dict())
    else:
        renewals.print_summary(summary)



# ------------------------------------------------------------------------------------------- retire

def _retire_directly(name: str, action: str, revoke: str | None, destroy_key: bool, confirm: bool) -> Any:
    """A retire or restore run without a Prefect API: each target's step in a thread of this process."""
    import logging

    from certpilot import retiring
    from cli.fleet import _stderr_log, in_threads, retrying
    from tasks.deployment import RETRY_DELAYS
    from tasks.retirement import revoker, run_step

    who, log = actor(), _stderr_log(logging.CRITICAL)

    def run_one(step: retiring.TargetStep) -> retiring.TargetOutcome:
        return run_step(step, who, log)

    run_steps = in_threads(retrying(run_one, RETRY_DELAYS))
    if action == "restore":
        return retiring.restore(get_engine(), name, run_steps, who, log=log)
    return retiring.retire(get_engine(), name, run_steps, who, revoke=revoke, destroy_key=destroy_key,
                           confirm_now=confirm, revoker=revoker(name, who), log=log)


def _run_retirement(name: str, action: str, revoke: str | None = None, destroy_key: bool = False,
                    confirm: bool = False, as_json: bool = False) -> None:
    from certpilot import retiring
    from cli import prefect_api

    with read_session(get_engine()) as session:
        retiring.state(session, name)  # fail fast on an unknown name, before starting Prefect
    try:
        if prefect_api.configured():
            from flows.retire import restore_retired, retire

            state = (restore_retired(name, return_state=True) if action == "restore" else
                     retire(name, revoke, destroy_key, confirm, return_state=True))
            report = prefect_api.flow_result(state)
        else:
            prefect_api.no_history_note()
            report = _retire_directly(name, action, revoke, destroy_key, confirm)
    except retiring.RetirementFailed as failed:
        if not as_json:
            for text in failed.report.lines():
                out.print(line(text))
        raise
    if report.failed:
        if not as_json:
            for text in report.lines():
                out.print(line(text))
        raise retiring.RetirementFailed(report)
    if as_json:
        print_json(report.as_dict())
        return
    for text in report.lines():
        out.print(line(text))


@app.command("retire")
def managed_retire_command(
    name: Annotated[str, typer.Argument(metavar="NAME", help="The managed certificate to retire.")],
    revoke: Annotated[Optional[RevocationReason], typer.Option(
        help="Revoke its certificates that are still valid, for this reason, when the retirement is confirmed.")]
    = None,
    destroy_key: Annotated[bool, typer.Option("--destroy-key", help=(
        "Crypto-shred every key of it when the retirement is confirmed (cannot be undone)."))] = False,
    confirm: Annotated[bool, typer.Option("--confirm", help=(
        "Confirm the retirement (now, or one begun earlier): purge what the targets kept, revoke and destroy keys "
        "if asked, mark it retired. Nothing can be restored after."))] = False,
    as_json: JsonOption = False,
) -> None:
    """Retire a managed certificate: take it off every target, keeping what was taken restorable
    (`certpilot managed restore NAME`) until confirmed with --confirm. Renewal stops at once. Runs the
    retire flow when PREFECT_API_URL is set."""
    _run_retirement(name, "retire", revoke.value if revoke else None, destroy_key, confirm, as_json)


@app.command("restore")
def managed_restore_command(
    name: Annotated[str, typer.Argument(metavar="NAME", help="The managed certificate being retired.")],
    as_json: JsonOption = False,
) -> None:
    """Put a managed certificate that is being retired back on every target, proven served, and make it
    active again: possible until its retirement is confirmed. Runs the restore-retired flow when
    PREFECT_API_URL is set."""
    _run_retirement(name, "restore", as_json=as_json)


# -------------------------------------------------------------------------------------------- adopt

def _target_values(values: list[str] | None, proposed: list[Any]) -> dict[str, dict[str, Any]]:
    """--set [TARGET:]KEY=VALUE as settings per proposed target name: with a TARGET, for that one; without,
    for every proposed target whose kind takes KEY. Values are JSON when they parse as JSON, else text."""
    import json

    from certpilot.target_kinds import valid_keys

    out: dict[str, dict[str, Any]] = {t.name: {} for t in proposed}
    for value in values or []:
        left, sep, text = value.partition("=")
        target, colon, key = left.rpartition(":")
        if not sep or not key:
            raise typer.BadParameter(f"{value!r} is not [TARGET:]KEY=VALUE", param_hint="--set")
        try:
            parsed: Any = json.loads(text)
        except json.JSONDecodeError:
            parsed = text
        chosen = [t for t in proposed if (t.name == target if colon else t.kind and key in valid_keys(t.kind))]
        if colon and not chosen:
            raise typer.BadParameter(f"no proposed target named {target!r} (proposed: "
                                     f"{', '.join(t.name for t in proposed) or 'none'})", param_hint="--set")
        for t in chosen:
            if t.kind and key not in valid_keys(t.kind):
                raise typer.BadParameter(f"{t.kind} has no setting {key!r}; valid keys: "
                                         f"{', '.join(valid_keys(t.kind))}", param_hint="--set")
            out[t.name][key] = parsed
        if not chosen:
            raise typer.BadParameter(f"no proposed target takes the setting {key!r}", param_hint="--set")
    return out


@app.command("adopt")
def managed_adopt_command(
    fingerprint: Annotated[str, typer.Argument(metavar="FINGERPRINT", help=(
        "The discovered certificate: its SHA-256 fingerprint, or a unique prefix."))],
    *,
    name: Annotated[str, typer.Option(metavar="NAME", help="The managed certificate's name.")],
    issuer: Annotated[str, typer.Option(metavar="BLOCK", help=(
        "The issuer block that renews it, BLOCK-TYPE/NAME, e.g. private-ca/internal or acme-issuer/letsencrypt."))],
    target_block: Annotated[Optional[str], typer.Option(metavar="SSH_BLOCK", help=(
        "The SSH host block the proposed SSH targets deploy through (default: the block that discovered them)."))]
    = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", metavar="[TARGET:]KEY=VALUE", help=(
        "A setting for a proposed target (repeatable), e.g. what the proposal says it needs: "
        "web-nginx:reload_command='nginx -s reload'. Without TARGET: every target whose kind takes it."))] = None,
    skip_target: Annotated[Optional[list[str]], typer.Option(metavar="TARGET", help=(
        "Do not add this proposed target (repeatable)."))] = None,
    owner: Annotated[Optional[str], typer.Option(metavar="TEAM", help=(
        "Who owns it (default: the certificate's owner, else the policy's first matching ownership rule's; "
        "one is required)."))] = None,
    yes: Annotated[bool, typer.Option("--yes", help="Adopt without asking.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Adopt a discovered certificate that nothing manages: it becomes managed certificate NAME, with its
    DNS names and key type, and deployment targets proposed from where discovery saw it (an SSH path nginx
    serves becomes an ssh-nginx target, with the endpoint to verify). The proposal is printed and you
    confirm it (--yes: without asking; --json without --yes: the proposal only, nothing changes). Its owner:
    --owner, else the certificate's, else the policy's ownership rules; adoption is refused without one."""
    from blocks.policy import policy_in_force
    from certpilot import adoption
    from certpilot.errors import PermanentError

    engine = get_engine()
    policy = policy_in_force()
    with read_session(engine) as session:
        proposal = adoption.propose(session, fingerprint, target_block=target_block, policy=policy, owner=owner)
        adoption.check_name(session, name)
    check_issuer_block(issuer)
    skipped = set(skip_target or ())
    unknown = skipped - {t.name for t in proposal.targets}
    if unknown:
        raise typer.BadParameter(f"no proposed target named {', '.join(sorted(unknown))}", param_hint="--skip-target")
    values = _target_values(set_, list(proposal.targets))
    proposed = [t.with_settings(values[t.name]) for t in proposal.targets if t.name not in skipped]
    proposal = dataclasses.replace(proposal, targets=tuple(proposed))
    if as_json and not yes:
        print_json({"proposal": proposal.as_dict(), "adopted": None})
        return
    if not as_json:
        for text in proposal.lines():
            out.print(line(text))
    if proposal.owner is None:  # refused before asking: a managed certificate must have an owner
        raise PermanentError(f"managed certificate {name} needs an owner: certificate {proposal.fingerprint[:16]} "
                             f"has none and no ownership rule of the policy matches it ({policy_file(policy)}); "
                             "give --owner")
    if not as_json:
        if not yes and not typer.confirm(f"adopt it as managed certificate {name} from {issuer}?", default=False):
            out.print(line("not adopted: nothing changed"))
            return
    with write_session(engine) as session:
        adopted = adoption.adopt(session, proposal.fingerprint, name, issuer, proposed, actor(), owner=owner,
                                 policy=policy)
    if as_json:
        print_json({"proposal": proposal.as_dict(), "adopted": adopted.as_dict()})
        return
    out.print(line(f"adopted {adopted.fingerprint[:16]} as managed certificate {name} from {issuer}, with "
                   f"{len(adopted.targets)} target(s){': ' + ', '.join(adopted.targets) if adopted.targets else ''}"))
    for text in adopted.skipped:
        out.print(line(f"not added: {text}"))
