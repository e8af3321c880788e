"""The discover flow applies the policy against a real Prefect server and a real TLS server on loopback:
the ownership rules give the certificate found its owner, the endpoint rules are stored for its place,
the ``policy`` artifact shows the violations by rule and the worst certificates (escaped), and a policy
file that does not load fails the run after everything was recorded, naming the file and the line."""

from __future__ import annotations

import datetime as dt
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from sqlmodel import select

from blocks.tls_scan import TlsScanBlock
from certpilot.database import get_engine, read_session
from certpilot.models import Certificate, Location, PolicyViolation
from certpilot.sample_estate import Authority, issue_leaf
from flows.discover import discover
from tests.flows.test_renew_flows import _artifacts
from tests.integration.tls.conftest import SwitchingServer

POLICY = """
rules:
  tls-min-version: {minimum: TLSv1.3}
ownership:
  - match: {domain: shop.example.test, source: "tls-scan:*"}
    owner: "shop | <b>team</b>"
"""


def _fp(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


@pytest.fixture
def server(ca: tuple[Authority, Authority], tmp_path: Path) -> Iterator[tuple[SwitchingServer, x509.Certificate]]:
    """A TLS server offering TLS 1.2 at most, with its full chain, for shop.example.test."""
    cert, key = issue_leaf(ca[1], ["shop.example.test"], dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=60))
    (tmp_path / "chain.pem").write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM)
                                                  for c in (cert, ca[1].certificate)))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "chain.pem", tmp_path / "key.pem")
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    with SwitchingServer(lambda _n: context) as running:
        yield running, cert


@pytest.fixture
def scan(server: tuple[SwitchingServer, x509.Certificate], ca: tuple[Authority, Authority], prefect_server: None,
         certpilot_home: Path) -> str:
    TlsScanBlock.register_type_and_schema()
    TlsScanBlock(targets=[f"127.0.0.1:{server[0].port}"], sni_names=["shop.example.test"], timeout_seconds=2.0,
                 trust_bundle_pem=ca[0].certificate.public_bytes(serialization.Encoding.PEM).decode()).save(
        "policy-lab", overwrite=True)
    return "tls-scan/policy-lab"


def test_discover_gives_owners_stores_endpoint_rules_and_publishes_the_policy_artifact(
        scan: str, server: tuple[SwitchingServer, x509.Certificate], certpilot_home: Path) -> None:
    certpilot_home.mkdir(parents=True, exist_ok=True)
    (certpilot_home / "policy.yaml").write_text(POLICY)
    running, cert = server
    state = discover([scan], return_state=True)
    assert state.is_completed(), state.message
    place = f"tls://127.0.0.1:{running.port}?sni=shop.example.test"
    with read_session(get_engine()) as session:
        row = session.get(Certificate, _fp(cert))
        assert row is not None and row.owner == "shop | <b>team</b>"
        stored = {(v.certificate_fingerprint, v.place, v.rule) for v in session.exec(select(PolicyViolation))}
    assert stored == {(_fp(cert), place, "tls-min-version")}
    [summary] = state.result().sources  # type: ignore[union-attr]
    assert (summary.owners_assigned, summary.violations) == (1, 1)

    assert state.state_details.flow_run_id is not None
    artifact = _artifacts(state.state_details.flow_run_id, "policy")[0].data
    assert "| tls-min-version | 1 |" in artifact and "| owner-required | 0 |" in artifact
    assert _fp(cert)[:16] in artifact and "shop.example.test" in artifact
    assert "<b>" not in artifact and "&lt;b&gt;team&lt;/b&gt;" in artifact and "shop \\| " in artifact
    assert "| tls-scan:policy-lab | 1 | 1 | applied |" in artifact


def test_a_policy_file_that_does_not_load_fails_the_run_after_recording(
        scan: str, server: tuple[SwitchingServer, x509.Certificate], certpilot_home: Path) -> None:
    certpilot_home.mkdir(parents=True, exist_ok=True)
    (certpilot_home / "policy.yaml").write_text("rules:\n  key-size: {rsa: lots}\n")
    state = discover([scan], return_state=True)
    assert state.is_failed() and state.message is not None
    assert "policy was not applied" in state.message and "policy.yaml:2: rule key-size" in state.message
    with read_session(get_engine()) as session:
        assert [loc.certificate_fingerprint for loc in session.exec(select(Location))] == [_fp(server[1])]
