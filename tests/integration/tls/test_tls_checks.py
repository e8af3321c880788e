"""The checks wait_until_served makes on a presented chain, with real certificates: hostname matching (RFC 6125
wildcards, IP SANs, no CN fallback) and chain completeness with and without trust anchors."""

from __future__ import annotations

import datetime as dt
import ipaddress

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from connectors.tls_verify import check_chain, check_hostname
from lab.tls_farm import FarmCA, issue_farm_leaf, make_farm_ca

NOW = dt.datetime.now(dt.timezone.utc)


@pytest.fixture(scope="module")
def ca() -> FarmCA:
    return make_farm_ca(label="Checks")


def _cert(sans: list[x509.GeneralName] | None, cn: str = "cn.test") -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
               .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])).public_key(key.public_key())
               .serial_number(1).not_valid_before(NOW - dt.timedelta(days=1))
               .not_valid_after(NOW + dt.timedelta(days=1)))
    if sans is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(key, hashes.SHA256())


@pytest.mark.parametrize(("host", "matches"), [
    ("www.example.test", True),
    ("WWW.Example.Test.", True),  # case and a trailing dot do not matter
    ("a.wild.test", True),
    ("wild.test", False),  # a wildcard needs a label
    ("b.a.wild.test", False),  # and matches one label only
    ("bücher.example.test", True),  # U-label matched as its A-label
    ("xn--bcher-kva.example.test", True),
    ("other.test", False),
    ("10.1.2.3", True),
    ("10.1.2.4", False),
    ("2001:db8::1", True),
    ("anything.com", False),  # "*.com" is never honoured
    ("fooweb.part.test", False),  # partial-label wildcards are not honoured
])
def test_hostname_matching(host: str, matches: bool) -> None:
    cert = _cert([x509.DNSName("www.example.test"), x509.DNSName("*.wild.test"),
                  x509.DNSName("xn--bcher-kva.example.test"), x509.DNSName("*.com"), x509.DNSName("f*.part.test"),
                  x509.IPAddress(ipaddress.ip_address("10.1.2.3")),
                  x509.IPAddress(ipaddress.ip_address("2001:db8::1"))])
    assert (check_hostname(cert, host) is None) is matches


def test_hostname_mismatch_reasons() -> None:
    cert = _cert([x509.DNSName("a.x.test"), x509.IPAddress(ipaddress.ip_address("10.0.0.1"))])
    assert check_hostname(cert, "www.x.test") == "hostname www.x.test not in SANs [a.x.test, 10.0.0.1]"
    assert check_hostname(cert, "10.0.0.2") == "IP address 10.0.0.2 not in SANs [a.x.test, 10.0.0.1]"
    assert check_hostname(_cert([x509.DNSName("10.0.0.1")]), "10.0.0.1") is not None  # IPs match IP SANs only


def test_the_common_name_is_never_used() -> None:
    cert = _cert(None, cn="www.example.test")
    assert check_hostname(cert, "www.example.test") == ("hostname www.example.test not in SANs []: the certificate has "
                                                         "no subjectAltName (CN=www.example.test is not used)")


def test_chain_completeness(ca: FarmCA) -> None:
    leaf, _ = issue_farm_leaf(ca, ["a.test"], NOW + dt.timedelta(days=5))
    other = make_farm_ca(label="Other")
    issuer = "CN=Checks Issuing CA,O=certpilot tls farm"
    # Without trust: an intermediate presented is enough; a lone leaf is not.
    assert check_chain([leaf, ca.intermediate]) is None
    assert check_chain([leaf, ca.intermediate, ca.root]) is None
    assert check_chain([leaf]) == f"chain incomplete: no intermediate for issuer {issuer}"
    assert check_chain([leaf, other.intermediate]) == f"chain incomplete: no intermediate for issuer {issuer}"
    # With trust: the chain must reach an anchor by signature, in whatever order it was presented.
    assert check_chain([leaf, ca.intermediate], [ca.root]) is None
    assert check_chain([leaf, ca.root, ca.intermediate], [ca.root]) is None
    assert check_chain([leaf], [ca.intermediate]) is None
    assert check_chain([leaf], [ca.root]) == f"chain incomplete: no intermediate or trust anchor for issuer {issuer}"
    assert check_chain([leaf, ca.intermediate], [other.root]) == (
        "chain incomplete: no intermediate or trust anchor for issuer CN=Checks Root CA,O=certpilot tls farm")
    assert check_chain([leaf, ca.intermediate, ca.root], [other.root]) == (
        "chain ends at the self-signed CN=Checks Root CA,O=certpilot tls farm, which is not a trust anchor")
    look_alike = make_farm_ca(label="Checks")  # same names, other keys
    assert check_chain([leaf, look_alike.intermediate], [ca.root]) is not None
    assert check_chain([], [ca.root]) == "no certificate presented"
