"""The ``certpilot`` command line, on SQLite and PostgreSQL.

Most commands run in-process through typer's CliRunner against ``cli.main.app``; the few that
are about what an operator sees when the command fails (messages printed by ``main``), and reading a
real stdin pipe, run ``python -m cli`` in a subprocess.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from click.testing import Result
from typer.testing import CliRunner

from certpilot import audit, keystore
from cli.main import app
from certpilot.database import write_session
from certpilot.importer import ImportOptions, import_paths
from certpilot.keys import public_key_sha256
from certpilot.models import Certificate, ManagedCertificate
from certpilot.pem import read_pem_blocks
from certpilot.sample_estate import Authority, issue_leaf, key_pem, make_ca, pem, write_estate
from certpilot.settings import load_settings

LEGACY = "web-2/etc/nginx/ssl/legacy.pem"
TRUNCATED = "PEM block 'CERTIFICATE' at line 1 has no END line (truncated?)"
LIST_KEYS = {"fingerprint_sha256", "subject", "issuer", "serial", "not_before", "not_after", "sans", "key_type",
             "key_size", "signature_algorithm", "owner", "tags", "status", "locations"}
ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


def _fp(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def _cn(cert: x509.Certificate) -> str:
    return cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value  # type: ignore[return-value]


@dataclass
class Estate:
    root: Path  # the sample estate (one broken file)
    extra: Path  # extra certificates: 6 hours left, an IDN name, an extra CA
    owned: Path  # two certificates imported with an owner and tags
    good: Path  # a directory where every file imports
    certs: dict[str, x509.Certificate]  # common name -> certificate, for every certificate written
    keys: dict[str, Any]  # common name -> private key, where the key is in the estate
    extra_ca: Authority
    colliding: tuple[x509.Certificate, x509.Certificate]  # two certificates whose fingerprints share 4 hex digits


def _colliding_pair(ca: Authority) -> tuple[x509.Certificate, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    seen: dict[str, x509.Certificate] = {}
    for n in range(20000):
        cert = issue_leaf(ca, [f"twin{n}.collide.test"], now + dt.timedelta(days=300), now=now, key=key)[0]
        prefix = _fp(cert)[:4]
        if prefix in seen:
            return seen[prefix], cert
        seen[prefix] = cert
    raise AssertionError("no fingerprint prefix collision")


@pytest.fixture(scope="module")
def estate(tmp_path_factory: pytest.TempPathFactory) -> Estate:
    base = tmp_path_factory.mktemp("cli-estate")
    root = base / "estate"
    write_estate(root)
    certs: dict[str, x509.Certificate] = {}
    keys: dict[str, Any] = {}
    for path in sorted(root.rglob("*")):
        if path.suffix in (".pem", ".key") and path.name != "legacy.pem":
            for block in read_pem_blocks(path.read_bytes()):
                if block.label == "CERTIFICATE":
                    cert = x509.load_der_x509_certificate(block.der)
                    certs[_cn(cert)] = cert
                elif "PRIVATE KEY" in block.label:
                    key = serialization.load_pem_private_key(block.text.encode(), None)
                    name = next(n for n, c in certs.items() if public_key_sha256(key) == _spki(c))
                    keys[name] = key
    certs["Sample Root CA"] = x509.load_der_x509_certificate((root / "pki/ca/root.der").read_bytes())

    now = dt.datetime.now(dt.timezone.utc)
    extra_ca = make_ca("Extra CA")
    extra, owned, good = base / "extra", base / "owned", base / "good"
    for d in (extra, owned, good):
        d.mkdir()
    soon, soon_key = issue_leaf(extra_ca, ["soon.example.test"], now + dt.timedelta(hours=6))
    idn, _ = issue_leaf(extra_ca, ["xn--bcher-kva.example.test", "www.xn--bcher-kva.example.test"],
                        now + dt.timedelta(days=100))
    (extra / "soon.pem").write_bytes(pem(soon) + key_pem(soon_key))
    (extra / "idn.pem").write_bytes(pem(idn, extra_ca.certificate))
    owned1, _ = issue_leaf(extra_ca, ["pay.example.test"], now + dt.timedelta(days=60))
    owned2, _ = issue_leaf(extra_ca, ["pay-stage.example.test"], now + dt.timedelta(days=20))
    (owned / "pay.pem").write_bytes(pem(owned1))
    (owned / "pay-stage.der").write_bytes(owned2.public_bytes(serialization.Encoding.DER))
    g1, _ = issue_leaf(extra_ca, ["good1.example.test"], now + dt.timedelta(days=50))
    g2, _ = issue_leaf(extra_ca, ["good2.example.test"], now + dt.timedelta(days=51))
    (good / "one.pem").write_bytes(pem(g1, extra_ca.certificate))
    (good / "two.der").write_bytes(g2.public_bytes(serialization.Encoding.DER))
    for cert in (soon, idn, owned1, owned2, g1, g2, extra_ca.certificate):
        certs[_cn(cert)] = cert
    keys["soon.example.test"] = soon_key
    return Estate(root, extra, owned, good, certs, keys, extra_ca, _colliding_pair(extra_ca))


def _spki(cert: x509.Certificate) -> str:
    from certpilot.x509info import spki_sha256
    return spki_sha256(cert.public_key())


def _import(engine: sa.Engine, paths: list[Path], **options: Any) -> None:
    import_paths(engine, [str(p) for p in paths], ImportOptions(**options), audit.Actor("test:setup"),
                 key_ring=lambda: keystore.load_key_ring(load_settings()))


@pytest.fixture
def inventory(engine: sa.Engine, estate: Estate) -> Estate:
    """The estate imported (keys too), the owned certificates labelled, and svc06 managed."""
    _import(engine, [estate.root, estate.extra], import_keys=True)
    _import(engine, [estate.owned / "pay.pem"], owner="payments", tags={"env": "prod", "team": "pay"})
    _import(engine, [estate.owned / "pay-stage.der"], owner="payments", tags={"env": "stage"})
    with write_session(engine) as session:
        managed = ManagedCertificate(name="svc06", dns_names=["svc06.example.test"], issuer="test-ca",
                                     created_at=dt.datetime.now(dt.timezone.utc))
        session.add(managed)
        session.flush()
        session.execute(sa.update(Certificate).where(Certificate.fingerprint_sha256 == _fp(estate.certs["svc06.example.test"]))
                        .values(managed_certificate_id=managed.id))
    return estate


def cli(*args: str, input: bytes | str | None = None) -> Result:
    return CliRunner().invoke(app, list(args), input=input)


def flat(text: str) -> str:
    """Rich's boxes and line wrapping removed: the words as one line."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def run_cli(*args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "cli", *args], input=input, capture_output=True,
                          env=env, timeout=60, check=False)


