"""One SSH connection to one host (paramiko), used by the SSH source and the SSH deployers.

Host keys: the connection trusts exactly the ``known_hosts`` text it is given (OpenSSH format, plain or
hashed host names, ``@revoked`` honoured, ``@cert-authority`` lines ignored). The host key is checked
right after the key exchange: a revoked key (even one also listed as known), an unknown one or a changed
one is refused before anything else is sent (the client key is not offered, no command runs):
SshHostKeyError, which names the host, the key type and its SHA256 fingerprint. The client key is given as text: Ed25519, ECDSA
or RSA, in OpenSSH or PEM (traditional or PKCS#8) form, optionally encrypted.

Timeouts: connect, banner and authentication take ``connect_timeout``; every SFTP operation and every
channel read or write ``operation_timeout``; every command its own ``timeout`` (``command_timeout`` by
default), enforced with a deadline, the channel is closed when it passes.

Errors (all name ``user@host:port``, and the path or the command; none holds file contents):
- SshUnavailableError (transient, a DeployError): a timeout or a dropped connection; its subclass
  SshUnreachableError when the host could not be reached at all, with ``host``, ``port`` and ``cause``
  ("dns", "refused", "timeout", "unreachable" or "handshake");
- SshHostKeyError (permanent): known_hosts unreadable, or, as its subclass UntrustedHostKeyError, a host key
  it does not vouch for, with ``host``, ``port``, ``problem`` ("unknown", "changed", "revoked"),
  ``key_type``, the offered ``fingerprint`` and, for a changed key, ``expected_fingerprint``;
- SshAuthError (permanent): the client key was not accepted;
- RemotePathError (permanent): permission denied, no such file or directory, not a regular file, too big;
- RemoteCommandError (permanent): a command exited non-zero (``run(check=True)``), with its trimmed stderr.
They subclass certpilot.deployment's DeployError and PermanentDeployError because the Deployer role
promises those; the source raises the same ones, and discovery treats them as Transient/PermanentError.

Writing files: ``atomic_write(path, data, mode)`` uploads to a hidden temporary name in the same
directory (``.<name>.certpilot-tmp-<random>``), created with its final mode in the SFTP open request
itself (never with the server's default mode, not even for an instant: a descriptor opened then would
outlive a later chmod), then ``posix_rename``s it over the final path (a plain SFTP rename fails when the
target exists). ``upload_temporary`` + ``commit`` do the same in two steps, so that several files can be
uploaded first and then renamed in quick succession. If the connection drops mid-upload the final path
is untouched; the temporary file is removed when the connection still allows it, and is otherwise left
for ``remove_stale_temporaries`` (discovery ignores such names).

One connection is opened lazily, kept, and reused for every operation; SFTP calls are serialised by a
lock, commands run on their own channels. After a drop, the next operation reconnects.
"""

from __future__ import annotations

import base64
import binascii
import errno
import fnmatch
import hashlib
import io
import logging
import posixpath
import re
import secrets
import socket
import stat as stat_module
import threading
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from paramiko.hostkeys import HostKeyEntry
from paramiko.sftp import CMD_HANDLE, CMD_OPEN, SFTP_FLAG_CREATE, SFTP_FLAG_EXCL, SFTP_FLAG_TRUNC, SFTP_FLAG_WRITE

from certpilot.deployment import DeployError, PermanentDeployError
from certpilot.errors import EndpointUnreachableError

__all__ = ["CommandResult", "GlobResult", "RemoteCommandError", "RemotePathError", "SshAuthError", "SshError",
           "SshConnection", "SshHostKeyError", "SshUnavailableError", "SshUnreachableError", "TEMP_MARKER",
           "UntrustedHostKeyError", "is_temporary", "parse_known_hosts", "trim_output"]

log = logging.getLogger(__name__)

TEMP_MARKER = ".certpilot-tmp-"
_CHUNK = 32 * 1024
_MAX_OUTPUT = 1024 * 1024


class SshError(Exception):
    """What every SSH error carries: where (``user@host:port``), and the target it happened for, if any."""

    where: str
    target: str | None = None
    _args: tuple[Any, ...] = ()

    def __init__(self, *args: Any, target: str | None = None) -> None:
        """Each subclass takes its own fields, then ``target`` (see for_target) and passes its message here."""
        Exception.__init__(self, *args)  # not super(): the next class in a subclass's MRO may want other args

    def _init(self, args: tuple[Any, ...], target: str | None, text: str) -> str:
        self._args, self.target = args, target
        return f"{target}: {text}" if target else text

    def for_target(self, target: str) -> Exception:
        """The same error, its message prefixed with the target's name (deployers name their target)."""
        if self.target is not None:
            return self
        twin = type(self)(*self._args, target=target)
        twin.__cause__ = self.__cause__
        return twin

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self._args, self.target))


