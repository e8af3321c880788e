"""A loopback TLS endpoint farm for tests, the benchmark and the demo.

One subprocess (``python -m lab.tls_farm SPEC.json``) serves every listener on 127.0.0.1 from one asyncio
loop with plain non-blocking sockets (no asyncio SSL protocol: it would cost more CPU than the clients
it serves). The parent makes the certificates, writes them to a directory, starts the subprocess, waits
until it prints READY with the ports it bound, and kills it on exit.

Listener kinds:
- ``good``: its own EC P-256 leaf and the farm's intermediate (leaf + intermediate presented);
- ``sni``: a default certificate and one per SNI name (each leaf + intermediate);
- ``leaf-only``: the leaf without its intermediate (an incomplete chain);
- ``huge-chain``: the leaf followed by ``HUGE_CHAIN_LENGTH`` extra certificates (about 100 KiB);
- ``silent``: accepts and never speaks; ``slow``: answers the ClientHello with a TLS record header, then
  one byte every 0.2 s; ``plaintext``: speaks HTTP; ``garbage``: random bytes (not starting like TLS).

Ports are below 32768: the child binds from ``base_port`` upwards, skipping ports in use.
``TlsFarm.endpoints`` lists what each listener serves: (host, port, sni, fingerprint, kind, chain).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import os
import random
import select
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

GOOD_KINDS = ("good", "sni", "leaf-only")
HOSTILE_KINDS = ("silent", "slow", "plaintext", "garbage", "huge-chain")
KINDS = GOOD_KINDS + HOSTILE_KINDS
HUGE_CHAIN_LENGTH = 200
DEFAULT_EXPIRY_DAYS = (3, 9, 20, 45, 75, 120, 200)  # a spread across every alert band
PORT_FLOOR, PORT_LIMIT = 10000, 32768  # listeners stay out of the kernel's ephemeral range (32768 and up)
START_TIMEOUT = 60.0
CONNECTION_LIFETIME = 30.0  # a connection the client abandons is closed after this


@dataclass(frozen=True)
class FarmCA:
    """The farm's root and intermediate (EC P-256: cheap to verify by the thousand)."""

    root: x509.Certificate
    intermediate: x509.Certificate
    intermediate_key: ec.EllipticCurvePrivateKey = field(repr=False)


@dataclass(frozen=True)
class FarmEndpoint:
    """One (listener, SNI name) pair and what it serves; ``fingerprint`` is None for hostile kinds."""

    host: str
    port: int
    sni: str | None
    kind: str
    fingerprint: str | None = None
    chain: tuple[bytes, ...] = field(default=(), repr=False)  # DER, as presented (leaf first)
    not_after: dt.datetime | None = None
    names: tuple[str, ...] = ()  # the leaf's DNS names

    @property
    def locator(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tls://{host}:{self.port}" + (f"?sni={self.sni}" if self.sni else "")


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "certpilot tls farm"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_farm_ca(now: dt.datetime | None = None, label: str = "Farm") -> FarmCA:
    now = now or dt.datetime.now(dt.timezone.utc)
    root_key = ec.generate_private_key(ec.SECP256R1())
    inter_key = ec.generate_private_key(ec.SECP256R1())

    def ca(subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey, signer: ec.EllipticCurvePrivateKey,
           path_length: int | None) -> x509.Certificate:
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
                .not_valid_after(now + dt.timedelta(days=3650))
                .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
                .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                               critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(signer, hashes.SHA256()))

    root = ca(_name(f"{label} Root CA"), _name(f"{label} Root CA"), root_key, root_key, None)
    inter = ca(_name(f"{label} Issuing CA"), root.subject, inter_key, root_key, 0)
    return FarmCA(root, inter, inter_key)


