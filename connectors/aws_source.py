"""An AWS account as a Source: ACM certificates, ELBv2 listeners' certificates and IAM server
certificates, in every region configured.

Locators (one Location per place a certificate is seen):

- ``aws-acm://REGION/CERTIFICATE_ARN``: an ACM certificate. Details: arn, region, status, type
  (IMPORTED, AMAZON_ISSUED, PRIVATE), in_use_by (ACM's own list), domain.
- ``aws-elbv2://REGION/LISTENER_ARN?cert=CERTIFICATE_ARN``: a certificate on an HTTPS or TLS listener;
  one locator per listener and certificate, so a listener with a default and two SNI certificates is
  three Locations (ARNs never contain ``?``). Details: listener_arn, load_balancer_name, port,
  protocol, default (True for the listener's default certificate, False for SNI), certificate_arn,
  region.
- ``aws-iam://SERVER_CERTIFICATE_NAME``: an IAM server certificate (IAM is global: read once, through
  the first region's endpoint). Details: arn, name, path, not_after read from the certificate itself
  (IAM's Expiration field is not used: moto makes it up).

Chains: only the certificates that link by signature are kept (moto appends a fake Amazon root to
every ACM chain). A region or service that cannot be read yields a Problem (locator
``aws-acm://REGION``, ``aws-elbv2://REGION`` or ``aws-iam://``) and the rest continues; a certificate
that cannot be read yields a Problem at its own locator.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial

from cryptography.hazmat.primitives import serialization

from certpilot.discovery import Found, Problem
from certpilot.errors import CertpilotError, redact
from connectors.aws import AwsAccount, StoredCertificate

__all__ = ["AwsSource", "ACM_STATUSES", "ACM_KEY_TYPES"]

# Statuses that have a certificate to read (PENDING_VALIDATION, FAILED and VALIDATION_TIMED_OUT have none).
ACM_STATUSES = ("ISSUED", "EXPIRED", "REVOKED", "INACTIVE")
# ListCertificates returns only RSA 1024 and 2048 certificates unless asked for every key type.
ACM_KEY_TYPES = ("RSA_1024", "RSA_2048", "RSA_3072", "RSA_4096", "EC_prime256v1", "EC_secp384r1", "EC_secp521r1")


def _der(stored: StoredCertificate) -> tuple[bytes, ...]:
    return tuple(c.public_bytes(serialization.Encoding.DER) for c in (stored.certificate, *stored.chain))


class AwsSource:
    """Discovers the certificates of one AWS account in ``account.regions``; ``name`` is ``aws:ALIAS``."""

    def __init__(self, account: AwsAccount, alias: str, *, acm: bool = True, elbv2: bool = True,
                 iam: bool = True) -> None:
        self.account = account
        self.name = f"aws:{alias}"
        self.acm, self.elbv2, self.iam = acm, elbv2, iam

    def discover(self) -> Iterator[Found | Problem]:
        cache: dict[str, StoredCertificate | None] = {}  # an ARN is read once per run
        for region in self.account.regions:
            if self.acm:
                yield from self._guarded(f"aws-acm://{region}", partial(self._acm, region, cache))
            if self.elbv2:
                yield from self._guarded(f"aws-elbv2://{region}", partial(self._elbv2, region, cache))
        if self.iam:
            yield from self._guarded("aws-iam://", self._iam)

    @staticmethod
    def _guarded(locator: str, produce: Callable[[], Iterator[Found | Problem]]) -> Iterator[Found | Problem]:
        try:
            yield from produce()
        except CertpilotError as exc:
            yield Problem(locator, redact(exc))

    def _stored(self, arn: str, cache: dict[str, StoredCertificate | None]) -> StoredCertificate | None:
        if arn not in cache:
            cache[arn] = self.account.stored_certificate(arn)
        return cache[arn]

    def _acm(self, region: str, cache: dict[str, StoredCertificate | None]) -> Iterator[Found | Problem]:
        summaries = list(self.account.pages("acm", region, "list_certificates", "CertificateSummaryList",
                                            CertificateStatuses=list(ACM_STATUSES),
                                            Includes={"keyTypes": list(ACM_KEY_TYPES)}))
        for summary in summaries:
            arn = summary["CertificateArn"]
            locator = f"aws-acm://{region}/{arn}"
            try:
                described = self.account.call("acm", region, "describe_certificate", arn=arn,
                                              CertificateArn=arn)["Certificate"]
                stored = self._stored(arn, cache)
            except CertpilotError as exc:
                yield Problem(locator, redact(exc))
                continue
            if stored is None:
                yield Problem(locator, f"{arn}: deleted while it was being read")
                continue
            yield Found(_der(stored), locator, {
                "arn": arn, "region": region, "status": described.get("Status"), "type": described.get("Type"),
                "in_use_by": list(described.get("InUseBy", [])), "domain": described.get("DomainName")})

    def _elbv2(self, region: str, cache: dict[str, StoredCertificate | None]) -> Iterator[Found | Problem]:
        for listener in self.account.listeners(region):
            for cert_arn in listener.certificate_arns:
                locator = f"aws-elbv2://{region}/{listener.arn}?cert={cert_arn}"
                try:
                    stored = self._stored(cert_arn, cache)
                except CertpilotError as exc:
                    yield Problem(locator, redact(exc))
                    continue
                if stored is None:
                    yield Problem(locator, f"listener {listener.arn} names {cert_arn}, which does not exist")
                    continue
                yield Found(_der(stored), locator, {
                    "listener_arn": listener.arn, "load_balancer_name": listener.load_balancer_name,
                    "port": listener.port, "protocol": listener.protocol,
                    "default": cert_arn == listener.default, "certificate_arn": cert_arn, "region": region})

    def _iam(self) -> Iterator[Found | Problem]:
        region = self.account.global_region
        listed = self.account.pages("iam", region, "list_server_certificates", "ServerCertificateMetadataList")
        for meta in list(listed):
            name, arn = meta["ServerCertificateName"], meta["Arn"]
            locator = f"aws-iam://{name}"
            try:
                answer = self.account.call("iam", region, "get_server_certificate", arn=arn,
                                           ServerCertificateName=name)["ServerCertificate"]
                stored = self.account.parse_stored(arn, answer.get("CertificateBody", ""),
                                                   answer.get("CertificateChain"))
            except CertpilotError as exc:
                yield Problem(locator, redact(exc))
                continue
            yield Found(_der(stored), locator, {
                "arn": arn, "name": name, "path": meta.get("Path", "/"),
                "not_after": stored.certificate.not_valid_after_utc.isoformat()})
