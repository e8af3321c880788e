"""Challenge solvers on their own, against real servers: our http-01 responder over HTTP,
challtestsrv's DNS, and Route53 on a real moto server."""

from __future__ import annotations

import hashlib
import pickle
import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import josepy as jose
import httpx
import pytest
from acme import challenges as acme_challenges
from botocore.config import Config
from cryptography.hazmat.primitives.asymmetric import ec

from certpilot.errors import PermanentError, ServiceRefusedError, ServiceUnavailableError, TransientError
from connectors.challenges import (
    ACME_IDENTIFIER_OID,
    DNS_01,
    HTTP_01,
    Challenge,
    ChallengeSolver,
    ChallTestSrvDns,
    Dns01Solver,
    DnsProvider,
    Http01Responder,
    Route53Dns,
    TLS_ALPN_01,
    TlsAlpn01Responder,
)
from tests.integration.acme_servers import ChallTestSrv, alpn_certificate, free_port, query_txt, san_dns_names

CHALLENGE = Challenge(HTTP_01, "www.certpilot.test", "tok-" + "A" * 39, "tok-" + "A" * 39 + ".thumbprint")


def test_challenge_values_agree_with_the_acme_package() -> None:
    jwk = jose.JWKEC(key=ec.generate_private_key(ec.SECP256R1()))
    dns01 = acme_challenges.DNS01(token=b"\x01" * 32)
    challenge = Challenge(DNS_01, "*.certpilot.test", dns01.encode("token"), dns01.key_authorization(jwk))
    assert challenge.dns_name == "_acme-challenge.certpilot.test" == dns01.validation_domain_name("certpilot.test")
    assert challenge.dns_value == dns01.validation(jwk)  # base64url(SHA-256(key authorisation)), unpadded
    http01 = acme_challenges.HTTP01(token=b"\x02" * 32)
    assert Challenge(HTTP_01, "x.test", http01.encode("token"), "k").http_path == http01.path
    assert challenge.key_authorization not in repr(challenge)


def test_solvers_play_the_role(challtestsrv: ChallTestSrv) -> None:
    assert isinstance(Http01Responder(), ChallengeSolver)
    assert isinstance(Dns01Solver(ChallTestSrvDns(challtestsrv.management_url)), ChallengeSolver)
    assert isinstance(ChallTestSrvDns(challtestsrv.management_url), DnsProvider)


def test_http01_responder_serves_and_forgets() -> None:
    with Http01Responder("127.0.0.1", 0) as responder:
        url = f"http://127.0.0.1:{responder.port}{CHALLENGE.http_path}"
        assert httpx.get(url, timeout=2).status_code == 404
        responder.present(CHALLENGE)
        answer = httpx.get(url, timeout=2)
        assert answer.status_code == 200 and answer.text == CHALLENGE.key_authorization
        responder.cleanup(CHALLENGE)
        assert httpx.get(url, timeout=2).status_code == 404


def test_tls_alpn01_responder_presents_the_acme_identifier() -> None:
    challenge = Challenge(TLS_ALPN_01, "alpn.certpilot.test", "tok", "tok.thumbprint")
    with TlsAlpn01Responder("127.0.0.1", 0) as responder:
        assert alpn_certificate(responder.port, challenge.identifier) is None
        responder.present(challenge)
        cert = alpn_certificate(responder.port, challenge.identifier)
        assert cert is not None
        assert san_dns_names(cert) == ["alpn.certpilot.test"]
        extension = cert.extensions.get_extension_for_oid(ACME_IDENTIFIER_OID)
        assert extension.critical
        digest = hashlib.sha256(b"tok.thumbprint").digest()
        assert extension.value.value == b"\x04\x20" + digest  # type: ignore[attr-defined]
        assert alpn_certificate(responder.port, "other.certpilot.test") is None
        responder.cleanup(challenge)
        assert alpn_certificate(responder.port, challenge.identifier) is None


def test_http01_responder_port_in_use_is_transient() -> None:
    with Http01Responder("127.0.0.1", 0) as taken:
        with pytest.raises(TransientError, match="cannot listen"):
            Http01Responder("127.0.0.1", taken.port).start()


def test_challtestsrv_dns_keeps_other_values_of_a_name(challtestsrv: ChallTestSrv) -> None:
    dns = ChallTestSrvDns(challtestsrv.management_url)
    name = "_acme-challenge.shared.certpilot.test"
    dns.set_txt(name, "first")
    dns.set_txt(name, "second")
    assert sorted(query_txt(challtestsrv.dns_port, name)) == ["first", "second"]
    dns.delete_txt(name, "first")
    assert query_txt(challtestsrv.dns_port, name) == ["second"]
    dns.delete_txt(name, "second")
    assert query_txt(challtestsrv.dns_port, name) == []


