"""AcmeIssuer against real pebble: orders over http-01 and dns-01, chains, revocation."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest
import sqlalchemy as sa
from cryptography import x509

from certpilot.errors import PermanentError
from certpilot.issuance import Issuer, build_csr
from certpilot.keys import generate_private_key
from certpilot.keystore import KeyRing
from connectors.acme_issuer import AcmeIssuer
from connectors.challenges import ChallTestSrvDns, Dns01Solver, Http01Responder, TlsAlpn01Responder
from tests.integration.acme_servers import (
    ChallTestSrv,
    Pebble,
    alpn_certificate,
    query_txt,
    san_dns_names,
    verified_chain,
)


def _common_name(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value)


@pytest.fixture
def issuer(sqlite_engine: sa.Engine, pebble: Pebble, key_ring: Callable[[], KeyRing],
           http01_responder: Http01Responder) -> AcmeIssuer:
    return AcmeIssuer(sqlite_engine, "pebble", pebble.directory_url, key_ring=key_ring, solver=http01_responder,
                      ca_bundle=pebble.ca_bundle, contact=("mailto:pki-team@certpilot.test",))


def test_it_plays_the_issuer_role(issuer: AcmeIssuer) -> None:
    assert isinstance(issuer, Issuer)
    assert issuer.name == "pebble"


def test_http01_order_with_several_sans_chains_to_pebbles_root(issuer: AcmeIssuer, pebble: Pebble,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    names = ["www.shop.certpilot.test", "shop.certpilot.test", "api.shop.certpilot.test", "static.certpilot.test"]
    key = generate_private_key("ec-p256")
    responder = issuer.solver
    assert isinstance(responder, Http01Responder)
    tokens: list[str] = []
    present = responder.present
    monkeypatch.setattr(responder, "present", lambda c: (tokens.append(c.token), present(c))[1])

    issued = issuer.issue(build_csr(key, names), "tls-server")

    leaf = issued.leaf
    assert sorted(san_dns_names(leaf)) == sorted(names)
    assert leaf.public_key().public_numbers() == key.public_key().public_numbers()  # type: ignore[union-attr]
    root = pebble.roots()[0]
    for name in names:
        verified_chain(issued.chain, root, name)
    assert issued.chain[-1].issuer == root.subject  # the intermediate, not the root, ends the chain
    assert pebble.cert_status(leaf.serial_number)["Status"] == "Valid"
    # Every challenge answer was served, and taken down once the order was done.
    assert tokens
    for token in tokens:
        answer = httpx.get(f"http://{responder.address}:{responder.port}/.well-known/acme-challenge/{token}", timeout=5)
        assert answer.status_code == 404


def test_rsa_certificate_key_and_rsa_account_key(sqlite_engine: sa.Engine, pebble: Pebble,
                                                 key_ring: Callable[[], KeyRing],
                                                 http01_responder: Http01Responder) -> None:
    issuer = AcmeIssuer(sqlite_engine, "pebble-rsa", pebble.directory_url, key_ring=key_ring, solver=http01_responder,
                        ca_bundle=pebble.ca_bundle, account_key_algorithm="rsa-2048")
    issued = issuer.issue(build_csr(generate_private_key("rsa-2048"), ["rsa.certpilot.test"]), "tls-server")
    verified_chain(issued.chain, pebble.roots()[0], "rsa.certpilot.test")


def test_preferred_chain_picks_the_alternate_root(sqlite_engine: sa.Engine, pebble: Pebble,
                                                  key_ring: Callable[[], KeyRing],
                                                  http01_responder: Http01Responder) -> None:
    default_root, alternate_root = pebble.roots()
    issuer = AcmeIssuer(sqlite_engine, "pebble", pebble.directory_url, key_ring=key_ring, solver=http01_responder,
                        ca_bundle=pebble.ca_bundle, preferred_chain=_common_name(alternate_root))

    issued = issuer.issue(build_csr(generate_private_key("ec-p256"), ["alt-chain.certpilot.test"]), "tls-server")

    verified_chain(issued.chain, alternate_root, "alt-chain.certpilot.test")
    with pytest.raises(x509.verification.VerificationError):
        verified_chain(issued.chain, default_root, "alt-chain.certpilot.test")


def test_unknown_preferred_chain_keeps_the_default(sqlite_engine: sa.Engine, pebble: Pebble,
                                                   key_ring: Callable[[], KeyRing],
                                                   http01_responder: Http01Responder) -> None:
    issuer = AcmeIssuer(sqlite_engine, "pebble", pebble.directory_url, key_ring=key_ring, solver=http01_responder,
                        ca_bundle=pebble.ca_bundle, preferred_chain="No Such Root")
    issued = issuer.issue(build_csr(generate_private_key("ec-p256"), ["default-chain.certpilot.test"]), "tls-server")
    verified_chain(issued.chain, pebble.roots()[0], "default-chain.certpilot.test")


def test_dns01_order_through_challtestsrv_with_a_wildcard(sqlite_engine: sa.Engine, pebble: Pebble,
                                                          key_ring: Callable[[], KeyRing],
                                                          challtestsrv: ChallTestSrv) -> None:
    solver = Dns01Solver(ChallTestSrvDns(challtestsrv.management_url))
    issuer = AcmeIssuer(sqlite_engine, "pebble-dns", pebble.directory_url, key_ring=key_ring, solver=solver,
                        ca_bundle=pebble.ca_bundle)
    # The base name and its wildcard both validate at _acme-challenge.dns.certpilot.test, with two values.
    names = ["dns.certpilot.test", "*.dns.certpilot.test", "mail.certpilot.test"]

    issued = issuer.issue(build_csr(generate_private_key("ec-p256"), names), "tls-server")

    assert sorted(san_dns_names(issued.leaf)) == sorted(names)
    verified_chain(issued.chain, pebble.roots()[0], "anything.dns.certpilot.test")
    # Cleanup removed the records from the DNS server itself.
    assert query_txt(challtestsrv.dns_port, "_acme-challenge.dns.certpilot.test") == []
    assert query_txt(challtestsrv.dns_port, "_acme-challenge.mail.certpilot.test") == []


def test_tls_alpn01_order(sqlite_engine: sa.Engine, pebble: Pebble, key_ring: Callable[[], KeyRing],
                          tls_alpn01_responder: TlsAlpn01Responder) -> None:
    issuer = AcmeIssuer(sqlite_engine, "pebble-alpn", pebble.directory_url, key_ring=key_ring,
                        solver=tls_alpn01_responder, ca_bundle=pebble.ca_bundle)
    names = ["alpn.certpilot.test", "www.alpn.certpilot.test"]

    issued = issuer.issue(build_csr(generate_private_key("ec-p256"), names, ["127.0.0.1"]), "tls-server")

    assert sorted(san_dns_names(issued.leaf)) == sorted(names)
    verified_chain(issued.chain, pebble.roots()[0], "www.alpn.certpilot.test")
    # Cleanup: the responder no longer answers for those names.
    assert alpn_certificate(tls_alpn01_responder.port, "alpn.certpilot.test") is None


def test_dns_only_solver_cannot_take_an_ip_identifier(sqlite_engine: sa.Engine, pebble: Pebble,
                                                      key_ring: Callable[[], KeyRing],
                                                      challtestsrv: ChallTestSrv) -> None:
    issuer = AcmeIssuer(sqlite_engine, "pebble-dns", pebble.directory_url, key_ring=key_ring,
                        solver=Dns01Solver(ChallTestSrvDns(challtestsrv.management_url)), ca_bundle=pebble.ca_bundle)
    with pytest.raises(PermanentError, match="127.0.0.1.*offers http-01.*solver answers only dns-01"):
        issuer.issue(build_csr(generate_private_key("ec-p256"), [], ["127.0.0.1"]), "tls-server")


def test_ip_address_identifier_over_http01(issuer: AcmeIssuer, pebble: Pebble) -> None:
    csr = build_csr(generate_private_key("ec-p256"), ["ip.certpilot.test"], ["127.0.0.1"])
    issued = issuer.issue(csr, "tls-server")
    sans = issued.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]


def test_revocation_with_a_reason_reaches_pebble(issuer: AcmeIssuer, pebble: Pebble) -> None:
    issued = issuer.issue(build_csr(generate_private_key("ec-p256"), ["revoke-me.certpilot.test"]), "tls-server")
    assert pebble.cert_status(issued.leaf.serial_number)["Status"] == "Valid"

    issuer.revoke(issued.leaf, x509.ReasonFlags.key_compromise)

    status = pebble.cert_status(issued.leaf.serial_number)
    assert status["Status"] == "Revoked"
    assert status["Reason"] == 1  # keyCompromise
    issuer.revoke(issued.leaf, x509.ReasonFlags.key_compromise)  # already revoked: not an error


def test_revocation_reason_superseded(issuer: AcmeIssuer, pebble: Pebble) -> None:
    issued = issuer.issue(build_csr(generate_private_key("ec-p256"), ["superseded.certpilot.test"]), "tls-server")
    issuer.revoke(issued.leaf, x509.ReasonFlags.superseded)
    assert pebble.cert_status(issued.leaf.serial_number)["Reason"] == 4


def test_only_tls_server_profile(issuer: AcmeIssuer) -> None:
    with pytest.raises(PermanentError, match="tls-client"):
        issuer.issue(build_csr(generate_private_key("ec-p256"), ["client.certpilot.test"]), "tls-client")
