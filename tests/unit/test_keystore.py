"""Private keys at rest: envelope encryption, the master key and its rotation, crypto-shredding.

Real keys, a real inventory (SQLite and PostgreSQL through the ``engine`` fixture), real files.
"""

from __future__ import annotations

import base64
import json
import multiprocessing
import os
import stat
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.serialization import load_der_private_key
from sqlmodel import select

from certpilot import audit, keystore
from certpilot.database import read_session, write_session
from certpilot.errors import MasterKeyError, NotFoundError
from certpilot.keys import KEY_ALGORITHMS, generate_private_key, private_key_der, public_key_sha256
from certpilot.models import AuditEvent, PrivateKey
from certpilot.settings import load_settings

ACTOR = audit.Actor("test:keystore")


@pytest.fixture(scope="module")
def keys() -> dict[str, PrivateKeyTypes]:
    """One real key per supported algorithm (RSA generation is slow: once per module)."""
    return {algorithm: generate_private_key(algorithm) for algorithm in KEY_ALGORITHMS}


def _store(engine: sa.Engine, key: PrivateKeyTypes, ring: keystore.KeyRing, origin: str = "generated") -> keystore.KeyRef:
    with write_session(engine) as session:
        return keystore.store_private_key(session, key, ring, ACTOR, origin)


def _load(engine: sa.Engine, ref: keystore.KeyRef, ring: keystore.KeyRing) -> PrivateKeyTypes:
    with read_session(engine) as session:
        return keystore.load_private_key(session, ref, ring)


def _row(engine: sa.Engine, ref: keystore.KeyRef) -> PrivateKey:
    with read_session(engine) as session:
        row = session.get(PrivateKey, ref.id)
        assert row is not None
        return row


def _events(engine: sa.Engine) -> list[AuditEvent]:
    with read_session(engine) as session:
        return list(session.exec(select(AuditEvent).order_by(AuditEvent.seq)).all())


def _verify(engine: sa.Engine) -> audit.ChainStatus:
    with read_session(engine) as session:
        return audit.verify(session)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _ring(announce: list[str] | None = None) -> keystore.KeyRing:
    return keystore.load_key_ring(load_settings(), announce=None if announce is None else announce.append)


# ------------------------------------------------------------------------------------------ round trips

@pytest.mark.parametrize("algorithm", KEY_ALGORITHMS)
def test_store_and_load_round_trip(engine: sa.Engine, keys: dict[str, PrivateKeyTypes], algorithm: str) -> None:
    key = keys[algorithm]
    ring = _ring()
    ref = _store(engine, key, ring, origin="imported")

    loaded = _load(engine, ref, ring)
    assert private_key_der(loaded) == private_key_der(key)
    assert public_key_sha256(loaded) == public_key_sha256(key)

    row = _row(engine, ref)
    assert row.algorithm == algorithm
    assert row.spki_sha256 == public_key_sha256(key)
    assert row.origin == "imported"
    assert row.master_key_id == ring.primary.id
    assert row.destroyed_at is None
    # Sealed, not stored: neither the DER nor the data key in the clear.
    assert row.ciphertext and private_key_der(key) not in row.ciphertext
    assert row.wrapped_data_key and len(row.wrapped_data_key) == 12 + 32 + 16  # nonce, AES-256 key, GCM tag
    assert str(ref) == f"key:{ref.id}"

    events = _events(engine)
    assert [(e.action, e.object) for e in events] == [("key.stored", f"key:{ref.id}")]
    assert json.loads(events[0].details) == {"algorithm": algorithm, "spki_sha256": row.spki_sha256, "origin": "imported"}
    assert _verify(engine).events == 1


def test_storing_the_same_key_twice_yields_the_same_ref(engine: sa.Engine, keys: dict[str, PrivateKeyTypes]) -> None:
    ring = _ring()
    first = _store(engine, keys["ec-p256"], ring)
    # A different object for the same key (re-read from its DER) is still the same key.
    again = load_der_private_key(private_key_der(keys["ec-p256"]), password=None)
    second = _store(engine, again, ring)
    third = _store(engine, keys["ec-p256"], ring)
    assert first == second == third
    with read_session(engine) as session:
        assert session.execute(sa.select(sa.func.count()).select_from(PrivateKey)).scalar_one() == 1
    assert [e.action for e in _events(engine)] == ["key.stored"]  # stored once, audited once


