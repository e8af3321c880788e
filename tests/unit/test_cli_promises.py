"""The CLI keeps the README's promises, on SQLite and PostgreSQL: exit codes (0, 1 failed, 2 usage),
choices that are usage errors, --json everywhere with stable output, --version, `status`, data that is
never console markup, keys that leave certpilot encrypted unless told, files not overwritten unless
told, help texts without Python types, and the bugs of issue 8 (expiry bands, --show 0, expired
certificates within --expiring-within, --expect-head, revoking twice). Real keys and certificates."""

from __future__ import annotations

import datetime as dt
import json
import re
import stat
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID
from sqlmodel import col
from typer.testing import CliRunner, Result

import certpilot
from certpilot import audit, ca, inventory, keys, keystore
from certpilot.database import read_session, write_session
from certpilot.export import FORMATS
from certpilot.importer import ImportOptions, import_paths
from certpilot.issuance import PROFILES, build_csr
from certpilot.models import AuditEvent, Certificate, ManagedCertificate, Target
from certpilot.sample_estate import issue_leaf, key_pem, make_ca, pem
from certpilot.settings import load_settings
from cli import options
from cli.main import app

UTC = dt.timezone.utc


def cli(*args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(app, list(args), input=input)


def ok(*args: str) -> str:
    result = cli(*args)
    assert result.exit_code == 0, (args, result.output)
    return result.stdout


def flat(text: str) -> str:
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def fp(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def _ring() -> keystore.KeyRing:
    return keystore.load_key_ring(load_settings())


def _import(engine: sa.Engine, *paths: Path, **options: Any) -> None:
    report = import_paths(engine, [str(p) for p in paths], ImportOptions(**options), audit.Actor("test"), key_ring=_ring)
    assert not report.failed, report.files


def _events(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.text("select count(*) from audit_event")).scalar_one()


# Without a Prefect API: managed add cannot check issuer blocks and says so; ca init says how to register
# its block later. (tests/flows/test_cli_issuer_blocks.py covers both with a Prefect server.)
pytestmark = pytest.mark.usefixtures("no_prefect_api")


# ------------------------------------------------------------------------------------------ help, version

def _commands(command: Any, path: list[str]) -> list[list[str]]:
    found = [path]
    for name, sub in getattr(command, "commands", {}).items():
        found += _commands(sub, path + [name])
    return found


def test_help_texts_show_no_python_types() -> None:
    from typer.main import get_command

    paths = _commands(get_command(app), [])
    assert ["status"] in paths and ["ca", "register-block"] in paths
    for path in paths:
        result = CliRunner().invoke(app, path + ["--help"], env={"COLUMNS": "250"})
        assert result.exit_code == 0, path
        text = result.stdout
        assert not re.search(r"<(str|int|float|bool|path|file|directory|datetime|uuid|[a-z0-9-]+(\|[a-z0-9-]+)+)>",
                             text), (path, text)
        assert "list[" not in text, path
        # One placeholder style: upper case (or the choices themselves).
        for placeholder in re.findall(r"│\s+(?:\*\s+)?--[a-z-]+(?:\s+-[a-z])?\s{2,}(\S+)\s{2,}", text):
            assert placeholder.isupper() or "|" in placeholder or not placeholder[0].isalpha(), (path, placeholder)


def test_version() -> None:
    result = cli("--version")
    assert result.exit_code == 0
    assert result.stdout == f"certpilot {certpilot.__version__}\n"


# ------------------------------------------------------------------------------------------ exit codes

def test_choices_are_exactly_what_the_core_accepts() -> None:
    assert {s.value for s in options.CertificateStatus} == set(inventory.STATUSES)
    assert {f.value for f in options.ExportFormat} == set(FORMATS)
    assert {p.value for p in options.Profile} == set(PROFILES)
    assert {k.value for k in options.KeyAlgorithm} == set(keys.KEY_ALGORITHMS)
    assert {r.value for r in options.RevocationReason} == set(ca.REASONS)


@pytest.mark.parametrize(("args", "option", "valid"), [
    (["ca", "revoke", "ab12", "--reason", "on-a-whim"], "--reason", ca.REASONS),
    (["ca", "issue", "corp", "--csr", "-", "--profile", "email"], "--profile", PROFILES),
    (["ca", "crl", "corp", "--format", "txt"], "--format", ("der", "pem")),
    (["managed", "add", "web", "--dns", "w.example", "--issuer", "private-ca/x", "--key-algorithm", "rsa-1024"],
     "--key-algorithm", keys.KEY_ALGORITHMS),
    (["managed", "add", "web", "--dns", "w.example", "--issuer", "private-ca/x", "--profile", "email"], "--profile", PROFILES),
    (["inventory", "list", "--status", "gone"], "--status", inventory.STATUSES),
    (["inventory", "export", "ab12", "--format", "pfx"], "--format", FORMATS),
])
def test_an_unknown_choice_is_a_usage_error_listing_the_valid_values(engine: sa.Engine, args: list[str], option: str,
                                                                    valid: Any) -> None:
    result = cli(*args)
    assert result.exit_code == 2, result.output
    message = flat(result.stderr)
    assert f"Invalid value for '{option}'" in message
    assert all(f"'{value}'" in message for value in valid), message
    assert result.stdout == ""
    # With --json, the error is a JSON object on stdout too.
    as_json = cli(*args, "--json")
    assert as_json.exit_code == 2
    error = json.loads(as_json.stdout)
    assert error["exit_code"] == 2 and option in error["error"]


@pytest.mark.parametrize("size", ["-1", "0"])
def test_max_size_out_of_range_is_a_usage_error(engine: sa.Engine, tmp_path: Path, size: str) -> None:
    (tmp_path / "x.pem").write_bytes(b"")
    result = cli("inventory", "import", str(tmp_path), "--max-size", size)
    assert result.exit_code == 2, result.output
    assert "Invalid value for '--max-size'" in flat(result.stderr) and "Traceback" not in result.output


def test_a_failure_under_json_is_a_json_error_and_exit_1(engine: sa.Engine) -> None:
    result = cli("inventory", "show", "ffff" + "0" * 60, "--json")
    assert result.exit_code == 1
    assert json.loads(result.stdout) == {"error": f"no certificate with fingerprint '{'ffff' + '0' * 60}' in the inventory",
                                         "exit_code": 1}
    assert result.stderr.startswith("error: ")


# ------------------------------------------------------------------------------------------ data, not markup

def _certificate_named(common_name: str, days: float, issuer_ca: Any) -> tuple[x509.Certificate, Any]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(issuer_ca.certificate.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=days))
            .sign(issuer_ca.key, hashes.SHA256()))
    return cert, key


