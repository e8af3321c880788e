"""Azure Key Vault certificates: a Source (every certificate and version, public data only) and a
Deployer (kind ``azure-kv``), over the real azure-keyvault-certificates SDK.

Connection (KeyVaultConnection): the vault URL, a credential (azure-identity's ClientSecretCredential for
real Azure; StaticTokenCredential below for loopback test vaults and pre-issued tokens), an optional CA
file for a vault behind a private CA, and bounded network behaviour: every request has a connection and
a read timeout, connection and read failures are retried ``retry_total`` times with a capped backoff, and
HTTP 429 and 5xx are not retried inside the SDK (it would honour any Retry-After, unbounded): they raise
a transient KeyVaultUnavailableError at once, and the Prefect task's own retries
take it from there. ``KeyVaultConnection.worst_case_seconds`` is the longest one call can take.

Errors: azure.core exceptions are translated here, in one place, into errors named by cause that carry
their data as fields (operation, code, HTTP status, retry_after) and whose messages name the vault and
the certificate and never hold a secret. Connection failures, timeouts, dropped connections, 408, 429
and 5xx are KeyVaultUnavailableError (transient); any other 4xx, a TLS certificate the client does not
trust and a bad configuration are KeyVaultRefusedError (permanent). Both are the core's service errors
(ServiceUnavailableError, ServiceRefusedError) and, for the deployer's callers, DeployError and
PermanentDeployError. A 404 where it means
"absent" is not an error: current() is None, deploy() records that there was no previous version. The
SDK exceptions are not chained to the ones raised from calls that carried key material: their request
object holds the body.

Source (``azure-kv:<vault host>``): every certificate and every version, as Found items with the
version's certificate (``cer``, DER; Key Vault keeps the chain only in the secret, which a source never
reads: private keys are never read by the source), locator ``azure-kv://<vault host>/<name>/<version>``
and details version, enabled, current (is the latest version), content_type, tags. A certificate whose
versions cannot be read becomes a Problem; a vault that cannot be listed raises.

Deployer, kind ``azure-kv``, settings certpilot.target_kinds.KeyVaultSettings: ``certificate_name``,
the Key Vault certificate each deploy imports a new version into (PEM: leaf, chain, PKCS#8 key, with the
policy's content type application/x-pem-file; the key was checked against the certificate when the
DeployBundle was built, so a mismatched key never reaches the vault); ``tags`` set on every version;
``purge_deleted``: after a rollback deletes a certificate that certpilot created (there was no previous
version), purge it too, so the name can be used again at once; it needs the certificates/purge
permission and a vault without purge protection. Without it the name stays soft-deleted for the
vault's retention (7 to 90 days) and a new import under that name is refused (409 Conflict).
verify() reads the latest version back through the API (method "api"): its ``cer`` must have the expected
fingerprint and it must be enabled. rollback() re-imports the previous version's secret (its key and
chain, read with GET /secrets/{name}/{version} and kept only inside that function) as a new version, so
the previous certificate is current again; if there was none, it deletes the certificate. remove()
deletes the certificate: Key Vault soft-deletes it (recoverable for the retention period; purge it, or
let the vault's retention run out, before reusing the name); restore() recovers it from the deleted
certificates, purge() purges it (a confirmed retirement).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast, runtime_checkable
from urllib.parse import quote, urlsplit

from azure.core.credentials import AccessToken, AccessTokenInfo, TokenRequestOptions
from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.core.rest import HttpRequest
from azure.keyvault.certificates import (
    CertificateClient,
    CertificateContentType,
    CertificatePolicy,
    CertificateProperties,
    KeyVaultCertificate,
    WellKnownIssuerNames,
)
from cryptography import x509

from certpilot.deployment import (
    BundleLookup,
    DeployBundle,
    DeployError,
    PermanentDeployError,
    Receipt,
    Removal,
    Verification,
    VerificationError,
)
from certpilot.discovery import Found, Problem
from certpilot.errors import CertpilotError, ServiceError, ServiceRefusedError, ServiceUnavailableError
from certpilot.target_kinds import KeyVaultSettings, TargetKind, validate_settings

log = logging.getLogger(__name__)

_T = TypeVar("_T")


class _KeyVaultCall(ServiceError):
    """A Key Vault request that failed, with its data as fields: ``operation`` (what was asked, e.g.
    "importing a new version"), ``code`` (the vault's error code, ``HTTP <status>`` without one,
    ``authentication``, or the client's error type), ``status`` (the HTTP status, None when no answer
    came), ``retry_after`` (seconds the vault asked to wait, None when it did not say), ``detail`` (the
    vault's message) and ``where`` (the vault and certificate). The message is built from them."""

    def __init__(self, where: str, operation: str, code: str, detail: str = "", *, status: int | None = None,
                 retry_after: float | None = None, message: str | None = None) -> None:
        self.status, self.retry_after = status, retry_after
        super().__init__("keyvault", operation, code, detail, where, message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_call, (type(self), self.where, self.operation, self.code, self.detail, self.status,
                                self.retry_after, str(self)))


def _rebuild_call(cls: type[_KeyVaultCall], where: str | None, operation: str, code: str, detail: str,
                  status: int | None, retry_after: float | None, message: str) -> _KeyVaultCall:
    return cls(where or "", operation, code, detail, status=status, retry_after=retry_after, message=message)


class KeyVaultRefusedError(_KeyVaultCall, ServiceRefusedError, PermanentDeployError):
    """The vault refused for a reason retrying will not fix: authentication, permission, not found, an
    untrusted TLS certificate, a bad request or URL."""


class KeyVaultUnavailableError(_KeyVaultCall, ServiceUnavailableError, DeployError):
    """The vault could not answer now: a timeout, a dropped connection, throttled (429, ``retry_after``
    set when it said how long), 408 or 5xx."""


KeyVaultUnavailable = KeyVaultUnavailableError  # the names the source raised before, kept for importers
KeyVaultRefused = KeyVaultRefusedError


class StaticTokenCredential:
    """A credential that hands out one bearer token it was given: for loopback test vaults (lab/keyvault.py)
    and for tokens issued elsewhere (e.g. by a pipeline's workload identity). It implements both
    get_token and get_token_info, which the Key Vault SDK prefers. The token never appears in repr."""

    def __init__(self, token: str, expires_in: float = 3600.0) -> None:
        if not token:
            raise ValueError("StaticTokenCredential needs a non-empty token")
        self._token = token
        self._expires_on = int(time.time() + expires_in)

    def get_token(self, *scopes: str, claims: str | None = None, tenant_id: str | None = None,
                  enable_cae: bool = False, **kwargs: Any) -> AccessToken:
        return AccessToken(self._token, self._expires_on)

    def get_token_info(self, *scopes: str, options: TokenRequestOptions | None = None) -> AccessTokenInfo:
        return AccessTokenInfo(self._token, self._expires_on)

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return "StaticTokenCredential(token=***)"


def trust_file(ca_pem: str) -> str:
    """A file holding ``ca_pem`` (public CA certificates), for the client's TLS verification, named by its hash."""
    data = ca_pem.strip().encode() + b"\n"
    x509.load_pem_x509_certificates(data)  # refuse garbage here, not as an obscure TLS failure later
    path = Path(tempfile.gettempdir()) / f"certpilot-ca-{hashlib.sha256(data).hexdigest()[:24]}.pem"
    if not path.exists() or path.read_bytes() != data:
        tmp = path.with_suffix(f".{time.monotonic_ns()}.tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
    return str(path)


@dataclass(frozen=True)
class KeyVaultConnection:
    """How to reach one vault: its URL, a credential, TLS trust and the bounds of every call."""

    vault_url: str
    credential: Any = field(repr=False)  # azure.core TokenCredential / SupportsTokenInfo
    ca_file: str | None = None
    verify_challenge_resource: bool = True
    connection_timeout: float = 10.0
    read_timeout: float = 30.0
    retry_total: int = 2
    retry_backoff_factor: float = 0.5
    retry_backoff_max: float = 4.0

    def __post_init__(self) -> None:
        parts = urlsplit(self.vault_url)
        if parts.scheme != "https" or not parts.netloc:
            raise PermanentDeployError(f"azure-kv: vault_url must be https://<vault host>, got {self.vault_url!r}")

    @property
    def host(self) -> str:
        return urlsplit(self.vault_url).netloc

    @property
    def worst_case_seconds(self) -> float:
        """The longest one SDK call can take: every attempt timing out, with the capped backoffs between."""
        attempts = self.retry_total + 1
        return attempts * (self.connection_timeout + self.read_timeout) + self.retry_total * self.retry_backoff_max

    def client(self) -> CertificateClient:
        options: dict[str, Any] = {
            "verify_challenge_resource": self.verify_challenge_resource,
            "connection_timeout": self.connection_timeout, "read_timeout": self.read_timeout,
            "retry_total": self.retry_total, "retry_connect": self.retry_total, "retry_read": self.retry_total,
            "retry_status": 0, "retry_backoff_factor": self.retry_backoff_factor,
            "retry_backoff_max": self.retry_backoff_max,
        }
        if self.ca_file:
            options["connection_verify"] = self.ca_file
        return CertificateClient(self.vault_url, self.credential, **options)


def _short(text: object, limit: int = 300) -> str:
    first = str(text or "").strip().splitlines()
    return first[0][:limit] if first else ""


def _translate(exc: Exception, where: str, action: str) -> _KeyVaultCall:
    """The one cause-named error for an SDK failure, naming the place and the action, with no secret in it."""
    if isinstance(exc, HttpResponseError) and exc.status_code is not None:
        status = exc.status_code
        code = exc.error.code if exc.error is not None else None
        message = exc.error.message if exc.error is not None else exc.reason
        detail = _short(message) if message else ""
        text = f"{where}: {action} failed: HTTP {status}" + (f" {code}" if code else "")
        text += f": {detail}" if detail else ""
        if status == 409 and "deleted" in str(message).lower():
            text += " (purge or recover the deleted certificate, or set purge_deleted)"
        header = exc.response.headers.get("Retry-After") if isinstance(exc.response, _WithHeaders) else None
        retry_after = _seconds(header)
        if status in (408, 429) or status >= 500:
            text += f" (retry after {header} s)" if header else ""
            return KeyVaultUnavailableError(where, action, code or f"HTTP {status}", detail, status=status,
                                            retry_after=retry_after, message=text)
        return KeyVaultRefusedError(where, action, code or f"HTTP {status}", detail, status=status, message=text)
    if isinstance(exc, ClientAuthenticationError):  # the credential itself failed, no HTTP status
        detail = _short(exc.message)
        return KeyVaultRefusedError(where, action, "authentication", detail,
                                    message=f"{where}: {action} failed: authentication: {detail}")
    if isinstance(exc, (ServiceRequestError, ServiceResponseError)):
        detail = _short(getattr(exc, "message", exc))
        if "CERTIFICATE_VERIFY_FAILED" in str(exc):
            return KeyVaultRefusedError(where, action, "untrusted-tls-certificate", detail,
                                        message=f"{where}: {action} failed: the vault's TLS certificate is not "
                                                f"trusted (set ca_file or ca_pem for a private CA): {detail}")
        return KeyVaultUnavailableError(where, action, type(exc).__name__, detail,
                                        message=f"{where}: {action} failed: {type(exc).__name__}: {detail}")
    if isinstance(exc, AzureError):
        detail = _short(getattr(exc, "message", exc))
        return KeyVaultUnavailableError(where, action, type(exc).__name__, detail,
                                        message=f"{where}: {action} failed: {type(exc).__name__}: {detail}")
    # ValueError from the SDK: a challenge whose resource does not match the vault, a malformed URL...
    detail = _short(exc)
    return KeyVaultRefusedError(where, action, type(exc).__name__, detail,
                                message=f"{where}: {action} failed: {type(exc).__name__}: {detail}")


def _seconds(header: str | None) -> float | None:
    """A Retry-After header's delay in seconds (the delta-seconds form; None for a date or nothing)."""
    try:
        return float(header) if header is not None else None
    except ValueError:
        return None


@runtime_checkable
class _WithHeaders(Protocol):
    """An HTTP response with its headers: every response azure.core builds, though HttpResponseError types
    its ``response`` as a protocol without them."""

    @property
    def headers(self) -> Mapping[str, str]: ...


def _fingerprint(der: bytes | bytearray | None) -> str | None:
    return hashlib.sha256(bytes(der)).hexdigest() if der else None


@dataclass(frozen=True)
class _Latest:
    version: str
    fingerprint: str | None
    enabled: bool
    content_type: str | None


class _Calls:
    """Runs SDK calls against one vault and translates their failures."""

    def __init__(self, connection: KeyVaultConnection) -> None:
        self.connection = connection
        self._client: CertificateClient | None = None

    @property
    def client(self) -> CertificateClient:
        if self._client is None:
            self._client = self.connection.client()
        return self._client

    def close(self) -> None:
        """Close the SDK client's HTTP session, if one was opened."""
        if self._client is not None:
            self._client.close()
            self._client = None

    def run(self, where: str, action: str, call: Callable[[], _T], *, absent_ok: bool = False,
            chain: bool = True) -> _T | None:
        """``call()``; None for a 404 when ``absent_ok``; otherwise a translated error (chained to the SDK's
        unless ``chain`` is False: set it for calls whose request carried key material)."""
        cause: Exception
        try:
            return call()
        except ResourceNotFoundError as exc:
            if absent_ok:
                return None
            cause = exc
        except (AzureError, ValueError) as exc:
            cause = exc
        error = _translate(cause, where, action)
        if chain:
            raise error from cause
        del cause
        raise error  # raised outside the handler: neither __cause__ nor __context__ refers to the SDK's error

    def must(self, where: str, action: str, call: Callable[[], _T], *, chain: bool = True) -> _T:
        result = self.run(where, action, call, chain=chain)
        if result is None:
            raise KeyVaultRefusedError(where, action, "empty-answer", message=f"{where}: {action} returned nothing")
        return result

    def properties(self, where: str, certificate: KeyVaultCertificate) -> CertificateProperties:
        """The properties (version, enabled...) of a certificate the vault returned: it always sends them,
        though the SDK types them as optional."""
        if certificate.properties is None:
            raise KeyVaultRefusedError(where, "reading the certificate", "no-properties",
                                       message=f"{where}: the vault returned a certificate without its properties")
        return certificate.properties


def _content_type(certificate: KeyVaultCertificate) -> str | None:
    policy = certificate.policy
    value = policy.content_type if policy is not None else None
    return str(value.value if hasattr(value, "value") else value) if value else None


class AzureKeyVaultSource:
    """Every certificate of one vault and all its versions; public data only (see the module docstring)."""

    def __init__(self, connection: KeyVaultConnection, *, page_size: int | None = None) -> None:
        self.connection = connection
        self.page_size = page_size
        self.name = f"azure-kv:{connection.host}"
        self._calls = _Calls(connection)

    def close(self) -> None:
        self._calls.close()

    def _locator(self, name: str, version: str | None = None) -> str:
        return f"azure-kv://{self.connection.host}/{name}" + (f"/{version}" if version else "")

    def discover(self) -> Iterator[Found | Problem]:
        client = self._calls.client
        where = f"azure-kv {self.connection.host}"
        names: list[str] = self._calls.must(where, "listing certificates", lambda: [
            p.name for p in client.list_properties_of_certificates(max_page_size=self.page_size) if p.name])
        for name in names:
            try:
                yield from self._certificate(name)
            except _KeyVaultCall as exc:
                yield Problem(self._locator(name), str(exc))

    def _certificate(self, name: str) -> Iterator[Found]:
        client, where = self._calls.client, f"azure-kv {self.connection.host}/{name}"
        latest = self._calls.run(where, "reading the certificate", lambda: client.get_certificate(name), absent_ok=True)
        if latest is None:  # deleted between the listing and now
            return
        versions = self._calls.must(where, "listing versions", lambda: [
            p for p in client.list_properties_of_certificate_versions(name, max_page_size=self.page_size)])
        latest_version = self._calls.properties(where, latest).version
        for props in versions:
            version = props.version
            if not version:
                continue
            if version == latest_version:
                certificate: KeyVaultCertificate | None = latest
            else:
                certificate = self._calls.run(f"{where}/{version}", "reading the version",
                                              lambda: client.get_certificate_version(name, version), absent_ok=True)
            if certificate is None or not certificate.cer:
                continue
            yield Found((bytes(certificate.cer),), self._locator(name, version), {
                "vault": self.connection.host, "name": name, "version": version,
                "enabled": bool(props.enabled), "current": version == latest_version,
                "content_type": _content_type(certificate), "tags": dict(props.tags or {})})


class AzureKeyVaultDeployer:
    """One Key Vault certificate as a deploy target (kind ``azure-kv``; settings in the module docstring)."""

    kind = TargetKind.AZURE_KV

    def __init__(self, name: str, connection: KeyVaultConnection, settings: KeyVaultSettings | Mapping[str, Any],
                 lookup: BundleLookup | None = None) -> None:
        self.name = name
        self.connection = connection
        self.settings = cast(KeyVaultSettings, validate_settings(self.kind, settings, name))
        self.certificate_name = self.settings.certificate_name
        self.tags: dict[str, str] = dict(self.settings.tags)
        self.purge_deleted = self.settings.purge_deleted
        self.lookup = lookup  # not needed: the previous version's key is in the vault itself
        self._calls = _Calls(connection)

    def close(self) -> None:
        self._calls.close()

    @property
    def where(self) -> str:
        return f"{self.name}: azure-kv {self.connection.host}/{self.certificate_name}"

    @property
    def locator(self) -> str:
        return f"azure-kv://{self.connection.host}/{self.certificate_name}"

    def _latest(self) -> _Latest | None:
        client = self._calls.client
        found = self._calls.run(self.where, "reading the current version",
                                lambda: client.get_certificate(self.certificate_name), absent_ok=True)
        if found is None:
            return None
        properties = self._calls.properties(self.where, found)
        return _Latest(properties.version or "", _fingerprint(found.cer), bool(properties.enabled),
                       _content_type(found))

    def current(self) -> str | None:
        latest = self._latest()
        return latest.fingerprint if latest else None

    def deploy(self, bundle: DeployBundle) -> Receipt:
        previous = self._latest()
        policy = None
        if previous is None or previous.content_type != CertificateContentType.pem.value:
            policy = CertificatePolicy(issuer_name=WellKnownIssuerNames.unknown,
                                       content_type=CertificateContentType.pem)
        key_pem = bundle.key_pem()
        try:
            imported = self._import(bundle.fullchain_pem() + key_pem, policy)
        except CertpilotError as exc:
            traceback.clear_frames(exc.__traceback__)  # the finished frames that held the PEM body
            raise
        finally:
            del key_pem
        served = _fingerprint(imported.cer)
        if served != bundle.fingerprint:
            raise PermanentDeployError(f"{self.where}: the vault holds {str(served)[:16]} after importing "
                                       f"{bundle.fingerprint[:16]}")
        imported_version = self._calls.properties(self.where, imported).version
        log.info("%s: imported %s as version %s (previous %s)", self.where, bundle.fingerprint[:16],
                 imported_version, previous.version if previous else "none")
        return Receipt(self.name, self.kind, bundle.fingerprint, previous.fingerprint if previous else None,
                       {"vault": self.connection.host, "certificate_name": self.certificate_name,
                        "version": imported_version,
                        "previous_version": previous.version if previous else None})

    def _import(self, body: bytes, policy: CertificatePolicy | None) -> KeyVaultCertificate:
        client = self._calls.client
        return self._calls.must(self.where, "importing a new version", lambda: client.import_certificate(
            self.certificate_name, body, policy=policy, tags=self.tags or None), chain=False)

    def verify(self, fingerprint: str) -> Verification:
        client = self._calls.client
        found = self._calls.run(self.where, "reading back the current version",
                                lambda: client.get_certificate(self.certificate_name), absent_ok=True)
        if found is None:
            raise VerificationError(self.name, fingerprint, None, f"{self.locator} does not exist")
        served = _fingerprint(found.cer)
        properties = self._calls.properties(self.where, found)
        version = properties.version
        if served != fingerprint:
            raise VerificationError(self.name, fingerprint, served,
                                    f"the current version {version} of {self.locator} holds another certificate")
        if not properties.enabled:
            raise VerificationError(self.name, fingerprint, served, f"the current version {version} of "
                                                                    f"{self.locator} is disabled")
        return Verification(self.name, fingerprint, "api",
                            f"current version {version} of {self.locator} is enabled and holds it (API read-back)")

    def rollback(self, receipt: Receipt) -> None:
        previous_version = receipt.undo.get("previous_version")
        if previous_version is None:
            self._delete("rolling back (deleting the certificate created)", purge=self.purge_deleted)
            return
        latest = self._latest()
        if latest is not None and receipt.previous_fingerprint and latest.fingerprint == receipt.previous_fingerprint:
            return  # already back (a rollback that ran before, or someone else's)
        self._reimport(str(previous_version))
        now = self.current()
        if receipt.previous_fingerprint and now != receipt.previous_fingerprint:
            raise PermanentDeployError(f"{self.where}: after rolling back to version {previous_version} the vault "
                                       f"holds {str(now)[:16]}, not {receipt.previous_fingerprint[:16]}")
        log.info("%s: rolled back to the certificate of version %s", self.where, previous_version)

    def _reimport(self, version: str) -> None:
        """Import the secret of ``version`` (its certificate, chain and key) as a new version. The secret's
        value lives only in this function."""
        client = self._calls.client
        path = f"/secrets/{quote(self.certificate_name)}/{quote(version)}"
        where = f"{self.where}/{version}"

        def read() -> tuple[bytes, str]:
            response = client.send_request(HttpRequest("GET", path, headers={"Accept": "application/json"}))
            response.raise_for_status()
            payload = response.json()
            value, content_type = payload.get("value"), payload.get("contentType")
            if not isinstance(value, str) or not value:
                raise ValueError("the secret has no value")
            if content_type == CertificateContentType.pkcs12.value:
                return base64.b64decode(value), content_type
            if content_type == CertificateContentType.pem.value:
                return value.encode("ascii"), content_type
            raise ValueError(f"the secret's content type {content_type!r} is neither PEM nor PKCS#12")

        try:
            secret, content_type = self._calls.must(where, "reading the previous version's secret", read, chain=False)
            try:
                self._import(secret, CertificatePolicy(issuer_name=WellKnownIssuerNames.unknown,
                                                       content_type=CertificateContentType(content_type)))
            finally:
                del secret
        except CertpilotError as exc:
            traceback.clear_frames(exc.__traceback__)  # the finished frames that held the secret
            raise

    def remove(self) -> Removal:
        """Delete the certificate (all its versions). Key Vault soft-deletes it: recoverable, and its name not
        reusable, until purged or until the vault's retention period ends. An absent certificate is fine."""
        held = self.current()
        self._delete("removing the certificate", purge=False)
        return Removal(self.name, self.kind, held, {"vault": self.connection.host,
                                                    "certificate_name": self.certificate_name}, None,
                       "soft-deleted in Key Vault: recoverable until purged" if held else
                       f"{self.locator} did not exist: nothing deleted")

    def restore(self, removal: Removal) -> str:
        """Recover the soft-deleted certificate."""
        if removal.fingerprint is None:
            return "nothing was removed"
        if self.current() == removal.fingerprint:
            return f"{self.locator} holds it already"
        client = self._calls.client
        poller = self._calls.run(self.where, "recovering the deleted certificate",
                                 lambda: client.begin_recover_deleted_certificate(self.certificate_name,
                                                                                  _polling_interval=0.5),
                                 absent_ok=True)
        if poller is None:
            raise PermanentDeployError(f"{self.where}: there is no deleted certificate to recover (purged?)")
        self._calls.run(self.where, "waiting for the recovery",
                        lambda: poller.wait(timeout=self.connection.worst_case_seconds))
        now = self.current()
        if now != removal.fingerprint:
            raise PermanentDeployError(f"{self.where}: after the recovery the vault holds {str(now)[:16]}, not "
                                       f"{removal.fingerprint[:16]}")
        log.info("%s: recovered", self.where)
        return f"recovered {self.locator} from the vault's deleted certificates"

    def purge(self, removal: Removal) -> None:
        """Purge the soft-deleted certificate (needs the purge permission); one already gone is fine."""
        if removal.fingerprint is None:
            return
        client = self._calls.client
        self._calls.run(self.where, "purging the deleted certificate",
                        lambda: client.purge_deleted_certificate(self.certificate_name), absent_ok=True)
        log.info("%s: purged", self.where)

    def _delete(self, action: str, *, purge: bool) -> None:
        client = self._calls.client
        deleted = self._calls.run(self.where, action, lambda: client.begin_delete_certificate(
            self.certificate_name, _polling_interval=0.5), absent_ok=True)
        if deleted is None:
            return
        if purge:
            # The SDK's poller reads the deleted certificate back in a thread until Key Vault shows it.
            self._calls.run(self.where, "waiting for the deletion", lambda: deleted.wait(
                timeout=self.connection.worst_case_seconds))
            if not deleted.done():
                raise DeployError(f"{self.where}: the deleted certificate did not appear within "
                                  f"{self.connection.worst_case_seconds:.0f} s: not purged")
            self._calls.run(self.where, "purging the deleted certificate",
                            lambda: client.purge_deleted_certificate(self.certificate_name), absent_ok=True)
        log.info("%s: deleted%s", self.where, " and purged" if purge else " (soft-deleted)")
