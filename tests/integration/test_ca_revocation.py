"""Revocation that really works: the private CA's CRLs and OCSP, served by certpilot's HTTP listener
(uvicorn) on a loopback port and checked by the OpenSSL command line and by cryptography, on SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import datetime as dt
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import AuthorityInformationAccessOID
from pkilint.bin import lint_crl, lint_ocsp_response

from certpilot import audit, ca, inventory, keystore
from certpilot.database import read_session, write_session
from certpilot.issuance import IssuedCertificate, Issuer, build_csr
from certpilot.models import AuditEvent, Certificate
from certpilot.sample_estate import issue_leaf, make_ca
from certpilot.settings import load_settings
from certpilot.x509info import describe_certificate
from connectors.http_service import HTTPService, Limits, build_app, parse_listen
from connectors.private_ca import PrivateCAIssuer

UTC = dt.timezone.utc


def _ring() -> keystore.KeyRing:
    return keystore.load_key_ring(load_settings())


def _record(engine: sa.Engine, issued: IssuedCertificate) -> IssuedCertificate:
    """Record what the issuer signed, as a renewal's store step does (the issuer itself records
    nothing): from then on the CA's OCSP and CRL know its serial."""
    with write_session(engine) as session:
        inventory.upsert(session, [inventory.Observation(describe_certificate(c), None, "issued") for c in issued.chain],
                         audit.Actor("test"))
    return issued


def _serve(engine: sa.Engine, *, request_seconds: float = 2.0,
           clock: Callable[[], dt.datetime] | None = None) -> HTTPService:
    """The CA part of certpilot's HTTP listener on a free loopback port, started."""
    return HTTPService(build_app(engine, metrics=False, key_ring=_ring, request_seconds=request_seconds, clock=clock),
                       ("127.0.0.1", 0), limits=Limits(request_seconds=request_seconds)).start()


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


