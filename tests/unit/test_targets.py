"""Targets in the inventory, on SQLite and PostgreSQL: adding and reconfiguring them (CLI and core),
what a deploy plans, the deployable bundle from the keystore, and an audit trail without PEM."""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization
from sqlmodel import select
from typer.testing import CliRunner

from certpilot import audit, keystore, managed, targets
from cli.main import app
from certpilot.database import read_session, write_session
from certpilot.errors import NotFoundError, PermanentError
from certpilot.models import AuditEvent
from certpilot.sample_estate import make_ca
from certpilot.settings import load_settings
from tests.sample_issuer import SampleIssuer

runner = CliRunner()
ACTOR = audit.Actor("test")


def _ring() -> keystore.KeyRing:
    return keystore.load_key_ring(load_settings())


@pytest.fixture
def web(engine: sa.Engine) -> str:
    with write_session(engine) as session:
        managed.add(session, managed.ManagedSpec(name="web", dns_names=("web.example.test",),
                                                 issuer="private-ca/internal"), ACTOR)
    return "web"


def test_cli_add_and_list(engine: sa.Engine, web: str) -> None:
    result = runner.invoke(app, ["target", "add", web, "web1", "--kind", "ssh-nginx", "--block", "ssh-host/web1",
                                 "--set", "certificate_path=/etc/nginx/web.crt", "--set", "verify_port=8443"])
    assert result.exit_code == 0, result.output
    listed = runner.invoke(app, ["target", "list", web, "--json"])
    rows = json.loads(listed.output)
    assert rows[0]["settings"] == {"certificate_path": "/etc/nginx/web.crt", "verify_port": 8443}
    assert (rows[0]["desired"], rows[0]["verified"]) == (None, None)
    bad = runner.invoke(app, ["target", "add", web, "web2", "--kind", "ftp", "--block", "ssh-host/web1"])
    assert bad.exit_code == 1 and "unknown kind 'ftp'" in bad.stderr


def test_configure_updates_and_audits_without_pem(engine: sa.Engine, web: str) -> None:
    trust = make_ca("Trust").certificate.public_bytes(serialization.Encoding.PEM).decode()
    with write_session(engine) as session:
        targets.configure(session, web, "web1", "ssh-nginx", "ssh-host/a", {"verify_trust": trust}, ACTOR)
        targets.configure(session, web, "web1", "ssh-nginx", "ssh-host/b", {"verify_trust": trust, "x": 1}, ACTOR)
        with pytest.raises(PermanentError, match="already has a target named web1"):
            targets.add(session, web, "web1", "ssh-nginx", "ssh-host/b", {}, ACTOR)
        with pytest.raises(PermanentError, match="block-type-slug/document-name"):
            targets.add(session, web, "web2", "ssh-nginx", "web2", {}, ACTOR)
    with read_session(engine) as session:
        (row,) = targets.list_targets(session, web)
        details = [e.details for e in session.exec(select(AuditEvent).where(AuditEvent.action.in_(  # type: ignore[attr-defined]
            ["target.added", "target.changed"])))]
    assert (row.block, row.settings["x"]) == ("ssh-host/b", 1)
    assert len(details) == 2 and all("BEGIN" not in d and "<PEM sha256:" in d for d in details)


def test_plan_and_bundle(engine: sa.Engine, web: str) -> None:
    with read_session(engine) as session:
        with pytest.raises(NotFoundError, match="no certificate yet"):
            targets.plan(session, web)
    issuer = SampleIssuer(make_ca("Bundle CA"), name="private-ca/internal")
    renewal = managed.renew_one(engine, web, issuer, _ring, ACTOR)
    with read_session(engine) as session:
        plan = targets.plan(session, web)
        with pytest.raises(NotFoundError, match="not one of managed certificate web's"):
            targets.plan(session, web, "0" * 64)
    assert plan.fingerprint == renewal.fingerprint_sha256
    bundle = targets.lookup(engine, web, _ring)(plan.fingerprint)
    assert bundle is not None and bundle.fingerprint == plan.fingerprint
    key = serialization.load_pem_private_key(bundle.key_pem(), None)
    assert key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) \
        == bundle.certificate.public_key().public_bytes(serialization.Encoding.DER,
                                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    assert "key_pem" not in repr(bundle)
    assert targets.lookup(engine, web, _ring)("f" * 64) is None