def _rebuild(cls: type[SshError], args: tuple[Any, ...], target: str | None) -> SshError:
    return cls(*args, target=target)


class SshUnavailableError(SshError, DeployError):
    """The host could not be reached, timed out, or the connection dropped (worth a retry)."""

    def __init__(self, where: str, reason: str, *, target: str | None = None) -> None:
        self.where, self.reason = where, reason
        super().__init__(self._init((where, reason), target, f"ssh {where}: {reason}"))


class SshUnreachableError(SshUnavailableError, EndpointUnreachableError):
    """Nothing answered as an SSH server at ``host``:``port`` (worth a retry). ``cause`` says why: "dns"
    (the name did not resolve), "refused", "timeout" (no TCP connection in time), "unreachable" (no route,
    network down) or "handshake" (something answered but no SSH key exchange completed in time).

    Also the core's EndpointUnreachableError (``host``, ``port``, ``cause``, ``detail``, here the same as
    ``reason``), so that code handling unreachable endpoints handles SSH hosts too; the message, the
    pickling and for_target stay SshError's."""

    def __init__(self, where: str, host: str, port: int, cause: str, reason: str, *,
                 target: str | None = None) -> None:
        self.where, self.host, self.port, self.cause, self.reason = where, host, int(port), cause, reason
        self.detail = reason
        SshError.__init__(self, self._init((where, host, port, cause, reason), target, f"ssh {where}: {reason}"))


class SshHostKeyError(SshError, PermanentDeployError):
    """The host's key is not one known_hosts lists for it: unknown, changed or revoked (UntrustedHostKeyError),
    or known_hosts itself cannot be read."""

    def __init__(self, where: str, reason: str, *, target: str | None = None) -> None:
        self.where, self.reason = where, reason
        super().__init__(self._init((where, reason), target, f"ssh {where}: host key refused: {reason}"))


class UntrustedHostKeyError(SshHostKeyError):
    """The host at ``host``:``port`` offered a key known_hosts does not vouch for; ``problem`` is "unknown"
    (no key listed for the host), "changed" (another key listed: ``expected_fingerprint``) or "revoked".
    ``key_type`` and ``fingerprint`` (``SHA256:...``) are the offered key's."""

    def __init__(self, where: str, host: str, port: int, problem: str, key_type: str, fingerprint: str, reason: str,
                 expected_fingerprint: str | None = None, *, target: str | None = None) -> None:
        self.where, self.reason = where, reason
        self.host, self.port, self.problem = host, int(port), problem
        self.key_type, self.fingerprint, self.expected_fingerprint = key_type, fingerprint, expected_fingerprint
        SshError.__init__(self, self._init((where, host, port, problem, key_type, fingerprint, reason,
                                            expected_fingerprint), target, f"ssh {where}: host key refused: {reason}"))


class SshAuthError(SshError, PermanentDeployError):
    """The host did not accept the client key for the user."""

    def __init__(self, where: str, reason: str, *, target: str | None = None) -> None:
        self.where, self.reason = where, reason
        super().__init__(self._init((where, reason), target, f"ssh {where}: authentication failed: {reason}"))


class RemotePathError(SshError, PermanentDeployError):
    """A path that cannot be read or written as asked (permission denied, missing, wrong type, too big)."""

    def __init__(self, where: str, path: str, reason: str, *, target: str | None = None) -> None:
        self.where, self.path, self.reason = where, path, reason
        super().__init__(self._init((where, path, reason), target, f"ssh {where}: {path}: {reason}"))


class RemoteCommandError(SshError, PermanentDeployError):
    """A command exited non-zero; ``stderr`` is its trimmed error output (PEM blocks removed)."""

    def __init__(self, where: str, command: str, status: int, stderr: str, *, target: str | None = None) -> None:
        self.where, self.command, self.status, self.stderr = where, command, status, stderr
        super().__init__(self._init((where, command, status, stderr), target,
                                    f"ssh {where}: `{_short(command)}` exited with status {status}"
                                    + (f": {stderr}" if stderr else "")))


@dataclass(frozen=True)
class CommandResult:
    status: int
    stdout: bytes = field(repr=False)
    stderr: bytes = field(repr=False)

    @property
    def error_text(self) -> str:
        return trim_output(self.stderr or self.stdout)


