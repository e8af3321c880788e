"""A private PostgreSQL cluster on loopback (Debian's PostgreSQL 15 binaries), for what must not be done to
the shared server on 127.0.0.1:5432: stopping or restarting it under a writer.

    with PostgresCluster() as cluster:      # initdb (trust auth, user postgres), then start on a free port
        cluster.url                         # postgresql://postgres@127.0.0.1:PORT/postgres
        cluster.restart()                   # pg_ctl restart -m fast: open connections are terminated
        cluster.stop(); cluster.start()

initdb refuses to run as root, so when this process is root the cluster's files belong to the ``postgres``
user and every pg_ctl runs as that user (runuser). About 2 s to initialise and start.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

from lab.ports import free_port
from lab.sshd import LabError

BIN = Path(os.environ.get("CERTPILOT_LAB_PG_BIN", "/usr/lib/postgresql/15/bin"))
OWNER = "postgres"  # the system user the cluster runs as when this process is root
TIMEOUT = 60.0


class PostgresCluster:
    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.directory: Path | None = None

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def data(self) -> Path:
        assert self.directory is not None, "the cluster was not created"
        return self.directory / "data"

    def _run(self, *command: str) -> None:
        argv = [str(BIN / command[0]), *command[1:]]
        if os.geteuid() == 0:
            argv = ["runuser", "-u", OWNER, "--", *argv]
        done = subprocess.run(argv, capture_output=True, timeout=TIMEOUT)
        if done.returncode != 0:
            raise LabError(f"{' '.join(command[:2])} failed ({done.returncode}): "
                           f"{(done.stderr or done.stdout).decode(errors='replace')[-2000:]}")

    def create(self) -> PostgresCluster:
        self.directory = Path(tempfile.mkdtemp(prefix="certpilot-pg-"))
        if os.geteuid() == 0:
            shutil.chown(self.directory, OWNER, OWNER)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8")
        return self

    def start(self) -> PostgresCluster:
        directory = self.data.parent
        options = f"-p {self.port} -k {directory} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(directory / "server.log"),
                  "-w", "-t", str(int(TIMEOUT)), "start")
        return self

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", str(int(TIMEOUT)), "stop")

    def restart(self) -> None:
        self.stop()
        self.start()

    def destroy(self) -> None:
        if self.directory is None:
            return
        try:
            if (self.data / "postmaster.pid").exists():
                self.stop()
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    def __enter__(self) -> PostgresCluster:
        try:
            return self.create().start()
        except BaseException:
            self.destroy()
            raise

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.destroy()
