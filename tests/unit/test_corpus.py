"""The bad-input corpus (tests/corpus/build.py) against the importer: each file alone, the whole
directory in one import on both backends, and the real CLI once."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import sqlalchemy as sa
from cryptography import x509

from certpilot import audit
from certpilot.chain import order_chains
from certpilot.database import read_session
from certpilot.errors import KeyMismatchError, ParseError
from certpilot.importer import DEFAULT_MAX_BYTES, ImportOptions, import_paths, parse_file, read_input
from certpilot.models import AuditEvent, Certificate
from certpilot.x509info import fingerprint_sha256


def _load_builder() -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "corpus" / "build.py"
    spec = importlib.util.spec_from_file_location("certpilot_tests_corpus_build", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


build = _load_builder()
Case = build.Case


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Case]]:
    directory = tmp_path_factory.mktemp("corpus")
    cases = build.build_corpus(directory)
    return directory, {case.name: case for case in cases}


def _base64_runs(data: bytes) -> set[str]:
    """Every long run of base64 text in a file: the bodies of its PEM blocks, line by line."""
    return set(re.findall(r"[A-Za-z0-9+/=]{20,}", data.decode("latin-1")))


def _assert_safe(message: str, data: bytes) -> None:
    """An error names the problem; it never quotes PEM armour or the base64 of what it read."""
    assert "BEGIN" not in message and "-----" not in message, message
    for run in _base64_runs(data):
        assert run not in message, f"error quotes the file's base64: {message}"
    for run in re.findall(r"[A-Za-z0-9+/=]{20,}", message):  # nor any long piece of it
        assert not any(run in line for line in _base64_runs(data)), f"error quotes the file's base64: {message}"


def _read_and_parse(path: Path, case: Case):  # noqa: ANN202 - the importer's private _ParsedFile
    return parse_file(read_input(str(path), DEFAULT_MAX_BYTES), str(path), ImportOptions(password=case.password))


def test_corpus_has_every_case(corpus: tuple[Path, dict[str, Case]]) -> None:
    directory, cases = corpus
    assert sorted(p.name for p in directory.iterdir()) == sorted(build.CASE_NAMES) == sorted(cases)
    assert {c.status for c in cases.values()} == {"failed", "imported", "skipped"}
    bad = {fp for c in cases.values() if c.failed for fp in c.certificates}
    good = {fp for c in cases.values() if not c.failed for fp in c.certificates}
    assert bad and good and not bad & good, "a certificate in a bad file must be in no good one"
    checked_in = [p.name for p in Path(build.__file__).parent.iterdir() if p.suffix in {".pem", ".key", ".p12", ".der"}]
    assert not checked_in, "the corpus is generated; no certificate or key file is checked in beside the builder"


@pytest.mark.parametrize("name", build.CASE_NAMES)
def test_each_file_alone(corpus: tuple[Path, dict[str, Case]], name: str) -> None:
    directory, cases = corpus
    case, path = cases[name], directory / name
    if case.failed:
        with pytest.raises((ParseError, KeyMismatchError)) as info:
            _read_and_parse(path, case)
        error = info.value
        if isinstance(error, ParseError):
            assert error.source == str(path)
            message = error.detail
        else:
            message = str(error)
        assert case.error in message
        _assert_safe(message, path.read_bytes()[:1 << 20])
        return
    parsed = _read_and_parse(path, case)
    records = {r.fingerprint_sha256: r for r in parsed.records}
    assert sorted(records) == sorted(case.certificates)
    assert len(parsed.records) == len(case.certificates)
    assert len(parsed.keys) == case.keys
    for fingerprint, attribute, expected in case.fields:
        assert getattr(records[fingerprint], attribute) == expected, (attribute, records[fingerprint])
    for note in case.notes:
        assert any(note in n for n in parsed.notes), (note, parsed.notes)
    if not case.notes:
        assert not any("unrecognised" in n or "not positive" in n for n in parsed.notes), parsed.notes
    if case.chain:
        certs = [x509.load_der_x509_certificate(r.der) for r in parsed.records]
        chains = [[fingerprint_sha256(c) for c in chain] for chain in order_chains(certs)]
        assert chains == [list(case.chain)]
    for record in parsed.records:  # times are aware UTC, whatever the input format
        assert record.not_before.utcoffset() is not None and record.not_before.utcoffset().total_seconds() == 0


def test_size_limit_is_checked_before_reading(corpus: tuple[Path, dict[str, Case]]) -> None:
    directory, _ = corpus
    path = directory / "shuffled-chain.pem"
    size = path.stat().st_size
    with pytest.raises(ParseError) as info:
        read_input(str(path), size - 1)
    assert info.value.detail == f"file is {size:,} bytes, more than the {size - 1:,}-byte limit"
    assert read_input(str(path), size) == path.read_bytes()
    with pytest.raises(ParseError, match=r"input is more than the 100-byte limit"):
        read_input("-", 100, stdin=lambda n: path.read_bytes()[:n])
    with pytest.raises(ParseError, match=r"no standard input to read"):
        read_input("-", 100)


def test_small_max_bytes_fails_the_big_files_and_keeps_the_rest(engine: sa.Engine,
                                                                 corpus: tuple[Path, dict[str, Case]]) -> None:
    directory, cases = corpus
    limit = (directory / "leaf.der").stat().st_size + 1
    names = ["leaf.der", "shuffled-chain.pem"]
    report = import_paths(engine, [str(directory / n) for n in names],
                          ImportOptions(max_bytes=limit), audit.Actor("test:corpus"))
    small, big = report.files
    assert (small.status, big.status) == ("imported", "failed")
    assert big.error is not None and f"more than the {limit:,}-byte limit" in big.error
    with read_session(engine) as session:
        stored = set(session.scalars(sa.select(Certificate.fingerprint_sha256)))
    assert stored == set(cases["leaf.der"].certificates)


def test_import_whole_corpus_in_one_call(engine: sa.Engine, corpus: tuple[Path, dict[str, Case]]) -> None:
    directory, cases = corpus
    report = import_paths(engine, [str(directory)], ImportOptions(password=build.CORPUS_PASSWORD),
                          audit.Actor("test:corpus"))
    results = {Path(f.source).name: f for f in report.files}
    assert sorted(results) == sorted(cases)
    for name, case in cases.items():
        result = results[name]
        assert result.status == case.status, (name, result)
        if case.failed:
            assert result.error is not None and case.expected_import_error in result.error, (name, result.error)
            assert "BEGIN" not in result.error
            assert result.certificates == () and result.new_certificates == 0
        else:
            assert result.error is None
            assert sorted(result.certificates) == sorted(set(case.certificates)), name
            assert result.keys_found == case.keys and result.keys_stored == 0
    assert report.failed == sum(case.failed for case in cases.values())
    bad = {fp for case in cases.values() if case.failed for fp in case.certificates}
    good = {fp for case in cases.values() if not case.failed for fp in case.certificates}
    assert report.certificates == len(good) == report.new_certificates
    with read_session(engine) as session:
        stored = set(session.scalars(sa.select(Certificate.fingerprint_sha256)))
        assert not stored & bad  # nothing of a failed file was written ...
        assert stored == good  # ... and every valid certificate beside them was
        added = session.scalar(sa.select(sa.func.count()).select_from(AuditEvent)
                               .where(AuditEvent.action == "certificate.added"))
        assert added == len(good)
        status = audit.verify(session)
    assert status.events >= len(good)


def test_cli_import_reports_every_file(corpus: tuple[Path, dict[str, Case]], tmp_path: Path) -> None:
    directory, cases = corpus
    env = {k: v for k, v in os.environ.items() if not k.startswith("CERTPILOT_")}
    env.update(CERTPILOT_HOME=str(tmp_path / "cli-home"), CORPUS_PASSWORD=build.CORPUS_PASSWORD.decode())
    done = subprocess.run([sys.executable, "-m", "cli", "inventory", "import", str(directory), "--json",
                           "--password-env", "CORPUS_PASSWORD"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    output = json.loads(done.stdout)
    files = {Path(f["source"]).name: f for f in output["files"]}
    assert sorted(files) == sorted(cases)
    for name, case in cases.items():
        assert files[name]["status"] == case.status, (name, files[name])
        if case.failed:
            assert case.expected_import_error in files[name]["error"]
    good = {fp for case in cases.values() if not case.failed for fp in case.certificates}
    assert output["summary"] == {"files": len(cases), "failed": sum(c.failed for c in cases.values()),
                                 "certificates": len(good), "new_certificates": len(good), "keys_stored": 0}
    assert "BEGIN" not in done.stdout and "BEGIN" not in done.stderr
