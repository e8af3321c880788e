"""Hostile and refusing vaults give precise certpilot errors in bounded time; keys never show up in
receipts, logs, exception text, pickled exceptions or the frames an exception keeps."""

from __future__ import annotations

import datetime as dt
import logging
import pickle
import time
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from certpilot.deployment import DeployBundle, DeployError, PermanentDeployError, Receipt, VerificationError
from certpilot.errors import KeyMismatchError, ServiceRefusedError, ServiceUnavailableError
from certpilot.sample_estate import Authority, issue_leaf
from connectors.azure_kv import (AzureKeyVaultDeployer, KeyVaultConnection, KeyVaultRefusedError,
                                 KeyVaultUnavailableError, StaticTokenCredential)
from lab.keyvault import KeyVaultServer
from tests.integration.azure.conftest import lab_connection
from tests.keyprobe import leaks

Issue = Callable[..., tuple[DeployBundle, object]]
MakeDeployer = Callable[..., AzureKeyVaultDeployer]


def _deployer(connection: KeyVaultConnection, certificate_name: str = "web") -> AzureKeyVaultDeployer:
    return AzureKeyVaultDeployer(f"kv-{certificate_name}", connection, {"certificate_name": certificate_name})


@pytest.mark.parametrize("operation", ["current", "deploy"])
def test_a_slow_vault_gives_a_transient_error_within_the_timeout(
        keyvault: KeyVaultServer, issue: Issue, operation: str) -> None:
    connection = lab_connection(keyvault, connection_timeout=0.25, read_timeout=0.25, retry_total=2,
                                retry_backoff_factor=0.05, retry_backoff_max=0.1)
    target = _deployer(connection)
    bundle, _ = issue()
    keyvault.hostile(delay=10.0)
    started = time.monotonic()
    with pytest.raises(DeployError) as caught:
        target.current() if operation == "current" else target.deploy(bundle)
    elapsed = time.monotonic() - started
    # Three attempts of 0.25 s each, then the error: not a hang, and not before the timeout had run out.
    assert 3 * 0.25 <= elapsed <= connection.worst_case_seconds + 0.5, elapsed
    assert connection.worst_case_seconds == pytest.approx(3 * 0.5 + 2 * 0.1)
    message = str(caught.value)
    assert f"kv-web: azure-kv {keyvault.host}/web: reading the current version failed: ServiceResponseTimeoutError" \
        in message and "Read timed out. (read timeout=0.25)" in message
    assert [m for m, _ in keyvault.requests] == ["GET"] * 3  # deploy never reached the import


def test_a_dropped_connection_is_transient(keyvault: KeyVaultServer) -> None:
    keyvault.hostile(drop=True)
    started = time.monotonic()
    with pytest.raises(DeployError, match=f"azure-kv {keyvault.host}/web: reading the current version failed"):
        _deployer(lab_connection(keyvault, retry_backoff_factor=0.01)).current()
    assert time.monotonic() - started < 2.0
    assert len(keyvault.requests) == 2  # retry_total=1: one retry, then the error


def test_throttling_and_server_errors_are_transient_and_not_retried_inside_the_sdk(keyvault: KeyVaultServer) -> None:
    target = _deployer(lab_connection(keyvault))
    keyvault.fail_next(429, retry_after=30)
    started = time.monotonic()
    with pytest.raises(DeployError) as caught:
        target.current()
    assert time.monotonic() - started < 2.0  # the Retry-After of 30 s is left to the task's retries
    assert "HTTP 429 Throttled" in str(caught.value) and "(retry after 30 s)" in str(caught.value)
    throttled = caught.value  # named by cause, its data as fields, and so after Prefect pickles it
    for error in (throttled, pickle.loads(pickle.dumps(throttled))):
        assert isinstance(error, KeyVaultUnavailableError) and isinstance(error, ServiceUnavailableError)
        assert (error.service, error.status, error.code, error.retry_after) == ("keyvault", 429, "Throttled", 30.0)
        assert error.operation == "reading the current version" and str(error) == str(throttled)
    keyvault.fail_next(503)
    with pytest.raises(DeployError, match="HTTP 503 InternalServerError") as failing:
        target.current()
    assert (failing.value.status, failing.value.retry_after) == (503, None)  # type: ignore[attr-defined]
    keyvault.fail_next(403)
    with pytest.raises(KeyVaultRefusedError) as refused:
        target.current()
    assert isinstance(refused.value, ServiceRefusedError) and refused.value.status == 403
    assert target.current() is None  # and then it answers again


