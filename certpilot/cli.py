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

from certpilot import audit, cli_fleet, inventory, keystore
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
ca_app = typer.Typer(help="certpilot's private CA: issue, revoke, CRLs and OCSP.", no_args_is_help=True)
app.add_typer(ca_app, name="ca")

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


# ------------------------------------------------------------------------------------------ private CA

@ca_app.command("init")
def ca_init_command(
    name: Annotated[str, typer.Argument(help="The CA's name: letters, digits, '.', '_', '-' (it becomes part of its URLs).")],
    base_url: Annotated[str, typer.Option(help="Where `certpilot ca serve` is reached, e.g. http://pki.internal:8180; "
                                               "the AIA, CRL and OCSP URLs in certificates derive from it.")],
    as_json: JsonOption = False,
) -> None:
    """Create a private CA: a root (EC P-384, 10 years) and an issuing CA (EC P-256, 5 years)."""
    from certpilot import ca

    with write_session(get_engine()) as session:
        ca.init_ca(session, _ring(), _actor(), name, base_url)
        info = next(i for i in ca.list_cas(session) if i["name"] == name)
    if as_json:
        _print_json(info)
        return
    out.print(f"created CA {name}\n  root     {info['root_fingerprint']}  {info['root_subject']} (until {info['root_not_after']})"
              f"\n  issuing  {info['issuing_fingerprint']}  {info['issuing_subject']} (until {info['issuing_not_after']})")
    for label, url in info["urls"].items():
        out.print(f"  {label:<20} {url}")
    out.print("Serve these with `certpilot ca serve`; export the root key (`ca export-root-key`) and then remove it "
              "(`ca remove-root-key`) to keep it offline.")


@ca_app.command("list")
def ca_list_command(as_json: JsonOption = False) -> None:
    """The private CAs, their certificates, CRL state and counts."""
    from certpilot import ca

    with read_session(get_engine()) as session:
        rows = ca.list_cas(session)
    if as_json:
        _print_json(rows)
        return
    table = Table(show_edge=False, pad_edge=False)
    for column in ("name", "root key", "issuing CA until", "issued", "revoked", "CRL", "next update", "base URL"):
        table.add_column(column, no_wrap=column != "base URL")
    for r in rows:
        table.add_row(r["name"], r["root_key"], (r["issuing_not_after"] or "")[:10], str(r["issued"]), str(r["revoked"]),
                      f"#{r['crl_number']}", (r["crl_next_update"] or "")[:16], r["base_url"])
    out.print(table)
    out.print(f"{len(rows)} CA(s)")


@ca_app.command("serve")
def ca_serve_command(
    listen: Annotated[str, typer.Option(help="HOST:PORT to listen on.")] = "127.0.0.1:8180",
    timeout: Annotated[float, typer.Option(help="Socket timeout per connection, in seconds.")] = 10.0,
) -> None:
    """Serve every CA's CRL, CA certificates and OCSP over HTTP, until interrupted."""
    import logging

    from connectors.ca_http import CAHTTPServer, parse_listen

    try:
        address = parse_listen(listen)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--listen") from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    engine = get_engine()
    from certpilot import ca

    with read_session(engine) as session:
        cas = ca.list_cas(session)
    try:
        server = CAHTTPServer(engine, _ring, address, actor=_actor(), timeout=timeout)
    except OSError as exc:
        err.print(f"[red]error:[/] cannot listen on {listen}: {exc.strerror or exc}")
        raise typer.Exit(1) from None
    err.print(f"serving {len(cas)} CA(s) on {server.url} (Ctrl+C to stop)")
    for info in cas:
        err.print(f"  {info['name']}: OCSP {info['urls']['ocsp']}, CRL {info['urls']['crl']}")
    server.refresh_crls()
    try:
        server.serve_forever()
    finally:
        server.close()


