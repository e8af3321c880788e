"""Fuzzing the parsers: valid seeds in every format (tests/corpus/fuzz/seeds), mutated byte by byte
(flip, truncate, insert, delete, splice, a length byte set to a boundary), inside and outside the PEM
armour. The property: reading the input, describing what it held, matching its keys and ordering its
chains either succeeds or raises certpilot's own error (ParseError, KeyMismatchError), and never
hangs. Every file under tests/corpus/fuzz (the seeds, and each crasher a run ever found, kept in
crashers/) is replayed by a plain test on every run.

Bounded: a few hundred examples per test, a deadline per example, no example database in CI (a
local run keeps one under .hypothesis/, which git ignores).
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase

from certpilot.chain import order_chains
from certpilot.errors import KeyMismatchError, ParseError
from certpilot.formats import load_bundle
from certpilot.importer import ImportOptions, parse_file
from certpilot.pem import looks_like_pem, read_pem_blocks, to_pem
from certpilot.x509info import describe_certificate

FUZZ_DIR = Path(__file__).resolve().parents[1] / "corpus" / "fuzz"
REPO = Path(__file__).resolve().parents[2]
PASSWORD = b"fuzz-password"
# In CI (CI set, as every CI service does) nothing is written; locally failures are remembered
# under .hypothesis/ (git-ignored) and replayed first.
_DATABASE = None if os.environ.get("CI") else DirectoryBasedExampleDatabase(str(REPO / ".hypothesis" / "examples"))
# Hypothesis warns when the global random module's state changes while a strategy draws; in a session
# where the flows' Prefect harness runs, its background threads draw from it (jitter), which is no
# fault of these strategies (they use only hypothesis' own draws).
pytestmark = pytest.mark.filterwarnings("ignore:Do not use the `random` module inside strategies")
FUZZ = settings(max_examples=400, deadline=dt.timedelta(seconds=2), database=_DATABASE, derandomize=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _committed() -> list[Path]:
    return sorted(p for p in FUZZ_DIR.rglob("*") if p.is_file() and p.name != "README.md")


def _generated_seeds() -> dict[str, bytes]:
    """Seeds that hold a private key, made afresh (no key is checked in)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "key.fuzz.test")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # small: the parser's speed, not strength
    return {
        "cert-and-key.pem": cert_pem + key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()),
        "cert-and-encrypted-key.pem": cert_pem + key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(PASSWORD)),
        "rsa-traditional.key": rsa_key.private_bytes(serialization.Encoding.PEM,
                                                     serialization.PrivateFormat.TraditionalOpenSSL,
                                                     serialization.NoEncryption()),
        "key.der": key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()),
        "bundle.p12": pkcs12.serialize_key_and_certificates(
            b"fuzz", key, cert, None, serialization.PrivateFormat.PKCS12.encryption_builder().kdf_rounds(1)
            .key_cert_algorithm(pkcs12.PBES.PBESv2SHA256AndAES256CBC).build(PASSWORD)),
    }


SEEDS: dict[str, bytes] = {p.name: p.read_bytes() for p in _committed() if p.parent.name == "seeds"}
SEEDS.update(_generated_seeds())


def check_parsers(data: bytes, password: bytes | None) -> None:
    """The property: certpilot's errors or a result, nothing else."""
    if looks_like_pem(data):
        try:
            read_pem_blocks(data, "fuzz")
        except ParseError:
            pass
    try:
        bundle = load_bundle(data, source="fuzz", password=password)
    except ParseError:
        return
    described = []
    for cert in bundle.certificates:
        try:
            describe_certificate(cert)
            described.append(cert)
        except ParseError:
            pass
    order_chains(described)
    try:
        parse_file(data, "fuzz", ImportOptions(password=password))
    except (ParseError, KeyMismatchError):
        pass


# ------------------------------------------------------------------ mutations

_BOUNDARY_BYTES = (0x00, 0x01, 0x7F, 0x80, 0x81, 0x82, 0x84, 0xFF)


def _mutate(draw: st.DrawFn, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(("flip", "boundary", "truncate", "insert", "delete", "splice")))
        at = draw(st.integers(0, len(buf)))
        if op == "flip" and buf:
            buf[min(at, len(buf) - 1)] ^= 1 << draw(st.integers(0, 7))
        elif op == "boundary" and buf:
            buf[min(at, len(buf) - 1)] = draw(st.sampled_from(_BOUNDARY_BYTES))
        elif op == "truncate":
            del buf[at:]
        elif op == "insert":
            buf[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del buf[at:at + draw(st.integers(1, 64))]
        elif op == "splice":
            donor = SEEDS[draw(st.sampled_from(sorted(SEEDS)))]
            start = draw(st.integers(0, len(donor)))
            buf[at:at] = donor[start:start + draw(st.integers(1, 256))]
    return bytes(buf)


@st.composite
def mutated(draw: st.DrawFn, kinds: tuple[str, ...]) -> bytes:
    names = sorted(n for n in SEEDS if n.endswith(kinds))
    data = SEEDS[draw(st.sampled_from(names))]
    if looks_like_pem(data) and draw(st.booleans()):
        # Inside the armour: the base64 stays valid, so the damage reaches the DER parsers.
        blocks = read_pem_blocks(data)
        target = draw(st.integers(0, len(blocks) - 1))
        return "".join(to_pem(b.label, _mutate(draw, b.der) if i == target else b.der)
                       for i, b in enumerate(blocks)).encode("ascii")
    return _mutate(draw, data)


passwords = st.sampled_from((None, PASSWORD))


@pytest.mark.timeout(60)
@FUZZ
@given(mutated((".pem", ".key")), passwords)
def test_fuzz_pem(data: bytes, password: bytes | None) -> None:
    check_parsers(data, password)


@pytest.mark.timeout(60)
@FUZZ
@given(mutated((".der",)), passwords)
def test_fuzz_der(data: bytes, password: bytes | None) -> None:
    check_parsers(data, password)


@pytest.mark.timeout(60)
@FUZZ
@given(mutated((".p7b",)), passwords)
def test_fuzz_pkcs7(data: bytes, password: bytes | None) -> None:
    check_parsers(data, password)


@pytest.mark.timeout(60)
@FUZZ
@given(mutated((".p12",)), passwords)
def test_fuzz_pkcs12(data: bytes, password: bytes | None) -> None:
    check_parsers(data, password)


# ------------------------------------------------------------------ the committed corpus, every run

def test_the_fuzz_corpus_has_seeds_in_every_format() -> None:
    names = {p.name for p in (FUZZ_DIR / "seeds").iterdir()}
    for suffix in (".pem", ".der", ".p7b", ".p12"):
        assert any(n.endswith(suffix) for n in names), suffix
    for path in _committed():  # no key material is ever committed
        assert b"PRIVATE KEY" not in path.read_bytes(), path


@pytest.mark.timeout(60)
@pytest.mark.parametrize("path", _committed(), ids=lambda p: f"{p.parent.name}/{p.name}")
@pytest.mark.parametrize("password", [None, PASSWORD], ids=["no-password", "password"])
def test_replay_committed_input(path: Path, password: bytes | None) -> None:
    check_parsers(path.read_bytes(), password)
