"""A private CA's trust bundle distributed to a host over a real SSH connection (kind trust-bundle): the
file arrives with its mode and owner, is read back and verified against the CA's bundle, is not
rewritten (nor the host's trust store reloaded) when it holds the bundle already, and is replaced when
the CA's issuing certificate changes, after which relying parties holding only that file verify the
certificates of the old issuing CA and of the new one alike (`openssl verify`). A reload that fails
restores the previous bundle; retiring moves it aside and back. The sshd runs on this machine, so the
test reads the host's files directly."""

from __future__ import annotations

import datetime as dt
import grp
import hashlib
import os
import stat
import subprocess
from pathlib import Path

import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from blocks.ssh import SshHostBlock
from blocks.targets import build_deployer
from certpilot import audit, ca, inventory, keystore, managed, name_constraints, renewing, rollout, targets
from certpilot import trust_bundle
from certpilot.database import read_session, write_session
from certpilot.deployment import PermanentDeployError, VerificationError
from certpilot.settings import load_settings
from certpilot.x509info import describe_certificate, fingerprint_sha256
from connectors.private_ca import PrivateCAIssuer
from connectors.ssh_deploy import BACKUP_SUFFIX, RETIRED_SUFFIX
from connectors.ssh_trust_bundle import TrustBundleDeployer
from lab.sshd import SshServer
from tests.integration.ssh.conftest import connect

SQLITE_ONLY = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
ACTOR = audit.Actor("test")
CA_NAME = "mesh"
SPIFFE = "spiffe://prod.example/ns/api/sa/web"


def _ring() -> keystore.KeyRing:
    return keystore.load_key_ring(load_settings())


def _renew(engine: sa.Engine, name: str = "api") -> str:
    """The renewal steps with the private CA (the issuance gate is another helper's: not needed here)."""
    plan = renewing.plan(engine, name)
    key = renewing.new_key(engine, plan, _ring, ACTOR)
    issued = renewing.issue(engine, plan, renewing.new_csr(engine, plan, key, _ring),
                            PrivateCAIssuer(engine, CA_NAME, _ring, actor=ACTOR))
    return renewing.store(engine, plan, issued, key, ACTOR).fingerprint_sha256


def _rotate_issuing(engine: sa.Engine) -> x509.Certificate:
    """A new issuing CA under the same root, made current on the CA's row, the old one left in the
    inventory. certpilot has no rotation command yet: this stands in for one (the root key signs a new
    issuing certificate with the old one's extensions)."""
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    with write_session(engine) as session:
        authority = ca.get_ca(session, CA_NAME)
        root, old = ca.ca_certificates(session, authority)
        assert authority.root_key_id is not None
        root_key = keystore.load_private_key(session, keystore.KeyRef(authority.root_key_id), _ring())
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.ORGANIZATION_NAME, CA_NAME),
                                            x509.NameAttribute(x509.NameOID.COMMON_NAME, f"{CA_NAME} Issuing CA 2")]))
                   .issuer_name(root.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1826))
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
        for extension in old.extensions:
            if not isinstance(extension.value, x509.SubjectKeyIdentifier):
                builder = builder.add_extension(extension.value, extension.critical)
        issuing = builder.sign(root_key, hashes.SHA384())
        ref = keystore.store_private_key(session, key, _ring(), ACTOR, "generated", now)
        inventory.upsert(session, [inventory.Observation(describe_certificate(issuing), None, ca.SOURCE)], ACTOR,
                         now=now)
        authority.issuing_fingerprint, authority.issuing_key_id = fingerprint_sha256(issuing), ref.id
        session.add(authority)
    return issuing


def _lab(engine: sa.Engine, sshd: SshServer, directory: str) -> tuple[Path, Path]:
    """CA mesh (name-constrained), managed certificate api (mtls, a DNS name and a SPIFFE ID) issued once, and a
    directory on the host owned by the SSH user: (the bundle's path, where the reload command writes)."""
    with write_session(engine) as session:
        ca.init_ca(session, _ring(), ACTOR, CA_NAME, "http://pki.lab.test",
                   constraints=name_constraints.parse(["lab.test"], [], ["prod.example"]))
        managed.add(session, managed.ManagedSpec(name="api", dns_names=("api.lab.test",), uris=(SPIFFE,),
                                                 issuer=f"private-ca/{CA_NAME}", profile="mtls", owner="platform"),
                    ACTOR)
    where = sshd.home / directory
    where.mkdir()
    sshd.chown(where)
    return where / "mesh-ca.pem", where / "reloaded"


