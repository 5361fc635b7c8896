"""Reconnect delays: exponential, jittered, back to the first delay once a connection worked.

Jitter spreads the reconnects of many clients that lost the same broker at the same moment:
``half`` waits between half and all of the current delay, ``full`` anywhere from zero to it.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Literal

Jitter = Literal["full", "half"]


class Backoff:
    def __init__(
        self,
        first_s: float,
        max_s: float,
        *,
        jitter: Jitter = "half",
        uniform: Callable[[float, float], float] = random.uniform,
    ) -> None:
        self._first = first_s
        self._max = max(first_s, max_s)
        self._low = 0.0 if jitter == "full" else 0.5
        self._uniform = uniform
        self.delay = first_s
        """The ceiling of the next wait (before jitter): what a log line reports as the retry delay."""

    def reset(self) -> None:
        """A connection succeeded: the next loss starts again from the first delay."""
        self.delay = self._first

    def next_wait(self) -> float:
        """The jittered wait for this attempt; doubles the delay (up to the max) for the next one."""
        wait = self.delay * self._uniform(self._low, 1.0)
        self.delay = min(self.delay * 2, self._max)
        return wait

    async def sleep(self) -> None:
        await asyncio.sleep(self.next_wait())