# ------------------------------------------------------------------------------------------ the master key

def test_default_master_key_file_is_created_lazily_with_mode_0600(engine: sa.Engine, certpilot_home: Path,
                                                                  keys: dict[str, PrivateKeyTypes]) -> None:
    settings = load_settings()
    assert settings.master_key_file == certpilot_home / "master.key" and settings.master_key_file_is_default
    # The inventory alone (engine fixture: migrated database) creates no master key.
    assert not settings.master_key_file.exists()

    told: list[str] = []
    ring = _ring(told)
    assert settings.master_key_file.exists()
    assert _mode(settings.master_key_file) == 0o600
    assert len(told) == 1 and str(settings.master_key_file) in told[0] and "0600" in told[0]
    assert "Back it up" in told[0]
    assert ring.primary.encoded() not in told[0]  # told where it is, never what it is
    assert ring.others == ()
    assert keystore.parse_master_key(settings.master_key_file.read_text(), "file").id == ring.primary.id
    assert not [p.name for p in certpilot_home.iterdir() if p.name.endswith(".tmp")]  # no staging file left

    # The second time it is read, not created, and nobody is told again.
    told_again: list[str] = []
    assert _ring(told_again).primary.id == ring.primary.id
    assert told_again == []

    ref = _store(engine, keys["ec-p384"], ring)
    assert private_key_der(_load(engine, ref, _ring())) == private_key_der(keys["ec-p384"])


def _first_use(homes: list[str], barrier: Any, results: Any) -> None:
    """In a separate process: for each fresh home, wait for the others, then load (so create) the key ring."""
    for name in ("CERTPILOT_MASTER_KEY", "CERTPILOT_MASTER_KEY_FILE", "CERTPILOT_DATABASE_URL"):
        os.environ.pop(name, None)
    for home in homes:
        os.environ["CERTPILOT_HOME"] = home
        told: list[str] = []
        barrier.wait(timeout=60)
        try:
            ring = keystore.load_key_ring(load_settings(), announce=told.append)
            results.put((home, ring.primary.id, len(told)))
        except Exception as exc:  # reported, so the test can show it
            results.put((home, f"{type(exc).__name__}: {exc}", -1))


def test_concurrent_first_use_creates_one_master_key(tmp_path: Path) -> None:
    """Four processes needing the master key at the same moment, twenty times: one key file each time,
    complete, 0600, announced once, and every process uses that one key."""
    homes = [str(tmp_path / f"home{i}") for i in range(20)]
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    processes = [ctx.Process(target=_first_use, args=(homes, barrier, results)) for _ in range(4)]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=60) for _ in range(4 * len(homes))]
    for process in processes:
        process.join(timeout=30)
        assert process.exitcode == 0
    for home in homes:
        mine = [(key_id, told) for h, key_id, told in outcomes if h == home]
        assert len(mine) == 4
        assert all(told >= 0 for _, told in mine), mine  # no process failed
        path = Path(home) / "master.key"
        key_id = keystore.read_master_key_file(path).id
        assert {k for k, _ in mine} == {key_id}  # all four use the key that is in the file
        assert sum(told for _, told in mine) == 1  # and only its creator announced it
        assert _mode(path) == 0o600
        assert sorted(p.name for p in Path(home).iterdir()) == ["master.key"]  # no staging file left behind


def test_master_key_from_environment(engine: sa.Engine, certpilot_home: Path, monkeypatch: pytest.MonkeyPatch,
                                     keys: dict[str, PrivateKeyTypes]) -> None:
    master = keystore.generate_master_key()
    monkeypatch.setenv("CERTPILOT_MASTER_KEY", master.encoded())
    told: list[str] = []
    ring = _ring(told)
    assert ring.primary.id == master.id
    assert told == [] and not (certpilot_home / "master.key").exists()  # no file is created

    ref = _store(engine, keys["ed25519"], ring)
    assert _row(engine, ref).master_key_id == master.id
    # A fresh read of the environment opens it again.
    assert private_key_der(_load(engine, ref, _ring())) == private_key_der(keys["ed25519"])


