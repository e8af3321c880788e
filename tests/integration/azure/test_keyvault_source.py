"""AzureKeyVaultSource against the lab vault through the real SDK: every certificate and version, with
the right fingerprints and details, across pages, reading no secret."""

from __future__ import annotations

import datetime as dt
import math
import time

import pytest
from azure.keyvault.certificates import CertificateClient, CertificateContentType, CertificatePolicy
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from certpilot.deployment import fingerprint
from certpilot.discovery import Found, Source, split
from certpilot.sample_estate import Authority, issue_leaf, key_pem, pem
from connectors.azure_kv import AzureKeyVaultSource, KeyVaultConnection, KeyVaultUnavailable
from lab.keyvault import KeyVaultServer
from tests.integration.azure.conftest import PAGE_SIZE, lab_connection

PEM_POLICY = CertificatePolicy(content_type=CertificateContentType.pem)


def _import_pem(sdk: CertificateClient, ca: tuple[Authority, Authority], name: str, **options: object) -> str:
    cert, key = issue_leaf(ca[1], [f"{name}.example.test"], dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=40))
    body = pem(cert, ca[1].certificate) + key_pem(key)
    sdk.import_certificate(name, body, policy=PEM_POLICY, **options)  # type: ignore[arg-type]
    return fingerprint(cert)


def test_source_lists_every_certificate_and_version_across_pages(
        keyvault: KeyVaultServer, connection: KeyVaultConnection, sdk: CertificateClient,
        ca: tuple[Authority, Authority]) -> None:
    # "api": three PEM versions, the oldest disabled; "db": one PFX version with tags; "edge", "mail": one each.
    api = [_import_pem(sdk, ca, "api") for _ in range(3)]
    versions = [p.version for p in sdk.list_properties_of_certificate_versions("api")]
    sdk.update_certificate_properties("api", versions[0], enabled=False)
    cert, key = issue_leaf(ca[1], ["db.example.test"], dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=10))
    pfx = pkcs12.serialize_key_and_certificates(b"db", key, cert, [ca[1].certificate],  # type: ignore[arg-type]
                                                serialization.NoEncryption())
    sdk.import_certificate("db", pfx, tags={"owner": "dba"})
    edge, mail = _import_pem(sdk, ca, "edge"), _import_pem(sdk, ca, "mail")
    keyvault.requests.clear()

    source = AzureKeyVaultSource(connection)
    assert isinstance(source, Source)
    assert source.name == f"azure-kv:{keyvault.host}"
    found, problems = split(source.discover())

    assert problems == []
    seen = {f.locator: f for f in found}
    expected = {f"azure-kv://{keyvault.host}/api/{v}": fp for v, fp in zip(versions, api, strict=True)}
    db_version = next(iter(sdk.list_properties_of_certificate_versions("db"))).version
    expected[f"azure-kv://{keyvault.host}/db/{db_version}"] = fingerprint(cert)
    for name, fp in (("edge", edge), ("mail", mail)):
        version = next(iter(sdk.list_properties_of_certificate_versions(name))).version
        expected[f"azure-kv://{keyvault.host}/{name}/{version}"] = fp
    assert {loc: fingerprint_of(f) for loc, f in seen.items()} == expected
    assert all(len(f.certificates) == 1 and f.key is None for f in found)  # the leaf only, never a key
    api_details = [seen[f"azure-kv://{keyvault.host}/api/{v}"].details for v in versions]
    assert [d["current"] for d in api_details] == [False, False, True]
    assert [d["enabled"] for d in api_details] == [False, True, True]
    assert {d["content_type"] for d in api_details} == {"application/x-pem-file"}
    db = seen[f"azure-kv://{keyvault.host}/db/{db_version}"].details
    assert db["content_type"] == "application/x-pkcs12" and db["tags"] == {"owner": "dba"} and db["current"]
    # Four certificates and three versions of "api" at two per page: the listings followed nextLink.
    listing_pages = [path for method, path in keyvault.requests if method == "GET" and path == "/certificates"]
    api_pages = [path for method, path in keyvault.requests if path == "/certificates/api/versions"]
    assert len(listing_pages) == math.ceil(4 / PAGE_SIZE) > 1, keyvault.requests
    assert len(api_pages) == math.ceil(3 / PAGE_SIZE) > 1, keyvault.requests
    assert not [path for _, path in keyvault.requests if path.startswith("/secrets")]  # no private key read


def fingerprint_of(found: Found) -> str:
    return fingerprint(x509.load_der_x509_certificate(found.certificates[0]))


def test_source_of_an_empty_vault_finds_nothing(connection: KeyVaultConnection) -> None:
    assert list(AzureKeyVaultSource(connection).discover()) == []


def test_source_of_a_slow_vault_raises_a_transient_error_in_bounded_time(keyvault: KeyVaultServer) -> None:
    connection = lab_connection(keyvault, connection_timeout=0.3, read_timeout=0.3, retry_total=1)
    keyvault.hostile(delay=5.0)
    started = time.monotonic()
    with pytest.raises(KeyVaultUnavailable) as caught:
        list(AzureKeyVaultSource(connection).discover())
    elapsed = time.monotonic() - started
    assert 0.3 <= elapsed <= connection.worst_case_seconds + 0.5, elapsed
    assert f"azure-kv {keyvault.host}: listing certificates failed" in str(caught.value)


def test_a_certificate_that_cannot_be_read_is_a_problem_the_others_are_found(
        keyvault: KeyVaultServer, connection: KeyVaultConnection, sdk: CertificateClient,
        ca: tuple[Authority, Authority]) -> None:
    _import_pem(sdk, ca, "one")
    two = _import_pem(sdk, ca, "two")
    keyvault.fail_next(403, path="/certificates/one/versions")
    found, problems = split(AzureKeyVaultSource(connection).discover())
    assert [fingerprint_of(f) for f in found] == [two]
    assert [p.locator for p in problems] == [f"azure-kv://{keyvault.host}/one"]
    assert f"azure-kv {keyvault.host}/one: listing versions failed: HTTP 403 Forbidden" in problems[0].reason
