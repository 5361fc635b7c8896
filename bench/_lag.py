"""Event-loop lag: how late a task that sleeps ``interval_s`` at a time wakes up."""

from __future__ import annotations

import asyncio
import time


class LagMonitor:
    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self.lags_ms: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            start = time.perf_counter()
            await asyncio.sleep(self.interval_s)
            self.lags_ms.append((time.perf_counter() - start - self.interval_s) * 1000)

    def start(self) -> None:
        self.lags_ms = []
        self._task = asyncio.create_task(self._run())

    def stop(self) -> list[float]:
        if self._task is not None:
            self._task.cancel()
        return self.lags_ms
