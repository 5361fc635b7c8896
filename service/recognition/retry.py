"""Retries with exponential backoff and full jitter that honour the server's own advice.

One policy for every backend: HTTP (``Retry-After``, ``retry-after-ms``) and WebSocket
reconnects alike. Whether an error is worth retrying is the caller's decision, carried
by :class:`~service.recognition.base.BackendError` (``retryable``).
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from service.recognition.base import BackendError

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    attempts: int = 3
    base_s: float = 0.25
    max_s: float = 4.0
    max_server_delay_s: float = 10.0
    """A Retry-After longer than this is not waited for: the error is returned instead."""

    def backoff(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(max, base·2^attempt)] (attempt counts from 0)."""
        return random.uniform(0, min(self.max_s, self.base_s * 2**attempt))

    async def run(self, call: Callable[[], Awaitable[T]]) -> T:
        """Run ``call``; on a retryable :class:`BackendError` wait and try again.

        The wait is the server's ``retry_after_s`` when the error carries one, else backoff.
        """
        for attempt in range(self.attempts):
            try:
                return await call()
            except BackendError as exc:
                last = attempt == self.attempts - 1
                hinted = exc.retry_after_s
                if not exc.retryable or last or (hinted is not None and hinted > self.max_server_delay_s):
                    raise
                await asyncio.sleep(hinted if hinted is not None else self.backoff(attempt))
        raise AssertionError("unreachable")


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """``retry-after-ms`` (OpenAI) wins over ``Retry-After`` (seconds or an HTTP date)."""
    if (ms := headers.get("retry-after-ms")) is not None:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value) if value else None
        return max(0.0, parsed.timestamp() - time.time()) if parsed else None
