"""Targets in the inventory, on SQLite and PostgreSQL: adding and reconfiguring them (CLI and core),
what a deploy plans, the deployable bundle from the keystore, and an audit trail without PEM."""

from __future__ import annotations

import datetime as dt
import json

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlmodel import select
from typer.testing import CliRunner

from certpilot import audit, keystore, managed, targets
from cli.main import app
from certpilot.database import read_session, write_session
from certpilot.errors import KeyMismatchError, NotFoundError, PermanentError
from certpilot.models import AuditEvent, PrivateKey
from certpilot.renewing import renew_one
from certpilot.clock import utcnow
from certpilot.deployment import DeployBundle, PermanentDeployError, fingerprint
from certpilot.keys import public_key_sha256
from certpilot.sample_estate import issue_leaf, make_ca
from certpilot.settings import load_settings
from certpilot.target_kinds import TargetKind, TargetSettingsError, UnknownTargetKindError
from tests.sample_issuer import SampleIssuer

runner = CliRunner()
ACTOR = audit.Actor("test")


def _ring() -> keystore.KeyRing:
    return keystore.load_key_ring(load_settings())


@pytest.fixture
def web(engine: sa.Engine) -> str:
    with write_session(engine) as session:
        managed.add(session, managed.ManagedSpec(name="web", dns_names=("web.example.test",),
                                                 issuer="private-ca/internal", owner="platform"), ACTOR)
    return "web"


def test_cli_refuses_an_unknown_kind_or_setting_as_usage_before_anything_is_written(engine: sa.Engine,
                                                                                      web: str) -> None:
    """Both are refused before the block is looked up (adding, listing: tests/flows/test_target_cli.py)."""
    bad = runner.invoke(app, ["target", "add", web, "web2", "--kind", "ftp", "--block", "ssh-host/web1"])
    assert bad.exit_code == 2 and "'ftp' is not one of" in bad.stderr
    assert all(kind.value in bad.stderr for kind in TargetKind)
    typo = runner.invoke(app, ["target", "add", web, "web2", "--kind", "ssh-nginx", "--block", "ssh-host/web1",
                               "--set", "certifcate_path=/x", "--json"])
    assert typo.exit_code == 2 and "unknown ssh-nginx setting(s) certifcate_path" in typo.stderr
    error = json.loads(typo.stdout)
    assert error["exit_code"] == 2 and "valid keys: certificate_mode, certificate_path" in error["error"]
    with read_session(engine) as session:
        assert targets.list_targets(session, web) == []


def test_configure_updates_and_audits_without_pem(engine: sa.Engine, web: str) -> None:
    trust = make_ca("Trust").certificate.public_bytes(serialization.Encoding.PEM).decode()
    with write_session(engine) as session:
        targets.configure(session, web, "web1", "ssh-nginx", "ssh-host/a", {"verify_trust": trust}, ACTOR)
        targets.configure(session, web, "web1", "ssh-nginx", "ssh-host/b", {"verify_trust": trust, "verify_port": 1},
                          ACTOR)
        with pytest.raises(TargetSettingsError, match="unknown ssh-nginx setting") as unknown:
            targets.configure(session, web, "web1", "ssh-nginx", "ssh-host/b", {"x": 1}, ACTOR)
        assert (unknown.value.bad_keys, unknown.value.kind) == (("x",), TargetKind.SSH_NGINX)
        assert "certificate_path" in unknown.value.valid_keys and "key_path" in str(unknown.value)
        with pytest.raises(UnknownTargetKindError, match="unknown target kind 'ftp'; one of ssh-nginx"):
            targets.add(session, web, "web2", "ftp", "ssh-host/b", {}, ACTOR)
        with pytest.raises(PermanentError, match="already has a target named web1"):
            targets.add(session, web, "web1", "ssh-nginx", "ssh-host/b", {}, ACTOR)
        with pytest.raises(PermanentError, match="block-type-slug/document-name"):
            targets.add(session, web, "web2", "ssh-nginx", "web2", {}, ACTOR)
    with read_session(engine) as session:
        (row,) = targets.list_targets(session, web)
        details = [e.details for e in session.exec(select(AuditEvent).where(AuditEvent.action.in_(  # type: ignore[attr-defined]
            ["target.added", "target.changed"])))]
    assert (row.block, row.settings["verify_port"]) == ("ssh-host/b", 1)
    assert len(details) == 2 and all("BEGIN" not in d and "<PEM sha256:" in d for d in details)


def test_plan_and_bundle(engine: sa.Engine, web: str) -> None:
    with read_session(engine) as session:
        with pytest.raises(NotFoundError, match="no certificate yet"):
            targets.plan(session, web)
    issuer = SampleIssuer(make_ca("Bundle CA"), name="private-ca/internal")
    renewal = renew_one(engine, web, issuer, _ring, ACTOR)
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


def test_a_bundle_whose_stored_key_is_not_its_certificates_cannot_be_built(engine: sa.Engine, web: str) -> None:
    """The key-to-certificate match is checked once, when the bundle is built: a keystore row that claims
    the certificate's public key but seals another key (an altered row) never reaches a deployer."""
    issuer = SampleIssuer(make_ca("Bundle CA"), name="private-ca/internal")
    renewal = renew_one(engine, web, issuer, _ring, ACTOR)
    with write_session(engine) as session:
        other = keystore.store_private_key(session, ec.generate_private_key(ec.SECP256R1()), _ring(), ACTOR, "test")
        (real,) = [k for k in session.exec(select(PrivateKey)) if k.id != other.id]
        spki = real.spki_sha256
        real.spki_sha256 = "0" * 64
        session.add(real)
        session.flush()
        forged = session.get(PrivateKey, other.id)
        assert forged is not None
        forged.spki_sha256 = spki
        session.add(forged)
    with pytest.raises(KeyMismatchError, match="matches none of the certificates") as caught:
        targets.bundle(engine, web, renewal.fingerprint_sha256, _ring)
    assert caught.value.certificate_fingerprints == [renewal.fingerprint_sha256]
    with pytest.raises(KeyMismatchError):
        targets.lookup(engine, web, _ring)(renewal.fingerprint_sha256)


def test_a_bundle_is_built_only_over_its_own_readable_key() -> None:
    ca = make_ca("Bundle Check CA")
    cert, key = issue_leaf(ca, ["check.example.test"], utcnow() + dt.timedelta(days=30))
    other = ec.generate_private_key(ec.SECP256R1())
    assert DeployBundle.from_key("check", cert, [ca.certificate], key).fingerprint == fingerprint(cert)
    with pytest.raises(KeyMismatchError) as mismatch:
        DeployBundle.from_key("check", cert, [ca.certificate], other)
    assert mismatch.value.key_spki_sha256 == public_key_sha256(other)
    with pytest.raises(PermanentDeployError, match="not a readable unencrypted PEM key") as unreadable:
        DeployBundle("check", cert, (ca.certificate,), lambda: b"-----BEGIN PRIVATE KEY-----\nnot\n-----END PRIVATE "
                                                            b"KEY-----\n")
    assert "not\n" not in str(unreadable.value)
