"""One session in process: speculative recognition during the hangover (EchoKit semantics), its deadlines, abort."""

from __future__ import annotations

import asyncio

import msgspec
import numpy as np

from firmware_protocol import (
    Configured,
    Endpointing,
    EndReason,
    Error,
    ErrorCode,
    SpeechEnded,
    SpeechStarted,
    Topics,
    Transcript,
    decode_bridge_message,
)
from service.config import Config
from service.endpointing.engines import VadEngines
from service.endpointing.silero import SileroModel, VadBatcher
from service.endpointing.tuning import effective_tuning
from service.outputs.publisher import DevicePublisher
from service.recognition import BackendError, Recognition, SessionOptions
from service.recognition.base import BatchStream, RecognitionStream, StreamListener, TranscriptionBackend
from service.session.services import SessionServices
from service.session.turn import Session


class CountingBatchBackend(TranscriptionBackend):
    """Transcribes to "heard <samples>" after ``latency_s``; counts calls."""

    name = "counting"

    def __init__(self, latency_s: float = 0.0) -> None:
        self.latency_s = latency_s
        self.heard: list[int] = []

    def open(self, options: SessionOptions, listener: StreamListener) -> RecognitionStream:
        backend = self

        class Stream(BatchStream):
            async def transcribe(self, audio: np.ndarray) -> Recognition:
                await asyncio.sleep(backend.latency_s)
                backend.heard.append(len(audio))
                return Recognition(f"heard {len(audio)}")

        return Stream()


async def _run_session(backend: TranscriptionBackend, audio: np.ndarray) -> list[object]:
    published: list[object] = []

    def publish(topic: str, payload: bytes, **_: object) -> None:
        published.append(decode_bridge_message(payload))

    batcher = VadBatcher(SileroModel())
    runner = asyncio.create_task(batcher.run())
    services = SessionServices(
        backend=backend,
        engines=VadEngines(batcher),
        publisher=DevicePublisher(Topics(), publish, 1024),
    )
    tuning = effective_tuning(Config())
    session = Session("dev", 1, services, tuning=tuning, options=SessionOptions())
    for i in range(0, len(audio), 320):
        session.push(audio[i : i + 320].tobytes())
    await asyncio.wait_for(session.run(), 30)
    runner.cancel()
    return published


async def test_speculation_started_at_the_pause_is_committed_after_the_hangover(speech: dict) -> None:
    backend = CountingBatchBackend()
    audio = np.concatenate([speech["what_time"], np.zeros(16000, dtype=np.int16)])
    messages = await _run_session(backend, audio)
    final = messages[-1]
    assert isinstance(final, Transcript) and final.final
    ended = next(m for m in messages if isinstance(m, SpeechEnded))
    assert ended.reason is EndReason.SILENCE
    # One recognition only, of the audio up to the pause (~200 ms after the last voiced window),
    # not of everything the device sent before the hangover ran out.
    (heard,) = backend.heard
    assert final.text == f"heard {heard}"
    assert ended.offset_ms * 16 < heard < (ended.offset_ms + 400) * 16


async def test_speech_resuming_after_a_pause_drops_the_stale_speculation_as_a_partial(speech: dict) -> None:
    backend = CountingBatchBackend()
    audio = np.concatenate([speech["pause_450ms"], np.zeros(16000, dtype=np.int16)])
    messages = await _run_session(backend, audio)
    transcripts = [m for m in messages if isinstance(m, Transcript)]
    *partials, final = transcripts
    assert final.final and len(backend.heard) == 2
    assert [p.text for p in partials] == [f"heard {backend.heard[0]}"]
    assert final.text == f"heard {backend.heard[1]}" and backend.heard[1] > backend.heard[0] + 450 * 16


