"""The ca commands: certpilot's private CA (init, list, serve, issue, revoke, CRLs, the root key)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from certpilot import inventory
from certpilot.database import get_engine, read_session, write_session
from cli.console import JsonOption, err, out, print_json
from cli.options import PasswordEnv, PasswordFile, actor, read_password, ring

app = typer.Typer(help="certpilot's private CA: issue, revoke, CRLs and OCSP.", no_args_is_help=True)


@app.command("init")
def ca_init_command(
    name: Annotated[str, typer.Argument(help="The CA's name: letters, digits, '.', '_', '-' (it becomes part of its URLs).")],
    base_url: Annotated[str, typer.Option(help="Where `certpilot ca serve` is reached, e.g. http://pki.internal:8180; "
                                               "the AIA, CRL and OCSP URLs in certificates derive from it.")],
    as_json: JsonOption = False,
) -> None:
    """Create a private CA: a root (EC P-384, 10 years) and an issuing CA (EC P-256, 5 years)."""
    from certpilot import ca

    with write_session(get_engine()) as session:
        ca.init_ca(session, ring(), actor(), name, base_url)
        info = next(i for i in ca.list_cas(session) if i["name"] == name)
    if as_json:
        print_json(info)
        return
    out.print(f"created CA {name}\n  root     {info['root_fingerprint']}  {info['root_subject']} (until {info['root_not_after']})"
              f"\n  issuing  {info['issuing_fingerprint']}  {info['issuing_subject']} (until {info['issuing_not_after']})")
    for label, url in info["urls"].items():
        out.print(f"  {label:<20} {url}")
    out.print("Serve these with `certpilot ca serve`; export the root key (`ca export-root-key`) and then remove it "
              "(`ca remove-root-key`) to keep it offline.")


@app.command("list")
def ca_list_command(as_json: JsonOption = False) -> None:
    """The private CAs, their certificates, CRL state and counts."""
    from certpilot import ca

    with read_session(get_engine()) as session:
        rows = ca.list_cas(session)
    if as_json:
        print_json(rows)
        return
    table = Table(show_edge=False, pad_edge=False)
    for column in ("name", "root key", "issuing CA until", "issued", "revoked", "CRL", "next update", "base URL"):
        table.add_column(column, no_wrap=column != "base URL")
    for r in rows:
        table.add_row(r["name"], r["root_key"], (r["issuing_not_after"] or "")[:10], str(r["issued"]), str(r["revoked"]),
                      f"#{r['crl_number']}", (r["crl_next_update"] or "")[:16], r["base_url"])
    out.print(table)
    out.print(f"{len(rows)} CA(s)")


@app.command("serve")
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
        server = CAHTTPServer(engine, ring, address, actor=actor(), timeout=timeout)
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


@app.command("issue")
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
        issued = ca.issue(session, ring(), actor(), name, request, profile, validity_days=days)
    chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in issued.chain)
    leaf = issued.leaf
    if output is None:
        sys.stdout.buffer.write(chain)
    else:
        output.write_bytes(chain)
    err.print(f"issued {leaf.fingerprint(hashes.SHA256()).hex()} "
              f"serial {leaf.serial_number:x}, valid until {leaf.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC"
              + (f"; wrote {output}" if output else ""))


@app.command("revoke")
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
        row = ca.revoke(session, ring(), actor(), fingerprint, flag)
        authority = ca.ca_of(session, row)
        result = {"fingerprint_sha256": row.fingerprint_sha256, "serial": row.serial_hex, "ca": authority.name,
                  "reason": ca.reason_name(row.revocation_reason), "revoked_at": inventory.iso(row.revoked_at),
                  "crl_number": authority.crl_number}
    if as_json:
        print_json(result)
        return
    out.print(f"revoked {result['fingerprint_sha256']} (serial {result['serial']}, {result['reason']}) at "
              f"{result['revoked_at']}; CA {result['ca']} published CRL #{result['crl_number']}")


@app.command("crl")
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
            der = ca.publish_crl(session, ring(), actor(), name).public_bytes(serialization.Encoding.DER)
    else:
        der = ca.current_crl(engine, ring, actor(), name)
    crl = x509.load_der_x509_crl(der)
    data = der if format == "der" else crl.public_bytes(serialization.Encoding.PEM)
    if output is None:
        sys.stdout.buffer.write(data)
    else:
        output.write_bytes(data)
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    err.print(f"CRL #{number} of CA {name}: {len(crl)} revoked, next update {crl.next_update_utc:%Y-%m-%d %H:%M} UTC"
              + (f"; wrote {output}" if output else ""))


@app.command("export-root-key")
def ca_export_root_key_command(
    name: Annotated[str, typer.Argument(help="The CA's name.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The file to create (mode 0600; never overwritten).")],
    password_file: PasswordFile = None,
    password_env: PasswordEnv = None,
) -> None:
    """Export the root certificate and key (PEM) to keep offline; an audit event."""
    from certpilot import ca

    password = read_password(password_file, password_env)
    try:
        fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        err.print(f"[red]error:[/] {output} exists: refusing to overwrite it")
        raise typer.Exit(1) from None
    try:
        os.fchmod(fd, 0o600)
        with write_session(get_engine()) as session:
            data = ca.export_root_key(session, ring(), actor(), name, password=password)
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


@app.command("remove-root-key")
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
    if not ca.remove_root_key(engine, actor(), name):
        out.print(f"CA {name}'s root key was already removed")
        return
    out.print(f"removed CA {name}'s root key from the inventory (crypto-shredded); issuance continues with the issuing key")
    if not exported:
        err.print("[yellow]warning:[/] no export of this root key was recorded: without a copy, no new issuing CA "
                  "can be signed under this root")

