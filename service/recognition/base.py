"""The backend interface: a stream per utterance, audio in, partials out, one final.

Streaming engines (pocketsphinx, DashScope, ElevenLabs realtime) decode as audio
arrives; batch engines (OpenAI-compatible HTTP) subclass :class:`BatchStream`, which
buffers and transcribes the whole utterance in :meth:`finish`.
"""

from __future__ import annotations

import abc
import asyncio
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from firmware_protocol import EndReason, ErrorCode


class StreamListener(Protocol):
    """What a recognition stream may tell its session while audio still flows."""

    def partial(self, text: str) -> None:
        """A new interim hypothesis."""

    def end_of_turn(self) -> None:
        """The engine decided the speaker finished (DashScope ``sentence_end``, a VAD commit)."""


@dataclass(frozen=True, slots=True)
class SessionOptions:
    language: str | None = None
    prompt: str | None = None
    device_id: str = ""
    """Lets engines keep per-device state, e.g. one DashScope socket per device across turns."""


@dataclass(frozen=True, slots=True)
class Recognition:
    text: str
    language: str | None = None
    reason: EndReason | None = None
    """Set with an empty text when the backend heard no speech."""
    backend: str | None = None
    """The backend that produced it, when not the configured primary (failover)."""


class BackendError(Exception):
    """A failed recognition, reported to the device with ``code`` and ``retryable``."""

    def __init__(
        self,
        message: str,
        *,
        code: ErrorCode = ErrorCode.BACKEND_ERROR,
        retryable: bool = True,
        failover: bool | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.retryable = retryable
        self.retry_after_s = retry_after_s
        """The server's advice (``Retry-After``); the retry policy waits this long instead of backing off."""
        self.failover = retryable if failover is None else failover
        """Whether another backend should be tried (timeouts, 5xx, 429: yes; a rejected request: no)."""


class RecognitionStream(abc.ABC):
    """One utterance. ``feed`` must not block: engines queue and decode in the background."""

    @abc.abstractmethod
    def feed(self, pcm: np.ndarray) -> None:
        """Queue int16 mono 16 kHz samples."""

    @abc.abstractmethod
    async def finish(self) -> Recognition:
        """No more audio: return the final recognition."""

    @abc.abstractmethod
    async def cancel(self) -> None:
        """Abandon the utterance and release what it holds."""

    def speculate(self) -> asyncio.Task[Recognition] | None:
        """Start recognising the audio so far while more may still come (EchoKit's hangover).

        The session commits the result if the silence lasts, or cancels it if speech resumes.
        ``None``: the engine decodes as audio arrives, so its final is already cheap.
        """
        return None


class BatchStream(RecognitionStream):
    """Buffers the utterance; subclasses transcribe it whole."""

    def __init__(self) -> None:
        self._chunks: list[np.ndarray] = []

    def feed(self, pcm: np.ndarray) -> None:
        self._chunks.append(pcm)

    async def finish(self) -> Recognition:
        audio = np.concatenate(self._chunks) if self._chunks else np.zeros(0, dtype=np.int16)
        self._chunks = []
        return await self.transcribe(audio)

    async def cancel(self) -> None:
        self._chunks = []

    def speculate(self) -> asyncio.Task[Recognition] | None:
        audio = np.concatenate(self._chunks) if self._chunks else np.zeros(0, dtype=np.int16)
        return asyncio.create_task(self.transcribe(audio))

    @abc.abstractmethod
    async def transcribe(self, audio: np.ndarray) -> Recognition: ...


class TranscriptionBackend(abc.ABC):
    name: str
    failovers: int = 0
    """Utterances handed on to the next backend: only a failover chain has any."""

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Load models or open pools before the bridge reports ready."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release pools, processes and sockets."""

    @abc.abstractmethod
    def open(self, options: SessionOptions, listener: StreamListener) -> RecognitionStream: ...
