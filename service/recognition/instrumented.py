"""A backend wrapper that times each request and counts its failures by error code.

What it reports to is given as two callables, so recognition knows nothing of Prometheus
or of observability; the audio still flows straight into the wrapped backend's stream.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import numpy as np

from firmware_protocol import ErrorCode
from service.recognition.base import (
    BackendError,
    Recognition,
    RecognitionStream,
    SessionOptions,
    StreamListener,
    TranscriptionBackend,
)


class InstrumentedBackend(TranscriptionBackend):
    """``inner``, with each request's duration and each failure's code handed to the callables."""

    def __init__(
        self,
        inner: TranscriptionBackend,
        *,
        observe_latency: Callable[[float], None],
        count_error: Callable[[ErrorCode], None],
    ) -> None:
        self._inner = inner
        self.name = inner.name
        self._observe_latency = observe_latency
        self._count_error = count_error

    async def start(self) -> None:
        await self._inner.start()

    async def aclose(self) -> None:
        await self._inner.aclose()

    def open(self, options: SessionOptions, listener: StreamListener) -> RecognitionStream:
        return _InstrumentedStream(self._inner.open(options, listener), self)

    def observe(self, started: float, error: BaseException | None) -> None:
        self._observe_latency(time.perf_counter() - started)
        if error is not None:
            self._count_error(error.code if isinstance(error, BackendError) else ErrorCode.INTERNAL)


class _InstrumentedStream(RecognitionStream):
    def __init__(self, inner: RecognitionStream, owner: InstrumentedBackend) -> None:
        self._inner = inner
        self._owner = owner
        # The hot path: the inner stream's own bound method, so feeding costs no extra call.
        self.feed = inner.feed  # type: ignore[method-assign]

    def feed(self, pcm: np.ndarray) -> None:  # shadowed per instance in __init__
        self._inner.feed(pcm)

    async def finish(self) -> Recognition:
        started = time.perf_counter()
        try:
            result = await self._inner.finish()
        except Exception as exc:  # cancellation is not a request outcome: not observed
            self._owner.observe(started, exc)
            raise
        self._owner.observe(started, None)
        return result

    async def cancel(self) -> None:
        await self._inner.cancel()

    def speculate(self) -> asyncio.Task[Recognition] | None:
        task = self._inner.speculate()
        if task is not None:
            started = time.perf_counter()
            task.add_done_callback(lambda done: self._speculated(started, done))
        return task

    def _speculated(self, started: float, task: asyncio.Task[Recognition]) -> None:
        if not task.cancelled():  # a speculation dropped because speech resumed is no outcome either
            self._owner.observe(started, task.exception())
