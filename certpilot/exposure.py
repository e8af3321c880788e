"""Exposure: after old certificates are revoked, which places still serve one of them.

``places_of`` lists every place an old certificate may still be served: every target of the managed
certificates they belong to (``target:<managed>/<target>``) and every location where discovery saw one of
them and that is not a ghost. Each is a ``PlaceToProbe`` saying how to look: a TLS endpoint
(``tls://host:port?sni=name``, the monitor's own places: certpilot.monitoring.location_place) is probed on
the wire; a target is probed at the address its deployer verifies, or read back through its deployer (a
store) by the task layer; a file found over SSH by an ssh-host block is read again through that block
(``reader``; ``file_observed`` judges what it holds); any other location (a cloud store seen by discovery,
a file whose source has no block) cannot be probed from here and is listed as unverified, with the source
whose next run will tell.

``report`` judges what was observed: a place that serves any of the old fingerprints is an exposure; a
place that could not be probed is unverified, never clean. ``ExposureReport.markdown`` is the artifact.

No Prefect, no network here.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col

from certpilot.inventory import iso
from certpilot.models import Certificate, Location, ManagedCertificate, SourceRun, Target
from certpilot.monitoring import Observed, Place, ServedCertificate, location_place
from certpilot.views import escape

__all__ = ["Exposure", "ExposureReport", "PlaceToProbe", "file_observed", "places_of", "report", "targets_of"]

_CHUNK = 500
SHOWN = 500  # places listed in the artifact


@dataclass(frozen=True)
class PlaceToProbe:
    """A place where an old certificate may still be served. ``kind``: target or location. ``old``: the old
    certificates recorded there (a location: the one discovery saw; a target: its managed certificate's
    old ones). ``probe``: how to look (a TLS address; a target's, filled in or read back by the task
    layer); None when it cannot be probed from here, ``why_not`` says why."""

    place: str
    kind: str
    old: tuple[str, ...]
    managed: str | None = None
    source: str | None = None
    probe: Place | None = None
    why_not: str | None = None
    reader: str | None = None  # a file's: the ssh-host block (its discovery source's) to read it again through

    @property
    def is_target(self) -> bool:
        return self.kind == "target"

    @property
    def path(self) -> str:
        """The file's path on its host (an ``ssh://user@host:port/path`` locator)."""
        rest = self.place.removeprefix("ssh://")
        return rest[rest.index("/"):] if "/" in rest else ""


@dataclass(frozen=True)
class Exposure:
    """What one place showed: ``served`` the fingerprint it serves (None: not probed or no answer, ``error``
    says why); ``old`` the old certificate it still serves (None: none of them)."""

    place: str
    kind: str
    managed: str | None
    served: str | None
    old: str | None
    error: str | None = None
    method: str = "tls"
    source: str | None = None

    @property
    def exposed(self) -> bool:
        return self.old is not None

    @property
    def unverified(self) -> bool:
        return self.served is None and self.old is None

    @property
    def where(self) -> str:
        """The place in words: a target, or a discovered location of a managed or an unmanaged certificate."""
        if self.kind == "target":
            return f"target of {self.managed}"
        return (f"discovered location of {self.managed}" if self.managed
                else "discovered location (unmanaged)") + (f", seen by {self.source}" if self.source else "")

    def as_dict(self) -> dict[str, Any]:
        return {"place": self.place, "kind": self.kind, "managed": self.managed, "served": self.served,
                "old": self.old, "error": self.error, "method": self.method, "source": self.source,
                "exposed": self.exposed, "unverified": self.unverified}


@dataclass(frozen=True)
class ExposureReport:
    at: dt.datetime
    old_fingerprints: tuple[str, ...]
    results: tuple[Exposure, ...]

    @property
    def exposures(self) -> list[Exposure]:
        return [r for r in self.results if r.exposed]

    @property
    def unverified(self) -> list[Exposure]:
        return [r for r in self.results if r.unverified]

    @property
    def clean(self) -> list[Exposure]:
        return [r for r in self.results if not r.exposed and not r.unverified]

    def summary(self) -> str:
        return (f"{len(self.results)} place(s) of {len(self.old_fingerprints)} old certificate(s) checked: "
                f"{len(self.exposures)} still serve an old certificate, {len(self.unverified)} could not be "
                f"verified, {len(self.clean)} clean")

    def lines(self) -> list[str]:
        out = [self.summary()]
        out += [f"EXPOSED {r.place} ({r.where}) still serves {r.old}" for r in self.exposures]
        out += [f"unverified {r.place} ({r.where}): {r.error}" for r in self.unverified]
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"at": iso(self.at), "old_fingerprints": list(self.old_fingerprints), "summary": self.summary(),
                "exposures": len(self.exposures), "unverified": len(self.unverified), "clean": len(self.clean),
                "results": [r.as_dict() for r in self.results]}

    def markdown(self) -> str:
        out = ["# Exposure after revoke-and-replace", "", f"**{escape(self.summary())}.**", ""]
        sections = [("Exposures: still serving an old certificate", self.exposures,
                     "Clients that check revocation fail here; the others trust a certificate that is revoked. "
                     "A discovered location no target covers needs its certificate adopted "
                     "(`certpilot managed adopt`) or replaced by hand."),
                    ("Unverified: could not be probed", self.unverified,
                     "Not known to be clean: look at these by hand, or run discovery again."),
                    ("Clean", self.clean, "")]
        for title, rows, note in sections:
            out += [f"## {title} ({len(rows)})", ""]
            if not rows:
                out += ["_None._", ""]
                continue
            if note:
                out += [note, ""]
            out += ["| Place | What | Serves | Old certificate | How | Error |", "|---|---|---|---|---|---|"]
            for r in rows[:SHOWN]:
                out.append("| " + " | ".join([
                    escape(r.place), escape(r.where), f"`{r.served[:16]}`" if r.served else "-",
                    f"`{r.old[:16]}`" if r.old else "-", r.method, escape(r.error or "-")]) + " |")
            if len(rows) > SHOWN:
                out.append(f"\n_{len(rows) - SHOWN} more not listed._")
            out.append("")
        return "\n".join(out)


