"""`certpilot status [NAME]`: each managed certificate's current certificate, next renewal and why,
its targets' should-serve and verified fingerprints, its last error and its last runs."""

from __future__ import annotations

from typing import Annotated, Any, Optional

import typer
from rich.text import Text

from certpilot import inventory
from certpilot.database import get_engine, read_session
from certpilot.status import ManagedStatus, managed_status
from cli.console import JsonOption, line, out, print_json


def as_dict(s: ManagedStatus) -> dict[str, Any]:
    iso = inventory.iso
    return {
        "name": s.name, "issuer": s.issuer, "dns_names": list(s.dns_names), "ip_addresses": list(s.ip_addresses),
        "uris": list(s.uris),
        "current": None if s.current is None else {
            "fingerprint_sha256": s.current.fingerprint_sha256, "serial": s.current.serial,
            "not_before": iso(s.current.not_before), "not_after": iso(s.current.not_after),
            "days_left": s.current.days_left},
        "due": s.next_renewal.due, "next_renewal": iso(s.next_renewal.at), "reason": s.next_renewal.reason,
        "targets": [{"name": t.name, "kind": t.kind, "block": t.block, "desired_fingerprint": t.desired_fingerprint,
                     "verified_fingerprint": t.verified_fingerprint, "verified_at": iso(t.verified_at),
                     "deployed_at": iso(t.deployed_at), "in_step": t.in_step, "last_error": t.last_error}
                    for t in s.targets],
        "last_attempt_at": iso(s.last_attempt_at), "last_error": s.last_error,
        "runs": [{"seq": r.seq, "at": iso(r.at), "action": r.action, "object": r.object, "actor": r.actor,
                  "flow_run_id": r.flow_run_id} for r in s.runs],
        "violations": [dict(v) for v in s.violations],
    }


def _fp(value: str | None) -> str:
    return value[:16] if value else "-"


def _print(s: dict[str, Any]) -> None:
    names = ", ".join(s["dns_names"] + s["ip_addresses"] + s["uris"])
    out.print(line((s["name"], "bold"), f"  {names}  from {s['issuer']}"))
    cur = s["current"]
    if cur is None:
        out.print(line("  certificate  none yet"))
    else:
        left = cur["days_left"]
        out.print(line(f"  certificate  {cur['fingerprint_sha256']}  serial {cur['serial']}"))
        out.print(line(f"  valid        {cur['not_before']} to {cur['not_after']}  ",
                       (f"{left:.1f} days left" if left >= 0 else "expired", "red" if left < 7 else "")))
    when = ("due since " if s["due"] else "") + s["next_renewal"]
    out.print(line("  renewal      ", (when, "yellow" if s["due"] else ""), f"  ({s['reason']})"))
    if s["last_error"]:
        out.print(line("  last error   ", (s["last_error"], "red"), f"  (at {s['last_attempt_at']})"))
    out.print(line(f"  targets      {len(s['targets'])}" + (": should serve / verified" if s["targets"] else "")))
    for t in s["targets"]:
        state = ("in step", "green") if t["in_step"] else ("not verified", "yellow")
        verified = f" at {t['verified_at']}" if t["verified_at"] else ""
        out.print(line(f"    {t['name']} ({t['kind']})  {_fp(t['desired_fingerprint'])} / "
                       f"{_fp(t['verified_fingerprint'])}{verified}  ", state))
        if t["last_error"]:
            out.print(line("      last error ", (t["last_error"], "red")))
    open_ = [v for v in s["violations"] if v["waiver_id"] is None]
    waived = len(s["violations"]) - len(open_)
    out.print(line("  policy       ", (f"{len(open_)} violation(s)", "red" if open_ else "green"),
                   f", {waived} waived" if waived else ""))
    for v in open_:
        where = f"  at {v['place']}" if v["place"] else ""
        out.print(line(f"    {v['rule']} [{v['severity']}]  {v['detail']}{where}"))
    if s["runs"]:
        out.print(line("  last runs"))
    for r in s["runs"]:
        run = f"  flow run {r['flow_run_id']}" if r["flow_run_id"] else ""
        out.print(line(f"    #{r['seq']} {r['at']}  {r['action']}  {r['object']}  by {r['actor']}{run}"))


def status_command(
    name: Annotated[Optional[str], typer.Argument(metavar="NAME", help="One managed certificate (default: all).")] = None,
    as_json: JsonOption = False,
) -> None:
    """Each managed certificate: its current certificate, next renewal and why, each target's
    should-serve and verified fingerprints, the last error and the last runs."""
    with read_session(get_engine()) as session:
        rows = [as_dict(s) for s in managed_status(session, name)]
    if as_json:
        print_json(rows if name is None else rows[0])
        return
    for i, row in enumerate(rows):
        if i:
            out.print(Text(""))
        _print(row)
    if name is None:
        out.print(line(f"{len(rows)} managed certificate(s), {sum(r['due'] for r in rows)} due"))