def test_certificate_fields_are_data_not_markup(engine: sa.Engine, tmp_path: Path) -> None:
    authority = make_ca("[bold]Markup CA[/bold]")
    cert, _ = _certificate_named("[/]x", 20, authority)
    (tmp_path / "odd.pem").write_bytes(pem(cert, authority.certificate))
    _import(engine, tmp_path / "odd.pem", owner="[red]team[/red]")
    listed = cli("inventory", "list")
    assert listed.exit_code == 0, listed.output
    assert "[/]x" in listed.stdout and "[red]team[/red]" in listed.stdout
    shown = cli("inventory", "show", fp(cert)[:12])
    assert shown.exit_code == 0, shown.output
    assert "CN=[/]x" in shown.stdout and "CN=[bold]Markup CA[/bold]" in shown.stdout
    report = cli("report", "expiry")
    assert report.exit_code == 0, report.output
    assert "[/]x" in report.stdout


def test_file_names_are_shown_literally(engine: sa.Engine, tmp_path: Path) -> None:
    authority = make_ca("Names CA")
    leaf, _ = issue_leaf(authority, ["names.example.test"], dt.datetime.now(UTC) + dt.timedelta(days=30))
    (tmp_path / "a[red]b[bold].pem").write_bytes(pem(leaf))
    (tmp_path / "new\nline.pem").write_bytes(b"not a certificate\n")
    result = cli("inventory", "import", str(tmp_path))
    assert result.exit_code == 1  # one file failed
    assert f"imported {tmp_path}/a[red]b[bold].pem: 1 certificate(s), 1 new" in result.stdout
    assert f"FAILED   {tmp_path}/new\\nline.pem: " in result.stdout  # one line, the newline shown as \n


