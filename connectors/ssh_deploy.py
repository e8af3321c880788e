"""Deployers (certpilot.deployment's Deployer role) to servers reached over SSH: nginx and haproxy.

Both work over one SshConnection (connectors.ssh), which may be shared by many targets of the same
host. Files are written with SshConnection.atomic_write semantics: uploaded under a temporary name in
the same directory with their final mode (keys and haproxy's combined PEM 0600) and renamed into place,
so that a dropped connection never leaves a half-written file at a final path. The private key comes
from DeployBundle.key_pem() at the moment it is uploaded, travels only through the SFTP channel (or,
for haproxy's runtime API, the standard input of an SSH command channel), and is never logged, put in
an error or kept in the Receipt.

Symbolic links: a deploy or a rollback refuses (RemotePathError, a PermanentDeployError naming the path and
where the link points) when certificate_path, key_path, pem_path or a backup is a symbolic link, before
anything is written: following it would copy whatever file the SSH user can read into a backup, or into
the served files on a restore. Name the files themselves.

Backups: before a deploy, each file that exists is copied to ``<path>.certpilot-previous`` (the key's
and the PEM's copy 0600). That pair is what a failed deploy restores at once and what ``rollback``
restores later; the Receipt's ``undo`` names the backups and ``previous_fingerprint`` is checked
against the backup before it is restored (a later deploy replaces the backup, so only the latest
deploy's receipt can be rolled back).

Retiring (``remove``, ``restore``, ``purge``): ``remove`` moves the files at the target's paths (the
certificate and key, or the PEM) to ``<path>.certpilot-retired`` (same directory, same mode: a rename),
drops temporary uploads left there, runs ``remove_command`` if the target has one, and then looks on the
wire: the Removal says whether the endpoint still serves the removed certificate. Without a
``remove_command`` no server is reloaded, on purpose: the server's configuration still names the files,
so ``nginx -t`` fails and nginx refuses a reload (it keeps serving the certificate from memory) until
the site is taken out of its configuration; the Removal's note says so. haproxy with a runtime socket is
asked to drop the certificate from memory (``del ssl cert``); haproxy 2.6 refuses while a ``bind ...
crt`` line uses it, and the note says that too. ``restore`` moves the files back, runs
``restore_command`` (e.g. a script that enables the site again), then tests and reloads nginx, or hands
haproxy the PEM again (runtime API or reload). ``purge`` deletes the ``.certpilot-retired`` files, and the
``.certpilot-previous`` pair of earlier deploys (what was there before certpilot, or before its last
deploy) only when ``remove_previous`` is true.

Settings (typed models in certpilot.target_kinds, NginxSettings and HaproxySettings, which hold the
keys, defaults and rules; a dict is validated through them). In short, of kind ``ssh-nginx`` (NginxDeployer):
  certificate_path   required; the file nginx's ssl_certificate names: the leaf then its intermediates (PEM)
  key_path           required; the file ssl_certificate_key names (PKCS#8 PEM, written 0600)
  certificate_mode   mode of the certificate file, default "0644" (a string of octal digits, or an int)
  test_command       run before reloading, default "nginx -t"; a non-zero exit fails the deploy and
                     restores the previous pair (``nginx -s reload`` exits 0 even when the new
                     configuration fails to load, so it cannot be the test)
  reload_command     default "nginx -s reload"; in the lab "nginx -p PREFIX -c CONF -s reload"
  command_timeout    seconds for each command, default 60
Settings of kind ``ssh-haproxy`` (HaproxyDeployer):
  pem_path           required; the file a ``crt`` names: leaf, intermediates, then the key (written 0600);
                     for the runtime API it must be the name haproxy knows it by (``show ssl cert``); it is
                     sent backslash-escaped (spaces work); a ';' or a control character is refused, since
                     the runtime API would read what follows as another command
  runtime_socket     path on the host of a stats socket with ``level admin``: the certificate is swapped in
                     memory with ``set ssl cert`` / ``commit ssl cert`` (no reload, no dropped connection)
  runtime_client     how the socket is reached from the SSH session: "auto" (default: socat when the host
                     has it, else python3), "socat" or "python3"; the PEM goes on the client's stdin.
                     A socket path with a character socat reads as address syntax (,:!"'\\()[]{}) is
                     reached with python3 ("auto") or refused ("socat"); control characters are refused
  reload_command     used instead of the runtime API when no runtime_socket is given (e.g.
                     "systemctl reload haproxy"); one of the two is required
  command_timeout    seconds for each command, default 60
Settings of both kinds:
  verify_host        where to handshake for verify(), default the SSH host's address
  verify_port        default 443
  verify_sni         server name to send, default none
  verify_hostname    name the leaf must match, default verify_sni (none: no name check)
  verify_trust       PEM text of CA certificates the chain must lead to (default: the chain must be complete);
                     ``trust_pem`` is accepted as another name for it
  verify_timeout     seconds to wait until the new certificate is served consistently, default 10
  verify_consecutive handshakes in a row that must show it, default 5
  remove_previous    purge() also deletes the .certpilot-previous backups, default false
  remove_command     run by remove() after the files are moved aside, default none (nothing is reloaded)
  restore_command    run by restore() after the files are back, before the test and reload, default none
"""

