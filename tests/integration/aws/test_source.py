"""AwsSource against a real moto server: ACM certificates with their chains (moto's fake root dropped),
listeners' default and SNI certificates, IAM server certificates, two regions, and failures that yield
Problems while the rest of the account is still read."""

from __future__ import annotations

import time

from cryptography import x509

from certpilot.deployment import DeployBundle
from certpilot.discovery import Found, Problem, split
from certpilot.sample_estate import pem
from connectors.aws import AwsAccount
from connectors.aws_source import AwsSource
from lab.moto import ACCESS_KEY_ID, SECRET_ACCESS_KEY, MotoServer, free_port, make_listener, make_load_balancer
from tests.integration.aws.conftest import REGIONS, Leaves, der


def _import(moto: MotoServer, region: str, bundle: DeployBundle,
            chain: tuple[x509.Certificate, ...] | None = None) -> str:
    kwargs = {"Certificate": bundle.certificate_pem(), "PrivateKey": bundle.key_pem()}
    chain = bundle.chain if chain is None else chain
    if chain:
        kwargs["CertificateChain"] = pem(*chain)
    return moto.client("acm", region).import_certificate(**kwargs)["CertificateArn"]


def _estate(moto: MotoServer, leaves: Leaves) -> dict[str, object]:
    eu, us = REGIONS
    root, inter = leaves.pki
    a, b, c, d = (leaves.bundle(n, f"{n}.example.test") for n in ("a", "b", "c", "d"))
    arn_a = _import(moto, eu, a, (inter.certificate, root.certificate))  # full chain, root included
    arn_b = _import(moto, eu, b, ())  # no chain at all
    arn_c = _import(moto, us, c)
    moto.client("iam", eu).upload_server_certificate(
        ServerCertificateName="d-cert", CertificateBody=d.certificate_pem().decode(),
        PrivateKey=d.key_pem().decode(), CertificateChain=d.chain_pem().decode())
    iam_arn = moto.client("iam", eu).get_server_certificate(ServerCertificateName="d-cert")[
        "ServerCertificate"]["ServerCertificateMetadata"]["Arn"]
    alb = make_load_balancer(moto, eu, "web")
    https = make_listener(moto, alb, 443, arn_a, sni=(arn_b,))
    nlb = make_load_balancer(moto, us, "tcp", kind="network")
    tls = make_listener(moto, nlb, 8443, iam_arn, sni=(arn_c,), protocol="TLS")
    return {"a": a, "b": b, "c": c, "d": d, "arn_a": arn_a, "arn_b": arn_b, "arn_c": arn_c, "iam_arn": iam_arn,
            "https": https, "tls": tls}


