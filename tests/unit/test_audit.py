"""The audit trail: a hash chain that shows any altered, removed or reordered event.

A real chain is built by real operations (imports, labels, keys stored, exported, destroyed, a master
key rotation) on SQLite and PostgreSQL, then tampered with through raw SQL, one byte at a time.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives import hashes
from sqlmodel import Session, select
from typer.testing import CliRunner

from certpilot import audit, keystore
from cli.main import app
from certpilot.database import read_session, write_session
from certpilot.errors import AuditChainError
from certpilot.export import ExportRequest, export_certificate
from certpilot.importer import ImportOptions, import_paths
from certpilot.keys import public_key_sha256
from certpilot.models import AuditEvent
from certpilot.sample_estate import Authority, issue_leaf, key_pem, pem
from certpilot.settings import load_settings

ACTOR = audit.Actor("test:audit")
FIELDS = ("details", "actor", "action", "object", "at", "prev_hash", "hash", "flow_run_id")


def _ring() -> keystore.KeyRing:
    return keystore.load_key_ring(load_settings())


def _import(engine: sa.Engine, paths: list[Path], **options: object) -> None:
    report = import_paths(engine, [str(p) for p in paths], ImportOptions(**options),  # type: ignore[arg-type]
                          ACTOR, key_ring=_ring)
    assert report.failed == 0, report


def build_chain(engine: sa.Engine, tmp: Path, ca: tuple[Authority, Authority]) -> list[AuditEvent]:
    """About twenty events of every kind certpilot writes."""
    root, issuing = ca
    now = dt.datetime.now(dt.timezone.utc)
    leaf, key = issue_leaf(issuing, ["audit.example.test"], now + dt.timedelta(days=40))
    others = [issue_leaf(issuing, [f"audit{i}.example.test"], now + dt.timedelta(days=10 * i))[0] for i in range(1, 5)]
    a, b = tmp / "a", tmp / "b"
    a.mkdir()
    b.mkdir()
    (a / "site.pem").write_bytes(pem(leaf, issuing.certificate, root.certificate))
    (b / "site.pem").write_bytes(pem(leaf, issuing.certificate))
    (a / "site.key").write_bytes(key_pem(key))
    (a / "others.pem").write_bytes(pem(*others))

    _import(engine, [a / "site.pem"])  # certificate.added x3
    _import(engine, [b / "site.pem"])  # location.added x2
    _import(engine, [a / "site.pem"], owner="team-ädmin", tags={"env": "prod"})  # certificate.labelled x3
    _import(engine, [a / "site.key"], import_keys=True)  # key.stored
    _import(engine, [a / "others.pem"], tags={"env": "test"})  # certificate.added x4
    with write_session(engine) as session:
        request = ExportRequest(leaf.fingerprint(hashes.SHA256()).hex(), include_key=True)
        export_certificate(session, request, ACTOR, _ring())  # certificate.exported_with_key
        audit.append(session, audit.Actor("flow:renew", flow_run_id="0b9e6f5e-run"), [
            audit.Change("renewal.requested", "managed:audit.example.test", {"reason": "expires in 40 days", "ñ": "ü"}),
            audit.Change("renewal.issued", "managed:audit.example.test", {"serial": "01ab"}),
        ])
    with read_session(engine) as session:
        ref = keystore.find_key(session, public_key_sha256(key))
    assert ref is not None
    keystore.rotate_master_key(engine, load_settings(), ACTOR)  # master_key.rotated
    with write_session(engine) as session:
        keystore.destroy_private_key(session, ref, ACTOR)  # key.destroyed
    _import(engine, [b / "site.pem"], owner="team-b")  # certificate.labelled x2
    with read_session(engine) as session:
        events = list(session.exec(select(AuditEvent).order_by(AuditEvent.seq)).all())
    return events


@pytest.fixture
def chain(engine: sa.Engine, tmp_path: Path, ca: tuple[Authority, Authority]) -> list[AuditEvent]:
    return build_chain(engine, tmp_path, ca)


@pytest.fixture
def tampering(engine: sa.Engine) -> Iterator[sa.Connection]:
    """A connection whose changes are rolled back afterwards, so each tamper starts from the real chain."""
    with engine.connect() as conn:
        trans = conn.begin()
        try:
            yield conn
        finally:
            trans.rollback()


def _verify_on(conn: sa.Connection, **kwargs: object) -> audit.ChainStatus:
    with Session(bind=conn) as session:
        return audit.verify(session, **kwargs)  # type: ignore[arg-type]


def _verify(engine: sa.Engine, **kwargs: object) -> audit.ChainStatus:
    with read_session(engine) as session:
        return audit.verify(session, **kwargs)  # type: ignore[arg-type]


def _flip(text: str, at: int | None = None) -> str:
    """``text`` with one alphanumeric character changed (to another of its kind, so the value stays plausible)."""
    start = len(text) // 2 if at is None else at
    for i in list(range(start, len(text))) + list(range(0, start)):
        c = text[i]
        if c.isdigit():
            new = str((int(c) + 1) % 10)
        elif c.isalpha() and c.isascii():
            new = "a" if c.lower() == "f" else chr(ord(c.lower()) + 1) if c.lower() < "f" else ("b" if c == "a" else "a")
            new = new.upper() if c.isupper() else new
        else:
            continue
        if new != c:
            return text[:i] + new + text[i + 1:]
    raise AssertionError(f"nothing to flip in {text!r}")


def _tamper(conn: sa.Connection, seq: int, column: str) -> None:
    """Change one character of one column of one stored event, through raw SQL."""
    postgres = conn.dialect.name == "postgresql"
    if column == "at":
        current = conn.execute(sa.text(f"SELECT {'CAST(at AS TEXT)' if postgres else 'at'} FROM audit_event "
                                       "WHERE seq = :seq"), {"seq": seq}).scalar_one()
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(\.\d+)?", current), current
        altered = _flip(current, at=18)  # the last digit of the seconds
        value = "CAST(:value AS TIMESTAMP)" if postgres else ":value"
        conn.execute(sa.text(f"UPDATE audit_event SET at = {value} WHERE seq = :seq"), {"value": altered, "seq": seq})
        return
    current = conn.execute(sa.text(f"SELECT {column} FROM audit_event WHERE seq = :seq"), {"seq": seq}).scalar_one()
    altered = "x" if current is None else _flip(current)
    assert altered != current and (current is None or len(altered) == len(current))
    count = conn.execute(sa.text(f"UPDATE audit_event SET {column} = :value WHERE seq = :seq"),
                         {"value": altered, "seq": seq}).rowcount
    assert count == 1


# ------------------------------------------------------------------------------------------ intact

def test_chain_of_many_kinds_of_change_verifies(engine: sa.Engine, chain: list[AuditEvent]) -> None:
    assert 18 <= len(chain) <= 24
    assert [e.seq for e in chain] == list(range(1, len(chain) + 1))
    assert {e.action for e in chain} >= {"certificate.added", "location.added", "certificate.labelled", "key.stored",
                                         "certificate.exported_with_key", "master_key.rotated", "key.destroyed",
                                         "renewal.requested"}
    assert chain[0].prev_hash == audit.GENESIS
    for before, after in zip(chain, chain[1:]):
        assert after.prev_hash == before.hash
    status = _verify(engine)
    assert status == audit.ChainStatus(len(chain), chain[-1].hash)
    assert _verify(engine, batch=3) == status  # walked in small batches, the same answer
    assert _verify(engine, expected_head=chain[5].hash) == status  # an older recorded head is still in the chain
    # Stored details are the canonical JSON that was hashed, and carry no key material.
    for event in chain:
        assert event.details == audit.canonical_details(json.loads(event.details))


def test_empty_chain_verifies(engine: sa.Engine) -> None:
    assert _verify(engine) == audit.ChainStatus(0, audit.GENESIS)


# ------------------------------------------------------------------------------------------ tampering

def test_every_one_character_alteration_of_every_event_is_detected_at_that_event(
        engine: sa.Engine, chain: list[AuditEvent]) -> None:
    """Each field of each event, one character changed: ``verify`` names that event's seq.

    Editing the stored ``hash`` is named at the same event too (its hash no longer matches its
    contents), not at the next event, whose prev_hash would be the second mismatch.
    """
    assert any(e.flow_run_id for e in chain) and any(e.flow_run_id is None for e in chain)
    checked = 0
    for event in chain:
        for column in FIELDS:
            with engine.connect() as conn:
                trans = conn.begin()
                try:
                    _tamper(conn, event.seq, column)
                    with pytest.raises(AuditChainError) as caught:
                        _verify_on(conn, batch=7)
                finally:
                    trans.rollback()
            assert caught.value.seq == event.seq, (column, event.seq, str(caught.value))
            assert str(caught.value).startswith(f"audit chain broken at event {event.seq}: ")
            expected = ("its previous-hash does not match" if column == "prev_hash"
                        else "its contents do not match its hash (altered)")
            assert expected in caught.value.reason, (column, caught.value.reason)
            checked += 1
    assert checked == len(chain) * len(FIELDS)
    assert _verify(engine).events == len(chain)  # every tamper was rolled back: the real chain is intact


def test_rehashed_alteration_is_detected_at_the_next_event(engine: sa.Engine, chain: list[AuditEvent],
                                                           tampering: sa.Connection) -> None:
    """A forger who also recomputes the altered event's hash is caught by the next event's prev_hash."""
    target = chain[7]
    details = json.loads(target.details)
    details["forged"] = True
    forged = audit.canonical_details(details)
    digest = audit.event_hash(target.seq, target.at, target.actor, target.action, target.object,
                              target.flow_run_id, forged, target.prev_hash)
    tampering.execute(sa.text("UPDATE audit_event SET details = :d, hash = :h WHERE seq = :s"),
                      {"d": forged, "h": digest, "s": target.seq})
    with pytest.raises(AuditChainError) as caught:
        _verify_on(tampering)
    assert caught.value.seq == target.seq + 1
    assert "previous-hash does not match" in caught.value.reason


def test_altered_hash_with_the_next_prev_hash_patched_is_still_named(engine: sa.Engine, chain: list[AuditEvent],
                                                                     tampering: sa.Connection) -> None:
    target = chain[3]
    fake = _flip(target.hash)
    tampering.execute(sa.text("UPDATE audit_event SET hash = :h WHERE seq = :s"), {"h": fake, "s": target.seq})
    tampering.execute(sa.text("UPDATE audit_event SET prev_hash = :h WHERE seq = :s"), {"h": fake, "s": target.seq + 1})
    with pytest.raises(AuditChainError) as caught:
        _verify_on(tampering)
    assert caught.value.seq == target.seq


def test_deleting_a_middle_event_is_detected_as_missing(engine: sa.Engine, chain: list[AuditEvent],
                                                        tampering: sa.Connection) -> None:
    middle = len(chain) // 2
    tampering.execute(sa.text("DELETE FROM audit_event WHERE seq = :s"), {"s": middle})
    for batch in (5000, 4):
        with pytest.raises(AuditChainError) as caught:
            _verify_on(tampering, batch=batch)
        assert caught.value.seq == middle
        assert caught.value.reason == f"event {middle} is missing (next stored is {middle + 1})"


def test_deleting_the_first_event_is_detected(engine: sa.Engine, chain: list[AuditEvent],
                                              tampering: sa.Connection) -> None:
    tampering.execute(sa.text("DELETE FROM audit_event WHERE seq = 1"))
    with pytest.raises(AuditChainError, match="event 1 is missing") as caught:
        _verify_on(tampering)
    assert caught.value.seq == 1


def test_deleting_and_renumbering_is_detected(engine: sa.Engine, chain: list[AuditEvent],
                                              tampering: sa.Connection) -> None:
    """Removing an event and closing the gap leaves no hole, but the chain still breaks there."""
    tampering.execute(sa.text("DELETE FROM audit_event WHERE seq = 6"))
    for seq in range(7, len(chain) + 1):
        tampering.execute(sa.text("UPDATE audit_event SET seq = :new WHERE seq = :old"), {"new": seq - 1, "old": seq})
    with pytest.raises(AuditChainError) as caught:
        _verify_on(tampering)
    assert caught.value.seq == 6


def test_swapping_two_events_is_detected(engine: sa.Engine, chain: list[AuditEvent], tampering: sa.Connection) -> None:
    tampering.execute(sa.text("UPDATE audit_event SET seq = -1 WHERE seq = 9"))
    tampering.execute(sa.text("UPDATE audit_event SET seq = 9 WHERE seq = 10"))
    tampering.execute(sa.text("UPDATE audit_event SET seq = 10 WHERE seq = -1"))
    with pytest.raises(AuditChainError) as caught:
        _verify_on(tampering)
    assert caught.value.seq == 9


def test_expect_head_detects_removal_of_the_newest_events(engine: sa.Engine, chain: list[AuditEvent],
                                                          tampering: sa.Connection) -> None:
    recorded = _verify(engine).head_hash
    assert recorded == chain[-1].hash
    tampering.execute(sa.text("DELETE FROM audit_event WHERE seq > :keep"), {"keep": len(chain) - 3})

    # The chain alone cannot tell: what is left is a valid, shorter chain ...
    assert _verify_on(tampering) == audit.ChainStatus(len(chain) - 3, chain[-4].hash)
    # ... but the head recorded earlier is gone.
    with pytest.raises(AuditChainError) as caught:
        _verify_on(tampering, expected_head=recorded)
    assert caught.value.seq == len(chain) - 2  # the first event that should be there and is not
    assert f"the recorded head {recorded[:16]}... is no longer in the chain" in str(caught.value)


def test_expect_head_passes_as_the_chain_grows(engine: sa.Engine, chain: list[AuditEvent]) -> None:
    recorded = _verify(engine).head_hash
    with write_session(engine) as session:
        audit.append(session, ACTOR, [audit.Change("note.added", "note:1", {"n": i}) for i in range(3)])
    status = _verify(engine, expected_head=recorded)
    assert status.events == len(chain) + 3 and status.head_hash != recorded
    with pytest.raises(AuditChainError, match="no longer in the chain"):
        _verify(engine, expected_head=_flip(recorded))


# ------------------------------------------------------------------------------------------ the CLI

def _cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, " ".join(result.stderr.split())


def test_cli_audit_verify(engine: sa.Engine, chain: list[AuditEvent]) -> None:
    code, stdout, _ = _cli("audit", "verify")
    assert code == 0
    assert stdout.strip() == f"audit chain intact: {len(chain)} event(s), head {chain[-1].hash}"
    code, stdout, _ = _cli("audit", "verify", "--json")
    assert code == 0 and json.loads(stdout) == {"ok": True, "events": len(chain), "head": chain[-1].hash}

    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE audit_event SET actor = 'someone-else' WHERE seq = 12"))
    code, stdout, stderr = _cli("audit", "verify")
    assert code == 1 and stdout == ""
    assert "error: audit chain broken at event 12: its contents do not match its hash (altered)" in stderr
    assert stderr.count("audit chain broken") == 1  # said once
    code, stdout, _ = _cli("audit", "verify", "--json")
    assert code == 1
    assert json.loads(stdout) == {"ok": False, "seq": 12, "exit_code": 1,
                                  "error": "audit chain broken at event 12: its contents do not match its hash (altered)"}


def test_cli_audit_verify_expect_head(engine: sa.Engine, chain: list[AuditEvent]) -> None:
    head = chain[-1].hash
    assert _cli("audit", "verify", "--expect-head", head)[0] == 0
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM audit_event WHERE seq >= :s"), {"s": len(chain) - 1})
    assert _cli("audit", "verify")[0] == 0  # shorter, still a chain
    code, _, stderr = _cli("audit", "verify", "--expect-head", head)
    assert code == 1
    assert f"audit chain broken at event {len(chain) - 1}: the recorded head {head[:16]}... is no longer in the chain" in stderr


# ------------------------------------------------------------------------------------------ appending

@pytest.mark.parametrize("details", [
    {"pem": "-----BEGIN CERTIFICATE-----\nMIIB...\n-----END CERTIFICATE-----\n"},
    {"nested": {"list": ["fine", "-----BEGIN EC PRIVATE KEY-----"]}},
    {"note": "this is a PRIVATE KEY"},
])
def test_append_refuses_pem_text(engine: sa.Engine, chain: list[AuditEvent], details: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="audit details must not contain PEM or key material"):
        with write_session(engine) as session:
            audit.append(session, ACTOR, [audit.Change("note.added", "note:ok", {"fine": 1}),
                                          audit.Change("note.added", "note:bad", details)])
    # Nothing of the refused batch was appended, not even the acceptable change before it.
    assert _verify(engine) == audit.ChainStatus(len(chain), chain[-1].hash)


def test_append_refuses_a_real_certificate_pem(engine: sa.Engine, leaf: tuple) -> None:  # type: ignore[type-arg]
    cert, key = leaf
    for text in (pem(cert).decode(), key_pem(key).decode()):
        with pytest.raises(ValueError, match="must not contain PEM"):
            with write_session(engine) as session:
                audit.append(session, ACTOR, [audit.Change("certificate.added", "certificate:x", {"pem": text})])
    assert _verify(engine).events == 0


def test_append_chains_after_the_head_and_is_deterministic(engine: sa.Engine) -> None:
    at = dt.datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=dt.timezone.utc)
    with write_session(engine) as session:
        assert audit.append(session, ACTOR, []) == 0
        assert audit.append(session, ACTOR, [audit.Change("a.b", "o:1", {"z": 1, "a": [1, "ü"]})], now=at) == 1
        assert audit.append(session, audit.Actor("other", "run-1"), [audit.Change("a.c", "o:2")], now=at) == 1
    with read_session(engine) as session:
        first, second = session.exec(select(AuditEvent).order_by(AuditEvent.seq)).all()
    assert first.details == '{"a":[1,"ü"],"z":1}'
    assert first.at == at and first.prev_hash == audit.GENESIS
    assert first.hash == audit.event_hash(1, at, "test:audit", "a.b", "o:1", None, first.details, audit.GENESIS)
    assert second.prev_hash == first.hash and second.flow_run_id == "run-1"
    assert _verify(engine) == audit.ChainStatus(2, second.hash)