from __future__ import annotations

import functools
import logging
import shlex
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from cryptography import x509

from certpilot import checkpoints
from certpilot.deployment import (DeployBundle, DeployError, PermanentDeployError, Receipt, Removal, Verification,
                                  fingerprint)
from certpilot.errors import ParseError
from certpilot.formats import load_bundle
from certpilot.target_kinds import HaproxySettings, NginxSettings, SshSettings, TargetKind, validate_settings
from connectors.ssh import RemoteCommandError, SshConnection, SshError, SshUnavailableError, trim_output
from connectors.tls_verify import TlsProbeError, fetch_chain, wait_until_served

__all__ = ["BACKUP_SUFFIX", "RETIRED_SUFFIX", "HaproxyDeployer", "NginxDeployer"]

log = logging.getLogger(__name__)

BACKUP_SUFFIX = ".certpilot-previous"
RETIRED_SUFFIX = ".certpilot-retired"  # where remove() keeps the files it took off, until purge()
MAX_CERTIFICATE_FILE = 1024 * 1024


_R = TypeVar("_R")
_INSTANCE_LOCKS: dict[tuple[str, str], threading.RLock] = {}  # (SSH host, server instance) -> its lock
_INSTANCE_LOCKS_GUARD = threading.Lock()


def _instance_lock(where: str, instance: str) -> threading.RLock:
    """The lock that serialises this process's changes to one server instance on one host (an nginx by its
    reload command, a haproxy by its stats socket), whichever deployer or SSH connection makes them.
    Several certificates of one instance are deployed at once by a fleet run; one instance takes one
    change at a time: nginx's configuration test and reload read every site's files, so another site's
    swap half done (its new key beside its old certificate) would fail them; haproxy keeps one
    certificate transaction for the whole process."""
    with _INSTANCE_LOCKS_GUARD:
        return _INSTANCE_LOCKS.setdefault((where, instance), threading.RLock())


def _one_at_a_time(method: Callable[..., _R]) -> Callable[..., _R]:
    """A deployer's change (files, test, reload or runtime swap) holds its instance's lock (``_instance_lock``)."""

    @functools.wraps(method)
    def wrapper(self: _SshDeployer, *args: Any, **kwargs: Any) -> _R:
        with _instance_lock(self.ssh.where, self.instance):
            return method(self, *args, **kwargs)

    return wrapper


def _named(method: Callable[..., _R]) -> Callable[..., _R]:
    """Errors of the SSH connection, raised out of a deployer's method, name its target."""

    @functools.wraps(method)
    def wrapper(self: _SshDeployer, *args: Any, **kwargs: Any) -> _R:
        try:
            return method(self, *args, **kwargs)
        except SshError as exc:
            raise exc.for_target(self.name) from None

    return wrapper


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    sni: str | None
    hostname: str | None
    trust: tuple[x509.Certificate, ...]
    timeout: float
    consecutive: int


