"""``certpilot report risk`` and ``certpilot report crypto``: the riskiest certificates and why, and the
crypto inventory (keys, signatures, the weak ones, post-quantum readiness).

``register(app)`` adds both commands to the report group (cli/report.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.table import Table

from certpilot import inventory
from certpilot.clock import utcnow
from certpilot.database import get_engine, read_session
from cli.console import JsonOption, cell, line, note, out, print_json

if TYPE_CHECKING:
    from certpilot.crypto_inventory import CryptoCertificate

__all__ = ["register", "report_crypto_command", "report_risk_command"]


def register(app: typer.Typer) -> None:
    app.command("risk")(report_risk_command)
    app.command("crypto")(report_crypto_command)


def report_risk_command(limit: Annotated[int, typer.Option("--limit", metavar="N", min=0, help=(
                            "How many of the riskiest to list (0: only the distribution)."))] = 20,
                        as_json: JsonOption = False) -> None:
    """A risk score from 0 to 100 per certificate in service, the riskiest first, each with the reasons
    that make it: days left, exposure (public and private endpoints serving it), weak key or signature,
    open policy violations, unmanaged."""
    from blocks.policy import policy_in_force
    from certpilot.risk import BANDS, risk_report

    policy = policy_in_force()
    with read_session(get_engine()) as session:
        report = risk_report(session, policy, utcnow(), limit)
    if as_json:
        print_json(report.as_dict())
        return
    out.print(line(("Certificate risk", "bold"), f" at {inventory.iso(report.generated_at)}: {report.scored} scored, "
                   f"policy {report.policy}"))
    bands = line("  ")
    for i, (label, _) in enumerate(BANDS):
        bands.append_text(line("   " if i else "", f"{label}: ", (report.distribution[label], "bold")))
    out.print(bands)
    if not report.risks:
        return
    table = Table(show_edge=False, pad_edge=False)
    for column in ("score", "certificate", "fingerprint", "owner", "days", "why"):
        table.add_column(column, no_wrap=column in ("score", "fingerprint", "days"))
    for r in report.risks:
        color = "red" if r.score >= 75 else "yellow" if r.score >= 50 else ""
        table.add_row(cell(r.score, color), cell(r.name), cell(r.fingerprint_sha256[:16]), cell(r.owner or ""),
                      cell(f"{r.days_left:.0f}"), cell("; ".join(r.reasons)))
    out.print(table)


def report_crypto_command(weak: Annotated[bool, typer.Option("--weak", help=(
                              "List the weak certificates: RSA under 2048 bits, DSA, EC under 256 bits, MD5 or "
                              "SHA-1 signatures."))] = False,
                          key: Annotated[Optional[str], typer.Option("--key", metavar="KEY", help=(
                              "List the certificates with this key: RSA-1024, EC-secp256r1, Ed25519, or a type "
                              "such as RSA."))] = None,
                          signature: Annotated[Optional[str], typer.Option("--signature", metavar="SIGNATURE", help=(
                              "List the certificates signed with this: a hash (sha1, md5), a family (RSA-SHA1) or "
                              "an algorithm's name."))] = None,
                          include_ca: Annotated[bool, typer.Option("--include-ca", help=(
                              "Count CA certificates too."))] = False,
                          as_json: JsonOption = False) -> None:
    """The crypto inventory: certificates in service by key and by signature algorithm, the weak ones, and
    what a move to post-quantum signatures would reissue, per issuer and owner. --weak, --key and
    --signature list the certificates that match (all given must match): which still use RSA-1024 or SHA-1."""
    from certpilot.crypto_inventory import crypto_inventory

    with read_session(get_engine()) as session:
        found = crypto_inventory(session, utcnow(), include_ca=include_ca)
    listing = weak or key is not None or signature is not None
    if listing:
        chosen = found.select(weak=weak, key=key, signature=signature)
        if as_json:
            print_json({"generated_at": inventory.iso(found.generated_at),
                        "filters": {"weak": weak, "key": key, "signature": signature},
                        "count": len(chosen), "certificates": [c.as_dict() for c in chosen]})
            return
        _listing(chosen)
        if not chosen and key is not None and not found.select(key=key):
            note(f"no certificate in service has the key {key!r}; the keys in use: {', '.join(found.keys) or 'none'}")
        if not chosen and signature is not None and not found.select(signature=signature):
            note(f"no certificate in service is signed with {signature!r}; the signatures in use: "
                 f"{', '.join(found.signatures) or 'none'}")
        return
    if as_json:
        print_json(found.as_dict())
        return
    out.print(line(("Crypto inventory", "bold"), f" at {inventory.iso(found.generated_at)}: "
                   f"{len(found.certificates)} certificates in service"))
    counts = Table(show_edge=False, pad_edge=False)
    for column in ("key", "count", "", "signature", "count "):
        counts.add_column(column)
    keys, signatures = list(found.keys.items()), list(found.signatures.items())
    for i in range(max(len(keys), len(signatures))):
        k = keys[i] if i < len(keys) else ("", "")
        s = signatures[i] if i < len(signatures) else ("", "")
        counts.add_row(cell(k[0], "red" if k[0] in found.weak_keys else ""), cell(k[1]), cell(""),
                       cell(s[0], "red" if s[0] in found.weak_signatures else ""), cell(s[1]))
    out.print(counts)
    weak_ones = found.weak
    out.print(line(("Weak", "bold"), f": {len(weak_ones)} certificates (certpilot report crypto --weak lists them)"))
    pq = found.pq
    out.print(line(("Post-quantum readiness", "bold"), f": {pq.classical} certificates use a classical key and would "
                   f"need reissuing; {pq.post_quantum} use a post-quantum one"))
    issuers = Table(show_edge=False, pad_edge=False)
    for column in ("issuer", "kind", "certificates", "keys", "can it issue something else?"):
        issuers.add_column(column, no_wrap=column in ("kind", "certificates"))
    for issuer in pq.issuers:
        issuers.add_row(cell(issuer.issuer), cell(issuer.kind), cell(issuer.certificates), cell(_counts(issuer.keys)),
                        cell(issuer.alternative))
    out.print(issuers)
    owners = Table(show_edge=False, pad_edge=False)
    for column in ("owner", "certificates", "keys"):
        owners.add_column(column)
    for o in pq.owners:
        owners.add_row(cell(o.owner), cell(o.certificates), cell(_counts(o.keys)))
    out.print(owners)


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k}: {n}" for k, n in counts.items())


def _listing(chosen: Sequence[CryptoCertificate]) -> None:
    table = Table(show_edge=False, pad_edge=False)
    for column in ("name", "fingerprint", "key", "signature", "owner", "places", "why"):
        table.add_column(column, no_wrap=column in ("fingerprint", "key"))
    for c in chosen:
        table.add_row(cell(c.name), cell(c.fingerprint_sha256[:16]), cell(c.key), cell(c.signature_algorithm),
                      cell(c.owner or ""), cell(", ".join(c.places) or "-"), cell("; ".join(c.weaknesses)))
    out.print(table)
    out.print(line(f"{len(chosen)} certificate{'' if len(chosen) == 1 else 's'}"))
