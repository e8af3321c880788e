"""certpilot.names: the one rule for DNS names and IP addresses, and RFC 6125 matching, with real
certificates. The places that use it (managed certificates, the private CA, the TLS scanner and
verifier) keep their own tests; these pin the rule itself."""

from __future__ import annotations

import datetime as dt
import ipaddress
import pickle

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from certpilot.errors import InvalidDnsNameError, InvalidIpAddressError, InvalidNameError, PermanentError
from certpilot.names import (check_hostname, is_ip_address, matches, normalise_dns_name, normalise_ip_address,
                             parse_ip_address)


@pytest.mark.parametrize(("given", "expected"), [
    ("www.example.com", "www.example.com"),
    ("WWW.Example.COM", "www.example.com"),  # upper case
    ("www.example.com.", "www.example.com"),  # the root's trailing dot
    ("  www.example.com \n", "www.example.com"),
    ("bücher.example", "xn--bcher-kva.example"),  # a U-label becomes its A-label
    ("BÜCHER.example", "xn--bcher-kva.example"),  # UTS #46 maps the capital first
    ("xn--bcher-kva.example", "xn--bcher-kva.example"),  # a valid A-label is kept
    ("straße.de", "xn--strae-oqa.de"),  # IDNA 2008, not the transitional ss mapping
    ("例え.テスト", "xn--r8jz45g.xn--zckzah"),
    ("bücher。example", "xn--bcher-kva.example"),  # an ideographic full stop separates labels
    ("a-b.c-d.example", "a-b.c-d.example"),
    ("1.2.3.example", "1.2.3.example"),  # digits are letters here
    ("localhost", "localhost"),  # one label is a name
    ("a" * 63 + ".example", "a" * 63 + ".example"),  # the longest label
])
def test_names_are_normalised(given: str, expected: str) -> None:
    assert normalise_dns_name(given) == expected
    assert normalise_dns_name(expected) == expected  # idempotent


@pytest.mark.parametrize(("given", "reason"), [
    ("", "empty"),
    (".", "empty"),
    ("a..example", "empty label"),
    ("www.example.com..", "empty label"),
    (".example.com", "empty label"),
    ("a" * 64 + ".example", "more than 63"),
    (".".join(["a" * 63] * 4), "more than the 253"),  # 255 characters
    ("-lead.example", "inner hyphens"),
    ("trail-.example", "inner hyphens"),
    ("under_score.example", "inner hyphens"),  # RFC 5280 and the Baseline Requirements: no underscore
    ("bad name.example", "inner hyphens"),
    ("bad!.example", "inner hyphens"),
    ("xn--zz.example", "not a valid A-label"),
    ("bü_cher.example", "internationalised"),
    ("*.example.com", "wildcard is not allowed here"),
])
def test_names_breaking_the_rule_are_refused_with_the_reason(given: str, reason: str) -> None:
    with pytest.raises(InvalidDnsNameError, match=reason) as refused:
        normalise_dns_name(given)
    error = refused.value
    assert isinstance(error, PermanentError) and isinstance(error, ValueError) and isinstance(error, InvalidNameError)
    assert error.value == given and reason in error.reason
    assert str(error).startswith(f"{given!r} is not a valid DNS name: ")
    copy = pickle.loads(pickle.dumps(error))  # Prefect persists a failed task's exception
    assert (type(copy), copy.value, copy.reason, str(copy)) == (type(error), error.value, error.reason, str(error))


def test_the_longest_name() -> None:
    longest = ".".join(["a" * 63] * 3 + ["a" * 61])  # 253 characters
    assert normalise_dns_name(longest + ".") == longest


@pytest.mark.parametrize(("given", "expected"), [
    ("*.example.com", "*.example.com"),
    ("*.Example.COM.", "*.example.com"),
    ("*.bücher.example", "*.xn--bcher-kva.example"),
])
def test_a_wildcard_is_the_whole_left_most_label(given: str, expected: str) -> None:
    assert normalise_dns_name(given, wildcard=True) == expected