@pytest.mark.parametrize(("value", "message"), [
    ("abc", "CERTPILOT_MASTER_KEY is not URL-safe base64"),
    ("c2hvcnQ=", "CERTPILOT_MASTER_KEY must hold 32 bytes in URL-safe base64, not 5"),
    (base64.urlsafe_b64encode(bytes(range(48))).decode(), "CERTPILOT_MASTER_KEY must hold 32 bytes in URL-safe base64, not 48"),
    ("clé-en-français-pas-du-base64-000000000000", "CERTPILOT_MASTER_KEY is not URL-safe base64"),
])
def test_malformed_environment_master_key_is_refused_precisely(monkeypatch: pytest.MonkeyPatch, certpilot_home: Path,
                                                               value: str, message: str) -> None:
    monkeypatch.setenv("CERTPILOT_MASTER_KEY", value)
    with pytest.raises(MasterKeyError) as caught:
        _ring()
    assert str(caught.value) == message
    assert not (certpilot_home / "master.key").exists()  # a bad key is not papered over by a new one


def test_key_file_readable_by_others_is_refused(certpilot_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = certpilot_home / "master.key"
    certpilot_home.mkdir(parents=True, exist_ok=True)
    path.write_text(keystore.generate_master_key().encoded() + "\n")
    os.chmod(path, 0o644)
    with pytest.raises(MasterKeyError) as caught:
        _ring()
    assert str(caught.value) == f"master key file {path} is readable by others (mode 0644): chmod 600 it"

    # The same for a file named by CERTPILOT_MASTER_KEY_FILE, and group-readable is not good enough either.
    other = certpilot_home / "elsewhere.key"
    other.write_text(keystore.generate_master_key().encoded())
    os.chmod(other, 0o640)
    monkeypatch.setenv("CERTPILOT_MASTER_KEY_FILE", str(other))
    with pytest.raises(MasterKeyError, match=r"mode 0640"):
        _ring()
    os.chmod(other, 0o600)
    assert _ring().primary.id == keystore.parse_master_key(other.read_text(), "x").id


def test_named_key_file_must_exist(certpilot_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = certpilot_home / "nowhere.key"
    monkeypatch.setenv("CERTPILOT_MASTER_KEY_FILE", str(missing))
    with pytest.raises(MasterKeyError, match="CERTPILOT_MASTER_KEY_FILE names .*nowhere.key, which does not exist"):
        _ring()
    assert not missing.exists()  # an operator's named file is never invented


def test_malformed_key_file_is_refused(certpilot_home: Path) -> None:
    certpilot_home.mkdir(parents=True, exist_ok=True)
    path = certpilot_home / "master.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"dG9vIHNob3J0\n")
    os.close(fd)
    with pytest.raises(MasterKeyError) as caught:
        _ring()
    assert str(caught.value) == f"master key file {path} must hold 32 bytes in URL-safe base64, not 9"


def test_wrong_master_key_names_both_ids_and_never_the_key(engine: sa.Engine, keys: dict[str, PrivateKeyTypes]) -> None:
    right = keystore.KeyRing(keystore.generate_master_key())
    wrong = keystore.KeyRing(keystore.generate_master_key())
    ref = _store(engine, keys["ec-p256"], right)

    with pytest.raises(MasterKeyError) as caught:
        _load(engine, ref, wrong)
    message = str(caught.value)
    assert right.primary.id in message and wrong.primary.id in message
    for secret in (right.primary.secret, wrong.primary.secret):
        for shown in (base64.urlsafe_b64encode(secret).decode(), base64.b64encode(secret).decode(), secret.hex(),
                      repr(secret)):
            assert shown not in message
            assert shown not in repr(caught.value)
    assert "secret" not in repr(right.primary)  # the dataclass repr leaves the secret out

    # A row whose master key id was rewritten to name a key the ring does hold fails authentication:
    # the id is bound into the seal, so relabelling a row opens nothing.
    with write_session(engine) as session:
        session.execute(sa.update(PrivateKey).where(PrivateKey.id == ref.id).values(master_key_id=wrong.primary.id))
    with pytest.raises(MasterKeyError, match=f"private key key:{ref.id} failed authentication"):
        _load(engine, ref, keystore.KeyRing(wrong.primary, (right.primary,)))


def test_moving_a_ciphertext_to_another_row_fails_authentication(engine: sa.Engine,
                                                                 keys: dict[str, PrivateKeyTypes]) -> None:
    ring = _ring()
    a = _store(engine, keys["ec-p256"], ring)
    b = _store(engine, keys["ec-p384"], ring)
    row_a = _row(engine, a)

    # Only the key's ciphertext moved: B's data key cannot open it (and it is bound to A's id anyway).
    with write_session(engine) as session:
        session.execute(sa.update(PrivateKey).where(PrivateKey.id == b.id).values(ciphertext=row_a.ciphertext))
    with pytest.raises(MasterKeyError, match=f"private key key:{b.id} failed authentication: wrong master key or altered row"):
        _load(engine, b, ring)

    # The whole envelope moved (ciphertext and wrapped data key, same master key): bound to A's id, so no.
    with write_session(engine) as session:
        session.execute(sa.update(PrivateKey).where(PrivateKey.id == b.id)
                        .values(ciphertext=row_a.ciphertext, wrapped_data_key=row_a.wrapped_data_key))
    with pytest.raises(MasterKeyError, match="failed authentication"):
        _load(engine, b, ring)

    # A flipped bit in place fails the same way.
    flipped = bytes([row_a.ciphertext[0] ^ 1]) + row_a.ciphertext[1:]  # type: ignore[index]
    with write_session(engine) as session:
        session.execute(sa.update(PrivateKey).where(PrivateKey.id == a.id).values(ciphertext=flipped))
    with pytest.raises(MasterKeyError, match="failed authentication"):
        _load(engine, a, ring)


# ------------------------------------------------------------------------------------------ destroying

def test_destroy_erases_ciphertext_and_data_key(engine: sa.Engine, keys: dict[str, PrivateKeyTypes]) -> None:
    ring = _ring()
    ref = _store(engine, keys["rsa-2048"], ring)
    keep = _store(engine, keys["ec-p256"], ring)

    with write_session(engine) as session:
        keystore.destroy_private_key(session, ref, ACTOR)
    with engine.connect() as conn:  # the raw row, not the ORM's view of it
        raw = conn.execute(sa.text("SELECT ciphertext, wrapped_data_key, destroyed_at, spki_sha256, master_key_id "
                                   "FROM private_key WHERE id = :id"), {"id": ref.id}).one()
    assert raw.ciphertext is None and raw.wrapped_data_key is None
    assert raw.destroyed_at is not None
    assert raw.spki_sha256 == public_key_sha256(keys["rsa-2048"])  # what it was stays known, not what it is

    with pytest.raises(NotFoundError, match=rf"private key key:{ref.id} was destroyed at \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d UTC"):
        _load(engine, ref, ring)
    with read_session(engine) as session:
        assert keystore.find_key(session, public_key_sha256(keys["rsa-2048"])) is None
    assert private_key_der(_load(engine, keep, ring)) == private_key_der(keys["ec-p256"])  # the other key is untouched

    # Destroying again changes nothing and audits nothing; an unknown key is not found.
    with write_session(engine) as session:
        keystore.destroy_private_key(session, ref, ACTOR)
    with pytest.raises(NotFoundError, match="no private key key:0000"):
        with write_session(engine) as session:
            keystore.destroy_private_key(session, keystore.KeyRef("0000"), ACTOR)
    with pytest.raises(NotFoundError, match="no private key key:0000"):
        _load(engine, keystore.KeyRef("0000"), ring)

    events = _events(engine)
    assert [e.action for e in events] == ["key.stored", "key.stored", "key.destroyed"]
    assert events[-1].object == f"key:{ref.id}"
    assert json.loads(events[-1].details) == {"spki_sha256": public_key_sha256(keys["rsa-2048"])}
    assert _verify(engine).events == 3

    # Storing the same key after it was destroyed seals it anew, under a new id.
    again = _store(engine, keys["rsa-2048"], ring)
    assert again != ref
    assert private_key_der(_load(engine, again, ring)) == private_key_der(keys["rsa-2048"])


# ------------------------------------------------------------------------------------------ rotation

def _store_several(engine: sa.Engine, keys: dict[str, PrivateKeyTypes], ring: keystore.KeyRing) -> dict[str, keystore.KeyRef]:
    return {name: _store(engine, keys[name], ring) for name in ("ec-p256", "ec-p384", "ed25519", "rsa-2048")}


def _assert_sealed_by(engine: sa.Engine, refs: dict[str, keystore.KeyRef], master_id: str) -> None:
    for ref in refs.values():
        assert _row(engine, ref).master_key_id == master_id


def test_rotate_master_key_with_the_default_file(engine: sa.Engine, certpilot_home: Path,
                                                 keys: dict[str, PrivateKeyTypes]) -> None:
    settings = load_settings()
    old_ring = _ring()
    old_text = settings.master_key_file.read_text()
    refs = _store_several(engine, keys, old_ring)
    shredded = _store(engine, keys["rsa-3072"], old_ring)
    with write_session(engine) as session:
        keystore.destroy_private_key(session, shredded, ACTOR)
    before = {name: _row(engine, ref).wrapped_data_key for name, ref in refs.items()}
    ciphertexts = {name: _row(engine, ref).ciphertext for name, ref in refs.items()}

    rotation = keystore.rotate_master_key(engine, settings, ACTOR)

    assert rotation.old_id == old_ring.primary.id
    assert rotation.new_id != old_ring.primary.id
    assert rotation.keys == len(refs)  # the destroyed key has nothing to re-seal
    assert rotation.key_file == settings.master_key_file
    # The file was replaced by the new key, still 0600, and nothing is left beside it.
    assert settings.master_key_file.read_text() != old_text
    assert _mode(settings.master_key_file) == 0o600
    assert not keystore.pending_key_file(settings).exists()
    assert sorted(p.name for p in certpilot_home.iterdir() if "master" in p.name) == ["master.key"]

    new_ring = _ring()
    assert new_ring.primary.id == rotation.new_id and new_ring.others == ()
    _assert_sealed_by(engine, refs, rotation.new_id)
    assert _row(engine, shredded).master_key_id == old_ring.primary.id and _row(engine, shredded).ciphertext is None
    for name, ref in refs.items():
        row = _row(engine, ref)
        assert row.wrapped_data_key != before[name]  # the data key was re-sealed ...
        assert row.ciphertext == ciphertexts[name]  # ... and the key itself was not touched
        assert private_key_der(_load(engine, ref, new_ring)) == private_key_der(keys[name])
        with pytest.raises(MasterKeyError) as caught:
            _load(engine, ref, old_ring)
        assert rotation.new_id in str(caught.value) and old_ring.primary.id in str(caught.value)

    events = _events(engine)
    assert [e.action for e in events] == ["key.stored"] * 5 + ["key.destroyed", "master_key.rotated"]
    assert events[-1].object == f"master_key:{rotation.new_id}"
    assert json.loads(events[-1].details) == {"from": old_ring.primary.id, "to": rotation.new_id, "keys": len(refs)}
    assert _verify(engine).events == 7

    # Rotating again works from the new key.
    second = keystore.rotate_master_key(engine, settings, ACTOR)
    assert second.old_id == rotation.new_id and second.keys == len(refs)
    for name, ref in refs.items():
        assert private_key_der(_load(engine, ref, _ring())) == private_key_der(keys[name])


@pytest.mark.parametrize("resealed", [True, False], ids=["crashed-before-rename", "crashed-before-commit"])
def test_interrupted_rotation_stays_readable_and_the_next_rotation_finishes_it(
        engine: sa.Engine, certpilot_home: Path, keys: dict[str, PrivateKeyTypes], resealed: bool) -> None:
    settings = load_settings()
    old_ring = _ring()
    refs = _store_several(engine, keys, old_ring)

    # Simulate a crash in rotate_master_key: `.next` written (and, in one case, the rows re-sealed and
    # committed), but the rename never happened.
    new = keystore.generate_master_key()
    keystore.write_master_key_file(keystore.pending_key_file(settings), new)
    if resealed:
        with write_session(engine) as session:
            assert keystore.rewrap_all(session, old_ring, new, ACTOR) == len(refs)
        _assert_sealed_by(engine, refs, new.id)
    else:
        _assert_sealed_by(engine, refs, old_ring.primary.id)

    # Still readable: the ring holds both the file's key and the pending one.
    ring = _ring()
    assert ring.primary.id == old_ring.primary.id and [k.id for k in ring.others] == [new.id]
    for name, ref in refs.items():
        assert private_key_der(_load(engine, ref, ring)) == private_key_der(keys[name])
    # New keys meanwhile are sealed with the file's key, and rotation carries them over too.
    extra = _store(engine, keys["rsa-3072"], ring)
    refs = {**refs, "rsa-3072": extra}

    rotation = keystore.rotate_master_key(engine, settings, ACTOR)
    assert rotation.new_id == new.id  # the pending key is finished, not replaced by yet another one
    assert rotation.old_id == old_ring.primary.id
    assert rotation.keys == (1 if resealed else len(refs))
    assert not keystore.pending_key_file(settings).exists()
    assert _mode(settings.master_key_file) == 0o600
    assert keystore.read_master_key_file(settings.master_key_file).id == new.id

    final = _ring()
    assert final.primary.id == new.id and final.others == ()
    _assert_sealed_by(engine, refs, new.id)
    for name, ref in refs.items():
        assert private_key_der(_load(engine, ref, final)) == private_key_der(keys[name])
        with pytest.raises(MasterKeyError):
            _load(engine, ref, old_ring)
    actions = [e.action for e in _events(engine)]
    assert actions.count("master_key.rotated") == (2 if resealed else 1)
    assert _verify(engine).events == len(actions)


def test_rotation_with_environment_master_key_requires_new_key_file(
        engine: sa.Engine, certpilot_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        keys: dict[str, PrivateKeyTypes]) -> None:
    old = keystore.generate_master_key()
    monkeypatch.setenv("CERTPILOT_MASTER_KEY", old.encoded())
    old_ring = _ring()
    refs = _store_several(engine, keys, old_ring)

    with pytest.raises(MasterKeyError, match="give --new-key-file PATH"):
        keystore.rotate_master_key(engine, load_settings(), ACTOR)
    _assert_sealed_by(engine, refs, old.id)  # refused before anything changed
    assert [e.action for e in _events(engine)] == ["key.stored"] * len(refs)

    new_file = tmp_path / "secrets" / "new-master.key"
    rotation = keystore.rotate_master_key(engine, load_settings(), ACTOR, new_key_file=new_file)
    assert rotation.key_file == new_file and rotation.keys == len(refs) and rotation.old_id == old.id
    assert _mode(new_file) == 0o600
    assert not (certpilot_home / "master.key").exists()
    _assert_sealed_by(engine, refs, rotation.new_id)

    # The environment still names the old key: it no longer opens anything ...
    for ref in refs.values():
        with pytest.raises(MasterKeyError, match=rotation.new_id):
            _load(engine, ref, _ring())
    # ... until the operator points certpilot at the new one.
    monkeypatch.delenv("CERTPILOT_MASTER_KEY")
    monkeypatch.setenv("CERTPILOT_MASTER_KEY_FILE", str(new_file))
    for name, ref in refs.items():
        assert private_key_der(_load(engine, ref, _ring())) == private_key_der(keys[name])
    monkeypatch.delenv("CERTPILOT_MASTER_KEY_FILE")
    monkeypatch.setenv("CERTPILOT_MASTER_KEY", new_file.read_text().strip())
    assert _ring().primary.id == rotation.new_id
    assert _verify(engine).events == len(refs) + 1
