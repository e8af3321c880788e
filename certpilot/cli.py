"""The ``certpilot`` command line.

Interactive commands call the core directly (an ephemeral Prefect would cost 9 to 16 s per
process); flows are imported only inside the commands that run them. Exit codes: 0 success, 1 the
operation failed (a file that did not import, a broken audit chain, no such certificate), 2 bad usage.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from certpilot import audit, inventory, keystore
from certpilot.database import get_engine, read_session, write_session
from certpilot.errors import CertpilotError
from certpilot.settings import load_settings
from certpilot.timespan import parse_timespan

app = typer.Typer(help="certpilot: certificate lifecycle management.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
inventory_app = typer.Typer(help="The certificate inventory.", no_args_is_help=True)
keys_app = typer.Typer(help="Private keys at rest and the master key.", no_args_is_help=True)
audit_app = typer.Typer(help="The hash-chained audit trail.", no_args_is_help=True)
report_app = typer.Typer(help="Reports.", no_args_is_help=True)
app.add_typer(inventory_app, name="inventory")
app.add_typer(keys_app, name="keys")
app.add_typer(audit_app, name="audit")
app.add_typer(report_app, name="report")

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False)
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of a table.")]


def _actor() -> audit.Actor:
    return audit.Actor(load_settings().actor)


def _ring() -> keystore.KeyRing:
    return keystore.load_key_ring(load_settings(), announce=lambda message: err.print(f"[yellow]note:[/] {message}"))


def _short_name(row: dict[str, Any]) -> str:
    """The name people know a certificate by: its first DNS name, else its CN, else its subject."""
    dns = next((s[4:] for s in row["sans"] if s.startswith("DNS:")), None)
    if dns:
        return dns + (f" +{len(row['sans']) - 1}" if len(row["sans"]) > 1 else "")
    cn = next((part[3:] for part in row["subject"].split(",") if part.startswith("CN=")), None)
    return cn or row["subject"]


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, default=str) + "\n")


def _tags(values: list[str] | None) -> dict[str, str]:
    tags = {}
    for value in values or []:
        key, sep, val = value.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{value!r} is not key=value", param_hint="--tag")
        tags[key] = val
    return tags


def _password(password_file: Path | None, password_env: str | None) -> bytes | None:
    if password_file:
        return password_file.read_bytes().rstrip(b"\r\n")
    if password_env:
        if password_env not in os.environ:
            raise typer.BadParameter(f"environment variable {password_env} is not set", param_hint="--password-env")
        return os.environ[password_env].encode()
    return None


PasswordFile = Annotated[Optional[Path], typer.Option(help="Read the password (PKCS#12, encrypted keys) from this file.")]
PasswordEnv = Annotated[Optional[str], typer.Option(help="Read the password from this environment variable.")]


# ------------------------------------------------------------------------------------------ inventory

@inventory_app.command("import")
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

    options = ImportOptions(owner=owner, tags=_tags(tag), password=_password(password_file, password_env),
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
            report = import_paths(engine, paths, options, _actor(), key_ring=_ring, stdin=stdin,
                                  on_file=lambda _r: progress.advance(task))
    else:
        report = import_paths(engine, paths, options, _actor(), key_ring=_ring, stdin=stdin)
    if as_json:
        _print_json({"files": [f.as_dict() for f in report.files], "summary": report.summary()})
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


@inventory_app.command("list")
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
                                       tags=_tags(tag), status=status, unmanaged=unmanaged, limit=limit)
    with read_session(get_engine()) as session:
        rows = inventory.list_certificates(session, query)
    if as_json:
        _print_json(rows)
        return
    table = Table(show_edge=False, pad_edge=False)
    for column in ("fingerprint", "name", "expires (UTC)", "days", "status", "owner", "seen at"):
        table.add_column(column, no_wrap=column != "name", min_width=22 if column == "name" else None)
    for r in rows:
        color = "red" if r["days_left"] < 7 else "yellow" if r["days_left"] < 30 else ""
        days = f"{r['days_left']:.0f}"
        table.add_row(r["fingerprint_sha256"][:12], _short_name(r), r["not_after"][:10],
                      f"[{color}]{days}[/]" if color else days, r["status"], r["owner"] or "", str(len(r["locations"])))
    out.print(table)
    out.print(f"{len(rows)} certificate(s)")


@inventory_app.command("show")
def show_command(ident: Annotated[str, typer.Argument(help="SHA-256 fingerprint or a unique prefix.")],
                 as_json: JsonOption = False) -> None:
    """Every field of one certificate, its chain, locations and history."""
    with read_session(get_engine()) as session:
        detail = inventory.show(session, ident)
    if as_json:
        _print_json(detail)
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


@inventory_app.command("export")
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
    request = ExportRequest(ident, format, not no_chain, include_key, _password(password_file, password_env))
    with write_session(get_engine()) as session:
        data = export_certificate(session, request, _actor(), _ring() if include_key else None)
    if output is None:
        sys.stdout.buffer.write(data)
        return
    fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if include_key else 0o644)
    if include_key:
        os.fchmod(fd, 0o600)  # O_CREAT's mode applies only to a new file: an existing one keeps its own
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    err.print(f"wrote {output}")


# ------------------------------------------------------------------------------------------ keys

@keys_app.command("rotate-master")
def rotate_master_command(
    new_key_file: Annotated[Optional[Path], typer.Option(help="Where to write the new master key (required when it comes from CERTPILOT_MASTER_KEY).")] = None,
    as_json: JsonOption = False,
) -> None:
    """Generate a new master key and re-seal every stored private key under it."""
    settings = load_settings()
    rotation = keystore.rotate_master_key(get_engine(settings), settings, _actor(), new_key_file)
    if as_json:
        _print_json({"old": rotation.old_id, "new": rotation.new_id, "keys": rotation.keys, "key_file": str(rotation.key_file)})
        return
    out.print(f"master key {rotation.old_id} -> {rotation.new_id}: {rotation.keys} key(s) re-sealed; new key in {rotation.key_file}")
    if settings.master_key:
        out.print(f"[yellow]now set CERTPILOT_MASTER_KEY_FILE={rotation.key_file} (or CERTPILOT_MASTER_KEY to its contents)[/]")


@keys_app.command("list")
def keys_list_command(as_json: JsonOption = False) -> None:
    """Stored private keys (never their contents)."""
    from sqlmodel import select

    from certpilot.models import PrivateKey

    with read_session(get_engine()) as session:
        rows = [{"ref": f"key:{k.id}", "algorithm": k.algorithm, "spki_sha256": k.spki_sha256, "origin": k.origin,
                 "master_key_id": k.master_key_id, "created_at": inventory.iso(k.created_at),
                 "destroyed_at": inventory.iso(k.destroyed_at)} for k in session.exec(select(PrivateKey)).all()]
    if as_json:
        _print_json(rows)
        return
    for row in rows:
        state = f"destroyed {row['destroyed_at']}" if row["destroyed_at"] else f"sealed by {row['master_key_id']}"
        out.print(f"{row['ref']}  {row['algorithm']:<9} spki {row['spki_sha256'][:16]}  {row['origin']:<9} {state}")


@keys_app.command("destroy")
def keys_destroy_command(ref: Annotated[str, typer.Argument(help="key:<id> as shown by `keys list`.")],
                         yes: Annotated[bool, typer.Option("--yes", help="Confirm: this cannot be undone.")] = False) -> None:
    """Crypto-shred a private key: its ciphertext and data key are erased."""
    if not yes:
        raise typer.BadParameter("destroying a key cannot be undone: add --yes")
    keystore.shred(get_engine(), keystore.KeyRef(ref.removeprefix("key:")), _actor())
    out.print(f"destroyed {ref}")


# ------------------------------------------------------------------------------------------ audit

@audit_app.command("verify")
def audit_verify_command(
    expect_head: Annotated[Optional[str], typer.Option(help="The head hash recorded earlier: detects removal of the newest events.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Check the whole hash chain; name the first broken or missing link."""
    try:
        with read_session(get_engine()) as session:
            status = audit.verify(session, expected_head=expect_head)
    except CertpilotError as exc:
        if as_json:
            _print_json({"ok": False, "error": str(exc), "seq": getattr(exc, "seq", None)})
        else:
            err.print(f"[red]audit chain broken:[/] {exc}")
        raise typer.Exit(1) from None
    if as_json:
        _print_json({"ok": True, "events": status.events, "head": status.head_hash})
    else:
        out.print(f"audit chain intact: {status.events} event(s), head {status.head_hash}")