class _SshDeployer:
    kind: TargetKind
    instance: str  # the server instance on the host that the target is part of (see _instance_lock)

    def __init__(self, name: str, connection: SshConnection, settings: SshSettings | Mapping[str, Any]) -> None:
        self.name = name
        self.ssh = connection
        self.settings = cast(SshSettings, validate_settings(self.kind, settings, name))
        self.command_timeout = self.settings.command_timeout
        self.endpoint = self._endpoint(self.settings)

    def close(self) -> None:
        """Close the SSH connection (shared by deployers built from one block object)."""
        self.ssh.close()

    def _endpoint(self, settings: SshSettings) -> Endpoint:
        sni = settings.verify_sni or None
        return Endpoint(settings.verify_host or self.ssh.address, settings.verify_port, sni,
                        settings.verify_hostname or sni, settings.trust(), settings.verify_timeout,
                        settings.verify_consecutive)

    # the Deployer role, common parts -----------------------------------------------------------------
    def verify(self, fingerprint: str) -> Verification:
        """Handshake on the wire until ``fingerprint`` is served consistently, with a complete chain and
        a matching name (connectors.tls_verify.wait_until_served)."""
        e = self.endpoint
        return wait_until_served(e.host, e.port, fingerprint, target=self.name, sni=e.sni, hostname=e.hostname,
                                 trust=e.trust, consecutive=e.consecutive, timeout=e.timeout)

    # helpers ----------------------------------------------------------------------------------------
    def _fingerprint_of(self, path: str) -> tuple[bytes | None, str | None]:
        """(the file's bytes, the SHA-256 of its first certificate) or (None, None) when it does not exist.
        The bytes may hold a key (haproxy's PEM): callers drop them as soon as they are done."""
        if self.ssh.stat(path) is None:
            return None, None
        data = self.ssh.read_file(path, max_bytes=MAX_CERTIFICATE_FILE)
        try:
            certificates = load_bundle(data, source=path).certificates
        except ParseError:
            return data, None
        return data, fingerprint(certificates[0]) if certificates else None

    def _run(self, command: str, what: str) -> None:
        """Run a configured command; a non-zero exit is a RemoteCommandError."""
        self.ssh.run(command, timeout=self.command_timeout, check=True)
        log.debug("%s: %s ok", self.name, what)

    def _refuse_links(self, paths: list[str]) -> None:
        """RemotePathError for the first of ``paths`` that is a symbolic link or not a regular file."""
        for path in paths:
            self.ssh.regular_file(path)

    # retiring ---------------------------------------------------------------------------------------
    def _move_aside(self, paths: list[str], certificate_path: str) -> tuple[dict[str, str], str | None]:
        """Move each of ``paths`` to its retired name (a file moved by an earlier call counts as moved).
        The moves by path, and the fingerprint of the certificate in ``certificate_path`` (or in its
        retired copy, when an earlier call moved it)."""
        retired = {path: path + RETIRED_SUFFIX for path in paths}
        self._refuse_links([*paths, *retired.values()])
        _, held = self._fingerprint_of(certificate_path)
        if held is None:
            _, held = self._fingerprint_of(retired[certificate_path])
        moved: dict[str, str] = {}
        for path, backup in retired.items():
            self.ssh.remove_stale_temporaries(path)
            if self.ssh.regular_file(path) is not None:
                self.ssh.move(path, backup)
                moved[path] = backup
            elif self.ssh.regular_file(backup) is not None:
                moved[path] = backup
        return moved, held

    def _served_now(self, fingerprint: str | None, *, wait: bool) -> bool | None:
        """Whether the endpoint serves ``fingerprint`` now: one handshake, or with ``wait`` handshakes until
        it stops, for at most verify_timeout (a reload lets old workers finish). None: nothing to look for."""
        if fingerprint is None:
            return None
        e = self.endpoint
        deadline = time.monotonic() + (e.timeout if wait else 0.0)
        while True:
            try:
                served = fetch_chain(e.host, e.port, sni=e.sni, timeout=min(e.timeout, 5.0)).fingerprint == fingerprint
            except TlsProbeError:
                served = False
            if not served or time.monotonic() >= deadline:
                return served
            time.sleep(0.1)

    def _where_served(self, served: bool | None) -> str:
        e = self.endpoint
        place = f"{e.host}:{e.port}" + (f" (sni {e.sni})" if e.sni else "")
        return "" if served is None else f"{place} {'still serves' if served else 'no longer serves'} it"

    def _removal(self, moved: dict[str, str], held: str | None, served: bool | None, notes: list[str],
                 **undo: Any) -> Removal:
        seen = self._where_served(served)
        note = "; ".join([*([seen] if seen else []), *notes])
        log.info("%s: moved %s aside on %s%s", self.name, ", ".join(moved) or "nothing", self.ssh.where,
                 f" ({note})" if note else "")
        return Removal(self.name, self.kind, held, {"files": moved, **undo}, served, note)

    def _put_back(self, removal: Removal) -> int:
        """Move the files ``removal`` kept back to their paths; how many were moved (a file moved back
        before counts as back). Refuses to overwrite a file that came back some other way."""
        files = {str(k): str(v) for k, v in dict(removal.undo.get("files") or {}).items()}
        self._refuse_links([*files, *files.values()])
        moved = 0
        for path, backup in files.items():
            if self.ssh.regular_file(backup) is not None:
                if self.ssh.regular_file(path) is not None:
                    raise PermanentDeployError(f"{self.name}: both {path} and its retired copy {backup} exist on "
                                               f"{self.ssh.where}: not overwritten; move one of them aside")
                self.ssh.move(backup, path)
                moved += 1
            elif self.ssh.regular_file(path) is None:
                raise PermanentDeployError(f"{self.name}: neither {path} nor its retired copy {backup} exists on "
                                           f"{self.ssh.where}: nothing to restore (purged?)")
        return moved

    @_named
    def purge(self, removal: Removal) -> None:
        """Delete the retired copies (and, with remove_previous, the .certpilot-previous ones)."""
        files = {str(k): str(v) for k, v in dict(removal.undo.get("files") or {}).items()}
        self._refuse_links(list(files.values()))
        for path, backup in files.items():
            self.ssh.remove(backup)
            if self.settings.remove_previous:
                self.ssh.remove(path + BACKUP_SUFFIX)
        log.info("%s: purged %s on %s", self.name, ", ".join(files.values()) or "nothing", self.ssh.where)

    def _fail(self, what: str, exc: Exception, restored: str) -> PermanentDeployError | DeployError:
        """The error of a failed step, after the previous state was restored (``restored`` says how)."""
        detail = exc.stderr if isinstance(exc, RemoteCommandError) else str(exc).removeprefix(f"{self.name}: ")
        text = f"{self.name}: {what} failed on {self.ssh.where}; {restored}: {trim_output(detail)}"
        return DeployError(text) if isinstance(exc, SshUnavailableError) else PermanentDeployError(text)


