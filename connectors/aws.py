"""One AWS account as certpilot sees it: bounded boto3 clients, vendor errors translated at the edge,
and the certificate facts that both the source (connectors/aws_source.py) and the deployers
(connectors/aws_deploy.py) read: what certificate an ACM or IAM ARN holds, which load balancer
listeners use a certificate, and a chain kept only where it links by signature.

Every call goes through ``AwsAccount.call``: a botocore Config with connect and read timeouts and a
bounded number of attempts, and errors turned into certpilot's, named by their cause and carrying
``service``, ``operation``, ``code``, ``region`` and ``arn`` as attributes: throttling, 5xx answers,
unparseable answers and connection failures are AwsUnavailableError (a ServiceUnavailableError,
transient); access denied, validation and a parameter of the wrong type are AwsRefusedError (a
ServiceRefusedError, permanent), not-found its subclass AwsNotFoundError. Each message names the
service, operation, region and ARN, and never holds request values (a private key is one): botocore's
quoted values are cut out, and a message that may still hold key material
(certpilot.errors.may_hold_secret) is not kept. Until the deployers wrap them, these errors are also
DeployError and PermanentDeployError, which the deployers' callers expect.

moto is looser than AWS, so nothing here relies on the store to refuse: whether a certificate is in
use is found by scanning the listeners ourselves, and moto's fake root appended to every
get_certificate chain falls away because only certificates that sign the one before are kept.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509

from certpilot.chain import build_chain
from certpilot.deployment import DeployError, PermanentDeployError, fingerprint
from certpilot.errors import (ParseError, ServiceError, ServiceRefusedError, ServiceUnavailableError,
                              may_hold_secret)
from certpilot.formats import load_bundle

__all__ = ["AwsAccount", "AwsNotFoundError", "AwsRefusedError", "AwsUnavailableError", "Listener", "StoredCertificate", "region_of", "is_acm_arn", "is_iam_arn",
           "iam_name_of", "linked_chain", "TLS_PROTOCOLS"]

TLS_PROTOCOLS = ("HTTPS", "TLS")  # ELBv2 listeners that hold certificates

_TRANSIENT_CODES = {"Throttling", "ThrottlingException", "ThrottledException", "TooManyRequestsException",
                    "RequestLimitExceeded", "RequestThrottled", "ServiceUnavailable", "ServiceUnavailableException",
                    "InternalFailure", "InternalError", "InternalServiceError", "InternalServerError",
                    "PriorRequestNotComplete", "RequestTimeout", "RequestTimeoutException"}
_NOT_FOUND_CODES = {"ResourceNotFoundException", "NoSuchEntity", "ListenerNotFound", "CertificateNotFound",
                    "LoadBalancerNotFound"}
_ELBV2_RESOURCE = re.compile(r":elasticloadbalancing:.*:(loadbalancer|listener)/(app|net|gwy)/")
_REDACT_VALUE = re.compile(r"value: .*?, type:", re.DOTALL)


class _AwsCall(ServiceError):
    """An AWS API call that failed: ``region`` ("" for IAM's global endpoint) and ``arn`` besides the
    service's fields."""

    def __init__(self, service: str, operation: str, code: str, detail: str = "", region: str = "",
                 arn: str | None = None) -> None:
        self.region, self.arn = region, arn
        where = f"aws {service} {operation} in {region or 'global'}" + (f" on {arn}" if arn else "")
        super().__init__(service, operation, code, detail, where)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.service, self.operation, self.code, self.detail, self.region, self.arn))


class AwsRefusedError(_AwsCall, ServiceRefusedError, PermanentDeployError):
    """AWS refused the request: access denied, invalid, a parameter of the wrong type (``code``)."""


class AwsNotFoundError(AwsRefusedError):
    """The ARN, name or listener asked for does not exist."""


class AwsUnavailableError(_AwsCall, ServiceUnavailableError, DeployError):
    """AWS could not answer now: throttled, failing (5xx), not reached, or an answer not the API's."""


