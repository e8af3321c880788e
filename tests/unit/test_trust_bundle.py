"""A private CA's trust bundle in the core and the CLI: what it holds and in which order, which CA's
bundle goes with a certificate (and the refusal for one no certpilot CA issued), `ca bundle`, and `ca
distribute` with nothing to distribute to. Distribution over SSH: tests/integration/ssh/test_trust_bundle.py."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric import ec
from typer.testing import CliRunner

from certpilot import audit, ca, inventory, keystore, trust_bundle
from certpilot.database import read_session, write_session
from certpilot.errors import NotFoundError, PermanentError
from certpilot.issuance import build_csr
from certpilot.sample_estate import issue_leaf, make_ca
from certpilot.settings import load_settings
from certpilot.x509info import describe_certificate, fingerprint_sha256
from cli.main import app

SQLITE_ONLY = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
runner = CliRunner()


def _ring() -> keystore.KeyRing:
    return keystore.load_key_ring(load_settings())


@SQLITE_ONLY
def test_the_bundle_is_the_root_then_the_issuing_ca_and_goes_with_what_the_ca_issued(engine: sa.Engine) -> None:
    with write_session(engine) as session:
        ca.init_ca(session, _ring(), audit.Actor("test"), "lab", "http://pki.lab.test")
        issued = ca.issue(session, _ring(), audit.Actor("test"), "lab",
                          build_csr(ec.generate_private_key(ec.SECP256R1()), ["api.lab.test"]), "tls-server")
    with read_session(engine) as session:
        root, issuing = ca.ca_certificates(session, ca.get_ca(session, "lab"))
        bundle = trust_bundle.of_ca(session, "lab")
        assert bundle.certificates == (root, issuing)
        assert trust_bundle.for_certificate(session, fingerprint_sha256(issued.leaf)) == bundle
        assert trust_bundle.for_certificate(session, fingerprint_sha256(issuing)) == bundle
        with pytest.raises(NotFoundError, match="no CA named 'other'"):
            trust_bundle.of_ca(session, "other")
    assert bundle.sha256 == hashlib.sha256(bundle.pem).hexdigest() and bundle.pem.count(b"BEGIN CERTIFICATE") == 2
    with read_session(engine) as session:  # once the issuing CA has expired it is no longer in the bundle
        expired = trust_bundle.of_ca(session, "lab", issuing.not_valid_after_utc + dt.timedelta(seconds=1))
    assert expired.certificates == (root,)


@SQLITE_ONLY
def test_a_certificate_no_certpilot_ca_issued_has_no_bundle(engine: sa.Engine) -> None:
    foreign = make_ca("Foreign Root")
    leaf, _ = issue_leaf(foreign, ["web.example.test"], dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=30))
    with write_session(engine) as session:
        inventory.upsert(session, [inventory.Observation(describe_certificate(c), None, "import")
                                   for c in (foreign.certificate, leaf)], audit.Actor("test"))
    with read_session(engine) as session, pytest.raises(PermanentError) as caught:
        trust_bundle.for_certificate(session, fingerprint_sha256(leaf))
    assert "chains to CN=Foreign Root,O=certpilot sample estate, which is not a certpilot CA's root" in \
        str(caught.value)


@SQLITE_ONLY
def test_ca_bundle_and_ca_distribute_with_no_targets(engine: sa.Engine, tmp_path: Path, no_prefect_api: None) -> None:
    assert runner.invoke(app, ["ca", "init", "lab", "--base-url", "http://pki.lab.test"]).exit_code == 0
    with read_session(engine) as session:
        bundle = trust_bundle.of_ca(session, "lab")
    shown = runner.invoke(app, ["ca", "bundle", "lab"])
    assert shown.exit_code == 0 and shown.stdout.encode() == bundle.pem
    written = runner.invoke(app, ["ca", "bundle", "lab", "-o", str(tmp_path / "lab.pem"), "--json"])
    assert written.exit_code == 0, written.output
    assert (tmp_path / "lab.pem").read_bytes() == bundle.pem
    facts = json.loads(written.stdout)
    assert facts["sha256"] == bundle.sha256 and [c["subject"] for c in facts["certificates"]] == [
        "CN=lab Root CA,O=lab", "CN=lab Issuing CA 1,O=lab"]
    again = runner.invoke(app, ["ca", "bundle", "lab", "-o", str(tmp_path / "lab.pem")])
    assert again.exit_code == 1 and "refusing to overwrite" in again.output

    nothing = runner.invoke(app, ["ca", "distribute", "lab"])
    assert nothing.exit_code == 0, nothing.output
    assert "0 trust-bundle target(s), 0 failed" in nothing.stdout
    assert "no trust-bundle target distributes CA lab's bundle" in nothing.output
    unknown = runner.invoke(app, ["ca", "distribute", "nope"])
    assert unknown.exit_code != 0 and "no CA named 'nope'" in unknown.output and "Traceback" not in unknown.output


@SQLITE_ONLY
def test_a_trust_bundle_target_goes_on_a_private_cas_certificate_only(engine: sa.Engine) -> None:
    from certpilot import managed, targets

    actor = audit.Actor("test")
    with write_session(engine) as session:
        managed.add(session, managed.ManagedSpec(name="www", dns_names=("www.example.test",),
                                                 issuer="acme-issuer/letsencrypt", owner="web"), actor)
        managed.add(session, managed.ManagedSpec(name="api", dns_names=("api.lab.test",), issuer="private-ca/lab",
                                                 profile="mtls", owner="platform"), actor)
    with write_session(engine) as session, pytest.raises(PermanentError) as caught:
        targets.add(session, "www", "trust", "trust-bundle", "ssh-host/web1", {"path": "/etc/ssl/ca.pem"}, actor)
    assert "a trust-bundle target distributes the bundle of the private CA that issues its managed certificate, " \
           "and www is issued by acme-issuer/letsencrypt" in str(caught.value)
    with write_session(engine) as session:
        targets.add(session, "api", "trust", "trust-bundle", "ssh-host/web1", {"path": "/etc/ssl/ca.pem"}, actor)
    with read_session(engine) as session:
        assert [(t.name, t.kind) for t in targets.list_targets(session, "api")] == [("trust", "trust-bundle")]
        assert targets.list_targets(session, "www") == []