@dataclass
class GlobResult:
    """Regular files that matched (path -> attributes, symlinks resolved), places that could not be
    listed (path -> reason), and whether the file limit cut the walk short."""

    files: dict[str, paramiko.SFTPAttributes] = field(default_factory=dict)
    unreadable: dict[str, str] = field(default_factory=dict)
    truncated: bool = False


_PEM_BLOCK = re.compile(r"-----BEGIN [^-]+-----.*?(-----END [^-]+-----|\Z)", re.S)
_LONG_BASE64 = re.compile(r"[A-Za-z0-9+/=]{40,}")


def trim_output(data: bytes | str, limit: int = 400) -> str:
    """A command's output fit for an error message: PEM blocks and long base64 runs cut out, one line
    per line joined by ' | ', at most ``limit`` characters."""
    text = data.decode(errors="replace") if isinstance(data, bytes) else data
    text = _PEM_BLOCK.sub("[PEM removed]", text)
    text = _LONG_BASE64.sub("[base64 removed]", text)
    text = " | ".join(line.strip() for line in text.splitlines() if line.strip())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _short(command: str, limit: int = 160) -> str:
    return command if len(command) <= limit else command[: limit - 3] + "..."


def is_temporary(path: str) -> bool:
    """A temporary upload of atomic_write (possibly left behind by a dropped connection)."""
    return TEMP_MARKER in posixpath.basename(path)


def key_sha256(key: paramiko.PKey) -> str:
    return "SHA256:" + base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")


@dataclass(frozen=True)
class KnownHosts:
    entries: tuple[tuple[str, paramiko.PKey], ...]  # (host name as written, possibly hashed; key)
    revoked: tuple[paramiko.PKey, ...] = ()


def parse_known_hosts(text: str) -> KnownHosts:
    """OpenSSH known_hosts text: ValueError naming the line for one that cannot be read."""
    entries: list[tuple[str, paramiko.PKey]] = []
    revoked: list[paramiko.PKey] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        marker = None
        if line.startswith("@"):
            marker, _, line = line.partition(" ")
            if marker not in ("@revoked", "@cert-authority"):
                raise ValueError(f"known_hosts line {number}: unknown marker {marker!r}")
        try:
            entry = HostKeyEntry.from_line(line, number)
        except (paramiko.SSHException, ValueError, TypeError, IndexError, binascii.Error) as exc:
            raise ValueError(f"known_hosts line {number}: unreadable ({exc})") from None
        if entry is None or entry.key is None:
            raise ValueError(f"known_hosts line {number}: unreadable or unsupported key type")
        if marker == "@revoked":
            revoked.append(entry.key)
        elif marker is None:
            entries.extend((host, entry.key) for host in entry.hostnames)
    return KnownHosts(tuple(entries), tuple(revoked))


def load_client_key(text: str, passphrase: str | None = None) -> paramiko.PKey:
    """Ed25519, ECDSA or RSA private key text in OpenSSH or PEM form: a paramiko key."""
    data = text.strip().encode() + b"\n"
    password = passphrase.encode() if passphrase else None
    key: PrivateKeyTypes
    try:
        if b"BEGIN OPENSSH PRIVATE KEY" in data:
            key = serialization.load_ssh_private_key(data, password=password)
        else:
            key = serialization.load_pem_private_key(data, password=password)
    except TypeError:
        raise ValueError("the SSH client key is encrypted: a passphrase is needed") from None
    except ValueError:
        raise ValueError("the SSH client key is not an Ed25519, ECDSA or RSA private key in OpenSSH or PEM form, "
                         "or its passphrase is wrong") from None
    openssh = io.StringIO(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                            serialization.NoEncryption()).decode())
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return paramiko.Ed25519Key.from_private_key(openssh)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return paramiko.ECDSAKey.from_private_key(openssh)
    if isinstance(key, rsa.RSAPrivateKey):
        return paramiko.RSAKey.from_private_key(openssh)
    raise ValueError(f"the SSH client key is a {type(key).__name__}: use Ed25519, ECDSA or RSA")


