"""The master key in AWS KMS, against a real moto server: a KMS data key kept only as its KMS ciphertext
(master.key.kms), opened by KMS Decrypt when the key ring loads; outages that fail loudly and change
nothing; rotation from a file key into KMS, from one KMS key to another, and an interrupted rotation.

Real keys, a real inventory, real files, boto3 against moto on loopback (and through lab.fault_proxy
for a black hole and 5xx answers). moto does not refuse a disabled key's Decrypt (moto 5.2), so a
refusing KMS is shown by a KMS key that no longer exists (NotFoundException): the same refused path.
"""

from __future__ import annotations

import base64
import json
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from sqlmodel import col, select
from typer.testing import CliRunner

from certpilot import audit, keystore
from certpilot.database import read_session, write_session
from certpilot.errors import MasterKeyError
from certpilot.keys import generate_private_key, private_key_der
from certpilot.models import AuditEvent, PrivateKey
from certpilot.settings import load_settings
from cli.main import app
from connectors import kms
from lab.fault_proxy import FaultProxy, Faults
from lab.moto import ACCESS_KEY_ID, SECRET_ACCESS_KEY, MotoServer
from lab.ports import free_port

ACTOR = audit.Actor("test:kms")
REGION = "eu-west-1"
ALIAS = "alias/certpilot-master"


@pytest.fixture(scope="module")
def keys() -> dict[str, PrivateKeyTypes]:
    return {name: generate_private_key(name) for name in ("ec-p256", "ed25519", "rsa-2048")}


@pytest.fixture
def kms_key(moto: MotoServer, monkeypatch: pytest.MonkeyPatch) -> str:
    """A KMS key in moto behind an alias; the environment names the alias (not the ARN). Returns its ARN."""
    client = moto.client("kms", REGION)
    arn = client.create_key(Description="certpilot master key")["KeyMetadata"]["Arn"]
    client.create_alias(AliasName=ALIAS, TargetKeyId=arn)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY)
    _use_kms(monkeypatch, ALIAS, moto.url)
    return arn