def _chunks(items: Sequence[Any]) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start:start + _CHUNK]


def places_of(session: Session, fingerprints: Sequence[str]) -> list[PlaceToProbe]:
    """Every target of the managed certificates these certificates belong to, and every location (not a
    ghost) where discovery saw one of them: targets first, then locations, each by place."""
    fps = sorted(set(fingerprints))
    c, m, t, loc = Certificate, ManagedCertificate, Target, Location
    old_of_managed: dict[int, list[str]] = {}
    managed_name: dict[str, str | None] = {}
    for chunk in _chunks(fps):
        for fp, managed_id, name in session.execute(
                sa.select(col(c.fingerprint_sha256), col(c.managed_certificate_id), col(m.name))
                .outerjoin(m, col(m.id) == col(c.managed_certificate_id)).where(col(c.fingerprint_sha256).in_(chunk))):
            managed_name[fp] = name
            if managed_id is not None:
                old_of_managed.setdefault(managed_id, []).append(fp)
    out: list[PlaceToProbe] = []
    ids = sorted(old_of_managed)
    for chunk in _chunks(ids):
        for target, name in session.execute(
                sa.select(t, col(m.name)).join(m, col(m.id) == col(t.managed_certificate_id))
                .where(col(t.managed_certificate_id).in_(chunk)).order_by(col(m.name), col(t.name))).all():
            place = f"target:{name}/{target.name}"
            out.append(PlaceToProbe(place, "target", tuple(old_of_managed[target.managed_certificate_id]), name,
                                    probe=Place(place, managed=name, target=target.name, block=target.block)))
    by_locator: dict[str, PlaceToProbe] = {}
    readers = {source: block for source, block in session.execute(sa.select(col(SourceRun.source),
                                                                            col(SourceRun.block)))
               if block and block.startswith("ssh-host/")}
    for chunk in _chunks(fps):
        for fp, locator, source in session.execute(
                sa.select(col(loc.certificate_fingerprint), col(loc.locator), col(loc.source))
                .where(col(loc.certificate_fingerprint).in_(chunk), col(loc.ghost).is_(False))):
            held = by_locator.get(locator)
            if held is not None:  # two old certificates seen at one place: one probe, both looked for
                by_locator[locator] = replace(held, old=tuple(sorted({*held.old, fp})),
                                              managed=held.managed or managed_name.get(fp))
                continue
            reader = readers.get(source) if locator.startswith("ssh://") else None
            try:
                probe: Place | None = location_place(locator)
                why_not = None
            except ValueError:
                probe, why_not = None, (f"not a TLS endpoint: what it holds now is known only when {source} "
                                        "discovers again") if reader is None else None
            by_locator[locator] = PlaceToProbe(locator, "location", (fp,), managed_name.get(fp), source, probe,
                                               why_not, reader)
    return out + [by_locator[k] for k in sorted(by_locator)]


def file_observed(place: str, held: Sequence[str], old: Collection[str]) -> Observed:
    """What a certificate file that holds ``held`` (fingerprints, in its order) shows: an old certificate
    it still holds (anywhere in it), else its first (the leaf)."""
    stale = next((fingerprint for fingerprint in held if fingerprint in old), None)
    return Observed(place, served=ServedCertificate(stale or held[0]), method="ssh")


def targets_of(session: Session, places: Sequence[PlaceToProbe]) -> dict[str, Target]:
    """The Target rows of the target places, by place (their deployers are built from them)."""
    wanted = {(p.managed, p.probe.target) for p in places if p.is_target and p.probe is not None}
    names = sorted({name for name, _ in wanted if name})
    m, t = ManagedCertificate, Target
    out: dict[str, Target] = {}
    for chunk in _chunks(names):
        for target, name in session.execute(
                sa.select(t, col(m.name)).join(m, col(m.id) == col(t.managed_certificate_id))
                .where(col(m.name).in_(chunk))).all():
            if (name, target.name) in wanted:
                out[f"target:{name}/{target.name}"] = target
    return out


def report(places: Sequence[PlaceToProbe], observed: Iterable[Observed], old_fingerprints: Iterable[str],
           now: dt.datetime) -> ExposureReport:
    """What each place showed against the old certificates: any old fingerprint served is an exposure (not
    only the one recorded there); no observation, or one without a served certificate, is unverified."""
    old = tuple(sorted(set(old_fingerprints)))
    old_set = set(old)
    seen: Mapping[str, Observed] = {o.place: o for o in observed}
    results = []
    for place in places:
        found = seen.get(place.place)
        if found is None:
            results.append(Exposure(place.place, place.kind, place.managed, None, None,
                                    place.why_not or "not probed", "none", place.source))
            continue
        served = found.served.fingerprint if found.served is not None else None
        results.append(Exposure(place.place, place.kind, place.managed, served,
                                served if served in old_set else None,
                                None if served else (found.error or "no certificate read"), found.method, place.source))
    results.sort(key=lambda r: (not r.exposed, not r.unverified, r.place))
    return ExposureReport(now, old, tuple(results))