@audit_app.command("list")
def audit_list_command(
    object: Annotated[Optional[str], typer.Option("--object", help="Object or its prefix, e.g. certificate:ab12.")] = None,
    action: Annotated[Optional[str], typer.Option(help="Only this action, e.g. certificate.added.")] = None,
    limit: Annotated[int, typer.Option(help="The newest N events.")] = 50,
    as_json: JsonOption = False,
) -> None:
    """The newest audit events, oldest first."""
    with read_session(get_engine()) as session:
        events = audit.list_events(session, object_prefix=object, action=action, limit=limit)
    rows = [{"seq": e.seq, "at": inventory.iso(e.at), "actor": e.actor, "action": e.action, "object": e.object,
             "flow_run_id": e.flow_run_id, "details": json.loads(e.details), "hash": e.hash} for e in events]
    if as_json:
        _print_json(rows)
        return
    for r in rows:
        out.print(f"#{r['seq']:<6} {r['at']}  {r['actor']:<20} {r['action']:<30} {r['object'][:40]}")


# ------------------------------------------------------------------------------------------ reports

@report_app.command("expiry")
def report_expiry_command(show: Annotated[int, typer.Option(help="How many of the soonest to list.")] = 20,
                          include_ca: Annotated[bool, typer.Option("--include-ca", help="Count CA certificates too.")] = False,
                          as_json: JsonOption = False) -> None:
    """How many certificates expire in each band, and the soonest of them."""
    from certpilot.report import expiry_report

    with read_session(get_engine()) as session:
        report = expiry_report(session, show=show, include_ca=include_ca)
    if as_json:
        _print_json(report.as_dict())
        return
    out.print(f"[bold]Expiry report[/] at {inventory.iso(report.generated_at)}")
    out.print("  " + "   ".join(f"{label}: [bold]{count}[/]" for label, count in report.bands.items()))
    table = Table(show_edge=False, pad_edge=False)
    for column in ("band", "days", "expires (UTC)", "name", "owner", "places"):
        table.add_column(column, no_wrap=column != "name")
    for r in report.soonest:
        color = {"expired": "red", "7 days": "red", "30 days": "yellow"}.get(r["band"], "")
        table.add_row(f"[{color}]{r['band']}[/]" if color else r["band"], f"{r['days_left']:.0f}",
                      r["not_after"][:10], _short_name(r), r["owner"] or "", str(len(r["locations"])))
    out.print(table)


# ------------------------------------------------------------------------------------------ misc

@app.command("sample-estate")
def sample_estate_command(directory: Annotated[Path, typer.Argument(help="Where to write it (created).")]) -> None:
    """Write a freshly generated sample estate: a CA, hosts with shared certificates, one broken file."""
    from certpilot.sample_estate import write_estate

    estate = write_estate(directory)
    out.print(f"wrote {estate.files} files under {estate.root}: {estate.leaves} leaf certificates on 3 hosts, "
              f"a CA chain, and {len(estate.broken)} broken file ({estate.broken[0]})")


@app.command("db-upgrade")
def db_upgrade_command() -> None:
    """Create or migrate the inventory database to the latest schema."""
    from certpilot.database import current_revision

    settings = load_settings()
    engine = get_engine(settings)
    out.print(f"inventory at {engine.url.render_as_string(hide_password=True)} is at revision {current_revision(engine)}")


def main() -> None:
    try:
        app()
    except CertpilotError as exc:
        err.print(f"[red]error:[/] {exc}")
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
