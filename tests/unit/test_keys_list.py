"""`certpilot keys list`: where each key lives and what uses it, and never a byte of any key.

Real keys of every kind the keystore holds (RSA, EC, Ed25519, ML-DSA), a private CA made by certpilot
(its root and issuing keys), a leaf certificate in the inventory using a stored key, a destroyed key;
the command run in-process, its text and JSON output searched for each key in every written form.
"""

from __future__ import annotations

import base64
import datetime as dt
import json

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from sqlmodel import select
from typer.testing import CliRunner

from certpilot import audit, ca, inventory, keystore
from certpilot.database import read_session, write_session
from certpilot.key_listing import size_and_curve
from certpilot.keys import generate_private_key, public_key_sha256
from certpilot.models import PrivateKey
from certpilot.sample_estate import issue_leaf, make_ca
from certpilot.settings import load_settings
from certpilot.x509info import describe_certificate
from cli.main import app

ACTOR = audit.Actor("test:keys-list")
SUBJECT = "CN=web.keys.test,O=certpilot sample estate"


def _written_forms(key: PrivateKeyTypes) -> list[str]:
    """The private key as PEM (whole and line by line), DER in hex and base64, and its raw private value."""
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    raws = []
    if isinstance(key, ec.EllipticCurvePrivateKey):
        raws.append(key.private_numbers().private_value.to_bytes((key.curve.key_size + 7) // 8, "big"))
    elif isinstance(key, rsa.RSAPrivateKey):
        numbers = key.private_numbers()
        raws += [n.to_bytes((n.bit_length() + 7) // 8, "big") for n in (numbers.d, numbers.p, numbers.q)]
    elif isinstance(key, ed25519.Ed25519PrivateKey):
        raws.append(key.private_bytes_raw())
    forms = [pem, "PRIVATE KEY", *pem.splitlines()[1:-1]]
    for blob in (der, *raws):
        forms += [blob.hex(), blob.hex().upper(), base64.b64encode(blob).decode(),
                  base64.urlsafe_b64encode(blob).decode().rstrip("=")]
    return forms


def _cli(*args: str) -> tuple[str, str]:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.stdout, result.stderr


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_keys_list_shows_where_each_key_lives_and_no_key_byte(engine: sa.Engine) -> None:
    settings = load_settings()
    ring = keystore.load_key_ring(settings)
    stored = {name: generate_private_key(name) for name in ("rsa-2048", "ed25519", "ml-dsa-44", "ec-p384")}
    leaf_cert, leaf_key = issue_leaf(make_ca("Keys List Test CA"), ["web.keys.test"],
                                     dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=30))
    with write_session(engine) as session:
        authority = ca.init_ca(session, ring, ACTOR, "KeysCA", "http://127.0.0.1:9")
        refs = {name: keystore.store_private_key(session, key, ring, ACTOR, "generated")
                for name, key in stored.items()}
        refs["leaf"] = keystore.store_private_key(session, leaf_key, ring, ACTOR, "imported")
        inventory.upsert(session, [inventory.Observation(describe_certificate(leaf_cert), None, "test")], ACTOR)
        gone = keystore.store_private_key(session, generate_private_key("ec-p256"), ring, ACTOR, "generated")
        keystore.destroy_private_key(session, gone, ACTOR)
        root_id, issuing_id = authority.root_key_id, authority.issuing_key_id
        assert root_id is not None and issuing_id is not None
        every_key: list[PrivateKeyTypes] = [*stored.values(), leaf_key]
        every_key += [keystore.load_private_key(session, keystore.KeyRef(i), ring) for i in (root_id, issuing_id)]
        sealed = [blob for row in session.exec(select(PrivateKey)).all()
                  for blob in (row.ciphertext, row.wrapped_data_key) if blob]

    as_json, json_err = _cli("keys", "list", "--json")
    text, text_err = _cli("keys", "list")
    rows = {row["ref"]: row for row in json.loads(as_json)}

    # What it shows: every key once, in the keystore, with its kind, size or curve, uses and master key.
    assert len(rows) == 8 and len(text.splitlines()) == 8
    master = ring.primary
    for name, ref in refs.items():
        row = rows[str(ref)]
        key = leaf_key if name == "leaf" else stored[name]
        assert row["store"] == "keystore" and row["spki_sha256"] == public_key_sha256(key)
        assert (row["key_size"], row["curve"]) == size_and_curve(row["algorithm"])
        assert (row["master_key_id"], row["master_key_source"]) == (master.id, "file")
        assert row["master_key_where"] == str(settings.master_key_file) == row["master_key_file"]
        assert row["destroyed_at"] is None and row["token"] is None
    assert (rows[str(refs["rsa-2048"])]["key_size"], rows[str(refs["ec-p384"])]["curve"]) == (2048, "secp384r1")
    assert rows[str(refs["ml-dsa-44"])]["algorithm"] == "ml-dsa-44"
    assert rows[str(refs["ed25519"])]["used_by"] == []
    leaf_fp = describe_certificate(leaf_cert).fingerprint_sha256
    assert rows[str(refs["leaf"])]["used_by"] == [{"kind": "certificate", "id": leaf_fp, "label": SUBJECT}]
    root, issuing = rows[f"key:{root_id}"], rows[f"key:{issuing_id}"]
    assert [u["kind"] for u in root["used_by"]] == ["ca-root", "certificate"]
    assert [u["kind"] for u in issuing["used_by"]] == ["ca-issuing", "certificate"]
    assert root["used_by"][0]["id"] == "KeysCA" and (root["algorithm"], root["curve"]) == ("ec-p384", "secp384r1")
    assert rows[str(gone)]["destroyed_at"] is not None

    lines = {line.split()[0]: line for line in text.splitlines()}
    assert f"sealed by master key {master.id} (file {settings.master_key_file})" in lines[str(refs["leaf"])]
    assert "used by ca-issuing KeysCA" in lines[f"key:{issuing_id}"]
    assert f"certificate {leaf_fp[:16]} ({SUBJECT})" in lines[str(refs["leaf"])]
    assert "destroyed" in lines[str(gone)] and "unused" in lines[str(refs["ed25519"])]

    # What it never shows: any key, in any written form; nor the master key, nor even the sealed bytes.
    forbidden = [form for key in every_key for form in _written_forms(key)]
    forbidden += [master.encoded(), master.encoded().rstrip("="), master.secret.hex(), base64.b64encode(master.secret)
                  .decode()]
    forbidden += [form for blob in sealed for form in (blob.hex(), base64.b64encode(blob).decode())]
    assert len(forbidden) > 100
    for output in (as_json, json_err, text, text_err):
        leaked = [form[:24] for form in forbidden if form in output]
        assert leaked == []