def test_finds_acm_listener_and_iam_certificates_in_two_regions(moto: MotoServer, account: AwsAccount,
                                                                 leaves: Leaves) -> None:
    e = _estate(moto, leaves)
    eu, us = REGIONS
    root, inter = leaves.pki
    # moto's own answer carries a fake Amazon root after the chain we imported: the source must drop it.
    raw = moto.client("acm", eu).get_certificate(CertificateArn=e["arn_a"])["CertificateChain"]
    assert "Amazon" in str([c.subject for c in x509.load_pem_x509_certificates(raw.encode())])

    found, problems = split(AwsSource(account, "lab").discover())

    assert problems == []
    by_locator = {f.locator: f for f in found}
    a, b, c, d = (e[k] for k in "abcd")
    expected = {
        f"aws-acm://{eu}/{e['arn_a']}": (a.certificate, inter.certificate, root.certificate),
        f"aws-acm://{eu}/{e['arn_b']}": (b.certificate,),
        f"aws-acm://{us}/{e['arn_c']}": (c.certificate, inter.certificate),
        f"aws-elbv2://{eu}/{e['https']}?cert={e['arn_a']}": (a.certificate, inter.certificate, root.certificate),
        f"aws-elbv2://{eu}/{e['https']}?cert={e['arn_b']}": (b.certificate,),
        f"aws-elbv2://{us}/{e['tls']}?cert={e['iam_arn']}": (d.certificate, inter.certificate),
        f"aws-elbv2://{us}/{e['tls']}?cert={e['arn_c']}": (c.certificate, inter.certificate),
        "aws-iam://d-cert": (d.certificate, inter.certificate),
    }
    assert set(by_locator) == set(expected)
    for locator, certs in expected.items():
        assert by_locator[locator].certificates == tuple(der(x) for x in certs), locator

    acm_a = by_locator[f"aws-acm://{eu}/{e['arn_a']}"].details
    assert (acm_a["arn"], acm_a["status"], acm_a["type"], acm_a["region"]) == (e["arn_a"], "ISSUED", "IMPORTED", eu)
    default = by_locator[f"aws-elbv2://{eu}/{e['https']}?cert={e['arn_a']}"].details
    sni = by_locator[f"aws-elbv2://{eu}/{e['https']}?cert={e['arn_b']}"].details
    assert (default["default"], default["port"], default["protocol"], default["load_balancer_name"]) == \
        (True, 443, "HTTPS", "web")
    assert (sni["default"], sni["certificate_arn"], sni["listener_arn"]) == (False, e["arn_b"], e["https"])
    tls = by_locator[f"aws-elbv2://{us}/{e['tls']}?cert={e['iam_arn']}"].details
    assert (tls["default"], tls["protocol"], tls["port"]) == (True, "TLS", 8443)
    iam = by_locator["aws-iam://d-cert"].details
    # moto says every IAM certificate expired in 2012: the expiry comes from the certificate itself.
    assert iam["not_after"] == d.certificate.not_valid_after_utc.isoformat()
    assert iam["arn"] == e["iam_arn"]


def test_a_failing_region_and_a_dangling_listener_certificate_are_problems_and_the_rest_is_read(
        moto: MotoServer, leaves: Leaves) -> None:
    e = _estate(moto, leaves)
    eu, _ = REGIONS
    moto.client("acm", eu).delete_certificate(CertificateArn=e["arn_b"])  # moto lets an SNI certificate go
    # moto answers 500 for a region it does not know: that region's ACM and ELBv2 fail, the rest goes on.
    account = AwsAccount(regions=(eu, "xx-nowhere-1"), access_key_id=ACCESS_KEY_ID,
                         secret_access_key=SECRET_ACCESS_KEY, endpoint_url=moto.url, max_attempts=1)

    found, problems = split(AwsSource(account, "lab").discover())

    reasons = {p.locator: p.reason for p in problems}
    assert set(reasons) == {f"aws-elbv2://{eu}/{e['https']}?cert={e['arn_b']}", "aws-acm://xx-nowhere-1",
                            "aws-elbv2://xx-nowhere-1"}
    assert "does not exist" in reasons[f"aws-elbv2://{eu}/{e['https']}?cert={e['arn_b']}"]
    assert "list_certificates in xx-nowhere-1" in reasons["aws-acm://xx-nowhere-1"]
    assert "describe_load_balancers in xx-nowhere-1" in reasons["aws-elbv2://xx-nowhere-1"]
    assert {f.locator for f in found} == {f"aws-acm://{eu}/{e['arn_a']}",
                                          f"aws-elbv2://{eu}/{e['https']}?cert={e['arn_a']}", "aws-iam://d-cert"}


def test_an_unreachable_endpoint_gives_problems_quickly() -> None:
    account = AwsAccount(regions=REGIONS, access_key_id="x", secret_access_key="y",
                         endpoint_url=f"http://127.0.0.1:{free_port()}", connect_timeout=1, max_attempts=2)
    started = time.monotonic()
    items = list(AwsSource(account, "down").discover())
    elapsed = time.monotonic() - started
    assert all(isinstance(i, Problem) for i in items)
    assert [i.locator for i in items] == [f"aws-acm://{REGIONS[0]}", f"aws-elbv2://{REGIONS[0]}",
                                          f"aws-acm://{REGIONS[1]}", f"aws-elbv2://{REGIONS[1]}", "aws-iam://"]
    assert all("EndpointConnectionError" in i.reason for i in items)
    assert elapsed < 8, elapsed
    assert not any(isinstance(i, Found) for i in items)
