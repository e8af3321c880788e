"""The inventory commands: import, list, show and export certificates."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from certpilot import inventory
from certpilot.database import get_engine, read_session, write_session
from certpilot.timespan import parse_timespan
from cli.console import JsonOption, err, out, print_json, short_name
from cli.options import PasswordEnv, PasswordFile, actor, parse_tags, read_password, ring

app = typer.Typer(help="The certificate inventory.", no_args_is_help=True)


@app.command("import")
def import_command(
    paths: Annotated[list[str], typer.Argument(help="Files, directories (walked recursively) or - for stdin.")],
    owner: Annotated[Optional[str], typer.Option(help="Owner to record on every certificate imported.")] = None,
    tag: Annotated[Optional[list[str]], typer.Option(help="key=value tag, repeatable.")] = None,
    import_keys: Annotated[bool, typer.Option("--import-keys", help="Store private keys found, encrypted under the master key.")] = False,
    password_file: PasswordFile = None,
    password_env: PasswordEnv = None,
    max_size: Annotated[int, typer.Option(help="Largest file to read, in MiB.")] = 16,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Report only the files that failed.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Import certificates from files, directories and stdin; report per file what was found."""
    from certpilot.importer import ImportOptions, import_paths, iter_files

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
                                  on_file=lambda _r: progress.advance(task))
    else:
        report = import_paths(engine, paths, options, actor(), key_ring=ring, stdin=stdin)
    if as_json:
        print_json({"files": [f.as_dict() for f in report.files], "summary": report.summary()})
    else:
        for f in report.files:
            if f.status == "failed":
                out.print(f"[red]FAILED[/]   {f.source}: {f.error}")
            elif not quiet:
                found = f"{len(f.certificates)} certificate(s), {f.new_certificates} new"
                if f.keys_found:
                    found += f", {f.keys_found} key(s), {f.keys_stored} stored"
                label = "[green]imported[/]" if f.status == "imported" else "[dim]skipped[/] "
                out.print(f"{label} {f.source}: {found}" + "".join(f"\n           note: {n}" for n in f.notes))
        s = report.summary()
        out.print(f"{s['files']} file(s): {s['certificates']} certificate(s), {s['new_certificates']} new, "
                  f"{s['keys_stored']} key(s) stored, {s['failed']} file(s) failed")
    if report.failed:
        raise typer.Exit(1)


@app.command("list")
def list_command(
    expiring_within: Annotated[Optional[str], typer.Option(help="Only certificates expiring within this time, e.g. 30d, 12h.")] = None,
    expired: Annotated[bool, typer.Option("--expired", help="Only expired certificates.")] = False,
    issuer: Annotated[Optional[str], typer.Option(help="Issuer DN contains this text (case-insensitive).")] = None,
    san: Annotated[Optional[str], typer.Option(help="Has this SAN; .example.com matches any name below it.")] = None,
    owner: Annotated[Optional[str], typer.Option(help="Owned by.")] = None,
    tag: Annotated[Optional[list[str]], typer.Option(help="key=value, repeatable; all must match.")] = None,
    status: Annotated[Optional[str], typer.Option(help="active, expired, superseded or revoked.")] = None,
    unmanaged: Annotated[bool, typer.Option("--unmanaged", help="Only certificates nothing manages.")] = False,
    limit: Annotated[Optional[int], typer.Option(help="At most this many, soonest expiry first.")] = None,
    as_json: JsonOption = False,
) -> None:
    """List certificates, soonest expiry first."""
    try:
        within = parse_timespan(expiring_within) if expiring_within else None
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--expiring-within") from None
    if status and status not in inventory.STATUSES:
        raise typer.BadParameter(f"choose one of {', '.join(inventory.STATUSES)}", param_hint="--status")
    query = inventory.CertificateQuery(expiring_within=within, expired=expired, issuer=issuer, san=san, owner=owner,
                                       tags=parse_tags(tag), status=status, unmanaged=unmanaged, limit=limit)
    with read_session(get_engine()) as session:
        rows = inventory.list_certificates(session, query)
    if as_json:
        print_json(rows)
        return
    table = Table(show_edge=False, pad_edge=False)
    for column in ("fingerprint", "name", "expires (UTC)", "days", "status", "owner", "seen at"):
        table.add_column(column, no_wrap=column != "name", min_width=22 if column == "name" else None)
    for r in rows:
        color = "red" if r["days_left"] < 7 else "yellow" if r["days_left"] < 30 else ""
        days = f"{r['days_left']:.0f}"
        table.add_row(r["fingerprint_sha256"][:12], short_name(r), r["not_after"][:10],
                      f"[{color}]{days}[/]" if color else days, r["status"], r["owner"] or "", str(len(r["locations"])))
    out.print(table)
    out.print(f"{len(rows)} certificate(s)")


