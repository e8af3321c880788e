"""The inventory commands: import, list, show and export certificates."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table
from rich.text import Text

from certpilot import inventory
from certpilot.database import get_engine, read_session, write_session
from certpilot.timespan import parse_timespan
from cli.console import JsonOption, cell, err, line, note, out, print_json, short_name, shown, usage_error
from cli.files import refuse_existing, write_new_file
from cli.options import (CertificateStatus, ExportFormat, PasswordEnv, PasswordFile, PlaintextKey, actor, key_password,
                         parse_tags, read_password, ring)

app = typer.Typer(help="The certificate inventory.", no_args_is_help=True)
SEVERITY_COLORS = {"critical": "red", "high": "red", "medium": "yellow", "low": ""}


def violations_cell(violations: list[dict[str, Any]]) -> Text:
    """A table cell of the policy rules a certificate breaks (not waived), most severe first, and how
    many more are waived."""
    rules = inventory.open_rules(violations)
    waived = sum(1 for v in violations if v["waiver_id"] is not None)
    worst = next((v["severity"] for v in violations if v["waiver_id"] is None), "")
    text = Text(shown(", ".join(rules)), style=SEVERITY_COLORS.get(worst, ""))
    if waived:
        text.append(f"{' ' if rules else ''}({waived} waived)", style="dim")
    return text


@app.command("import")
def import_command(
    paths: Annotated[list[str], typer.Argument(metavar="PATH", help="Files, directories (walked recursively) or - for stdin.")],
    owner: Annotated[Optional[str], typer.Option(metavar="TEAM", help="Owner to record on every certificate imported.")] = None,
    tag: Annotated[Optional[list[str]], typer.Option(metavar="KEY=VALUE", help="A tag, repeatable.")] = None,
    import_keys: Annotated[bool, typer.Option("--import-keys", help="Store private keys found, encrypted under the master key.")] = False,
    password_file: PasswordFile = None,
    password_env: PasswordEnv = None,
    max_size: Annotated[int, typer.Option(metavar="MIB", min=1, help="Largest file to read, in MiB.")] = 16,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Report only the files that failed.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Import certificates from files, directories and stdin; report per file what was found. The policy
    in force gives owners to those without one (its ownership rules) and evaluates them: the violations
    are stored and counted."""
    from blocks.policy import policy_in_force
    from certpilot.importer import ImportOptions, import_paths, iter_files

    policy = policy_in_force()  # a policy that does not load stops the import before it starts
    options = ImportOptions(owner=owner, tags=parse_tags(tag), password=read_password(password_file, password_env),
                            import_keys=import_keys, max_bytes=max_size * 1024 * 1024)
    engine = get_engine()
    stdin = sys.stdin.buffer.read if "-" in paths else None
    progress = None
    if err.is_terminal and not as_json:
        from rich.progress import Progress

        total = sum(1 for _ in iter_files(paths))
        if total > 20:
            progress = Progress(console=err, transient=True)
            task = progress.add_task("importing", total=total)
    if progress:
        with progress:
            report = import_paths(engine, paths, options, actor(), key_ring=ring, stdin=stdin,
                                  on_file=lambda _r: progress.advance(task), policy=policy)
    else:
        report = import_paths(engine, paths, options, actor(), key_ring=ring, stdin=stdin, policy=policy)
    summary = report.summary()
    if as_json:
        print_json({"files": [f.as_dict() for f in report.files], "summary": summary.as_dict(),
                    "policy": {"source": policy.source, **(summary.policy_as_dict() or {})}})
    else:
        for f in report.files:
            if f.status == "failed":
                out.print(line(("FAILED", "red"), f"   {f.source}: {f.error}"))
            elif not quiet:
                found = f"{len(f.certificates)} certificate(s), {f.new_certificates} new"
                if f.keys_found:
                    found += f", {f.keys_found} key(s), {f.keys_stored} stored"
                label = ("imported", "green") if f.status == "imported" else ("skipped ", "dim")
                out.print(line(label, f" {f.source}: {found}"))
                for n in f.notes:
                    out.print(line(f"           note: {n}"))
        s = summary
        out.print(line(f"{s.files} file(s): {s.certificates} certificate(s), {s.new_certificates} new, "
                       f"{s.keys_stored} key(s) stored, {s.failed} file(s) failed"))
    if summary.policy_error:
        err.print(line(("error", "red"), f": the policy was not applied to every certificate: {summary.policy_error}"))
    elif not as_json and (summary.owners_assigned or summary.violations):
        rules = ", ".join(f"{rule} {count}" for rule, count in summary.violations_by_rule.items())
        note(f"policy ({policy.source}): {summary.owners_assigned} owner(s) assigned, {summary.violations} "
             f"violation(s) not waived" + (f" ({rules})" if rules else "")
             + ("; see certpilot inventory list --violating" if summary.violations else ""))
    if report.failed or summary.policy_error:
        raise typer.Exit(1)