class HangingBackend(TranscriptionBackend):
    """A backend that never answers: its final (and its speculation) waits forever; counts cancels."""

    name = "hanging"

    def __init__(self, *, cancel_hangs: bool = False) -> None:
        self.cancel_hangs = cancel_hangs
        self.opened = 0
        self.cancelled = 0

    def open(self, options: SessionOptions, listener: StreamListener) -> RecognitionStream:
        backend = self
        backend.opened += 1

        class Stream(RecognitionStream):
            """Blocks before ``finish`` returns, as a decoder that never becomes free would."""

            def feed(self, pcm: np.ndarray) -> None:
                pass

            async def finish(self) -> Recognition:
                await asyncio.Event().wait()
                raise AssertionError("unreachable")

            async def cancel(self) -> None:
                backend.cancelled += 1
                if backend.cancel_hangs:
                    await asyncio.Event().wait()

        return Stream()


class NeverAnsweringBatchBackend(TranscriptionBackend):
    """A batch backend whose every request (speculation and final alike) hangs."""

    name = "silent"

    def __init__(self) -> None:
        self.requests = 0

    def open(self, options: SessionOptions, listener: StreamListener) -> RecognitionStream:
        backend = self

        class Stream(BatchStream):
            async def transcribe(self, audio: np.ndarray) -> Recognition:
                backend.requests += 1
                await asyncio.Event().wait()
                raise AssertionError("unreachable")

        return Stream()


class FailingBackend(TranscriptionBackend):
    """Fails every request the way a network backend does, with its address and request id in the message."""

    name = "failing"

    def open(self, options: SessionOptions, listener: StreamListener) -> RecognitionStream:
        class Stream(BatchStream):
            async def transcribe(self, audio: np.ndarray) -> Recognition:
                raise BackendError(
                    "openai ASR: HTTP 503 from 10.9.8.7:8443: overloaded (request req-7f3a)",
                    code=ErrorCode.BACKEND_UNAVAILABLE,
                )

        return Stream()


def _services(backend: TranscriptionBackend, published: list[object], **limits: float) -> SessionServices:
    def publish(topic: str, payload: bytes, **_: object) -> None:
        published.append(decode_bridge_message(payload))

    return SessionServices(
        backend=backend,
        engines=VadEngines(VadBatcher(SileroModel())),
        publisher=DevicePublisher(Topics(), publish, 1024),
        **limits,  # type: ignore[arg-type]
    )


async def _bounded(session: Session, audio: np.ndarray, *, batcher: VadBatcher) -> None:
    runner = asyncio.create_task(batcher.run())
    try:
        for i in range(0, len(audio), 320):
            session.push(audio[i : i + 320].tobytes())
        await asyncio.wait_for(session.run(), 30)
    finally:
        runner.cancel()


def _push_to_talk(**changes: object) -> Configured:
    return msgspec.structs.replace(effective_tuning(Config()), endpointing=Endpointing.PUSH_TO_TALK, **changes)


async def test_a_backend_that_never_answers_gets_backend_unavailable_within_the_deadline(speech: dict) -> None:
    published: list[object] = []
    backend = NeverAnsweringBatchBackend()
    services = _services(backend, published, final_timeout_s=1.0)
    session = Session("dev", 7, services, tuning=effective_tuning(Config()), options=SessionOptions())
    audio = np.concatenate([speech["what_time"], np.zeros(16000, dtype=np.int16)])
    await _bounded(session, audio, batcher=services.engines.batcher)
    error = published[-1]
    # Speculation and the final share one deadline: one error, no final, named for its session.
    assert isinstance(error, Error) and error.code is ErrorCode.BACKEND_UNAVAILABLE
    assert error.retryable and error.session == 7 and "1 s" in error.message
    assert not any(isinstance(m, Transcript) and m.final for m in published)
    assert backend.requests >= 1 and len(services.running) == 0


async def test_a_stream_that_blocks_before_finish_and_on_cancel_still_ends_the_session() -> None:
    published: list[object] = []
    backend = HangingBackend(cancel_hangs=True)
    services = _services(backend, published, final_timeout_s=1.0)
    session = Session("dev", 8, services, tuning=_push_to_talk(), options=SessionOptions())
    session.push(np.full(3200, 500, dtype=np.int16).tobytes())
    session.end(EndReason.DEVICE)
    await asyncio.wait_for(session.run(), 30)
    error = published[-1]
    assert isinstance(error, Error) and error.code is ErrorCode.BACKEND_UNAVAILABLE and error.session == 8
    assert backend.cancelled >= 1  # its resources were asked back, even though it never let go