# ------------------------------------------------------------------------------------------ expiry report

def test_expiry_rows_and_counts_use_one_banding_rule(engine: sa.Engine, tmp_path: Path) -> None:
    authority = make_ca("Bands CA")
    now = dt.datetime.now(UTC)
    near, _ = issue_leaf(authority, ["near.example.test"], now + dt.timedelta(days=6.97))  # rounds to 7.0 days
    far, _ = issue_leaf(authority, ["far.example.test"], now + dt.timedelta(days=29.99))
    (tmp_path / "c.pem").write_bytes(pem(near, far))
    _import(engine, tmp_path / "c.pem")
    report = json.loads(ok("report", "expiry", "--json"))
    assert report["bands"] == {"expired": 0, "7 days": 1, "30 days": 1, "90 days": 0, "later": 0}
    assert [(r["fingerprint_sha256"], r["band"]) for r in report["soonest"]] == [(fp(near), "7 days"), (fp(far), "30 days")]
    assert report["soonest"][0]["days_left"] == 7.0  # the rounded figure shown, while the band is exact


def test_report_show_0_lists_none_and_negative_is_usage(engine: sa.Engine, tmp_path: Path) -> None:
    authority = make_ca("Show CA")
    leaf, _ = issue_leaf(authority, ["show.example.test"], dt.datetime.now(UTC) + dt.timedelta(days=3))
    (tmp_path / "c.pem").write_bytes(pem(leaf))
    _import(engine, tmp_path / "c.pem")
    report = json.loads(ok("report", "expiry", "--json", "--show", "0"))
    assert report["soonest"] == [] and report["bands"]["7 days"] == 1
    assert "show.example.test" not in ok("report", "expiry", "--show", "0")
    assert len(json.loads(ok("report", "expiry", "--json", "--show", "1"))["soonest"]) == 1
    assert cli("report", "expiry", "--show", "-1").exit_code == 2


def test_expiring_within_can_include_the_expired(engine: sa.Engine, tmp_path: Path) -> None:
    authority = make_ca("Expired CA")
    now = dt.datetime.now(UTC)
    gone, _ = issue_leaf(authority, ["gone.example.test"], now - dt.timedelta(days=2))
    soon, _ = issue_leaf(authority, ["soon.example.test"], now + dt.timedelta(days=10))
    later, _ = issue_leaf(authority, ["later.example.test"], now + dt.timedelta(days=60))
    (tmp_path / "c.pem").write_bytes(pem(gone, soon, later))
    _import(engine, tmp_path / "c.pem")

    def fps(*args: str) -> list[str]:
        return [r["fingerprint_sha256"] for r in json.loads(ok("inventory", "list", "--json", *args))]

    assert fps("--expiring-within", "30d") == [fp(soon)]  # as before: the expired one is left out ...
    assert fps("--expiring-within", "30d", "--include-expired") == [fp(gone), fp(soon)]  # ... unless asked
    assert "already expired are left out unless --include-expired" in flat(cli("inventory", "list", "--help").stdout)
    assert cli("inventory", "list", "--include-expired").exit_code == 2  # only with --expiring-within


# ------------------------------------------------------------------------------------------ audit verify

@pytest.mark.parametrize("head", ["abc", "zz" * 32, "0" * 63, "deadbeef" * 9])
def test_a_malformed_expect_head_is_a_usage_error(engine: sa.Engine, tmp_path: Path, head: str) -> None:
    with write_session(engine) as session:
        audit.append(session, audit.Actor("test"), [audit.Change("note.added", "note:1")])
    result = cli("audit", "verify", "--expect-head", head)
    assert result.exit_code == 2, result.output
    message = flat(result.stderr)
    assert "Invalid value for --expect-head" in message and "is not an event hash" in message
    assert "broken" not in message and "event 2" not in message


def test_core_verify_refuses_a_malformed_head(engine: sa.Engine) -> None:
    from certpilot.errors import InvalidOptionError

    with read_session(engine) as session, pytest.raises(InvalidOptionError):
        audit.verify(session, expected_head="not-a-hash")


# ------------------------------------------------------------------------------------------ private CA