def _use_kms(monkeypatch: pytest.MonkeyPatch, key: str, endpoint: str) -> None:
    monkeypatch.setenv("CERTPILOT_MASTER_KEY_KMS", key)
    monkeypatch.setenv("CERTPILOT_MASTER_KEY_KMS_REGION", REGION)
    monkeypatch.setenv("CERTPILOT_MASTER_KEY_KMS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("CERTPILOT_MASTER_KEY_KMS_TIMEOUT", "0.5")


def _store(engine: sa.Engine, keys: dict[str, PrivateKeyTypes], ring: keystore.KeyRing) -> dict[str, keystore.KeyRef]:
    with write_session(engine) as session:
        return {name: keystore.store_private_key(session, key, ring, ACTOR, "generated") for name, key in keys.items()}


def _assert_all_open(engine: sa.Engine, refs: dict[str, keystore.KeyRef], keys: dict[str, PrivateKeyTypes],
                     ring: keystore.KeyRing) -> None:
    with read_session(engine) as session:
        for name, ref in refs.items():
            assert private_key_der(keystore.load_private_key(session, ref, ring)) == private_key_der(keys[name])


def _sealing(engine: sa.Engine) -> dict[str, tuple[str | None, bytes | None]]:
    with read_session(engine) as session:
        return {r.id: (r.master_key_id, r.wrapped_data_key) for r in session.exec(select(PrivateKey)).all()}


def _actions(engine: sa.Engine) -> list[str]:
    with read_session(engine) as session:
        return [e.action for e in session.exec(select(AuditEvent).order_by(col(AuditEvent.seq))).all()]


def _forms(secret: bytes) -> list[bytes]:
    """Every way a 32-byte key could be written down."""
    return [secret, secret.hex().encode(), secret.hex().upper().encode(), base64.b64encode(secret),
            base64.urlsafe_b64encode(secret), base64.b64encode(secret).rstrip(b"="),
            base64.urlsafe_b64encode(secret).rstrip(b"=")]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ------------------------------------------------------------------------------------------ seal and open

@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_kms_wrapped_master_key_seals_and_opens_and_its_file_holds_no_plaintext(
        engine: sa.Engine, kms_key: str, moto: MotoServer, keys: dict[str, PrivateKeyTypes]) -> None:
    settings = load_settings()
    told: list[str] = []
    ring = kms.load_key_ring(settings, announce=told.append)
    place = keystore.kms_key_file(settings)
    assert place.exists() and _mode(place) == 0o600
    assert not settings.master_key_file.exists()  # no plaintext key file was made
    assert len(told) == 1 and str(place) in told[0] and kms_key in told[0]
    refs = _store(engine, keys, ring)

    # The file: KMS's ciphertext of the master key, the ARN (not the alias) and the key's id; nothing else.
    raw = place.read_bytes()
    data = json.loads(raw)
    assert data["kms_key_arn"] == kms_key and data["master_key_id"] == ring.primary.id
    for form in _forms(ring.primary.secret):
        assert form not in raw
    # It is what it says: KMS itself opens it (bound to certpilot's encryption context) to the ring's key.
    opened = moto.client("kms", REGION).decrypt(CiphertextBlob=base64.b64decode(data["ciphertext"]),
                                                EncryptionContext=keystore.KMS_CONTEXT, KeyId=kms_key)
    assert opened["Plaintext"] == ring.primary.secret

    # Another load (as another process would) asks KMS again and opens every key; nothing new is made.
    again = kms.key_ring_loader(load_settings(), announce=told.append)
    first, second = again(), again()
    assert first.primary.id == second.primary.id == ring.primary.id and len(told) == 1
    _assert_all_open(engine, refs, keys, second)
    assert place.read_bytes() == raw

    # keys list names the master key's source without opening it, and shows none of it.
    listed = CliRunner().invoke(app, ["keys", "list", "--json"])
    assert listed.exit_code == 0, listed.output
    for row in json.loads(listed.stdout):
        assert (row["master_key_id"], row["master_key_source"]) == (ring.primary.id, "kms")
        assert (row["master_key_where"], row["master_key_file"]) == (kms_key, str(place))
    for form in _forms(ring.primary.secret):
        assert form.decode("latin-1") not in listed.output


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_without_a_kms_client_the_core_refuses_instead_of_guessing(engine: sa.Engine, kms_key: str) -> None:
    with pytest.raises(MasterKeyError, match="loaded without a KMS client"):
        keystore.load_key_ring(load_settings())
    assert not keystore.kms_key_file(load_settings()).exists()


# ------------------------------------------------------------------------------------------ outages

@pytest.fixture
def black_hole(moto: MotoServer) -> Iterator[str]:
    with FaultProxy(("127.0.0.1", moto.port), Faults(black_hole=1.0), seed=12, mode="tcp") as proxy:
        yield proxy.url


@pytest.fixture
def failing(moto: MotoServer) -> Iterator[str]:
    with FaultProxy(("127.0.0.1", moto.port), Faults(status_5xx=1.0), seed=12, mode="http") as proxy:
        yield proxy.url


OUTAGES = {
    "endpoint-down": (keystore.MasterKeyUnavailableError, "EndpointConnectionError"),
    "black-holed": (keystore.MasterKeyUnavailableError, "ReadTimeoutError"),
    "5xx": (keystore.MasterKeyUnavailableError, "decrypt"),
    "key-gone": (MasterKeyError, "NotFoundException"),
}


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("outage", list(OUTAGES))
def test_a_kms_outage_fails_loudly_naming_the_key_and_changes_nothing(
        engine: sa.Engine, kms_key: str, moto: MotoServer, keys: dict[str, PrivateKeyTypes],
        monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest, outage: str) -> None:
    ring = kms.load_key_ring(load_settings())
    refs = _store(engine, {"ec-p256": keys["ec-p256"]}, ring)
    settings = load_settings()
    place, staged = keystore.kms_key_file(settings), keystore.pending_kms_key_file(settings)
    before = (place.read_bytes(), _sealing(engine), _actions(engine))

    if outage == "endpoint-down":
        _use_kms(monkeypatch, ALIAS, f"http://127.0.0.1:{free_port()}")
    elif outage == "black-holed":
        _use_kms(monkeypatch, ALIAS, request.getfixturevalue("black_hole"))
    elif outage == "5xx":
        _use_kms(monkeypatch, ALIAS, request.getfixturevalue("failing"))
    else:
        moto.reset()  # the KMS key is gone
    expected, failure = OUTAGES[outage]

    for attempt in ("load", "rotate"):
        started = time.monotonic()
        with pytest.raises(expected) as caught:
            if attempt == "load":
                kms.load_key_ring(load_settings())
            else:
                kms.rotate_master_key(engine, load_settings(), ACTOR)
        assert time.monotonic() - started < 20  # bounded: 0.5 s timeouts, 3 attempts, botocore's backoff
        message = str(caught.value)
        assert kms_key in message and failure in message and "nothing was changed" in message, message
        assert str(place) in message
        if expected is MasterKeyError:
            assert not isinstance(caught.value, keystore.MasterKeyUnavailableError)
    assert (place.read_bytes(), _sealing(engine), _actions(engine)) == before
    assert not staged.exists()
    listed = _cli("keys", "list", "--json")  # the listing asks no KMS: it works during the outage
    assert [(row["master_key_source"], row["master_key_where"]) for row in listed] == [("kms", kms_key)]

    if outage != "key-gone":  # the KMS is back: everything opens as before
        _use_kms(monkeypatch, ALIAS, moto.url)
        _assert_all_open(engine, refs, keys, kms.load_key_ring(load_settings()))


# ------------------------------------------------------------------------------------------ rotation

def _cli(*args: str) -> Any:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_rotation_from_a_file_key_into_kms_then_to_another_kms_key(
        engine: sa.Engine, moto: MotoServer, kms_key: str, keys: dict[str, PrivateKeyTypes],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Before: the default master key file, and keys sealed under it.
    monkeypatch.delenv("CERTPILOT_MASTER_KEY_KMS")
    file_ring = keystore.load_key_ring(load_settings())
    refs = _store(engine, keys, file_ring)
    key_file = load_settings().master_key_file
    monkeypatch.setenv("CERTPILOT_MASTER_KEY_KMS", ALIAS)

    # Naming a KMS key is not enough: the ring refuses until the key is moved into KMS.
    with pytest.raises(MasterKeyError, match="run `certpilot keys rotate-master`"):
        kms.load_key_ring(load_settings())
    refused = CliRunner().invoke(app, ["keys", "rotate-master", "--new-key-file", str(key_file) + ".new"])
    assert refused.exit_code == 1 and "leave out --new-key-file" in refused.output
    into = _cli("keys", "rotate-master", "--json")
    settings = load_settings()
    place = keystore.kms_key_file(settings)
    assert into["old"] == file_ring.primary.id and into["keys"] == len(keys)
    assert into["kms_key_arn"] == kms_key and into["key_file"] == str(place)
    assert into["retired"] == f"master key file {key_file}"
    assert _mode(place) == 0o600 and not keystore.pending_kms_key_file(settings).exists()
    assert {mk for mk, _ in _sealing(engine).values()} == {into["new"]}
    for form in _forms(file_ring.primary.secret):
        assert form not in place.read_bytes()
    key_file.unlink()  # the old file key is no longer needed
    kms_ring = kms.load_key_ring(load_settings())
    assert kms_ring.primary.id == into["new"] and kms_ring.others == ()
    _assert_all_open(engine, refs, keys, kms_ring)

    # A KMS key that does not exist refuses to generate the new master key: nothing is written or re-sealed.
    monkeypatch.setenv("CERTPILOT_MASTER_KEY_KMS", "alias/no-such-key")
    before = (place.read_bytes(), _sealing(engine), _actions(engine))
    with pytest.raises(MasterKeyError, match="cannot generate a new master key: KMS key alias/no-such-key refused"):
        kms.rotate_master_key(engine, load_settings(), ACTOR)
    assert (place.read_bytes(), _sealing(engine), _actions(engine)) == before
    assert not keystore.pending_kms_key_file(settings).exists()

    # KMS key to KMS key: a new data key of another KMS key, named by its key id this time.
    other = moto.client("kms", REGION).create_key(Description="certpilot master key 2")["KeyMetadata"]
    monkeypatch.setenv("CERTPILOT_MASTER_KEY_KMS", other["KeyId"])
    rotation = kms.rotate_master_key(engine, load_settings(), ACTOR)
    assert rotation.old_id == into["new"] and rotation.keys == len(keys) and rotation.retired is None
    assert rotation.kms_key_arn == other["Arn"] != kms_key
    assert keystore.read_kms_key_file(place).kms_key_arn == other["Arn"]
    final = kms.load_key_ring(load_settings())
    assert final.primary.id == rotation.new_id != into["new"]
    assert {mk for mk, _ in _sealing(engine).values()} == {rotation.new_id}
    _assert_all_open(engine, refs, keys, final)
    with pytest.raises(MasterKeyError):
        _assert_all_open(engine, refs, keys, kms_ring)
    assert _actions(engine).count("master_key.rotated") == 2
    with read_session(engine) as session:
        assert audit.verify(session).events == len(_actions(engine))


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_an_interrupted_kms_rotation_stays_readable_and_the_next_rotation_finishes_it(
        engine: sa.Engine, kms_key: str, keys: dict[str, PrivateKeyTypes]) -> None:
    settings = load_settings()
    old = kms.load_key_ring(settings)
    refs = _store(engine, keys, old)
    client = kms.kms_from_settings(settings)
    assert client is not None

    # A crash after `.next` was written and the rows re-sealed, before the rename.
    new, wrapped = keystore.new_kms_master_key(client, ALIAS)
    keystore.write_kms_key_file(keystore.pending_kms_key_file(settings), wrapped)
    with write_session(engine) as session:
        assert keystore.rewrap_all(session, old, new, ACTOR) == len(keys)

    ring = kms.load_key_ring(settings)
    assert ring.primary.id == old.primary.id and [k.id for k in ring.others] == [new.id]
    _assert_all_open(engine, refs, keys, ring)

    rotation = kms.rotate_master_key(engine, settings, ACTOR)
    assert rotation.new_id == new.id and rotation.keys == 0  # finished, not replaced by yet another key
    assert not keystore.pending_kms_key_file(settings).exists()
    final = kms.load_key_ring(settings)
    assert final.primary.id == new.id and final.others == ()
    _assert_all_open(engine, refs, keys, final)