class NginxDeployer(_SshDeployer):
    """An nginx site on an SSH host: certificate and key files, test, reload, verify on the wire."""

    kind = TargetKind.SSH_NGINX

    def __init__(self, name: str, connection: SshConnection, settings: NginxSettings | Mapping[str, Any]) -> None:
        super().__init__(name, connection, settings)
        nginx = cast(NginxSettings, self.settings)
        self.certificate_path = nginx.certificate_path
        self.key_path = nginx.key_path
        self.certificate_mode = nginx.file_mode
        self.test_command = nginx.test_command
        self.reload_command = nginx.reload_command
        self.instance = nginx.reload_command  # the nginx this site belongs to: one per reload command and host

    @_named
    def current(self) -> str | None:
        """SHA-256 of the first certificate in certificate_path on the host (None: no such file)."""
        data, fp = self._fingerprint_of(self.certificate_path)
        if data is not None and fp is None:
            raise PermanentDeployError(f"{self.name}: {self.certificate_path} on {self.ssh.where} holds no "
                                       "readable certificate")
        return fp

    @_named
    @_one_at_a_time
    def deploy(self, bundle: DeployBundle) -> Receipt:
        ssh, cert_path, key_path = self.ssh, self.certificate_path, self.key_path
        self._refuse_links([cert_path, key_path, cert_path + BACKUP_SUFFIX, key_path + BACKUP_SUFFIX])
        for path in (cert_path, key_path):
            ssh.remove_stale_temporaries(path)
        old, previous = self._fingerprint_of(cert_path)
        del old
        # Each file that exists is copied aside; a failed deploy puts back exactly those and removes the others.
        kept = {path: self._keep(path, mode) for path, mode in ((cert_path, None), (key_path, 0o600))}
        had_previous = previous is not None and all(kept.values())
        key_pem = bundle.key_pem()
        try:
            key_temporary = ssh.upload_temporary(key_path, key_pem, 0o600)
        finally:
            del key_pem
        try:
            cert_temporary = ssh.upload_temporary(cert_path, bundle.fullchain_pem(), self.certificate_mode)
        except Exception:
            ssh._discard(key_temporary)  # noqa: SLF001 - same connector package
            raise
        try:
            ssh.commit(key_temporary, key_path)
        except Exception:
            ssh._discard(cert_temporary)  # noqa: SLF001
            raise
        try:
            ssh.commit(cert_temporary, cert_path)
        except Exception as exc:  # noqa: BLE001 - the key is new already: put it back, then report
            raise self._restore_after(exc, "replacing the certificate file", kept, reload=False) from None
        checkpoints.reached(checkpoints.Point.UPLOADED, self.name)
        try:
            self._run(self.test_command, "configuration test")
        except Exception as exc:  # noqa: BLE001 - every failure restores, then is reported precisely
            raise self._restore_after(exc, "the configuration test", kept, reload=False) from None
        checkpoints.reached(checkpoints.Point.RELOADING, self.name)
        try:
            self._run(self.reload_command, "reload")
        except Exception as exc:  # noqa: BLE001
            raise self._restore_after(exc, "the reload", kept, reload=True) from None
        checkpoints.reached(checkpoints.Point.RELOADED, self.name)
        log.info("%s: deployed %s to %s:%s", self.name, bundle.fingerprint[:16], ssh.where, cert_path)
        undo = {"certificate_path": cert_path, "key_path": key_path, "had_previous": had_previous,
                "certificate_backup": cert_path + BACKUP_SUFFIX if had_previous else None,
                "key_backup": key_path + BACKUP_SUFFIX if had_previous else None}
        return Receipt(self.name, self.kind, bundle.fingerprint, previous, undo)

    def _keep(self, path: str, mode: int | None) -> bool:
        """Copy ``path`` to its backup name if it exists (``mode``: the copy's mode, default the file's)."""
        if self.ssh.regular_file(path) is None:
            return False
        self.ssh.copy(path, path + BACKUP_SUFFIX, mode=mode)
        return True

    def _restore_after(self, exc: Exception, what: str, kept: dict[str, bool], *, reload: bool) -> Exception:
        try:
            for path, was_there in kept.items():
                if was_there:
                    self.ssh.copy(path + BACKUP_SUFFIX, path, mode=0o600 if path == self.key_path else None)
                else:
                    self.ssh.remove(path)
            if reload:
                self.ssh.run(self.reload_command, timeout=self.command_timeout)
        except Exception as restore_exc:  # noqa: BLE001 - the operator must hear about both
            return self._fail(what, exc, f"RESTORING THE PREVIOUS FILES ALSO FAILED "
                                         f"({trim_output(str(restore_exc))}), backups are at "
                                         f"{self.certificate_path}{BACKUP_SUFFIX} and {self.key_path}{BACKUP_SUFFIX}")
        if all(kept.values()):
            restored = "the previous certificate and key were restored"
        elif any(kept.values()):
            restored = "the previous files were restored and the new ones without a predecessor removed"
        else:
            restored = "the new files were removed (there were none before)"
        return self._fail(what, exc, restored)

    @_named
    @_one_at_a_time
    def rollback(self, receipt: Receipt) -> None:
        """Put back the pair the receipt's deploy replaced, test, reload."""
        undo = receipt.undo
        if not undo.get("had_previous"):
            raise PermanentDeployError(f"{self.name}: there was no certificate at {self.certificate_path} before "
                                       f"{receipt.fingerprint[:16]} was deployed: nothing to roll back to "
                                       "(remove() retires it)")
        backup = str(undo["certificate_backup"])
        self._refuse_links([backup, str(undo["key_backup"]), self.certificate_path, self.key_path])
        _, in_backup = self._fingerprint_of(backup)
        if receipt.previous_fingerprint and in_backup != receipt.previous_fingerprint:
            raise PermanentDeployError(f"{self.name}: {backup} holds {(in_backup or 'no certificate')[:16]}, not the "
                                       f"previous certificate {receipt.previous_fingerprint[:16]} (a later deploy "
                                       "replaced the backup); not rolled back")
        self.ssh.copy(str(undo["key_backup"]), self.key_path, mode=0o600)
        self.ssh.copy(backup, self.certificate_path)
        try:
            self._run(self.test_command, "configuration test")
            self._run(self.reload_command, "reload")
        except Exception as exc:  # noqa: BLE001
            raise self._fail("rollback", exc, "the previous pair is in place but nginx did not take it") from None
        log.info("%s: rolled back to %s on %s", self.name, (receipt.previous_fingerprint or "?")[:16], self.ssh.where)

    @_named
    @_one_at_a_time
    def remove(self) -> Removal:
        """Move the certificate and key files aside; nginx is reloaded only by a remove_command."""
        moved, held = self._move_aside([self.certificate_path, self.key_path], self.certificate_path)
        command = self.settings.remove_command
        if command:
            self._run(command, "remove command")
            notes = ["its remove_command ran"]
        else:
            notes = [f"nginx was not reloaded: its configuration still names {self.certificate_path} and "
                     f"{self.key_path}, so `nginx -t` fails and nginx refuses a reload (serving the certificate "
                     "from memory meanwhile) until the site is taken out of its configuration, which a "
                     "remove_command on the target can do"]
        return self._removal(moved, held, self._served_now(held, wait=bool(command)), notes)

    @_named
    @_one_at_a_time
    def restore(self, removal: Removal) -> str:
        """Move the files back, run restore_command, test and reload nginx."""
        moved = self._put_back(removal)
        try:
            if self.settings.restore_command:
                self._run(self.settings.restore_command, "restore command")
            self._run(self.test_command, "configuration test")
            self._run(self.reload_command, "reload")
        except Exception as exc:  # noqa: BLE001
            raise self._fail("restore", exc, "the files are back but nginx did not take them") from None
        log.info("%s: restored %s on %s", self.name, (removal.fingerprint or "?")[:16], self.ssh.where)
        return f"{moved} file(s) moved back, nginx tested and reloaded"