class SshConnection:
    """``with SshConnection(address, port, user, private_key, known_hosts) as ssh:`` then run, read_file,
    atomic_write, stat, listdir, glob. Thread-safe; one SSH transport for everything."""

    def __init__(self, address: str, port: int, user: str, private_key: str, known_hosts: str, *,
                 passphrase: str | None = None, connect_timeout: float = 10.0, operation_timeout: float = 30.0,
                 command_timeout: float = 60.0) -> None:
        self.address, self.port, self.user = address, int(port), user
        self.where = f"{user}@{address}:{port}"
        self.connect_timeout = connect_timeout
        self.operation_timeout = operation_timeout
        self.command_timeout = command_timeout
        try:
            self._known = parse_known_hosts(known_hosts)
        except ValueError as exc:
            raise SshHostKeyError(self.where, str(exc)) from None
        try:
            self._pkey = load_client_key(private_key, passphrase)
        except ValueError as exc:
            raise SshAuthError(self.where, str(exc)) from None
        self._host_keys = paramiko.HostKeys()
        for name, key in self._known.entries:
            self._host_keys.add(name, key.get_name(), key)
        self._connection: paramiko.Transport | None = None
        self._sftp: paramiko.SFTPClient | None = None
        self._lock = threading.RLock()

    # connection -------------------------------------------------------------------------------------
    def _transport(self) -> paramiko.Transport:
        with self._lock:
            if self._connection is not None:
                if self._connection.is_active():
                    return self._connection
                self._drop()
            self._connection = self._connect()
            return self._connection

    def _connect(self) -> paramiko.Transport:
        """TCP, key exchange, the host key checked against known_hosts (revoked, unknown or changed: refused,
        nothing more sent: the client key is not even offered), then public key authentication."""
        started = time.monotonic()
        try:
            sock = socket.create_connection((self.address, self.port), timeout=self.connect_timeout)
            # Without TCP_NODELAY every command waits for a delayed ACK: 43 ms instead of 2 ms per `true`.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:
            raise self._unreachable(_connect_cause(exc), exc) from None
        try:
            transport = paramiko.Transport(sock)
        except Exception:
            sock.close()
            raise
        try:
            transport.banner_timeout = self.connect_timeout
            transport.auth_timeout = self.connect_timeout
            transport.channel_timeout = self.operation_timeout
            name = self.address if self.port == 22 else f"[{self.address}]:{self.port}"
            known = self._host_keys.lookup(name)
            if known:
                _prefer_key_type(transport, known.keys()[0])
            try:
                transport.start_client(timeout=self.connect_timeout)  # returns quietly when the timeout passes
                if transport.is_active() and not transport.initial_kex_done:
                    raise TimeoutError(f"no SSH key exchange within {self.connect_timeout:g} s")
                offered = transport.get_remote_server_key()
            except (OSError, EOFError, paramiko.SSHException) as exc:
                raise self._unreachable("handshake", exc) from None
            self._check_host_key(name, known, offered)
            transport.auth_publickey(self.user, self._pkey)
            if not transport.is_authenticated():
                raise paramiko.AuthenticationException("the host asks for a further authentication method")
        except (SshHostKeyError, SshUnreachableError):
            transport.close()
            raise
        except paramiko.AuthenticationException as exc:
            transport.close()
            raise SshAuthError(self.where, f"the {self._pkey.get_name()} key {key_sha256(self._pkey)} was not "
                                           f"accepted for user {self.user!r} ({exc})") from None
        except (OSError, EOFError, paramiko.SSHException) as exc:
            transport.close()
            raise SshUnavailableError(self.where, f"cannot connect ({_describe(exc)})") from None
        except BaseException:
            transport.close()
            raise
        log.debug("ssh %s connected in %.3f s", self.where, time.monotonic() - started)
        return transport

    def _unreachable(self, cause: str, exc: BaseException) -> SshUnreachableError:
        return SshUnreachableError(self.where, self.address, self.port, cause, f"cannot connect ({_describe(exc)})")

    def _check_host_key(self, name: str, known: Any, offered: paramiko.PKey) -> None:
        """Refuse a revoked key (whatever else known_hosts says), then an unknown or a changed one."""
        key_type, fingerprint = offered.get_name(), key_sha256(offered)

        def refused(problem: str, reason: str, expected: str | None = None) -> UntrustedHostKeyError:
            return UntrustedHostKeyError(self.where, self.address, self.port, problem, key_type, fingerprint, reason,
                                         expected)

        if any(offered == revoked for revoked in self._known.revoked):
            raise refused("revoked", f"the host offered {key_type} {fingerprint}, which known_hosts marks @revoked")
        if not known:
            raise refused("unknown", f"known_hosts has no {key_type} key for {name}; the host offered {key_type} "
                                     f"{fingerprint} (unknown host: add its key to known_hosts after checking it "
                                     "out of band)")
        expected = known.get(key_type)
        if expected != offered:
            expected = expected or next(iter(known.values()))
            raise refused("changed", f"host key changed: known_hosts has {expected.get_name()} "
                                     f"{key_sha256(expected)}, the host offered {key_type} {fingerprint} (possible "
                                     "man-in-the-middle; update known_hosts only after checking)", key_sha256(expected))

    def _drop(self) -> None:
        sftp, connection = self._sftp, self._connection
        self._sftp = self._connection = None
        for thing in (sftp, connection):
            if thing is not None:
                try:
                    thing.close()
                except Exception:  # noqa: BLE001 - closing a dead connection may fail in any way
                    pass

    def open(self) -> SshConnection:
        """Connect now (otherwise the first operation does)."""
        self._transport()
        return self

    def close(self) -> None:
        with self._lock:
            self._drop()

    def __enter__(self) -> SshConnection:
        return self.open()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def sftp(self) -> paramiko.SFTPClient:
        with self._lock:
            transport = self._transport()
            if self._sftp is None or self._sftp.get_channel() is None or self._sftp.get_channel().closed:
                try:
                    self._sftp = paramiko.SFTPClient.from_transport(transport, window_size=None, max_packet_size=None)
                except (OSError, EOFError, paramiko.SSHException) as exc:
                    raise SshUnavailableError(self.where, f"cannot open SFTP ({_describe(exc)})") from None
                assert self._sftp is not None
                self._sftp.get_channel().settimeout(self.operation_timeout)
            return self._sftp

    # commands ---------------------------------------------------------------------------------------
    def run(self, command: str, *, stdin: bytes | None = None, timeout: float | None = None,
            check: bool = False) -> CommandResult:
        """Run ``command`` with the user's shell (``$SHELL -c``); ``stdin`` is sent on the channel (never on
        the command line, which `ps` shows: secrets go there). With ``check``, a non-zero exit raises
        RemoteCommandError."""
        timeout = timeout or self.command_timeout
        deadline = time.monotonic() + timeout
        transport = self._transport()
        try:
            channel = transport.open_session(timeout=min(timeout, self.operation_timeout))
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise SshUnavailableError(self.where, f"cannot open a channel for `{_short(command)}` "
                                                  f"({_describe(exc)})") from None
        try:
            channel.settimeout(min(timeout, self.operation_timeout))
            channel.exec_command(command)
            if stdin:
                channel.sendall(stdin)
            channel.shutdown_write()
            stdout = self._read(channel, channel.recv, deadline)
            stderr = self._read(channel, channel.recv_stderr, deadline)
            if not channel.status_event.wait(max(0.0, deadline - time.monotonic())):
                raise SshUnavailableError(self.where, f"`{_short(command)}` did not finish within {timeout:g} s")
            status = channel.recv_exit_status()
        except socket.timeout:
            raise SshUnavailableError(self.where, f"`{_short(command)}` did not finish within {timeout:g} s") from None
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise SshUnavailableError(self.where, f"connection lost while running `{_short(command)}` "
                                                  f"({_describe(exc)})") from None
        finally:
            channel.close()
        result = CommandResult(status, stdout, stderr)
        log.debug("ssh %s: `%s` exited %d", self.where, _short(command), status)
        if check and status != 0:
            raise RemoteCommandError(self.where, command, status, result.error_text)
        return result

    def _read(self, channel: paramiko.Channel, recv: Any, deadline: float) -> bytes:
        """Read a stream to its end before ``deadline`` (a drip-feeding command cannot stretch it); output
        beyond 1 MiB is read and dropped."""
        chunks: list[bytes] = []
        size = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout()
            channel.settimeout(min(remaining, self.operation_timeout))
            chunk = recv(65536)
            if not chunk:
                return b"".join(chunks)
            if size < _MAX_OUTPUT:
                chunks.append(chunk)
                size += len(chunk)

    # files ------------------------------------------------------------------------------------------
    def stat(self, path: str) -> paramiko.SFTPAttributes | None:
        """The attributes of ``path`` (symlinks followed), or None when it does not exist."""
        return self._attributes(path, follow=True)

    def regular_file(self, path: str) -> paramiko.SFTPAttributes | None:
        """The attributes of the regular file at ``path`` (lstat: a symbolic link is not followed), or None
        when nothing is there. RemotePathError, naming the path, for a symbolic link (and where it points)
        or anything else that is not a regular file."""
        attrs = self._attributes(path, follow=False)
        mode = attrs.st_mode if attrs is not None else None
        if mode is not None and stat_module.S_ISLNK(mode):
            with self._lock:
                try:
                    points_to = self.sftp().readlink(path)
                except (OSError, EOFError, paramiko.SSHException):
                    points_to = None
            raise RemotePathError(self.where, path, f"is a symbolic link (to {points_to or '?'}); certpilot does "
                                                    "not follow links at the paths it copies or writes: name the "
                                                    "file itself")
        if mode is not None and not stat_module.S_ISREG(mode):
            raise RemotePathError(self.where, path, "not a regular file")
        return attrs

    def _attributes(self, path: str, *, follow: bool) -> paramiko.SFTPAttributes | None:
        with self._lock:
            try:
                return self.sftp().stat(path) if follow else self.sftp().lstat(path)
            except OSError as exc:
                if getattr(exc, "errno", None) == errno.ENOENT:
                    return None
                raise self._translate(exc, path, "cannot stat") from None
            except (EOFError, paramiko.SSHException) as exc:
                raise self._translate(exc, path, "cannot stat") from None

    def listdir(self, path: str) -> list[paramiko.SFTPAttributes]:
        """Entries of a directory with their attributes (not following symlinks)."""
        with self._lock:
            try:
                return self.sftp().listdir_attr(path)
            except (OSError, EOFError, paramiko.SSHException) as exc:
                raise self._translate(exc, path, "cannot list") from None

    def read_file(self, path: str, *, max_bytes: int | None = None) -> bytes:
        """The contents of a regular file; RemotePathError when it is missing, unreadable or too big."""
        with self._lock:
            try:
                sftp = self.sftp()
                attrs = sftp.stat(path)
                if attrs.st_mode is not None and not stat_module.S_ISREG(attrs.st_mode):
                    raise RemotePathError(self.where, path, "not a regular file")
                if max_bytes is not None and (attrs.st_size or 0) > max_bytes:
                    raise RemotePathError(self.where, path, f"{attrs.st_size} bytes, over the limit of {max_bytes}")
                with sftp.open(path, "rb") as file:
                    file.prefetch(attrs.st_size)
                    data = file.read(max_bytes + 1 if max_bytes is not None else None)
            except (OSError, EOFError, paramiko.SSHException) as exc:
                raise self._translate(exc, path, "cannot read") from None
        if max_bytes is not None and len(data) > max_bytes:
            raise RemotePathError(self.where, path, f"over the limit of {max_bytes} bytes")
        return data

    def atomic_write(self, path: str, data: bytes, mode: int) -> None:
        """Replace ``path`` with ``data`` (file mode ``mode``) so that readers see the old file or the new one."""
        temporary = self.upload_temporary(path, data, mode)
        self.commit(temporary, path)

    def upload_temporary(self, path: str, data: bytes, mode: int) -> str:
        """Write ``data`` to a new temporary file beside ``path``; returns its name. The file is created with
        ``mode`` by the SFTP open request itself (O_CREAT|O_EXCL with the permissions attribute, so it
        never exists with the server's default mode, not even empty), then set to exactly ``mode`` on the
        open handle before the first byte is written. On failure the temporary file is removed when the
        connection allows."""
        directory, name = posixpath.split(path)
        temporary = posixpath.join(directory, f".{name}{TEMP_MARKER}{secrets.token_hex(4)}")
        with self._lock:
            try:
                sftp = self.sftp()
                file = _create_exclusive(sftp, temporary, mode)
            except (OSError, EOFError, paramiko.SSHException) as exc:
                raise self._translate(exc, path, f"cannot create a temporary file in {directory or '.'}") from None
            try:
                with file:
                    file.chmod(mode)  # exactly ``mode`` (the server's umask may have narrowed it), still empty
                    self._write_chunks(file, data, path)
                    file.flush()
                attrs = sftp.stat(temporary)
                if attrs.st_size != len(data):
                    raise SshUnavailableError(self.where, f"{path}: upload incomplete ({attrs.st_size} of {len(data)} "
                                                          "bytes)")
            except BaseException as exc:
                self._discard(temporary)
                if isinstance(exc, (OSError, EOFError, paramiko.SSHException)):
                    raise self._translate(exc, path, "upload interrupted") from None
                raise
        return temporary

    def _write_chunks(self, file: paramiko.SFTPFile, data: bytes, path: str) -> None:
        """The seam where the bytes for ``path`` leave: tests subclass it to drop the connection mid-upload."""
        view = memoryview(data)
        for offset in range(0, len(view), _CHUNK):
            file.write(view[offset:offset + _CHUNK])

    def commit(self, temporary: str, path: str) -> None:
        """Rename an uploaded temporary file over ``path`` (atomic, replaces an existing file)."""
        with self._lock:
            try:
                self.sftp().posix_rename(temporary, path)
            except (OSError, EOFError, paramiko.SSHException) as exc:
                self._discard(temporary)
                raise self._translate(exc, path, "cannot replace") from None

    def move(self, source: str, destination: str) -> None:
        """Rename ``source`` to ``destination`` on the host (atomic, replaces a file there). Unlike
        ``commit``, a failure leaves ``source`` where it was."""
        with self._lock:
            try:
                self.sftp().posix_rename(source, destination)
            except (OSError, EOFError, paramiko.SSHException) as exc:
                raise self._translate(exc, source, f"cannot move to {destination}") from None

    def _discard(self, temporary: str) -> None:
        try:
            transport = self._connection
            if transport is not None and transport.is_active() and self._sftp is not None:
                self._sftp.remove(temporary)
        except Exception:  # noqa: BLE001 - best effort; is_temporary() marks what is left
            log.debug("ssh %s: could not remove temporary file %s", self.where, temporary)

    def remove(self, path: str, *, missing_ok: bool = True) -> bool:
        """Delete a file; True when something was deleted."""
        with self._lock:
            try:
                self.sftp().remove(path)
                return True
            except OSError as exc:
                if missing_ok and getattr(exc, "errno", None) == errno.ENOENT:
                    return False
                raise self._translate(exc, path, "cannot remove") from None
            except (EOFError, paramiko.SSHException) as exc:
                raise self._translate(exc, path, "cannot remove") from None

    def remove_stale_temporaries(self, path: str) -> int:
        """Remove temporary uploads for ``path`` left by interrupted writes; how many were removed."""
        directory, name = posixpath.split(path)
        removed = 0
        try:
            entries = self.listdir(directory or ".")
        except RemotePathError:
            return 0
        for entry in entries:
            if entry.filename.startswith(f".{name}{TEMP_MARKER}"):
                removed += self.remove(posixpath.join(directory, entry.filename))
        return removed

    def copy(self, source: str, destination: str, *, mode: int | None = None) -> None:
        """Copy a regular file on the host atomically (``mode``: the source's permission bits unless given).
        A symbolic link at ``source`` is refused, not followed (RemotePathError naming it): a link would
        copy whatever file the SSH user can read to where certpilot keeps keys. A link at
        ``destination`` is replaced, as atomic_write replaces whatever is at its path. (SFTP has no
        O_NOFOLLOW: a link swapped in between the check and the read is not caught.)"""
        attrs = self.regular_file(source)
        if attrs is None:
            raise RemotePathError(self.where, source, "no such file")
        data = self.read_file(source)
        try:
            final_mode = mode if mode is not None else stat_module.S_IMODE(attrs.st_mode or 0o600)
            self.atomic_write(destination, data, final_mode)
        finally:
            del data

    def glob(self, pattern: str, *, max_files: int = 10_000, max_dirs: int = 10_000,
             listings: dict[str, list[paramiko.SFTPAttributes] | RemotePathError] | None = None) -> GlobResult:
        """Regular files matching an absolute ``pattern`` (fnmatch per path component, ``**`` for any
        number of directories). Symlinked files are followed, symlinked directories are not descended.
        ``listings`` caches directory listings across calls (several patterns over one tree)."""
        if not pattern.startswith("/"):
            raise ValueError(f"glob pattern {pattern!r} must be an absolute path")
        parts = [p for p in pattern.split("/") if p]
        fixed = 0
        while fixed < len(parts) - 1 and not _is_magic(parts[fixed]):
            fixed += 1
        result = GlobResult()
        root = "/" + "/".join(parts[:fixed])
        budget = [max_dirs]
        self._glob_walk(root, parts[fixed:], result, max_files, budget, set(), {} if listings is None else listings)
        return result

    def _glob_walk(self, directory: str, parts: list[str], result: GlobResult, max_files: int, budget: list[int],
                   seen: set[tuple[str, tuple[str, ...]]],
                   listings: dict[str, list[paramiko.SFTPAttributes] | RemotePathError]) -> None:
        if result.truncated or not parts:
            return
        key = (directory, tuple(parts))
        if key in seen:
            return
        seen.add(key)
        head, rest = parts[0], parts[1:]
        if not _is_magic(head) and rest:
            self._glob_walk(posixpath.join(directory, head), rest, result, max_files, budget, seen, listings)
            return
        budget[0] -= 1
        if budget[0] < 0:
            result.truncated = True
            return
        if directory not in listings:
            try:
                listings[directory] = self.listdir(directory)
            except RemotePathError as exc:
                listings[directory] = exc
        entries = listings[directory]
        if isinstance(entries, RemotePathError):
            result.unreadable[directory] = entries.reason
            return
        if head == "**":
            self._glob_walk(directory, rest, result, max_files, budget, seen, listings)  # zero directories
        for entry in sorted(entries, key=lambda e: e.filename):
            path = posixpath.join(directory, entry.filename)
            mode = entry.st_mode or 0
            if head == "**":
                if stat_module.S_ISDIR(mode):
                    self._glob_walk(path, parts, result, max_files, budget, seen, listings)
                continue
            if not fnmatch.fnmatchcase(entry.filename, head):
                continue
            if rest:
                if stat_module.S_ISDIR(mode):
                    self._glob_walk(path, rest, result, max_files, budget, seen, listings)
                continue
            if stat_module.S_ISLNK(mode):
                target = self.stat(path)
                if target is None:
                    result.unreadable[path] = "dangling symbolic link"
                    continue
                entry, mode = target, target.st_mode or 0
            if stat_module.S_ISREG(mode) and path not in result.files:
                if len(result.files) >= max_files:
                    result.truncated = True
                    return
                result.files[path] = entry

    def _translate(self, exc: BaseException, path: str, action: str) -> Exception:
        if isinstance(exc, (SshUnavailableError, RemotePathError, SshHostKeyError, SshAuthError)):
            return exc
        code = getattr(exc, "errno", None)
        if isinstance(exc, PermissionError) or code == errno.EACCES:
            return RemotePathError(self.where, path, f"{action}: permission denied for user {self.user!r}")
        if isinstance(exc, FileNotFoundError) or code == errno.ENOENT:
            return RemotePathError(self.where, path, f"{action}: no such file or directory")
        if isinstance(exc, (socket.timeout, TimeoutError)):
            with self._lock:
                self._drop()  # a late answer would confuse the next request on this SFTP session
            return SshUnavailableError(self.where, f"{path}: {action}: timed out after {self.operation_timeout:g} s")
        transport = self._connection
        if isinstance(exc, OSError) and transport is not None and transport.is_active():
            return RemotePathError(self.where, path, f"{action}: the server refused ({_describe(exc)})")
        with self._lock:
            self._drop()
        return SshUnavailableError(self.where, f"{path}: {action}: connection lost ({_describe(exc)})")


