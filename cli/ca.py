"""The ca commands: certpilot's private CA (init, its issuer block, list, profiles, serve, issue, revoke,
CRLs, the root key)."""

from __future__ import annotations

import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from certpilot import inventory, token_keys
from certpilot.database import get_engine, read_session, write_session
from certpilot.errors import NotFoundError, PermanentError
from cli import issuer_blocks, prefect_api
from cli.console import JsonOption, cell, err, line, note, out, print_json, usage_error, warn
from cli.files import refuse_existing, write_new_file
from cli.options import (CrlFormat, PasswordEnv, PasswordFile, PlaintextKey, Profile, RevocationReason, actor,
                         key_password, parse_tags, ring)

app = typer.Typer(help="certpilot's private CA: issue, revoke, CRLs and OCSP.", no_args_is_help=True)

CaName = Annotated[str, typer.Argument(metavar="NAME", help="The CA's name.")]


class CaAlgorithm(StrEnum):
    EC = "ec"
    ML_DSA_44 = "ml-dsa-44"
    ML_DSA_65 = "ml-dsa-65"
    ML_DSA_87 = "ml-dsa-87"


def _token_spec(module: str | None, token_label: str | None, pin_file: Path | None,
                pin_env: str | None) -> token_keys.TokenSpec | None:
    given = {"--pkcs11-module": module, "--token-label": token_label, "--pin-file/--pin-env": pin_file or pin_env}
    if not any(given.values()):
        return None
    missing = [flag for flag, value in given.items() if not value]
    if missing:
        raise usage_error(f"an issuing key on a PKCS#11 token needs {', '.join(missing)} too", missing[0])
    if pin_file and pin_env:
        raise usage_error("give the token's PIN by --pin-file or by --pin-env, not both", "--pin-env")
    assert module is not None and token_label is not None
    pin = token_keys.PinSource(env=pin_env) if pin_env else token_keys.PinSource(file=Path(pin_file or "").resolve())
    return token_keys.TokenSpec(module, token_label, pin)


