"""A real Prefect server on loopback (`prefect server start`), with its own PREFECT_HOME and SQLite
database, for what Prefect's test harness does not run: the harness's server is "ephemeral", without
the scheduler, so cron deployments never get runs there. This one runs every server service.

About 11 s to healthy on a new database. ``scheduler_loop_seconds`` shortens the scheduler's main loop
(60 s by default) so that a schedule added to an existing deployment gets its runs within seconds.
``database_url`` puts the server's database elsewhere than SQLite in its home, e.g. on PostgreSQL
(``postgresql+asyncpg://postgres@127.0.0.1:5432/NAME``; asyncpg comes with prefect), as a team runs it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from lab.ports import free_port


class PrefectServer:
    def __init__(self, home: Path, *, port: int | None = None, ui: bool = False,
                 scheduler_loop_seconds: float | None = None, database_url: str | None = None) -> None:
        self.home = home
        self.database_url = database_url or f"sqlite+aiosqlite:///{home / 'prefect.db'}"
        self.port = port or free_port()
        self.ui = ui
        self.scheduler_loop_seconds = scheduler_loop_seconds
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"

    @property
    def log(self) -> Path:
        return self.home / "server.log"

    def environment(self) -> dict[str, str]:
        """The server's environment: its own home and database, no telemetry, no UI unless asked."""
        env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
        env.update({"PREFECT_HOME": str(self.home),
                    "PREFECT_SERVER_DATABASE_CONNECTION_URL": self.database_url,
                    "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": str(self.ui).lower(),
                    "PREFECT_LOGGING_LEVEL": "WARNING"})
        if self.ui:  # the UI's own calls go to this server's API (by default it would call port 4200)
            env["PREFECT_UI_API_URL"] = self.api_url
        if self.scheduler_loop_seconds is not None:
            env["PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS"] = str(self.scheduler_loop_seconds)
        return env

    def start(self, timeout: float = 120.0) -> PrefectServer:
        self.home.mkdir(parents=True, exist_ok=True)
        prefect = shutil.which("prefect", path=str(Path(sys.executable).parent)) or "prefect"
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
                                            env=self.environment(), stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prefect server exited with {self.process.returncode}: see {self.log}")
            try:
                if httpx.get(f"{self.api_url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"prefect server on {self.url} not healthy after {timeout:.0f} s: see {self.log}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)  # its own session: the server and the processes it started
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def __enter__(self) -> PrefectServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
