"""Where certpilot keeps its state, read from the environment once per call.

CERTPILOT_HOME          the home directory (default: the user's data directory, e.g. ~/.local/share/certpilot)
CERTPILOT_DATABASE_URL  the inventory database (default: SQLite file inventory.db in the home)
CERTPILOT_MASTER_KEY    the master key, 32 bytes in URL-safe base64
CERTPILOT_MASTER_KEY_FILE  a file holding the master key (default: master.key in the home)
CERTPILOT_MASTER_KEY_KMS  an AWS KMS key (key id, key ARN, alias name or alias ARN) that holds the master key as an
                        envelope key: the master key is a KMS data key, kept on disk only as its KMS ciphertext
                        in the master key file's place with ".kms" added (default: master.key.kms in the home)
CERTPILOT_MASTER_KEY_KMS_REGION  the KMS key's region (default: the region of a key ARN, else AWS_REGION or
                        AWS_DEFAULT_REGION); credentials come from boto3's usual chain (environment, profile, role)
CERTPILOT_MASTER_KEY_KMS_ENDPOINT_URL  another KMS endpoint (a VPC endpoint, or moto in tests)
CERTPILOT_MASTER_KEY_KMS_TIMEOUT  seconds to connect and to wait for each answer from KMS (default 5; 3 attempts)
CERTPILOT_ACTOR         who is acting, for the audit trail (default: cli:<login name>)
CERTPILOT_POLICY        the certificate policy (certpilot.policy): a YAML file's path, or block:<name> for a
                        certpilot-policy Prefect block (default: policy.yaml in the home when it exists,
                        else the built-in policy)
"""

from __future__ import annotations

import getpass
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from certpilot.errors import InvalidOptionError


@dataclass(frozen=True)
class Settings:
    home: Path
    database_url: str
    master_key: str | None
    master_key_file: Path
    master_key_file_is_default: bool
    actor: str
    policy: str | None = None  # CERTPILOT_POLICY as given; None: unset (see certpilot.policy.policy_location)
    master_key_kms: str | None = None  # CERTPILOT_MASTER_KEY_KMS: the KMS key that holds the master key
    master_key_kms_region: str | None = None
    master_key_kms_endpoint_url: str | None = None
    master_key_kms_timeout: float = 5.0

    @property
    def is_embedded_database(self) -> bool:
        return self.database_url.startswith("sqlite")


def _login_name() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name in some containers
        return str(os.getuid())


def load_settings(environ: dict[str, str] | None = None) -> Settings:
    env = os.environ if environ is None else environ
    home = Path(env.get("CERTPILOT_HOME") or platformdirs.user_data_dir("certpilot")).expanduser()
    database_url = env.get("CERTPILOT_DATABASE_URL") or f"sqlite:///{home / 'inventory.db'}"
    key_file = env.get("CERTPILOT_MASTER_KEY_FILE")
    return Settings(
        home=home,
        database_url=database_url,
        master_key=env.get("CERTPILOT_MASTER_KEY") or None,
        master_key_file=Path(key_file).expanduser() if key_file else home / "master.key",
        master_key_file_is_default=not key_file,
        actor=env.get("CERTPILOT_ACTOR") or f"cli:{_login_name()}",
        policy=(env.get("CERTPILOT_POLICY") or "").strip() or None,
        master_key_kms=(env.get("CERTPILOT_MASTER_KEY_KMS") or "").strip() or None,
        master_key_kms_region=(env.get("CERTPILOT_MASTER_KEY_KMS_REGION") or env.get("AWS_REGION")
                               or env.get("AWS_DEFAULT_REGION") or "").strip() or None,
        master_key_kms_endpoint_url=(env.get("CERTPILOT_MASTER_KEY_KMS_ENDPOINT_URL") or "").strip() or None,
        master_key_kms_timeout=_seconds(env, "CERTPILOT_MASTER_KEY_KMS_TIMEOUT", 5.0),
    )


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    text = (env.get(name) or "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise InvalidOptionError(name, text, "a number of seconds") from None
    if not 0 < value <= 300:
        raise InvalidOptionError(name, text, "a number of seconds above 0 and at most 300")
    return value
