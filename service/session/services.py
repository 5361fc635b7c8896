"""What every session needs, built once by the composition root."""

from __future__ import annotations

from dataclasses import dataclass

from service.endpointing.engines import VadEngines
from service.observability.metrics import SessionMetrics
from service.outputs.publisher import DevicePublisher
from service.recognition import TranscriptionBackend


@dataclass(frozen=True, slots=True)
class SessionServices:
    backend: TranscriptionBackend
    engines: VadEngines
    """Builds each session's VAD scorer (Silero on the shared batcher, WebRTC, remote); holds the ``vad_url`` check."""
    publisher: DevicePublisher
    final_timeout_s: float = 30.0
    metrics: SessionMetrics | None = None
