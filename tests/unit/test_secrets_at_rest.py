"""The proof that no private key byte is stored or logged in the clear.

A sample estate (plus RSA, Ed25519, PKCS#12, DER and mismatched keys) is imported with --import-keys
through the real CLI in a subprocess and in-process with every logger at DEBUG. Then, for every
private key of the estate, each of its encodings (PKCS#8 DER, traditional DER, PEM text, each base64
line of its PEM, the raw private scalar or exponent, and their hex and escaped forms) is searched for
in the raw SQLite database and WAL files, in every column of every table on SQLite and PostgreSQL, in
the audit details, in the CLI's stdout and stderr, and in the captured logs. None may be there.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import stat
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.serialization import pkcs12
from typer.testing import CliRunner

from certpilot import audit, keystore
from cli.main import app
from certpilot.database import dispose_engines, read_session
from certpilot.importer import ImportOptions, import_paths
from certpilot.keys import public_key_sha256
from certpilot.models import AuditEvent, PrivateKey
from certpilot.pem import read_pem_blocks
from certpilot.sample_estate import issue_leaf, key_pem, make_ca, pem, write_estate
from certpilot.settings import load_settings
from certpilot.x509info import spki_sha256

KEY_LABELS = {"PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY"}
_PEM, _DER = serialization.Encoding.PEM, serialization.Encoding.DER
_PKCS8, _TRAD = serialization.PrivateFormat.PKCS8, serialization.PrivateFormat.TraditionalOpenSSL
_NONE = serialization.NoEncryption()


@dataclass
class EstateKeys:
    root: Path
    keys: dict[str, PrivateKeyTypes]  # spki sha256 -> key, every private key anywhere in the estate
    storable: set[str]  # the spki of keys that belong to a certificate of the estate (and so get stored)
    needles: list[tuple[str, bytes]] = field(default_factory=list)  # (description, bytes that must not appear)
    leaf_fingerprint: str = ""  # a certificate whose key is in the estate


def _int_bytes(value: int, size: int | None = None) -> list[bytes]:
    minimal = value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big")
    fixed = value.to_bytes(size, "big") if size else minimal
    return list(dict.fromkeys([fixed, minimal]))


def _needles_for(name: str, key: PrivateKeyTypes) -> list[tuple[str, bytes]]:
    out: list[tuple[str, bytes]] = []
    pkcs8_der = key.private_bytes(_DER, _PKCS8, _NONE)
    pkcs8_pem = key.private_bytes(_PEM, _PKCS8, _NONE)
    out += [(f"{name} PKCS#8 DER", pkcs8_der), (f"{name} PKCS#8 PEM", pkcs8_pem)]
    pems = [pkcs8_pem]
    if isinstance(key, ed25519.Ed25519PrivateKey):
        scalars = [key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, _NONE)]
    else:
        trad_der = key.private_bytes(_DER, _TRAD, _NONE)
        trad_pem = key.private_bytes(_PEM, _TRAD, _NONE)
        out += [(f"{name} traditional DER", trad_der), (f"{name} traditional PEM", trad_pem)]
        pems.append(trad_pem)
        if isinstance(key, ec.EllipticCurvePrivateKey):
            scalars = _int_bytes(key.private_numbers().private_value, (key.curve.key_size + 7) // 8)
        else:
            assert isinstance(key, rsa.RSAPrivateKey)
            numbers = key.private_numbers()
            scalars = _int_bytes(numbers.d) + _int_bytes(numbers.p) + _int_bytes(numbers.q)
    for text in pems:
        for line in text.decode().splitlines():
            if not line.startswith("-----") and len(line) >= 16:
                out.append((f"{name} PEM base64 line", line.encode()))
    for scalar in scalars:
        out += [(f"{name} private scalar/exponent", scalar), (f"{name} private scalar hex", scalar.hex().encode()),
                (f"{name} private scalar HEX", scalar.hex().upper().encode())]
        escaped = repr(scalar)[2:-1].encode()
        if escaped != scalar:
            out.append((f"{name} private scalar as escaped bytes", escaped))
    out.append((f"{name} PKCS#8 DER hex", pkcs8_der.hex().encode()))
    for description, needle in out:
        assert len(needle) >= 16, description  # long enough that finding it by chance is impossible
    return out


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@pytest.fixture(scope="module")
def estate(tmp_path_factory: pytest.TempPathFactory) -> EstateKeys:
    root = tmp_path_factory.mktemp("estate")
    write_estate(root)
    now = dt.datetime.now(dt.timezone.utc)
    extra = make_ca("Extra Issuing CA")
    _write(root / "extra/ca.crt", pem(extra.certificate))
    # RSA, in the traditional "RSA PRIVATE KEY" form, beside its certificate.
    rsa_cert, rsa_key = issue_leaf(extra, ["rsa.example.test"], now + dt.timedelta(days=60),
                                   key=rsa.generate_private_key(public_exponent=65537, key_size=2048))
    _write(root / "extra/rsa/app.crt", pem(rsa_cert))
    _write(root / "extra/rsa/app.key", rsa_key.private_bytes(_PEM, _TRAD, _NONE))
    # Ed25519, certificate and key in one file.
    ed_cert, ed_key = issue_leaf(extra, ["ed.example.test"], now + dt.timedelta(days=70),
                                 key=ed25519.Ed25519PrivateKey.generate())
    _write(root / "extra/ed/ed.pem", pem(ed_cert) + key_pem(ed_key))
    # An unencrypted PKCS#12 with a P-384 key.
    p12_cert, p12_key = issue_leaf(extra, ["p12.example.test"], now + dt.timedelta(days=80),
                                   key=ec.generate_private_key(ec.SECP384R1()))
    _write(root / "extra/p12/bundle.p12", pkcs12.serialize_key_and_certificates(
        b"p12", p12_key, p12_cert, [extra.certificate], _NONE))  # type: ignore[arg-type]
    # DER certificate and a DER (SEC1) key in separate files.
    der_cert, der_key = issue_leaf(extra, ["der.example.test"], now + dt.timedelta(days=90))
    _write(root / "extra/der/leaf.der", der_cert.public_bytes(_DER))
    _write(root / "extra/der/leaf-key.der", der_key.private_bytes(_DER, _TRAD, _NONE))
    # A certificate with somebody else's key (refused), and a key that belongs to nothing (refused).
    mismatch_cert, _ = issue_leaf(extra, ["mismatch.example.test"], now + dt.timedelta(days=50))
    stray = ec.generate_private_key(ec.SECP256R1())
    _write(root / "extra/bad/mismatch.pem", pem(mismatch_cert) + key_pem(ec.generate_private_key(ec.SECP256R1())))
    _write(root / "extra/bad/stray.key", key_pem(stray))

    keys: dict[str, PrivateKeyTypes] = {}
    unpaired: set[str] = set()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        found: list[PrivateKeyTypes] = []
        if path.suffix == ".p12":
            loaded = pkcs12.load_pkcs12(data, None)
            assert loaded.key is not None
            found.append(loaded.key)
        elif path.name.endswith("-key.der"):
            found.append(serialization.load_der_private_key(data, None))
        elif b"-----BEGIN" in data and b"PRIVATE KEY" in data:
            found += [serialization.load_pem_private_key(block.text.encode(), None)
                      for block in read_pem_blocks(data) if block.label in KEY_LABELS]
        for key in found:
            keys[public_key_sha256(key)] = key
            if path.parent.name == "bad":
                unpaired.add(public_key_sha256(key))
    assert len(keys) == 9 + 4 + 2  # the sample estate's nine leaves, the four extra ones, two that belong nowhere
    assert len(unpaired) == 2
    needles = [n for i, key in enumerate(keys.values()) for n in _needles_for(f"key #{i} ({type(key).__name__})", key)]
    return EstateKeys(root, keys, set(keys) - unpaired, needles, rsa_cert.fingerprint(hashes.SHA256()).hex())


def public_key_sha256_of_cert(cert: x509.Certificate) -> str:
    return spki_sha256(cert.public_key())


def assert_no_secret(haystack: bytes | str, where: str, needles: Iterable[tuple[str, bytes]]) -> None:
    """Fail naming the key and the encoding found, never printing the secret itself."""
    data = haystack.encode("utf-8", "surrogateescape") if isinstance(haystack, str) else haystack
    found = [description for description, needle in needles if needle in data]
    assert not found, f"private key material in {where}: {found}"


# ------------------------------------------------------------------------------------------ dumps

def _value_bytes(value: object) -> bytes:
    if value is None:
        return b""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    return str(value).encode("utf-8")


def dump_database(engine: sa.Engine) -> dict[str, bytes]:
    """Every column of every row of every table in the database (not just the ones certpilot declares)."""
    inspector = sa.inspect(engine)
    tables = inspector.get_table_names()
    assert {"certificate", "location", "subject_alt_name", "private_key", "audit_event"} <= set(tables)
    out = {}
    with engine.connect() as conn:
        for table in tables:
            chunks = []
            for row in conn.execute(sa.text(f'SELECT * FROM "{table}"')):
                chunks += [_value_bytes(v) for v in row]
                chunks.append(repr(tuple(row)).encode())
            out[table] = b"\0".join(chunks)
    return out


def sqlite_files(database_url: str) -> dict[str, bytes]:
    path = Path(sa.engine.make_url(database_url).database or "")
    return {p.name: p.read_bytes() for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm"), Path(f"{path}-journal"))
            if p.exists()}


def _env(database_url: str, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CERTPILOT_")}
    return {**env, "CERTPILOT_HOME": str(home), "CERTPILOT_DATABASE_URL": database_url, "COLUMNS": "200"}


def run_cli(database_url: str, home: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True,
                          env=_env(database_url, home), timeout=120, check=False)


def _assert_keys_stored_sealed(engine: sa.Engine, estate: EstateKeys) -> dict[str, bytes]:
    """The proof is not vacuous: every key that belongs to a certificate was stored, sealed, and opens."""
    ring = keystore.load_key_ring(load_settings())
    ciphertexts = {}
    with read_session(engine) as session:
        rows = session.execute(sa.select(PrivateKey)).scalars().all()
        assert {r.spki_sha256 for r in rows} == estate.storable
        for row in rows:
            key = keystore.load_private_key(session, keystore.KeyRef(row.id), ring)
            assert key.private_bytes(_DER, _PKCS8, _NONE) == estate.keys[row.spki_sha256].private_bytes(_DER, _PKCS8, _NONE)
            ciphertexts[row.id] = row.ciphertext
    return ciphertexts


# ------------------------------------------------------------------------------------------ controls

def test_the_needles_find_every_key_where_it_is_in_the_clear(estate: EstateKeys) -> None:
    """Positive control: each key's needles are found in the estate's own files, which do hold it in the clear."""
    files = b"\0".join(p.read_bytes() for p in sorted(estate.root.rglob("*")) if p.is_file())
    for i, key in enumerate(estate.keys.values()):
        mine = _needles_for(f"key #{i}", key)
        with pytest.raises(AssertionError, match=f"private key material in estate files: .*key #{i} "):
            assert_no_secret(files, "estate files", mine)
    # An encoding never written to disk (the raw scalar) is found once it is put somewhere.
    key = next(iter(estate.keys.values()))
    scalar = [n for d, n in _needles_for("k", key) if d.endswith("private scalar/exponent")][0]
    with pytest.raises(AssertionError, match="private scalar/exponent"):
        assert_no_secret(b"prefix" + scalar + b"suffix", "a blob", estate.needles)
    with pytest.raises(AssertionError, match="private scalar hex"):
        assert_no_secret(f"d={scalar.hex()}", "a log line", estate.needles)


# ------------------------------------------------------------------------------------------ the CLI

def test_cli_import_with_keys_leaves_no_plaintext_anywhere(engine: sa.Engine, database_url: str, certpilot_home: Path,
                                                           estate: EstateKeys) -> None:
    proc = run_cli(database_url, certpilot_home, "inventory", "import", str(estate.root), "--import-keys")
    assert proc.returncode == 1, proc.stderr.decode()  # the broken file, the mismatched and the stray key
    stdout, stderr = proc.stdout.decode(), proc.stderr.decode()
    assert "FAILED" in stdout and "legacy.pem" in stdout and "mismatch.pem" in stdout and "stray.key" in stdout
    assert "created master key file" in stderr
    outputs = {"import stdout": proc.stdout, "import stderr": proc.stderr}
    keys_list = run_cli(database_url, certpilot_home, "keys", "list")
    assert keys_list.returncode == 0 and keys_list.stdout.count(b"key:") == 13
    outputs.update({"keys list stdout": keys_list.stdout, "keys list stderr": keys_list.stderr})
    # Everything else the CLI shows about the stored keys and certificates (in-process, to keep this fast).
    for args in (("inventory", "import", str(estate.root), "--import-keys", "--json"), ("keys", "list", "--json"),
                 ("inventory", "list", "--json"), ("audit", "list", "--json", "--limit", "1000"),
                 ("inventory", "show", estate.leaf_fingerprint, "--json"), ("inventory", "show", estate.leaf_fingerprint)):
        more = CliRunner().invoke(app, list(args))
        assert more.exit_code in (0, 1), more.output
        outputs[f"{' '.join(args)} stdout"] = more.stdout.encode()
        outputs[f"{' '.join(args)} stderr"] = more.stderr.encode()
    shown = json.loads(outputs[f"inventory show {estate.leaf_fingerprint} --json stdout"])
    assert shown["private_key"]["ref"].startswith("key:") and shown["private_key"]["destroyed_at"] is None
    for where, data in outputs.items():
        assert_no_secret(data, where, estate.needles)
        assert b"PRIVATE KEY" not in data, where

    ciphertexts = _assert_keys_stored_sealed(engine, estate)
    assert len(ciphertexts) == 13

    # Every column of every table, read back through SQL, on either backend.
    dump = dump_database(engine)
    assert estate.leaf_fingerprint.encode() in dump["certificate"]  # the dump does see the inventory
    for table, data in dump.items():
        assert_no_secret(data, f"table {table}", estate.needles)
    with read_session(engine) as session:
        events = session.execute(sa.select(AuditEvent).order_by(AuditEvent.seq)).scalars().all()
        assert sum(e.action == "key.stored" for e in events) == 13
        for event in events:
            assert_no_secret(event.details, f"audit event {event.seq} details", estate.needles)
            assert "PRIVATE KEY" not in event.details and "-----BEGIN" not in event.details
        assert audit.verify(session).events == len(events)

    if engine.dialect.name == "sqlite":
        # The raw files, as the CLI processes left them (this process still has the database open, so
        # the WAL is still there to read).
        files = sqlite_files(database_url)
        assert "inventory.db" in files and "inventory.db-wal" in files
        assert stat.S_IMODE((certpilot_home / "inventory.db").stat().st_mode) == 0o600
        for name, data in files.items():
            assert_no_secret(data, f"SQLite file {name}", estate.needles)
        # Positive control: the sealed keys themselves are in those bytes, so the scan reads the key rows.
        for key_id, ciphertext in ciphertexts.items():
            assert any(ciphertext in data for data in files.values()), key_id
        # And after a checkpoint, the database file alone still holds no plaintext.
        dispose_engines()
        engine.dispose()
        for name, data in sqlite_files(database_url).items():
            assert_no_secret(data, f"SQLite file {name} after checkpoint", estate.needles)


# ------------------------------------------------------------------------------------------ in-process logs

def _debug_everything(caplog: pytest.LogCaptureFixture) -> None:
    names = {"", "certpilot", "certpilot.importer", "certpilot.keystore", "cli.main", "sqlalchemy",
             "sqlalchemy.engine", "sqlalchemy.engine.Engine", "sqlalchemy.pool", "sqlalchemy.orm", "alembic", "typer"}
    names |= set(logging.root.manager.loggerDict)
    for name in sorted(names):
        caplog.set_level(logging.DEBUG, logger=name or None)


def _log_text(caplog: pytest.LogCaptureFixture) -> str:
    parts = [caplog.text]
    for record in caplog.records:
        parts += [record.getMessage(), repr(record.args), record.exc_text or "", repr(record.__dict__)]
    return "\n".join(parts)


def test_in_process_import_logs_no_key_material(engine: sa.Engine, estate: EstateKeys, caplog: pytest.LogCaptureFixture,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    _debug_everything(caplog)
    announced: list[str] = []
    report = import_paths(engine, [str(estate.root)], ImportOptions(import_keys=True), audit.Actor("test:secrets"),
                          key_ring=lambda: keystore.load_key_ring(load_settings(), announce=announced.append))
    assert report.failed == 3 and report.certificates == 9 + 2 + 5
    failures = {Path(f.source).name: f.error for f in report.files if f.status == "failed"}
    assert set(failures) == {"legacy.pem", "mismatch.pem", "stray.key"}
    assert "matches none of the certificates" in (failures["mismatch.pem"] or "")
    assert announced and "created master key file" in announced[0]
    _assert_keys_stored_sealed(engine, estate)

    # The same again through the CLI layer, in this process, so its output and logs are captured too.
    result = CliRunner().invoke(app, ["inventory", "import", str(estate.root), "--import-keys", "--json"])
    assert result.exit_code == 1
    assert json.loads(result.stdout)["summary"]["failed"] == 3

    log = _log_text(caplog)
    # Positive control: statement logging was on, so the INSERTs of the sealed keys went through the logs.
    assert "INSERT INTO private_key" in log and "INSERT INTO audit_event" in log
    assert any(r.levelno == logging.DEBUG for r in caplog.records)
    assert_no_secret(log, "captured logs", estate.needles)
    assert "PRIVATE KEY" not in log
    # Positive control: a key that did reach a log would be found there.
    leaked = next(iter(estate.keys.values()))
    logging.getLogger("certpilot.test_leak").debug("oops %s", leaked.private_bytes(_PEM, _PKCS8, _NONE).decode())
    with pytest.raises(AssertionError, match="PEM base64 line"):
        assert_no_secret(_log_text(caplog), "captured logs", estate.needles)
    captured = capsys.readouterr()
    for where, text in (("stdout", captured.out), ("stderr", captured.err), ("CliRunner stdout", result.stdout),
                        ("CliRunner stderr", result.stderr), ("report", repr(report)), ("failures", repr(failures))):
        assert_no_secret(text, where, estate.needles)
        assert "PRIVATE KEY" not in text, where


def test_errors_about_keys_carry_no_key_material(engine: sa.Engine, estate: EstateKeys, tmp_path: Path) -> None:
    """Bad and refused key files are reported precisely, without quoting the key."""
    key = next(iter(estate.keys.values()))
    text = key.private_bytes(_PEM, _PKCS8, _NONE).decode()
    lines = text.splitlines()
    corrupt = "\n".join(lines[:2] + [lines[2][:10] + "!" + lines[2][11:]] + lines[3:]) + "\n"
    (tmp_path / "corrupt.key").write_text(corrupt)
    (tmp_path / "truncated.key").write_text("\n".join(lines[:-1]) + "\n")
    (tmp_path / "wrong-label.pem").write_text(text.replace("BEGIN PRIVATE KEY", "BEGIN EC PRIVATE KEY")
                                              .replace("END PRIVATE KEY", "END EC PRIVATE KEY"))
    encrypted = key.private_bytes(_PEM, _PKCS8, serialization.BestAvailableEncryption(b"hunter2"))
    (tmp_path / "encrypted.key").write_bytes(encrypted)
    report = import_paths(engine, [str(tmp_path)], ImportOptions(import_keys=True), audit.Actor("t"),
                          key_ring=lambda: keystore.load_key_ring(load_settings()))
    errors = {Path(f.source).name: f.error or "" for f in report.files}
    assert set(errors) == {"corrupt.key", "truncated.key", "wrong-label.pem", "encrypted.key"}
    assert all(f.status == "failed" for f in report.files), errors
    assert "invalid character '!'" in errors["corrupt.key"]
    assert "no END line" in errors["truncated.key"]
    assert "a password is needed" in errors["encrypted.key"]
    for name, error in errors.items():
        assert_no_secret(error, f"error for {name}", estate.needles)
        assert_no_secret(error, f"error for {name}", [("encrypted PEM line", line.encode())
                                                      for line in encrypted.decode().splitlines()[1:-1]])
        assert "PRIVATE KEY-----" not in error


# ------------------------------------------------------------------------------------------ export

def _umask() -> int:
    current = os.umask(0o022)
    os.umask(current)
    return current


def _import_extra(engine: sa.Engine, estate: EstateKeys) -> None:
    report = import_paths(engine, [str(estate.root / "extra")], ImportOptions(import_keys=True), audit.Actor("setup"),
                          key_ring=lambda: keystore.load_key_ring(load_settings()))
    assert report.failed == 2 and report.keys_stored >= 4  # extra/bad fails, the rest is in


def test_export_with_key_writes_mode_0600_and_is_audited(engine: sa.Engine, database_url: str, certpilot_home: Path,
                                                         estate: EstateKeys, tmp_path: Path) -> None:
    _import_extra(engine, estate)
    fp = estate.leaf_fingerprint

    out = tmp_path / "out" / "rsa-with-key.pem"
    out.parent.mkdir()
    proc = run_cli(database_url, certpilot_home, "inventory", "export", fp[:20], "--include-key", "--plaintext-key",
                   "-o", str(out))
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == b""  # the key went to the file, nowhere else
    assert_no_secret(proc.stderr, "export stderr", estate.needles)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    data = out.read_bytes()
    blocks = read_pem_blocks(data)
    assert [b.label for b in blocks] == ["CERTIFICATE", "CERTIFICATE", "PRIVATE KEY"]  # leaf, issuer, key
    exported_key = serialization.load_pem_private_key(blocks[-1].text.encode(), None)
    leaf = x509.load_pem_x509_certificate(blocks[0].text.encode())
    assert leaf.fingerprint(hashes.SHA256()).hex() == fp
    assert public_key_sha256(exported_key) == public_key_sha256_of_cert(leaf)

    # Exporting over an existing, world-readable file (told to, with --force) still leaves it 0600.
    existing = tmp_path / "out" / "existing.pem"
    existing.write_text("old contents\n")
    os.chmod(existing, 0o644)
    proc = run_cli(database_url, certpilot_home, "inventory", "export", fp, "--include-key", "--plaintext-key",
                   "--force", "-o", str(existing))
    assert proc.returncode == 0, proc.stderr.decode()
    assert stat.S_IMODE(existing.stat().st_mode) == 0o600
    assert existing.read_bytes().endswith(blocks[-1].text.encode())

    with read_session(engine) as session:
        events = audit.list_events(session, action="certificate.exported_with_key")
        assert len(events) == 2
        key_row = session.execute(sa.select(PrivateKey).where(
            PrivateKey.spki_sha256 == public_key_sha256(exported_key))).scalars().one()
        for event in events:
            assert event.object == f"certificate:{fp}"
            assert json.loads(event.details) == {"key": f"key:{key_row.id}", "format": "pem", "encrypted": False}
            assert event.actor.startswith("cli:")
        assert audit.verify(session).events > 2


def test_export_without_key_contains_no_key(engine: sa.Engine, database_url: str, certpilot_home: Path,
                                            estate: EstateKeys, tmp_path: Path) -> None:
    _import_extra(engine, estate)
    fp = estate.leaf_fingerprint
    proc = run_cli(database_url, certpilot_home, "inventory", "export", fp)  # the real CLI, PEM with chain
    assert proc.returncode == 0, proc.stderr.decode()
    assert [b.label for b in read_pem_blocks(proc.stdout)] == ["CERTIFICATE", "CERTIFICATE"]
    outputs = {"pem (subprocess)": proc.stdout + proc.stderr}
    for fmt in ("pem", "der", "json", "pkcs12"):  # and each format in-process
        result = CliRunner().invoke(app, ["inventory", "export", fp, "--format", fmt])
        assert result.exit_code == 0, result.output
        outputs[fmt] = result.stdout_bytes + result.stderr_bytes
        if fmt == "pkcs12":
            loaded = pkcs12.load_pkcs12(result.stdout_bytes, None)
            assert loaded.key is None
            assert fp in [c.certificate.fingerprint(hashes.SHA256()).hex() for c in loaded.additional_certs]
    # To a file without the key: an ordinary file, not a secret.
    out = tmp_path / "cert.pem"
    assert CliRunner().invoke(app, ["inventory", "export", fp, "-o", str(out)]).exit_code == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o644 & ~_umask()
    outputs["file"] = out.read_bytes()
    for where, data in outputs.items():
        assert data, where
        assert_no_secret(data, f"export {where}", estate.needles)
        assert b"PRIVATE KEY" not in data, where
    with read_session(engine) as session:
        assert audit.list_events(session, action="certificate.exported_with_key") == []


def test_export_with_key_as_der_is_refused(engine: sa.Engine, database_url: str, certpilot_home: Path,
                                           estate: EstateKeys, tmp_path: Path) -> None:
    _import_extra(engine, estate)
    out = tmp_path / "refused.der"
    proc = run_cli(database_url, certpilot_home, "inventory", "export", estate.leaf_fingerprint, "--include-key",
                   "--format", "der", "-o", str(out))
    assert proc.returncode == 1
    assert " ".join(proc.stderr.decode().split()) == "error: a private key cannot go in der: use pem or pkcs12"
    assert proc.stdout == b"" and not out.exists()
    result = CliRunner().invoke(app, ["inventory", "export", estate.leaf_fingerprint, "--include-key", "--format", "json"])
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr == "error: a private key cannot go in json: use pem or pkcs12\n"
    with read_session(engine) as session:
        assert audit.list_events(session, action="certificate.exported_with_key") == []