def region_of(arn: str) -> str:
    """The region field of an ARN (empty for global services such as IAM)."""
    parts = arn.split(":", 5)
    if len(parts) < 6 or parts[0] != "arn":
        raise PermanentDeployError(f"not an ARN: {arn!r}")
    return parts[3]


def is_acm_arn(arn: str) -> bool:
    return arn.startswith("arn:") and ":acm:" in arn


def is_iam_arn(arn: str) -> bool:
    return arn.startswith("arn:") and ":iam::" in arn and ":server-certificate/" in arn


def iam_name_of(arn: str) -> str:
    """``arn:aws:iam::123:server-certificate/path/name`` -> ``name`` (the path is not part of the name)."""
    return arn.rsplit("/", 1)[-1]


def linked_chain(leaf: x509.Certificate, given: Iterable[x509.Certificate]) -> list[x509.Certificate]:
    """The certificates of ``given`` that chain ``leaf`` by signature, issuer first (leaf excluded).

    What a store returns beside a certificate is not trusted to be its chain: moto appends a fake
    Amazon root to every ACM chain; anything that does not sign the certificate before it is dropped."""
    return build_chain(leaf, list(given))[1:]


def chain_links(leaf: x509.Certificate, chain: Iterable[x509.Certificate]) -> bool:
    """True when each certificate of ``chain`` signed the one before it, starting from ``leaf``."""
    chain = list(chain)
    return linked_chain(leaf, chain) == chain


def _vendor_message(text: str, limit: int = 400) -> str:
    """botocore's error text as an error may carry it: the request values it quotes cut out, and
    nothing at all when what is left may still hold key material."""
    text = " ".join(_REDACT_VALUE.sub("value: [redacted], type:", text).split())
    if may_hold_secret(text):
        return "(the message was not kept: it may hold key material)"
    return text[:limit]


@dataclass(frozen=True)
class StoredCertificate:
    """What an ACM or IAM ARN holds: the certificate, and the part of the returned chain that links."""

    arn: str
    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.certificate)


@dataclass(frozen=True)
class Listener:
    """An ELBv2 HTTPS or TLS listener and its certificates: the default one and the SNI ones."""

    arn: str
    region: str
    load_balancer_name: str
    port: int
    protocol: str
    default: str | None
    sni: tuple[str, ...]

    @property
    def certificate_arns(self) -> tuple[str, ...]:
        return ((self.default,) if self.default else ()) + self.sni


