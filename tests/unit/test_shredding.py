"""A destroyed key leaves no copy of its sealed bytes in the SQLite file or its write-ahead log,
even while the process that destroyed it keeps running."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from certpilot import audit, keystore
from certpilot.database import write_session
from certpilot.keys import generate_private_key
from certpilot.models import PrivateKey
from certpilot.settings import load_settings


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_shredded_key_is_gone_from_database_and_wal(engine: sa.Engine, certpilot_home: Path) -> None:
    ring = keystore.load_key_ring(load_settings())
    actor = audit.Actor("test")
    with write_session(engine) as session:
        ref = keystore.store_private_key(session, generate_private_key("ec-p256"), ring, actor, "generated")
    with write_session(engine) as session:
        row = session.get(PrivateKey, ref.id)
        sealed = [row.ciphertext, row.wrapped_data_key]
    files = [certpilot_home / "inventory.db", certpilot_home / "inventory.db-wal"]
    assert any(sealed[0] in p.read_bytes() for p in files if p.exists())  # the probe can see it before

    keystore.shred(engine, ref, actor)

    with engine.connect():  # the process and its pool are still alive
        for path in files:
            if path.exists():
                data = path.read_bytes()
                assert sealed[0] not in data and sealed[1] not in data, f"sealed key bytes left in {path.name}"
