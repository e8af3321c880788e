"""A managed certificate's history as the Prefect UI shows it: the audit events one flow run recorded
about it, as the markdown of an artifact keyed ``certificate-<name>``.

Prefect keeps every version of a keyed artifact, so the artifact of each run that touched a
certificate makes its history across runs, one search away in the UI's Artifacts page (flow and task
runs carry the tag ``certificate:<name>`` for the same reason). The audit trail stays the record: the
artifact is a view of it, and names the command that reads the whole trail.

Which events are about managed certificate ``name``: those on ``managed:<name>`` and its targets
(``target:<name>/...``), on the certificates it has had (``certificate:<fingerprint>``) and on their
keys (``key:<id>``). A run about one certificate (renew-certificate, deploy-certificate) counts every
event it recorded as that certificate's, the chain and a failed attempt's unused key included.

Runs are found from ``after_seq``, the head of the chain when the run started: events are appended
in sequence, so the query reads a range of the primary key, not the whole trail.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col

from certpilot.managed import certificate_tag
from certpilot.models import AuditEvent, Certificate, ManagedCertificate, PrivateKey

__all__ = ["HistoryEvent", "artifact_key", "audit_head", "history_markdown", "run_history"]

ROWS_SHOWN = 200  # events listed in one artifact; the rest are counted
_CHUNK = 500  # values per IN (...) query


@dataclass(frozen=True)
class HistoryEvent:
    """One audit event, as an artifact lists it (public: audit details never hold secrets)."""

    seq: int
    at: dt.datetime
    actor: str
    action: str
    object: str
    details: dict[str, Any]


def artifact_key(name: str, kind: str = "certificate") -> str:
    """The key of managed certificate ``name``'s artifacts of ``kind`` (its history: ``certificate``; its
    deployment and retirement reports): ``kind-`` and the name in the lower-case letters, digits and dashes
    that Prefect allows (``Web_1.prod`` -> ``certificate-web-1-prod``)."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unnamed"
    return f"{kind}-{slug}"[:100]


def audit_head(session: Session) -> int:
    """The sequence number of the newest audit event (0 for an empty trail)."""
    return int(session.execute(sa.select(sa.func.coalesce(sa.func.max(col(AuditEvent.seq)), 0))).scalar_one())


def _owners(session: Session, query: sa.Select[Any], key: Any, values: set[str]) -> dict[str, str]:
    """Each of ``values`` (of column ``key``) -> the managed certificate's name ``query`` pairs it with,
    read a chunk of values at a time; values it pairs with none are left out."""
    out: dict[str, str] = {}
    items = sorted(values)
    for start in range(0, len(items), _CHUNK):
        out.update({value: name for value, name in session.execute(query.where(key.in_(items[start:start + _CHUNK])))})
    return out


def _owner_lookups(session: Session, fingerprints: set[str], key_ids: set[str]) -> tuple[dict[str, str], dict[str, str]]:
    """Whose certificates (by fingerprint) and whose keys (by id: the key of a certificate of theirs) these are."""
    managed = col(ManagedCertificate.id) == col(Certificate.managed_certificate_id)
    by_certificate = _owners(session, sa.select(col(Certificate.fingerprint_sha256), col(ManagedCertificate.name))
                             .join(ManagedCertificate, managed), col(Certificate.fingerprint_sha256), fingerprints)
    by_key = _owners(session, sa.select(col(PrivateKey.id), col(ManagedCertificate.name))
                     .join(Certificate, col(Certificate.spki_sha256) == col(PrivateKey.spki_sha256))
                     .join(ManagedCertificate, managed), col(PrivateKey.id), key_ids)
    return by_certificate, by_key


def _managed_name(obj: str) -> str | None:
    """The managed certificate an object names directly (``managed:web`` or ``target:web/nginx``)."""
    kind, _, rest = obj.partition(":")
    if kind == "managed":
        return rest
    if kind == "target":
        return rest.rpartition("/")[0] or None
    return None


def run_history(session: Session, flow_run_id: str, after_seq: int,
                names: Sequence[str] | None = None, *, whole_run: bool = False) -> dict[str, tuple[HistoryEvent, ...]]:
    """The audit events flow run ``flow_run_id`` recorded after event ``after_seq``, by the managed
    certificate they are about: for each of ``names`` (each present, with no events if there were
    none), or for every managed certificate they touch when ``names`` is None. With ``whole_run``
    (a run about the one certificate in ``names``) every event of the run is that certificate's."""
    rows = session.execute(sa.select(AuditEvent).where(col(AuditEvent.seq) > after_seq,
                                                       col(AuditEvent.flow_run_id) == flow_run_id)
                           .order_by(col(AuditEvent.seq))).scalars().all()
    events = [HistoryEvent(e.seq, e.at, e.actor, e.action, e.object, json.loads(e.details)) for e in rows]
    wanted = list(dict.fromkeys(names)) if names is not None else None
    if whole_run:
        if wanted is None or len(wanted) != 1:
            raise ValueError("whole_run needs exactly one certificate name")
        return {wanted[0]: tuple(events)}
    fingerprints = {e.object.partition(":")[2] for e in events if e.object.startswith("certificate:")}
    key_ids = {e.object.partition(":")[2] for e in events if e.object.startswith("key:")}
    by_certificate, by_key = _owner_lookups(session, fingerprints, key_ids)
    out: dict[str, list[HistoryEvent]] = {name: [] for name in wanted or []}
    for event in events:
        kind, _, rest = event.object.partition(":")
        owner = (_managed_name(event.object) if kind in ("managed", "target") else
                 by_certificate.get(rest) if kind == "certificate" else by_key.get(rest) if kind == "key" else None)
        if owner is None or (wanted is not None and owner not in out):
            continue
        out.setdefault(owner, []).append(event)
    return {name: tuple(found) for name, found in out.items()}


def _cell(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= 160 else text[:157] + "..."


def history_markdown(name: str, events: Sequence[HistoryEvent], run: str) -> str:
    """The artifact of one run's events about managed certificate ``name``; ``run`` names the run
    (e.g. ``renew-due run 'amber-fox'``)."""
    lines = [f"# {name}: what {run} did", "",
             f"Every run about it is tagged `{certificate_tag(name)}` (filter the runs by that tag); each run's "
             f"events are an artifact with key `{artifact_key(name)}`; the whole audit trail: "
             f"`certpilot audit list --object managed:{name}` and, per certificate, `--object certificate:<fingerprint>`.",
             ""]
    if not events:
        lines.append("This run recorded no audit event about it.")
        return "\n".join(lines)
    lines += [f"{len(events)} audit event(s) in this run:", "",
              "| seq | at (UTC) | action | object | details |", "|---|---|---|---|---|"]
    lines += [f"| {e.seq} | {e.at.astimezone(dt.timezone.utc):%Y-%m-%d %H:%M:%S} | {_cell(e.action)} | "
              f"{_cell(e.object)} | {_cell(e.details)} |" for e in events[:ROWS_SHOWN]]
    if len(events) > ROWS_SHOWN:
        lines.append(f"| ... | | and {len(events) - ROWS_SHOWN} more | | |")
    return "\n".join(lines)