@dataclass
class Served:
    server: HTTPService
    issuer: PrivateCAIssuer
    root: x509.Certificate
    issuing: x509.Certificate
    files: Path
    engine: sa.Engine

    def issue(self, *names: str) -> IssuedCertificate:
        """A certificate for ``names`` from the issuer, recorded as a renewal records it."""
        return _record(self.engine, self.issuer.issue(build_csr(ec.generate_private_key(ec.SECP256R1()), list(names)),
                                                      "tls-server"))

    def get(self, url: str) -> tuple[int, str, bytes]:
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return response.status, response.headers["Content-Type"], response.read()
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, exc.headers["Content-Type"], exc.read()

    def post_ocsp(self, body: bytes, path: str = "/corp/ocsp") -> tuple[int, str, bytes]:
        request = urllib.request.Request(self.server.url + path, data=body, method="POST",
                                         headers={"Content-Type": "application/ocsp-request"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read()

    def openssl_ocsp(self, leaf: x509.Certificate) -> str:
        (self.files / "leaf.pem").write_bytes(_pem(leaf))
        run = subprocess.run(["openssl", "ocsp", "-issuer", "issuing.pem", "-cert", "leaf.pem",
                              "-url", f"{self.server.url}/corp/ocsp", "-CAfile", "root.pem", "-timeout", "10"],
                             cwd=self.files, capture_output=True, text=True, timeout=30, check=False)
        assert run.returncode == 0, run.stdout + run.stderr
        return run.stdout + run.stderr


@pytest.fixture
def served(engine: sa.Engine, tmp_path: Path) -> Iterator[Served]:
    """CA "corp" whose URLs point at a real server on a loopback port."""
    server = _serve(engine)
    try:
        with write_session(engine) as session:
            ca.init_ca(session, _ring(), audit.Actor("test"), "corp", server.url)
            root, issuing = ca.ca_certificates(session, ca.get_ca(session, "corp"))
        (tmp_path / "root.pem").write_bytes(_pem(root))
        (tmp_path / "issuing.pem").write_bytes(_pem(issuing))
        (tmp_path / "chain.pem").write_bytes(_pem(root, issuing))
        yield Served(server, PrivateCAIssuer(engine, "corp", _ring), root, issuing, tmp_path, engine)
    finally:
        server.close()


def _ocsp_request(leaf: x509.Certificate, issuer: x509.Certificate, algorithm: hashes.HashAlgorithm = hashes.SHA1(),
                  nonce: bytes | None = None) -> bytes:
    builder = ocsp.OCSPRequestBuilder().add_certificate(leaf, issuer, algorithm)
    if nonce is not None:
        builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
    return builder.build().public_bytes(serialization.Encoding.DER)


def _verified(response_der: bytes, issuing: x509.Certificate) -> ocsp.OCSPResponse:
    response = ocsp.load_der_ocsp_response(response_der)
    assert response.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
    issuing.public_key().verify(response.signature, response.tbs_response_bytes,  # type: ignore[call-arg, union-attr]
                                ec.ECDSA(response.signature_hash_algorithm))  # type: ignore[arg-type]
    assert response.responder_key_hash == issuing.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    assert response.next_update_utc - response.this_update_utc == ca.OCSP_VALIDITY  # type: ignore[operator]
    return response


def _pkilint_findings(main, args: list[str], der: bytes, path: Path) -> int:  # noqa: ANN001
    """pkilint's own command, in process: the number of findings at WARNING or above."""
    path.write_bytes(der)
    return main(["lint", *args, "-s", "WARNING", str(path)])


def _crl_number(crl: x509.CertificateRevocationList) -> int:
    return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


def test_private_ca_issuer_plays_the_issuer_role(served: Served) -> None:
    issuer = served.issuer
    assert isinstance(issuer, Issuer) and issuer.name == "corp" and issuer.renewal_info(served.issuing) is None
    old = served.issue("app.example.com")
    new = issuer.issue(build_csr(ec.generate_private_key(ec.SECP256R1()), ["app.example.com"]), "tls-server",
                       validity_days=30, replaces=old.leaf)
    assert [c.subject for c in new.chain] == [new.leaf.subject, served.issuing.subject]
    assert new.chain[1] == served.issuing
    with read_session(served.engine) as session:  # the issuer only signs: nothing is recorded by it
        assert session.get(Certificate, new.leaf.fingerprint(hashes.SHA256()).hex()) is None
    _record(served.engine, new)  # (linking what it replaces is the renewal's: tests/unit/test_managed.py)
    with read_session(served.engine) as session:
        row = session.get(Certificate, new.leaf.fingerprint(hashes.SHA256()).hex())
        assert row is not None and row.issuer_fingerprint == served.issuing.fingerprint(hashes.SHA256()).hex()
    run = subprocess.run(["openssl", "verify", "-CAfile", "root.pem", "-untrusted", "issuing.pem", "/dev/stdin"],
                         cwd=served.files, input=_pem(new.leaf), capture_output=True, timeout=30, check=False)
    assert run.returncode == 0, run.stdout + run.stderr


def test_ocsp_good_then_revoked_with_openssl(served: Served) -> None:
    leaf = served.issue("www.example.com").leaf
    answer = served.openssl_ocsp(leaf)
    assert "Response verify OK" in answer and "leaf.pem: good" in answer

    served.issuer.revoke(leaf, x509.ReasonFlags.key_compromise)

    answer = served.openssl_ocsp(leaf)
    assert "Response verify OK" in answer and "leaf.pem: revoked" in answer and "Reason: keyCompromise" in answer
    for algorithm in (hashes.SHA1(), hashes.SHA256()):
        status, content_type, body = served.post_ocsp(_ocsp_request(leaf, served.issuing, algorithm, nonce=b"n" * 16))
        assert (status, content_type) == (200, "application/ocsp-response")
        response = _verified(body, served.issuing)
        assert response.certificate_status == ocsp.OCSPCertStatus.REVOKED
        assert response.revocation_reason == x509.ReasonFlags.key_compromise
        assert response.serial_number == leaf.serial_number and response.hash_algorithm.name == algorithm.name
        assert response.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce == b"n" * 16
        assert _pkilint_findings(lint_ocsp_response.main, [], body, served.files / "response.ocsp") == 0
    with read_session(served.engine) as session:
        row = session.get(Certificate, leaf.fingerprint(hashes.SHA256()).hex())
        assert row.status == "revoked" and row.revocation_reason == "keyCompromise"
        assert response.revocation_time_utc == row.revoked_at.replace(microsecond=0)  # type: ignore[union-attr]
        event = session.execute(sa.select(AuditEvent).where(AuditEvent.action == "certificate.revoked")).scalars().one()
        assert event.object == f"certificate:{row.fingerprint_sha256}"
        audit.verify(session)


def test_ocsp_by_get_unknown_and_unauthorized(served: Served) -> None:
    leaf = served.issue("get.example.com").leaf
    encoded = urllib.parse.quote(base64.b64encode(_ocsp_request(leaf, served.issuing)).decode(), safe="")
    status, content_type, body = served.get(f"{served.server.url}/corp/ocsp/{encoded}")
    assert (status, content_type) == (200, "application/ocsp-response")
    assert _verified(body, served.issuing).certificate_status == ocsp.OCSPCertStatus.GOOD
    raw = base64.b64encode(_ocsp_request(leaf, served.issuing, hashes.SHA256())).decode()  # '/' and '+' left as they are
    assert _verified(served.get(f"{served.server.url}/corp/ocsp/{raw}")[2], served.issuing).certificate_status \
        == ocsp.OCSPCertStatus.GOOD

    never_issued = (ocsp.OCSPRequestBuilder().add_certificate_by_hash(
        *_issuer_hashes(leaf, served.issuing), 0x1234567890ABCDEF, hashes.SHA1()).build()
        .public_bytes(serialization.Encoding.DER))
    assert _verified(served.post_ocsp(never_issued)[2], served.issuing).certificate_status == ocsp.OCSPCertStatus.UNKNOWN

    stranger_ca = make_ca("Stranger CA")
    stranger, _ = issue_leaf(stranger_ca, ["stranger.example.com"], dt.datetime.now(UTC) + dt.timedelta(days=30))
    response = ocsp.load_der_ocsp_response(served.post_ocsp(_ocsp_request(stranger, stranger_ca.certificate))[2])
    assert response.response_status == ocsp.OCSPResponseStatus.UNAUTHORIZED
    assert served.get(f"{served.server.url}/nope/ocsp/{encoded}")[0] == 404


def _issuer_hashes(leaf: x509.Certificate, issuer: x509.Certificate) -> tuple[bytes, bytes]:
    request = ocsp.load_der_ocsp_request(_ocsp_request(leaf, issuer))
    return request.issuer_name_hash, request.issuer_key_hash


def test_garbage_ocsp_request_gets_malformed_request(served: Served) -> None:
    for garbage in (b"garbage", b"", b"\x30\x03\x02\x01\x01", b"\x30" + b"\xff" * 40):
        status, content_type, body = served.post_ocsp(garbage)
        assert (status, content_type) == (200, "application/ocsp-response")
        assert ocsp.load_der_ocsp_response(body).response_status == ocsp.OCSPResponseStatus.MALFORMED_REQUEST
        for path in ("not-base64!!", urllib.parse.quote(base64.b64encode(garbage + b"x").decode(), safe="")):
            status, _, body = served.get(f"{served.server.url}/corp/ocsp/{path}")
            assert status == 200
            assert ocsp.load_der_ocsp_response(body).response_status == ocsp.OCSPResponseStatus.MALFORMED_REQUEST
    leaf = served.issue("still.example.com").leaf  # and the server still answers properly
    assert "leaf.pem: good" in served.openssl_ocsp(leaf)


def test_crl_served_verified_and_updated_on_revoke(served: Served) -> None:
    keep, drop = served.issue("keep.example.com").leaf, served.issue("drop.example.com").leaf
    crl_url = keep.extensions.get_extension_for_class(x509.CRLDistributionPoints).value[0].full_name[0].value
    assert crl_url == f"{served.server.url}/corp/issuing.crl"
    status, content_type, body = served.get(crl_url)
    assert (status, content_type) == (200, "application/pkix-crl")
    before = x509.load_der_x509_crl(body)
    assert _crl_number(before) == 1 and len(before) == 0

    served.issuer.revoke(drop, x509.ReasonFlags.superseded)

    status, content_type, body = served.get(crl_url)
    after = x509.load_der_x509_crl(body)
    assert _crl_number(after) == 2
    assert after.is_signature_valid(served.issuing.public_key())  # type: ignore[arg-type]
    assert not after.is_signature_valid(served.root.public_key())  # type: ignore[arg-type]
    entry = after.get_revoked_certificate_by_serial_number(drop.serial_number)
    assert entry is not None and entry.extensions.get_extension_for_class(x509.CRLReason).value.reason \
        == x509.ReasonFlags.superseded
    assert after.get_revoked_certificate_by_serial_number(keep.serial_number) is None
    assert after.next_update_utc - after.last_update_utc == ca.CRL_VALIDITY  # type: ignore[operator]
    assert _pkilint_findings(lint_crl.main, ["-t", "CRL", "-p", "BR"], body, served.files / "linted.crl") == 0
    (served.files / "issuing.crl").write_bytes(body)
    run = subprocess.run(["openssl", "crl", "-inform", "DER", "-in", "issuing.crl", "-CAfile", "chain.pem", "-noout"],
                         cwd=served.files, capture_output=True, text=True, timeout=30, check=False)
    assert run.returncode == 0 and "verify OK" in run.stderr, run.stdout + run.stderr
    (served.files / "issuing.crl.pem").write_bytes(after.public_bytes(serialization.Encoding.PEM))
    for leaf, expected in ((keep, "OK"), (drop, "certificate revoked")):
        (served.files / "leaf.pem").write_bytes(_pem(leaf))
        run = subprocess.run(["openssl", "verify", "-crl_check", "-CAfile", "root.pem", "-untrusted", "issuing.pem",
                              "-CRLfile", "issuing.crl.pem", "leaf.pem"], cwd=served.files, capture_output=True,
                             text=True, timeout=30, check=False)
        assert expected in run.stdout + run.stderr and (run.returncode == 0) is (expected == "OK")

    # Revoking again changes nothing; a later key compromise replaces the reason and reissues the CRL.
    served.issuer.revoke(drop, x509.ReasonFlags.superseded)
    assert _crl_number(x509.load_der_x509_crl(served.get(crl_url)[2])) == 2
    served.issuer.revoke(drop, x509.ReasonFlags.key_compromise)
    latest = x509.load_der_x509_crl(served.get(crl_url)[2])
    assert _crl_number(latest) == 3
    assert latest.get_revoked_certificate_by_serial_number(drop.serial_number).extensions.get_extension_for_class(  # type: ignore[union-attr]
        x509.CRLReason).value.reason == x509.ReasonFlags.key_compromise


def test_certificates_and_urls_in_the_leaf_are_served(served: Served) -> None:
    leaf = served.issue("aia.example.com").leaf
    aia = {d.access_method: d.access_location.value for d in leaf.extensions.get_extension_for_class(
        x509.AuthorityInformationAccess).value}
    status, content_type, body = served.get(aia[AuthorityInformationAccessOID.CA_ISSUERS])
    assert (status, content_type) == (200, "application/pkix-cert")
    assert x509.load_der_x509_certificate(body) == served.issuing
    root_url = served.issuing.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value[0].access_location.value
    assert x509.load_der_x509_certificate(served.get(root_url)[2]) == served.root
    assert aia[AuthorityInformationAccessOID.OCSP] == f"{served.server.url}/corp/ocsp"
    assert served.get(f"{served.server.url}/nope/issuing.crl")[0] == 404
    assert served.get(f"{served.server.url}/corp/secret.key")[0] == 404
    assert served.get(f"{served.server.url}/corp/ocsp")[0] == 405


def test_crl_reissued_when_next_update_nears(served: Served) -> None:
    now = dt.datetime.now(UTC)
    assert ca.refresh_crls(served.engine, _ring(), audit.Actor("test"), now=now) == []
    later = now + dt.timedelta(days=4)  # less than CRL_REFRESH_MARGIN left of the 7 days
    assert ca.refresh_crls(served.engine, _ring(), audit.Actor("flow"), now=later) == ["corp"]
    assert ca.refresh_crls(served.engine, _ring(), audit.Actor("flow"), now=later) == []
    crl = x509.load_der_x509_crl(served.get(f"{served.server.url}/corp/issuing.crl")[2])
    assert _crl_number(crl) == 2
    assert crl.next_update_utc == later.replace(microsecond=0) + ca.CRL_VALIDITY

    # The server reissues a due CRL itself before serving it (its clock 8 days ahead: 3 days of 11 left).
    ahead = _serve(served.engine, clock=lambda: dt.datetime.now(UTC) + dt.timedelta(days=8))
    try:
        crl = x509.load_der_x509_crl(served.get(f"{ahead.url}/corp/issuing.crl")[2])
    finally:
        ahead.close()
    assert _crl_number(crl) == 3


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_every_connection_has_a_timeout(engine: sa.Engine) -> None:
    with _serve(engine, request_seconds=0.3) as server:
        started = time.monotonic()
        with socket.create_connection(server.address, timeout=10) as silent:
            silent.sendall(b"GET /corp/issuing.crl HTTP/1.1\r\n")  # and never finish the request
            assert silent.recv(1024) == b""  # the server hung up
        assert 0.25 < time.monotonic() - started < 5
        with urllib.request.urlopen(f"{server.url}/healthz", timeout=10) as response:  # and still serves others
            assert response.status == 200


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_ca_serve_command(engine: sa.Engine, tmp_path: Path) -> None:
    """`certpilot ca serve` as an operator runs it: answers at the CA's URLs, logs requests, no keys; Ctrl+C
    stops it cleanly."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with write_session(engine) as session:
        ca.init_ca(session, _ring(), audit.Actor("test"), "corp", f"http://127.0.0.1:{port}")
        root, issuing = ca.ca_certificates(session, ca.get_ca(session, "corp"))
    (tmp_path / "root.pem").write_bytes(_pem(root))
    (tmp_path / "issuing.pem").write_bytes(_pem(issuing))
    leaf = _record(engine, PrivateCAIssuer(engine, "corp", _ring).issue(
        build_csr(ec.generate_private_key(ec.SECP256R1()), ["serve.example.com"]), "tls-server")).leaf
    (tmp_path / "leaf.pem").write_bytes(_pem(leaf))
    process = subprocess.Popen([sys.executable, "-m", "cli", "ca", "serve", "--listen", f"127.0.0.1:{port}"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ})
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline, "ca serve did not start"
                time.sleep(0.05)
        crl_url = leaf.extensions.get_extension_for_class(x509.CRLDistributionPoints).value[0].full_name[0].value
        with urllib.request.urlopen(crl_url, timeout=10) as response:
            assert x509.load_der_x509_crl(response.read()).is_signature_valid(issuing.public_key())  # type: ignore[arg-type]
        run = subprocess.run(["openssl", "ocsp", "-issuer", "issuing.pem", "-cert", "leaf.pem", "-url",
                              f"http://127.0.0.1:{port}/corp/ocsp", "-CAfile", "root.pem", "-timeout", "10"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=30, check=False)
        assert "Response verify OK" in run.stderr + run.stdout and "leaf.pem: good" in run.stdout
    finally:
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr  # a signal is how it stops: a clean stop
    assert "serving 1 CA(s) on http://127.0.0.1:" in stderr and "POST /corp/ocsp" in stderr
    assert "GET /corp/issuing.crl" in stderr and "Traceback" not in stderr
    assert "PRIVATE KEY" not in stdout + stderr


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:8180") == ("127.0.0.1", 8180)
    assert parse_listen("[::1]:9000") == ("::1", 9000)
    assert parse_listen("0.0.0.0") == ("0.0.0.0", 8180)
    assert parse_listen(":8443") == ("127.0.0.1", 8443)
    with pytest.raises(ValueError):
        parse_listen("host:99999")


def test_a_burst_of_revocations_makes_one_crl_at_the_next_fetch(served: Served) -> None:
    """The issuer's revoke marks the CRL stale instead of signing one per revocation: OCSP says revoked at
    once, and the next fetch of the CRL issues one new CRL listing all of them."""
    crl_url = f"{served.server.url}/corp/issuing.crl"
    first = _crl_number(x509.load_der_x509_crl(served.get(crl_url)[2]))
    leaves = [served.issue(f"burst{i}.example.com").leaf for i in range(3)]

    def crls_issued() -> int:
        with read_session(served.engine) as session:
            return len(session.execute(sa.select(AuditEvent.seq).where(AuditEvent.action == "ca.crl_issued")).all())

    before = crls_issued()
    for leaf in leaves:
        served.issuer.revoke(leaf, x509.ReasonFlags.key_compromise)
        assert "leaf.pem: revoked" in served.openssl_ocsp(leaf)
    assert crls_issued() == before  # nothing signed yet

    crl = x509.load_der_x509_crl(served.get(crl_url)[2])
    assert _crl_number(crl) == first + 1 and crls_issued() == before + 1
    assert all(crl.get_revoked_certificate_by_serial_number(leaf.serial_number) is not None for leaf in leaves)
    assert _crl_number(x509.load_der_x509_crl(served.get(crl_url)[2])) == first + 1  # not stale any more
