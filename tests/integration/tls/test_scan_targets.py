"""expand_targets, the pure part of the scanner: host names, addresses, CIDR ranges, ports and SNI names
to probes (no network here)."""

from __future__ import annotations

import pytest

from connectors.tls_scan import MAX_PROBES, Probe, TargetError, chunk_targets, expand_targets


def test_addresses_and_names_on_every_port() -> None:
    assert expand_targets(["10.0.0.1", "::1", "WWW.Example.COM."], ports=[443, 8443]) == [
        Probe("10.0.0.1", 443), Probe("10.0.0.1", 8443),
        Probe("::1", 443), Probe("::1", 8443),
        # a host name is its own SNI when no SNI name is given, as any client does
        Probe("www.example.com", 443, "www.example.com"), Probe("www.example.com", 8443, "www.example.com"),
    ]


def test_a_port_in_the_target_replaces_the_port_list() -> None:
    assert expand_targets(["host.test:8443", "10.0.0.1:9443", "[2001:db8::1]:443", "[::1]"], ports=[1, 2]) == [
        Probe("host.test", 8443, "host.test"), Probe("10.0.0.1", 9443), Probe("2001:db8::1", 443),
        Probe("::1", 1), Probe("::1", 2)]


def test_every_address_with_every_sni_name() -> None:
    probes = expand_targets(["127.0.0.1", "app.test"], ports=[443], sni=["a.test", "B.test"])
    assert probes == [Probe("127.0.0.1", 443, "a.test"), Probe("127.0.0.1", 443, "b.test"),
                      Probe("app.test", 443, "a.test"), Probe("app.test", 443, "b.test")]


@pytest.mark.parametrize(("cidr", "hosts"), [
    ("127.0.0.0/29", [f"127.0.0.{i}" for i in range(1, 7)]),  # no network or broadcast address
    ("127.0.0.8/31", ["127.0.0.8", "127.0.0.9"]),  # RFC 3021: both usable
    ("127.0.0.5/32", ["127.0.0.5"]),
    ("127.0.0.5/30", ["127.0.0.5", "127.0.0.6"]),  # host bits set: the range that contains it
    ("::/126", ["::", "::1", "::2", "::3"]),
])
def test_cidr_ranges_expand_to_their_hosts(cidr: str, hosts: list[str]) -> None:
    assert expand_targets([cidr], ports=[443]) == [Probe(h, 443) for h in hosts]


def test_a_port_after_an_ipv4_range() -> None:
    assert expand_targets(["127.0.0.0/30:8443"]) == [Probe("127.0.0.1", 8443), Probe("127.0.0.2", 8443)]


def test_duplicates_are_probed_once() -> None:
    assert expand_targets(["127.0.0.1", "127.0.0.0/31", "127.0.0.1:443"]) == [Probe("127.0.0.1", 443),
                                                                              Probe("127.0.0.0", 443)]


def test_locators() -> None:
    assert Probe("127.0.0.1", 443).locator == "tls://127.0.0.1:443"
    assert Probe("::1", 8443, "a.test").locator == "tls://[::1]:8443?sni=a.test"
    assert Probe("www.example.com", 443, "www.example.com").locator == "tls://www.example.com:443?sni=www.example.com"


@pytest.mark.parametrize(("targets", "kwargs", "message"), [
    (["10.0.0.0/8"], {}, "'10.0.0.0/8' expands to 16,777,214 addresses x 1 ports x 1 SNI names: more than the "
                         "65,536 probes allowed"),
    (["10.0.0.0/16"], {"ports": [443, 8443]}, "expands to 65,534 addresses x 2 ports"),
    (["2001:db8::/64"], {}, "expands to 18,446,744,073,709,551,616 addresses"),
    (["10.0.0.0/33"], {}, "'10.0.0.0/33' is not a valid CIDR range"),
    (["host.test:0"], {}, "port 0 is outside 1-65535"),
    (["host.test:https"], {}, "port 'https' is not a number"),
    (["[::1"], {}, "missing ']'"),
    (["bad host"], {}, "'bad host' is not a host name, an IP address or a CIDR range"),
    (["-bad.test"], {}, "is not a host name"),
    ([""], {}, "empty target"),
    (["127.0.0.1"], {"ports": []}, "no ports to scan"),
    (["127.0.0.1"], {"sni": ["10.0.0.1"]}, "SNI name '10.0.0.1' is an IP address"),
    (["127.0.0.1"], {"sni": ["under score ok?"]}, "SNI name 'under score ok?' is not a host name"),
])
def test_bad_input_is_refused_precisely(targets: list[str], kwargs: dict, message: str) -> None:
    with pytest.raises(TargetError, match=message.replace("(", r"\(").replace("?", r"\?")):
        expand_targets(targets, **kwargs)


def test_many_small_targets_are_capped_too() -> None:
    targets = [f"10.{i // 256}.{i % 256}.0/24" for i in range(MAX_PROBES // 254 + 1)]
    with pytest.raises(TargetError, match="probes allowed"):
        expand_targets(targets)


def test_address_ranges_first_to_last() -> None:
    assert [p.host for p in expand_targets(["10.0.0.254-10.0.1.1:443"])] == [
        "10.0.0.254", "10.0.0.255", "10.0.1.0", "10.0.1.1"]
    assert [p.host for p in expand_targets(["[2001:db8::fe-2001:db8::101]:8443"])] == [
        "2001:db8::fe", "2001:db8::ff", "2001:db8::100", "2001:db8::101"]
    with pytest.raises(TargetError, match="from the first to the last"):
        expand_targets(["10.0.0.9-10.0.0.1"])


def test_a_slash_16_in_chunks_of_its_slash_24s() -> None:
    chunks = chunk_targets(["10.20.0.0/16:8443"], 256)
    assert len(chunks) == 256
    assert chunks[:2] == [["10.20.0.1-10.20.0.255:8443"], ["10.20.1.0-10.20.1.255:8443"]]
    assert chunks[-1] == ["10.20.255.0-10.20.255.254:8443"]
    assert sum(len(expand_targets(c)) for c in chunks) == 65_534  # a whole /16 is one probe too many for one scan


def test_chunks_probe_what_the_whole_scan_would_in_order() -> None:
    targets = ["10.0.0.0/22:443", "x.example", "10.9.0.1-10.9.1.7", "[2001:db8::/120]:443", "10.1.0.0/30",
               "b.example:8443"]
    chunks = chunk_targets(targets, 100)
    assert [p for chunk in chunks for p in expand_targets(chunk)] == expand_targets(targets)
    assert all(len(expand_targets(chunk)) <= 100 for chunk in chunks)
    assert chunk_targets(["a.example", "10.0.0.0/30"], 100) == [["a.example", "10.0.0.0/30"]]  # small: one chunk
    with pytest.raises(TargetError, match="more than 4,096 chunks"):
        chunk_targets(["10.0.0.0/8"], 16)