@app.command("init")
def ca_init_command(
    name: Annotated[str, typer.Argument(metavar="NAME", help=(
        "The CA's name: letters, digits, '.', '_', '-' (it becomes part of its URLs)."))],
    base_url: Annotated[str, typer.Option(metavar="URL", help=(
        "Where `certpilot ca serve` is reached, e.g. http://pki.internal:8180; the AIA, CRL and OCSP URLs in "
        "certificates derive from it."))],
    permit_dns: Annotated[Optional[list[str]], typer.Option("--permit-dns", metavar="SUFFIX", help=(
        "Name constraint, repeatable: the CA issues DNS names only at or under these (example.com covers "
        "example.com and *.example.com)."))] = None,
    exclude_dns: Annotated[Optional[list[str]], typer.Option("--exclude-dns", metavar="SUFFIX", help=(
        "Name constraint, repeatable: never DNS names at or under this (wins over --permit-dns)."))] = None,
    permit_uri: Annotated[Optional[list[str]], typer.Option("--permit-uri", metavar="DOMAIN", help=(
        "Name constraint, repeatable: URI names only with this host (a SPIFFE trust domain, prod.example) or, "
        "with a leading '.', any host under it (.example); RFC 5280 4.2.1.10."))] = None,
    permit_ip: Annotated[Optional[list[str]], typer.Option("--permit-ip", metavar="CIDR", help=(
        "Name constraint, repeatable: IP addresses only in this network (10.0.0.0/8)."))] = None,
    algorithm: Annotated[CaAlgorithm, typer.Option(help=(
        "The CA's keys: ec (root EC P-384, issuing CA EC P-256), or ML-DSA (FIPS 204, post-quantum) for both, "
        "for internal use: TLS stacks on OpenSSL before 3.5 cannot use ML-DSA certificates."))] = CaAlgorithm.EC,
    pkcs11_module: Annotated[Optional[str], typer.Option(metavar="LIBRARY", help=(
        "Make the issuing key (EC P-256) on a PKCS#11 token, never extractable, with this module "
        "(SoftHSM2: /usr/lib/softhsm/libsofthsm2.so); every certificate, CRL and OCSP response is signed "
        "there."))] = None,
    token_label: Annotated[Optional[str], typer.Option(metavar="LABEL", help=(
        "The token's label (with --pkcs11-module)."))] = None,
    pin_file: Annotated[Optional[Path], typer.Option(metavar="FILE", help=(
        "A file (mode 0600) holding the token's user PIN; its path is recorded, read whenever the CA signs."))] = None,
    pin_env: Annotated[Optional[str], typer.Option(metavar="VAR", help=(
        "An environment variable holding the token's user PIN (instead of --pin-file); its name is recorded."))] = None,
    as_json: JsonOption = False,
) -> None:
    """Create a private CA: a root (EC P-384, 10 years) and an issuing CA (EC P-256, 5 years); with a
    Prefect API (PREFECT_API_URL), save its issuer block private-ca/NAME too. Name constraints (--permit-*,
    --exclude-dns) go on the issuing certificate, critical: relying parties refuse a name outside them, and
    the CA refuses to sign one. With --pkcs11-module, --token-label and --pin-file (or --pin-env) the issuing
    key is made on that token and never leaves it; the PIN is read from the file or variable each time, never
    stored."""
    from certpilot import ca, name_constraints
    from connectors.private_ca import open_token

    try:
        constraints = name_constraints.parse(permit_dns or (), exclude_dns or (), permit_uri or (), permit_ip or ())
    except PermanentError as exc:  # names the flag and the value
        raise usage_error(str(exc)) from None
    token = _token_spec(pkcs11_module, token_label, pin_file, pin_env)
    if token is not None and algorithm is not CaAlgorithm.EC:
        raise usage_error(f"--algorithm {algorithm.value} with --pkcs11-module: a key on a token is EC P-256 (PKCS#11 "
                          "tokens such as SoftHSM2 make no ML-DSA keys)", "--algorithm")
    with write_session(get_engine()) as session:
        ca.init_ca(session, ring(), actor(), name, base_url, constraints=constraints, algorithm=algorithm.value,
                   token=token, tokens=open_token)
        info = next(i for i in ca.list_cas(session) if i["name"] == name)
    registered = prefect_api.configured()
    if registered:
        issuer_blocks.register_private_ca(name)
    issuer = issuer_blocks.private_ca_issuer(name)
    if as_json:
        print_json({**info, "issuer_block": issuer, "issuer_block_saved": registered,
                    "register_command": None if registered else issuer_blocks.register_command(name)})
        return
    out.print(line(f"created CA {name}\n  root     {info['root_fingerprint']}  {info['root_subject']} "
                   f"(until {info['root_not_after']})"))
    out.print(line(f"  issuing  {info['issuing_fingerprint']}  {info['issuing_subject']} (until {info['issuing_not_after']})"))
    out.print(line(f"  {'algorithm':<20} {info['algorithm']}; issuing key in {info['issuing_key_custody']}"))
    for key, values in info["name_constraints"].items():
        if values:
            out.print(line(f"  {key.replace('_', ' '):<20} {', '.join(values)}"))
    for label, url in info["urls"].items():
        out.print(line(f"  {label:<20} {url}"))
    if registered:
        out.print(line(f"saved its issuer block {issuer}: managed certificates name it with --issuer {issuer}"))
    else:
        note(f"PREFECT_API_URL is not set: its issuer block was not saved. Point PREFECT_API_URL at your Prefect "
             f"server and run `{issuer_blocks.register_command(name)}`; managed certificates then name it with "
             f"--issuer {issuer}", out)
    out.print(line("Serve these with `certpilot ca serve`; export the root key (`ca export-root-key`) and then remove "
                   "it (`ca remove-root-key`) to keep it offline."))