def _ca_with_leaf(engine: sa.Engine, tmp_path: Path) -> x509.Certificate:
    with write_session(engine) as session:
        ca.init_ca(session, _ring(), audit.Actor("test"), "corp", "http://pki.example.com")
    (tmp_path / "req.pem").write_bytes(build_csr(ec.generate_private_key(ec.SECP256R1()), ["svc.example.com"])
                                       .public_bytes(serialization.Encoding.PEM))
    issued = json.loads(ok("ca", "issue", "corp", "--csr", str(tmp_path / "req.pem"), "--owner", "platform", "--json"))
    return x509.load_pem_x509_certificates(issued["chain_pem"].encode())[0]


def test_ca_issue_and_crl_json(engine: sa.Engine, tmp_path: Path) -> None:
    with write_session(engine) as session:
        ca.init_ca(session, _ring(), audit.Actor("test"), "corp", "http://pki.example.com")
    (tmp_path / "req.pem").write_bytes(build_csr(ec.generate_private_key(ec.SECP256R1()), ["svc.example.com"])
                                       .public_bytes(serialization.Encoding.PEM))
    issued = json.loads(ok("ca", "issue", "corp", "--csr", str(tmp_path / "req.pem"), "--owner", "platform", "--json",
                           "-o", str(tmp_path / "c.pem")))
    chain = x509.load_pem_x509_certificates(issued["chain_pem"].encode())
    assert len(chain) == 2 and (tmp_path / "c.pem").read_text() == issued["chain_pem"]
    assert issued["fingerprint_sha256"] == fp(chain[0]) and int(issued["serial"], 16) == chain[0].serial_number
    assert issued["not_after"] == inventory.iso(chain[0].not_valid_after_utc)

    crl = json.loads(ok("ca", "crl", "corp", "-o", str(tmp_path / "corp.crl"), "--json"))
    loaded = x509.load_der_x509_crl((tmp_path / "corp.crl").read_bytes())
    assert crl["crl_number"] == loaded.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    assert crl["revoked"] == 0 and crl["next_update"] == inventory.iso(loaded.next_update_utc)
    assert cli("ca", "crl", "corp", "--json").exit_code == 2  # the CRL itself would be on stdout


def test_revoking_again_says_it_was_already_revoked(engine: sa.Engine, tmp_path: Path) -> None:
    leaf = _ca_with_leaf(engine, tmp_path)
    first = json.loads(ok("ca", "revoke", fp(leaf), "--reason", "superseded", "--json"))
    assert first["already_revoked"] is False
    events, crl_number = _events(engine), first["crl_number"]

    again = cli("ca", "revoke", fp(leaf), "--reason", "superseded")
    assert again.exit_code == 0, again.output
    assert flat(again.stdout) == (f"{fp(leaf)} (serial {first['serial']}) was already revoked at {first['revoked_at']} "
                                  f"(superseded): nothing changed; CA corp's CRL #{crl_number} lists it")
    assert "revoked " + fp(leaf) not in again.stdout
    as_json = json.loads(ok("ca", "revoke", fp(leaf), "--json"))  # another reason than key-compromise changes nothing
    assert as_json == {**first, "already_revoked": True}
    assert _events(engine) == events  # no new audit event, no new CRL
    with read_session(engine) as session:
        assert ca.get_ca(session, "corp").crl_number == crl_number


# ------------------------------------------------------------------------------------------ keys leaving

@pytest.fixture
def keyed(engine: sa.Engine, tmp_path: Path) -> tuple[x509.Certificate, Any]:
    authority = make_ca("Keys CA")
    leaf, key = issue_leaf(authority, ["keys.example.test"], dt.datetime.now(UTC) + dt.timedelta(days=40))
    (tmp_path / "in.pem").write_bytes(pem(leaf) + key_pem(key))
    _import(engine, tmp_path / "in.pem", import_keys=True)
    return leaf, key


def _key_exports(engine: sa.Engine) -> list[dict[str, Any]]:
    with read_session(engine) as session:
        rows = session.execute(sa.select(col(AuditEvent.details)).where(col(AuditEvent.action) == "certificate.exported_with_key"))
        return [json.loads(d) for (d,) in rows]