_LOCKED = "Operations on certificates are currently locked"  # another client's operation is under way
def _other_transaction(answer: str, path: str) -> str | None:
    """The file of another transaction that haproxy says it put our ``set ssl cert`` into, if any."""
    for marker in ("Transaction updated for certificate ", "Transaction created for certificate "):
        if marker in answer:
            named = answer.split(marker, 1)[1].split("\n", 1)[0].strip().rstrip("!").strip()
            return named if named and named != path else None
    return None


class HaproxyDeployer(_SshDeployer):
    """A haproxy ``crt`` on an SSH host: one PEM file, swapped in memory through the runtime API."""

    kind = TargetKind.SSH_HAPROXY

    def __init__(self, name: str, connection: SshConnection, settings: HaproxySettings | Mapping[str, Any]) -> None:
        super().__init__(name, connection, settings)
        haproxy = cast(HaproxySettings, self.settings)
        self.pem_path = haproxy.pem_path
        self.runtime_socket = haproxy.runtime_socket or None
        self.runtime_client = haproxy.runtime_client
        self.reload_command = haproxy.reload_command or None
        self.instance = self.runtime_socket or str(self.reload_command)  # the haproxy this crt belongs to
        self._cert_argument = _runtime_argument(self.pem_path, "pem_path", name)
        if self.runtime_socket:
            _refuse_control_characters(self.runtime_socket, "runtime_socket", name)
            if self.runtime_client == "socat" and not _socat_can_take(self.runtime_socket):
                raise PermanentDeployError(f"{name}: runtime_socket {self.runtime_socket!r} holds one of "
                                           f"{_SOCAT_SPECIAL!r}, which socat reads as address syntax: use "
                                           "runtime_client \"python3\" or \"auto\"")

    @_named
    def current(self) -> str | None:
        """SHA-256 of the first certificate in pem_path on the host (None: no such file)."""
        data, fp = self._fingerprint_of(self.pem_path)
        if data is not None and fp is None:
            raise PermanentDeployError(f"{self.name}: {self.pem_path} on {self.ssh.where} holds no readable "
                                       "certificate")
        del data
        return fp

    @_named
    @_one_at_a_time
    def deploy(self, bundle: DeployBundle) -> Receipt:
        ssh, path = self.ssh, self.pem_path
        self._refuse_links([path, path + BACKUP_SUFFIX])
        ssh.remove_stale_temporaries(path)
        old, previous = self._fingerprint_of(path)
        had_previous = old is not None
        del old
        if had_previous:
            ssh.copy(path, path + BACKUP_SUFFIX, mode=0o600)
        key_pem = bundle.key_pem()
        try:
            payload = _pem_payload(bundle.fullchain_pem() + key_pem)
        finally:
            del key_pem
        try:
            ssh.atomic_write(path, payload, 0o600)
            checkpoints.reached(checkpoints.Point.UPLOADED, self.name)
            checkpoints.reached(checkpoints.Point.RELOADING, self.name)
            try:
                self._apply(payload, "deploy")
            except Exception as exc:  # noqa: BLE001 - restore the file, then report precisely
                raise self._restore_after(exc, had_previous) from None
            checkpoints.reached(checkpoints.Point.RELOADED, self.name)
        finally:
            del payload
        log.info("%s: deployed %s to %s:%s", self.name, bundle.fingerprint[:16], ssh.where, path)
        undo = {"pem_path": path, "had_previous": had_previous,
                "pem_backup": path + BACKUP_SUFFIX if had_previous else None,
                "method": "runtime-api" if self.runtime_socket else "reload"}
        return Receipt(self.name, self.kind, bundle.fingerprint, previous, undo)

    def _restore_after(self, exc: Exception, had_previous: bool) -> Exception:
        what = "the runtime API swap" if self.runtime_socket else "the reload"
        try:
            if had_previous:
                self.ssh.copy(self.pem_path + BACKUP_SUFFIX, self.pem_path, mode=0o600)
            else:
                self.ssh.remove(self.pem_path)
        except Exception as restore_exc:  # noqa: BLE001
            return self._fail(what, exc, f"RESTORING {self.pem_path} ALSO FAILED ({trim_output(str(restore_exc))}), "
                                         f"the backup is {self.pem_path}{BACKUP_SUFFIX}")
        restored = ("haproxy still serves the previous certificate and its file was restored" if had_previous
                    else "the new file was removed")
        return self._fail(what, exc, restored)

    def _apply(self, payload: bytes, why: str) -> None:
        """Make haproxy serve ``payload``: the runtime API (set, commit; abort on any failure) or a reload.

        haproxy keeps ONE certificate transaction for the whole process: a second client's ``set ssl cert``
        while one is open is refused ("currently locked") or, in 2.6, taken into the open transaction of
        another file ("Transaction updated for certificate <other>"), whose commit would then serve this
        payload under the other file. So this process changes one certificate at a time per haproxy instance
        (its callers hold ``_instance_lock``), waits while another client holds haproxy's lock, and aborts a
        transaction that turns out to be another file's instead of letting it be committed."""
        if not self.runtime_socket:
            self._run(str(self.reload_command), "reload")
            return
        deadline = time.monotonic() + self.command_timeout
        while True:
            answer = self._runtime(f"set ssl cert {self._cert_argument} <<\n".encode() + payload + b"\n")
            other = _other_transaction(answer, self.pem_path)
            if other is not None:  # our payload went into another client's transaction: never commit that
                self._abort(other)
            if (_LOCKED not in answer and other is None) or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        if other is not None or ("Transaction created" not in answer and "Transaction updated" not in answer):
            self._abort()
            raise PermanentDeployError(f"{self.name}: haproxy refused `set ssl cert {self.pem_path}` ({why}): "
                                       f"{trim_output(answer) or 'no answer'}")
        answer = self._runtime(f"commit ssl cert {self._cert_argument}\n".encode())
        if "Success!" not in answer:
            self._abort()
            raise PermanentDeployError(f"{self.name}: haproxy refused `commit ssl cert {self.pem_path}` ({why}): "
                                       f"{trim_output(answer) or 'no answer'}")

    def _abort(self, path: str | None = None) -> None:
        """Abort the open certificate transaction of ``path`` (default: this target's file)."""
        try:
            argument = self._cert_argument if path is None else _runtime_argument(path, "pem_path", self.name)
            self._runtime(f"abort ssl cert {argument}\n".encode())
        except Exception:  # noqa: BLE001 - the transaction may not exist; the caller reports the real failure
            log.debug("%s: abort ssl cert %s failed", self.name, path or self.pem_path)

    def _runtime(self, request: bytes) -> str:
        """Send ``request`` to the stats socket through the SSH host (on stdin); haproxy's answer."""
        result = self.ssh.run(self._runtime_command(), stdin=request, timeout=self.command_timeout)
        if result.status != 0:
            raise RemoteCommandError(self.ssh.where, f"runtime API client for {self.runtime_socket}", result.status,
                                     result.error_text)
        return result.stdout.decode(errors="replace")

    def _runtime_command(self) -> str:
        socket_path = str(self.runtime_socket)
        socat = f"socat -t 10 -T 30 - {shlex.quote('UNIX-CONNECT:' + socket_path)}"
        python = f"python3 -c {shlex.quote(_PY_SOCKET_CLIENT)} {shlex.quote(socket_path)}"
        if self.runtime_client == "socat":
            return socat
        if self.runtime_client == "python3" or not _socat_can_take(socket_path):
            return python
        return f"if command -v socat >/dev/null 2>&1; then exec {socat}; else exec {python}; fi"

    @_named
    @_one_at_a_time
    def rollback(self, receipt: Receipt) -> None:
        """Serve the receipt's previous certificate again (runtime API or reload) and restore the file."""
        undo = receipt.undo
        if not undo.get("had_previous"):
            raise PermanentDeployError(f"{self.name}: there was no {self.pem_path} before {receipt.fingerprint[:16]} "
                                       "was deployed: nothing to roll back to (remove() retires it)")
        backup = str(undo["pem_backup"])
        self._refuse_links([backup, self.pem_path])
        data, in_backup = self._fingerprint_of(backup)
        try:
            if data is None or (receipt.previous_fingerprint and in_backup != receipt.previous_fingerprint):
                raise PermanentDeployError(f"{self.name}: {backup} holds {(in_backup or 'no certificate')[:16]}, not "
                                           f"the previous certificate {(receipt.previous_fingerprint or '?')[:16]}; "
                                           "not rolled back")
            payload = _pem_payload(data)
            self.ssh.atomic_write(self.pem_path, payload, 0o600)
            try:
                self._apply(payload, "rollback")
            except Exception as exc:  # noqa: BLE001
                raise self._fail("rollback", exc, f"{self.pem_path} holds the previous certificate but haproxy "
                                                  "did not take it") from None
        finally:
            del data
        log.info("%s: rolled back to %s on %s", self.name, (receipt.previous_fingerprint or "?")[:16], self.ssh.where)

    @_named
    @_one_at_a_time
    def remove(self) -> Removal:
        """Move the PEM aside; ask haproxy to drop the certificate from memory (runtime API), which it
        refuses while a bind line uses it; reload only by a remove_command."""
        moved, held = self._move_aside([self.pem_path], self.pem_path)
        notes: list[str] = []
        dropped = False
        if self.runtime_socket and held is not None:
            try:
                answer = self._runtime(f"del ssl cert {self._cert_argument}\n".encode())
            except RemoteCommandError as exc:
                answer = f"the runtime API client failed: {exc.stderr}"
            # haproxy 2.6: "Certificate '<path>' deleted!", or "Can't remove the certificate: ... in use, can't be
            # deleted!"
            dropped = answer.lstrip().lower().startswith("certificate ") and "deleted!" in answer
            notes.append("haproxy dropped it from memory (runtime API)" if dropped else
                         "haproxy keeps serving it from memory: the runtime API did not drop it "
                         f"({trim_output(answer) or 'no answer'}); a bind line's crt names it, so take it out of "
                         "the configuration and reload")
        command = self.settings.remove_command
        if command:
            self._run(command, "remove command")
            notes.append("its remove_command ran")
        elif not dropped:
            notes.append(f"haproxy was not reloaded: its configuration still names {self.pem_path}, so a reload "
                         "fails until the configuration drops it, which a remove_command on the target can do")
        served = self._served_now(held, wait=bool(command) or dropped)
        return self._removal(moved, held, served, notes, dropped_from_memory=dropped)

    @_named
    @_one_at_a_time
    def restore(self, removal: Removal) -> str:
        """Move the PEM back, run restore_command, and hand it to haproxy again (runtime API or reload)."""
        moved = self._put_back(removal)
        if self.settings.restore_command:
            self._run(self.settings.restore_command, "restore command")
        data, _ = self._fingerprint_of(self.pem_path)
        try:
            if data is None:
                raise PermanentDeployError(f"{self.name}: {self.pem_path} is missing on {self.ssh.where} after "
                                           "the restore")
            payload = _pem_payload(data)
            if self.runtime_socket and removal.undo.get("dropped_from_memory"):
                answer = self._runtime(f"new ssl cert {self._cert_argument}\n".encode())
                if "new empty certificate store" not in answer.lower() and "already exists" not in answer.lower():
                    raise PermanentDeployError(f"{self.name}: haproxy refused `new ssl cert {self.pem_path}`: "
                                               f"{trim_output(answer) or 'no answer'}")
            try:
                self._apply(payload, "restore")
            except Exception as exc:  # noqa: BLE001
                raise self._fail("restore", exc, f"{self.pem_path} is back but haproxy did not take it") from None
        finally:
            del data
        log.info("%s: restored %s on %s", self.name, (removal.fingerprint or "?")[:16], self.ssh.where)
        how = "runtime API" if self.runtime_socket else "reload"
        return f"{moved} file(s) moved back, handed to haproxy ({how})"


