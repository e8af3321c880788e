"""Probing the places the monitor checks: TLS handshakes in batches, each presented chain inspected, each
served certificate's revocation status asked of its CA.

``probe(places, ...)`` handshakes with every place that has a TLS address (``certpilot.monitoring.Place``)
through ``connectors.tls_scan.TlsScanSource`` (a fixed pool of concurrent connections, one ``timeout``
covering connect, handshake and reads of each; TLS 1.0 and 1.1 offered too, so that an endpoint that
speaks nothing newer is seen and reported as weak). Places that share an address and SNI name are
handshaken once. For each place it returns a ``certpilot.monitoring.Observed``:

- the served leaf (fingerprint, subject, expiry, DNS names) and the TLS version;
- ``chain_problem``: None when the presented chain is complete (``connectors.tls_verify.check_chain``):
  it links by signature to one of the place's trust anchors (its own, e.g. a target's ``verify_trust``,
  else ``anchors``); without any anchor, to a self-signed root or a presented intermediate;
- ``hostname_problem``: None when the leaf matches the place's host name (RFC 6125), or no name is set;
- the revocation status of the leaf (``connectors.revocation``), once per distinct certificate, checks
  running ``revocation_workers`` at a time; its issuer is taken from the presented chain or the anchors;
- or ``error``: why nothing could be read (refused, timed out, silent, not TLS...), naming host:port.

CRL and OCSP URLs that did not answer come back as ``certpilot.monitoring.Reachability`` (object
``host:<host:port>``). No Prefect here.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cryptography import x509

from certpilot.discovery import Problem
from certpilot.monitoring import Observed, Place, Reachability, ServedCertificate
from certpilot.names import check_hostname
from certpilot.x509info import is_issued_by
from connectors.revocation import RevocationChecker
from connectors.tls_scan import Probe, TlsScanSource
from connectors.tls_verify import check_chain

__all__ = ["ProbeResult", "probe"]


@dataclass(frozen=True)
class ProbeResult:
    observed: tuple[Observed, ...]
    unanswered: tuple[Reachability, ...] = ()


class _Anchors:
    """Trust anchors indexed by subject, so that a chain is checked against the few that may matter."""

    def __init__(self, anchors: Sequence[x509.Certificate]) -> None:
        self.all = tuple(anchors)
        self.by_subject: dict[bytes, list[x509.Certificate]] = {}
        for anchor in anchors:
            self.by_subject.setdefault(anchor.subject.public_bytes(), []).append(anchor)

    def for_chain(self, chain: Sequence[x509.Certificate]) -> list[x509.Certificate]:
        relevant = [a for cert in chain for a in self.by_subject.get(cert.issuer.public_bytes(), ())]
        # check_chain without anchors accepts any chain ending at a root: with anchors configured, one that
        # cannot have signed this chain keeps the check anchored (and failing, naming the missing issuer)
        return relevant or list(self.all[:1])

    def issuer_of(self, leaf: x509.Certificate) -> x509.Certificate | None:
        return next((a for a in self.by_subject.get(leaf.issuer.public_bytes(), ()) if is_issued_by(leaf, a)), None)


def _dns_names(leaf: x509.Certificate) -> tuple[str, ...]:
    try:
        sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (x509.ExtensionNotFound, ValueError):
        return ()
    return tuple(sans.get_values_for_type(x509.DNSName))[:10]


def _subject(cert: x509.Certificate) -> str:
    try:
        return cert.subject.rfc4514_string()
    except ValueError:
        return repr(cert.subject)


@dataclass(frozen=True)
class _Seen:
    chain: tuple[x509.Certificate, ...]
    served: ServedCertificate
    tls_version: str | None


def probe(places: Sequence[Place], *, anchors: Sequence[x509.Certificate] = (),
          trust: Mapping[str, Sequence[x509.Certificate]] | None = None, timeout: float = 3.0,
          concurrency: int = 200, revocation: RevocationChecker | None = None,
          revocation_workers: int = 16) -> ProbeResult:
    """What every place with a TLS address serves (see the module docstring). ``trust``: anchors of
    their own, by place. Places without an address are left out."""
    by_probe: dict[Probe, list[Place]] = {}
    for place in places:
        if place.host is not None and place.port is not None:
            by_probe.setdefault(Probe(place.host, place.port, place.sni), []).append(place)
    if not by_probe:
        return ProbeResult(())
    by_locator = {p.locator: p for p in by_probe}
    source = TlsScanSource.of_probes("monitor", by_probe, concurrency=concurrency, timeout=timeout,
                                     legacy_versions=True)
    seen: dict[Probe, _Seen | str] = {}
    for item in source.discover():
        where = by_locator[item.locator]
        if isinstance(item, Problem):
            seen[where] = item.reason
            continue
        try:
            chain = tuple(x509.load_der_x509_certificate(der) for der in item.certificates)
        except ValueError as exc:
            seen[where] = f"presented a certificate that cannot be parsed: {exc}"
            continue
        leaf = chain[0]
        served = ServedCertificate(hashlib.sha256(item.certificates[0]).hexdigest(), _subject(leaf),
                                   leaf.not_valid_after_utc, _dns_names(leaf))
        seen[where] = _Seen(chain, served, item.details.get("tls_version"))

    shared = _Anchors(anchors)
    own = {place: _Anchors(certs) for place, certs in (trust or {}).items() if certs}
    statuses = _revocation(seen, shared, revocation, revocation_workers)
    observed = []
    for where, at_address in by_probe.items():
        result = seen.get(where, "no answer from the scan")
        for place in at_address:
            if isinstance(result, str):
                observed.append(Observed(place.place, error=result))
                continue
            anchored = own.get(place.place, shared)
            chain_problem = check_chain(result.chain, anchored.for_chain(result.chain))
            hostname_problem = check_hostname(result.chain[0], place.hostname) if place.hostname else None
            status = statuses.get(result.served.fingerprint)
            observed.append(Observed(place.place, result.served, None, result.tls_version, chain_problem,
                                     hostname_problem, status[0] if status else None, status[1] if status else None))
    unanswered = tuple(Reachability(f"host:{u.where}", f"the {u.what} responder {u.url}" if u.what == "OCSP"
                                    else f"the CRL distribution point {u.url}", u.where, u.reason)
                       for u in (revocation.unreachable() if revocation is not None else ()))
    return ProbeResult(tuple(observed), unanswered)


def _revocation(seen: Mapping[Probe, _Seen | str], anchors: _Anchors, checker: RevocationChecker | None,
                workers: int) -> dict[str, tuple[str, str]]:
    """(status, the CA's words) per served fingerprint, each certificate asked about once."""
    if checker is None:
        return {}
    leaves: dict[str, tuple[x509.Certificate, x509.Certificate | None]] = {}
    for result in seen.values():
        if isinstance(result, str) or result.served.fingerprint in leaves:
            continue
        leaf = result.chain[0]
        issuer = next((c for c in result.chain[1:] if is_issued_by(leaf, c)), None) or anchors.issuer_of(leaf)
        leaves[result.served.fingerprint] = (leaf, issuer)
    if not leaves:
        return {}
    with concurrent.futures.ThreadPoolExecutor(max(1, min(workers, len(leaves))),
                                               thread_name_prefix="revocation") as pool:
        answers = dict(zip(leaves, pool.map(lambda pair: checker.check(*pair), leaves.values()), strict=True))
    return {fp: (a.status.value, a.reason) for fp, a in answers.items()}