@app.command("list")
def list_command(
    expiring_within: Annotated[Optional[str], typer.Option(metavar="DURATION", help=(
        "Only certificates expiring within this time, e.g. 30d, 12h; those already expired are left out "
        "unless --include-expired."))] = None,
    include_expired: Annotated[bool, typer.Option("--include-expired", help=(
        "With --expiring-within: certificates already expired too."))] = False,
    expired: Annotated[bool, typer.Option("--expired", help="Only expired certificates.")] = False,
    issuer: Annotated[Optional[str], typer.Option(metavar="TEXT", help="Issuer DN contains this text (case-insensitive).")] = None,
    san: Annotated[Optional[str], typer.Option(metavar="NAME", help="Has this SAN; .example.com matches any name below it.")] = None,
    owner: Annotated[Optional[str], typer.Option(metavar="TEAM", help="Owned by.")] = None,
    tag: Annotated[Optional[list[str]], typer.Option(metavar="KEY=VALUE", help="A tag, repeatable; all must match.")] = None,
    status: Annotated[Optional[CertificateStatus], typer.Option(help="Only certificates in this state.")] = None,
    unmanaged: Annotated[bool, typer.Option("--unmanaged", help="Only certificates nothing manages.")] = False,
    unowned: Annotated[bool, typer.Option("--unowned", help="Only certificates with no owner (CA certificates left out).")] = False,
    violating: Annotated[bool, typer.Option("--violating", help=(
        "Only certificates that violate the policy (a violation not waived)."))] = False,
    rule: Annotated[Optional[str], typer.Option(metavar="RULE", help=(
        "Only certificates that violate this policy rule (not waived), e.g. key-size; implies --violating."))] = None,
    limit: Annotated[Optional[int], typer.Option(metavar="N", min=1, help="At most this many, soonest expiry first.")] = None,
    as_json: JsonOption = False,
) -> None:
    """List certificates, soonest expiry first."""
    try:
        within = parse_timespan(expiring_within) if expiring_within else None
    except ValueError as exc:
        raise usage_error(str(exc), "--expiring-within") from None
    if include_expired and within is None:
        raise usage_error("--include-expired goes with --expiring-within", "--include-expired")
    if rule is not None:
        from certpilot.policy import RULES

        if rule not in RULES:
            raise usage_error(f"unknown rule {rule!r}; the rules are {', '.join(RULES)}", "--rule")
    query = inventory.CertificateQuery(expiring_within=within, include_expired=include_expired, expired=expired,
                                       issuer=issuer, san=san, owner=owner, tags=parse_tags(tag),
                                       status=status.value if status else None, unmanaged=unmanaged, limit=limit,
                                       unowned=unowned, violating=violating, rule=rule)
    with read_session(get_engine()) as session:
        rows = inventory.list_certificates(session, query)
    if as_json:
        print_json(rows)
        return
    table = Table(show_edge=False, pad_edge=False)
    for column in ("fingerprint", "name", "expires (UTC)", "days", "status", "owner", "seen at", "violations"):
        table.add_column(column, no_wrap=column not in ("name", "violations"),
                         min_width=22 if column == "name" else None)
    for r in rows:
        color = "red" if r["days_left"] < 7 else "yellow" if r["days_left"] < 30 else ""
        table.add_row(cell(r["fingerprint_sha256"][:12]), cell(short_name(r)), cell(r["not_after"][:10]),
                      cell(f"{r['days_left']:.0f}", color), cell(r["status"]), cell(r["owner"] or ""),
                      cell(len(r["locations"])), violations_cell(r["violations"]))
    out.print(table)
    out.print(line(f"{len(rows)} certificate(s)"))