@app.command("register-block")
def ca_register_block_command(name: CaName, as_json: JsonOption = False) -> None:
    """Save CA NAME's issuer block (private-ca/NAME) in Prefect (PREFECT_API_URL), replacing one of that name."""
    from certpilot import ca

    with read_session(get_engine()) as session:
        ca.get_ca(session, name)  # a CA that exists
    issuer = issuer_blocks.register_private_ca(name)
    if as_json:
        print_json({"ca": name, "issuer_block": issuer})
        return
    out.print(line(f"saved CA {name}'s issuer block {issuer}: managed certificates name it with --issuer {issuer}"))


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
    for column in ("name", "issuing key", "root key", "issuing CA until", "issued", "revoked", "CRL", "next update",
                   "base URL"):
        table.add_column(column, no_wrap=column not in ("base URL", "issuing key"))
    for r in rows:
        table.add_row(cell(r["name"]), cell(f"{r['algorithm']} {r['issuing_key_custody']}"), cell(r["root_key"]),
                      cell((r["issuing_not_after"] or "")[:10]), cell(r["issued"]),
                      cell(r["revoked"]), cell(f"#{r['crl_number']}"), cell((r["crl_next_update"] or "")[:16]),
                      cell(r["base_url"]))
    out.print(table)
    out.print(line(f"{len(rows)} CA(s)"))


@app.command("serve")
def ca_serve_command(
    listen: Annotated[str, typer.Option(metavar="HOST:PORT", help="Where to listen.")] = "127.0.0.1:8180",
    timeout: Annotated[float, typer.Option(metavar="SECONDS", min=0.001, help=(
        "Time a client has to send a whole request, and the listener to answer it."))] = 10.0,
) -> None:
    """Serve every CA's CRL, CA certificates and OCSP over HTTP, until SIGTERM or Ctrl+C (the CA part of
    `certpilot serve`'s listener, alone)."""
    from certpilot import ca
    from cli import serve

    with read_session(get_engine()) as session:
        cas = ca.list_cas(session)
    service = serve.http_service(listen, ca=True, metrics=False, request_seconds=timeout)
    err.print(line(f"serving {len(cas)} CA(s) on {service.url} (Ctrl+C to stop)"))
    for info in cas:
        err.print(line(f"  {info['name']}: OCSP {info['urls']['ocsp']}, CRL {info['urls']['crl']}"))
    serve.run_until_signalled((service.serve(), service.stop))


