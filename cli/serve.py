"""The long-running commands: ``certpilot serve`` (every deployment, served through Prefect's runner, and
the HTTP listener) and ``certpilot exporter`` (the listener's /metrics and /healthz alone).

``serve`` runs Prefect's ``Runner`` and the uvicorn listener in one event loop: the runner registers
every deployment of prefect.yaml with the Prefect server (PREFECT_API_URL), then polls for their
scheduled runs and for runs started from the UI or the API, and executes each in a subprocess. It
needs a real Prefect server (its scheduler creates the runs); without PREFECT_API_URL it refuses to
start rather than run a temporary server that no schedule reaches. SIGTERM or SIGINT stops both parts:
runs still in progress are cancelled (Prefect marks them Cancelled), scheduled ones stay scheduled, and
the schedules stay active, so the next start runs whatever came due while it was down.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Annotated, Any, Optional

import typer

from certpilot.database import get_engine
from certpilot.errors import CertpilotError, PermanentError, redact
from cli import prefect_api
from cli.console import err, line, note, usage_error, warn
from cli.options import actor, ring

STOP_SECONDS = 20.0  # to let the listener and the runner finish stopping after SIGTERM
ListenOption = Annotated[str, typer.Option(metavar="HOST:PORT", help=(
    "Where the HTTP listener listens (/metrics, /healthz, the CAs' CRLs, certificates and OCSP)."))]


def _log_to_stderr() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    for chatty in ("httpx", "alembic"):  # a line per API call, per migration step
        logging.getLogger(chatty).setLevel(logging.WARNING)


def http_service(listen: str, *, ca: bool, metrics: bool, request_seconds: float = 10.0) -> Any:
    """certpilot's HTTP listener (an HTTPService, bound, not yet serving) for the configured inventory."""
    from connectors.http_service import HTTPService, Limits, build_app, parse_listen

    try:
        address = parse_listen(listen)
    except ValueError as exc:
        raise usage_error(str(exc), "--listen") from None
    _log_to_stderr()
    app = build_app(get_engine(), ca=ca, metrics=metrics, key_ring=ring, actor=actor(), request_seconds=request_seconds)
    try:
        return HTTPService(app, address, limits=Limits(request_seconds=request_seconds))
    except OSError as exc:
        raise PermanentError(f"cannot listen on {listen}: {exc.strerror or exc}") from None


Part = tuple[Coroutine[Any, Any, None], Callable[[], Awaitable[None] | None]]


def run_until_signalled(*parts: Part, prepare: Callable[[], Awaitable[None]] | None = None) -> None:
    """Await ``prepare()``, then run each (coroutine, stop) part in one event loop until SIGTERM or SIGINT,
    or until one part ends by itself (a failure, raised); then stop every part and wait for it
    (STOP_SECONDS at most). A signal during ``prepare`` stops before anything runs."""
    asyncio.run(_until_signalled(parts, prepare))


async def _until_signalled(parts: tuple[Part, ...], prepare: Callable[[], Awaitable[None]] | None) -> None:
    loop = asyncio.get_running_loop()
    signalled = asyncio.Event()

    def listen() -> None:
        for number in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(number, signalled.set)

    listen()
    waiting = asyncio.create_task(signalled.wait())
    tasks: list[asyncio.Task[None]] = []
    try:
        if prepare is not None:
            preparing = asyncio.ensure_future(prepare())
            await asyncio.wait([preparing, waiting], return_when=asyncio.FIRST_COMPLETED)
            if signalled.is_set():
                preparing.cancel()
                err.print(line("stopped (signal received while starting)"))
                return
            preparing.result()
        tasks = [asyncio.create_task(coroutine) for coroutine, _ in parts]
        await asyncio.sleep(0)  # each part begins: Prefect's runner sets a SIGTERM handler of its own there
        listen()  # ours again
        await asyncio.wait([*tasks, waiting], return_when=asyncio.FIRST_COMPLETED)
        if signalled.is_set():
            err.print(line("stopping (signal received)"))
        for _, stop in parts:
            stopped = stop()
            if stopped is not None:
                try:
                    await asyncio.wait_for(stopped, STOP_SECONDS)
                except Exception as exc:  # stopping one part must not keep the others running
                    err.print(line(f"error while stopping: {exc}"))
        done, pending = await asyncio.wait(tasks, timeout=STOP_SECONDS)
        for task in pending:
            task.cancel()
        failures = [task.exception() for task in done if not task.cancelled() and task.exception() is not None]
        if failures and not signalled.is_set():
            raise failures[0]  # type: ignore[misc]
        if failures:
            err.print(line(f"while stopping: {failures[0]}"))
        if not signalled.is_set():
            raise PermanentError("a part of the service stopped by itself: see the log above")
    finally:
        waiting.cancel()
        for coroutine, _ in parts[len(tasks):]:
            coroutine.close()  # never started
        for number in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(number)