def test_a_key_leaves_in_plaintext_only_when_told(engine: sa.Engine, keyed: Any, tmp_path: Path) -> None:
    leaf, key = keyed
    for args in (["--include-key"], ["--include-key", "-f", "pkcs12"]):
        refused = cli("inventory", "export", fp(leaf), *args, "-o", str(tmp_path / "k.out"))
        assert refused.exit_code == 2
        assert "give --password-file FILE or --password-env VAR (or --plaintext-key" in flat(refused.stderr)
        assert not (tmp_path / "k.out").exists()
    assert _key_exports(engine) == []  # nothing left certpilot

    ok("inventory", "export", fp(leaf), "--include-key", "--plaintext-key", "-o", str(tmp_path / "plain.pem"))
    assert b"-----BEGIN PRIVATE KEY-----" in (tmp_path / "plain.pem").read_bytes()
    assert stat.S_IMODE((tmp_path / "plain.pem").stat().st_mode) == 0o600
    ok("inventory", "export", fp(leaf), "--include-key", "--plaintext-key", "-f", "pkcs12", "-o", str(tmp_path / "plain.p12"))
    assert pkcs12.load_pkcs12((tmp_path / "plain.p12").read_bytes(), None).key is not None

    (tmp_path / "pass").write_text("s3cret\n")
    ok("inventory", "export", fp(leaf), "--include-key", "--password-file", str(tmp_path / "pass"), "-o", str(tmp_path / "enc.pem"))
    data = (tmp_path / "enc.pem").read_bytes()
    assert b"ENCRYPTED PRIVATE KEY" in data
    assert serialization.load_pem_private_key(data, b"s3cret").public_key() == key.public_key()
    assert [e["encrypted"] for e in _key_exports(engine)] == [False, False, True]  # each export an audit event

    both = cli("inventory", "export", fp(leaf), "--include-key", "--plaintext-key", "--password-file", str(tmp_path / "pass"),
               "-o", str(tmp_path / "both.pem"))
    assert both.exit_code == 2 and not (tmp_path / "both.pem").exists()


