"""A real OpenSSH server on loopback for tests, benchmarks and the demo, never the system's own.

``SshServer`` runs ``sshd -D -e -f OWN_CONFIG`` on 127.0.0.1 and a free port with its own host key
(Ed25519, generated into the work dir), its own AuthorizedKeysFile, password and keyboard-interactive
authentication off, and one user who may log in:

- as root (tests and CI): the dedicated user ``certpilot-lab`` with the plain shell /bin/sh and no rc
  files, created with useradd when missing (home /var/lib/certpilot-lab, created empty). Remote commands
  then cost a few milliseconds instead of the 250 ms root's .bashrc takes here.
- not as root: the current user (sshd accepts only its own user then); ``fallback_reason`` says so.

It exposes the known_hosts line (``[127.0.0.1]:PORT ssh-ed25519 ...``), the client private key (OpenSSH
text) that authorized_keys accepts, and ``home``: a per-server directory owned by that user (outside
pytest's 0700 temporary directories, so that the user can reach it), removed on exit. nginx and haproxy
instances (lab.nginx, lab.haproxy) put their prefixes under it.
"""

from __future__ import annotations

import getpass
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from lab.ports import free_port  # noqa: F401  (nginx, haproxy and the tests take it from here)

LAB_USER = "certpilot-lab"
LAB_HOME = "/var/lib/certpilot-lab"



class LabError(RuntimeError):
    """A lab server could not be set up or did not start; the message says why and where its log is."""




@dataclass(frozen=True)
class LabUser:
    name: str
    uid: int
    gid: int
    fallback_reason: str | None = None  # why the current user is used instead of the dedicated one


def lab_user() -> LabUser:
    """The dedicated test user when root (created if missing), else the current user."""
    if os.geteuid() != 0:
        me = pwd.getpwuid(os.geteuid())
        return LabUser(me.pw_name, me.pw_uid, me.pw_gid,
                       f"not running as root: the lab uses the current user {getpass.getuser()!r}, "
                       "whose shell rc files may slow remote commands")
    try:
        entry = pwd.getpwnam(LAB_USER)
    except KeyError:
        # -p '*': no password, but not a locked account ("!"), which sshd refuses without PAM.
        done = subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir", LAB_HOME,
                               "--shell", "/bin/sh", "--user-group", "-p", "*", LAB_USER],
                              capture_output=True, text=True, timeout=30)
        if done.returncode not in (0, 9):  # 9: created meanwhile by another process
            raise LabError(f"useradd {LAB_USER} failed ({done.returncode}): {done.stderr.strip()}") from None
        entry = pwd.getpwnam(LAB_USER)
    home = Path(entry.pw_dir)
    if not home.is_dir():
        home.mkdir(mode=0o755, parents=True, exist_ok=True)
        os.chown(home, entry.pw_uid, entry.pw_gid)
    return LabUser(entry.pw_name, entry.pw_uid, entry.pw_gid)


def generate_client_key(kind: str = "ed25519") -> PrivateKeyTypes:
    """A client key of ``kind``: ed25519, ecdsa (P-256) or rsa (3072 bits)."""
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if kind == "ecdsa":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "rsa":
        return rsa.generate_private_key(65537, 3072)
    raise ValueError(f"unknown client key kind {kind!r}: use ed25519, ecdsa or rsa")


def openssh_private_text(key: PrivateKeyTypes) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                             serialization.NoEncryption()).decode()


def openssh_public_line(key: PrivateKeyTypes, comment: str = "") -> str:
    line = key.public_key().public_bytes(serialization.Encoding.OpenSSH,  # type: ignore[union-attr]
                                         serialization.PublicFormat.OpenSSH).decode()
    return f"{line} {comment}".rstrip()


def wait_for_banner(host: str, port: int, deadline: float, process: subprocess.Popen[bytes] | None = None) -> None:
    """Until ``deadline`` (time.monotonic()): connect and read an ``SSH-`` banner."""
    last = "nothing tried"
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise LabError(f"sshd exited with status {process.returncode} before it listened")
        try:
            with socket.create_connection((host, port), timeout=0.5) as sock:
                sock.settimeout(max(0.05, min(1.0, deadline - time.monotonic())))
                if sock.recv(64).startswith(b"SSH-"):
                    return
                last = "no SSH banner"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.01)
    raise LabError(f"sshd on {host}:{port} not ready: {last}")


