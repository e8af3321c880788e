"""Fixtures for the integration tests: real servers on loopback, one of each per test session.

ACME: one pebble-challtestsrv (DNS for every pebble, TXT records for dns-01), one http-01 responder
of ours that every pebble validates against (and a tls-alpn-01 one for the main pebble), and pebble
instances: the main one (no rejected nonces,
no authorisation reuse, one alternate root, a blocked domain), one rejecting 30% of nonces, one that
requires external account binding, and an HTTPS front before the main one for ARI and injected
problem documents. AWS: a moto server.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from certpilot import database, keystore
from certpilot.keystore import KeyRing
from certpilot.settings import load_settings
from connectors.challenges import Http01Responder, TlsAlpn01Responder
from lab.moto import MotoServer
from tests.integration.acme_servers import AcmeFront, ChallTestSrv, Pebble, free_port, make_tls_identity


@pytest.fixture(scope="session")
def acme_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("acme")


@pytest.fixture(scope="session")
def acme_tls(acme_workdir: Path) -> tuple[Path, Path, Path]:
    """(CA bundle, certificate, key) for 127.0.0.1 and localhost, shared by every pebble and the front."""
    return make_tls_identity(acme_workdir / "tls")


@pytest.fixture(scope="session")
def challtestsrv(acme_workdir: Path) -> Iterator[ChallTestSrv]:
    with ChallTestSrv.start(acme_workdir / "challtestsrv") as server:
        yield server


@pytest.fixture(scope="session")
def http01_responder() -> Iterator[Http01Responder]:
    """Our http-01 responder; every pebble of the session validates on its port."""
    with Http01Responder("127.0.0.1", free_port()) as responder:
        yield responder


@pytest.fixture(scope="session")
def tls_alpn01_responder() -> Iterator[TlsAlpn01Responder]:
    """Our tls-alpn-01 responder; the main pebble validates tls-alpn-01 on its port."""
    with TlsAlpn01Responder("127.0.0.1", free_port()) as responder:
        yield responder


def _pebble(acme_workdir: Path, name: str, challtestsrv: ChallTestSrv, http01_responder: Http01Responder,
            acme_tls: tuple[Path, Path, Path], **options: object) -> Pebble:
    return Pebble.start(acme_workdir / name, dns=challtestsrv, http_port=http01_responder.port, tls=acme_tls,
                        **options)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def pebble(acme_workdir: Path, challtestsrv: ChallTestSrv, http01_responder: Http01Responder,
           tls_alpn01_responder: TlsAlpn01Responder, acme_tls: tuple[Path, Path, Path]) -> Iterator[Pebble]:
    with _pebble(acme_workdir, "pebble", challtestsrv, http01_responder, acme_tls, alternate_roots=1,
                 tls_port=tls_alpn01_responder.port) as server:
        yield server


@pytest.fixture(scope="session")
def pebble_nonce(acme_workdir: Path, challtestsrv: ChallTestSrv, http01_responder: Http01Responder,
                 acme_tls: tuple[Path, Path, Path]) -> Iterator[Pebble]:
    """pebble rejecting 30% of good nonces as bad."""
    with _pebble(acme_workdir, "pebble-nonce", challtestsrv, http01_responder, acme_tls, nonce_reject=30) as server:
        yield server


@pytest.fixture(scope="session")
def pebble_eab(acme_workdir: Path, challtestsrv: ChallTestSrv, http01_responder: Http01Responder,
               acme_tls: tuple[Path, Path, Path]) -> Iterator[Pebble]:
    """pebble requiring external account binding, with the keys of Debian's example configuration."""
    with _pebble(acme_workdir, "pebble-eab", challtestsrv, http01_responder, acme_tls, eab=True) as server:
        yield server


@pytest.fixture(scope="session")
def acme_front_server(pebble: Pebble, acme_tls: tuple[Path, Path, Path]) -> Iterator[AcmeFront]:
    front = AcmeFront(pebble, acme_tls)
    yield front
    front.stop()


@pytest.fixture
def acme_front(acme_front_server: AcmeFront) -> Iterator[AcmeFront]:
    """The front before the main pebble, with no windows, injections or records left from other tests."""
    acme_front_server.reset()
    yield acme_front_server
    acme_front_server.reset()


@pytest.fixture
def sqlite_engine(certpilot_home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[sa.Engine]:
    """This test's own inventory, a SQLite file in its CERTPILOT_HOME."""
    monkeypatch.setenv("CERTPILOT_DATABASE_URL", f"sqlite:///{certpilot_home / 'inventory.db'}")
    yield database.get_engine()
    database.dispose_engines()


@pytest.fixture
def key_ring(certpilot_home: Path) -> Callable[[], KeyRing]:
    return lambda: keystore.load_key_ring(load_settings())


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real moto server (AWS APIs) on 127.0.0.1; yields its endpoint URL."""
    with MotoServer.start(tmp_path_factory.mktemp("moto")) as server:
        yield server.url
