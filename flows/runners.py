"""The task runner the flows submit their tasks to."""

from __future__ import annotations

import logging
from typing import Any

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

__all__ = ["thread_pool"]


class _ThreadTimeoutNotice(logging.Filter):
    """Drops Prefect's warning, logged at the start of every task run in a pool thread that has a
    timeout, that the timeout cannot interrupt blocking I/O. certpilot knows (DESIGN.md): every socket,
    SSH, HTTP and subprocess call has its own timeout, and a task's timeout is the backstop. Repeated on
    every task run, the notice buried the warnings that matter in the run logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith("Timeout of %s seconds configured for this "
                                                                          "task, but the task is running in a worker"))


logging.getLogger("prefect.task_runs").addFilter(_ThreadTimeoutNotice())


def thread_pool(max_workers: int) -> TaskRunner[Any]:
    """Prefect's ThreadPoolTaskRunner with ``max_workers`` threads, typed as the generic TaskRunner that
    ``@flow(task_runner=...)`` takes: @flow asks for a TaskRunner[PrefectFuture[Any]] and TaskRunner is
    invariant in its future type, so the pool's own type (its futures are PrefectConcurrentFutures) is refused."""
    return ThreadPoolTaskRunner(max_workers=max_workers)