class SshServer:
    """``with SshServer(workdir) as server:`` an sshd on 127.0.0.1:server.port for ``server.user``."""

    def __init__(self, workdir: Path, *, port: int | None = None, client_key_kind: str = "ed25519",
                 start_timeout: float = 10.0) -> None:
        self.workdir = Path(workdir)
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.start_timeout = start_timeout
        self._client_key = generate_client_key(client_key_kind)
        self._host_key = ed25519.Ed25519PrivateKey.generate()
        self._process: subprocess.Popen[bytes] | None = None
        self._user: LabUser | None = None
        self._keys_dir = Path()
        self.home = Path()

    # what clients need ------------------------------------------------------------------------------
    @property
    def user(self) -> str:
        assert self._user is not None, "start the server first"
        return self._user.name

    @property
    def uid(self) -> int:
        assert self._user is not None, "start the server first"
        return self._user.uid

    @property
    def gid(self) -> int:
        assert self._user is not None, "start the server first"
        return self._user.gid

    @property
    def fallback_reason(self) -> str | None:
        return self._user.fallback_reason if self._user else None

    @property
    def known_hosts_line(self) -> str:
        return f"[{self.host}]:{self.port} {openssh_public_line(self._host_key)}"

    @property
    def host_public_key_line(self) -> str:
        return openssh_public_line(self._host_key)

    @property
    def client_private_key(self) -> str:
        """The client key (OpenSSH text) authorized for ``user``. A lab secret, generated per server."""
        return openssh_private_text(self._client_key)

    @property
    def authorized_keys(self) -> Path:
        return self._keys_dir / "authorized_keys"

    @property
    def log_path(self) -> Path:
        return self.workdir / "sshd.log"

    def authorize(self, key: PrivateKeyTypes) -> None:
        """Accept another client key (to exercise ECDSA or RSA keys, PEM or OpenSSH text)."""
        with open(self.authorized_keys, "a") as file:
            file.write(openssh_public_line(key, "certpilot-lab-extra") + "\n")

    def chown(self, path: Path) -> None:
        """Give ``path`` to the lab user (a no-op when not root)."""
        if os.geteuid() == 0:
            os.chown(path, self.uid, self.gid)

    # lifecycle --------------------------------------------------------------------------------------
    def start(self) -> SshServer:
        self._user = lab_user()
        self.workdir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
        host_key = self.workdir / "ssh_host_ed25519_key"
        host_key.write_text(openssh_private_text(self._host_key))
        host_key.chmod(0o600)
        # sshd reads authorized_keys as the user: it lives in a root-owned directory the user can traverse.
        self._keys_dir = Path(tempfile.mkdtemp(prefix="certpilot-lab-keys-"))
        self._keys_dir.chmod(0o755)
        self.authorized_keys.write_text(openssh_public_line(self._client_key, "certpilot-lab") + "\n")
        self.authorized_keys.chmod(0o644)
        self.home = Path(tempfile.mkdtemp(prefix="certpilot-lab-"))
        self.home.chmod(0o755)
        self.chown(self.home)
        config = self.workdir / "sshd_config"
        config.write_text(self._config(host_key))
        log = open(self.log_path, "ab")
        try:
            self._process = subprocess.Popen(["/usr/sbin/sshd" if os.path.exists("/usr/sbin/sshd") else "sshd",
                                              "-D", "-e", "-f", str(config)],
                                             stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        finally:
            log.close()
        try:
            wait_for_banner(self.host, self.port, time.monotonic() + self.start_timeout, self._process)
        except LabError as exc:
            self.stop()
            raise LabError(f"{exc}; see {self.log_path}: {self._log_tail()}") from None
        return self

    def _config(self, host_key: Path) -> str:
        lines = [
            f"Port {self.port}",
            f"ListenAddress {self.host}",
            f"HostKey {host_key}",
            f"PidFile {self.workdir / 'sshd.pid'}",
            f"AuthorizedKeysFile {self.authorized_keys}",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "HostbasedAuthentication no",
            "UsePAM no",
            "StrictModes no",  # the authorized_keys file lives in the lab's work dir, not the user's home
            f"AllowUsers {self.user}",
            "PermitRootLogin prohibit-password",
            "Subsystem sftp internal-sftp",
            "MaxSessions 100",
            "MaxStartups 100:30:200",
            "PrintMotd no",
            "PrintLastLog no",
            "X11Forwarding no",
            "AllowTcpForwarding no",
            "LogLevel INFO",
        ]
        return "\n".join(lines) + "\n"

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-800:].strip()
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=5)
        self._process = None
        if self.home != Path() and self.home.exists():
            _make_removable(self.home)
            shutil.rmtree(self.home, ignore_errors=True)
        if self._keys_dir != Path():
            shutil.rmtree(self._keys_dir, ignore_errors=True)

    def __enter__(self) -> SshServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _make_removable(root: Path) -> None:
    """Tests chmod directories read-only; give the owner write access back so that rmtree works."""
    for dirpath, dirnames, _ in os.walk(root):
        for name in dirnames:
            try:
                os.chmod(os.path.join(dirpath, name), 0o755)
            except OSError:
                pass

