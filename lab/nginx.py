"""A real nginx (Debian's 1.22) with its own prefix, started as the lab's SSH user, for tests,
benchmarks and the demo.

``NginxInstance(prefix, names, user=...)`` writes ``PREFIX/nginx.conf`` with one TLS server block per
name, each on its own port on 127.0.0.1 (``ssl_protocols TLSv1.2 TLSv1.3;``, which 1.22 needs for TLS
1.3), certificate and key in ``PREFIX/sites/<name>/`` (fullchain.pem, privkey.pem 0600), the pid file,
logs and temp paths in the prefix. nginx runs in the foreground (``daemon off;``) as the given user, so
that a deployer logged in over SSH as that user can test and reload it with ``test_command`` and
``reload_command`` (absolute paths: a non-root SSH session's PATH lacks /usr/sbin). Several instances
can run at once (each on free ports, each in its own prefix): ``deploy_settings(name)`` gives an
``ssh-nginx`` target's settings for one site.
"""

from __future__ import annotations

import datetime as dt
import os
import pwd
import shlex
import shutil
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from lab.sshd import LabError, free_port

# An absolute path: an SSH session's PATH for a non-root user (Debian: /usr/local/bin:/usr/bin:/bin:/usr/games)
# does not include /usr/sbin.
_NGINX = shutil.which("nginx", path="/usr/sbin:/usr/bin:/sbin:/bin:" + os.environ.get("PATH", "")) or "nginx"


@dataclass(frozen=True)
class NginxSite:
    name: str  # the server_name and the SNI to ask for
    port: int
    certificate_path: Path
    key_path: Path


def placeholder_pair(name: str) -> tuple[bytes, bytes]:
    """A self-signed certificate and its key (PEM) for ``name``: what a site serves before any deploy."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def run_as(user: str | None) -> dict[str, object]:
    """Popen arguments that run a child as ``user`` (root only; None or the current user: no change)."""
    if user is None or os.geteuid() != 0:
        return {}
    entry = pwd.getpwnam(user)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": [],
            "env": {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": entry.pw_dir}}


def chown_tree(root: Path, user: str | None) -> None:
    if user is None or os.geteuid() != 0:
        return
    entry = pwd.getpwnam(user)
    for dirpath, _, filenames in os.walk(root):
        os.chown(dirpath, entry.pw_uid, entry.pw_gid)
        for name in filenames:
            os.chown(os.path.join(dirpath, name), entry.pw_uid, entry.pw_gid)


def wait_for_ports(ports: Sequence[int], deadline: float, process: subprocess.Popen[bytes], what: str,
                   log: Path) -> None:
    pending = list(ports)
    while pending:
        if process.poll() is not None:
            raise LabError(f"{what} exited with status {process.returncode}: {_tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", pending[0]), timeout=0.5):
                pending.pop(0)
                continue
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise LabError(f"{what} does not listen on 127.0.0.1:{pending[0]}: {_tail(log)}")
        time.sleep(0.01)


def stop_process(process: subprocess.Popen[bytes] | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)


def _tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-800:].strip() or "(empty log)"
    except OSError:
        return "(no log)"


class ServerProcess:
    """A lab server run as a child process from its own prefix: stop, remove, and a context manager."""

    prefix: Path
    _process: subprocess.Popen[bytes] | None

    def start(self) -> ServerProcess:
        raise NotImplementedError

    def stop(self) -> None:
        stop_process(self._process)
        self._process = None

    def remove(self) -> None:
        """Stop and delete the prefix."""
        self.stop()
        shutil.rmtree(self.prefix, ignore_errors=True)

    def __enter__(self):  # noqa: ANN204 - the subclass
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class NginxInstance(ServerProcess):
    """``with NginxInstance(prefix, ["a.test", "b.test"], user=server.user) as nginx:`` serves each name."""

    def __init__(self, prefix: Path, names: Sequence[str] = ("site.test",), *, user: str | None = None,
                 pairs: Mapping[str, tuple[bytes, bytes]] | None = None, start_timeout: float = 10.0) -> None:
        self.prefix = Path(prefix).resolve()
        self.user = user
        self.start_timeout = start_timeout
        self._pairs = dict(pairs or {})
        self.sites = {name: NginxSite(name, free_port(), self.prefix / "sites" / name / "fullchain.pem",
                                      self.prefix / "sites" / name / "privkey.pem") for name in names}
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def conf(self) -> Path:
        return self.prefix / "nginx.conf"

    @property
    def error_log(self) -> Path:
        return self.prefix / "logs" / "error.log"

    @property
    def pid_file(self) -> Path:
        return self.prefix / "nginx.pid"

    @property
    def master_pid(self) -> int | None:
        return self._process.pid if self._process is not None and self._process.poll() is None else None

    def _argv(self) -> list[str]:
        return [_NGINX, "-p", f"{self.prefix}/", "-c", str(self.conf), "-e", str(self.error_log)]

    def _base(self) -> str:
        return shlex.join(self._argv())

    @property
    def test_command(self) -> str:
        """What the deployer runs before reloading: exits non-zero when the configuration is broken."""
        return f"{self._base()} -t -q"

    @property
    def reload_command(self) -> str:
        return f"{self._base()} -s reload"

    def site(self, name: str | None = None) -> NginxSite:
        return self.sites[name] if name else next(iter(self.sites.values()))

    def deploy_settings(self, name: str | None = None) -> dict[str, object]:
        """Settings of an ``ssh-nginx`` target for one site of this instance."""
        site = self.site(name)
        return {"certificate_path": str(site.certificate_path), "key_path": str(site.key_path),
                "test_command": self.test_command, "reload_command": self.reload_command,
                "verify_host": "127.0.0.1", "verify_port": site.port, "verify_sni": site.name}

    def write_config(self, extra_http: str = "") -> None:
        """(Re)write nginx.conf; ``extra_http`` is inserted in the http block (tests use it to break it)."""
        tmp = self.prefix / "tmp"
        servers = "".join(f"""
    server {{
        listen 127.0.0.1:{site.port} ssl;
        server_name {site.name};
        ssl_certificate {site.certificate_path};
        ssl_certificate_key {site.key_path};
        ssl_protocols TLSv1.2 TLSv1.3;
        location / {{ return 200 "{site.name}\\n"; }}
    }}
""" for site in self.sites.values())
        self.conf.write_text(f"""daemon off;
worker_processes 1;
pid {self.pid_file};
error_log {self.error_log} warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
{extra_http}{servers}}}
""")

    def start(self) -> NginxInstance:
        for sub in ("logs", "tmp"):
            (self.prefix / sub).mkdir(parents=True, exist_ok=True)
        for site in self.sites.values():
            site.certificate_path.parent.mkdir(parents=True, exist_ok=True)
            cert_pem, key_pem = self._pairs.get(site.name) or placeholder_pair(site.name)
            site.certificate_path.write_bytes(cert_pem)
            site.key_path.touch(mode=0o600)
            site.key_path.chmod(0o600)
            site.key_path.write_bytes(key_pem)
        self._pairs.clear()
        self.write_config()
        chown_tree(self.prefix, self.user)
        log = self.prefix / "logs" / "stderr.log"
        with open(log, "ab") as out:
            self._process = subprocess.Popen(self._argv(), stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                             **run_as(self.user))  # type: ignore[call-overload]
        try:
            wait_for_ports([s.port for s in self.sites.values()], time.monotonic() + self.start_timeout,
                           self._process, f"nginx in {self.prefix}", self.error_log)
        except LabError:
            self.stop()
            raise
        return self

