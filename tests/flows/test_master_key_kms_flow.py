"""The master key held in AWS KMS, through a real flow: against a real moto server, a private CA whose
keys were sealed under a file master key is moved into KMS with `certpilot keys rotate-master` (the
file then removed: only KMS can open anything), renew-certificate issues a certificate and stores its
key sealed under the KMS-held master key, and `certpilot inventory export --include-key` reads that key back
(it belongs to the certificate). Then the KMS endpoint is black-holed (lab.fault_proxy): the renewal
fails within its timeouts, naming the KMS key, and writes nothing (no certificate, no key row).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlmodel import col, func, select
from typer.testing import CliRunner

from blocks.issuers import PrivateCABlock
from certpilot import audit, ca, keystore, managed
from certpilot.database import get_engine, read_session, write_session
from certpilot.keys import key_matches_certificate
from certpilot.models import AuditEvent, Certificate, PrivateKey
from certpilot.settings import load_settings
from cli.main import app
from flows.renew import renew_certificate
from lab.fault_proxy import FaultProxy, Faults
from lab.moto import ACCESS_KEY_ID, SECRET_ACCESS_KEY, MotoServer
from tasks.renewal import configure_retries

ACTOR = audit.Actor("test:kms-flow")
REGION = "eu-west-1"
ALIAS = "alias/certpilot-master-flow"
CA_NAME = "kms-ca"
NAME = "kms-web"
TIMEOUT = 0.5  # CERTPILOT_MASTER_KEY_KMS_TIMEOUT: each KMS call's connect and read timeout
FAIL_WITHIN = 60.0  # the whole failed run: 3 attempts per KMS call, each task's retries (tiny backoff)


@pytest.fixture(scope="module")
def moto_kms(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    with MotoServer.start(tmp_path_factory.mktemp("moto-kms")) as server:
        yield server


@pytest.fixture
def tiny_retries() -> Iterator[None]:
    configure_retries(0.01)
    yield
    configure_retries(5)


def _cli(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.stdout


def _counts(engine: sa.Engine) -> tuple[int, int, int]:
    with read_session(engine) as session:
        return (session.exec(select(func.count()).select_from(Certificate)).one(),
                session.exec(select(func.count()).select_from(PrivateKey)).one(),
                session.exec(select(func.max(AuditEvent.seq))).one() or 0)


def test_a_master_key_in_kms_works_through_renew_certificate_and_a_kms_outage_writes_nothing(
        moto_kms: MotoServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_retries: None) -> None:
    moto_kms.reset()
    arn = moto_kms.client("kms", REGION).create_key(Description="certpilot master key")["KeyMetadata"]["Arn"]
    moto_kms.client("kms", REGION).create_alias(AliasName=ALIAS, TargetKeyId=arn)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY)

    # A private CA and a managed certificate, the CA's keys sealed under the default master key file.
    engine = get_engine()
    file_ring = keystore.load_key_ring(load_settings())
    with write_session(engine) as session:
        ca.init_ca(session, file_ring, ACTOR, CA_NAME, "http://127.0.0.1:8888")
        managed.add(session, managed.ManagedSpec(name=NAME, dns_names=(f"{NAME}.example.test",),
                                                 issuer=f"private-ca/{CA_NAME}", owner="platform"), ACTOR)
    PrivateCABlock.register_type_and_schema()
    PrivateCABlock(ca_name=CA_NAME).save(CA_NAME, overwrite=True)

    # Into KMS: rotate-master re-seals every key under a KMS data key; the file key is then removed.
    monkeypatch.setenv("CERTPILOT_MASTER_KEY_KMS", ALIAS)
    monkeypatch.setenv("CERTPILOT_MASTER_KEY_KMS_REGION", REGION)
    monkeypatch.setenv("CERTPILOT_MASTER_KEY_KMS_ENDPOINT_URL", moto_kms.url)
    monkeypatch.setenv("CERTPILOT_MASTER_KEY_KMS_TIMEOUT", str(TIMEOUT))
    rotation = json.loads(_cli("keys", "rotate-master", "--json"))
    assert rotation["kms_key_arn"] == arn and rotation["keys"] >= 1
    load_settings().master_key_file.unlink()
    kms_master = rotation["new"]

    # renew-certificate, its key ring opened by KMS: a certificate, and its key sealed under the KMS-held key.
    state = renew_certificate(name=NAME, return_state=True)
    assert state.is_completed(), state.message
    with read_session(engine) as session:  # its first certificate (the run's result is not kept by Prefect)
        [issued] = session.exec(select(Certificate).where(
            Certificate.managed_certificate_id == managed.get(session, NAME).id)).all()
        fingerprint = issued.fingerprint_sha256
        key_row = session.exec(select(PrivateKey).where(PrivateKey.spki_sha256 == issued.spki_sha256)).one()
        assert key_row.master_key_id == kms_master and key_row.wrapped_data_key
        assert {r.master_key_id for r in session.exec(select(PrivateKey))} == {kms_master}

    # Read back: export with the key (opened through KMS) gives the certificate's own key.
    out = tmp_path / "export.pem"
    _cli("inventory", "export", fingerprint, "--include-key", "--plaintext-key", "--output", str(out))
    pem = out.read_bytes()
    cert = x509.load_pem_x509_certificates(pem)[0]
    start = pem.index(b"-----BEGIN PRIVATE KEY-----")
    key = serialization.load_pem_private_key(pem[start:], password=None)
    assert key_matches_certificate(key, cert)
    assert cert.public_bytes(serialization.Encoding.DER) == issued.der

    # The KMS endpoint black-holed (accepts, never answers): the renewal fails in time, naming the KMS key.
    before = _counts(engine)
    with FaultProxy(("127.0.0.1", moto_kms.port), Faults(black_hole=1.0), seed=12, mode="tcp") as proxy:
        monkeypatch.setenv("CERTPILOT_MASTER_KEY_KMS_ENDPOINT_URL", proxy.url)
        started = time.monotonic()
        failed = renew_certificate(name=NAME, return_state=True)
        took = time.monotonic() - started
    assert failed.is_failed(), failed
    assert took < FAIL_WITHIN, took
    message = failed.message or ""
    assert f"KMS key {arn} did not answer" in message and "nothing was changed" in message, message
    # Nothing written: no certificate, no key row; the only events since are the failure's own records.
    after = _counts(engine)
    assert after[:2] == before[:2], (before, after)
    with read_session(engine) as session:
        since = list(session.exec(select(AuditEvent.action).where(col(AuditEvent.seq) > before[2])))
        assert not {"certificate.issued", "key.stored"} & set(since), since
        current = managed.current_certificate(session, managed.get(session, NAME))
        assert current is not None and current.fingerprint_sha256 == fingerprint
        assert audit.verify(session).events == after[2]
