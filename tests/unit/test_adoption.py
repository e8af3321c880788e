"""Adoption proposals from the places discovery records (certpilot.adoption), with real certificates and
Location rows written the way discovery writes them: haproxy with and without an admin socket, a file no
configuration names, an imported and an Amazon-issued ACM certificate, a Key Vault certificate, a TLS
endpoint and a ghost; the key type mapped; a key in the keystore reported; adopting links the certificate."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding

from certpilot import adoption, audit, discovery, inventory, keystore, managed, targets
from certpilot.database import read_session, write_session
from certpilot.discovery import Found
from certpilot.errors import PermanentError
from certpilot.models import Location, SourceRun
from certpilot.sample_estate import Authority, issue_leaf
from certpilot.settings import load_settings

ACTOR = audit.Actor("test")
NAMES = ["shop.example.test", "*.shop.example.test"]


def _record(engine: sa.Engine, found: list[Found], source: str, block: str | None) -> None:
    with write_session(engine) as session:
        inventory.upsert(session, [o for f in found for o in discovery.observations(f, source)], ACTOR,
                         owner="payments", tags={"env": "prod"})
        session.add(SourceRun(source=source, block=block))


@pytest.fixture
def leaf(ca: tuple[Authority, Authority]) -> Any:
    return issue_leaf(ca[1], NAMES, dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=30),
                      key=rsa.generate_private_key(public_exponent=65537, key_size=3072))


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_proposal_from_every_kind_of_place(engine: sa.Engine, leaf: Any, ca: tuple[Authority, Authority]) -> None:
    cert, key = leaf
    der = (cert.public_bytes(Encoding.DER),)
    ssh = "ssh://deploy@10.0.0.5:22"
    haproxy = {"server": "haproxy", "config": "/etc/haproxy/haproxy.cfg", "certificate_path": "/etc/haproxy/certs",
               "key_path": None, "listen": [":443"], "server_names": [], "runtime_socket": "/run/haproxy/admin.sock"}
    _record(engine, [
        Found(der, f"{ssh}/etc/haproxy/certs/shop.pem", {"path": "/etc/haproxy/certs/shop.pem",
                                                         "key_path": "/etc/haproxy/certs/shop.pem",
                                                         "served_by": [haproxy]}),
        Found(der, f"{ssh}/etc/haproxy/old.pem", {
            "path": "/etc/haproxy/old.pem", "key_path": "/etc/haproxy/old.pem",
            "served_by": [{**haproxy, "certificate_path": "/etc/haproxy/old.pem", "runtime_socket": None,
                           "listen": ["10.0.0.5:8443"]}]}),
        Found(der, f"{ssh}/srv/tls/shop.crt", {"path": "/srv/tls/shop.crt", "key_path": "/srv/tls/shop.key"}),
    ], "ssh:web1", "ssh-host/web1")
    _record(engine, [Found(der, "aws-acm://eu-west-1/arn:aws:acm:eu-west-1:1:certificate/a",
                           {"arn": "arn:aws:acm:eu-west-1:1:certificate/a", "type": "IMPORTED"}),
                     Found(der, "aws-acm://eu-west-1/arn:aws:acm:eu-west-1:1:certificate/b",
                           {"arn": "arn:aws:acm:eu-west-1:1:certificate/b", "type": "AMAZON_ISSUED"})],
            "aws:prod", "aws-account/prod")
    _record(engine, [Found(der, "azure-kv://vault.test/shop/v1", {"name": "shop", "version": "v1", "current": True})],
            "azure-kv:vault.test", "azure-key-vault/vault")
    _record(engine, [Found(der, "tls://10.0.0.5:443?sni=shop.example.test"),
                     Found(der, "tls://10.0.0.9:443?sni=shop.example.test")], "tls-scan:lab", None)
    with write_session(engine) as session:
        session.execute(sa.update(Location).where(Location.locator == "tls://10.0.0.9:443?sni=shop.example.test")
                        .values(ghost=True))
        keystore.store_private_key(session, key, keystore.load_key_ring(load_settings()), ACTOR, "discovered")

    with read_session(engine) as session:
        proposal = adoption.propose(session, cert.fingerprint(hashes.SHA256()).hex()[:12])
    assert (proposal.dns_names, proposal.key_algorithm, proposal.owner, proposal.tags) == (
        ("*.shop.example.test", "shop.example.test"), "rsa-3072", "payments", {"env": "prod"})
    assert proposal.key is not None and proposal.key.startswith("key:")
    found = {t.name: t for t in proposal.targets}
    assert sorted(found) == ["prod-acm", "prod-acm-2", "vault.test-shop", "web1-file", "web1-haproxy",
                             "web1-haproxy-2"]
    shop = found["web1-haproxy"]
    assert (shop.kind, shop.block, shop.ready) == ("ssh-haproxy", "ssh-host/web1", True)
    assert shop.settings == {"pem_path": "/etc/haproxy/certs/shop.pem", "verify_port": 443,
                             "verify_sni": "shop.example.test", "runtime_socket": "/run/haproxy/admin.sock"}
    old = found["web1-haproxy-2"]
    assert not old.ready and old.needs[0].startswith("runtime_socket | reload_command:")
    assert old.settings["verify_host"] == "10.0.0.5" and old.settings["verify_port"] == 8443
    assert old.with_settings({"reload_command": "systemctl reload haproxy"}).ready
    unknown = found["web1-file"]
    assert unknown.kind is None and not unknown.ready and "perhaps ssh-nginx" in unknown.why
    assert unknown.settings == {"certificate_path": "/srv/tls/shop.crt", "key_path": "/srv/tls/shop.key"}
    acm = [t for t in proposal.targets if t.kind == "aws-acm"]
    assert [(t.settings["certificate_arn"][-1], t.ready, t.block) for t in acm] == [
        ("a", True, "aws-account/prod"), ("b", False, "aws-account/prod")]
    assert "AMAZON_ISSUED certificate cannot be re-imported" in acm[1].needs[0]
    [vault] = [t for t in proposal.targets if t.kind == "azure-kv"]
    assert (vault.settings, vault.block, vault.ready) == ({"certificate_name": "shop"}, "azure-key-vault/vault", True)
    assert proposal.seen_at == ("tls://10.0.0.5:443?sni=shop.example.test",)
    assert any("no longer sees it" in n and "10.0.0.9" in n for n in proposal.notes)

    with write_session(engine) as session:
        adopted = adoption.adopt(session, proposal.fingerprint, "shop", "acme-issuer/le", proposal.targets, ACTOR)
    assert sorted(adopted.targets) == ["prod-acm", "vault.test-shop", "web1-haproxy"]
    assert len(adopted.skipped) == 3 and adopted.key == proposal.key
    with read_session(engine) as session:
        row = managed.get(session, "shop")
        assert (row.key_algorithm, row.owner, row.tags) == ("rsa-3072", "payments", {"env": "prod"})
        assert managed.current_certificate(session, row).fingerprint_sha256 == proposal.fingerprint
        assert {t.name: t.desired_fingerprint for t in targets.list_targets(session, "shop")} == dict.fromkeys(
            adopted.targets, proposal.fingerprint)
        with pytest.raises(PermanentError, match="already managed, as shop"):
            adoption.propose(session, proposal.fingerprint)



@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_the_owner_is_the_certificates_else_the_ownership_rules_else_required(
        engine: sa.Engine, ca: tuple[Authority, Authority]) -> None:
    """A discovered certificate with no owner takes the first ownership rule matching where it was seen;
    with no rule matching, adoption is refused (nothing written) unless the operator names one."""
    from certpilot.models import ManagedCertificate
    from certpilot.policy import parse_policy

    now = dt.datetime.now(dt.timezone.utc)
    fingerprints = {}
    for name, source in (("edge.example.test", "tls-scan:dmz"), ("lone.example.test", "tls-scan:lab")):
        cert, _ = issue_leaf(ca[1], [name], now + dt.timedelta(days=30))
        with write_session(engine) as session:  # as a TLS scan records it: no owner
            inventory.upsert(session, discovery.observations(
                Found((cert.public_bytes(Encoding.DER),), f"tls://10.0.0.7:443?sni={name}"), source), ACTOR)
        fingerprints[name] = cert.fingerprint(hashes.SHA256()).hex()
    policy = parse_policy("ownership:\n  - match: {source: 'tls-scan:dmz'}\n    owner: edge-team\n", "test.yaml")

    with read_session(engine) as session:
        edge = adoption.propose(session, fingerprints["edge.example.test"], policy=policy)
        lone = adoption.propose(session, fingerprints["lone.example.test"], policy=policy)
    assert edge.owner == "edge-team"
    assert "owner edge-team from the policy's ownership rule at test.yaml:2 (the certificate has none)" in edge.notes
    assert lone.owner is None
    assert ("it has no owner and no ownership rule of the policy matches it: give one (--owner), a managed "
            "certificate must have an owner") in lone.notes

    with write_session(engine) as session:
        adoption.adopt(session, edge.fingerprint, "edge", "private-ca/corp", (), ACTOR, policy=policy)
    with pytest.raises(PermanentError, match=r"managed certificate 'lone' needs an owner: certificate [0-9a-f]{16} "
                                             r"has none and no ownership rule of the policy \(test.yaml\) matches it; "
                                             "give --owner"):
        with write_session(engine) as session:
            adoption.adopt(session, lone.fingerprint, "lone", "private-ca/corp", (), ACTOR, policy=policy)
    with write_session(engine) as session:
        adoption.adopt(session, lone.fingerprint, "lone", "private-ca/corp", (), ACTOR, owner="lab-team", policy=policy)
    with read_session(engine) as session:
        owners = {m.name: m.owner for m in session.exec(sa.select(ManagedCertificate)).scalars()}
    assert owners == {"edge": "edge-team", "lone": "lab-team"}
