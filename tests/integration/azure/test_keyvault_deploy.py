"""AzureKeyVaultDeployer against the lab vault through the real SDK: deploy a new version, verify it by
API read-back, roll back so the previous certificate is current again, delete what a first deploy
created, refuse a mismatched key before the vault changes."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import pytest
from azure.core.exceptions import ResourceNotFoundError
from azure.core.rest import HttpRequest
from azure.keyvault.certificates import CertificateClient
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12

from certpilot.deployment import (
    DeployBundle,
    Deployer,
    PermanentDeployError,
    Receipt,
    VerificationError,
    fingerprint,
)
from certpilot.errors import KeyMismatchError
from certpilot.sample_estate import Authority, issue_leaf
from certpilot.target_kinds import TargetSettingsError
from connectors.azure_kv import AzureKeyVaultDeployer
from lab.keyvault import KeyVaultServer

Issue = Callable[..., tuple[DeployBundle, object]]
MakeDeployer = Callable[..., AzureKeyVaultDeployer]


def _current_fingerprint(sdk: CertificateClient, name: str) -> str:
    return fingerprint(x509.load_der_x509_certificate(bytes(sdk.get_certificate(name).cer or b"")))


def _secret_certificates(sdk: CertificateClient, name: str) -> list[str]:
    """Fingerprints of the certificates in the current version's secret (leaf, then chain)."""
    version = sdk.get_certificate(name).properties.version
    response = sdk.send_request(HttpRequest("GET", f"/secrets/{name}/{version}"))
    response.raise_for_status()
    value = response.json()["value"].encode()
    return [fingerprint(c) for c in x509.load_pem_x509_certificates(value)]


def test_deploy_verify_rollback_makes_the_previous_certificate_current_again(
        keyvault: KeyVaultServer, sdk: CertificateClient, deployer: MakeDeployer, issue: Issue,
        ca: tuple[Authority, Authority]) -> None:
    target = deployer("web")
    assert isinstance(target, Deployer)
    old, _ = issue()
    first = target.deploy(old)
    assert first.previous_fingerprint is None and first.undo["previous_version"] is None
    assert target.verify(old.fingerprint).method == "api"

    new, _ = issue()
    receipt = target.deploy(new)
    assert receipt.fingerprint == new.fingerprint and receipt.previous_fingerprint == old.fingerprint
    assert receipt.undo["previous_version"] == first.undo["version"]
    assert _current_fingerprint(sdk, "web") == new.fingerprint  # read back through the SDK
    assert _secret_certificates(sdk, "web") == [new.fingerprint, fingerprint(ca[1].certificate)]
    verification = target.verify(new.fingerprint)
    assert verification.fingerprint == new.fingerprint and receipt.undo["version"] in verification.detail
    with pytest.raises(VerificationError) as caught:
        target.verify(old.fingerprint)
    assert caught.value.served == new.fingerprint

    target.rollback(Receipt.from_dict(receipt.as_dict()))  # as a task would get it back: JSON only

    assert _current_fingerprint(sdk, "web") == old.fingerprint
    assert _secret_certificates(sdk, "web") == [old.fingerprint, fingerprint(ca[1].certificate)]  # chain came back
    assert target.current() == old.fingerprint
    assert target.verify(old.fingerprint).method == "api"
    assert keyvault.version_count("web") == 3  # rollback adds a version, as Key Vault keeps history
    target.rollback(receipt)  # a second rollback finds the previous certificate current and changes nothing
    assert keyvault.version_count("web") == 3


def test_rollback_restores_a_previous_version_imported_as_pfx(
        keyvault: KeyVaultServer, sdk: CertificateClient, deployer: MakeDeployer, issue: Issue,
        ca: tuple[Authority, Authority]) -> None:
    cert, key = issue_leaf(ca[1], ["pfx.example.test"], dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=5))
    pfx = pkcs12.serialize_key_and_certificates(b"web", key, cert, [ca[1].certificate],  # type: ignore[arg-type]
                                                serialization.NoEncryption())
    sdk.import_certificate("web", pfx)  # someone else's PKCS#12 version
    target = deployer("web")
    new, _ = issue()
    receipt = target.deploy(new)
    assert receipt.previous_fingerprint == fingerprint(cert)
    assert sdk.get_certificate("web").policy.content_type == "application/x-pem-file"
    target.rollback(receipt)
    restored = sdk.get_certificate("web")
    assert _current_fingerprint(sdk, "web") == fingerprint(cert)
    assert restored.policy.content_type == "application/x-pkcs12"


