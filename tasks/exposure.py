"""The exposure probe: after a revoke-and-replace, does any place still serve an old certificate?

``probe_exposure`` lists the places (certpilot.exposure.places_of: every target of the managed certificates
involved, every location discovery saw the old certificates at that is not a ghost), looks at each the way
the monitor does (tasks.monitoring: a TLS endpoint or a target's verified address by handshake through
connectors.endpoint_probe, a store target read back through its deployer, a file found over SSH read
again through the ssh-host block that found it) and returns the
ExposureReport: exposures, places that could not be verified, clean places. Every handshake and read-back
has its own timeout; one place that cannot be probed is that place's result, not the task's.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

import blocks.ssh  # noqa: F401  (registers the ssh-host block type, so load_block finds it)
from blocks.loading import load_block
from certpilot import exposure
from certpilot.clock import utcnow
from certpilot.database import get_engine, read_session
from certpilot.errors import redact
from certpilot.exposure import ExposureReport, PlaceToProbe
from certpilot.monitoring import Observed, Place
from connectors.endpoint_probe import probe
from tasks.monitoring import read_back, target_place

ARTIFACT_KEY = "exposure"


def observe(places: Sequence[PlaceToProbe], rows: Mapping[str, Any], timeout: float = 5.0,
            concurrency: int = 50, old: Collection[str] = ()) -> list[Observed]:
    """What each place that can be probed serves: TLS endpoints and targets with a TLS address by handshake,
    store targets read back through their deployer, files found over SSH read again through their ssh-host
    block (an ``old`` certificate anywhere in one is what it serves); a target whose deployer cannot be
    built, or a file that cannot be read, is observed as that error."""
    cache: dict[str, Any] = {}
    observed: list[Observed] = []
    wire: list[Place] = []
    stores: list[Place] = []
    files: dict[str, list[PlaceToProbe]] = {}
    for place in places:
        if place.probe is None:
            if place.reader is not None:
                files.setdefault(place.reader, []).append(place)
            continue
        if not place.is_target:
            wire.append(place.probe)
            continue
        row = rows.get(place.place)
        if row is None:
            observed.append(Observed(place.place, error="the target is no longer in the inventory", method="api"))
            continue
        try:
            addressed, _ = target_place(place.probe, row, cache)
        except Exception as exc:  # noqa: BLE001 - that place is unverified, the others are probed
            observed.append(Observed(place.place, error=f"cannot build its deployer: {redact(exc)}", method="api"))
            continue
        (wire if addressed.host is not None else stores).append(addressed)
    if wire:
        observed += probe(wire, timeout=timeout, concurrency=concurrency).observed
    if stores:
        observed += read_back(stores, rows)
    for reader, group in sorted(files.items()):
        observed += read_files(reader, group, old)
    return observed


def read_files(reader: str, places: Sequence[PlaceToProbe], old: Collection[str]) -> list[Observed]:
    """The certificate files ``places`` read again over SSH through ssh-host block ``reader``, one connection
    for all; each file that cannot be read is observed as why (the block missing, the host, the file)."""
    try:
        source = load_block(reader).source()
    except Exception as exc:  # noqa: BLE001 - these places are unverified, with the reason
        return [Observed(p.place, error=f"cannot read it again through {reader}: {redact(exc)}", method="ssh")
                for p in places]
    out = []
    try:
        for place in places:
            try:
                out.append(exposure.file_observed(place.place, source.certificates_at(place.path), old))
            except Exception as exc:  # noqa: BLE001 - that file is unverified, the others are read
                out.append(Observed(place.place, error=f"read again through {reader}: {redact(exc)}", method="ssh"))
    finally:
        source.close()
    return out


@task(name="probe-exposure", cache_policy=NO_CACHE, timeout_seconds=900)
def probe_exposure(old_fingerprints: list[str], timeout: float = 5.0, concurrency: int = 50,
                   publish: bool = True) -> ExposureReport:
    """Probe every target and every live discovered location of the old certificates; a place still serving
    one is an exposure, one that cannot be probed is unverified. ``publish``: the ``exposure`` artifact."""
    log = get_run_logger()
    with read_session(get_engine()) as session:
        places = exposure.places_of(session, old_fingerprints)
        rows = exposure.targets_of(session, places)
    observed = observe(places, rows, timeout, concurrency, old_fingerprints)
    result = exposure.report(places, observed, old_fingerprints, utcnow())
    log.info("%s", result.summary())
    for found in result.exposures:
        log.error("EXPOSED: %s (%s) still serves old certificate %s", found.place, found.where, found.old)
    for found in result.unverified:
        log.warning("unverified: %s (%s): %s", found.place, found.where, found.error)
    if publish:
        create_markdown_artifact(key=ARTIFACT_KEY, markdown=result.markdown(),
                                 description="Places that still serve a certificate revoked by revoke-and-replace")
    return result
