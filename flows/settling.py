"""How a flow reads the end of a task run it submitted: one way for every flow.

A flow that only waits on futures ends Completed even when a task failed, so each future is settled
here: its result when it completed, else the exception it failed with (or, for a run that crashed or
was cancelled with none to give back, a PermanentError naming its state), never a raised error.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

from prefect.futures import PrefectFuture

from certpilot.errors import PermanentError

T = TypeVar("T")


class Settled(Generic[T]):
    """A finished task run: ``value`` when it completed, else ``error``."""

    __slots__ = ("value", "error")

    def __init__(self, value: T | None, error: BaseException | None) -> None:
        self.value = value
        self.error = error

    @property
    def ok(self) -> bool:
        return self.error is None


def settle(future: PrefectFuture[Any]) -> Settled[Any]:
    """Wait for ``future`` and return what it ended with, never raising."""
    future.wait()
    state = future.state
    if state.is_completed():
        return Settled(future.result(), None)
    try:
        error = future.result(raise_on_failure=False)
    except BaseException as raised:  # noqa: BLE001 - a crashed or cancelled run may raise instead
        error = raised
    if not isinstance(error, BaseException):
        error = PermanentError(f"{state.name}: {state.message or 'the task run ended without a result'}")
    return Settled(None, error)