def issue_farm_leaf(ca: FarmCA, names: Sequence[str], not_after: dt.datetime,
                    now: dt.datetime | None = None) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    now = now or dt.datetime.now(dt.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    cert = (x509.CertificateBuilder().subject_name(_name(names[0])).issuer_name(ca.intermediate.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(min(now, not_after) - dt.timedelta(days=30)).not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca.intermediate_key, hashes.SHA256()))
    return cert, key


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@dataclass(frozen=True)
class ListenerPlan:
    kind: str
    names: tuple[str, ...] = ()  # the default certificate's DNS names (good, leaf-only, huge-chain, sni)
    sni_names: tuple[str, ...] = ()  # sni: one certificate per name
    expiry_days: int = 90


def plan(good: int = 0, *, hostile: Sequence[str] = (), sni: Sequence[Sequence[str]] = (), leaf_only: int = 0,
         expiry_days: Sequence[int] = DEFAULT_EXPIRY_DAYS, domain: str = "farm.test") -> list[ListenerPlan]:
    """``good`` listeners with their own certificates (expiries cycling through ``expiry_days``), one
    listener per item of ``hostile`` (a kind), one ``sni`` listener per group of SNI names, and
    ``leaf_only`` listeners presenting no intermediate."""
    plans = [ListenerPlan("good", (f"ep{i:05d}.{domain}",), expiry_days=expiry_days[i % len(expiry_days)])
             for i in range(good)]
    plans += [ListenerPlan("sni", (f"default{i}.{domain}",), tuple(names), 90) for i, names in enumerate(sni)]
    plans += [ListenerPlan("leaf-only", (f"leafonly{i}.{domain}",), expiry_days=90) for i in range(leaf_only)]
    for i, kind in enumerate(hostile):
        if kind not in HOSTILE_KINDS:
            raise ValueError(f"unknown hostile kind {kind!r}; expected one of {', '.join(HOSTILE_KINDS)}")
        plans.append(ListenerPlan(kind, (f"{kind}{i}.{domain}",) if kind == "huge-chain" else ()))
    return plans


class FarmStartError(RuntimeError):
    """The farm process did not say READY in time, or died."""


class TlsFarm:
    """A running farm: ``endpoints``, ``ca`` (trust ``ca.root``), ``directory`` (certificates and keys)."""

    def __init__(self, directory: Path, ca: FarmCA, endpoints: list[FarmEndpoint], process: subprocess.Popen) -> None:
        self.directory, self.ca, self.endpoints, self._process = directory, ca, endpoints, process

    def of_kind(self, kind: str) -> list[FarmEndpoint]:
        return [e for e in self.endpoints if e.kind == kind]

    @property
    def pid(self) -> int:
        return self._process.pid

    @classmethod
    @contextmanager
    def run(cls, directory: Path, plans: Sequence[ListenerPlan], *, base_port: int | None = None,
            host: str = "127.0.0.1", ca: FarmCA | None = None) -> Iterator[TlsFarm]:
        """Write the certificates under ``directory``, start the farm, yield it once READY, kill it on exit."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        now = dt.datetime.now(dt.timezone.utc)
        ca = ca or make_farm_ca(now)
        spec, expected = _write_material(directory, ca, plans, now)
        spec_path = directory / "farm.json"
        base = base_port or random.randrange(12000, 26000)
        spec_path.write_text(json.dumps({"host": host, "base_port": base, "listeners": spec}))
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
        process = subprocess.Popen([sys.executable, "-m", "lab.tls_farm", "--serve", str(spec_path)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, preexec_fn=_die_with_parent)
        try:
            ports = _await_ready(process, len(plans))
            endpoints = [FarmEndpoint(host, port, sni, kind, fp, chain, not_after, names)
                         for port, listener in zip(ports, expected, strict=True)
                         for (sni, kind, fp, chain, not_after, names) in listener]
            _write_manifest(directory / "endpoints.json", endpoints)
            yield cls(directory, ca, endpoints, process)
        finally:
            process.kill()
            process.wait(timeout=10)
            for stream in (process.stdout, process.stderr):
                if stream:
                    stream.close()


def _write_manifest(path: Path, endpoints: Sequence[FarmEndpoint]) -> None:
    """endpoints.json: what each listener serves, for the demo and for tools that are not Python."""
    path.write_text(json.dumps([{"host": e.host, "port": e.port, "sni": e.sni, "kind": e.kind,
                                 "fingerprint": e.fingerprint, "names": list(e.names), "locator": e.locator,
                                 "not_after": e.not_after.isoformat() if e.not_after else None}
                                for e in endpoints], indent=1))


def _die_with_parent() -> None:
    try:
        import ctypes  # noqa: PLC0415

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _await_ready(process: subprocess.Popen, count: int) -> list[int]:
    assert process.stdout is not None
    deadline = START_TIMEOUT + _now()
    line = b""
    while not line.endswith(b"\n"):
        remaining = deadline - _now()
        ready, _, _ = select.select([process.stdout], [], [], max(remaining, 0))
        if not ready:
            raise FarmStartError(f"the TLS farm did not say READY within {START_TIMEOUT:g} s")
        chunk = os.read(process.stdout.fileno(), 65536)
        if not chunk:
            err = process.stderr.read().decode(errors="replace")[-2000:] if process.stderr else ""
            raise FarmStartError(f"the TLS farm exited before READY: {err}")
        line += chunk
    message = json.loads(line.decode())
    if message.get("ready") is not True or len(message["ports"]) != count:
        raise FarmStartError(f"the TLS farm failed: {message.get('error', message)}")
    return list(message["ports"])


def _now() -> float:
    import time  # noqa: PLC0415

    return time.monotonic()


def _write_material(directory: Path, ca: FarmCA, plans: Sequence[ListenerPlan], now: dt.datetime,
                    ) -> tuple[list[dict], list[list[tuple]]]:
    (directory / "ca.pem").write_bytes(_pem(ca.root))
    (directory / "intermediate.pem").write_bytes(_pem(ca.intermediate))
    spec: list[dict] = []
    expected: list[list[tuple]] = []
    filler: list[x509.Certificate] = []

    def identity(stem: str, names: Sequence[str], days: int, with_intermediate: bool = True,
                 extra: Sequence[x509.Certificate] = ()) -> tuple[dict, str, tuple[bytes, ...], dt.datetime]:
        not_after = now + dt.timedelta(days=days)
        cert, key = issue_farm_leaf(ca, names, not_after, now)
        presented = [cert, *([ca.intermediate] if with_intermediate else []), *extra]
        cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
        cert_path.write_bytes(_pem(*presented))
        key_path.write_bytes(_key_pem(key))
        os.chmod(key_path, 0o600)
        chain = tuple(_der(c) for c in presented)
        return ({"cert": str(cert_path), "key": str(key_path)}, hashlib.sha256(chain[0]).hexdigest(), chain,
                not_after)

    for index, p in enumerate(plans):
        stem = f"l{index:05d}"
        entry: dict = {"kind": p.kind}
        if p.kind in ("good", "leaf-only"):
            files, fp, chain, not_after = identity(stem, p.names, p.expiry_days, p.kind == "good")
            entry.update(files)
            expected.append([(None, p.kind, fp, chain, not_after, p.names)])
        elif p.kind == "sni":
            files, fp, chain, not_after = identity(stem, p.names, p.expiry_days)
            entry.update(files)
            listener = [(None, p.kind, fp, chain, not_after, p.names)]
            entry["sni"] = {}
            for j, name in enumerate(p.sni_names):
                files, fp, chain, not_after = identity(f"{stem}-sni{j}", [name], p.expiry_days)
                entry["sni"][name] = files
                listener.append((name, p.kind, fp, chain, not_after, (name,)))
            expected.append(listener)
        elif p.kind == "huge-chain":
            if not filler:
                filler = _filler_certificates(ca, now)
            files, fp, chain, not_after = identity(stem, p.names, p.expiry_days, True, filler)
            entry.update(files)
            expected.append([(None, p.kind, None, chain, not_after, p.names)])
        else:
            expected.append([(None, p.kind, None, (), None, ())])
        spec.append(entry)
    return spec, expected


def _filler_certificates(ca: FarmCA, now: dt.datetime) -> list[x509.Certificate]:
    """Padding for the huge chain: HUGE_CHAIN_LENGTH distinct CA-looking certificates with long names."""
    key = ec.generate_private_key(ec.SECP256R1())
    out = []
    for i in range(HUGE_CHAIN_LENGTH):
        name = _name(f"Filler CA {i:03d} " + "x" * 40)
        out.append(x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
                   .not_valid_after(now + dt.timedelta(days=365))
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .sign(key, hashes.SHA256()))
    return out


# --- the farm process ----------------------------------------------------------------------------------------


class _Farm:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.dripping: set[socket.socket] = set()

    # TLS listeners: the server side of each handshake over memory BIOs on a plain non-blocking socket.
    def accept_tls(self, listener: socket.socket, context: ssl.SSLContext) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:  # BlockingIOError: no more pending connections
                return
            conn.setblocking(False)
            _ServerHandshake(self, conn, context)

    def _close(self, sock: socket.socket) -> None:
        self.dripping.discard(sock)
        fd = sock.fileno()
        if fd >= 0:
            self.loop.remove_reader(fd)
            self.loop.remove_writer(fd)
        sock.close()

    # Hostile listeners.
    def accept_plain(self, listener: socket.socket, kind: str) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            conn.setblocking(False)
            timer = self.loop.call_later(CONNECTION_LIFETIME, self._close, conn)
            self.loop.add_reader(conn.fileno(), self._hostile_read, conn, kind, timer)
            if kind == "garbage":
                # 0xA5: no TLS record starts like this; no quotes, so that its repr is always b'...'
                noise = bytes([0xA5]) + os.urandom(300).replace(b"'", b"").replace(b'"', b"")[:255]
                self._send(conn, noise)

    def _hostile_read(self, conn: socket.socket, kind: str, timer: asyncio.TimerHandle) -> None:
        try:
            data = conn.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the client went away
            timer.cancel()
            self.dripping.discard(conn)
            self._close(conn)
            return
        if kind == "plaintext":
            self._send(conn, b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: 24\r\n"
                             b"Connection: close\r\n\r\nThis is not a TLS port.\n")
        elif kind == "slow" and conn not in self.dripping:
            self.dripping.add(conn)
            self._drip(conn, b"\x16\x03\x03\x40\x00" + b"\x02" * 64, 0)

    def _drip(self, conn: socket.socket, data: bytes, offset: int) -> None:
        if conn.fileno() < 0 or conn not in self.dripping or offset >= len(data):
            return
        self._send(conn, data[offset:offset + 1])
        self.loop.call_later(0.2, self._drip, conn, data, offset + 1)

    @staticmethod
    def _send(conn: socket.socket, data: bytes) -> None:
        try:
            conn.send(data)
        except OSError:
            pass


class _ServerHandshake:
    """One server handshake: read, feed OpenSSL, write what it says, close once the handshake is over."""

    __slots__ = ("farm", "conn", "fd", "obj", "incoming", "outgoing", "pending", "timer", "finished")

    def __init__(self, farm: _Farm, conn: socket.socket, context: ssl.SSLContext) -> None:
        self.farm, self.conn, self.fd = farm, conn, conn.fileno()
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = context.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.pending = b""
        self.finished = False
        self.timer = farm.loop.call_later(CONNECTION_LIFETIME, self.close)
        farm.loop.add_reader(self.fd, self.on_readable)

    def on_readable(self) -> None:
        try:
            data = self.conn.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            return
        self.incoming.write(data)
        try:
            self.obj.do_handshake()
            self.finished = True
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError:
            self.finished = True  # OpenSSL queued an alert, if any: send it, then close
        self.flush()

    def flush(self) -> None:
        self.pending += self.outgoing.read()
        try:
            while self.pending:
                sent = self.conn.send(self.pending)
                self.pending = self.pending[sent:]
        except BlockingIOError:  # a huge chain fills the socket buffer: wait until it drains
            self.farm.loop.add_writer(self.fd, self.on_writable)
            return
        except OSError:
            self.close()
            return
        if self.finished:
            self.close()

    def on_writable(self) -> None:
        self.farm.loop.remove_writer(self.fd)
        self.flush()

    def close(self) -> None:
        if self.conn.fileno() >= 0:
            self.timer.cancel()
            self.farm.loop.remove_reader(self.fd)
            self.farm.loop.remove_writer(self.fd)
            self.conn.close()


def _server_context(cert: str, key: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.num_tickets = 0  # no session tickets: the scanner never resumes
    return context


def _bind(host: str, start: int) -> tuple[socket.socket, int]:
    """A listening socket on the first free port from ``start`` (wrapping round to PORT_FLOOR), below 32768."""
    for port in [*range(start, PORT_LIMIT), *range(PORT_FLOOR, start)]:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind((host, port))
        except OSError:
            sock.close()
            continue
        sock.listen(1024)
        sock.setblocking(False)
        return sock, port
    raise OSError(f"no free port between {PORT_FLOOR} and {PORT_LIMIT - 1}")


def serve(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    loop = asyncio.new_event_loop()
    farm = _Farm(loop)
    listeners: list[socket.socket] = []
    ports: list[int] = []
    next_port = int(spec["base_port"])
    try:
        for entry in spec["listeners"]:
            sock, port = _bind(spec["host"], next_port)
            next_port = port + 1
            listeners.append(sock)
            ports.append(port)
            kind = entry["kind"]
            if kind in ("good", "leaf-only", "huge-chain", "sni"):
                context = _server_context(entry["cert"], entry["key"])
                if kind == "sni":
                    by_name = {name: _server_context(f["cert"], f["key"]) for name, f in entry["sni"].items()}

                    def choose(obj: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext,
                               by_name: dict[str, ssl.SSLContext] = by_name) -> None:
                        if name in by_name:
                            obj.context = by_name[name]

                    context.sni_callback = choose
                loop.add_reader(sock.fileno(), farm.accept_tls, sock, context)
            else:
                loop.add_reader(sock.fileno(), farm.accept_plain, sock, kind)
    except (OSError, ssl.SSLError, KeyError) as exc:
        print(json.dumps({"ready": False, "error": str(exc)}), flush=True)
        sys.exit(1)
    print(json.dumps({"ready": True, "ports": ports}), flush=True)
    loop.add_signal_handler(signal.SIGTERM, loop.stop)
    loop.run_forever()


def main(argv: Sequence[str] | None = None) -> None:
    """Run a farm in the foreground (for the demo) until interrupted; ``--serve SPEC`` is the farm process."""
    import argparse  # noqa: PLC0415
    import time  # noqa: PLC0415

    parser = argparse.ArgumentParser(prog="python -m lab.tls_farm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", metavar="SPEC", help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help="where certificates, keys and endpoints.json are written")
    parser.add_argument("--good", type=int, default=20, help="listeners with their own certificates")
    parser.add_argument("--expiry-days", default=",".join(map(str, DEFAULT_EXPIRY_DAYS)),
                        help="comma-separated days to expiry, cycled over the good listeners")
    parser.add_argument("--hostile", default="", help=f"comma-separated kinds among {', '.join(HOSTILE_KINDS)}")
    parser.add_argument("--sni", default="", help="comma-separated SNI names served by one SNI listener")
    parser.add_argument("--leaf-only", type=int, default=0, help="listeners presenting no intermediate")
    parser.add_argument("--base-port", type=int, help="first port tried (below 32768)")
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve)
        return
    if args.dir is None:
        parser.error("--dir is required")
    plans = plan(args.good, hostile=[k for k in args.hostile.split(",") if k],
                 sni=[[n for n in args.sni.split(",") if n]] if args.sni else [], leaf_only=args.leaf_only,
                 expiry_days=[int(d) for d in args.expiry_days.split(",")])
    with TlsFarm.run(args.dir, plans, base_port=args.base_port) as farm:
        ports = sorted({e.port for e in farm.endpoints})
        print(f"TLS farm: {len(ports)} listeners on 127.0.0.1, ports {ports[0]}-{ports[-1]}; CA {args.dir / 'ca.pem'}; "
              f"endpoints {args.dir / 'endpoints.json'}. Ctrl-C to stop.", flush=True)
        try:
            while farm._process.poll() is None:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