def _create_exclusive(sftp: paramiko.SFTPClient, path: str, mode: int) -> paramiko.SFTPFile:
    """Create ``path`` for writing with ``mode`` in the open request (O_CREAT|O_EXCL: never reuse or follow
    something already there). SFTPClient.open sends no attributes, so the server would create the file
    with its default mode (0666 less its umask) and a chmod could only narrow it afterwards, when another
    local user may already hold it open: this sends the same SSH_FXP_OPEN with the permissions set."""
    attributes = paramiko.SFTPAttributes()
    attributes.st_mode = stat_module.S_IMODE(mode)
    flags = SFTP_FLAG_WRITE | SFTP_FLAG_CREATE | SFTP_FLAG_TRUNC | SFTP_FLAG_EXCL
    kind, message = sftp._request(CMD_OPEN, sftp._adjust_cwd(path), flags, attributes)  # noqa: SLF001 - no public way
    if kind != CMD_HANDLE:
        raise paramiko.SFTPError(f"expected a handle for {path}")
    return paramiko.SFTPFile(sftp, message.get_binary(), "wb")


def _connect_cause(exc: OSError) -> str:
    """Why a TCP connection could not be made, in SshUnreachableError's terms."""
    if isinstance(exc, socket.gaierror):
        return "dns"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "timeout"
    return "unreachable"


def _prefer_key_type(transport: paramiko.Transport, key_type: str) -> None:
    """Ask first for the host key type known_hosts has (as OpenSSH does), so that a host with several keys
    offers the one that can be checked."""
    options = transport.get_security_options()
    if key_type == "ssh-rsa":
        key_type = next((t for t in ("rsa-sha2-512", "rsa-sha2-256") if t in options.key_types), key_type)
    if key_type in options.key_types:
        options.key_types = [key_type] + [t for t in options.key_types if t != key_type]


def _is_magic(part: str) -> bool:
    return part == "**" or any(ch in part for ch in "*?[")


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