# Sent to the stats socket by python3 on the host when socat is missing: stdin in, answer out, 10 s timeout.
_PY_SOCKET_CLIENT = (
    "import socket,sys\n"
    "s=socket.socket(socket.AF_UNIX);s.settimeout(10);s.connect(sys.argv[1])\n"
    "s.sendall(sys.stdin.buffer.read())\n"
    "while True:\n"
    "    c=s.recv(65536)\n"
    "    if not c: break\n"
    "    sys.stdout.buffer.write(c)\n"
)


def _refuse_control_characters(value: str, setting: str, name: str) -> None:
    bad = sorted({ch for ch in value if ord(ch) < 0x20 or ord(ch) == 0x7F})
    if bad:
        raise PermanentDeployError(f"{name}: {setting} {value!r} holds the control character(s) "
                                   f"{', '.join(repr(ch) for ch in bad)}, and a line break would end a command "
                                   "of haproxy's runtime API: refused")


def _runtime_argument(value: str, setting: str, name: str) -> str:
    """``value`` as one argument of a haproxy runtime API command line. haproxy 2.6's CLI ends a command at
    ';' or at the end of the line and splits arguments at spaces and tabs unless a backslash escapes
    them: a ';' or a line break in a path would run a second command, so such values are refused (so are
    other control characters); backslashes and spaces are escaped (checked against the real haproxy)."""
    _refuse_control_characters(value, setting, name)
    if ";" in value:
        raise PermanentDeployError(f"{name}: {setting} {value!r} holds ';', which haproxy's runtime API reads as "
                                   "the start of another command: refused (rename the file)")
    return value.replace("\\", "\\\\").replace(" ", "\\ ")


# socat reads these as address syntax (option lists, dual addresses, quoting) in UNIX-CONNECT:<path>.
_SOCAT_SPECIAL = ",:!\"'\\()[]{}"


def _socat_can_take(socket_path: str) -> bool:
    return not any(ch in _SOCAT_SPECIAL for ch in socket_path)


def _pem_payload(pem: bytes) -> bytes:
    """PEM fit for the runtime API's ``<<`` payload, which ends at the first empty line: no empty lines,
    LF line ends, one final newline."""
    lines = [line for line in pem.replace(b"\r\n", b"\n").split(b"\n") if line.strip()]
    return b"\n".join(lines) + b"\n"
