"""A private CA's trust bundle as a file on an SSH host (kind trust-bundle; certpilot.deployment's
Deployer role): the relying-party side of internal trust.

A trust-bundle target belongs to a managed certificate; deploying that certificate writes the bundle of
the CA that issued it (certpilot.trust_bundle: the root and the issuing CA certificates in force, PEM),
which ``bundles`` finds from the certificate's fingerprint. The file is written as the ssh deployers
write theirs: uploaded under a temporary name beside ``path`` with its final mode (default 0644; never
writable by group or others), given its owner and group (``chown`` on the temporary file) and renamed
into place, so a reader sees the old bundle or the new one. The file that was there is kept as
``<path>.certpilot-previous``; a ``reload_command`` that fails (``update-ca-certificates``, say) puts it
back and runs the command again.

A bundle file that already holds the bundle is not rewritten and nothing is reloaded: renewing a leaf
under the same CA leaves the host's trust store alone, and after the CA's certificates change (a new
issuing CA) the next deploy writes the new bundle. There is no leaf in the file, so ``current()`` is
None (the deploy decides by content) and ``verify(fingerprint)`` reads the file back and compares its
SHA-256 with the bundle that goes with ``fingerprint``.

Retiring: ``remove`` moves the file to ``<path>.certpilot-retired`` and runs ``remove_command``;
``restore`` moves it back and runs ``restore_command`` (default: ``reload_command``); ``purge`` deletes
the retired copy (and, with ``remove_previous``, the previous one). Symbolic links at any of these paths
are refused, not followed.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import shlex
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, cast

from certpilot.deployment import (DeployBundle, DeployError, PermanentDeployError, Receipt, Removal, Verification,
                                  VerificationError)
from certpilot.target_kinds import TargetKind, TrustBundleSettings, validate_settings
from certpilot.trust_bundle import TrustBundle
from connectors.ssh import RemoteCommandError, SshConnection, SshError, SshUnavailableError, trim_output
from connectors.ssh_deploy import BACKUP_SUFFIX, RETIRED_SUFFIX, _instance_lock

__all__ = ["TrustBundleDeployer"]

log = logging.getLogger(__name__)

MAX_BUNDLE_FILE = 1024 * 1024
_R = TypeVar("_R")


def _named(method: Callable[..., _R]) -> Callable[..., _R]:
    """Errors of the SSH connection, raised out of the deployer's method, name its target; a change holds
    the lock of its file on its host (two targets naming one file take turns, across deployers and
    connections in the process)."""

    @functools.wraps(method)
    def wrapper(self: TrustBundleDeployer, *args: Any, **kwargs: Any) -> _R:
        try:
            with _instance_lock(self.ssh.where, f"trust-bundle:{self.path}"):
                return method(self, *args, **kwargs)
        except SshError as exc:
            raise exc.for_target(self.name) from None

    return wrapper


class TrustBundleDeployer:
    """The trust bundle of the CA that issues a managed certificate, as a file on one SSH host."""

    kind = TargetKind.TRUST_BUNDLE

    def __init__(self, name: str, connection: SshConnection, settings: TrustBundleSettings | Mapping[str, Any],
                 bundles: Callable[[str], TrustBundle]) -> None:
        self.name = name
        self.ssh = connection
        self.settings = cast(TrustBundleSettings, validate_settings(self.kind, settings, name))
        self.path = self.settings.path
        self._bundles = bundles

    def close(self) -> None:
        """Close the SSH connection (shared by deployers built from one block object)."""
        self.ssh.close()

    # the file -------------------------------------------------------------------------------------
    def _digest(self, path: str) -> str | None:
        """SHA-256 of the file at ``path``; None when there is none."""
        if self.ssh.regular_file(path) is None:
            return None
        return hashlib.sha256(self.ssh.read_file(path, max_bytes=MAX_BUNDLE_FILE)).hexdigest()

    def _run(self, command: str, what: str) -> None:
        self.ssh.run(command, timeout=self.settings.command_timeout, check=True)
        log.debug("%s: %s ok", self.name, what)

    def _chown_command(self, path: str) -> str | None:
        owner, group = self.settings.owner, self.settings.group
        if owner is None and group is None:
            return None
        if owner is None:
            return f"chgrp {shlex.quote(str(group))} {shlex.quote(path)}"
        return f"chown {shlex.quote(owner + (':' + group if group else ''))} {shlex.quote(path)}"

    def _fail(self, what: str, exc: Exception, restored: str) -> PermanentDeployError | DeployError:
        detail = exc.stderr if isinstance(exc, RemoteCommandError) else str(exc).removeprefix(f"{self.name}: ")
        text = f"{self.name}: {what} failed on {self.ssh.where}; {restored}: {trim_output(detail)}"
        return DeployError(text) if isinstance(exc, SshUnavailableError) else PermanentDeployError(text)

    # the Deployer role ----------------------------------------------------------------------------
    def current(self) -> str | None:
        """A bundle file holds no leaf certificate: None, and ``deploy`` decides by the file's content."""
        return None

    @_named
    def deploy(self, bundle: DeployBundle) -> Receipt:
        """Write the bundle of the CA that issued ``bundle``'s certificate, unless the file holds it already."""
        wanted = self._bundles(bundle.fingerprint)
        path, backup = self.path, self.path + BACKUP_SUFFIX
        for each in (path, backup):
            self.ssh.regular_file(each)  # RemotePathError for a symbolic link or a directory
        self.ssh.remove_stale_temporaries(path)
        held = self._digest(path)
        if held == wanted.sha256:
            log.info("%s: %s on %s already holds %s", self.name, path, self.ssh.where, wanted.describe())
            return Receipt(self.name, self.kind, bundle.fingerprint, None,
                           {"path": path, "changed": False, "sha256": wanted.sha256, "ca": wanted.ca})
        if held is not None:
            self.ssh.copy(path, backup)
        temporary = self.ssh.upload_temporary(path, wanted.pem, self.settings.file_mode)
        chown = self._chown_command(temporary)
        try:
            if chown:
                self._run(chown, "chown")
        except Exception as exc:  # noqa: BLE001 - nothing was replaced yet: drop the upload, report
            self.ssh._discard(temporary)  # noqa: SLF001 - same connector package
            raise self._fail("setting the owner", exc, f"{path} was not changed") from None
        self.ssh.commit(temporary, path)
        if self.settings.reload_command:
            try:
                self._run(self.settings.reload_command, "reload")
            except Exception as exc:  # noqa: BLE001 - restore, then report both ways precisely
                raise self._restore_after(exc, held is not None) from None
        log.info("%s: wrote %s to %s:%s", self.name, wanted.describe(), self.ssh.where, path)
        return Receipt(self.name, self.kind, bundle.fingerprint, None,
                       {"path": path, "changed": True, "sha256": wanted.sha256, "ca": wanted.ca,
                        "previous_sha256": held, "backup": backup if held is not None else None})

    def _restore_after(self, exc: Exception, had_previous: bool) -> Exception:
        try:
            if had_previous:
                self.ssh.copy(self.path + BACKUP_SUFFIX, self.path)
            else:
                self.ssh.remove(self.path)
            if self.settings.reload_command:
                self.ssh.run(self.settings.reload_command, timeout=self.settings.command_timeout)
        except Exception as restore_exc:  # noqa: BLE001 - the operator must hear about both
            return self._fail("the reload", exc, f"RESTORING THE PREVIOUS FILE ALSO FAILED "
                                                 f"({trim_output(str(restore_exc))}); the previous bundle is at "
                                                 f"{self.path}{BACKUP_SUFFIX}")
        return self._fail("the reload", exc, "the previous bundle was restored" if had_previous
                          else "the new file was removed (there was none before)")

    @_named
    def verify(self, fingerprint: str) -> Verification:
        """Read the file back: its SHA-256 must be that of the bundle that goes with ``fingerprint``."""
        wanted = self._bundles(fingerprint)
        held = self._digest(self.path)
        if held != wanted.sha256:
            raise VerificationError(self.name, wanted.sha256, held,
                                    f"{self.path} on {self.ssh.where} " + ("does not exist" if held is None else
                                                                           f"does not hold {wanted.describe()}"))
        return Verification(self.name, fingerprint, "read-back",
                            f"{self.path} on {self.ssh.where} holds {wanted.describe()}")

    @_named
    def rollback(self, receipt: Receipt) -> None:
        """Put back the file the receipt's deploy replaced (nothing when it changed nothing), and reload."""
        undo = receipt.undo
        if not undo.get("changed"):
            return
        previous = undo.get("previous_sha256")
        if previous is None:
            self.ssh.remove(self.path)  # there was no bundle before this deploy
        else:
            backup = str(undo["backup"])
            if self._digest(backup) != previous:
                raise PermanentDeployError(f"{self.name}: {backup} on {self.ssh.where} no longer holds the previous "
                                           f"bundle (sha256 {str(previous)[:16]}; a later deploy replaced it): not "
                                           "rolled back")
            self.ssh.copy(backup, self.path)
        if self.settings.reload_command:
            try:
                self._run(self.settings.reload_command, "reload")
            except Exception as exc:  # noqa: BLE001
                raise self._fail("rollback", exc, "the previous bundle is in place but the reload failed") from None
        log.info("%s: rolled back %s on %s", self.name, self.path, self.ssh.where)

    @_named
    def remove(self) -> Removal:
        """Move the bundle aside (restorable) and run remove_command."""
        retired = self.path + RETIRED_SUFFIX
        for each in (self.path, retired):
            self.ssh.regular_file(each)
        self.ssh.remove_stale_temporaries(self.path)
        moved: dict[str, str] = {}
        if self.ssh.regular_file(self.path) is not None:
            self.ssh.move(self.path, retired)
            moved[self.path] = retired
        elif self.ssh.regular_file(retired) is not None:
            moved[self.path] = retired  # moved by an earlier call
        notes = []
        if self.settings.remove_command:
            self._run(self.settings.remove_command, "remove command")
            notes.append("its remove_command ran")
        return Removal(self.name, self.kind, None, {"files": moved}, None, "; ".join(notes))

    @_named
    def restore(self, removal: Removal) -> str:
        """Move the bundle back and run restore_command (default: reload_command)."""
        files = {str(k): str(v) for k, v in dict(removal.undo.get("files") or {}).items()}
        moved = 0
        for path, retired in files.items():
            if self.ssh.regular_file(retired) is not None:
                if self.ssh.regular_file(path) is not None:
                    raise PermanentDeployError(f"{self.name}: both {path} and its retired copy {retired} exist on "
                                               f"{self.ssh.where}: not overwritten; move one of them aside")
                self.ssh.move(retired, path)
                moved += 1
        command = self.settings.restore_command or self.settings.reload_command
        if command:
            self._run(command, "restore command")
        return f"{moved} file(s) moved back" + (", its command ran" if command else "")

    @_named
    def purge(self, removal: Removal) -> None:
        """Delete the retired copy (and, with remove_previous, the previous one)."""
        for path, retired in dict(removal.undo.get("files") or {}).items():
            self.ssh.regular_file(str(retired))
            self.ssh.remove(str(retired))
            if self.settings.remove_previous:
                self.ssh.remove(str(path) + BACKUP_SUFFIX)
