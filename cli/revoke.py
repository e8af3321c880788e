"""`certpilot revoke`: revoke one certificate now, with the CA that issued it.

The same core path as the revoke-certificate flow (tasks.revocation's functions over
certpilot.revoking): with a Prefect API configured (cli.prefect_api) the flow runs, so the run is in
the operator's history; without one the same steps run directly in this process, and the issuer block
is read through a temporary local Prefect. A certificate that is unknown, or already revoked, is
answered from the inventory alone, before any Prefect or CA is asked.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from certpilot import revoking
from certpilot.ca import parse_reason
from certpilot.database import get_engine, read_session
from certpilot.revoking import RevocationReport
from cli import prefect_api
from cli.console import JsonOption, line, out, print_json
from cli.options import RevocationReason, actor


def revoke_command(
    certificate: Annotated[str, typer.Argument(metavar="FINGERPRINT-OR-MANAGED-NAME", help=(
        "A managed certificate's name (its current certificate), a SHA-256 fingerprint or a unique prefix of at "
        "least 8 hex digits, or serial:HEX."))],
    *,  # keyword-only from here (typer passes every option by name), so a required option needs no default
    reason: Annotated[RevocationReason, typer.Option(help=(
        "Why (RFC 5280); key-compromise when the private key may be in other hands (an ACME revocation is then "
        "signed with the certificate's own key when certpilot holds it)."))],
    issuer: Annotated[Optional[str], typer.Option(metavar="BLOCK", help=(
        "The issuer block that revokes it, BLOCK-TYPE/NAME (default: its managed certificate's issuer, or the "
        "private-ca block of the certpilot CA that issued it)."))] = None,
    no_wait: Annotated[bool, typer.Option("--no-wait", help=(
        "Do not watch the CRL and OCSP responder until they say revoked (and record how long that took)."))] = False,
    timeout: Annotated[float, typer.Option(metavar="SECONDS", min=0.1, max=600, help=(
        "How long to watch the CRL and OCSP responder."))] = 30.0,
    as_json: JsonOption = False,
) -> None:
    """Revoke a certificate with the CA that issued it and record it once; revoking it again says when and
    why it was revoked and changes nothing."""
    flag = parse_reason(reason.value)
    with read_session(get_engine()) as session:  # an unknown certificate fails here, before Prefect is asked
        revoking.find_certificate(session, certificate)
    if prefect_api.configured():
        from flows.revoke import revoke_certificate

        state = revoke_certificate(certificate=certificate, reason=reason.value, issuer=issuer,
                                   wait=not no_wait, timeout=timeout, return_state=True)
        report: RevocationReport = prefect_api.flow_result(state)
    else:
        from tasks import revocation

        located = revocation.locate(certificate, issuer)
        if located.already is None:
            prefect_api.no_history_note()
        who = actor()
        outcome = revocation.revoke_located(located, flag, who)
        propagation = None if no_wait else revocation.watch_and_record(outcome, timeout, who)
        report = RevocationReport(outcome, propagation)
    if as_json:
        print_json(report.as_dict())
        return
    for text in report.lines():
        out.print(line(text))