@ca_app.command("issue")
def ca_issue_command(
    name: Annotated[str, typer.Argument(help="The CA's name.")],
    csr: Annotated[Path, typer.Option("--csr", help="The CSR (PEM or DER), or - for stdin.", allow_dash=True)],
    profile: Annotated[str, typer.Option(help="tls-server or tls-client.")] = "tls-server",
    days: Annotated[Optional[int], typer.Option(help="Validity in days (default 90; capped by the CA/B Forum maximum).")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write the chain (leaf, issuing CA) as PEM here instead of stdout.")] = None,
) -> None:
    """Issue a certificate from a CSR; the private key never comes near the CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    from certpilot import ca

    data = sys.stdin.buffer.read() if str(csr) == "-" else csr.read_bytes()
    try:
        request = (x509.load_pem_x509_csr(data) if b"-----BEGIN" in data else x509.load_der_x509_csr(data))
    except ValueError as exc:
        raise ca.CertificateRequestError(f"{csr} is not a CSR in PEM or DER: {exc}") from None
    with write_session(get_engine()) as session:
        issued = ca.issue(session, _ring(), _actor(), name, request, profile, validity_days=days)
    chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in issued.chain)
    leaf = issued.leaf
    if output is None:
        sys.stdout.buffer.write(chain)
    else:
        output.write_bytes(chain)
    err.print(f"issued {leaf.fingerprint(hashes.SHA256()).hex()} "
              f"serial {leaf.serial_number:x}, valid until {leaf.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC"
              + (f"; wrote {output}" if output else ""))


@ca_app.command("revoke")
def ca_revoke_command(
    fingerprint: Annotated[str, typer.Argument(help="SHA-256 fingerprint of the certificate, or a unique prefix.")],
    reason: Annotated[str, typer.Option(help="unspecified, key-compromise, superseded, affiliation-changed, "
                                             "cessation-of-operation or privilege-withdrawn.")] = "unspecified",
    as_json: JsonOption = False,
) -> None:
    """Revoke a certificate a private CA issued; a new CRL is published at once and OCSP answers revoked."""
    from certpilot import ca

    flag = ca.parse_reason(reason)
    with write_session(get_engine()) as session:
        row = ca.revoke(session, _ring(), _actor(), fingerprint, flag)
        authority = ca.ca_of(session, row)
        result = {"fingerprint_sha256": row.fingerprint_sha256, "serial": row.serial_hex, "ca": authority.name,
                  "reason": ca.reason_name(row.revocation_reason), "revoked_at": inventory.iso(row.revoked_at),
                  "crl_number": authority.crl_number}
    if as_json:
        _print_json(result)
        return
    out.print(f"revoked {result['fingerprint_sha256']} (serial {result['serial']}, {result['reason']}) at "
              f"{result['revoked_at']}; CA {result['ca']} published CRL #{result['crl_number']}")


@ca_app.command("crl")
def ca_crl_command(
    name: Annotated[str, typer.Argument(help="The CA's name.")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write here instead of stdout.")] = None,
    format: Annotated[str, typer.Option("--format", "-f", help="der or pem.")] = "der",
    refresh: Annotated[bool, typer.Option("--refresh", help="Issue a new CRL now, even if the current one is not due.")] = False,
) -> None:
    """The CA's current CRL (reissued first when it is due)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from certpilot import ca

    if format not in ("der", "pem"):
        raise typer.BadParameter("choose der or pem", param_hint="--format")
    engine = get_engine()
    if refresh:
        with write_session(engine) as session:
            der = ca.publish_crl(session, _ring(), _actor(), name).public_bytes(serialization.Encoding.DER)
    else:
        der = ca.current_crl(engine, _ring, _actor(), name)
    crl = x509.load_der_x509_crl(der)
    data = der if format == "der" else crl.public_bytes(serialization.Encoding.PEM)
    if output is None:
        sys.stdout.buffer.write(data)
    else:
        output.write_bytes(data)
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    err.print(f"CRL #{number} of CA {name}: {len(crl)} revoked, next update {crl.next_update_utc:%Y-%m-%d %H:%M} UTC"
              + (f"; wrote {output}" if output else ""))


@ca_app.command("export-root-key")
def ca_export_root_key_command(
    name: Annotated[str, typer.Argument(help="The CA's name.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The file to create (mode 0600; never overwritten).")],
    password_file: PasswordFile = None,
    password_env: PasswordEnv = None,
) -> None:
    """Export the root certificate and key (PEM) to keep offline; an audit event."""
    from certpilot import ca

    password = _password(password_file, password_env)
    try:
        fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        err.print(f"[red]error:[/] {output} exists: refusing to overwrite it")
        raise typer.Exit(1) from None
    try:
        os.fchmod(fd, 0o600)
        with write_session(get_engine()) as session:
            data = ca.export_root_key(session, _ring(), _actor(), name, password=password)
        with os.fdopen(fd, "wb") as handle:
            fd = -1
            handle.write(data)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        output.unlink(missing_ok=True)
        raise
    err.print(f"wrote CA {name}'s root certificate and {'encrypted ' if password else ''}key to {output} (mode 0600). "
              "Keep it offline; then `certpilot ca remove-root-key` takes it out of the inventory.")


@ca_app.command("remove-root-key")
def ca_remove_root_key_command(
    name: Annotated[str, typer.Argument(help="The CA's name.")],
    yes: Annotated[bool, typer.Option("--yes", help="Confirm: the inventory's copy is destroyed for good.")] = False,
) -> None:
    """Crypto-shred the root key in the inventory (keep an exported copy offline). Issuance goes on."""
    from certpilot import ca

    if not yes:
        raise typer.BadParameter("removing the root key cannot be undone: add --yes")
    engine = get_engine()
    with read_session(engine) as session:
        exported = ca.root_key_exported(session, name)
    if not ca.remove_root_key(engine, _actor(), name):
        out.print(f"CA {name}'s root key was already removed")
        return
    out.print(f"removed CA {name}'s root key from the inventory (crypto-shredded); issuance continues with the issuing key")
    if not exported:
        err.print("[yellow]warning:[/] no export of this root key was recorded: without a copy, no new issuing CA "
                  "can be signed under this root")


# ------------------------------------------------------------------------------------------ managed, renew

managed_app = typer.Typer(help="Managed certificates: what should exist, and when it renews.", no_args_is_help=True)
app.add_typer(managed_app, name="managed")


def _whole_days(text: str | None, option: str) -> int | None:
    if text is None:
        return None
    try:
        span = parse_timespan(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint=option) from None
    if span.total_seconds() % 86400:
        raise typer.BadParameter(f"{text!r} is not a whole number of days", param_hint=option)
    return int(span.total_seconds() // 86400)


def _schedule_rows(scheduled: list[Any]) -> list[dict[str, Any]]:
    return [{
        "name": s.managed.name, "dns_names": s.managed.dns_names, "ip_addresses": s.managed.ip_addresses,
        "issuer": s.managed.issuer, "profile": s.managed.profile, "key_algorithm": s.managed.key_algorithm,
        "validity_days": s.managed.validity_days, "owner": s.managed.owner, "tags": s.managed.tags or {},
        "renew_before_days": s.managed.renew_before_days, "use_ari": s.managed.use_ari,
        "current": None if s.current is None else {
            "fingerprint_sha256": s.current.fingerprint_sha256, "serial": s.current.serial_hex,
            "not_before": inventory.iso(s.current.not_before), "not_after": inventory.iso(s.current.not_after)},
        "due": s.decision.due, "next_renewal": inventory.iso(s.decision.renew_at), "reason": s.decision.reason,
        "last_attempt_at": inventory.iso(s.managed.last_attempt_at), "last_error": s.managed.last_error,
    } for s in scheduled]


@managed_app.command("add")
def managed_add_command(
    name: Annotated[str, typer.Argument(help="The managed certificate's name: letters, digits, '.', '_', '-'.")],
    dns: Annotated[Optional[list[str]], typer.Option("--dns", help="A DNS name, repeatable (the first is the CN).")] = None,
    ip: Annotated[Optional[list[str]], typer.Option("--ip", help="An IP address, repeatable.")] = None,
    issuer: Annotated[str, typer.Option(help="The issuer block, <block-type-slug>/<block-name>, e.g. private-ca/internal.")] = ...,  # type: ignore[assignment]
    profile: Annotated[str, typer.Option(help="tls-server or tls-client.")] = "tls-server",
    key_algorithm: Annotated[str, typer.Option(help="ec-p256, ec-p384, rsa-2048, rsa-3072, rsa-4096 or ed25519.")] = "ec-p256",
    validity_days: Annotated[Optional[int], typer.Option(help="Lifetime to ask for (default: the issuer's).")] = None,
    owner: Annotated[Optional[str], typer.Option(help="Who owns it.")] = None,
    tag: Annotated[Optional[list[str]], typer.Option(help="key=value tag, repeatable.")] = None,
    renew_before: Annotated[Optional[str], typer.Option(help="Renew at the latest this long before expiry, e.g. 30d "
                                                             "(default: at two thirds of the lifetime).")] = None,
    no_ari: Annotated[bool, typer.Option("--no-ari", help="Ignore the CA's renewal window (ARI) even if it offers one.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Define a managed certificate; having no certificate yet, it is due at once."""
    from certpilot import managed

    spec = managed.ManagedSpec(name=name, dns_names=tuple(dns or ()), ip_addresses=tuple(ip or ()), issuer=issuer,
                               profile=profile, key_algorithm=key_algorithm, validity_days=validity_days, owner=owner,
                               tags=_tags(tag), renew_before_days=_whole_days(renew_before, "--renew-before"),
                               use_ari=not no_ari)
    engine = get_engine()
    with write_session(engine) as session:
        managed.add(session, spec, _actor())
    with read_session(engine) as session:
        [row] = _schedule_rows(managed.schedule(session, managed=[managed.get(session, name)]))
    if as_json:
        _print_json(row)
        return
    names = ", ".join(row["dns_names"] + row["ip_addresses"])
    out.print(f"added managed certificate {name} ({names}) from {row['issuer']}: {row['reason']}")


@managed_app.command("list")
def managed_list_command(as_json: JsonOption = False) -> None:
    """Managed certificates, soonest renewal first, with why."""
    from certpilot import managed

    with read_session(get_engine()) as session:
        rows = _schedule_rows(managed.schedule(session))
    if as_json:
        _print_json(rows)
        return
    table = Table(show_edge=False, pad_edge=False)
    for column in ("name", "issuer", "expires (UTC)", "next renewal (UTC)", "why", "last error"):
        table.add_column(column, no_wrap=column not in ("why", "last error"))
    for r in rows:
        expires = r["current"]["not_after"][:16].replace("T", " ") if r["current"] else "-"
        when = "[yellow]due now[/]" if r["due"] else r["next_renewal"][:16].replace("T", " ")
        table.add_row(r["name"], r["issuer"], expires, when, r["reason"],
                      f"[red]{r['last_error']}[/]" if r["last_error"] else "")
    out.print(table)
    out.print(f"{len(rows)} managed certificate(s), {sum(r['due'] for r in rows)} due")


@app.command("renew")
def renew_command(
    name: Annotated[Optional[str], typer.Argument(help="The managed certificate to renew now.")] = None,
    due: Annotated[bool, typer.Option("--due", help="Renew every managed certificate that is due (the renew-due flow).")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="With --due: list what is due and why; change nothing.")] = False,
    within: Annotated[Optional[str], typer.Option(help="With --due: also what falls due within this time, e.g. 7d.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Renew one managed certificate (renew-certificate flow), or all that are due (renew-due flow)."""
    import datetime as dt

    from certpilot import managed

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
        with read_session(get_engine()) as session:
            rows = [r for r in _schedule_rows(managed.schedule(session, managed.utcnow() + ahead)) if r["due"]]
        if as_json:
            _print_json(rows)
            return
        for r in rows:
            current = f"replaces {r['current']['fingerprint_sha256'][:12]} (expires {r['current']['not_after']})" \
                if r["current"] else "first certificate"
            out.print(f"{r['name']}  {r['issuer']}  {r['reason']}; {current}")
        out.print(f"{len(rows)} managed certificate(s) due; dry run: nothing renewed")
        return
    from prefect import tags

    cli_fleet.prefect_note()
    if name is not None:
        from flows.renew import renew_certificate
        from tasks.renewal import certificate_tag

        with read_session(get_engine()) as session:
            managed.get(session, name)  # fail fast, before starting Prefect, on a name that does not exist
        with tags(certificate_tag(name)):
            state = renew_certificate(name=name, return_state=True)
    else:
        from flows.renew import renew_due

        state = renew_due(within_days=ahead.total_seconds() / 86400, return_state=True)
    if not state.is_completed():
        if as_json:
            _print_json({"ok": False, "error": state.message})
        else:
            err.print(f"[red]renewal failed:[/] {state.message}")
        raise typer.Exit(1)
    result = state.result()
    if as_json:
        _print_json({"ok": True, **result})
    elif name is not None:
        out.print(f"renewed {name}: certificate {result['fingerprint_sha256'][:16]} (serial {result['serial']}), "
                  f"expires {result['not_after']}" + (f", replaces {result['replaces'][:16]}" if result["replaces"] else ""))
    else:
        out.print(f"{result['due']} due: {result['renewed']} renewed, {result['failed']} failed")


# ------------------------------------------------------------------------------------------ fleet

app.add_typer(cli_fleet.target_app, name="target")
app.command("deploy")(cli_fleet.deploy_command)
app.command("discover")(cli_fleet.discover_command)


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
