"""What every session shares, built once by the composition root."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from service.endpointing.engines import VadEngines
from service.observability.metrics import SessionMetrics
from service.outputs.publisher import DevicePublisher
from service.recognition import TranscriptionBackend


class Abortable(Protocol):
    def abort(self, reason: str) -> None:
        """End the turn now with a retryable error naming ``reason``."""


class RunningSessions:
    """Sessions from their start to their last message: what the drain ends when its time is up."""

    def __init__(self) -> None:
        self._sessions: set[Abortable] = set()

    def __len__(self) -> int:
        return len(self._sessions)

    def add(self, session: Abortable) -> None:
        self._sessions.add(session)

    def discard(self, session: Abortable) -> None:
        self._sessions.discard(session)

    def abort_all(self, reason: str) -> int:
        """Tell every running session to end with a retryable error; how many there were."""
        sessions = list(self._sessions)
        for session in sessions:
            session.abort(reason)
        return len(sessions)


@dataclass(frozen=True, slots=True)
class SessionServices:
    backend: TranscriptionBackend
    engines: VadEngines
    """Builds each session's VAD scorer (Silero on the shared batcher, WebRTC, remote); holds the ``vad_url`` check."""
    publisher: DevicePublisher
    final_timeout_s: float = 30.0
    """The deadline from the end of a turn to its final (``registry.final_timeout``)."""
    idle_timeout_s: float = 10.0
    """``session.idle_timeout_s``: with ``max_utterance_s`` and the final's deadline, a session's wall-clock limit."""
    metrics: SessionMetrics | None = None
    running: RunningSessions = field(default_factory=RunningSessions)