def test_challtestsrv_unreachable_is_transient() -> None:
    with pytest.raises(TransientError) as failed:
        ChallTestSrvDns(f"http://127.0.0.1:{free_port()}", timeout=1).set_txt("_acme-challenge.x.test", "v")
    assert isinstance(failed.value, ServiceUnavailableError)
    assert (failed.value.service, failed.value.operation, failed.value.code) == ("challtestsrv", "/set-txt",
                                                                                 "ConnectError")


# Route53 on moto ----------------------------------------------------------------------------------

@pytest.fixture
def route53(moto_server: str) -> Iterator[tuple[Any, str]]:
    client = boto3.client("route53", endpoint_url=moto_server, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing",
                          config=Config(connect_timeout=2, read_timeout=5, retries={"max_attempts": 1}))
    zone = client.create_hosted_zone(Name="certpilot.test.", CallerReference=uuid.uuid4().hex)["HostedZone"]["Id"]
    yield client, zone
    httpx.post(moto_server + "/moto-api/reset", timeout=5)


def _txt_values(client: Any, zone: str, fqdn: str) -> list[str] | None:
    for record_set in client.list_resource_record_sets(HostedZoneId=zone)["ResourceRecordSets"]:
        if record_set["Name"] == fqdn and record_set["Type"] == "TXT":
            return [r["Value"] for r in record_set["ResourceRecords"]]
    return None


def test_route53_upsert_and_delete_of_txt_values(route53: tuple[Any, str]) -> None:
    client, zone = route53
    solver = Dns01Solver(Route53Dns(client, zone, ttl=30, propagation_timeout=10))
    base = Challenge(DNS_01, "r53.certpilot.test", "t1", "t1.thumb")
    wildcard = Challenge(DNS_01, "*.r53.certpilot.test", "t2", "t2.thumb")
    fqdn = "_acme-challenge.r53.certpilot.test."

    solver.present(base)
    solver.present(wildcard)  # same name: a second value in the same record set
    solver.present(wildcard)  # presenting twice does not duplicate it

    assert sorted(_txt_values(client, zone, fqdn) or []) == sorted([f'"{base.dns_value}"', f'"{wildcard.dns_value}"'])
    record_set = next(r for r in client.list_resource_record_sets(HostedZoneId=zone)["ResourceRecordSets"]
                      if r["Name"] == fqdn)
    assert record_set["TTL"] == 30
    solver.cleanup(base)
    assert _txt_values(client, zone, fqdn) == [f'"{wildcard.dns_value}"']
    solver.cleanup(wildcard)
    assert _txt_values(client, zone, fqdn) is None  # the record set is gone
    solver.cleanup(wildcard)  # cleaning up again is harmless


def test_route53_unknown_zone_is_permanent(route53: tuple[Any, str]) -> None:
    client, _ = route53
    provider = Route53Dns(client, "/hostedzone/ZNOSUCHZONE", propagation_timeout=5)
    with pytest.raises(PermanentError, match="NoSuchHostedZone") as refused:
        provider.set_txt("_acme-challenge.x.certpilot.test", "v")
    error = refused.value  # named by its cause, with the data as attributes, intact after pickling
    assert isinstance(error, ServiceRefusedError)
    assert (error.service, error.code) == ("route53", "NoSuchHostedZone")
    assert str(error).startswith(f"route53 {error.operation} in zone /hostedzone/ZNOSUCHZONE: NoSuchHostedZone")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error) and vars(copy) == vars(error) and str(copy) == str(error)


def test_route53_waits_for_insync_with_a_deadline(route53: tuple[Any, str]) -> None:
    client, zone = route53

    class Pending:  # a real client whose changes never leave PENDING: only get_change is wrapped
        def __getattr__(self, name: str) -> Any:
            return getattr(client, name)

        def get_change(self, **kwargs: Any) -> Any:
            answer = client.get_change(**kwargs)
            answer["ChangeInfo"]["Status"] = "PENDING"
            return answer

    clock = [0.0]
    provider = Route53Dns(Pending(), zone, propagation_timeout=3, clock=lambda: clock[0],
                          sleep=lambda s: clock.__setitem__(0, clock[0] + s))
    with pytest.raises(TransientError, match="still PENDING after 3 s"):
        provider.set_txt("_acme-challenge.slow.certpilot.test", "v")
    assert clock[0] <= 3