def test_the_password_is_asked_for_on_a_terminal(engine: sa.Engine, keyed: Any, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    leaf, key = keyed
    monkeypatch.setattr(options, "stdin_is_terminal", lambda: True)
    result = cli("inventory", "export", fp(leaf), "--include-key", "-f", "pkcs12", "-o", str(tmp_path / "k.p12"),
                 input="typed pw\ntyped pw\n")
    assert result.exit_code == 0, result.output
    assert "typed pw" not in result.output  # hidden
    loaded = pkcs12.load_pkcs12((tmp_path / "k.p12").read_bytes(), b"typed pw")
    assert loaded.key is not None and loaded.key.public_key() == key.public_key()
    mismatch = cli("inventory", "export", fp(leaf), "--include-key", "-o", str(tmp_path / "k2.pem"),
                   input="one\ntwo\none\none\n")  # asked again until both entries match
    assert mismatch.exit_code == 0, mismatch.output
    assert serialization.load_pem_private_key((tmp_path / "k2.pem").read_bytes(), b"one")


def test_export_refuses_to_overwrite_unless_forced(engine: sa.Engine, keyed: Any, tmp_path: Path) -> None:
    leaf, _ = keyed
    target = tmp_path / "out.pem"
    target.write_bytes(b"keep me")
    refused = cli("inventory", "export", fp(leaf), "-o", str(target))
    assert refused.exit_code == 1 and "refusing to overwrite" in refused.stderr and "--force" in refused.stderr
    refused = cli("inventory", "export", fp(leaf), "--include-key", "--plaintext-key", "-o", str(target))
    assert refused.exit_code == 1 and target.read_bytes() == b"keep me"
    assert _key_exports(engine) == []  # refused before the key was read
    target.chmod(0o644)
    written = json.loads(ok("inventory", "export", fp(leaf), "--include-key", "--plaintext-key", "-o", str(target),
                            "--force", "--json"))
    assert written["output"] == str(target) and written["private_key"] is True and written["encrypted"] is False
    assert target.read_bytes().startswith(pem(leaf)) and stat.S_IMODE(target.stat().st_mode) == 0o600


def test_root_key_export_is_encrypted_unless_told(engine: sa.Engine, tmp_path: Path) -> None:
    with write_session(engine) as session:
        ca.init_ca(session, _ring(), audit.Actor("test"), "corp", "http://pki.example.com")
    refused = cli("ca", "export-root-key", "corp", "-o", str(tmp_path / "root.pem"))
    assert refused.exit_code == 2 and "--plaintext-key" in flat(refused.stderr)
    assert not (tmp_path / "root.pem").exists()
    with read_session(engine) as session:
        assert not ca.root_key_exported(session, "corp")
    result = json.loads(ok("ca", "export-root-key", "corp", "-o", str(tmp_path / "root.pem"), "--plaintext-key", "--json"))
    assert result == {"ca": "corp", "output": str(tmp_path / "root.pem"), "encrypted": False}
    assert b"-----BEGIN PRIVATE KEY-----" in (tmp_path / "root.pem").read_bytes()


# ------------------------------------------------------------------------------------------ json everywhere

def test_json_on_keys_destroy_audit_and_managed(engine: sa.Engine, keyed: Any, no_prefect_api: None) -> None:
    [key] = json.loads(ok("keys", "list", "--json"))
    assert json.loads(ok("keys", "destroy", key["ref"], "--yes", "--json")) == {"ref": key["ref"], "destroyed": True}
    events = json.loads(ok("audit", "list", "--json", "--action", "key.destroyed"))
    assert [e["object"] for e in events] == [key["ref"]]
    added = json.loads(ok("managed", "add", "web", "--dns", "web.example.test", "--issuer", "private-ca/corp",
                          "--owner", "platform", "--json"))
    assert added["name"] == "web" and added["due"] is True


def test_managed_list_json_is_stable(engine: sa.Engine, tmp_path: Path, no_prefect_api: None) -> None:
    ok("managed", "add", "fresh", "--dns", "fresh.example.test", "--issuer", "private-ca/corp", "--owner", "platform")
    ok("managed", "add", "aging", "--dns", "aging.example.test", "--issuer", "private-ca/corp", "--owner", "platform")
    authority = make_ca("Aging CA")
    # 5 days left of its lifetime: due since two thirds of it passed.
    leaf, _ = issue_leaf(authority, ["aging.example.test"], dt.datetime.now(UTC) + dt.timedelta(days=5))
    (tmp_path / "aging.pem").write_bytes(pem(leaf))
    _import(engine, tmp_path / "aging.pem")
    with write_session(engine) as session:
        aging = session.execute(sa.select(ManagedCertificate).where(ManagedCertificate.name == "aging")).scalar_one()
        session.execute(sa.update(Certificate).where(Certificate.fingerprint_sha256 == fp(leaf))
                        .values(managed_certificate_id=aging.id))
        created = {m.name: m.created_at for m in session.execute(sa.select(ManagedCertificate)).scalars()}

    first = ok("managed", "list", "--json")
    time.sleep(1.1)
    assert ok("managed", "list", "--json") == first  # not "now" on every call
    rows = {r["name"]: r for r in json.loads(first)}
    assert all(r["due"] for r in rows.values())
    assert rows["fresh"]["next_renewal"] == inventory.iso(created["fresh"])  # due since it was added
    fell_due = dt.datetime.fromisoformat(rows["aging"]["next_renewal"].replace("Z", "+00:00"))
    assert leaf.not_valid_before_utc < fell_due < dt.datetime.now(UTC)
    lifetime = (leaf.not_valid_after_utc - leaf.not_valid_before_utc).days
    assert rows["aging"]["reason"] == f"due since {fell_due:%Y-%m-%d %H:%M} UTC (67% of its {lifetime}-day lifetime)"


# ------------------------------------------------------------------------------------------ status

def test_status(engine: sa.Engine, tmp_path: Path, no_prefect_api: None) -> None:
    ok("managed", "add", "web", "--dns", "web.example.test", "--issuer", "private-ca/corp", "--owner", "platform")
    ok("managed", "add", "idle", "--dns", "idle.example.test", "--issuer", "private-ca/corp", "--owner", "platform")
    authority = make_ca("Status CA")
    now = dt.datetime.now(UTC)
    old, _ = issue_leaf(authority, ["web.example.test"], now + dt.timedelta(days=70))
    new, _ = issue_leaf(authority, ["web.example.test"], now + dt.timedelta(days=80))
    (tmp_path / "web.pem").write_bytes(pem(old, new))
    _import(engine, tmp_path / "web.pem")
    run_id = "0f5b3c1e-1111-2222-3333-444455556666"
    with write_session(engine) as session:
        web = session.execute(sa.select(ManagedCertificate).where(ManagedCertificate.name == "web")).scalar_one()
        session.execute(sa.update(Certificate).where(Certificate.fingerprint_sha256.in_([fp(old), fp(new)]))
                        .values(managed_certificate_id=web.id))
        web.last_error = "issue: the CA said no"
        session.add(web)
        session.add(Target(managed_certificate_id=web.id, name="edge-1", kind="ssh-nginx", block="ssh-host/edge1",
                           desired_fingerprint=fp(new), verified_fingerprint=fp(new), verified_at=now, updated_at=now))
        session.add(Target(managed_certificate_id=web.id, name="edge-2", kind="ssh-nginx", block="ssh-host/edge2",
                           desired_fingerprint=fp(new), verified_fingerprint=fp(old), verified_at=now,
                           last_error="verify: still serving the old certificate", updated_at=now))
        audit.append(session, audit.Actor("flow", run_id), [
            audit.Change("certificate.issued", f"certificate:{fp(new)}", {"managed": "web"}),
            audit.Change("target.verified", "target:web/edge-1", {"fingerprint": fp(new)}),
            audit.Change("renewal.failed", "managed:web", {"step": "issue"}),
            audit.Change("renewal.failed", "managed:idle", {"step": "issue"})])

    status = json.loads(ok("status", "web", "--json"))
    assert status["name"] == "web" and status["current"]["fingerprint_sha256"] == fp(new)
    assert status["current"]["not_after"] == inventory.iso(new.not_valid_after_utc)
    assert 79 < status["current"]["days_left"] <= 80
    assert status["due"] is False and status["reason"].startswith("renew at ")
    assert status["last_error"] == "issue: the CA said no"
    assert [(t["name"], t["desired_fingerprint"], t["verified_fingerprint"], t["in_step"]) for t in status["targets"]] == [
        ("edge-1", fp(new), fp(new), True), ("edge-2", fp(new), fp(old), False)]
    assert status["targets"][1]["last_error"] == "verify: still serving the old certificate"
    runs = status["runs"]
    assert [r["action"] for r in runs][:3] == ["renewal.failed", "target.verified", "certificate.issued"]
    assert all(r["flow_run_id"] == run_id for r in runs[:3])
    assert "managed:idle" not in {r["object"] for r in runs}
    assert "managed.added" in {r["action"] for r in runs}

    text = ok("status", "web")
    for expected in (fp(new), "edge-1 (ssh-nginx)", "in step", "not verified", "issue: the CA said no",
                     f"flow run {run_id}", "target.verified"):
        assert expected in text, expected
    everything = json.loads(ok("status", "--json"))
    assert [s["name"] for s in everything] == ["idle", "web"]  # soonest renewal first: idle is due now
    assert everything[0]["current"] is None and everything[0]["due"] is True
    missing = cli("status", "nope")
    assert missing.exit_code == 1 and "no managed certificate named 'nope'" in missing.stderr


# ------------------------------------------------------------------------------------------ issuer blocks

def test_without_a_prefect_api_ca_init_says_how_to_register_the_block(engine: sa.Engine, no_prefect_api: None) -> None:
    result = cli("ca", "init", "corp", "--base-url", "http://pki.example.com")
    assert result.exit_code == 0, result.output
    assert "certpilot ca register-block corp" in flat(result.stdout)
    assert "--issuer private-ca/corp" in flat(result.stdout)
    info = json.loads(ok("ca", "list", "--json"))[0]
    assert info["name"] == "corp"
    register = cli("ca", "register-block", "corp")
    assert register.exit_code == 1 and "PREFECT_API_URL is not set" in flat(register.stderr)
    add = cli("managed", "add", "web", "--dns", "web.example.test", "--issuer", "private-ca/corp",
              "--owner", "platform")
    assert add.exit_code == 0
    assert "warning: PREFECT_API_URL is not set: issuer block private-ca/corp was not checked" in flat(add.stderr)
