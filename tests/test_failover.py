"""Failover between backends and the circuit breaker, with scripted in-process engines."""

from __future__ import annotations

import numpy as np
import pytest

from firmware_protocol import ErrorCode
from service.config import parse_config
from service.recognition import BackendError, Recognition, SessionOptions
from service.recognition.base import BatchStream, RecognitionStream, StreamListener, TranscriptionBackend
from service.recognition.failover import FailoverBackend
from service.recognition.registry import POCKETSPHINX_FINAL_S, build_backends, final_timeout


class ScriptedBackend(TranscriptionBackend):
    """Answers with the sample count it heard, or raises the next scripted error."""

    def __init__(self, name: str, errors: list[BackendError] | None = None) -> None:
        self.name = name
        self.errors = list(errors or [])
        self.calls = 0

    def open(self, options: SessionOptions, listener: StreamListener) -> RecognitionStream:
        backend = self

        class Stream(BatchStream):
            async def transcribe(self, audio: np.ndarray) -> Recognition:
                backend.calls += 1
                if backend.errors:
                    raise backend.errors.pop(0)
                return Recognition(f"{backend.name} heard {len(audio)}")

        return Stream()


class Listener:
    def partial(self, text: str) -> None:
        pass

    def end_of_turn(self) -> None:
        pass


async def _utterance(backend: FailoverBackend, chunks: int = 3) -> Recognition:
    stream = backend.open(SessionOptions(device_id="d"), Listener())
    for _ in range(chunks):
        stream.feed(np.zeros(320, dtype=np.int16))
    return await stream.finish()


async def test_fallback_takes_over_with_all_the_audio_and_names_itself() -> None:
    primary = ScriptedBackend("openai", [BackendError("HTTP 503", code=ErrorCode.BACKEND_UNAVAILABLE)])
    fallback = ScriptedBackend("pocketsphinx")
    failover = FailoverBackend([primary, fallback])
    result = await _utterance(failover)
    assert result.text == "pocketsphinx heard 960" and result.backend == "pocketsphinx"
    assert failover.failovers == 1
    assert (primary.failovers, fallback.failovers) == (0, 0)  # every backend has the count; only a chain counts
    again = await _utterance(failover)
    assert again.backend == "openai"  # one failure does not open the circuit


async def test_rejected_request_does_not_fail_over() -> None:
    primary = ScriptedBackend("openai", [BackendError("HTTP 401", code=ErrorCode.BACKEND_AUTH, retryable=False)])
    fallback = ScriptedBackend("pocketsphinx")
    with pytest.raises(BackendError) as caught:
        await _utterance(FailoverBackend([primary, fallback]))
    assert caught.value.code is ErrorCode.BACKEND_AUTH and fallback.calls == 0


async def test_breaker_opens_after_repeated_failures_and_tries_again_after_cooldown() -> None:
    timeout = BackendError("timed out", code=ErrorCode.BACKEND_TIMEOUT)
    primary = ScriptedBackend("openai", [timeout] * 3)
    fallback = ScriptedBackend("pocketsphinx")
    failover = FailoverBackend([primary, fallback], threshold=3, cooldown_s=0.0)
    for _ in range(3):
        assert (await _utterance(failover)).backend == "pocketsphinx"
    assert primary.calls == 3
    failover.breakers[id(primary)].cooldown_s = 60.0
    failover.breakers[id(primary)].failed()  # a fourth failure: open for a minute
    assert (await _utterance(failover)).backend == "pocketsphinx"
    assert primary.calls == 3  # skipped while open
    failover.breakers[id(primary)].open_until = 0.0  # cool-down over: a trial goes through and succeeds
    assert (await _utterance(failover)).backend == "openai"
    assert failover.breakers[id(primary)].failures == 0


async def test_last_backend_failing_raises_its_error() -> None:
    primary = ScriptedBackend("a", [BackendError("503", code=ErrorCode.BACKEND_UNAVAILABLE)])
    fallback = ScriptedBackend("b", [BackendError("429", code=ErrorCode.BACKEND_RATE_LIMITED)])
    with pytest.raises(BackendError) as caught:
        await _utterance(FailoverBackend([primary, fallback]))
    assert caught.value.code is ErrorCode.BACKEND_RATE_LIMITED


def test_the_registry_puts_the_fallback_list_behind_the_primary() -> None:
    config = parse_config(
        '[asr]\nplatform = "openai"\nurl = "http://127.0.0.1:1/v1"\n[[asr.fallback]]\nplatform = "pocketsphinx"\n'
    )
    chain = build_backends(config.asr)
    assert isinstance(chain, FailoverBackend)
    assert [backend.name for backend in chain.backends] == ["openai", "pocketsphinx"]
    assert chain.failovers == 0
    wrapped: list[str] = []

    def wrap(backend: TranscriptionBackend) -> TranscriptionBackend:
        wrapped.append(backend.name)
        return backend

    single = build_backends(parse_config("").asr, wrap)
    assert single.name == "pocketsphinx" and wrapped == ["pocketsphinx"]
    assert final_timeout(config.asr) == max(30.0, (10 + 4.0) * 3 + POCKETSPHINX_FINAL_S + 5.0)
    assert final_timeout(parse_config("").asr) == 30.0  # pocketsphinx alone: the deadline PROTOCOL.md promises