def listed(*args: str) -> list[dict[str, Any]]:
    result = cli("inventory", "list", "--json", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def names(rows: list[dict[str, Any]]) -> list[str]:
    return [re.search(r"CN=([^,]+)", r["subject"]).group(1) for r in rows]  # type: ignore[union-attr]


# ------------------------------------------------------------------------------------------ import

def test_import_reports_each_file_and_exits_0_when_all_import(engine: sa.Engine, estate: Estate) -> None:
    result = cli("inventory", "import", str(estate.good))
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines == [
        f"imported {estate.good / 'one.pem'}: 2 certificate(s), 2 new",
        f"imported {estate.good / 'two.der'}: 1 certificate(s), 1 new",
        "2 file(s): 3 certificate(s), 3 new, 0 key(s) stored, 0 file(s) failed",
    ]
    # Again: nothing new, still success.
    result = cli("inventory", "import", str(estate.good / "one.pem"), "--json")
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    assert report["summary"] == {"files": 1, "failed": 0, "certificates": 2, "new_certificates": 0, "keys_stored": 0}
    assert report["files"] == [{"source": str(estate.good / "one.pem"), "status": "imported",
                                "certificates": [_fp(estate.certs["good1.example.test"]), _fp(estate.extra_ca.certificate)],
                                "new_certificates": 0, "keys_found": 0, "keys_stored": 0, "error": None, "notes": []}]
    assert not (load_settings().master_key_file).exists()  # no key was stored, so no master key was made


def test_import_exits_1_on_any_failure_and_imports_the_rest(engine: sa.Engine, estate: Estate) -> None:
    missing = estate.root / "no-such-file.pem"
    result = cli("inventory", "import", str(estate.root), str(missing))
    assert result.exit_code == 1
    out = result.stdout
    assert f"FAILED   {estate.root / LEGACY}: {TRUNCATED}" in out
    assert f"FAILED   {missing}: no such file or directory" in out
    assert f"imported {estate.root / 'pki/ca/root.der'}: 1 certificate(s)" in out
    assert "note: 1 private key(s) found and not stored (import with --import-keys to store them encrypted)" in out
    assert out.splitlines()[-1] == "49 file(s): 11 certificate(s), 11 new, 0 key(s) stored, 2 file(s) failed"
    assert len(listed()) == 11

    quiet = cli("inventory", "import", "--quiet", str(estate.root))
    assert quiet.exit_code == 1
    assert quiet.stdout.splitlines() == [
        f"FAILED   {estate.root / LEGACY}: {TRUNCATED}",
        "48 file(s): 11 certificate(s), 0 new, 0 key(s) stored, 1 file(s) failed"]

    as_json = cli("inventory", "import", "--json", str(estate.root / "web-2"))
    assert as_json.exit_code == 1
    report = json.loads(as_json.stdout)
    failed = [f for f in report["files"] if f["status"] == "failed"]
    assert [Path(f["source"]).name for f in failed] == ["legacy.pem"] and report["summary"]["failed"] == 1


def test_import_keys_and_skipped_files(engine: sa.Engine, estate: Estate, tmp_path: Path) -> None:
    (tmp_path / "pub.pem").write_bytes(estate.keys["svc01.example.test"].public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    result = cli("inventory", "import", str(tmp_path / "pub.pem"))
    assert result.exit_code == 0
    assert f"skipped  {tmp_path / 'pub.pem'}: 0 certificate(s), 0 new" in result.stdout
    assert "note: ignored PEM block 'PUBLIC KEY' at line 1" in result.stdout

    result = cli("inventory", "import", "--import-keys", str(estate.root / "lb-1"))
    assert result.exit_code == 0, result.output
    svc03 = estate.root / "lb-1/etc/haproxy/certs/svc03.pem"
    assert f"imported {svc03}: 2 certificate(s), 1 new, 1 key(s), 1 stored" in result.stdout
    assert result.stdout.splitlines()[-1].endswith("9 key(s) stored, 0 file(s) failed")
    assert "created master key file" in flat(result.stderr)


def test_import_from_stdin(engine: sa.Engine, estate: Estate) -> None:
    leaf = estate.certs["svc02.example.test"]
    issuing = estate.certs["Sample Issuing CA"]
    proc = run_cli("inventory", "import", "-", input=pem(leaf, issuing))
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().splitlines() == ["imported -: 2 certificate(s), 2 new",
                                                 "1 file(s): 2 certificate(s), 2 new, 0 key(s) stored, 0 file(s) failed"]
    shown = json.loads(cli("inventory", "show", _fp(leaf), "--json").stdout)
    assert shown["locations"] == []  # stdin is not a place the certificate lives
    assert [e["action"] for e in shown["history"]] == ["certificate.added"]

    # Standard input beside files, and bad input on stdin: exit 1, named "-".
    result = cli("inventory", "import", "-", str(estate.good / "two.der"), input=b"not a certificate at all\n")
    assert result.exit_code == 1
    assert "FAILED   -: not a certificate, key or bundle: neither PEM nor DER" in result.stdout
    assert f"imported {estate.good / 'two.der'}: 1 certificate(s), 1 new" in result.stdout


def test_import_owner_and_tags(engine: sa.Engine, estate: Estate) -> None:
    result = cli("inventory", "import", str(estate.good), "--owner", "alice", "--tag", "env=prod", "--tag", "team=web")
    assert result.exit_code == 0, result.output
    rows = listed()
    assert len(rows) == 3
    assert {(r["owner"], json.dumps(r["tags"], sort_keys=True)) for r in rows} == {("alice", '{"env": "prod", "team": "web"}')}
    # Relabel one file's certificates: tags merge, the owner changes.
    assert cli("inventory", "import", str(estate.good / "two.der"), "--owner", "bob", "--tag", "env=stage").exit_code == 0
    by_name = dict(zip(names(listed()), listed()))
    assert by_name["good2.example.test"]["owner"] == "bob"
    assert by_name["good2.example.test"]["tags"] == {"env": "stage", "team": "web"}
    assert by_name["good1.example.test"]["owner"] == "alice"

    bad = cli("inventory", "import", str(estate.good), "--tag", "novalue")
    assert bad.exit_code == 2
    assert "Invalid value for --tag: 'novalue' is not key=value" in flat(bad.stderr)


# ------------------------------------------------------------------------------------------ list

def test_list_json_shape(inventory: Estate) -> None:
    rows = listed()
    assert len(rows) == 11 + 5  # the sample estate; the extra CA, the IDN, six-hour and two owned certificates
    for row in rows:
        assert LIST_KEYS <= set(row), LIST_KEYS - set(row)
        assert ISO_Z.match(row["not_after"]) and ISO_Z.match(row["not_before"])
        assert dt.datetime.fromisoformat(row["not_after"].replace("Z", "+00:00")).tzinfo is not None
        assert re.fullmatch(r"[0-9a-f]{64}", row["fingerprint_sha256"])
        assert isinstance(row["sans"], list) and isinstance(row["tags"], dict) and isinstance(row["locations"], list)
        for loc in row["locations"]:
            assert loc["locator"].startswith("file:///") and ISO_Z.match(loc["first_seen"])
    assert [r["not_after"] for r in rows] == sorted(r["not_after"] for r in rows)  # soonest expiry first
    svc03 = next(r for r in rows if r["fingerprint_sha256"] == _fp(inventory.certs["svc03.example.test"]))
    assert svc03["subject"] == "CN=svc03.example.test,O=certpilot sample estate"
    assert svc03["issuer"] == "CN=Sample Issuing CA,O=certpilot sample estate"
    assert int(svc03["serial"], 16) == inventory.certs["svc03.example.test"].serial_number
    assert svc03["sans"] == ["DNS:svc03.example.test", "DNS:www.svc03.example.test"]
    assert (svc03["key_type"], svc03["key_size"], svc03["signature_algorithm"]) == ("EC", 256, "ecdsa-with-SHA256")
    assert svc03["status"] == "active" and svc03["owner"] is None and svc03["tags"] == {}
    assert len(svc03["locations"]) == 3  # two web hosts and the load balancer


def test_list_filters(inventory: Estate) -> None:
    assert names(listed("--expiring-within", "30d")) == [
        "soon.example.test", "svc01.example.test", "svc02.example.test", "svc03.example.test",
        "pay-stage.example.test", "svc04.example.test"]
    assert names(listed("--expiring-within", "12h")) == ["soon.example.test"]
    assert names(listed("--expiring-within", "1d12h")) == ["soon.example.test"]
    assert names(listed("--expired")) == ["svc00.example.test"]
    assert names(listed("--status", "expired")) == ["svc00.example.test"]
    active = listed("--status", "active")
    assert len(active) == 15 and "svc00.example.test" not in names(active)
    assert {r["status"] for r in active} == {"active"}
    assert listed("--expired")[0]["status"] == "expired"

    assert len(listed("--issuer", "sample ISSUING")) == 9  # case-insensitive substring
    assert set(names(listed("--issuer", "CN=Extra CA"))) == {"soon.example.test", "xn--bcher-kva.example.test",
                                                            "pay.example.test", "pay-stage.example.test", "Extra CA"}
    assert listed("--issuer", "%") == []  # LIKE wildcards are text, not patterns

    assert names(listed("--san", "svc03.example.test")) == ["svc03.example.test"]
    assert names(listed("--san", "SVC03.example.test")) == ["svc03.example.test"]
    assert names(listed("--san", "svc03.example")) == []  # exact, not a substring
    assert names(listed("--san", ".svc03.example.test")) == ["svc03.example.test"]  # www.svc03...
    assert len(listed("--san", ".example.test")) == 13  # every leaf
    assert names(listed("--san", "bücher.example.test")) == ["xn--bcher-kva.example.test"]  # U-label -> A-label
    assert names(listed("--san", ".bücher.example.test")) == ["xn--bcher-kva.example.test"]
    assert names(listed("--san", "xn--bcher-kva.example.test")) == ["xn--bcher-kva.example.test"]

    assert names(listed("--owner", "payments")) == ["pay-stage.example.test", "pay.example.test"]
    assert listed("--owner", "nobody") == []
    assert names(listed("--tag", "env=prod")) == ["pay.example.test"]
    assert names(listed("--tag", "env=stage")) == ["pay-stage.example.test"]
    assert names(listed("--tag", "env=prod", "--tag", "team=pay")) == ["pay.example.test"]
    assert listed("--tag", "env=prod", "--tag", "team=other") == []
    assert names(listed("--owner", "payments", "--expiring-within", "30d")) == ["pay-stage.example.test"]

    unmanaged = names(listed("--unmanaged"))
    assert len(unmanaged) == 15 and "svc06.example.test" not in unmanaged
    assert names(listed("--limit", "2")) == ["svc00.example.test", "soon.example.test"]


def test_list_table(inventory: Estate) -> None:
    result = cli("inventory", "list", "--expiring-within", "7d")
    assert result.exit_code == 0
    for name in ("soon.example.test", "svc01.example.test", "svc02.example.test"):
        assert _fp(inventory.certs[name])[:12] in result.stdout
    assert result.stdout.splitlines()[-1] == "3 certificate(s)"


@pytest.mark.parametrize("value", ["30x", "soon", "-5d", "30 days", "d"])
def test_list_bad_expiring_within_is_a_usage_error(engine: sa.Engine, value: str) -> None:
    result = cli("inventory", "list", "--expiring-within", value)
    assert result.exit_code == 2
    assert (f"Invalid value for --expiring-within: {value!r} is not a duration: use a number and a unit, "
            "e.g. 30d, 12h, 90m, 2w, 1d12h") in flat(result.stderr)
    assert result.stdout == ""


def test_list_bad_status_is_a_usage_error(engine: sa.Engine) -> None:
    result = cli("inventory", "list", "--status", "bogus")
    assert result.exit_code == 2
    assert "Invalid value for '--status'" in flat(result.stderr)
    assert "'bogus' is not one of 'active', 'superseded', 'revoked', 'expired'" in flat(result.stderr)


# ------------------------------------------------------------------------------------------ show

def test_show_by_unique_prefix(inventory: Estate) -> None:
    leaf = inventory.certs["svc04.example.test"]
    fp = _fp(leaf)
    for ident in (fp, fp[:10], fp[:10].upper(), ":".join(fp[i:i + 2] for i in range(0, 16, 2))):
        result = cli("inventory", "show", ident, "--json")
        assert result.exit_code == 0, (ident, result.output)
        assert json.loads(result.stdout)["fingerprint_sha256"] == fp
    detail = json.loads(cli("inventory", "show", fp[:12], "--json").stdout)
    assert [c["fingerprint_sha256"] for c in detail["chain"]] == [
        fp, _fp(inventory.certs["Sample Issuing CA"]), _fp(inventory.certs["Sample Root CA"])]
    assert detail["chain_complete"] is True
    assert sorted(loc["locator"] for loc in detail["locations"]) == sorted(
        (inventory.root / p).resolve().as_uri() for p in ("lb-1/etc/haproxy/certs/svc04.pem",
                                                         "web-1/etc/nginx/ssl/svc04.fullchain.pem",
                                                         "web-2/etc/nginx/ssl/svc04.fullchain.pem"))
    assert detail["history"][0]["action"] == "certificate.added"
    assert all(ISO_Z.match(e["at"]) and e["actor"] == "test:setup" for e in detail["history"])
    assert detail["private_key"]["ref"].startswith("key:") and set(detail["private_key"]) == {"ref", "algorithm", "destroyed_at"}
    assert detail["sans"] == ["DNS:svc04.example.test", "DNS:www.svc04.example.test"]

    text = cli("inventory", "show", fp[:12])
    assert text.exit_code == 0
    for heading in ("chain", "locations", "history"):
        assert heading in text.stdout.splitlines()
    assert "certificate.added  by test:setup" in text.stdout


def test_show_ambiguous_and_unknown(engine: sa.Engine, estate: Estate, tmp_path: Path) -> None:
    a, b = estate.colliding
    (tmp_path / "twins.pem").write_bytes(pem(a, b))
    assert cli("inventory", "import", str(tmp_path / "twins.pem")).exit_code == 0
    prefix = _fp(a)[:4]
    assert _fp(b).startswith(prefix)

    proc = run_cli("inventory", "show", prefix)
    assert proc.returncode == 1 and proc.stdout == b""
    message = flat(proc.stderr.decode())
    assert message.startswith(f"error: '{prefix}' matches 2 certificates: ")
    assert _fp(a)[:16] in message and _fp(b)[:16] in message and message.endswith("give more of the fingerprint")
    # One more digit (where they differ) is unique.
    common = next(i for i in range(64) if _fp(a)[i] != _fp(b)[i])
    assert json.loads(cli("inventory", "show", _fp(a)[:common + 1], "--json").stdout)["fingerprint_sha256"] == _fp(a)

    proc = run_cli("inventory", "show", "ffff" + _fp(a)[4:])
    assert proc.returncode == 1
    assert flat(proc.stderr.decode()) == f"error: no certificate with fingerprint 'ffff{_fp(a)[4:]}' in the inventory"
    result = cli("inventory", "show", "abc")
    assert result.exit_code == 1
    assert result.stderr == "error: 'abc' is not a SHA-256 fingerprint or a prefix of at least 4 hex digits\n"
    result = cli("inventory", "show", "svc01.example.test")
    assert result.exit_code == 1 and "is not a SHA-256 fingerprint" in result.stderr


# ------------------------------------------------------------------------------------------ export

def test_export_formats(inventory: Estate, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    leaf = inventory.certs["svc05.example.test"]
    issuing, root = inventory.certs["Sample Issuing CA"], inventory.certs["Sample Root CA"]
    fp = _fp(leaf)

    result = cli("inventory", "export", fp[:16])
    assert result.exit_code == 0
    assert result.stdout_bytes == pem(leaf, issuing, root)  # pem, with the chain, leaf first
    assert cli("inventory", "export", fp, "--no-chain").stdout_bytes == pem(leaf)
    assert cli("inventory", "export", fp, "--format", "der").stdout_bytes == leaf.public_bytes(serialization.Encoding.DER)

    exported = json.loads(cli("inventory", "export", fp, "-f", "json").stdout)
    shown = json.loads(cli("inventory", "show", fp, "--json").stdout)
    assert exported["fingerprint_sha256"] == fp
    assert {k: v for k, v in exported.items() if k != "days_left"} == {k: v for k, v in shown.items() if k != "days_left"}

    password = tmp_path / "p12.pass"
    password.write_text("correct horse\n")
    out = tmp_path / "svc05.p12"
    result = cli("inventory", "export", fp, "--format", "pkcs12", "--include-key", "--password-file", str(password),
                 "-o", str(out))
    assert result.exit_code == 0, result.output
    assert oct(out.stat().st_mode & 0o777) == oct(0o600)
    loaded = pkcs12.load_pkcs12(out.read_bytes(), b"correct horse")  # the trailing newline is not the password
    assert loaded.cert is not None and _fp(loaded.cert.certificate) == fp
    assert [_fp(c.certificate) for c in loaded.additional_certs] == [_fp(issuing), _fp(root)]
    assert loaded.key is not None and public_key_sha256(loaded.key) == public_key_sha256(inventory.keys["svc05.example.test"])
    with pytest.raises(ValueError):
        pkcs12.load_pkcs12(out.read_bytes(), b"wrong")

    # The password from the environment works too; an unset variable is a usage error.
    monkeypatch.setenv("CP_TEST_P12", "from-env")
    data = cli("inventory", "export", fp, "-f", "pkcs12", "--password-env", "CP_TEST_P12").stdout_bytes
    assert _fp(pkcs12.load_pkcs12(data, b"from-env").additional_certs[0].certificate) == fp
    result = cli("inventory", "export", fp, "-f", "pkcs12", "--password-env", "CP_TEST_UNSET")
    assert result.exit_code == 2 and "environment variable CP_TEST_UNSET is not set" in flat(result.stderr)

    result = cli("inventory", "export", fp, "--format", "pfx")
    assert result.exit_code == 2 and "'pfx' is not one of 'pem', 'der', 'pkcs12', 'json'" in flat(result.stderr)
    result = cli("inventory", "export", "0000" + fp[4:])
    assert result.exit_code == 1 and "no certificate with fingerprint" in result.stderr
    result = cli("inventory", "export", _fp(inventory.certs["xn--bcher-kva.example.test"]), "--include-key",
                 "--plaintext-key", "-o", str(tmp_path / "none.pem"))
    assert result.exit_code == 1 and "holds no private key" in result.stderr
    assert not (tmp_path / "none.pem").exists()


# ------------------------------------------------------------------------------------------ report

def test_report_expiry_json_bands(inventory: Estate) -> None:
    result = cli("report", "expiry", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert ISO_Z.match(report["generated_at"])
    # Leaves only: expired svc00; 7 days soon, svc01, svc02; 30 days svc03, svc04, pay-stage;
    # 90 days svc05, svc06, pay; later svc07, svc08, the IDN certificate.
    assert report["bands"] == {"expired": 1, "7 days": 3, "30 days": 3, "90 days": 3, "later": 3}
    assert list(report["bands"]) == ["expired", "7 days", "30 days", "90 days", "later"]
    soonest = report["soonest"]
    assert names(soonest)[:4] == ["svc00.example.test", "soon.example.test", "svc01.example.test", "svc02.example.test"]
    assert [r["band"] for r in soonest] == ["expired"] + ["7 days"] * 3 + ["30 days"] * 3 + ["90 days"] * 3 + ["later"] * 3
    assert all(LIST_KEYS <= set(r) for r in soonest)

    with_ca = json.loads(cli("report", "expiry", "--json", "--include-ca", "--show", "2").stdout)
    assert with_ca["bands"] == {"expired": 1, "7 days": 3, "30 days": 3, "90 days": 3, "later": 6}
    assert names(with_ca["soonest"]) == ["svc00.example.test", "soon.example.test"]

    text = cli("report", "expiry")
    assert text.exit_code == 0 and "expired: 1" in text.stdout and "later: 3" in text.stdout


# ------------------------------------------------------------------------------------------ keys

def test_keys_list_shows_no_key_material(inventory: Estate) -> None:
    result = cli("keys", "list", "--json")
    assert result.exit_code == 0
    rows = json.loads(result.stdout)
    assert len(rows) == 10  # nine sample leaves and the six-hour certificate
    for row in rows:
        assert set(row) == {"ref", "store", "algorithm", "key_size", "curve", "spki_sha256", "origin", "created_at",
                            "destroyed_at", "used_by", "master_key_id", "master_key_source", "master_key_where",
                            "master_key_file", "token"}
        assert row["ref"].startswith("key:") and row["origin"] == "imported" and row["algorithm"] == "ec-p256"
        assert (row["store"], row["key_size"], row["curve"]) == ("keystore", 256, "secp256r1")
        assert row["master_key_id"] == keystore.load_key_ring(load_settings()).primary.id
        assert row["master_key_source"] == "file" and row["master_key_where"] == str(load_settings().master_key_file)
        assert [u["kind"] for u in row["used_by"]] == ["certificate"]  # the certificate it was imported with
    assert {r["spki_sha256"] for r in rows} == {public_key_sha256(k) for k in inventory.keys.values()}

    text = cli("keys", "list")
    assert text.exit_code == 0 and len(text.stdout.splitlines()) == 10
    master = load_settings().master_key_file.read_text().strip()
    for output in (result.stdout, text.stdout, text.stderr):
        assert "PRIVATE KEY" not in output and master not in output
        for key in inventory.keys.values():
            der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
            body = key_pem(key).decode().splitlines()[1:-1]
            scalar = key.private_numbers().private_value.to_bytes(32, "big")
            assert der.hex() not in output and scalar.hex() not in output
            assert not any(line in output for line in body)

    # After a key is destroyed, the listing says so.
    ref = rows[0]["ref"]
    assert cli("keys", "destroy", ref).exit_code == 2  # needs --yes
    assert cli("keys", "destroy", ref, "--yes").exit_code == 0
    after = {r["ref"]: r for r in json.loads(cli("keys", "list", "--json").stdout)}
    assert ISO_Z.match(after[ref]["destroyed_at"])
    assert f"{ref}" in cli("keys", "list").stdout and "destroyed" in cli("keys", "list").stdout