async def test_a_turn_that_never_ends_hits_the_session_wall_clock_limit() -> None:
    """Push-to-talk with the button never released and no idle sweep: the session's own limit ends it."""
    published: list[object] = []
    backend = HangingBackend()
    services = _services(backend, published, final_timeout_s=0.5, idle_timeout_s=0.5)
    session = Session("dev", 9, services, tuning=_push_to_talk(max_utterance_s=0.5), options=SessionOptions())
    session.push(np.full(320, 500, dtype=np.int16).tobytes())
    assert session.limit_s == 1.5
    await asyncio.wait_for(session.run(), 30)
    error = published[-1]
    assert isinstance(error, Error) and error.code is ErrorCode.BACKEND_UNAVAILABLE
    assert error.retryable and error.session == 9 and "1.5 s" in error.message
    assert backend.cancelled == 1 and session.ended and len(services.running) == 0


async def test_abort_ends_a_running_session_with_a_retryable_error() -> None:
    published: list[object] = []
    speaking = asyncio.Event()
    backend = HangingBackend()
    services = _services(backend, published)
    services.publisher.observers.append(lambda _, m: speaking.set() if isinstance(m, SpeechStarted) else None)
    session = Session("dev", 10, services, tuning=_push_to_talk(), options=SessionOptions())
    session.push(np.full(320, 500, dtype=np.int16).tobytes())
    task = asyncio.create_task(session.run())
    await asyncio.wait_for(speaking.wait(), 30)
    assert services.running.abort_all("the bridge is shutting down") == 1
    await asyncio.wait_for(task, 30)
    error = published[-1]
    assert isinstance(error, Error) and error.code is ErrorCode.BACKEND_UNAVAILABLE
    assert error.retryable and error.session == 10 and error.message == "the bridge is shutting down"
    assert backend.cancelled == 1 and len(services.running) == 0


async def test_the_device_is_told_what_failed_without_the_backends_address_or_request_id(speech: dict) -> None:
    published: list[object] = []
    services = _services(FailingBackend(), published)
    session = Session("dev", 11, services, tuning=effective_tuning(Config()), options=SessionOptions())
    await _bounded(
        session,
        np.concatenate([speech["what_time"], np.zeros(16000, dtype=np.int16)]),
        batcher=services.engines.batcher,
    )
    error = published[-1]
    assert isinstance(error, Error) and error.code is ErrorCode.BACKEND_UNAVAILABLE and error.retryable
    assert "10.9.8.7" not in error.message and "8443" not in error.message and "req-7f3a" not in error.message
    assert error.message == "the speech backend is unavailable"


class HangingBatchCheck:
    """The legacy ``vad_url`` check, stuck: the deadline from the end of the turn covers it too."""

    url = "http://vad.invalid/v1/audio/vad"

    async def has_speech(self, pcm: np.ndarray) -> bool:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        pass


async def test_a_stuck_batch_vad_check_counts_against_the_same_deadline() -> None:
    published: list[object] = []
    backend = CountingBatchBackend()
    services = _services(backend, published, final_timeout_s=1.0)
    services.engines.batch_check = HangingBatchCheck()  # type: ignore[assignment]
    session = Session("dev", 12, services, tuning=_push_to_talk(), options=SessionOptions())
    session.push(np.full(3200, 500, dtype=np.int16).tobytes())
    session.end(EndReason.DEVICE)
    await asyncio.wait_for(session.run(), 30)
    error = published[-1]
    assert isinstance(error, Error) and error.code is ErrorCode.BACKEND_UNAVAILABLE and error.session == 12
    assert backend.heard == []  # the recogniser was never reached
