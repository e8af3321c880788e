"""A black hole (a loopback listener that accepts every connection and never sends a byte) in every place
certpilot talks to: an ACME CA's directory, an SSH host (deploying and discovering), a TLS endpoint (a
deploy's verification, a scan, the monitor's probe), a CRL and OCSP responder, and the monitor's checks of
CAs and SSH hosts. Each fails within its timeout, with an error that names host:port and what it was doing.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import AuthorityInformationAccessOID, NameOID

from certpilot import keystore
from certpilot.deployment import VerificationError
from certpilot.discovery import Found, Problem
from certpilot.errors import AcmeServerError, CertpilotError
from certpilot.issuance import build_csr
from certpilot.monitoring import Place
from certpilot.settings import load_settings
from certpilot.target_kinds import NginxSettings
from connectors.acme_issuer import AcmeIssuer
from connectors.challenges import Http01Responder
from connectors.endpoint_probe import probe
from connectors.reachability import http_answers, ssh_answers
from connectors.revocation import RevocationChecker, RevocationStatus
from connectors.ssh import SshConnection
from connectors.ssh_deploy import NginxDeployer
from connectors.ssh_source import SshSource
from connectors.tls_scan import Probe, TlsScanSource
from connectors.tls_verify import TlsTimeoutError, fetch_chain, wait_until_served
from lab.ports import free_port
from lab.receivers import BlackHole
from lab.sshd import generate_client_key, openssh_private_text, openssh_public_line
from lab.tls_farm import make_farm_ca

TIMEOUT = 1.0
SLACK = 2.0  # thread start-up, name resolution, the machine being shared


@pytest.fixture
def hole() -> Iterator[BlackHole]:
    with BlackHole() as listener:
        yield listener


class timed:  # noqa: N801 - reads as a phrase: "with timed(TIMEOUT):" fails a step that took longer
    def __init__(self, limit: float) -> None:
        self.limit = limit

    def __enter__(self) -> None:
        self.started = time.monotonic()

    def __exit__(self, *exc: object) -> None:
        took = time.monotonic() - self.started
        assert took < self.limit + SLACK, f"took {took:.1f} s, more than {self.limit:g} s (+{SLACK:g} s)"


def test_an_acme_directory_that_never_answers(hole: BlackHole, engine: sa.Engine) -> None:
    issuer = AcmeIssuer(engine, "black-hole-ca", f"http://127.0.0.1:{hole.port}/dir",
                        key_ring=lambda: keystore.load_key_ring(load_settings()),
                        solver=Http01Responder("127.0.0.1", free_port()), timeout=TIMEOUT, order_timeout=5 * TIMEOUT)
    csr = build_csr(ec.generate_private_key(ec.SECP256R1()), ["www.example.test"])
    with timed(3 * TIMEOUT), pytest.raises(AcmeServerError) as raised:
        issuer.issue(csr, "tls-server")
    message = str(raised.value)
    assert f"127.0.0.1:{hole.port}" in message and "no answer within 1 s" in message, message
    assert "black-hole-ca" in message


def _ssh(port: int) -> SshConnection:
    host_key = generate_client_key()
    return SshConnection("127.0.0.1", port, "deploy", openssh_private_text(generate_client_key()),
                         f"[127.0.0.1]:{port} {openssh_public_line(host_key)}", connect_timeout=TIMEOUT,
                         operation_timeout=TIMEOUT, command_timeout=TIMEOUT)


def test_an_ssh_host_that_never_answers_fails_a_deploy_and_a_discovery(hole: BlackHole) -> None:
    settings = NginxSettings(certificate_path="/etc/nginx/site.pem", key_path="/etc/nginx/site.key")
    deployer = NginxDeployer("web1", _ssh(hole.port), settings)
    with timed(TIMEOUT), pytest.raises(CertpilotError) as raised:
        deployer.current()
    message = str(raised.value)
    assert f"deploy@127.0.0.1:{hole.port}" in message and "web1" in message, message
    assert "banner" in message.lower() or "key exchange" in message, message

    source = SshSource(_ssh(hole.port), ["/etc/ssl/*.pem"])
    with timed(TIMEOUT), pytest.raises(CertpilotError) as raised:
        list(source.discover())
    message = str(raised.value)
    assert f"deploy@127.0.0.1:{hole.port}" in message, message
    assert "banner" in message.lower() or "key exchange" in message, message


def test_a_tls_endpoint_that_never_answers(hole: BlackHole) -> None:
    with timed(TIMEOUT), pytest.raises(TlsTimeoutError) as raised:
        fetch_chain("127.0.0.1", hole.port, sni="www.example.test", timeout=TIMEOUT)
    assert str(raised.value) == (f"127.0.0.1:{hole.port} sni=www.example.test: no answer to the TLS ClientHello "
                                 "within 1 s (connected, silent)")

    with timed(2 * TIMEOUT), pytest.raises(VerificationError) as verified:
        wait_until_served("127.0.0.1", hole.port, "ab" * 32, target="web1", timeout=2 * TIMEOUT)
    assert f"127.0.0.1:{hole.port}" in str(verified.value) and "silent" in str(verified.value)

    with timed(TIMEOUT):
        [item] = TlsScanSource.of_probes("black-hole", [Probe("127.0.0.1", hole.port)], timeout=TIMEOUT).scan()
    assert isinstance(item, Problem) and not isinstance(item, Found)
    assert item.locator == f"tls://127.0.0.1:{hole.port}" and "connected, silent" in item.reason

    place = Place(f"tls://127.0.0.1:{hole.port}", "127.0.0.1", hole.port)
    with timed(TIMEOUT):
        [seen] = probe([place], timeout=TIMEOUT).observed
    assert seen.served is None and seen.error is not None and "connected, silent" in seen.error


def _leaf_pointing_at(port: int) -> tuple[x509.Certificate, x509.Certificate]:
    """A leaf whose CRL distribution point and OCSP responder are ``port`` on loopback, and its issuer."""
    ca = make_farm_ca()
    now = dt.datetime.now(dt.timezone.utc)
    crl = x509.UniformResourceIdentifier(f"http://127.0.0.1:{port}/issuing.crl")
    responder = x509.UniformResourceIdentifier(f"http://127.0.0.1:{port}/ocsp")
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "revocation.example.test")]))
            .issuer_name(ca.intermediate.subject).public_key(ec.generate_private_key(ec.SECP256R1()).public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.CRLDistributionPoints([x509.DistributionPoint([crl], None, None, None)]),
                           critical=False)
            .add_extension(x509.AuthorityInformationAccess([
                x509.AccessDescription(AuthorityInformationAccessOID.OCSP, responder)]), critical=False)
            .sign(ca.intermediate_key, hashes.SHA256()))
    return leaf, ca.intermediate


def test_a_crl_and_ocsp_responder_that_never_answer(hole: BlackHole) -> None:
    leaf, issuer = _leaf_pointing_at(hole.port)
    with RevocationChecker(timeout=TIMEOUT) as checker:
        with timed(2 * TIMEOUT):  # the CRL, then OCSP: each its timeout
            result = checker.check(leaf, issuer)
        assert result.status is RevocationStatus.UNKNOWN
        assert (f"CRL http://127.0.0.1:{hole.port}/issuing.crl (127.0.0.1:{hole.port}) did not answer within 1 s "
                "while fetching the CRL") in result.reason
        assert (f"OCSP http://127.0.0.1:{hole.port}/ocsp (127.0.0.1:{hole.port}) did not answer within 1 s while "
                "asking the OCSP responder") in result.reason
        other, _ = _leaf_pointing_at(hole.port)
        with timed(0):  # the next certificate of that CA costs nothing: the URLs are left alone for a while
            assert checker.check(other, issuer).status is RevocationStatus.UNKNOWN
        assert {u.what for u in checker.unreachable()} == {"CRL", "OCSP"}


def test_the_monitor_sees_a_ca_and_an_ssh_host_that_never_answer(hole: BlackHole) -> None:
    with timed(TIMEOUT):
        why = http_answers(f"http://127.0.0.1:{hole.port}/dir", "the ACME directory of acme-issuer/corp", TIMEOUT)
    assert why == (f"the ACME directory of acme-issuer/corp http://127.0.0.1:{hole.port}/dir (127.0.0.1:{hole.port}) "
                   "did not answer within 1 s while waiting for the HTTP answer")
    with timed(TIMEOUT):
        why = ssh_answers("127.0.0.1", hole.port, "the SSH host of ssh-host/web1", TIMEOUT)
    assert why == (f"the SSH host of ssh-host/web1 (127.0.0.1:{hole.port}) did not answer within 1 s while waiting "
                   "for its SSH identification line")
