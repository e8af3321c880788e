"""Where certpilot keeps its state, read from the environment once per call.

CERTPILOT_HOME          the home directory (default: the user's data directory, e.g. ~/.local/share/certpilot)
CERTPILOT_DATABASE_URL  the inventory database (default: SQLite file inventory.db in the home)
CERTPILOT_MASTER_KEY    the master key, 32 bytes in URL-safe base64
CERTPILOT_MASTER_KEY_FILE  a file holding the master key (default: master.key in the home)
CERTPILOT_ACTOR         who is acting, for the audit trail (default: cli:<login name>)
CERTPILOT_POLICY        the certificate policy (certpilot.policy): a YAML file's path, or block:<name> for a
                        certpilot-policy Prefect block (default: policy.yaml in the home when it exists,
                        else the built-in policy)
"""

from __future__ import annotations

import getpass
import os
from dataclasses import dataclass
from pathlib import Path

import platformdirs


@dataclass(frozen=True)
class Settings:
    home: Path
    database_url: str
    master_key: str | None
    master_key_file: Path
    master_key_file_is_default: bool
    actor: str
    policy: str | None = None  # CERTPILOT_POLICY as given; None: unset (see certpilot.policy.policy_location)

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
    )
