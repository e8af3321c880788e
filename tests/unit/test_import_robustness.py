"""A directory import survives what it finds: certificates cryptography loads but cannot describe, a
FIFO, a directory it may not list, a tree 2,000 directories deep. Each is that path's error; the good
files beside it are imported, and the import returns normally. Real certificates throughout."""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from certpilot import audit
from certpilot.database import read_session
from certpilot.errors import CertpilotError, InvalidOptionError, ParseError
from certpilot.importer import (DEFAULT_MAX_BYTES, ImportOptions, ImportReport, _parse_chunk, import_paths,
                                iter_files, read_input)
from certpilot.models import Certificate

ACTOR = audit.Actor("test:robustness")


def _load_builder() -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "corpus" / "build.py"
    spec = importlib.util.spec_from_file_location("certpilot_tests_corpus_build", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


build = _load_builder()


@pytest.fixture(scope="module")
def pki():  # noqa: ANN201 - the corpus builder's Pki
    return build.Pki()


def _good(directory: Path, name: str, pki) -> str:  # noqa: ANN001
    """A valid leaf written to ``directory/name``; its fingerprint."""
    cert, _ = pki.leaf(f"{name.replace('.', '-')}.robustness.test")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text(build.pem(cert))
    return build.fingerprint(cert)


def _issued(pki, cn: str, not_after: dt.datetime | None = None) -> bytes:  # noqa: ANN001
    key = ec.generate_private_key(ec.SECP256R1())
    return (x509.CertificateBuilder().subject_name(build._name(cn))
            .issuer_name(pki.intermediate.certificate.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(pki.now - dt.timedelta(days=1))
            .not_valid_after(not_after or pki.now + dt.timedelta(days=30))
            .sign(pki.intermediate.key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))


def _stored(engine: sa.Engine) -> set[str]:
    with read_session(engine) as session:
        return set(session.scalars(sa.select(Certificate.fingerprint_sha256)))


def _by_name(report: ImportReport) -> dict[str, object]:
    return {Path(f.source).name: f for f in report.files}


# ------------------------------------------------------------------ certificates that fail when read

def test_certificates_that_fail_when_described_fail_alone(engine: sa.Engine, tmp_path: Path, pki) -> None:  # noqa: ANN001
    good = {_good(tmp_path, name, pki) for name in ("a-good.pem", "m-good.pem", "z-good.pem")}
    bad_issuer = _issued(pki, "bad-issuer.robustness.test").replace(b"Corpus Issuing CA", b"\xffCorpus Issuing C", 1)
    (tmp_path / "b-bad-issuer.der").write_bytes(bad_issuer)
    year_zero = _issued(pki, "year-zero.robustness.test", dt.datetime(2100, 1, 1, tzinfo=dt.timezone.utc))
    year_zero = year_zero.replace(b"21000101000000Z", b"00000101000000Z")
    (tmp_path / "c-year-zero.pem").write_text(build.pem_block("CERTIFICATE", year_zero))
    huge_serial = build.with_serial(_issued(pki, "huge-serial.robustness.test"), b"\x01" + bytes(99))
    (tmp_path / "d-huge-serial.crt").write_bytes(huge_serial)

    report = import_paths(engine, [str(tmp_path)], ImportOptions(batch_size=1000), ACTOR)

    files = _by_name(report)
    assert {n: f.status for n, f in files.items()} == {
        "a-good.pem": "imported", "m-good.pem": "imported", "z-good.pem": "imported",
        "b-bad-issuer.der": "failed", "c-year-zero.pem": "failed", "d-huge-serial.crt": "failed"}
    fp = hashlib.sha256(bad_issuer).hexdigest()[:16]
    assert files["b-bad-issuer.der"].error.startswith(f"certificate {fp}: the issuer name cannot be read (")
    assert files["c-year-zero.pem"].error == (
        f"certificate {hashlib.sha256(year_zero).hexdigest()[:16]}: the end of the validity period (not after) "
        "cannot be read (year 0 is out of range)")
    assert files["d-huge-serial.crt"].error == (
        f"certificate {hashlib.sha256(huge_serial).hexdigest()[:16]}: its serial number is 200 hex digits, "
        "more than the 130 the inventory keeps")
    for result in files.values():
        assert result.error is None or ("BEGIN" not in result.error and "Traceback" not in result.error)
    assert report.failed == 3
    assert _stored(engine) == good


def test_a_worker_process_leaves_a_bad_file_to_the_importing_process(tmp_path: Path, pki) -> None:  # noqa: ANN001
    _good(tmp_path, "good.pem", pki)
    year_zero = _issued(pki, "worker.robustness.test", dt.datetime(2100, 1, 1, tzinfo=dt.timezone.utc))
    (tmp_path / "bad.pem").write_text(build.pem_block("CERTIFICATE", year_zero.replace(b"2100", b"0000", 1)))
    parsed = _parse_chunk([(str(tmp_path / "bad.pem"), None), (str(tmp_path / "good.pem"), None)], DEFAULT_MAX_BYTES)
    assert parsed[0] is None and parsed[1] is not None and len(parsed[1].records) == 1


# ------------------------------------------------------------------ what a directory walk meets

@pytest.mark.timeout(30)
def test_a_fifo_is_reported_and_never_opened(engine: sa.Engine, tmp_path: Path, pki) -> None:  # noqa: ANN001
    good = _good(tmp_path, "good.pem", pki)
    os.mkfifo(tmp_path / "pipe.pem")  # nobody writes to it: an open() for reading would wait forever
    report = import_paths(engine, [str(tmp_path)], ImportOptions(), ACTOR)
    results = {f.source: f for f in report.files}
    walked = results[str(tmp_path / "pipe.pem")]
    assert walked.status == "failed" and walked.error == "not a regular file (a FIFO): not read"
    assert results[str(tmp_path / "good.pem")].status == "imported"
    assert _stored(engine) == {good}
    # A path that turns into a FIFO after the walk is not waited on either.
    with pytest.raises(ParseError, match=r"^.*: not a regular file \(a FIFO\): not read$"):
        read_input(str(tmp_path / "pipe.pem"), DEFAULT_MAX_BYTES)


def test_a_fifo_named_on_the_command_line(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.crt")
    assert list(iter_files([str(tmp_path / "pipe.crt")])) == [
        (str(tmp_path / "pipe.crt"), "not a regular file or directory (a FIFO)")]


def test_a_directory_that_vanishes_before_it_is_listed_is_reported(tmp_path: Path) -> None:
    """The walk lists ``tmp_path``, then ``a/``, and yields ``a``'s file before it lists ``b/``; ``b``
    removed in between cannot be listed, which is ``b``'s error, and ``c`` is walked still."""
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "cert.pem").write_bytes(b"")
    walk = iter_files([str(tmp_path)])
    assert next(walk) == (str(tmp_path / "a" / "cert.pem"), None)
    shutil.rmtree(tmp_path / "b")
    assert list(walk) == [(str(tmp_path / "b"), "directory cannot be listed: No such file or directory"),
                          (str(tmp_path / "c" / "cert.pem"), None)]


_CHILD = textwrap.dedent("""
    import json, sys
    from certpilot import audit, database
    from certpilot.importer import ImportOptions, import_paths
    report = import_paths(database.get_engine(), [sys.argv[1]], ImportOptions(), audit.Actor("test:robustness"))
    print(json.dumps([f.as_dict() for f in report.files]))
""")


def test_an_unreadable_directory_is_reported(tmp_path: Path, pki) -> None:  # noqa: ANN001
    """chmod 000 stops anyone but root, and the tests run as root: the import runs in a child process
    without the two capabilities that let root read any directory (setpriv, util-linux)."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is needed to drop root's CAP_DAC_READ_SEARCH and CAP_DAC_OVERRIDE")
    top = tmp_path / "top"
    _good(top / "open", "good.pem", pki)
    _good(top / "locked", "hidden.pem", pki)
    os.chmod(top / "locked", 0)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CERTPILOT_")}
    env.update(CERTPILOT_HOME=str(tmp_path / "home"), PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    drop = "-dac_override,-dac_read_search"
    try:
        done = subprocess.run([setpriv, f"--bounding-set={drop}", f"--inh-caps={drop}", sys.executable, "-c", _CHILD,
                               str(top)], env=env, capture_output=True, text=True, timeout=120)
    finally:
        os.chmod(top / "locked", 0o755)
    if done.returncode != 0 and "setpriv" in done.stderr:
        pytest.skip(f"setpriv cannot drop capabilities here: {done.stderr.strip()[:200]}")
    assert done.returncode == 0, done.stderr
    results = {f["source"]: f for f in json.loads(done.stdout)}
    assert results[str(top / "locked")]["status"] == "failed"
    assert results[str(top / "locked")]["error"] == "directory cannot be listed: Permission denied"
    assert results[str(top / "open" / "good.pem")]["status"] == "imported"


def test_a_tree_2000_directories_deep_is_walked(engine: sa.Engine, tmp_path: Path, pki) -> None:  # noqa: ANN001
    top = tmp_path / "deep"
    top.mkdir()
    fingerprints = {_good(top, "top.pem", pki)}
    bottom = top
    try:
        for _ in range(2000):  # one level at a time: Path.mkdir(parents=True) recurses
            bottom = bottom / "d"
            bottom.mkdir()
        fingerprints.add(_good(bottom, "bottom.pem", pki))
        report = import_paths(engine, [str(top)], ImportOptions(), ACTOR)
        assert [(Path(f.source).name, f.status) for f in report.files] == [("top.pem", "imported"),
                                                                           ("bottom.pem", "imported")]
        assert _stored(engine) == fingerprints
    finally:
        (bottom / "bottom.pem").unlink(missing_ok=True)
        while bottom != top:  # bottom up, without recursion (shutil.rmtree recurses)
            bottom.rmdir()
            bottom = bottom.parent


# ------------------------------------------------------------------ options

@pytest.mark.parametrize("max_bytes", [-1, 0])
def test_max_bytes_must_be_positive(max_bytes: int) -> None:
    with pytest.raises(InvalidOptionError) as info:
        ImportOptions(max_bytes=max_bytes)
    assert isinstance(info.value, CertpilotError) and isinstance(info.value, ValueError)
    assert info.value.option == "max_bytes" and info.value.value == max_bytes
    assert str(info.value) == f"max_bytes must be a positive number of bytes, not {max_bytes}"


def test_batch_size_must_be_positive() -> None:
    with pytest.raises(InvalidOptionError, match=r"^batch_size must be a positive number of certificates, not 0$"):
        ImportOptions(batch_size=0)
