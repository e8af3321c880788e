"""Whether the CLI has a Prefect API to run flows against, and Prefect's setup when it has none.

With a Prefect API (PREFECT_API_URL from the environment, a Prefect profile or a test harness), the
CLI runs flows there, so their runs appear in the operator's UI. Without one it runs the core
directly: no flow run is created and the user's own Prefect database is never written to. Blocks
are still read through Prefect (``Block.load``), which then starts a temporary local server; that
server sends no analytics (its telemetry is what logged "database is locked" tracebacks).
"""

from __future__ import annotations

import os
from typing import Any

import httpx
from rich.text import Text

from certpilot.errors import CertpilotError, PermanentError, ServiceUnavailableError, redact
from cli.console import err

ANALYTICS = "PREFECT_SERVER_ANALYTICS_ENABLED"
STARTUP_TIMEOUT = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"  # Prefect's default, 20 s, is too short
# for a new database on a busy machine (30 s measured on 2 cores under load)
NO_HISTORY = ("PREFECT_API_URL is not set: running directly, without Prefect run history; point it at your "
              "Prefect server to keep the runs there")


def quiet() -> None:
    """Turn off the analytics of any Prefect server this process starts, and give it time to start,
    unless the environment says otherwise. Effective only before Prefect is first imported:
    ``configured()`` calls it first."""
    os.environ.setdefault(ANALYTICS, "false")
    os.environ.setdefault(STARTUP_TIMEOUT, "120")


def configured() -> bool:
    """True when a Prefect API is configured: the CLI then runs flows, and their runs are kept there."""
    quiet()
    from prefect.settings import PREFECT_API_URL

    return bool(PREFECT_API_URL.value())


def no_history_note() -> None:
    """Say on stderr that this run keeps no Prefect run history (there is no Prefect API)."""
    err.print(Text.assemble(("note: ", "yellow"), NO_HISTORY))


def flow_result(state: Any, error_type: type[CertpilotError] = CertpilotError) -> Any:
    """The result of a flow run the CLI ran (``return_state=True``), or the error it failed with when
    that is an ``error_type`` (certpilot's own, typed, by default); else a PermanentError with the
    run's state message."""
    if state.is_completed():
        return state.result()
    try:
        error = state.result(raise_on_failure=False)
    except BaseException as raised:  # noqa: BLE001 - a crashed run may raise instead
        error = raised
    if isinstance(error, error_type):
        raise error
    if isinstance(error, (httpx.TransportError, httpx.HTTPStatusError)):  # the run lost its Prefect server
        from prefect.settings import PREFECT_API_URL

        where = f"the Prefect API at {PREFECT_API_URL.value()}"
        raise ServiceUnavailableError("prefect", "flow run", type(error).__name__, redact(error), where=where,
                                      message=f"{state.name}: {where} did not answer the run "
                                              f"({redact(error)})")
    raise PermanentError(f"{state.name}: {state.message or 'the flow run ended without a result'}")
