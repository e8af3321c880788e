"""The SSH host as a discovery Source: certificate files found by path globs over SFTP.

``SshSource(connection, globs, alias=...)`` (name ``ssh:<alias>``) matches each absolute glob (fnmatch
per path component, ``**`` for any depth; symlinked files followed, symlinked directories not
descended), reads at most ``max_files`` files of at most ``max_file_bytes`` each, and parses each with
certpilot.formats.load_bundle: PEM (certificates, chains, keys, haproxy's combined files), DER, PKCS#7
and PKCS#12. PKCS#12 files and encrypted keys are tried without a password, then with each of
``pkcs12_passwords``.

It yields one Found per file holding certificates (locator ``ssh://user@host:port/abs/path``, the
certificates as the file orders them) and a Problem for each file or directory it cannot read, each
file that is no certificate, key or bundle, a PKCS#12 file no password opens, a file over the size limit
and a glob cut short by the file limit. Temporary uploads of interrupted writes (connectors.ssh) are
ignored.

Keys are paired with certificates by public key: a key in the same file (haproxy PEM, PKCS#12) or in
any file found. ``details`` then record ``key_path`` and ``key_mode`` (octal string) of the pairing key.
The key itself is returned (Found.key, for the leaf it pairs with) only with ``import_keys=True``;
otherwise keys are dropped as soon as their public key is known.

Server configurations: a file the globs match that is an nginx or haproxy configuration naming
certificate files (certpilot.server_configs) is read as one, not reported as a problem. The certificate
and key files it names are read too, matched by the globs or not (a missing one is a Problem naming the
configuration), and each certificate file's ``details["served_by"]`` lists how it is served (server,
configuration file, key file, listen addresses, server names, haproxy's admin stats socket): what
adoption proposes deployment targets from. So ``/etc/nginx/**/*.conf`` alone finds what nginx serves.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import stat as stat_module
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes

from certpilot.discovery import Found, Problem
from certpilot.errors import ParseError, PasswordError
from certpilot.formats import Bundle, load_bundle
from certpilot.server_configs import Served, is_server_config, parse
from connectors.ssh import RemotePathError, SshConnection, is_temporary

__all__ = ["SshSource"]


@dataclass
class _Key:
    path: str
    mode: int
    key: PrivateKeyTypes | None = field(repr=False)  # kept only when keys are imported


@dataclass
class _CertFile:
    path: str
    bundle_format: str
    certificates: tuple[x509.Certificate, ...]
    attrs_mode: int
    size: int
    mtime: int | None
    notes: tuple[str, ...]


def _spki(public_key: PublicKeyTypes) -> str:
    der = public_key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


class SshSource:
    """Certificate files on one SSH host."""

    def __init__(self, connection: SshConnection, globs: Sequence[str], *, alias: str | None = None,
                 import_keys: bool = False, pkcs12_passwords: Sequence[str] = (), max_files: int = 10_000,
                 max_file_bytes: int = 1024 * 1024) -> None:
        self.ssh = connection
        self.globs = tuple(globs)
        self.name = f"ssh:{alias or connection.address}"
        self.import_keys = import_keys
        self._passwords = tuple(pkcs12_passwords)
        self.max_files = max_files
        self.max_file_bytes = max_file_bytes

    def locator(self, path: str) -> str:
        host = f"[{self.ssh.address}]" if ":" in self.ssh.address else self.ssh.address
        return f"ssh://{self.ssh.user}@{host}:{self.ssh.port}{path}"

    def close(self) -> None:
        self.ssh.close()

    def discover(self) -> Iterator[Found | Problem]:
        files: dict[str, int] = {}
        problems: dict[str, Problem] = {}  # by locator: several globs may meet one unreadable directory
        listings: dict[str, Any] = {}
        for pattern in self.globs:
            try:
                matched = self.ssh.glob(pattern, max_files=self.max_files - len(files) + 1, listings=listings)
            except ValueError as exc:
                problems[self.locator(pattern)] = Problem(self.locator(pattern), str(exc))
                continue
            for path, reason in matched.unreadable.items():
                problems.setdefault(self.locator(path), Problem(self.locator(path), reason))
            for path, attrs in matched.files.items():
                if is_temporary(path) or path in files:
                    continue
                if len(files) >= self.max_files:
                    matched.truncated = True
                    break
                files[path] = attrs.st_size or 0
            if matched.truncated:
                problems[self.locator(pattern)] = Problem(self.locator(pattern), f"more than {self.max_files} files "
                                                          f"match: only the first {self.max_files} were read")
        yield from problems.values()
        certificate_files: list[_CertFile] = []
        keys: dict[str, _Key] = {}
        served: list[Served] = []
        pending = sorted(files)
        while pending:
            path = pending.pop(0)
            outcome = self._read(path, files[path])
            if isinstance(outcome, Problem):
                yield outcome
                continue
            if isinstance(outcome, list):  # a server configuration: read the files it names as well
                served += outcome
                for named in sorted({p for s in outcome for p in (s.certificate_path, s.key_path) if p}):
                    found = self._named_file(named, path, files)
                    if isinstance(found, Problem):
                        yield found
                    elif found is not None:
                        files[named] = found
                        pending.append(named)
                continue
            bundle, attrs_mode, mtime = outcome
            for key in bundle.private_keys:
                keys.setdefault(_spki(key.public_key()), _Key(path, attrs_mode, key if self.import_keys else None))
            if bundle.certificates:
                certificate_files.append(_CertFile(path, bundle.format, bundle.certificates, attrs_mode,
                                                   files[path], mtime, bundle.notes))
            del bundle
        for item in certificate_files:
            yield self._found(item, keys, [s for s in served if s.serves(item.path)])

    def _named_file(self, path: str, config: str, files: dict[str, int]) -> Problem | int | None:
        """The size of a file a configuration names, to be read; None when it is read already, or is a
        directory (haproxy's crt: its files are read when the globs match them); a Problem when missing."""
        if path in files or is_temporary(path):
            return None
        if len(files) >= self.max_files:
            return Problem(self.locator(path), f"named by {config}, but over the limit of {self.max_files} files: "
                                               "not read")
        try:
            attrs = self.ssh.stat(path)
        except RemotePathError as exc:
            return Problem(self.locator(path), f"named by {config}: {exc.reason}")
        if attrs is None:
            return Problem(self.locator(path), f"named by {config}, but there is no such file")
        if stat_module.S_ISDIR(attrs.st_mode or 0):
            return None
        return attrs.st_size or 0

    def certificates_at(self, path: str) -> tuple[str, ...]:
        """The SHA-256 fingerprints of the certificates file ``path`` holds now, in its order (read as
        discovery reads it; any key in it is dropped). ParseError when it holds none or cannot be read,
        naming the locator."""
        try:
            attrs = self.ssh.stat(path)
        except RemotePathError as exc:
            raise ParseError(exc.reason, self.locator(path)) from None
        if attrs is None:
            raise ParseError("the file is gone", self.locator(path))
        outcome = self._read(path, attrs.st_size or 0)
        if isinstance(outcome, Problem):
            raise ParseError(outcome.reason, self.locator(path))
        if isinstance(outcome, list):
            raise ParseError("a server configuration now, not a certificate file", self.locator(path))
        bundle = outcome[0]
        if not bundle.certificates:
            raise ParseError("holds no certificate now", self.locator(path))
        return tuple(hashlib.sha256(c.public_bytes(serialization.Encoding.DER)).hexdigest()
                     for c in bundle.certificates)

    def _read(self, path: str, size: int) -> Problem | list[Served] | tuple[Bundle, int, int | None]:
        where = self.locator(path)
        if size > self.max_file_bytes:
            return Problem(where, f"file is {size} bytes, over the limit of {self.max_file_bytes}: skipped")
        try:
            attrs = self.ssh.stat(path)
            data = self.ssh.read_file(path, max_bytes=self.max_file_bytes)
        except RemotePathError as exc:
            return Problem(where, exc.reason)
        mode = stat_module.S_IMODE(attrs.st_mode or 0) if attrs else 0
        mtime = attrs.st_mtime if attrs else None
        try:
            return self._parse(data, where), mode, mtime
        except ParseError as exc:  # PasswordError included
            served = parse(data, path) if is_server_config(data) else []
            return served or Problem(where, exc.detail)
        finally:
            del data

    def _parse(self, data: bytes, where: str) -> Bundle:
        try:
            return load_bundle(data, source=where)
        except PasswordError:
            if not self._passwords:
                raise
        for password in self._passwords:
            try:
                return load_bundle(data, source=where, password=password.encode())
            except PasswordError:
                continue
        raise PasswordError(f"password-protected, and none of the {len(self._passwords)} configured password(s) "
                            "opens it", where)

    def _found(self, item: _CertFile, keys: dict[str, _Key], served: list[Served]) -> Found:
        leaf = item.certificates[0]
        details: dict[str, object] = {"path": item.path, "format": item.bundle_format, "size": item.size,
                                      "mode": f"{item.attrs_mode:04o}", "certificates": len(item.certificates)}
        if item.mtime is not None:
            details["modified"] = dt.datetime.fromtimestamp(item.mtime, dt.timezone.utc).isoformat()
        if item.notes:
            details["notes"] = list(item.notes)
        key = keys.get(_spki(leaf.public_key()))
        if key is not None:
            details["key_path"] = key.path
            details["key_mode"] = f"{key.mode:04o}"
        if served:
            details["served_by"] = [s.as_dict() for s in served]
        return Found(tuple(c.public_bytes(serialization.Encoding.DER) for c in item.certificates),
                     self.locator(item.path), details, key.key if key is not None and self.import_keys else None)