@app.command("show")
def show_command(ident: Annotated[str, typer.Argument(help="SHA-256 fingerprint or a unique prefix.")],
                 as_json: JsonOption = False) -> None:
    """Every field of one certificate, its chain, locations and history."""
    with read_session(get_engine()) as session:
        detail = inventory.show(session, ident)
    if as_json:
        print_json(detail)
        return
    skip = {"chain", "locations", "history"}
    for key, value in detail.items():
        if key not in skip and value not in (None, [], {}):
            out.print(f"[bold]{key:>22}[/]  {', '.join(map(str, value)) if isinstance(value, list) else value}")
    out.print("[bold]chain[/]" + ("" if detail["chain_complete"] else " (incomplete: the issuer is not in the inventory)"))
    for depth, link in enumerate(detail["chain"]):
        out.print(f"  {'  ' * depth}{link['fingerprint_sha256'][:16]}  {link['subject']}  (until {link['not_after']})")
    out.print("[bold]locations[/]")
    for loc in detail["locations"]:
        ghost = " [yellow]ghost[/]" if loc["ghost"] else ""
        out.print(f"  {loc['locator']}  ({loc['source']}, first {loc['first_seen']}, last {loc['last_seen']}){ghost}")
    out.print("[bold]history[/]")
    for event in detail["history"]:
        run = f"  flow run {event['flow_run_id']}" if event["flow_run_id"] else ""
        out.print(f"  #{event['seq']} {event['at']}  {event['action']}  by {event['actor']}{run}")


@app.command("export")
def export_command(
    ident: Annotated[str, typer.Argument(help="SHA-256 fingerprint or a unique prefix.")],
    format: Annotated[str, typer.Option("--format", "-f", help="pem, der, pkcs12 or json.")] = "pem",
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write here (mode 0600 with a key) instead of stdout.")] = None,
    include_key: Annotated[bool, typer.Option("--include-key", help="Include the private key (an audit event).")] = False,
    no_chain: Annotated[bool, typer.Option("--no-chain", help="The certificate alone, without its issuers.")] = False,
    password_file: PasswordFile = None,
    password_env: PasswordEnv = None,
) -> None:
    """Export a certificate; its private key only with --include-key."""
    from certpilot.export import FORMATS, ExportRequest, export_certificate

    if format not in FORMATS:
        raise typer.BadParameter(f"choose one of {', '.join(FORMATS)}", param_hint="--format")
    if include_key and output is None and sys.stdout.isatty():
        raise typer.BadParameter("refusing to print a private key to a terminal: use --output FILE")
    request = ExportRequest(ident, format, not no_chain, include_key, read_password(password_file, password_env))
    with write_session(get_engine()) as session:
        data = export_certificate(session, request, actor(), ring() if include_key else None)
    if output is None:
        sys.stdout.buffer.write(data)
        return
    fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if include_key else 0o644)
    if include_key:
        os.fchmod(fd, 0o600)  # O_CREAT's mode applies only to a new file: an existing one keeps its own
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    err.print(f"wrote {output}")

