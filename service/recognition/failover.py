"""``[[asr.fallback]]``: try the next backend when one times out, fails (5xx/429) or is open-circuit.

A :class:`FailoverStream` keeps the utterance's audio, so a fallback that takes over at the
end still hears all of it. A circuit breaker per backend skips one that keeps failing
until its cool-down has passed; then a single trial decides whether it is back.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import numpy as np
import structlog

from service.recognition.base import (
    BackendError,
    Recognition,
    RecognitionStream,
    SessionOptions,
    StreamListener,
    TranscriptionBackend,
)

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class CircuitBreaker:
    threshold: int = 3
    """Consecutive failures that open the circuit."""
    cooldown_s: float = 30.0
    failures: int = 0
    open_until: float = 0.0

    def allows(self) -> bool:
        """Closed, or open with the cool-down over (half-open: one trial goes through)."""
        if self.failures < self.threshold:
            return True
        if time.monotonic() >= self.open_until:
            self.open_until = time.monotonic() + self.cooldown_s  # one trial per cool-down
            return True
        return False

    def succeeded(self) -> None:
        self.failures = 0

    def failed(self) -> None:
        self.failures += 1
        if self.failures >= self.threshold:
            self.open_until = time.monotonic() + self.cooldown_s


class FailoverBackend(TranscriptionBackend):
    def __init__(self, backends: list[TranscriptionBackend], *, threshold: int = 3, cooldown_s: float = 30.0) -> None:
        if not backends:
            raise ValueError("at least one backend")
        self.backends = backends
        self.name = backends[0].name
        self.breakers = {id(b): CircuitBreaker(threshold, cooldown_s) for b in backends}
        self.failovers = 0

    async def start(self) -> None:
        for backend in self.backends:
            await backend.start()

    async def aclose(self) -> None:
        for backend in self.backends:
            await backend.aclose()

    def open(self, options: SessionOptions, listener: StreamListener) -> RecognitionStream:
        return FailoverStream(self, options, listener)

    def candidates(self, after: TranscriptionBackend | None = None) -> list[TranscriptionBackend]:
        """Backends to try, in order, after ``after``; open circuits are skipped (unless all are)."""
        rest = self.backends if after is None else self.backends[self.backends.index(after) + 1 :]
        allowed = [b for b in rest if self.breakers[id(b)].allows()]
        return allowed or rest[-1:]  # nothing allowed: the last resort still gets a chance


class FailoverStream(RecognitionStream):
    def __init__(self, owner: FailoverBackend, options: SessionOptions, listener: StreamListener) -> None:
        self._owner = owner
        self._options = options
        self._listener = listener
        self._audio: list[np.ndarray] = []
        self._backend = owner.candidates()[0]
        self._stream = self._backend.open(options, listener)

    def feed(self, pcm: np.ndarray) -> None:
        self._audio.append(pcm)
        self._stream.feed(pcm)

    async def cancel(self) -> None:
        await self._stream.cancel()

    def speculate(self) -> asyncio.Task[Recognition] | None:
        """The current backend's speculation; if it fails, the session falls back to :meth:`finish`."""
        return self._stream.speculate()

    async def finish(self) -> Recognition:
        while True:
            breaker = self._owner.breakers[id(self._backend)]
            try:
                result = await self._stream.finish()
            except BackendError as exc:
                if exc.failover:
                    breaker.failed()
                following = self._owner.candidates(after=self._backend)
                if not exc.failover or not following:
                    raise
                self._take_over(following[0], exc)
                continue
            breaker.succeeded()
            return Recognition(result.text, result.language, result.reason, result.backend or self._backend.name)

    def _take_over(self, backend: TranscriptionBackend, exc: BackendError) -> None:
        log.warning(
            "asr.failover",
            failed=self._backend.name,
            next=backend.name,
            code=exc.code.value,
            device=self._options.device_id,
        )
        self._owner.failovers += 1
        self._backend = backend
        self._stream = backend.open(self._options, self._listener)
        for pcm in self._audio:
            self._stream.feed(pcm)
