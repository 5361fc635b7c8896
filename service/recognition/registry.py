"""Which backend serves an ``[asr]`` table: one per settings struct, its ``[[asr.fallback]]`` list behind it.

Engine modules load lazily, so the SDK-free code of unused backends stays cold.
"""

from __future__ import annotations

from collections.abc import Callable

from service.config import (
    AsrConfig,
    OpenAISettings,
    ParaformerSettings,
    PocketsphinxSettings,
)
from service.recognition.base import TranscriptionBackend

Wrap = Callable[[TranscriptionBackend], TranscriptionBackend]


def build_backends(asr: AsrConfig, wrap: Wrap | None = None) -> TranscriptionBackend:
    """The primary backend, followed by its ``[[asr.fallback]]`` list when there is one.

    ``wrap`` is applied to each backend on its own (the bridge times each under its own name).
    """

    def build(table: AsrConfig) -> TranscriptionBackend:
        backend = build_backend(table)
        return wrap(backend) if wrap is not None else backend

    primary = build(asr)
    if not asr.fallback:
        return primary
    from service.recognition.failover import FailoverBackend

    return FailoverBackend([primary, *(build(fallback) for fallback in asr.fallback)])


def build_backend(asr: AsrConfig) -> TranscriptionBackend:
    """One backend from one ``[asr]`` table's settings."""
    settings = asr.backend
    if isinstance(settings, PocketsphinxSettings):
        from service.recognition.pocketsphinx import PocketsphinxBackend

        return PocketsphinxBackend(settings)
    if isinstance(settings, OpenAISettings):
        from service.recognition.openai import OpenAIBackend

        return OpenAIBackend(settings)
    if isinstance(settings, ParaformerSettings):
        from service.recognition.paraformer import ParaformerBackend

        return ParaformerBackend(settings, language=asr.lang)
    from service.recognition.elevenlabs import ElevenLabsBackend

    return ElevenLabsBackend(settings)


POCKETSPHINX_FINAL_S = 10.0
"""Pocketsphinx's share of the deadline: waiting for a decoder and decoding the queued audio (no HTTP, no retries)."""
MIN_FINAL_TIMEOUT_S = 30.0
"""The deadline PROTOCOL.md promises at least: the end of the turn to its final or ``backend_unavailable``."""


def final_timeout(asr: AsrConfig) -> float:
    """The deadline from the end of a turn to its final: every attempt of every backend, with backoff, and slack.

    A network backend's share is each attempt's ``timeout_s`` plus its backoff, times its attempts;
    pocketsphinx has neither and takes :data:`POCKETSPHINX_FINAL_S`.
    """
    tables = (asr.backend, *(fallback.backend for fallback in asr.fallback))
    per_backend = [
        POCKETSPHINX_FINAL_S if isinstance(b, PocketsphinxSettings) else (b.timeout_s + 4.0) * (b.max_retries + 1)
        for b in tables
    ]
    return max(MIN_FINAL_TIMEOUT_S, sum(per_backend) + 5.0)