def test_not_found_gives_precise_errors(keyvault: KeyVaultServer, deployer: MakeDeployer, issue: Issue) -> None:
    target = deployer("web")
    with pytest.raises(VerificationError) as caught:
        target.verify("ab" * 32)
    assert f"azure-kv://{keyvault.host}/web does not exist" in str(caught.value) and caught.value.served is None
    bundle, _ = issue()
    receipt = target.deploy(bundle)
    forged = Receipt(receipt.target, receipt.kind, receipt.fingerprint, "cd" * 32,
                     dict(receipt.undo, previous_version="0" * 32))
    with pytest.raises(PermanentDeployError) as failed:
        target.rollback(forged)
    assert (f"kv-web: azure-kv {keyvault.host}/web/{'0' * 32}: reading the previous version's secret failed: "
            f"HTTP 404 SecretNotFound") in str(failed.value)


def test_a_wrong_token_and_an_untrusted_vault_are_permanent(keyvault: KeyVaultServer) -> None:
    wrong = KeyVaultConnection(keyvault.url, StaticTokenCredential("not-the-token"), ca_file=str(keyvault.ca_file),
                               verify_challenge_resource=False, retry_total=0)
    with pytest.raises(PermanentDeployError, match="HTTP 401 Unauthorized: AKV10032"):
        _deployer(wrong).current()
    untrusted = KeyVaultConnection(keyvault.url, StaticTokenCredential(keyvault.token),
                                   verify_challenge_resource=False, retry_total=0)
    with pytest.raises(PermanentDeployError, match="TLS certificate is not trusted"):
        _deployer(untrusted).current()
    checked = KeyVaultConnection(keyvault.url, StaticTokenCredential(keyvault.token), ca_file=str(keyvault.ca_file),
                                 retry_total=0)  # the lab's challenge names vault.azure.net, not 127.0.0.1
    with pytest.raises(PermanentDeployError, match="ValueError"):
        _deployer(checked).current()


def test_keys_never_reach_receipts_logs_or_errors(
        keyvault: KeyVaultServer, deployer: MakeDeployer, issue: Issue, ca: tuple[Authority, Authority],
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)  # every logger: ours, azure.core's HTTP logging, urllib3
    target = deployer("web")
    first, first_key = issue()
    second, second_key = issue()
    keys = [first_key, second_key]
    texts: list[bytes] = []
    receipts = [target.deploy(first), target.deploy(second)]
    target.rollback(receipts[1])
    texts += [repr(r.as_dict()).encode() for r in receipts] + [repr(target).encode(), repr(first).encode()]

    errors: list[BaseException] = []
    with pytest.raises(KeyMismatchError) as mismatch:
        target.deploy(DeployBundle.from_key("web", first.certificate, first.chain, second_key))
    errors.append(mismatch.value)
    # A key the vault refuses (Ed25519: Key Vault certificates take RSA and EC only): the 400 comes back
    # from the import request, whose body held the key.
    ed_key = ed25519.Ed25519PrivateKey.generate()
    ed_cert, _ = issue_leaf(ca[1], ["ed.example.test"], dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=9),
                            key=ed_key)
    keys.append(ed_key)
    with pytest.raises(PermanentDeployError) as refused:
        target.deploy(DeployBundle.from_key("web", ed_cert, [ca[1].certificate], ed_key))
    assert "importing a new version failed: HTTP 400 BadParameter" in str(refused.value)
    errors.append(refused.value)

    for error in errors:
        assert error.__cause__ is None and error.__context__ is None  # no SDK error holding the request body
        texts += [str(error).encode(), repr(error).encode(), pickle.dumps(error)]
        frames = error.__traceback__
        while frames is not None:  # what the exception keeps alive in memory
            texts += [repr(value).encode() for value in frames.tb_frame.f_locals.values()
                      if isinstance(value, (bytes, str))]
            frames = frames.tb_next
    texts.append(caplog.text.encode())
    assert "imported" in caplog.text  # the logs were captured (a probe of nothing proves nothing)
    assert leaks(b"\n".join(texts), keys) == []
