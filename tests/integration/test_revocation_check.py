"""Revocation status as a client finds it: the private CA's real CRL and OCSP over HTTP on loopback,
checked by connectors.revocation (CRL first, then OCSP; CRLs cached until their nextUpdate)."""

from __future__ import annotations

import datetime as dt
import http.server
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from cryptography import x509

from connectors.revocation import RevocationChecker, RevocationStatus
from lab.ports import free_port
from lab.tls_farm import issue_farm_leaf, make_farm_ca
from tests.private_ca_service import ServedCA, private_ca_served

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


@pytest.fixture
def corp(engine: sa.Engine) -> Iterator[ServedCA]:
    with private_ca_served(engine) as served:
        yield served


class NoCrl(httpx.BaseTransport):
    """The real network, except that every CRL is missing (HTTP 404): the checker must turn to OCSP."""

    def __init__(self) -> None:
        self.real = httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith(".crl"):
            return httpx.Response(404, request=request)
        return self.real.handle_request(request)


def test_crl_good_then_revoked_with_the_reason(corp: ServedCA) -> None:
    leaf = corp.issue("crl.example.test").leaf
    with RevocationChecker(timeout=5) as checker:
        first = checker.check(leaf, corp.issuing)
        assert (first.status, first.method, first.url) == (RevocationStatus.GOOD, "crl", f"{corp.url}/corp/issuing.crl")
        assert "not on the CRL of" in first.reason
    corp.revoke(leaf, x509.ReasonFlags.key_compromise)
    with RevocationChecker(timeout=5) as checker:
        revoked = checker.check(leaf, corp.issuing)
    assert (revoked.status, revoked.method, revoked.revocation_reason) == (RevocationStatus.REVOKED, "crl",
                                                                           "key_compromise")
    assert revoked.revoked_at is not None and "revoked on" in revoked.reason and "key_compromise" in revoked.reason


def test_a_crl_is_kept_until_its_next_update(engine: sa.Engine, tmp_path: Path) -> None:
    now = [dt.datetime.now(dt.timezone.utc)]
    with private_ca_served(engine, clock=lambda: now[0]) as corp:
        kept_until_next_update(corp, now, tmp_path)


def kept_until_next_update(corp: ServedCA, now: list[dt.datetime], tmp_path: Path) -> None:
    a, b = corp.issue("a.example.test").leaf, corp.issue("b.example.test").leaf
    with RevocationChecker(timeout=5, cache_dir=tmp_path / "crls", clock=lambda: now[0]) as checker:
        assert checker.check(a, corp.issuing).status is RevocationStatus.GOOD
        assert checker.check(b, corp.issuing).status is RevocationStatus.GOOD
        assert checker.fetches == 1  # one CRL for both
        corp.revoke(b)  # a new CRL is published, but the one held is valid until its nextUpdate
        assert checker.check(b, corp.issuing).status is RevocationStatus.GOOD and checker.fetches == 1
        now[0] += dt.timedelta(days=8)  # past the nextUpdate (7 days): fetched again (and the CA reissued it)
        assert checker.check(b, corp.issuing).status is RevocationStatus.REVOKED and checker.fetches == 2
    assert len(list((tmp_path / "crls").glob("*.crl"))) == 1
    with RevocationChecker(timeout=5, cache_dir=tmp_path / "crls", clock=lambda: now[0]) as next_run:
        assert next_run.check(b, corp.issuing).status is RevocationStatus.REVOKED
        assert next_run.fetches == 0  # the next run (another process) found it on disk


def test_ocsp_when_no_crl_answers(corp: ServedCA) -> None:
    leaf = corp.issue("ocsp.example.test").leaf
    with RevocationChecker(timeout=5, transport=NoCrl()) as checker:
        good = checker.check(leaf, corp.issuing)
        assert (good.status, good.method, good.url) == (RevocationStatus.GOOD, "ocsp", f"{corp.url}/corp/ocsp")
        corp.revoke(leaf, x509.ReasonFlags.superseded)
        revoked = checker.check(leaf, corp.issuing)
    assert (revoked.status, revoked.method, revoked.revocation_reason) == (RevocationStatus.REVOKED, "ocsp",
                                                                           "superseded")


def test_what_cannot_be_verified_is_unknown(corp: ServedCA, engine: sa.Engine) -> None:
    leaf = corp.issue("unknown.example.test").leaf
    farm = make_farm_ca()
    in_nine_days = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=9)
    farm_leaf, _ = issue_farm_leaf(farm, ["plain.example.test"], in_nine_days)
    with RevocationChecker(timeout=5) as checker:
        no_urls = checker.check(farm_leaf, farm.intermediate)
        assert no_urls.status is RevocationStatus.UNKNOWN and "no CRL distribution point" in no_urls.reason
        no_issuer = checker.check(leaf, None)
        assert no_issuer.status is RevocationStatus.UNKNOWN and "corp Issuing CA 1" in no_issuer.reason
        # Another CA's certificate given as the issuer: neither the CRL nor the OCSP answer verifies with it.
        wrong = checker.check(leaf, farm.intermediate)
        assert wrong.status is RevocationStatus.UNKNOWN
        assert "the CRL at" in wrong.reason and "not by the certificate's issuer" in wrong.reason


class _Huge(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        self.send_response(200)
        self.send_header("Content-Type", "application/pkix-crl")
        self.send_header("Content-Length", str(4 * 1024 * 1024))
        self.end_headers()
        try:
            for _ in range(64):
                self.wfile.write(b"\x30" * 65536)
        except OSError:
            pass

    def log_message(self, *args: object) -> None:
        pass


def test_an_oversized_crl_is_not_read_past_the_limit(corp: ServedCA) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), _Huge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]

    class Redirect(httpx.BaseTransport):  # the CA's CRL URL answered by the oversized server; no OCSP
        def __init__(self) -> None:
            self.real = httpx.HTTPTransport()

        def handle_request(self, request: httpx.Request) -> httpx.Response:
            if not request.url.path.endswith(".crl"):
                return httpx.Response(404, request=request)
            request.url = request.url.copy_with(port=port)
            return self.real.handle_request(request)

    try:
        leaf = corp.issue("huge.example.test").leaf
        with RevocationChecker(timeout=5, max_crl_bytes=256 * 1024, transport=Redirect()) as checker:
            started = time.monotonic()
            result = checker.check(leaf, corp.issuing)
        assert time.monotonic() - started < 5
        assert result.status is RevocationStatus.UNKNOWN
        assert "more than 262144 bytes: stopped reading" in result.reason and "HTTP 404" in result.reason
    finally:
        server.shutdown()
        server.server_close()
