"""Recording a source's run: batched upserts, details kept on the location, ghosts flagged only by a
complete run, keys stored only when asked, on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization
from sqlmodel import select

from certpilot import audit, keystore
from certpilot.database import read_session
from certpilot.discovery import Found, Problem, record
from certpilot.models import AuditEvent, Location, PrivateKey
from certpilot.sample_estate import Authority, issue_leaf
from certpilot.settings import load_settings

NOW = dt.datetime.now(dt.timezone.utc)


def _der(cert) -> bytes:  # noqa: ANN001
    return cert.public_bytes(serialization.Encoding.DER)


@dataclass
class ListSource:
    """A source over a list we control (the Source role is ours); ``fail_after`` raises part-way."""

    name: str
    items: list[Found | Problem] = field(default_factory=list)
    fail_after: int | None = None

    def discover(self) -> Iterator[Found | Problem]:
        for index, item in enumerate(self.items):
            if self.fail_after is not None and index == self.fail_after:
                raise ConnectionError("source went away")
            yield item


def _endpoints(ca: tuple[Authority, Authority], count: int) -> list[tuple[Found, object]]:
    out = []
    for i in range(count):
        cert, key = issue_leaf(ca[1], [f"host{i}.test"], NOW + dt.timedelta(days=10 + i))
        out.append((Found((_der(cert), _der(ca[1].certificate)), f"tls://127.0.0.1:{10000 + i}",
                          {"tls_version": "TLSv1.3", "verified": True}, key=key), key))
    return out


def _locations(engine: sa.Engine) -> dict[str, Location]:
    with read_session(engine) as session:
        return {loc.locator: loc for loc in session.exec(select(Location))}


def test_record_batches_details_and_chain(engine: sa.Engine, ca: tuple[Authority, Authority]) -> None:
    found = [f for f, _ in _endpoints(ca, 7)]
    source = ListSource("tls-scan:lab", [*found, Problem("tls://127.0.0.1:9", "connection refused")])
    report = record(engine, source, audit.Actor("test", "run-1"), batch_size=3)
    assert (report.places, report.new_certificates, report.certificates) == (7, 8, 8)  # 7 leaves + the intermediate
    assert [p.locator for p in report.problems] == ["tls://127.0.0.1:9"]
    locations = _locations(engine)
    assert set(locations) == {f.locator for f in found}  # the intermediate is recorded, not located
    loc = locations["tls://127.0.0.1:10000"]
    assert loc.details["tls_version"] == "TLSv1.3"
    assert loc.details["chain"] == [hashlib.sha256(found[0].certificates[1]).hexdigest()]
    assert loc.seen_by_run == "run-1" and loc.source == "tls-scan:lab" and not loc.ghost
    with read_session(engine) as session:
        assert session.exec(select(PrivateKey)).all() == []  # keys not asked for are dropped


def test_ghosts_only_after_a_complete_run(engine: sa.Engine, ca: tuple[Authority, Authority]) -> None:
    found = [f for f, _ in _endpoints(ca, 4)]
    record(engine, ListSource("ssh:web1", found), audit.Actor("test", "run-1"))
    # A failed run sees only two places and flags nothing.
    with pytest.raises(ConnectionError):
        record(engine, ListSource("ssh:web1", found, fail_after=2), audit.Actor("test", "run-2"))
    assert not any(loc.ghost for loc in _locations(engine).values())
    # Another source's run does not judge this one's locations.
    record(engine, ListSource("ssh:web2", found[:1]), audit.Actor("test", "run-3"))
    # A complete run that no longer sees two places flags exactly those, and says so in the audit trail.
    report = record(engine, ListSource("ssh:web1", found[:2]), audit.Actor("test", "run-4"))
    assert report.ghosts == 2
    ghosts = {loc for loc, row in _locations(engine).items() if row.ghost}
    assert ghosts == {found[2].locator, found[3].locator}
    with read_session(engine) as session:
        events = session.exec(select(AuditEvent).where(AuditEvent.action == "location.ghost")).all()
    assert len(events) == 2 and all(e.flow_run_id == "run-4" for e in events)
    # Seen again: no longer a ghost.
    record(engine, ListSource("ssh:web1", found), audit.Actor("test", "run-5"))
    assert not any(row.ghost for row in _locations(engine).values())


def test_changed_certificate_leaves_the_old_one_a_ghost(engine: sa.Engine, ca: tuple[Authority, Authority]) -> None:
    (old, _), (new, _) = _endpoints(ca, 2)
    record(engine, ListSource("tls-scan:lab", [old]), audit.Actor("test", "run-1"))
    moved = Found(new.certificates, old.locator, {"tls_version": "TLSv1.2"})
    record(engine, ListSource("tls-scan:lab", [moved]), audit.Actor("test", "run-2"))
    with read_session(engine) as session:
        rows = {(loc.certificate_fingerprint[:8], loc.ghost) for loc in session.exec(select(Location))}
    assert rows == {(hashlib.sha256(old.certificates[0]).hexdigest()[:8], True),
                    (hashlib.sha256(new.certificates[0]).hexdigest()[:8], False)}


def test_keys_stored_sealed_only_when_asked(engine: sa.Engine, ca: tuple[Authority, Authority]) -> None:
    pairs = _endpoints(ca, 2)
    (first, _), (second, second_key) = pairs
    mismatched = Found(first.certificates, "ssh://lab@127.0.0.1:22/etc/bad.pem", key=second_key)
    ring = keystore.load_key_ring(load_settings())
    report = record(engine, ListSource("ssh:web1", [first, second, mismatched]), audit.Actor("test"),
                    key_ring=lambda: ring)
    assert report.keys_stored == 2
    assert [p.reason for p in report.problems] == ["the key found beside it does not match the certificate"]
    assert report.run_id.startswith("scan-")  # no Prefect run: a fresh id still scopes the ghosts
    with read_session(engine) as session:
        rows = session.exec(select(PrivateKey)).all()
        assert {r.origin for r in rows} == {"discovered"}
        key = keystore.load_private_key(session, keystore.KeyRef(rows[0].id), ring)
    assert key.public_key().public_numbers() in {k.public_key().public_numbers() for _, k in pairs}


def test_not_a_certificate_is_a_problem(engine: sa.Engine, ca: tuple[Authority, Authority]) -> None:
    (good, _), = _endpoints(ca, 1)
    report = record(engine, ListSource("aws:lab", [Found((b"garbage",), "aws-acm://us-east-1/x"), good]),
                    audit.Actor("test", "run-1"))
    assert report.places == 1 and report.problems[0].locator == "aws-acm://us-east-1/x"
    assert report.problems[0].reason.startswith("not a certificate")
