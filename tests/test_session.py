"""One session in process: speculative recognition during the hangover (EchoKit semantics)."""

from __future__ import annotations

import asyncio

import numpy as np

from firmware_protocol import (
    EndReason,
    SpeechEnded,
    Topics,
    Transcript,
    decode_bridge_message,
)
from service.config import Config
from service.endpointing.engines import VadEngines
from service.endpointing.silero import SileroModel, VadBatcher
from service.endpointing.tuning import effective_tuning
from service.outputs.publisher import DevicePublisher
from service.recognition import Recognition, SessionOptions
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

    async def publish(topic: str, payload: bytes, qos: int) -> None:
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
