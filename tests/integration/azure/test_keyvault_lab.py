"""The lab vault itself behaves as Key Vault does where certpilot relies on it: the bearer challenge, Key
Vault's error documents for garbage and mismatched keys, secrets as Key Vault keeps them (PEM text or
base64 PFX, refused for a disabled version), and concurrent imports."""

from __future__ import annotations

import base64
import datetime as dt
import json
import socket
import ssl
from concurrent.futures import ThreadPoolExecutor

import pytest
from azure.core.exceptions import HttpResponseError
from azure.core.rest import HttpRequest
from azure.keyvault.certificates import CertificateClient, CertificateContentType, CertificatePolicy
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12

from certpilot.deployment import fingerprint
from certpilot.sample_estate import Authority, issue_leaf, key_pem, pem
from lab.keyvault import KeyVaultServer

PEM_POLICY = CertificatePolicy(content_type=CertificateContentType.pem)


def _raw_get(keyvault: KeyVaultServer, path: str) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request without a token, over TLS verified against the lab's CA."""
    context = ssl.create_default_context(cafile=str(keyvault.ca_file))
    with socket.create_connection(("127.0.0.1", keyvault.port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {keyvault.host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def test_a_request_without_a_token_gets_the_bearer_challenge(keyvault: KeyVaultServer) -> None:
    status, headers, body = _raw_get(keyvault, "/certificates?api-version=2026-04-01")
    assert status == 401
    assert headers["WWW-Authenticate"].startswith('Bearer authorization="https://login.microsoftonline.com/')
    assert 'resource="https://vault.azure.net"' in headers["WWW-Authenticate"]
    assert json.loads(body)["error"]["code"] == "Unauthorized"


def test_garbage_and_mismatched_keys_are_refused_as_key_vault_does(
        keyvault: KeyVaultServer, sdk: CertificateClient, ca: tuple[Authority, Authority]) -> None:
    with pytest.raises(HttpResponseError) as garbage:
        sdk.import_certificate("bad", b"\x30\x03\x02\x01\x03 definitely not a PFX")
    assert garbage.value.status_code == 400 and garbage.value.error.code == "BadParameter"  # type: ignore[union-attr]
    cert, _ = issue_leaf(ca[1], ["a.test"], dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=9))
    other = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(HttpResponseError) as mismatch:
        sdk.import_certificate("bad", pem(cert) + key_pem(other), policy=PEM_POLICY)
    assert mismatch.value.status_code == 400 and "not matching" in str(mismatch.value)
    with pytest.raises(HttpResponseError) as wrong_type:  # PEM content under the default PKCS#12 content type
        sdk.import_certificate("bad", pem(cert) + key_pem(other))
    assert wrong_type.value.status_code == 400
    assert keyvault.version_count("bad") == 0


def test_secrets_hold_pem_text_or_base64_pfx_and_a_disabled_version_is_refused(
        keyvault: KeyVaultServer, sdk: CertificateClient, ca: tuple[Authority, Authority]) -> None:
    cert, key = issue_leaf(ca[1], ["p.test"], dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=9))
    pfx = pkcs12.serialize_key_and_certificates(b"p", key, cert, [ca[1].certificate],  # type: ignore[arg-type]
                                                serialization.BestAvailableEncryption(b"pfx-password"))
    imported = sdk.import_certificate("pfx", pfx, password="pfx-password")
    assert fingerprint(cert) == fingerprint_of_cer(bytes(imported.cer or b""))
    secret = sdk.send_request(HttpRequest("GET", f"/secrets/pfx/{imported.properties.version}")).json()
    assert secret["contentType"] == "application/x-pkcs12" and base64.b64decode(secret["value"]) == pfx
    text = sdk.import_certificate("pem", pem(cert, ca[1].certificate) + key_pem(key), policy=PEM_POLICY)
    secret = sdk.send_request(HttpRequest("GET", f"/secrets/pem/{text.properties.version}")).json()
    assert secret["contentType"] == "application/x-pem-file" and "-----BEGIN PRIVATE KEY-----" in secret["value"]
    sdk.update_certificate_properties("pem", enabled=False)
    refused = sdk.send_request(HttpRequest("GET", f"/secrets/pem/{text.properties.version}"))
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "Forbidden"


def fingerprint_of_cer(der: bytes) -> str:
    return fingerprint(x509.load_der_x509_certificate(der))


def test_concurrent_imports_each_make_one_version(
        keyvault: KeyVaultServer, sdk: CertificateClient, ca: tuple[Authority, Authority]) -> None:
    leaves = [issue_leaf(ca[1], [f"c{i}.test"], dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=9))
              for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        versions = list(pool.map(lambda leaf: sdk.import_certificate(
            "busy", pem(leaf[0]) + key_pem(leaf[1]), policy=PEM_POLICY).properties.version, leaves))
    assert len(set(versions)) == 8 and keyvault.version_count("busy") == 8
    listed = [p.version for p in sdk.list_properties_of_certificate_versions("busy")]
    assert sorted(listed) == sorted(versions)  # four pages of two, nothing lost or repeated
