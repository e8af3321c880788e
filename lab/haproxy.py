"""A real haproxy (Debian's 2.6) with its own prefix, started as the lab's SSH user, for tests,
benchmarks and the demo.

``HaproxyInstance(prefix, name, user=...)`` writes ``PREFIX/haproxy.cfg``: one TLS frontend on a free
port of 127.0.0.1 whose ``crt`` is ``PREFIX/certs/<name>.pem`` (certificate, chain and key in one file,
0600), answering every request itself; ``also_serves=(...)`` adds a ``crt`` per further name on the same
bind, chosen by SNI (``name``'s is the default), each swapped on its own (``deploy_settings(other)``); the
stats socket ``PREFIX/admin.sock`` at ``level admin`` for the runtime API (``set ssl cert`` / ``commit ssl
cert`` swap a certificate in memory, no reload; one transaction at a time per haproxy); and the pid file.
It runs in the foreground in master-worker mode (``-W``) as the given user, so that ``kill -USR2 $(cat
PIDFILE)`` reloads it (the fallback when no runtime API is used).
"""

from __future__ import annotations

import shlex
import shutil
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from lab.nginx import ServerProcess, chown_tree, placeholder_pair, run_as, wait_for_ports
from lab.sshd import LabError, free_port

_HAPROXY = shutil.which("haproxy", path="/usr/sbin:/usr/bin:/sbin:/bin") or "haproxy"


class HaproxyInstance(ServerProcess):
    """``with HaproxyInstance(prefix, "lb.test", user=server.user) as haproxy:`` serves haproxy.pem_path."""

    def __init__(self, prefix: Path, name: str = "lb.test", *, user: str | None = None,
                 pair: tuple[bytes, bytes] | None = None, start_timeout: float = 10.0,
                 also_serves: Sequence[str] = (), pairs: Mapping[str, tuple[bytes, bytes]] | None = None) -> None:
        self.prefix = Path(prefix).resolve()
        self.name = name
        self.names = (name, *[n for n in also_serves if n != name])
        self.user = user
        self.port = free_port()
        self.start_timeout = start_timeout
        self._pairs = dict(pairs or {})
        if pair is not None:
            self._pairs[name] = pair
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def conf(self) -> Path:
        return self.prefix / "haproxy.cfg"

    @property
    def pem_path(self) -> Path:
        return self.pem_path_of(self.name)

    def pem_path_of(self, name: str) -> Path:
        """The crt file served for SNI ``name`` (one of ``names``)."""
        if name not in self.names:
            raise KeyError(f"haproxy in {self.prefix} does not serve {name!r}")
        return self.prefix / "certs" / f"{name}.pem"

    @property
    def socket_path(self) -> Path:
        return self.prefix / "admin.sock"

    @property
    def pid_file(self) -> Path:
        return self.prefix / "haproxy.pid"

    @property
    def reload_command(self) -> str:
        return f"kill -USR2 $(cat {shlex.quote(str(self.pid_file))})"

    def deploy_settings(self, name: str | None = None) -> dict[str, object]:
        """Settings of an ``ssh-haproxy`` target for this instance's ``name`` (default: its first)."""
        name = name or self.name
        return {"pem_path": str(self.pem_path_of(name)), "runtime_socket": str(self.socket_path),
                "reload_command": self.reload_command, "verify_host": "127.0.0.1", "verify_port": self.port,
                "verify_sni": name}

    def runtime(self, command: str, timeout: float = 5.0) -> str:
        """One runtime API command on the stats socket (from this machine, for tests): the answer."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(timeout)
            sock.connect(str(self.socket_path))
            sock.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")

    def worker_pid(self) -> int:
        """The pid of the process serving traffic (``show info``): a reload changes it, the runtime API does not."""
        for line in self.runtime("show info").splitlines():
            if line.startswith("Pid:"):
                return int(line.split(":", 1)[1])
        raise LabError("haproxy's show info has no Pid line")

    def start(self) -> HaproxyInstance:
        for sub in ("certs", "logs"):
            (self.prefix / sub).mkdir(parents=True, exist_ok=True)
        for name in self.names:
            cert_pem, key_pem = self._pairs.get(name) or placeholder_pair(name)
            path = self.pem_path_of(name)
            path.touch(mode=0o600)
            path.chmod(0o600)
            path.write_bytes(cert_pem + key_pem)
        self._pairs.clear()
        crts = " ".join(f"crt {_quoted(self.pem_path_of(name))}" for name in self.names)
        self.conf.write_text(f"""global
    stats socket {_quoted(self.socket_path)} mode 600 level admin
    pidfile {_quoted(self.pid_file)}
    ssl-default-bind-options ssl-min-ver TLSv1.2
    maxconn 512

defaults
    mode http
    timeout connect 2s
    timeout client 5s
    timeout server 5s

frontend tls
    bind 127.0.0.1:{self.port} ssl {crts}
    http-request return status 200 content-type text/plain string "{self.name}"
""")
        chown_tree(self.prefix, self.user)
        log = self.prefix / "logs" / "stderr.log"
        with open(log, "ab") as out:
            self._process = subprocess.Popen([_HAPROXY, "-W", "-f", str(self.conf)], stdin=subprocess.DEVNULL,
                                             stdout=out, stderr=out, **run_as(self.user))  # type: ignore[call-overload]
        try:
            wait_for_ports([self.port], time.monotonic() + self.start_timeout, self._process,
                           f"haproxy in {self.prefix}", log)
            deadline = time.monotonic() + self.start_timeout
            while not self.socket_path.exists():
                if time.monotonic() > deadline:
                    raise LabError(f"haproxy in {self.prefix} has no stats socket at {self.socket_path}")
                time.sleep(0.01)
        except LabError:
            self.stop()
            raise
        return self


def _quoted(path: Path) -> str:
    """A path as one word of haproxy's configuration (a prefix with a space works; $ is not expanded)."""
    text = str(path).replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$")
    return f'"{text}"'