@app.command("show")
def show_command(ident: Annotated[str, typer.Argument(metavar="FINGERPRINT", help="SHA-256 fingerprint or a unique prefix.")],
                 as_json: JsonOption = False) -> None:
    """Every field of one certificate, its chain, locations and history."""
    with read_session(get_engine()) as session:
        detail = inventory.show(session, ident)
    if as_json:
        print_json(detail)
        return
    skip = {"chain", "locations", "history", "violations"}
    for key, value in detail.items():
        if key not in skip and value not in (None, [], {}):
            shown = ", ".join(map(str, value)) if isinstance(value, list) else value
            out.print(line((f"{key:>22}", "bold"), f"  {shown}"))
    out.print(line(("chain", "bold"), "" if detail["chain_complete"] else " (incomplete: the issuer is not in the inventory)"))
    for depth, link in enumerate(detail["chain"]):
        out.print(line(f"  {'  ' * depth}{link['fingerprint_sha256'][:16]}  {link['subject']}  (until {link['not_after']})"))
    out.print(line(("locations", "bold")))
    for loc in detail["locations"]:
        out.print(line(f"  {loc['locator']}  ({loc['source']}, first {loc['first_seen']}, last {loc['last_seen']})",
                       (" ghost", "yellow") if loc["ghost"] else ""))
    out.print(line(("violations", "bold"), "" if detail["violations"] else " none"))
    for v in detail["violations"]:
        where = f"  at {v['place']}" if v["place"] else ""
        waived = (f"  (waived by {v['waived_by']} until {v['waiver_expires_at']}: {v['waiver_reason']}, "
                  f"waiver {v['waiver_id']})") if v["waiver_id"] is not None else ""
        out.print(line("  ", (f"{v['rule']}", "dim" if waived else "bold"),
                       (f" [{v['severity']}]", "dim" if waived else SEVERITY_COLORS.get(v["severity"], "")),
                       f"  {v['detail']}{where}", (waived, "dim")))
    out.print(line(("history", "bold")))
    for event in detail["history"]:
        run = f"  flow run {event['flow_run_id']}" if event["flow_run_id"] else ""
        out.print(line(f"  #{event['seq']} {event['at']}  {event['action']}  by {event['actor']}{run}"))


@app.command("export")
def export_command(
    ident: Annotated[str, typer.Argument(metavar="FINGERPRINT", help="SHA-256 fingerprint or a unique prefix.")],
    format: Annotated[ExportFormat, typer.Option("--format", "-f", help="The file format.")] = ExportFormat.PEM,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", metavar="FILE",
                                                   help="Write here (mode 0600 with a key) instead of stdout; an "
                                                        "existing file only with --force.")] = None,
    force: Annotated[bool, typer.Option("--force", help="With --output: replace an existing file.")] = False,
    include_key: Annotated[bool, typer.Option("--include-key", help=(
        "Include the private key (an audit event), encrypted with a password from --password-file, "
        "--password-env or a prompt, or unencrypted with --plaintext-key."))] = False,
    plaintext_key: PlaintextKey = False,
    no_chain: Annotated[bool, typer.Option("--no-chain", help="The certificate alone, without its issuers.")] = False,
    password_file: PasswordFile = None,
    password_env: PasswordEnv = None,
    as_json: JsonOption = False,
) -> None:
    """Export a certificate; its private key only with --include-key, encrypted unless --plaintext-key."""
    from certpilot.export import ExportRequest, export_certificate

    if plaintext_key and not include_key:
        raise usage_error("--plaintext-key goes with --include-key", "--plaintext-key")
    if include_key and output is None and sys.stdout.isatty():
        raise usage_error("refusing to print a private key to a terminal: use --output FILE")
    if as_json and output is None:
        raise usage_error("--json describes the file written: give --output FILE (or use --format json)", "--json")
    if force and output is None:
        raise usage_error("--force goes with --output", "--force")
    if output is not None and not force:
        refuse_existing(output)
    if include_key and format in (ExportFormat.PEM, ExportFormat.PKCS12):  # the core refuses a key in der or json
        password = key_password(password_file, password_env, plaintext_key, "the private key")
    else:
        password = read_password(password_file, password_env)
    request = ExportRequest(ident, format.value, not no_chain, include_key, password)
    with write_session(get_engine()) as session:
        fingerprint = inventory.resolve(session, ident).fingerprint_sha256
        data = export_certificate(session, request, actor(), ring() if include_key else None)
    if output is None:
        sys.stdout.buffer.write(data)
        return
    write_new_file(output, data, secret=include_key, force=force)
    result: dict[str, Any] = {"fingerprint_sha256": fingerprint, "format": format.value, "output": str(output),
                              "bytes": len(data), "chain": not no_chain, "private_key": include_key,
                              "encrypted": include_key and password is not None}
    if as_json:
        print_json(result)
    else:
        err.print(line(f"wrote {output}"))
