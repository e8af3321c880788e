"""Discovery over a real SSH connection: globs with `**`, PEM, DER and PKCS#12 files (with and without
a password), keys paired with their certificates by public key and returned only when asked for,
and a Problem for each garbage, oversized, password-locked or unreadable file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from certpilot.discovery import Found, Problem, split
from certpilot.sample_estate import key_pem, pem
from certpilot.x509info import spki_sha256
from connectors.ssh import SshConnection
from connectors.ssh_source import SshSource
from lab.sshd import SshServer
from tests.integration.ssh.conftest import Pki

DER = serialization.Encoding.DER


@pytest.fixture(scope="module")
def estate(sshd: SshServer, pki: Pki) -> dict[str, object]:
    """Files as an operator leaves them, owned by the SSH user; ``expect`` maps names to what they hold."""
    root = sshd.home / "estate"
    web_cert, web_key = pki.leaf("web.test")
    nested_cert, _ = pki.leaf("nested.test")
    lb_cert, lb_key = pki.leaf("lb.test")
    p12_cert, p12_key = pki.leaf("p12.test")
    locked_cert, locked_key = pki.leaf("locked.test")
    files: dict[str, tuple[bytes, int]] = {
        "web/site.fullchain.pem": (pem(web_cert, pki.issuing.certificate), 0o644),
        "web/site.key": (key_pem(web_key), 0o600),
        "web/nested/deep/nested.crt": (pem(nested_cert), 0o644),
        "lb/combined.pem": (pem(lb_cert, pki.issuing.certificate) + key_pem(lb_key), 0o600),
        "ca/root.der": (pki.root.certificate.public_bytes(DER), 0o644),
        "p12/plain.p12": (pkcs12.serialize_key_and_certificates(
            b"plain", p12_key, p12_cert, None, serialization.NoEncryption()), 0o600),  # type: ignore[arg-type]
        "p12/locked.p12": (pkcs12.serialize_key_and_certificates(
            b"locked", locked_key, locked_cert, [pki.issuing.certificate],  # type: ignore[arg-type]
            serialization.BestAvailableEncryption(b"s3cret")), 0o600),
        "p12/other.p12": (pkcs12.serialize_key_and_certificates(
            b"other", locked_key, locked_cert, None,  # type: ignore[arg-type]
            serialization.BestAvailableEncryption(b"not-configured")), 0o600),
        "junk/garbage.pem": (b"this is not a certificate\n" * 4, 0o644),
        "junk/truncated.pem": (pem(web_cert)[:300], 0o644),
        "junk/huge.pem": (pem(web_cert) * 60, 0o644),  # about 40 KiB: over the test's 16 KiB limit
        "web/.site.fullchain.pem.certpilot-tmp-0badf00d": (pem(web_cert)[:100], 0o600),  # left by a cut upload
    }
    for name, (data, mode) in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(mode)
    locked_dir = root / "locked-dir"
    locked_dir.mkdir()
    (locked_dir / "secret.pem").write_bytes(pem(web_cert))
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            sshd.chown(Path(dirpath) / name)
    sshd.chown(root)
    if os.geteuid() == 0:
        os.chown(locked_dir, 0, 0)
    locked_dir.chmod(0o700)  # the SSH user cannot list it
    return {"root": root, "web": (web_cert, web_key), "lb": (lb_cert, lb_key), "p12": (p12_cert, p12_key),
            "locked": (locked_cert, locked_key)}


def source(ssh: SshConnection, root: Path, **kwargs: object) -> SshSource:
    globs = [f"{root}/**/*.pem", f"{root}/**/*.crt", f"{root}/**/*.der", f"{root}/**/*.p12", f"{root}/**/*.key"]
    options: dict[str, object] = {"alias": "lab", "max_file_bytes": 16 * 1024}
    options.update(kwargs)
    return SshSource(ssh, globs, **options)  # type: ignore[arg-type]


def by_path(found: list[Found], root: Path) -> dict[str, Found]:
    return {str(item.details["path"]).removeprefix(f"{root}/"): item for item in found}


def test_discovery_finds_formats_pairs_keys_and_reports_problems(
        estate: dict[str, object], ssh: SshConnection, sshd: SshServer, pki: Pki) -> None:
    root = estate["root"]
    assert isinstance(root, Path)
    found, problems = split(source(ssh, root).discover())
    files = by_path(found, root)

    assert sorted(files) == ["ca/root.der", "lb/combined.pem", "p12/plain.p12", "web/nested/deep/nested.crt",
                             "web/site.fullchain.pem"]
    web = files["web/site.fullchain.pem"]
    assert web.locator == f"ssh://{sshd.user}@127.0.0.1:{sshd.port}{root}/web/site.fullchain.pem"
    web_cert, web_key = estate["web"]  # type: ignore[misc]
    assert web.certificates == (web_cert.public_bytes(DER), pki.issuing.certificate.public_bytes(DER))
    assert web.details["key_path"] == f"{root}/web/site.key" and web.details["key_mode"] == "0600"
    assert web.details["format"] == "pem" and web.details["mode"] == "0644"
    assert files["lb/combined.pem"].details["key_path"] == f"{root}/lb/combined.pem"
    assert files["p12/plain.p12"].details["format"] == "pkcs12"
    assert files["p12/plain.p12"].details["key_path"] == f"{root}/p12/plain.p12"
    assert files["ca/root.der"].details["format"] == "der" and "key_path" not in files["ca/root.der"].details
    assert "key_path" not in files["web/nested/deep/nested.crt"].details
    assert all(item.key is None for item in found)  # keys stay on the host unless asked for
    assert all(".certpilot-tmp-" not in item.locator for item in found)

    reasons = {p.locator.removeprefix(f"ssh://{sshd.user}@127.0.0.1:{sshd.port}{root}/"): p.reason for p in problems}
    assert len(reasons) == len(problems)  # one Problem per place, however many globs met it
    assert set(reasons) == {"p12/locked.p12", "p12/other.p12", "junk/garbage.pem", "junk/truncated.pem",
                            "junk/huge.pem", "locked-dir"}
    assert "password is needed" in reasons["p12/locked.p12"]
    assert "neither PEM nor DER" in reasons["junk/garbage.pem"]
    assert "over the limit of 16384" in reasons["junk/huge.pem"]
    assert "permission denied" in reasons["locked-dir"]


def test_pkcs12_passwords_open_what_they_can_and_keys_come_back_only_when_asked(
        estate: dict[str, object], ssh: SshConnection) -> None:
    root = estate["root"]
    assert isinstance(root, Path)
    found, problems = split(source(ssh, root, import_keys=True, pkcs12_passwords=["wrong", "s3cret"]).discover())
    files = by_path(found, root)
    locked_cert, locked_key = estate["locked"]  # type: ignore[misc]
    assert files["p12/locked.p12"].certificates[0] == locked_cert.public_bytes(DER)
    assert len(files["p12/locked.p12"].certificates) == 2
    other = [p for p in problems if p.locator.endswith("/p12/other.p12")]
    assert len(other) == 1 and "none of the 2 configured password(s) opens it" in other[0].reason
    for name, pair in (("web/site.fullchain.pem", "web"), ("lb/combined.pem", "lb"), ("p12/plain.p12", "p12"),
                       ("p12/locked.p12", "locked")):
        cert, key = estate[pair]  # type: ignore[misc]
        returned = files[name].key
        assert returned is not None and spki_sha256(returned.public_key()) == spki_sha256(cert.public_key())
    assert files["ca/root.der"].key is None
    assert "s3cret" not in repr(problems) and "s3cret" not in repr(found)


def test_limits_bound_the_walk(estate: dict[str, object], ssh: SshConnection) -> None:
    root = estate["root"]
    assert isinstance(root, Path)
    items = list(SshSource(ssh, [f"{root}/**/*.pem"], max_files=2).discover())
    found, problems = split(items)
    assert len(found) <= 2
    assert any("more than 2 files match" in p.reason for p in problems)
    assert all(isinstance(i, (Found, Problem)) for i in items)
    relative = list(SshSource(ssh, ["etc/*.pem"]).discover())
    assert len(relative) == 1 and "must be an absolute path" in relative[0].reason  # type: ignore[union-attr]


def test_source_name(ssh: SshConnection) -> None:
    assert SshSource(ssh, [], alias="web1").name == "ssh:web1"
    assert SshSource(ssh, []).name == "ssh:127.0.0.1"