def _require_prefect_api() -> str:
    """The Prefect API's URL, once it answers; a PermanentError (exit 1) saying what to do otherwise."""
    import httpx

    if not prefect_api.configured():
        raise PermanentError("certpilot serve needs a Prefect server: set PREFECT_API_URL (e.g. "
                             "http://127.0.0.1:4200/api, where `prefect server start` listens); its scheduler "
                             "creates the runs that this process executes")
    from prefect.settings import PREFECT_API_URL

    url = str(PREFECT_API_URL.value()).rstrip("/")
    try:
        response = httpx.get(f"{url}/health", timeout=10)
        response.raise_for_status()
    except httpx.HTTPError as exc:
        raise PermanentError(f"the Prefect API at {url} does not answer ({type(exc).__name__}: {exc}); start it "
                             "with `prefect server start` or fix PREFECT_API_URL") from None
    return url


def _apply_automations() -> None:
    """Prefect's automations for certpilot's runs (deployments.automations), created or updated; a failure
    is reported, and serving goes on without them."""
    from deployments import automations

    try:
        changes = automations.apply()
    except Exception as exc:
        warn(f"Prefect automations not applied: {redact(exc)}")
        return
    skipped = [change for change in changes if change.change == "skipped"]
    if skipped:
        note(f"Prefect automations not created: {skipped[0].reason}")
    else:
        err.print(line("Prefect automations: " + ", ".join(f"{c.name} ({c.change})" for c in changes)))


def serve_command(
    listen: ListenOption = "127.0.0.1:8180",
    no_http: Annotated[bool, typer.Option("--no-http", help="Serve the deployments only: no HTTP listener.")] = False,
    limit: Annotated[Optional[int], typer.Option(metavar="N", min=1, help=(
        "At most N flow runs at once (default: PREFECT_RUNNER_PROCESS_LIMIT, 5)."))] = None,
) -> None:
    """Serve every deployment (their schedules fire, and runs started from the Prefect UI execute here) and the
    HTTP listener (/metrics, /healthz, the CAs' CRLs and OCSP), until SIGTERM or Ctrl+C. Needs PREFECT_API_URL."""
    service = None if no_http else http_service(listen, ca=True, metrics=True)  # a bad --listen first: exit 2
    api = _require_prefect_api()
    _log_to_stderr()
    from prefect.runner import Runner

    from deployments import runner_deployments

    _apply_automations()
    served = runner_deployments()
    # Schedules stay active when it stops (pause_on_shutdown=False): runs that come due meanwhile wait as Late
    # and run at the next start.
    runner = Runner(name="certpilot-serve", pause_on_shutdown=False, limit=limit)

    async def register() -> None:
        for deployment in served:
            try:
                await runner.aadd_deployment(deployment)
            except Exception as exc:
                raise PermanentError(f"registering deployment {deployment.name} with the Prefect API at {api} "
                                     f"failed: {redact(exc)}") from exc
        err.print(line(f"serving {len(served)} deployments from the Prefect API at {api}: "
                       + ", ".join(f"{d.flow_name}/{d.name}" for d in served)))

    async def stop_runner() -> None:
        if runner.started:
            await runner.astop()

    parts: list[Part] = [(runner.start(), stop_runner)]
    if service is not None:
        err.print(line(f"HTTP listener on {service.url}: /metrics, /healthz, the CAs' CRLs, certificates and OCSP"))
        parts.append((service.serve(), service.stop))
    err.print(line("SIGTERM or Ctrl+C stops it"))
    try:
        run_until_signalled(*parts, prepare=register)
    except CertpilotError:
        raise
    except Exception as exc:  # Prefect's runner or the listener failed: one line, exit 1
        raise PermanentError(f"certpilot serve stopped: {redact(exc)}") from exc
    err.print(line("stopped"))


def exporter_command(listen: ListenOption = "127.0.0.1:9793") -> None:
    """Serve /metrics (Prometheus) and /healthz alone, until SIGTERM or Ctrl+C."""
    service = http_service(listen, ca=False, metrics=True)
    err.print(line(f"serving /metrics and /healthz on {service.url} (Ctrl+C to stop)"))
    run_until_signalled((service.serve(), service.stop))
