"""Background-task bookkeeping: fire-and-forget work that is still owned, awaited and cancelled.

``asyncio.create_task`` alone keeps only a weak reference (a task can be collected mid-flight) and
nobody learns of its failure. A :class:`TaskSet` holds each task until it is done, logs what it
raised, and lets its owner wait for or cancel everything it started.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import structlog

log = structlog.get_logger(__name__)


class TaskSet:
    def __init__(self, name: str) -> None:
        self._name = name
        self._tasks: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, coro: Coroutine[Any, Any, Any], *, name: str | None = None) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            log.error("task.failed", owner=self._name, task=task.get_name(), error=repr(error))

    def pending(self) -> list[asyncio.Task[Any]]:
        return [task for task in self._tasks if not task.done()]

    async def wait(self, timeout: float | None = None) -> None:
        """Wait for what is running now, at most ``timeout`` seconds; what is still running keeps running."""
        if pending := self.pending():
            await asyncio.wait(pending, timeout=timeout)

    def cancel(self) -> None:
        for task in self._tasks:
            task.cancel()
