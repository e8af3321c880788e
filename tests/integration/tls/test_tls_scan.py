"""The TLS scanner against the farm on loopback: what it finds is what the farm serves (fingerprint, chain as
presented, TLS version), whether it verifies against the trust given, SNI, CIDR ranges, and hostile
endpoints that each cost at most one timeout and yield a Problem saying what they did."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import socket
import time
from pathlib import Path

import pytest

from certpilot.discovery import Found, Problem, Source, split
from connectors.tls_scan import TargetError, TlsScanSource
from connectors.tls_verify import fetch_chain
from lab.tls_farm import HOSTILE_KINDS, TlsFarm, make_farm_ca, plan
from tests.integration.tls.conftest import EXPIRY_DAYS, GOOD, SNI_NAMES, unused_port


def _targets(endpoints) -> list[str]:  # noqa: ANN001
    return sorted({f"{e.host}:{e.port}" for e in endpoints})


def _by_locator(items) -> dict:  # noqa: ANN001
    return {item.locator: item for item in items}


def test_every_endpoint_is_found_with_its_chain_version_and_verify_status(farm: TlsFarm) -> None:
    good = farm.of_kind("good") + farm.of_kind("leaf-only")
    source = TlsScanSource("lab", _targets(good), timeout=3.0, trust=[farm.ca.root])
    assert isinstance(source, Source) and source.name == "tls-scan:lab"

    found, problems = split(source.discover())

    now = dt.datetime.now(dt.timezone.utc)
    assert problems == []
    assert sum(1 for e in good if e.not_after < now) == GOOD // len(EXPIRY_DAYS)
    by_locator = _by_locator(found)
    assert set(by_locator) == {e.locator for e in good}
    assert len(good) == GOOD + 1
    for endpoint in good:
        item = by_locator[endpoint.locator]
        assert hashlib.sha256(item.certificates[0]).hexdigest() == endpoint.fingerprint
        assert item.certificates == endpoint.chain  # the whole chain, as presented, in order
        assert item.details["tls_version"] == "TLSv1.3"
        assert item.details["address"] == "127.0.0.1" and item.details["port"] == endpoint.port
        assert item.details["sni"] is None
        if endpoint.kind == "good" and endpoint.not_after > now:
            assert item.details["chain_length"] == 2
            assert (item.details["verified"], item.details["verify_reason"]) == (True, None)
        elif endpoint.kind == "good":  # expired three days ago
            assert item.details["verified"] is False
            assert item.details["verify_reason"] == (f"certificate has expired: CN={endpoint.names[0]},O=certpilot "
                                                     f"tls farm expired on {endpoint.not_after:%Y-%m-%d %H:%M} UTC")
        else:  # leaf-only: the intermediate is neither presented nor trusted
            assert item.details["chain_length"] == 1
            assert item.details["verified"] is False
            assert item.details["verify_reason"] == ("unable to get local issuer certificate: CN=Farm Issuing CA,"
                                                     "O=certpilot tls farm is neither presented nor trusted")


def test_a_chain_to_an_unknown_ca_is_not_verified_and_says_why(farm: TlsFarm, other_ca) -> None:  # noqa: ANN001
    endpoint = farm.of_kind("good")[0]
    [unrelated] = TlsScanSource("x", _targets([endpoint]), trust=[other_ca.root]).scan()
    assert isinstance(unrelated, Found) and unrelated.details["verified"] is False
    assert unrelated.details["verify_reason"] == ("unable to get local issuer certificate: CN=Farm Root CA,"
                                                  "O=certpilot tls farm is neither presented nor trusted")
    # A look-alike root (same name, another key) is not the issuer: names alone prove nothing.
    look_alike = make_farm_ca(label="Farm")
    assert look_alike.root.subject == farm.ca.root.subject
    [spoofed] = TlsScanSource("x", _targets([endpoint]), trust=[look_alike.root]).scan()
    assert spoofed.details["verified"] is False  # type: ignore[union-attr]
    [untrusted] = TlsScanSource("x", _targets([endpoint])).scan()
    assert untrusted.details["verify_reason"] == "no trust anchors configured"  # type: ignore[union-attr]
    # Trusting the intermediate alone is enough.
    [by_intermediate] = TlsScanSource("x", _targets([endpoint]), trust=[farm.ca.intermediate]).scan()
    assert by_intermediate.details["verified"] is True  # type: ignore[union-attr]


def test_sni_selects_the_certificate_and_the_locator_names_it(farm: TlsFarm) -> None:
    endpoints = farm.of_kind("sni")
    assert {e.sni for e in endpoints} == {None, *SNI_NAMES}
    with_sni = TlsScanSource("sni", _targets(endpoints), sni=SNI_NAMES, trust=[farm.ca.root]).scan()
    without = TlsScanSource("sni", _targets(endpoints), trust=[farm.ca.root]).scan()

    by_locator = _by_locator(with_sni + without)
    port = endpoints[0].port
    assert set(by_locator) == {f"tls://127.0.0.1:{port}", *(f"tls://127.0.0.1:{port}?sni={n}" for n in SNI_NAMES)}
    for endpoint in endpoints:
        item = by_locator[endpoint.locator]
        assert hashlib.sha256(item.certificates[0]).hexdigest() == endpoint.fingerprint
        assert item.details["sni"] == endpoint.sni
        if endpoint.sni:
            assert item.details["hostname_matches"] is True
        else:
            assert "hostname_matches" not in item.details  # no name to match an address against
    assert len({hashlib.sha256(i.certificates[0]).hexdigest() for i in by_locator.values()}) == 3


def test_a_cidr_range_is_expanded_and_only_the_live_address_answers(farm: TlsFarm) -> None:
    ports = sorted(e.port for e in farm.of_kind("good")[:2])
    items = TlsScanSource("range", ["127.0.0.0/29"], ports=ports, timeout=2.0, trust=[farm.ca.root]).scan()

    found, problems = split(items)
    assert len(items) == 6 * 2  # .1 to .6 on both ports
    assert sorted(f.locator for f in found) == [f"tls://127.0.0.1:{p}" for p in ports]
    assert {p.locator for p in problems} == {f"tls://127.0.0.{h}:{p}" for h in range(2, 7) for p in ports}
    assert {p.reason for p in problems} == {"connection refused (nothing listening)"}


REASONS = {
    "silent": r"no answer to the TLS ClientHello within 1 s \(connected, silent\)",
    "slow": r"handshake not complete within 1 s: \d+ bytes received \(slow or stalled server\)",
    "plaintext": r"not TLS: the server answered b'HTTP/1.1 400 Bad'",
    "garbage": r"not TLS: the server answered b'\\xa5.*'",
    "huge-chain": r"handshake still incomplete after \d+ bytes, more than the 65536 read "
                  r"\(an oversized certificate chain\?\): stopped reading",
    "closed": r"connection refused \(nothing listening\)",
}


def test_hostile_endpoints_each_yield_a_precise_problem_within_one_timeout(farm: TlsFarm) -> None:
    timeout = 1.0
    hostile = {e.locator: e.kind for e in farm.endpoints if e.kind in HOSTILE_KINDS}
    closed = unused_port()
    hostile[f"tls://127.0.0.1:{closed}"] = "closed"
    good = farm.of_kind("good")
    targets = _targets(good) + [loc.removeprefix("tls://") for loc in hostile]
    source = TlsScanSource("hostile", targets, timeout=timeout, trust=[farm.ca.root])

    started = time.monotonic()
    found, problems = split(source.discover())
    elapsed = time.monotonic() - started

    assert elapsed < timeout * 1.5 + 0.5, f"the scan took {elapsed:.2f} s with a {timeout} s timeout"
    assert sorted(f.locator for f in found) == sorted(e.locator for e in good)
    assert {p.locator for p in problems} == set(hostile)
    for problem in problems:
        kind = hostile[problem.locator]
        assert re.fullmatch(REASONS[kind], problem.reason), (kind, problem.reason)


def test_hostile_endpoints_cannot_starve_the_others_with_little_concurrency(farm: TlsFarm) -> None:
    """Two workers, two silent endpoints first: each costs its timeout once, then the rest go through."""
    timeout = 0.5
    silent = [e for e in farm.endpoints if e.kind in ("silent", "slow")]
    good = farm.of_kind("good")
    source = TlsScanSource("starve", _targets(silent) + _targets(good), concurrency=2, timeout=timeout)
    started = time.monotonic()
    found, problems = split(source.discover())
    elapsed = time.monotonic() - started
    assert len(found) == len(good) and len(problems) == len(silent) == 2
    assert timeout <= elapsed < timeout + 1.0


def test_stopping_early_ends_the_scan_without_waiting_for_it(farm: TlsFarm) -> None:
    silent = farm.of_kind("silent")[0]
    targets = _targets(farm.of_kind("good")) + [f"127.0.0.1:{silent.port}"] * 1
    started = time.monotonic()
    discover = TlsScanSource("early", targets, timeout=5.0, concurrency=4).discover()
    first = next(discover)
    discover.close()  # the consumer stops: the silent endpoint's 5 s are not waited for in full
    assert isinstance(first, (Found, Problem))
    assert time.monotonic() - started < 5.0


def test_bad_targets_are_refused_before_anything_runs() -> None:
    with pytest.raises(TargetError, match=r"'10.0.0.0/8' expands to 16,777,214 addresses"):
        TlsScanSource("big", ["10.0.0.0/8"])
    with pytest.raises(TargetError, match="port 70000 is outside 1-65535"):
        TlsScanSource("port", ["127.0.0.1:70000"])
    with pytest.raises(TargetError, match="concurrency must be at least 1"):
        TlsScanSource("c", ["127.0.0.1"], concurrency=0)


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this machine")
def test_ipv6_endpoints_are_scanned_and_bracketed(tmp_path: Path) -> None:
    with TlsFarm.run(tmp_path, plan(1), host="::1") as v6:
        [endpoint] = v6.endpoints
        found, problems = split(TlsScanSource("v6", [f"[::1]:{endpoint.port}", "::1"], ports=[unused_port()],
                                              trust=[v6.ca.root]).discover())
        assert [f.locator for f in found] == [f"tls://[::1]:{endpoint.port}"] == [endpoint.locator]
        assert found[0].details["verified"] is True
        assert hashlib.sha256(found[0].certificates[0]).hexdigest() == endpoint.fingerprint
        assert len(problems) == 1 and problems[0].locator.startswith("tls://[::1]:")
        assert fetch_chain("::1", endpoint.port).fingerprint == endpoint.fingerprint


def test_the_farm_lists_its_endpoints_in_a_manifest(farm: TlsFarm) -> None:
    manifest = json.loads((farm.directory / "endpoints.json").read_text())
    assert [(m["locator"], m["fingerprint"], m["kind"]) for m in manifest] == [
        (e.locator, e.fingerprint, e.kind) for e in farm.endpoints]
    assert all(Path(farm.directory, name).is_file() for name in ("ca.pem", "intermediate.pem"))
