"""The backend interface: a stream per utterance, audio in, partials out, one final.

Streaming engines (pocketsphinx, DashScope, ElevenLabs realtime) decode as audio
arrives; batch engines (OpenAI-compatible HTTP) subclass :class:`BatchStream`, which
buffers and transcribes the whole utterance in :meth:`finish`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from firmware_protocol import EndReason, ErrorCode

PartialCallback = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class SessionOptions:
    language: str | None = None
    prompt: str | None = None


@dataclass(frozen=True, slots=True)
class Recognition:
    text: str
    language: str | None = None
    reason: EndReason | None = None
    """Set with an empty text when the backend heard no speech."""


class BackendError(Exception):
    """A failed recognition, reported to the device with ``code`` and ``retryable``."""

    def __init__(self, message: str, *, code: ErrorCode = ErrorCode.BACKEND_ERROR, retryable: bool = True) -> None:
        super().__init__(message)
        self.code = code
        self.retryable = retryable


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

    @abc.abstractmethod
    async def transcribe(self, audio: np.ndarray) -> Recognition: ...


class TranscriptionBackend(abc.ABC):
    name: str

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Load models or open pools before the bridge reports ready."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release pools, processes and sockets."""

    @abc.abstractmethod
    def open(self, options: SessionOptions, on_partial: PartialCallback) -> RecognitionStream: ...