@dataclass
class AwsAccount:
    """Credentials, an optional endpoint (moto, a VPC endpoint) and client limits; clients are made per
    service and region on first use and shared (boto3 clients are thread-safe).

    ``regions`` are where this account's certificates and load balancers are looked for; IAM is global
    and read through the first region's endpoint."""

    regions: tuple[str, ...]
    access_key_id: str | None = None
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    endpoint_url: str | None = None
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    max_attempts: int = 3
    _session: Any = field(default=None, init=False, repr=False)
    _clients: dict[tuple[str, str], Any] = field(default_factory=dict, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        self.regions = tuple(self.regions)
        if not self.regions:
            raise PermanentDeployError("an AWS account needs at least one region")
        if self.max_attempts < 1:
            raise PermanentDeployError("max_attempts must be at least 1")

    @property
    def global_region(self) -> str:
        return self.regions[0]

    def client(self, service: str, region: str) -> Any:
        with self._lock:
            if (service, region) not in self._clients:
                import boto3  # noqa: PLC0415 (boto only when AWS is used)
                from botocore.config import Config  # noqa: PLC0415

                if self._session is None:
                    self._session = boto3.session.Session(aws_access_key_id=self.access_key_id,
                                                          aws_secret_access_key=self.secret_access_key,
                                                          aws_session_token=self.session_token,
                                                          region_name=self.global_region)
                session = self._session
                config = Config(connect_timeout=self.connect_timeout, read_timeout=self.read_timeout,
                                retries={"max_attempts": self.max_attempts, "mode": "standard"},
                                user_agent_extra="certpilot")
                self._clients[(service, region)] = session.client(service, region_name=region,
                                                                  endpoint_url=self.endpoint_url, config=config)
            return self._clients[(service, region)]

    def call(self, service: str, region: str, operation: str, *, arn: str | None = None, **kwargs: Any) -> Any:
        """``client.operation(**kwargs)`` with botocore's errors translated (see the module docstring)."""
        from botocore.exceptions import BotoCoreError, ClientError  # noqa: PLC0415
        from botocore.parsers import ResponseParserError  # noqa: PLC0415 (not a BotoCoreError)

        try:
            return getattr(self.client(service, region), operation)(**kwargs)
        except ClientError as exc:
            error = exc.response.get("Error", {})
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            code = str(error.get("Code", "")) or str(status)
            cause: type[_AwsCall] = AwsRefusedError
            if code in _TRANSIENT_CODES or status >= 500 or status == 429:
                cause = AwsUnavailableError
            elif code in _NOT_FOUND_CODES:
                cause = AwsNotFoundError
            raise cause(service, operation, code, _vendor_message(str(error.get("Message", ""))), region,
                        arn) from exc
        except ResponseParserError as exc:  # an HTML error page instead of the API's answer
            raise AwsUnavailableError(service, operation, type(exc).__name__, "the endpoint's answer is not the "
                                      f"API's: {_vendor_message(str(exc), 200)}", region, arn) from exc
        except BotoCoreError as exc:
            cause = AwsUnavailableError if _is_transient(exc) else AwsRefusedError
            raise cause(service, operation, type(exc).__name__, _vendor_message(str(exc)), region, arn) from exc

    def pages(self, service: str, region: str, operation: str, key: str, **kwargs: Any) -> Iterator[Any]:
        """Every item under ``key`` over all pages of a Marker/NextMarker or NextToken operation."""
        token_in, token_out = ("NextToken", "NextToken") if service == "acm" else ("Marker", "NextMarker")
        if service == "iam":
            token_out = "Marker"
        while True:
            page = self.call(service, region, operation, **kwargs)
            yield from page.get(key, [])
            token = page.get(token_out)
            if not token or (service == "iam" and not page.get("IsTruncated")):
                return
            kwargs[token_in] = token

    # What an ARN holds

    def stored_certificate(self, arn: str) -> StoredCertificate | None:
        """The certificate at an ACM or IAM ARN (None when it does not exist), chain kept where it links."""
        if is_acm_arn(arn):
            try:
                answer = self.call("acm", region_of(arn), "get_certificate", arn=arn, CertificateArn=arn)
            except AwsNotFoundError:
                return None
            body, chain = answer.get("Certificate", ""), answer.get("CertificateChain", "")
        elif is_iam_arn(arn):
            name = iam_name_of(arn)
            try:
                answer = self.call("iam", self.global_region, "get_server_certificate", arn=arn,
                                   ServerCertificateName=name)["ServerCertificate"]
            except AwsNotFoundError:
                return None
            body, chain = answer.get("CertificateBody", ""), answer.get("CertificateChain", "")
        else:
            raise PermanentDeployError(f"{arn}: neither an ACM certificate nor an IAM server certificate ARN")
        return self.parse_stored(arn, body, chain)

    @staticmethod
    def parse_stored(arn: str, body: str, chain: str | None) -> StoredCertificate:
        try:
            leaf = load_bundle(body.encode(), source=arn).certificates[0]
            given = load_bundle(chain.encode(), source=arn).certificates if chain and chain.strip() else ()
        except (ParseError, IndexError) as exc:
            raise PermanentDeployError(f"{arn}: the store returned no readable certificate: {exc}") from None
        return StoredCertificate(arn, leaf, tuple(linked_chain(leaf, given)))

    def fingerprint_at(self, arn: str) -> str | None:
        stored = self.stored_certificate(arn)
        return stored.fingerprint if stored else None

    def acm_tags(self, arn: str) -> dict[str, str]:
        tags = self.call("acm", region_of(arn), "list_tags_for_certificate", arn=arn, CertificateArn=arn)
        return {t["Key"]: t.get("Value", "") for t in tags.get("Tags", [])}

    # Listeners

    def listener(self, listener_arn: str) -> Listener:
        region = region_of(listener_arn)
        found = self.call("elbv2", region, "describe_listeners", arn=listener_arn, ListenerArns=[listener_arn])
        listeners = found.get("Listeners", [])
        if not listeners:
            raise AwsNotFoundError("elbv2", "describe_listeners", "ListenerNotFound", "no such listener", region,
                                   listener_arn)
        return self._listener(region, listeners[0], None)

    def listeners(self, region: str) -> Iterator[Listener]:
        """Every HTTPS and TLS listener of every load balancer in ``region``."""
        for lb in self.pages("elbv2", region, "describe_load_balancers", "LoadBalancers"):
            for item in self.pages("elbv2", region, "describe_listeners", "Listeners",
                                   LoadBalancerArn=lb["LoadBalancerArn"]):
                if item.get("Protocol") in TLS_PROTOCOLS:
                    yield self._listener(region, item, lb.get("LoadBalancerName"))

    def _listener(self, region: str, item: dict[str, Any], lb_name: str | None) -> Listener:
        arn = item["ListenerArn"]
        default: str | None = None
        sni: list[str] = []
        for cert in self.pages("elbv2", region, "describe_listener_certificates", "Certificates", ListenerArn=arn):
            if cert.get("IsDefault"):
                default = cert["CertificateArn"]
            elif cert["CertificateArn"] not in sni:
                sni.append(cert["CertificateArn"])
        if default is None and item.get("Certificates"):
            default = item["Certificates"][0]["CertificateArn"]
            sni = [a for a in sni if a != default]
        if lb_name is None:  # .../listener/app/NAME/LBID/LISTENERID
            parts = arn.split("/")
            lb_name = parts[-3] if len(parts) >= 4 else ""
        return Listener(arn, region, lb_name, int(item.get("Port") or 0), str(item.get("Protocol")), default,
                        tuple(sni))

    def listeners_using(self, certificate_arn: str) -> list[str]:
        """The listener ARNs that hold ``certificate_arn``, found by scanning the listeners ourselves (moto
        lets a certificate in use be deleted), plus the non-ELBv2 users that ACM's InUseBy names."""
        regions = [region_of(certificate_arn)] if is_acm_arn(certificate_arn) else list(self.regions)
        using = [lst.arn for region in regions for lst in self.listeners(region)
                 if certificate_arn in lst.certificate_arns]
        if is_acm_arn(certificate_arn):
            try:
                described = self.call("acm", regions[0], "describe_certificate", arn=certificate_arn,
                                      CertificateArn=certificate_arn)["Certificate"]
            except AwsNotFoundError:
                return using
            # ACM's InUseBy names what certpilot cannot scan (CloudFront, API Gateway, classic ELB); its
            # ELBv2 entries are left to the scan above, which is current (moto's InUseBy goes stale).
            using += [a for a in described.get("InUseBy", []) if a not in using and not _ELBV2_RESOURCE.search(a)]
        return using

    def delete_certificate(self, arn: str) -> bool:
        """Delete an ACM or IAM certificate, refusing (PermanentDeployError) while anything uses it.
        False when it was already gone."""
        using = self.listeners_using(arn)
        if using:
            raise PermanentDeployError(f"{arn} is still used by {', '.join(using)}: not deleted")
        try:
            if is_acm_arn(arn):
                self.call("acm", region_of(arn), "delete_certificate", arn=arn, CertificateArn=arn)
            elif is_iam_arn(arn):
                self.call("iam", self.global_region, "delete_server_certificate", arn=arn,
                          ServerCertificateName=iam_name_of(arn))
            else:
                raise PermanentDeployError(f"{arn}: neither an ACM certificate nor an IAM server certificate ARN")
        except AwsNotFoundError:
            return False
        return True


def _is_transient(exc: Exception) -> bool:
    from botocore.exceptions import ConnectionError as BotoConnectionError  # noqa: PLC0415
    from botocore.exceptions import HTTPClientError  # noqa: PLC0415

    return isinstance(exc, (BotoConnectionError, HTTPClientError))