@pytest.mark.parametrize(("given", "reason"), [
    ("*.com", "at least two labels"),  # never over a single label (a TLD, a public suffix's first level)
    ("*", "whole left-most label"),
    ("f*.example.com", "whole left-most label"),  # no partial-label wildcard
    ("*oo.example.com", "whole left-most label"),
    ("www.*.example.com", "whole left-most label"),
    ("*.*.example.com", "whole left-most label"),
    ("**.example.com", "whole left-most label"),
])
def test_a_wildcard_anywhere_else_is_refused(given: str, reason: str) -> None:
    with pytest.raises(InvalidDnsNameError, match=reason):
        normalise_dns_name(given, wildcard=True)


@pytest.mark.parametrize(("given", "expected"), [
    ("10.0.0.1", "10.0.0.1"),
    (" 10.0.0.1 ", "10.0.0.1"),
    ("::1", "::1"),
    ("[::1]", "::1"),  # brackets, as in a URL
    ("2001:DB8:0:0::1", "2001:db8::1"),  # canonical IPv6 text
    ("2001:0db8:0000:0000:0000:0000:0000:0001", "2001:db8::1"),
    ("fe80::1:2", "fe80::1:2"),
    ("::", "::"),
    ("::ffff:192.0.2.1", str(ipaddress.IPv6Address("::ffff:192.0.2.1"))),  # an IPv4-mapped IPv6 address stays IPv6
])
def test_ip_addresses_are_normalised(given: str, expected: str) -> None:
    assert normalise_ip_address(given) == expected
    assert is_ip_address(given)


@pytest.mark.parametrize("given", [
    "300.1.1.1", "10.0.0", "010.0.0.1",  # leading zeros are ambiguous (octal to some parsers)
    "fe80::1%eth0",  # a zone index cannot be in a certificate
    "[10.0.0.1]",  # brackets are for IPv6
    "2001:db8::1::2", "example.com", "", "[::1",
])
def test_what_is_not_an_ip_address(given: str) -> None:
    assert parse_ip_address(given) is None and not is_ip_address(given)
    with pytest.raises(InvalidIpAddressError, match=f"^{given!r} is not an IP address: ".replace("[", r"\[")
                       .replace("]", r"\]").replace(".", r"\.")):
        normalise_ip_address(given)


@pytest.mark.parametrize(("pattern", "host", "expected"), [
    ("a.example", "a.example", True),
    ("*.example.com", "www.example.com", True),
    ("*.example.com", "example.com", False),  # the wildcard stands for exactly one label
    ("*.example.com", "a.b.example.com", False),
    ("*.example.com", "*.example.com", False),  # a host is never a wildcard
    ("a.example", "b.example", False),
])
def test_matching_normalised_names(pattern: str, host: str, expected: bool) -> None:
    assert matches(pattern, host) is expected


def _certificate(sans: list[x509.GeneralName]) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "names.test")])
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False).sign(key, hashes.SHA256()))


def test_hostname_matching_normalises_both_sides() -> None:
    cert = _certificate([x509.DNSName("WWW.Example.TEST."), x509.DNSName("*.Wild.Test"),
                         x509.DNSName("under_score.test"), x509.IPAddress(ipaddress.ip_address("2001:db8::1"))])
    assert check_hostname(cert, "www.example.test") is None  # a SAN in upper case with a trailing dot
    assert check_hostname(cert, "A.WILD.TEST.") is None
    assert check_hostname(cert, "[2001:db8::1]") is None  # an IPv6 hostname in brackets
    assert check_hostname(cert, "2001:DB8:0::1") is None  # or in any other form
    assert check_hostname(cert, "under_score.test") == "hostname 'under_score.test' is not a valid DNS name"
    assert check_hostname(cert, "a.b.wild.test") == ("hostname a.b.wild.test not in SANs [WWW.Example.TEST., "
                                                     "*.Wild.Test, under_score.test, 2001:db8::1]")
