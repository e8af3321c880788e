"""The master key's key management service: AWS KMS, and the one way above the core to load the key ring.

``AwsKms`` is certpilot.keystore's ``KeyManagementService`` for AWS KMS (GenerateDataKey and Decrypt,
bound to the keystore's encryption context), over connectors.aws.AwsAccount: connect and read
timeouts, a bounded number of attempts, and botocore's errors translated at that one edge into
AwsUnavailableError (transient: not reached, timed out, throttled, 5xx) or AwsRefusedError
(permanent: access denied, key disabled or unknown), each naming the operation, region and KMS key.
The keystore turns those into MasterKeyUnavailableError or MasterKeyError, saying nothing was changed.

``load_key_ring(settings)`` (once) and ``key_ring_loader(settings)`` (a loader to call for each use, one
client for all) are what tasks, flows, the CLI and the HTTP service call: with CERTPILOT_MASTER_KEY_KMS
set they build the client from the settings (region, endpoint, timeout; credentials from boto3's usual
chain), otherwise they are certpilot.keystore.load_key_ring as before.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from certpilot import audit, keystore
from certpilot.errors import MasterKeyError
from certpilot.settings import Settings
from connectors.aws import AwsAccount

__all__ = ["AwsKms", "key_ring_loader", "kms_from_settings", "load_key_ring", "rotate_master_key"]

ATTEMPTS = 3  # per KMS call, the first included (botocore's standard retry mode, with its backoff)


def _region_of(kms_key_id: str) -> str | None:
    """The region of a key or alias ARN (``arn:aws:kms:REGION:ACCOUNT:key/ID``); None for a bare id or alias."""
    parts = kms_key_id.split(":", 5)
    return parts[3] or None if len(parts) == 6 and parts[0] == "arn" else None


@dataclass
class AwsKms:
    """AWS KMS in ``region`` (keys named by ARN are asked in their own region)."""

    region: str
    endpoint_url: str | None = None
    timeout: float = 5.0
    attempts: int = ATTEMPTS
    _account: AwsAccount = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._account = AwsAccount(regions=(self.region,), endpoint_url=self.endpoint_url,
                                   connect_timeout=self.timeout, read_timeout=self.timeout,
                                   max_attempts=self.attempts)

    def _call(self, operation: str, kms_key_id: str, **kwargs: Any) -> Any:
        return self._account.call("kms", _region_of(kms_key_id) or self.region, operation, arn=kms_key_id,
                                  KeyId=kms_key_id, **kwargs)

    def generate_data_key(self, kms_key_id: str, context: dict[str, str]) -> keystore.KmsDataKey:
        answer = self._call("generate_data_key", kms_key_id, KeySpec="AES_256", EncryptionContext=context)
        return keystore.KmsDataKey(_blob(answer["Plaintext"]), _blob(answer["CiphertextBlob"]), str(answer["KeyId"]))

    def decrypt(self, kms_key_id: str, ciphertext: bytes, context: dict[str, str]) -> bytes:
        # KeyId makes KMS refuse a ciphertext of another key (IncorrectKeyException) instead of opening it.
        answer = self._call("decrypt", kms_key_id, CiphertextBlob=ciphertext, EncryptionContext=context)
        return _blob(answer["Plaintext"])


def _blob(value: bytes | str) -> bytes:
    """boto3 returns blobs as bytes; a base64 string is what the wire carries (and what some stand-ins give)."""
    return value if isinstance(value, bytes) else base64.b64decode(value)


def kms_from_settings(settings: Settings) -> AwsKms | None:
    """The KMS client CERTPILOT_MASTER_KEY_KMS and its settings describe; None when it is not set."""
    if not settings.master_key_kms:
        return None
    region = _region_of(settings.master_key_kms) or settings.master_key_kms_region
    if not region:
        raise MasterKeyError(f"CERTPILOT_MASTER_KEY_KMS names KMS key {settings.master_key_kms} without a region: "
                             "set CERTPILOT_MASTER_KEY_KMS_REGION (or AWS_REGION), or give the key's ARN")
    return AwsKms(region, settings.master_key_kms_endpoint_url, settings.master_key_kms_timeout)


def key_ring_loader(settings: Settings, announce: Callable[[str], None] | None = None
                    ) -> Callable[[], keystore.KeyRing]:
    """Loads the configured key ring each time it is called, its master key opened by AWS KMS when
    CERTPILOT_MASTER_KEY_KMS is set: one KMS client for every load (making a boto3 client costs about
    0.2 s, a Decrypt about 20 ms on loopback), and the master key never kept between loads."""
    clients: list[AwsKms | None] = []  # made on the first load, so a loader never used asks nothing of the settings

    def load() -> keystore.KeyRing:
        if not clients:
            clients.append(kms_from_settings(settings))
        return keystore.load_key_ring(settings, announce, clients[0])

    return load


def load_key_ring(settings: Settings, announce: Callable[[str], None] | None = None) -> keystore.KeyRing:
    """The configured key ring, once (see key_ring_loader)."""
    return key_ring_loader(settings, announce)()


def rotate_master_key(engine: sa.Engine, settings: Settings, actor: audit.Actor,
                      new_key_file: Path | None = None) -> keystore.Rotation:
    """certpilot.keystore.rotate_master_key with the configured KMS, when there is one."""
    return keystore.rotate_master_key(engine, settings, actor, new_key_file, kms_from_settings(settings))
