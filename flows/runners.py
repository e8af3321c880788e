"""The task runner the flows submit their tasks to."""

from __future__ import annotations

from typing import Any

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

__all__ = ["thread_pool"]


def thread_pool(max_workers: int) -> TaskRunner[Any]:
    """Prefect's ThreadPoolTaskRunner with ``max_workers`` threads, typed as the generic TaskRunner that
    ``@flow(task_runner=...)`` takes: @flow asks for a TaskRunner[PrefectFuture[Any]] and TaskRunner is
    invariant in its future type, so the pool's own type (its futures are PrefectConcurrentFutures) is refused."""
    return ThreadPoolTaskRunner(max_workers=max_workers)
