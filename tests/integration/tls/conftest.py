"""Real TLS on loopback for the scanner and the verifier: one farm per session (good listeners with their
own certificates, an SNI listener, a leaf-only listener and every hostile kind), and a small threaded
server whose certificate can be switched while clients handshake with it."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization

from lab.ports import free_port
from lab.tls_farm import HOSTILE_KINDS, FarmCA, TlsFarm, issue_farm_leaf, make_farm_ca, plan

SNI_NAMES = ("alpha.sni.test", "beta.sni.test")
GOOD = 12
EXPIRY_DAYS = (5, 40, 200, -3)  # every fourth good listener serves an expired certificate


@pytest.fixture(scope="session")
def farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsFarm]:
    plans = plan(GOOD, hostile=HOSTILE_KINDS, sni=[SNI_NAMES], leaf_only=1, expiry_days=EXPIRY_DAYS)
    with TlsFarm.run(tmp_path_factory.mktemp("tls-farm"), plans) as running:
        yield running


@pytest.fixture(scope="session")
def other_ca() -> FarmCA:
    """A CA the farm's certificates have nothing to do with."""
    return make_farm_ca(label="Unrelated")


def unused_port() -> int:
    """A loopback port below 32768 that nothing listens on (bound and released: refused afterwards)."""
    return free_port()


class Identity:
    """A certificate, its chain file and key file, as a server context."""

    def __init__(self, directory: Path, ca: FarmCA, names: list[str], stem: str, *, with_intermediate: bool = True):
        cert, key = issue_farm_leaf(ca, names, dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=30))
        self.certificate = cert
        self.fingerprint = cert.fingerprint(hashes.SHA256()).hex()
        chain = [cert, ca.intermediate] if with_intermediate else [cert]
        self.cert_path, self.key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
        self.cert_path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain))
        self.key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption()))

    def context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert_path, self.key_path)
        return context


class SwitchingServer:
    """A blocking TLS server in a thread; ``choose(n)`` picks the SSLContext for the n-th connection, so a
    test can switch certificates mid-way (or alternate them, as nginx's old and new workers do)."""

    def __init__(self, choose: Callable[[int], ssl.SSLContext]) -> None:
        self.choose = choose
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", unused_port()))
        self._listener.listen(64)
        self._listener.settimeout(0.1)
        self.port = self._listener.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> SwitchingServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._listener.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(2)
            context = self.choose(self.connections)
            self.connections += 1
            try:
                with context.wrap_socket(conn, server_side=True):
                    pass
            except (OSError, ssl.SSLError):
                conn.close()