def _add_target(engine: sa.Engine, name: str, settings: dict[str, object]) -> None:
    with write_session(engine) as session:
        targets.add(session, "api", name, "trust-bundle", "ssh-host/lab", settings, ACTOR)


def _target(engine: sa.Engine, name: str = "trust") -> object:
    with read_session(engine) as session:
        return targets.get_target(session, "api", name)


def _bundle(engine: sa.Engine) -> trust_bundle.TrustBundle:
    with read_session(engine) as session:
        return trust_bundle.of_ca(session, CA_NAME)


def _deploy_bundle(engine: sa.Engine, fingerprint: str):  # noqa: ANN202
    return lambda: targets.bundle(engine, "api", fingerprint, _ring)


def _openssl_verify(bundle_file: Path, leaf: x509.Certificate, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    leaf_file = tmp_path / f"leaf-{leaf.serial_number:x}.pem"
    leaf_file.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    return subprocess.run(["openssl", "verify", "-purpose", "sslclient", "-CAfile", str(bundle_file), str(leaf_file)],
                          capture_output=True, text=True, timeout=30)


def _leaf(engine: sa.Engine, fingerprint: str) -> x509.Certificate:
    with read_session(engine) as session:
        row = inventory.resolve(session, fingerprint)
        return x509.load_der_x509_certificate(row.der)


@SQLITE_ONLY
def test_the_bundle_arrives_is_verified_and_is_replaced_when_the_issuing_ca_changes(
        engine: sa.Engine, sshd: SshServer, tmp_path: Path) -> None:
    path, reloaded = _lab(engine, sshd, "trust-rotation")
    first = _renew(engine)
    group = grp.getgrgid(sshd.gid).gr_name
    _add_target(engine, "trust", {"path": str(path), "owner": sshd.user, "group": group,
                                  "reload_command": f"sha256sum {path} >> {reloaded}"})
    block = SshHostBlock(address=sshd.host, port=sshd.port, user=sshd.user, private_key=sshd.client_private_key,
                         known_hosts=sshd.known_hosts_line)
    with read_session(engine) as session:
        settings = targets.get_target(session, "api", "trust").settings
    deployer = build_deployer(block, "trust", "trust-bundle", settings)  # the registry's path, as a deploy run's
    assert isinstance(deployer, TrustBundleDeployer)
    try:
        outcome = rollout.bring_to(engine, _target(engine), deployer, _deploy_bundle(engine, first), first, ACTOR)
    finally:
        deployer.close()

    before = _bundle(engine)
    assert len(before.certificates) == 2  # the root, then the issuing CA
    assert outcome.action is rollout.Action.DEPLOYED and "holds CA mesh's bundle: 2 certificate(s)" in outcome.detail
    assert path.read_bytes() == before.pem and hashlib.sha256(path.read_bytes()).hexdigest() == before.sha256
    info = path.stat()
    assert stat.S_IMODE(info.st_mode) == 0o644 and (info.st_uid, info.st_gid) == (sshd.uid, sshd.gid)
    assert reloaded.read_text().split()[0] == before.sha256  # the reload ran once, on the new file
    with read_session(engine) as session:
        row = targets.get_target(session, "api", "trust")
        assert (row.desired_fingerprint, row.verified_fingerprint, row.last_error) == (first, first, None)

    with connect(sshd) as ssh:
        again = TrustBundleDeployer("trust", ssh, settings, trust_bundle.source(engine))
        receipt = again.deploy(targets.bundle(engine, "api", first, _ring))  # type: ignore[arg-type]
        assert receipt.undo["changed"] is False  # the file holds it: not rewritten, nothing reloaded
        assert len(reloaded.read_text().splitlines()) == 1 and not Path(str(path) + BACKUP_SUFFIX).exists()

        old_leaf = _leaf(engine, first)
        new_issuing = _rotate_issuing(engine)
        after = _bundle(engine)
        assert [c.subject for c in after.certificates] == [before.certificates[0].subject, new_issuing.subject,
                                                           before.certificates[1].subject]
        with pytest.raises(VerificationError, match=f"{path} on .* does not hold CA mesh's bundle: 3 certificate"):
            again.verify(first)  # the host's file is stale now, and verification says so

    with read_session(engine) as session:
        assert trust_bundle.targets_of_ca(session, CA_NAME) == [trust_bundle.BundleTarget("api", "trust", first)]
    done = trust_bundle.distribute(
        engine, CA_NAME, lambda t: TrustBundleDeployer(t.target, connect(sshd), settings, trust_bundle.source(engine)),
        _ring, ACTOR)
    assert [(d.target.target, d.outcome.action) for d in done] == [("trust", rollout.Action.DEPLOYED)]
    assert path.read_bytes() == after.pem  # replaced, read back and verified
    assert Path(str(path) + BACKUP_SUFFIX).read_bytes() == before.pem
    assert [line.split()[0] for line in reloaded.read_text().splitlines()] == [before.sha256, after.sha256]

    # A relying party holding only the distributed file trusts leaves of the old and of the new issuing CA.
    second = _renew(engine)
    new_leaf = _leaf(engine, second)
    assert new_leaf.issuer == new_issuing.subject and old_leaf.issuer == before.certificates[1].subject
    for leaf in (old_leaf, new_leaf):
        result = _openssl_verify(path, leaf, tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
    stale = tmp_path / "stale.pem"
    stale.write_bytes(before.pem)
    assert _openssl_verify(stale, new_leaf, tmp_path).returncode != 0  # what the old bundle could not do


@SQLITE_ONLY
def test_a_failed_reload_restores_the_previous_bundle_and_a_wrong_owner_changes_nothing(
        engine: sa.Engine, sshd: SshServer) -> None:
    path, _ = _lab(engine, sshd, "trust-faults")
    fingerprint = _renew(engine)
    path.write_bytes(b"# the host's bundle before certpilot\n")
    sshd.chown(path)
    previous = path.read_bytes()
    with connect(sshd) as ssh:
        broken = TrustBundleDeployer("trust", ssh, {"path": str(path), "reload_command": "echo no trust store >&2; "
                                                                                        "exit 3"},
                                     trust_bundle.source(engine))
        with pytest.raises(PermanentDeployError) as caught:
            broken.deploy(targets.bundle(engine, "api", fingerprint, _ring))  # type: ignore[arg-type]
        assert "trust: the reload failed on" in str(caught.value)
        assert "the previous bundle was restored: no trust store" in str(caught.value)
        assert path.read_bytes() == previous

        stranger = TrustBundleDeployer("trust", ssh, {"path": str(path), "owner": "certpilot-nobody-here"},
                                       trust_bundle.source(engine))
        with pytest.raises(PermanentDeployError, match="setting the owner failed on .* was not changed"):
            stranger.deploy(targets.bundle(engine, "api", fingerprint, _ring))  # type: ignore[arg-type]
        assert path.read_bytes() == previous
        assert not [p for p in path.parent.iterdir() if ".certpilot-tmp" in p.name]  # no upload left behind


@SQLITE_ONLY
def test_retiring_moves_the_bundle_aside_and_back_and_a_rollback_restores_it(engine: sa.Engine,
                                                                             sshd: SshServer) -> None:
    path, _ = _lab(engine, sshd, "trust-retire")
    fingerprint = _renew(engine)
    bundle = _bundle(engine)
    with connect(sshd) as ssh:
        deployer = TrustBundleDeployer("trust", ssh, {"path": str(path)}, trust_bundle.source(engine))
        receipt = deployer.deploy(targets.bundle(engine, "api", fingerprint, _ring))  # type: ignore[arg-type]
        assert deployer.verify(fingerprint).method == "read-back"
        deployer.rollback(receipt)  # there was no bundle before: the file goes
        assert not path.exists()

        deployer.deploy(targets.bundle(engine, "api", fingerprint, _ring))  # type: ignore[arg-type]
        removal = deployer.remove()
        assert not path.exists() and Path(str(path) + RETIRED_SUFFIX).read_bytes() == bundle.pem
        assert deployer.restore(removal) == "1 file(s) moved back"
        assert path.read_bytes() == bundle.pem and deployer.verify(fingerprint).fingerprint == fingerprint
        removal = deployer.remove()
        deployer.purge(removal)
        assert not path.exists() and not Path(str(path) + RETIRED_SUFFIX).exists()
    assert os.listdir(path.parent) == []
