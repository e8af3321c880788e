"""The SSH host block: one server reached over SSH, as a discovery source and as a deploy destination.

A Target names it as ``ssh-host/<block name>`` with kind ``ssh-nginx`` or ``ssh-haproxy`` and the
settings in certpilot/target_kinds.py (NginxSettings, HaproxySettings). Discovery reads the files
``discovery_globs`` match (connectors/ssh_source.py). The block holds configuration and secrets (SecretStr, shown masked); the
connection is built from them when a connector is made, and one connection is shared by everything
made from the same block object (many targets of one host cost one SSH login).

Host keys are checked against ``known_hosts`` and an unknown or changed key is refused: get the host's
line with ``ssh-keyscan -p PORT HOST`` and check its fingerprint out of band before pasting it.

Block secrets are encrypted in the Prefect database with a key kept in the same database unless the
server sets PREFECT_SERVER_ENCRYPTION_KEY, and any API client may read them with include_secrets:
protect the Prefect API accordingly.
"""

from __future__ import annotations

import threading
from typing import Any, ClassVar

from prefect.blocks.core import Block
from pydantic import Field, HttpUrl, PrivateAttr, SecretStr

from certpilot.discovery import Source

DOCS = "https://github.com/certpilot/certpilot/blob/main/README.md#ssh-hosts"


class SshHostBlock(Block):
    """A server reached over SSH: certificate files to discover, nginx sites and haproxy frontends to deploy to."""

    _block_type_name: ClassVar[str] = "SSH host"
    _block_type_slug: ClassVar[str] = "ssh-host"
    _description: ClassVar[str] = ("A server reached over SSH (key authentication, known host key): certificate "
                                   "files to discover, nginx and haproxy to deploy to.")
    _documentation_url: ClassVar[HttpUrl | None] = HttpUrl(DOCS)
    _code_example: ClassVar[str] = """
```python
from blocks.targets import build_deployer
from blocks.ssh import SshHostBlock

ssh_host_block = SshHostBlock.load("BLOCK_NAME")
source = ssh_host_block.source()
deployer = build_deployer(ssh_host_block, "web-1", "ssh-nginx", {"certificate_path": "...", "key_path": "..."})
```
"""

    address: str = Field(description="Host name or IP address of the SSH server.")
    port: int = Field(default=22, ge=1, le=65535, description="SSH port.")
    user: str = Field(description="The user to log in as; it must be able to write the certificate files and run "
                                  "the reload commands.")
    private_key: SecretStr = Field(description="The client private key (Ed25519, ECDSA or RSA; OpenSSH or PEM text).")
    private_key_passphrase: SecretStr | None = Field(default=None, description="Passphrase of the client key, "
                                                                                "if it is encrypted.")
    known_hosts: str = Field(description="The host's known_hosts line(s), e.g. `[host]:2222 ssh-ed25519 AAAA...`; "
                                         "any other host key is refused.")
    alias: str | None = Field(default=None, description="Name of this host in discovery results (source "
                                                        "`ssh:<alias>`); default the address.")
    connect_timeout: float = Field(default=10.0, gt=0, description="Seconds for connecting, the banner and "
                                                                    "authentication.")
    command_timeout: float = Field(default=60.0, gt=0, description="Seconds for each remote command and SFTP "
                                                                    "operation.")
    discovery_globs: list[str] = Field(default_factory=list, description="Absolute path globs of certificate files, "
                                                                         "e.g. /etc/nginx/**/*.pem (`**`: any depth).")
    import_keys: bool = Field(default=False, description="Bring back the private keys found beside certificates "
                                                         "(stored encrypted in the inventory).")
    pkcs12_passwords: list[SecretStr] | SecretStr | None = Field(default=None, description="Passwords to try on "
                                                                                           "PKCS#12 files.")
    max_files: int = Field(default=10_000, gt=0, description="Discovery reads at most this many files.")
    max_file_bytes: int = Field(default=1024 * 1024, gt=0, description="Discovery skips larger files.")

    _connection: Any = PrivateAttr(default=None)
    _connection_lock: Any = PrivateAttr(default_factory=threading.Lock)

    def connection(self) -> Any:
        """The SshConnection of this block (made once, connected on first use)."""
        from connectors.ssh import SshConnection

        with self._connection_lock:
            if self._connection is None:
                passphrase = self.private_key_passphrase.get_secret_value() if self.private_key_passphrase else None
                self._connection = SshConnection(self.address, self.port, self.user,
                                                 self.private_key.get_secret_value(), self.known_hosts,
                                                 passphrase=passphrase, connect_timeout=self.connect_timeout,
                                                 operation_timeout=self.command_timeout,
                                                 command_timeout=self.command_timeout)
            return self._connection

    def _passwords(self) -> list[str]:
        value = self.pkcs12_passwords
        if value is None:
            return []
        items = value if isinstance(value, list) else [value]
        return [item.get_secret_value() for item in items]

    def source(self) -> Source:
        """The connector: an SshSource over ``discovery_globs``."""
        from connectors.ssh_source import SshSource

        return SshSource(self.connection(), self.discovery_globs, alias=self.alias or self._block_document_name,
                         import_keys=self.import_keys, pkcs12_passwords=self._passwords(), max_files=self.max_files,
                         max_file_bytes=self.max_file_bytes)
