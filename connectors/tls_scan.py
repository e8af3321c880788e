"""Discovery by TLS handshake: a Source that scans host names, addresses and CIDR ranges on a list of ports.

``TlsScanSource(name, targets, ports=(443,), sni=(), concurrency=200, timeout=3.0, trust=(),
use_system_trust=False, legacy_versions=False)`` is a certpilot.discovery.Source named ``tls-scan:<name>``;
``TlsScanSource.of_probes(name, probes)`` scans exactly the probes given (the monitor's places).
``discover()`` yields a Found for every endpoint that presented certificates and a Problem for every one that
did not.

Targets (``expand_targets``, a pure function):
- a host name (``www.example.com``), an IPv4 or IPv6 address (``10.0.0.1``, ``::1``, ``[::1]``);
- a CIDR range (``10.0.0.0/29``; its usable hosts: without the network and broadcast addresses of an IPv4
  range wider than /31), refused when the scan would exceed ``MAX_PROBES`` probes;
- an address range, first and last included (``10.0.1.0-10.0.1.255``, ``[2001:db8::-2001:db8::ff]``), as
  ``chunk_targets`` writes the pieces of a large range;
- any of these with a port (``host:8443``, ``10.0.0.1:8443``, ``[::1]:8443``, ``10.0.0.0/30:8443``), which
  replaces ``ports`` for that target.

Large scans in pieces (``chunk_targets``, a pure function): the targets split into chunks of at most
``addresses`` addresses, a range wider than that cut into address ranges of that size (every address
the whole range would scan, each in one chunk), the other targets grouped; the discover flow scans
each chunk in a run of its own (discover-chunk), so a /16 is not bound to one process.
Every address is probed on every port with every SNI name, and without SNI when no SNI name is given; a
host-name target without SNI names is probed with its own name as SNI, as any client would.

Locators: ``tls://host:port`` or ``tls://host:port?sni=name``, IPv6 in brackets (``tls://[::1]:443``).

Found.details: ``address``, ``port``, ``sni``, ``tls_version``, ``cipher``, ``chain_length``, ``verified`` and
``verify_reason`` (None when verified), and ``hostname_matches`` when there is a name to match (the SNI
name, else a host-name target; RFC 6125 rules, see connectors.tls_verify.check_hostname). ``verified`` is
OpenSSL's verification of the presented chain during the handshake against the trust given (``trust`` CA
certificates and/or the system store; a trusted intermediate is an anchor too): signatures, validity
dates, CA constraints; never the hostname. Without any trust, verified is False ("no trust anchors
configured"). A chain that does not verify ends the handshake once the certificates are read (the server
sees an alert, as from any client that does not trust it); the reason names the certificate concerned,
e.g. "unable to get local issuer certificate: CN=Example CA is neither presented nor trusted".

Costs are bounded: at most ``concurrency`` connections at once (a fixed pool of workers, spread over
``LOOPS`` threads each running an asyncio loop: OpenSSL releases the GIL while it computes, so a second
loop uses a second core), one ``timeout`` covering resolve, connect, handshake and reads of each
connection, at most ``MAX_HANDSHAKE_BYTES`` read per handshake (a Problem beyond), and chains of more than
``MAX_CHAIN_CERTIFICATES`` certificates refused (a Problem). A silent, slow, plain-text or garbage-speaking
endpoint, a closed port or an oversized chain costs at most its timeout and yields a Problem whose reason
says which it was. Measured (bench/discovery_vs_sslyze.py, 2 cores shared with the farm serving the
endpoints): about 1,000 endpoints/s with full chains, 20-25x sslyze.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import os
import queue
import socket
import ssl
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509

from certpilot.clock import utcnow
from certpilot.discovery import Found, Problem
from certpilot.errors import InvalidDnsNameError, PermanentError
from certpilot.names import is_ip_address, normalise_dns_name, parse_ip_address
from connectors.tls_verify import (MAX_HANDSHAKE_BYTES, ClientHandshake, Presented, TlsProbeError, check_hostname,
                                   client_context)

__all__ = ["MAX_CHAIN_CERTIFICATES", "MAX_CHUNKS", "MAX_PROBES", "Probe", "TargetError", "TlsScanSource",
           "chunk_targets", "expand_targets"]

MAX_PROBES = 65_536
MAX_CHUNKS = 4096  # pieces of one scan (chunk_targets): 4,096 x 1,024 addresses is a /10
MAX_CHAIN_CERTIFICATES = 16
BATCH_SIZE, BATCH_SECONDS = 100, 0.05  # results go to the consumer in batches
LOOPS = min(2, os.cpu_count() or 1)  # threads, each with its own asyncio loop
_RECV = 16 * 1024 + 64


class TargetError(PermanentError):
    """A target, port or SNI name that cannot be scanned as given, or a scan that would be absurdly large."""


@dataclass(frozen=True)
class Probe:
    """One handshake to make: ``host`` is an address or a host name (IPv6 without brackets)."""

    host: str
    port: int
    sni: str | None = None

    @property
    def locator(self) -> str:
        shown = f"[{self.host}]" if ":" in self.host else self.host
        return f"tls://{shown}:{self.port}" + (f"?sni={self.sni}" if self.sni else "")


def _dns_name(text: str, what: str) -> str:
    try:
        return normalise_dns_name(text)
    except InvalidDnsNameError as exc:
        raise TargetError(f"{what} {text!r} is not a host name, an IP address or a CIDR range: {exc.reason}") from None


def _port(text: str | int, target: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise TargetError(f"target {target!r}: port {text!r} is not a number") from None
    if not 0 < port < 65536:
        raise TargetError(f"target {target!r}: port {port} is outside 1-65535")
    return port


def _split_port(target: str) -> tuple[str, int | None]:
    """'[v6]:port', 'host:port', 'v4/nn:port' -> (host, port); a bare IPv6 address has no port."""
    if target.startswith("["):
        inside, sep, rest = target[1:].partition("]")
        if not sep:
            raise TargetError(f"target {target!r}: missing ']'")
        if not rest:
            return inside, None
        if not rest.startswith(":"):
            raise TargetError(f"target {target!r}: expected ':port' after ']'")
        return inside, _port(rest[1:], target)
    if target.count(":") == 1:
        host, _, port = target.partition(":")
        return host, _port(port, target)
    return target, None


def expand_targets(targets: Iterable[str], ports: Sequence[int] = (443,), sni: Sequence[str] = (),
                   max_probes: int = MAX_PROBES) -> list[Probe]:
    """Every probe a scan makes, in order, without duplicates; TargetError for bad input or too many probes."""
    port_list = [_port(p, "ports") for p in ports]
    if not port_list:
        raise TargetError("no ports to scan")
    sni_names: list[str | None] = []
    for sni_name in sni:
        if is_ip_address(sni_name):
            raise TargetError(f"SNI name {sni_name!r} is an IP address: SNI carries host names only")
        sni_names.append(_dns_name(sni_name, "SNI name"))
    probes: dict[Probe, None] = {}
    for raw in targets:
        target = raw.strip()
        if not target:
            raise TargetError("empty target")
        host_part, port = _split_port(target)
        target_ports = [port] if port is not None else port_list
        hosts: Iterable[str]
        is_name = False
        if "/" in host_part or _is_range(host_part):
            addresses = _addresses(host_part, target)
            size = addresses.size
            total = len(probes) + size * len(target_ports) * max(len(sni_names), 1)
            if total > max_probes:
                raise TargetError(f"target {target!r} expands to {size:,} addresses x {len(target_ports)} ports x "
                                  f"{max(len(sni_names), 1)} SNI names: more than the {max_probes:,} probes allowed; "
                                  "split the range or scan fewer ports")
            hosts = (str(a) for a in addresses)
        else:
            address = parse_ip_address(host_part)
            if address is not None:
                hosts = [str(address)]
            else:
                hosts = [_dns_name(host_part, "target")]
                is_name = True
        for host in hosts:
            names = sni_names or ([host] if is_name else [None])
            for p in target_ports:
                for name in names:
                    probes[Probe(host, p, name)] = None
                    if len(probes) > max_probes:
                        raise TargetError(f"the targets expand to more than the {max_probes:,} probes allowed")
    return list(probes)


def _is_range(host: str) -> bool:
    first, sep, last = host.partition("-")
    return bool(sep) and is_ip_address(first) and is_ip_address(last)


def _addresses(host: str, target: str) -> _AddressRange:
    """The addresses a CIDR range or an address range scans, as a lazy sequence."""
    if "/" in host:
        try:
            network = ipaddress.ip_network(host, strict=False)
        except ValueError:
            raise TargetError(f"target {target!r} is not a valid CIDR range") from None
        first, last = int(network.network_address), int(network.broadcast_address)
        if network.version == 4 and network.prefixlen < 31:
            first, last = first + 1, last - 1
        return _AddressRange(network.version, first, last)
    start, _, end = host.partition("-")
    low, high = ipaddress.ip_address(start), ipaddress.ip_address(end)
    if low.version != high.version or int(high) < int(low):
        raise TargetError(f"target {target!r} is not a range of addresses from the first to the last")
    return _AddressRange(low.version, int(low), int(high))


@dataclass(frozen=True)
class _AddressRange:
    """Addresses ``first`` to ``last`` (integers) of one IP version, included, without listing them."""

    version: int
    first: int
    last: int

    @property
    def size(self) -> int:  # not __len__: an IPv6 range may hold more than len() can say
        return max(0, self.last - self.first + 1)

    def __iter__(self) -> Iterator[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        kind = ipaddress.IPv4Address if self.version == 4 else ipaddress.IPv6Address
        return (kind(n) for n in range(self.first, self.last + 1))

    def text(self, first: int, last: int) -> str:
        kind = ipaddress.IPv4Address if self.version == 4 else ipaddress.IPv6Address
        return f"{kind(first)}" if first == last else f"{kind(first)}-{kind(last)}"


def chunk_targets(targets: Sequence[str], addresses: int = 1024) -> list[list[str]]:
    """``targets`` in chunks of at most ``addresses`` addresses each, to scan apart: a CIDR or address
    range wider than that is cut into address ranges of ``addresses``, aligned on multiples of it (a /16
    in chunks of 256: its /24s), each with the range's port, if it has one;
    the other targets are grouped in order. Scanning every chunk probes exactly what scanning
    ``targets`` would (an address in two targets of different chunks is probed twice). TargetError for a
    target that does not parse or more than MAX_CHUNKS chunks."""
    if addresses < 1:
        raise TargetError(f"chunks must hold at least one address, not {addresses}")
    chunks: list[list[str]] = []
    current: list[str] = []
    weight = 0
    for raw in targets:
        target = raw.strip()
        host, port = _split_port(target)
        suffix = f":{port}" if port is not None else ""
        if "/" in host or _is_range(host):
            span = _addresses(host, target)
            if span.size > addresses:
                if current:  # in order: what came before goes first
                    chunks.append(current)
                    current, weight = [], 0
                for base in range(span.first - span.first % addresses, span.last + 1, addresses):  # aligned
                    piece = span.text(max(base, span.first), min(base + addresses - 1, span.last))
                    chunks.append([f"[{piece}]{suffix}" if span.version == 6 and suffix else piece + suffix])
                    if len(chunks) > MAX_CHUNKS:
                        raise TargetError(f"the targets make more than {MAX_CHUNKS:,} chunks of {addresses:,} "
                                          "addresses: scan fewer or larger chunks")
                continue
            size = span.size
        else:
            size = 1
        if current and weight + size > addresses:
            chunks.append(current)
            current, weight = [], 0
        current.append(target)
        weight += size
    if current:
        chunks.append(current)
    return chunks


# --- the scan ------------------------------------------------------------------------------------------------


class _Done:
    pass


_DONE = _Done()


class TlsScanSource:
    """A Source: ``discover()`` scans every probe of the targets and yields Found or Problem for each."""

    def __init__(self, name: str, targets: Sequence[str], ports: Sequence[int] = (443,), sni: Sequence[str] = (),
                 concurrency: int = 200, timeout: float = 3.0, trust: Sequence[x509.Certificate] = (),
                 use_system_trust: bool = False, *, legacy_versions: bool = False) -> None:
        if concurrency < 1:
            raise TargetError(f"concurrency must be at least 1, not {concurrency}")
        if not timeout > 0:
            raise TargetError(f"timeout must be positive, not {timeout}")
        self.name = name if name.startswith("tls-scan:") else f"tls-scan:{name}"
        self.probes = expand_targets(targets, ports, sni)  # bad input fails here, before anything runs
        self._hosts_named = {p.host for p in self.probes if not _is_address(p.host)}
        self.concurrency = concurrency
        self.timeout = timeout
        self.trust = tuple(trust)
        self.use_system_trust = use_system_trust
        self.legacy_versions = legacy_versions  # also offer TLS 1.0 and 1.1 (tls_verify.client_context)
        self._verifies = bool(self.trust) or use_system_trust

    @classmethod
    def of_probes(cls, name: str, probes: Iterable[Probe], **options: Any) -> TlsScanSource:
        """A scan of exactly ``probes`` (each address, port and SNI name as given, duplicates once): the
        places the monitor checks, each with its own SNI name. ``options`` as for the constructor."""
        source = cls(name, (), **options)
        source.probes = list(dict.fromkeys(probes))
        source._hosts_named = {p.host for p in source.probes if not _is_address(p.host)}
        return source

    def discover(self) -> Iterator[Found | Problem]:
        """Yields as results arrive. The scan runs in ``LOOPS`` threads, each with its own asyncio loop,
        sharing the probes and the ``concurrency`` (OpenSSL releases the GIL during the handshake, so a
        second loop uses a second core: about 1.3x the rate of one on 2 cores)."""
        results: queue.Queue[list[Found | Problem] | _Done | BaseException] = queue.Queue(maxsize=100)
        stop = threading.Event()
        probes = iter(self.probes)
        loops = max(1, min(LOOPS, self.concurrency, len(self.probes)))
        share = [self.concurrency // loops + (1 if i < self.concurrency % loops else 0) for i in range(loops)]
        threads = [threading.Thread(target=self._run, args=(probes, n, results, stop), daemon=True,
                                    name=f"{self.name} scan {i}") for i, n in enumerate(share)]
        for thread in threads:
            thread.start()
        running = len(threads)
        try:
            while running:
                item = results.get()
                if isinstance(item, _Done):
                    running -= 1
                    continue
                if isinstance(item, BaseException):
                    raise item
                yield from item
        finally:
            stop.set()
            for thread in threads:
                while thread.is_alive():  # unblock a producer waiting on a full queue
                    try:
                        results.get_nowait()
                    except queue.Empty:
                        thread.join(0.05)

    def scan(self) -> list[Found | Problem]:
        return list(self.discover())

    def _run(self, probes: Iterator[Probe], workers: int, results: queue.Queue, stop: threading.Event) -> None:
        try:
            asyncio.run(self._scan(probes, workers, results, stop))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            results.put(exc)
        else:
            results.put(_DONE)

    async def _scan(self, probes: Iterator[Probe], workers: int, results: queue.Queue, stop: threading.Event) -> None:
        context = client_context(self.trust, use_system_trust=self.use_system_trust,
                                 legacy_versions=self.legacy_versions)
        loop = asyncio.get_running_loop()

        batch: list[Found | Problem] = []  # handed over in batches: one queue operation per item costs GIL hand-offs

        async def hand_over() -> bool:
            while batch:
                try:
                    results.put_nowait(list(batch))
                    batch.clear()
                except queue.Full:
                    if stop.is_set():
                        return False
                    await asyncio.sleep(0.01)
            return True

        async def worker() -> None:
            for probe in probes:
                batch.append(await self._probe(loop, context, probe))
                if len(batch) >= BATCH_SIZE and not await hand_over():
                    return

        tasks = [asyncio.create_task(worker()) for _ in range(workers)]
        pending: set[asyncio.Task] = set(tasks)
        while pending:  # every BATCH_SECONDS: hand results over, and stop at once when the consumer has gone
            _, pending = await asyncio.wait(pending, timeout=BATCH_SECONDS)
            if stop.is_set():
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
                return
            await hand_over()
        for task in tasks:
            task.result()  # a bug in a worker reaches the consumer

    async def _probe(self, loop: asyncio.AbstractEventLoop, context: ssl.SSLContext, probe: Probe,
                     ) -> Found | Problem:
        try:
            presented, verify_error = await self._handshake(loop, context, probe)
        except TlsProbeError as exc:
            return Problem(probe.locator, exc.detail)
        return self._found(probe, presented, verify_error)

    async def _handshake(self, loop: asyncio.AbstractEventLoop, context: ssl.SSLContext, probe: Probe,
                         ) -> tuple[Presented, str | None]:
        host, port, sni, timeout = probe.host, probe.port, probe.sni, self.timeout
        hs: ClientHandshake | None = None
        sock: socket.socket | None = None
        try:
            async with asyncio.timeout(timeout):
                address = await _resolve(loop, host, port)
                sock = socket.socket(address[0], socket.SOCK_STREAM)
                sock.setblocking(False)
                await loop.sock_connect(sock, address[1])
                hs = ClientHandshake(context, host, port, sni, MAX_HANDSHAKE_BYTES)
                while not hs.step():
                    out = hs.outgoing()
                    if out:
                        await loop.sock_sendall(sock, out)
                    hs.feed(await loop.sock_recv(sock, _RECV))
                presented = hs.presented()
                try:
                    sock.send(hs.closing_bytes())
                except OSError:
                    pass
                return presented, hs.verify_error
        except TimeoutError:
            if hs is None:
                raise TlsProbeError.of(host, port, sni, "timeout",
                                       f"no TCP connection within {timeout:g} s", timeout) from None
            raise hs.timeout(timeout) from None
        except socket.gaierror as exc:
            raise TlsProbeError.of(host, port, sni, "unresolved", f"cannot resolve {host}: {exc.strerror}") from None
        except ConnectionRefusedError:
            raise TlsProbeError.of(host, port, sni, "refused", "connection refused (nothing listening)") from None
        except ConnectionResetError:
            raise TlsProbeError.of(host, port, sni, "reset", "connection reset by the server") from None
        except OSError as exc:
            raise TlsProbeError.of(host, port, sni, "unreachable",
                                   f"connection failed: {exc.strerror or exc}") from None
        finally:
            if sock is not None:
                sock.close()

    def _found(self, probe: Probe, presented: Presented, verify_error: str | None) -> Found | Problem:
        chain = presented.chain
        if len(chain) > MAX_CHAIN_CERTIFICATES:
            return Problem(probe.locator, f"presented {len(chain)} certificates, more than the "
                                          f"{MAX_CHAIN_CERTIFICATES} accepted (oversized chain): not recorded")
        details: dict[str, object] = {
            "address": probe.host, "port": probe.port, "sni": probe.sni, "tls_version": presented.tls_version,
            "cipher": presented.cipher, "chain_length": len(chain),
        }
        if not self._verifies:
            details["verified"], details["verify_reason"] = False, "no trust anchors configured"
        else:
            details["verified"] = verify_error is None
            details["verify_reason"] = _explain(verify_error, chain) if verify_error else None
        name = probe.sni or (probe.host if probe.host in self._hosts_named else None)
        if name:
            try:
                leaf = x509.load_der_x509_certificate(chain[0])
            except ValueError as exc:
                return Problem(probe.locator, f"presented a leaf certificate that cannot be parsed: {exc}")
            details["hostname_matches"] = check_hostname(leaf, name) is None
        return Found(chain, probe.locator, details)


def _explain(verify_error: str, chain: Sequence[bytes], now: dt.datetime | None = None) -> str:
    """OpenSSL's verdict, with the certificate it is about: 'unable to get local issuer certificate: CN=X
    (the issuer of the last presented certificate) is neither presented nor trusted'."""
    try:
        certs = [x509.load_der_x509_certificate(der) for der in chain]
        top, seen = certs[0], {0}
        while True:  # follow the presented chain by names, as far as it goes
            step = next((i for i, c in enumerate(certs) if i not in seen and c.subject == top.issuer), None)
            if step is None:
                break
            seen.add(step)
            top = certs[step]
        now = now or utcnow()
        if "issuer certificate" in verify_error:
            return f"{verify_error}: {_name(top.issuer)} is neither presented nor trusted"
        if "self-signed" in verify_error or "self signed" in verify_error:
            return f"{verify_error}: {_name(top.subject)} is not a trust anchor"
        if "expired" in verify_error:
            expired = next(c for c in certs if c.not_valid_after_utc < now)
            when = expired.not_valid_after_utc
            return f"{verify_error}: {_name(expired.subject)} expired on {when:%Y-%m-%d %H:%M} UTC"
        if "not yet valid" in verify_error:
            early = next(c for c in certs if c.not_valid_before_utc > now)
            return (f"{verify_error}: {_name(early.subject)} is valid from "
                    f"{early.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
    except (ValueError, StopIteration):
        pass
    return verify_error


def _name(name: x509.Name) -> str:
    try:
        return name.rfc4514_string()
    except ValueError:
        return repr(name)


def _is_address(host: str) -> bool:
    return is_ip_address(host)


async def _resolve(loop: asyncio.AbstractEventLoop, host: str, port: int) -> tuple[int, tuple]:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, _, _, _, sockaddr = infos[0]
        return family, sockaddr
    if address.version == 6:
        return socket.AF_INET6, (host, port, 0, 0)
    return socket.AF_INET, (host, port)