@app.command("issue")
def ca_issue_command(
    name: CaName,
    csr: Annotated[Path, typer.Option("--csr", metavar="FILE", help="The CSR (PEM or DER), or - for stdin.", allow_dash=True)],
    profile: Annotated[Profile, typer.Option(help="What the certificate is for.")] = Profile.TLS_SERVER,
    days: Annotated[Optional[int], typer.Option(metavar="DAYS", min=1, help=(
        "Validity in days (default: the profile's; over the profile's maximum is refused, see `certpilot ca "
        "profiles`; cut, and said, at the issuing CA's expiry)."))] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", metavar="FILE", help=(
        "Write the chain (leaf, issuing CA) as PEM here instead of stdout."))] = None,
    owner: Annotated[Optional[str], typer.Option(metavar="TEAM", help=(
        "Who owns the certificate (default: the policy's first ownership rule matching its names)."))] = None,
    tag: Annotated[Optional[list[str]], typer.Option(metavar="KEY=VALUE", help="A tag, repeatable.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Issue a certificate from a CSR; the private key never comes near the CA. The request is checked
    against the policy in force first (`certpilot policy show`): one that violates it is refused, naming
    the rules, and nothing is signed."""
    import dataclasses

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    from blocks.policy import policy_in_force
    from certpilot import ca, violations
    from connectors.private_ca import open_token
    from certpilot.clock import utcnow
    from certpilot.x509info import describe_certificate

    tags = parse_tags(tag)
    data = sys.stdin.buffer.read() if str(csr) == "-" else csr.read_bytes()
    try:
        request = (x509.load_pem_x509_csr(data) if b"-----BEGIN" in data else x509.load_der_x509_csr(data))
    except ValueError as exc:
        raise ca.CertificateRequestError(f"{csr} is not a CSR in PEM or DER: {exc}") from None
    policy, now = policy_in_force(), utcnow()
    validity = days if days is not None else ca.get_profile(profile.value).default_days
    facts = violations.csr_facts(request, issuer_blocks.private_ca_issuer(name), profile.value, validity, owner, tags,
                                 now)
    if owner is None:
        owner = policy.owner_for(facts)
        facts = dataclasses.replace(facts, owner=owner)
    who = actor()
    with write_session(get_engine()) as session:
        ca.get_ca(session, name)  # an unknown CA is named as such, before the policy is asked
        violations.gate(session, policy, facts, f"the certificate requested by {csr} from CA {name}", now)
        issued = ca.issue(session, ring(), who, name, request, profile.value, validity_days=days, now=now,
                          tokens=open_token)
        if owner is not None or tags:  # recorded on the certificate as `inventory import --owner/--tag` does
            inventory.upsert(session, [inventory.Observation(describe_certificate(issued.leaf), None, ca.SOURCE)],
                             who, owner=owner, tags=tags or None, now=now)
    chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in issued.chain)
    leaf = issued.leaf
    if output is not None:
        output.write_bytes(chain)
    result = {"fingerprint_sha256": leaf.fingerprint(hashes.SHA256()).hex(), "serial": format(leaf.serial_number, "x"),
              "not_after": inventory.iso(leaf.not_valid_after_utc), "ca": name, "profile": profile.value,
              "notes": list(issued.notes), "output": str(output) if output else None,
              "chain_pem": chain.decode("ascii")}
    if as_json:
        print_json(result)
        return
    if output is None:
        sys.stdout.buffer.write(chain)
    err.print(line(f"issued {result['fingerprint_sha256']} serial {result['serial']}, valid until "
                   f"{leaf.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC" + (f"; wrote {output}" if output else "")))
    for text in issued.notes:
        note(text)


@app.command("profiles")
def ca_profiles_command(as_json: JsonOption = False) -> None:
    """The private CA's profiles: what each is for, its extended key usage, the validity it gives by
    default and at most (days, counted inclusively), and why that maximum."""
    from certpilot import ca

    rows = [p.as_dict() for p in ca.CA_PROFILES.values()]
    if as_json:
        print_json(rows)
        return
    table = Table(show_edge=False, pad_edge=False)
    for column in ("profile", "purpose", "EKU", "default days", "max days"):
        table.add_column(column, no_wrap=column != "purpose")
    for r in rows:
        table.add_row(cell(r["name"]), cell(r["purpose"]), cell(", ".join(r["extended_key_usage"])),
                      cell(r["default_days"]), cell(r["max_days"]))
    out.print(table)
    for r in rows:
        out.print(line(f"{r['name']}: at most {r['max_days']} days: {r['why']}"))
    out.print(line("The CA/B Forum maximum (398 days, 200 from 2026-03-15, ...) binds publicly trusted certificates, "
                   "not these; a tls-server certificate within it carries the CA/B Forum DV policy."))


@app.command("revoke")
def ca_revoke_command(
    fingerprint: Annotated[str, typer.Argument(metavar="FINGERPRINT", help=(
        "SHA-256 fingerprint of the certificate, or a unique prefix."))],
    reason: Annotated[RevocationReason, typer.Option(help="Why (RFC 5280).")] = RevocationReason.UNSPECIFIED,
    as_json: JsonOption = False,
) -> None:
    """Revoke a certificate a private CA issued; a new CRL is published at once and OCSP answers revoked.
    Revoking it again changes nothing (only key-compromise replaces an earlier reason)."""
    from certpilot import ca

    from connectors.private_ca import open_token

    flag = ca.parse_reason(reason.value)
    with write_session(get_engine()) as session:
        before = inventory.resolve(session, fingerprint)
        was = (before.status, before.revocation_reason)
        row = ca.revoke(session, ring(), actor(), fingerprint, flag, tokens=open_token)
        authority = ca.ca_of(session, row)
        already = was[0] == "revoked" and was[1] == row.revocation_reason
        result: dict[str, Any] = {
            "fingerprint_sha256": row.fingerprint_sha256, "serial": row.serial_hex, "ca": authority.name,
            "reason": ca.reason_name(row.revocation_reason), "revoked_at": inventory.iso(row.revoked_at),
            "crl_number": authority.crl_number, "already_revoked": already}
    if as_json:
        print_json(result)
        return
    if already:
        out.print(line(f"{result['fingerprint_sha256']} (serial {result['serial']}) was already revoked at "
                       f"{result['revoked_at']} ({result['reason']}): nothing changed; CA {result['ca']}'s "
                       f"CRL #{result['crl_number']} lists it"))
    elif was[0] == "revoked":
        out.print(line(f"{result['fingerprint_sha256']} (serial {result['serial']}) was already revoked at "
                       f"{result['revoked_at']}; its reason is now {result['reason']}; CA {result['ca']} published "
                       f"CRL #{result['crl_number']}"))
    else:
        out.print(line(f"revoked {result['fingerprint_sha256']} (serial {result['serial']}, {result['reason']}) at "
                       f"{result['revoked_at']}; CA {result['ca']} published CRL #{result['crl_number']}"))


@app.command("crl")
def ca_crl_command(
    name: CaName,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", metavar="FILE", help="Write here instead of stdout.")] = None,
    format: Annotated[CrlFormat, typer.Option("--format", "-f", help="The file format.")] = CrlFormat.DER,
    refresh: Annotated[bool, typer.Option("--refresh", help="Issue a new CRL now, even if the current one is not due.")] = False,
    as_json: JsonOption = False,
) -> None:
    """The CA's current CRL (reissued first when it is due)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from certpilot import ca

    from connectors.private_ca import open_token

    if as_json and output is None:
        raise usage_error("--json describes the CRL written: give --output FILE", "--json")
    engine = get_engine()
    if refresh:
        with write_session(engine) as session:
            der = ca.publish_crl(session, ring(), actor(), name, tokens=open_token).public_bytes(
                serialization.Encoding.DER)
    else:
        der = ca.current_crl(engine, ring, actor(), name, tokens=open_token)
    crl = x509.load_der_x509_crl(der)
    data = der if format is CrlFormat.DER else crl.public_bytes(serialization.Encoding.PEM)
    if output is None:
        sys.stdout.buffer.write(data)
    else:
        output.write_bytes(data)
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    if as_json:
        print_json({"ca": name, "crl_number": number, "revoked": len(crl), "this_update": inventory.iso(crl.last_update_utc),
                    "next_update": inventory.iso(crl.next_update_utc), "format": format.value, "output": str(output)})
        return
    err.print(line(f"CRL #{number} of CA {name}: {len(crl)} revoked, next update {crl.next_update_utc:%Y-%m-%d %H:%M} UTC"
                   + (f"; wrote {output}" if output else "")))


@app.command("export-root-key")
def ca_export_root_key_command(
    name: CaName,
    output: Annotated[Path, typer.Option("--output", "-o", metavar="FILE", help="The file to create (mode 0600; never overwritten).")],
    password_file: PasswordFile = None,
    password_env: PasswordEnv = None,
    plaintext_key: PlaintextKey = False,
    as_json: JsonOption = False,
) -> None:
    """Export the root certificate and key (PEM) to keep offline; an audit event. The key is encrypted
    with a password from --password-file, --password-env or a prompt, unless --plaintext-key."""
    from certpilot import ca

    refuse_existing(output)
    with read_session(get_engine()) as session:
        if ca.get_ca(session, name).root_key_id is None:  # before asking for a password
            raise NotFoundError(f"CA {name}'s root key was removed from the inventory: only exported copies remain")
    password = key_password(password_file, password_env, plaintext_key, f"CA {name}'s root key")
    with write_session(get_engine()) as session:
        data = ca.export_root_key(session, ring(), actor(), name, password=password)
        write_new_file(output, data, secret=True, force=False)  # inside the transaction: no file, no audit event
    if as_json:
        print_json({"ca": name, "output": str(output), "encrypted": password is not None})
        return
    err.print(line(f"wrote CA {name}'s root certificate and {'encrypted ' if password else 'UNENCRYPTED '}key to "
                   f"{output} (mode 0600). Keep it offline; then `certpilot ca remove-root-key` takes it out of the "
                   "inventory."))


@app.command("remove-root-key")
def ca_remove_root_key_command(
    name: CaName,
    yes: Annotated[bool, typer.Option("--yes", help="Confirm: the inventory's copy is destroyed for good.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Crypto-shred the root key in the inventory (keep an exported copy offline). Issuance goes on."""
    from certpilot import ca

    if not yes:
        raise usage_error("removing the root key cannot be undone: add --yes")
    engine = get_engine()
    with read_session(engine) as session:
        exported = ca.root_key_exported(session, name)
    removed = ca.remove_root_key(engine, actor(), name)
    if as_json:
        print_json({"ca": name, "removed": removed, "already_removed": not removed, "export_recorded": exported})
        return
    if not removed:
        out.print(line(f"CA {name}'s root key was already removed"))
        return
    out.print(line(f"removed CA {name}'s root key from the inventory (crypto-shredded); issuance continues with the "
                   "issuing key"))
    if not exported:
        warn("no export of this root key was recorded: without a copy, no new issuing CA can be signed under this root")


@app.command("bundle")
def ca_bundle_command(
    name: CaName,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", metavar="FILE", help=(
        "Write the bundle (PEM) here instead of stdout."))] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace FILE if it exists.")] = False,
    as_json: JsonOption = False,
) -> None:
    """CA NAME's trust bundle: its root, then its issuing CA certificates in force (newest first), PEM: what
    relying parties trust, and what trust-bundle targets distribute (`certpilot ca distribute`)."""
    from certpilot import trust_bundle

    with read_session(get_engine()) as session:
        bundle = trust_bundle.of_ca(session, name)
    if output is not None:
        write_new_file(output, bundle.pem, secret=False, force=force)
    if as_json:
        where = {"output": str(output)} if output is not None else {"pem": bundle.pem.decode()}
        print_json({**bundle.as_dict(), **where})
        return
    if output is None:
        sys.stdout.write(bundle.pem.decode())
        return
    out.print(line(f"wrote {bundle.describe()} to {output}"))


@app.command("distribute")
def ca_distribute_command(name: CaName, as_json: JsonOption = False) -> None:
    """Bring every trust-bundle target of CA NAME to its bundle of now (after a new issuing CA, say): each
    file is rewritten where it differs, read back and verified (SHA-256), its reload command run. The
    targets are those of managed certificates the CA issued (`certpilot target add NAME TARGET --kind
    trust-bundle --block ssh-host/HOST --set path=...`). Exit 1 when a target failed."""
    import logging

    from certpilot import trust_bundle
    from connectors import kms
    from certpilot.settings import load_settings
    from tasks.deployment import deployer_for

    engine = get_engine()
    with read_session(engine) as session:
        bundle = trust_bundle.of_ca(session, name)
    settings = load_settings()
    done = trust_bundle.distribute(engine, name, lambda t: deployer_for(t.managed, t.target)[1],
                                   kms.key_ring_loader(settings), actor(),
                                   logging.getLogger("certpilot.cli"))
    failed = [d for d in done if not d.outcome.action.ok]
    if as_json:
        print_json({**bundle.as_dict(), "targets": [d.as_dict() for d in done], "failed": len(failed)})
    else:
        for d in done:
            style = "" if d.outcome.action.ok else "red"
            out.print(line((f"{d.target.managed}/{d.target.target}", style),
                           f"  {d.outcome.action}: {d.outcome.detail}"))
        out.print(line(f"{bundle.describe()}: {len(done)} trust-bundle target(s), {len(failed)} failed"))
        if not done:
            note(f"no trust-bundle target distributes CA {name}'s bundle: add one to a managed certificate it issues "
                 "(`certpilot target add MANAGED TARGET --kind trust-bundle --block ssh-host/HOST --set path=FILE`)",
                 out)
    if failed:
        raise typer.Exit(1)