def test_first_deploy_then_rollback_deletes_the_certificate(
        keyvault: KeyVaultServer, sdk: CertificateClient, deployer: MakeDeployer, issue: Issue) -> None:
    target = deployer("fresh")
    assert target.current() is None
    bundle, _ = issue()
    receipt = target.deploy(bundle)
    assert _current_fingerprint(sdk, "fresh") == bundle.fingerprint
    target.rollback(receipt)
    with pytest.raises(ResourceNotFoundError):
        sdk.get_certificate("fresh")
    assert target.current() is None and keyvault.is_deleted("fresh")  # soft-deleted, as Key Vault does
    target.rollback(receipt)  # nothing left to delete: no error
    # The soft-deleted name cannot take a new import: the error says why and what to do.
    with pytest.raises(PermanentDeployError) as caught:
        target.deploy(issue()[0])
    message = str(caught.value)
    assert "HTTP 409 Conflict" in message and "deleted but recoverable" in message and "purge" in message
    assert f"azure-kv {keyvault.host}/fresh" in message


def test_rollback_with_purge_deleted_frees_the_name(
        keyvault: KeyVaultServer, sdk: CertificateClient, deployer: MakeDeployer, issue: Issue) -> None:
    target = deployer("fresh", purge_deleted=True)
    target.rollback(target.deploy(issue()[0]))
    assert not keyvault.is_deleted("fresh") and keyvault.latest("fresh") is None  # purged
    again, _ = issue()
    target.deploy(again)
    assert _current_fingerprint(sdk, "fresh") == again.fingerprint


def test_mismatched_key_is_refused_before_the_vault_changes(
        keyvault: KeyVaultServer, deployer: MakeDeployer, issue: Issue) -> None:
    target = deployer("web")
    current, _ = issue()
    target.deploy(current)
    keyvault.requests.clear()
    good, _ = issue()
    with pytest.raises(KeyMismatchError) as caught:
        target.deploy(DeployBundle.from_key("web", good.certificate, good.chain, ec.generate_private_key(ec.SECP256R1())))
    assert "matches none of the certificates" in str(caught.value) and good.fingerprint[:16] in str(caught.value)
    assert [m for m, _ in keyvault.requests if m != "GET"] == []  # only the read of the current version
    assert keyvault.version_count("web") == 1
    assert fingerprint(keyvault.latest("web")) == current.fingerprint  # type: ignore[arg-type]


def test_verify_refuses_a_disabled_current_version(
        sdk: CertificateClient, deployer: MakeDeployer, issue: Issue) -> None:
    target = deployer("web")
    bundle, _ = issue()
    target.deploy(bundle)
    sdk.update_certificate_properties("web", enabled=False)
    with pytest.raises(VerificationError) as caught:
        target.verify(bundle.fingerprint)
    assert "disabled" in str(caught.value) and caught.value.served == bundle.fingerprint


def test_remove_deletes_and_tolerates_absence(
        keyvault: KeyVaultServer, deployer: MakeDeployer, issue: Issue) -> None:
    target = deployer("web")
    target.deploy(issue()[0])
    target.remove()
    assert target.current() is None and keyvault.is_deleted("web")
    target.remove()


def test_remove_soft_deletes_restore_recovers_purge_purges(
        keyvault: KeyVaultServer, sdk: CertificateClient, deployer: MakeDeployer, issue: Issue) -> None:
    target = deployer("web")
    bundle = issue()[0]
    target.deploy(bundle)
    removal = target.remove()
    assert removal.fingerprint == bundle.fingerprint and keyvault.is_deleted("web")
    assert "recovered" in target.restore(removal)
    assert not keyvault.is_deleted("web") and _current_fingerprint(sdk, "web") == bundle.fingerprint
    removal = target.remove()
    target.purge(removal)
    assert not keyvault.is_deleted("web") and keyvault.latest("web") is None
    with pytest.raises(PermanentDeployError, match="no deleted certificate to recover"):
        target.restore(removal)
    target.purge(removal)  # gone already: fine


def test_settings_are_checked(deployer: MakeDeployer) -> None:
    with pytest.raises(PermanentDeployError, match="certificate_name must be"):
        deployer("not a name!")
    with pytest.raises(TargetSettingsError, match=r"unknown azure-kv setting\(s\) vault") as unknown:
        deployer("web", vault="x")
    assert unknown.value.valid_keys == ("certificate_name", "purge_deleted", "tags") and "kv-web" in str(unknown.value)
    with pytest.raises(TargetSettingsError, match="tags.a must be a valid string"):
        deployer("web", tags={"a": 1})
