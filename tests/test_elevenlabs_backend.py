"""ElevenLabsBackend against the loopback fake: wire shapes, finals, server VAD, batch, errors, retries, cancel."""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import logging
import socket
import wave
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from firmware_protocol import EndReason, ErrorCode
from service.config import ElevenLabsSettings
from service.recognition.base import BackendError, Recognition, RecognitionStream, SessionOptions
from service.recognition.elevenlabs import ElevenLabsBackend, endpoints
from service.wav import read_wav_16k_mono
from tests.fakes.elevenlabs_server import FakeElevenLabs, Fault, Script

FIXTURES = Path(__file__).parent / "fixtures"
KEY = "sk_test_5f2c9a0d1e8b4c7a"
FRAME = 320  # 20 ms at 16 kHz
WHAT_TIME = read_wav_16k_mono(FIXTURES / "what_time.wav")
EN = SessionOptions(language="en", device_id="dev-1")


class Listener:
    """Records what the stream tells its session, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.turn_ended = asyncio.Event()

    @property
    def partials(self) -> list[str]:
        return [text for kind, text in self.events if kind == "partial"]

    def partial(self, text: str) -> None:
        self.events.append(("partial", text))

    def end_of_turn(self) -> None:
        self.events.append(("end_of_turn", ""))
        self.turn_ended.set()


@pytest.fixture
async def fake() -> AsyncIterator[FakeElevenLabs]:
    async with FakeElevenLabs(api_key=KEY) as server:
        yield server


def config(url: str, **overrides: Any) -> ElevenLabsSettings:
    settings: dict[str, Any] = {
        "platform": "elevenlabs",
        "url": url,
        "api_key": KEY,
        "timeout_s": 2.0,
        "connect_timeout_s": 1.0,
        "max_retries": 1,
    }
    settings.update(overrides)
    return ElevenLabsSettings(**settings)


async def feed(stream: RecognitionStream, pcm: np.ndarray, *, pace: float = 0.0) -> None:
    """Feed 20 ms frames the way a session does, yielding to the loop between them."""
    for start in range(0, len(pcm), FRAME):
        stream.feed(pcm[start : start + FRAME])
        await asyncio.sleep(pace)


async def transcribe(
    backend: ElevenLabsBackend, pcm: np.ndarray, listener: Listener | None = None, options: SessionOptions = EN
) -> Recognition:
    await backend.start()
    try:
        stream = backend.open(options, listener or Listener())
        await feed(stream, pcm)
        async with asyncio.timeout(20):
            return await stream.finish()
    finally:
        await backend.aclose()


async def failure(backend: ElevenLabsBackend, pcm: np.ndarray = WHAT_TIME) -> BackendError:
    with pytest.raises(BackendError) as caught:
        await transcribe(backend, pcm)
    assert KEY not in str(caught.value)
    return caught.value


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# URLs ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "realtime", "batch"),
    [
        ("", "wss://api.elevenlabs.io/v1/speech-to-text/realtime", "https://api.elevenlabs.io/v1/speech-to-text"),
        (
            "wss://api.elevenlabs.io/v1/speech-to-text/realtime",
            "wss://api.elevenlabs.io/v1/speech-to-text/realtime",
            "https://api.elevenlabs.io/v1/speech-to-text",
        ),
        (
            "https://eu.example.com/v1/speech-to-text",
            "wss://eu.example.com/v1/speech-to-text/realtime",
            "https://eu.example.com/v1/speech-to-text",
        ),
        (
            "http://127.0.0.1:8080/",
            "ws://127.0.0.1:8080/v1/speech-to-text/realtime",
            "http://127.0.0.1:8080/v1/speech-to-text",
        ),
        (
            "ws://proxy.local/eleven/v1/speech-to-text/realtime?enable_logging=false",
            "ws://proxy.local/eleven/v1/speech-to-text/realtime?enable_logging=false",
            "http://proxy.local/eleven/v1/speech-to-text?enable_logging=false",
        ),
    ],
)
def test_endpoints_follow_the_documented_rule(url: str, realtime: str, batch: str) -> None:
    derived = endpoints(url)
    assert (derived.realtime, derived.batch) == (realtime, batch)


# Realtime, manual commit ------------------------------------------------------------------------------------------


async def test_manual_commit_sends_the_documented_messages_and_returns_the_final(fake: FakeElevenLabs) -> None:
    listener = Listener()
    result = await transcribe(ElevenLabsBackend(config(fake.realtime_url)), WHAT_TIME, listener)

    assert result == Recognition("what time is it", language="en")
    [session] = fake.sessions
    assert session.query == [
        ("model_id", "scribe_v2_realtime"),
        ("audio_format", "pcm_16000"),
        ("commit_strategy", "manual"),
        ("language_code", "en"),
    ]
    assert session.headers["xi-api-key"] == KEY
    *chunks, commit = session.messages
    assert commit == {"message_type": "input_audio_chunk", "audio_base_64": "", "commit": True, "sample_rate": 16000}
    for chunk in chunks:
        assert set(chunk) == {"message_type", "audio_base_64", "commit", "sample_rate"}
        assert chunk["message_type"] == "input_audio_chunk"
        assert chunk["commit"] is False and chunk["sample_rate"] == 16000
    sizes = [len(base64.b64decode(chunk["audio_base_64"])) for chunk in chunks]
    assert all(3200 <= size <= 8000 for size in sizes[:-1]), sizes  # 100–250 ms, the last one whatever is left
    assert bytes(session.audio) == WHAT_TIME.tobytes()
    assert session.commits == 1
    assert len(listener.partials) >= 2 and listener.partials[0] == "what"
    assert all("what time is it".startswith(p) and len(p) < len(q) for p, q in itertools.pairwise(listener.partials))
    assert ("end_of_turn", "") not in listener.events


async def test_audio_fed_before_the_session_starts_is_queued_not_lost(fake: FakeElevenLabs) -> None:
    backend = ElevenLabsBackend(config(fake.realtime_url))
    stream = backend.open(SessionOptions(), Listener())
    for start in range(0, len(WHAT_TIME), FRAME):  # all of it, without yielding: the socket is not even open
        stream.feed(WHAT_TIME[start : start + FRAME])
    async with asyncio.timeout(20):
        result = await stream.finish()
    await backend.aclose()
    assert result.text == "what time is it"
    assert bytes(fake.sessions[0].audio) == WHAT_TIME.tobytes()
    assert "language_code" not in fake.sessions[0].params


async def test_model_and_a_bare_host_url_are_honoured(fake: FakeElevenLabs) -> None:
    result = await transcribe(ElevenLabsBackend(config(fake.base_url, model="scribe_v3_live")), WHAT_TIME)
    assert result.text == "what time is it"
    assert fake.sessions[0].params["model_id"] == "scribe_v3_live"


async def test_silence_gives_a_no_speech_result(fake: FakeElevenLabs) -> None:
    result = await transcribe(ElevenLabsBackend(config(fake.realtime_url)), np.zeros(16000, dtype=np.int16))
    assert result == Recognition("", language="en", reason=EndReason.NO_SPEECH)


async def test_a_short_tap_is_padded_so_the_commit_is_not_throttled(fake: FakeElevenLabs) -> None:
    tap = WHAT_TIME[16000:17600]  # 100 ms: ElevenLabs throttles commits of less than 300 ms
    result = await transcribe(ElevenLabsBackend(config(fake.realtime_url)), tap)
    assert result.text == "what time is it"
    audio = bytes(fake.sessions[0].audio)
    assert audio.startswith(tap.tobytes()) and len(audio) == 300 * 32
    assert audio[len(tap.tobytes()) :] == bytes(len(audio) - len(tap.tobytes()))


async def test_warnings_and_unknown_messages_are_ignored() -> None:
    chatter: list[dict[str, Any]] = [
        {"message_type": "warning", "warning": "audio is clipping"},
        {"message_type": "brand_new_event", "payload": {"x": 1}},
    ]
    async with FakeElevenLabs(api_key=KEY, script=Script(chatter=chatter)) as fake:
        result = await transcribe(ElevenLabsBackend(config(fake.realtime_url)), WHAT_TIME)
    assert result.text == "what time is it"


# Realtime, server VAD ---------------------------------------------------------------------------------------------


async def test_vad_commit_ends_the_turn_then_finish_returns_its_text(fake: FakeElevenLabs) -> None:
    listener = Listener()
    backend = ElevenLabsBackend(config(fake.realtime_url, commit_strategy="vad"))
    stream = backend.open(EN, listener)
    await feed(stream, np.concatenate([WHAT_TIME, np.zeros(16000, dtype=np.int16)]), pace=0.001)
    async with asyncio.timeout(10):
        await listener.turn_ended.wait()
        result = await stream.finish()
    await backend.aclose()

    assert result == Recognition("what time is it", language="en")
    assert listener.events[-1] == ("end_of_turn", "")
    assert listener.partials[0] == "what"
    session = fake.sessions[0]
    assert session.params["commit_strategy"] == "vad"
    assert all(message["commit"] is False for message in session.messages)
    assert session.commits == 0


async def test_vad_finish_waits_for_a_commit_still_on_its_way() -> None:
    async with FakeElevenLabs(api_key=KEY, script=Script(latency_s=0.3)) as fake:
        listener = Listener()
        backend = ElevenLabsBackend(config(fake.realtime_url, commit_strategy="vad"))
        stream = backend.open(EN, listener)
        await feed(stream, np.concatenate([WHAT_TIME, np.zeros(12000, dtype=np.int16)]))
        async with asyncio.timeout(10):
            result = await stream.finish()
        await backend.aclose()
    assert result.text == "what time is it"
    assert ("end_of_turn", "") in listener.events


async def test_vad_finish_before_a_pause_sends_one_so_the_commit_comes(fake: FakeElevenLabs) -> None:
    speech = WHAT_TIME[: 14 * 1600]  # cut while still speaking, as push-to-talk or our own endpointing may
    listener = Listener()
    backend = ElevenLabsBackend(config(fake.realtime_url, commit_strategy="vad"))
    stream = backend.open(EN, listener)
    await feed(stream, speech)
    async with asyncio.timeout(10):
        result = await stream.finish()
    await backend.aclose()
    assert result.text == "what time is it"
    audio = bytes(fake.sessions[0].audio)
    assert audio.startswith(speech.tobytes())
    tail = audio[len(speech.tobytes()) :]
    assert tail == bytes(len(tail)) and 0.5 <= len(tail) / 32000 <= 3.25  # silence, no longer than needed
    assert fake.sessions[0].commits == 0


async def test_vad_tail_follows_the_threshold_in_the_url(fake: FakeElevenLabs) -> None:
    backend = ElevenLabsBackend(config(fake.realtime_url + "?vad_silence_threshold_secs=0.6", commit_strategy="vad"))
    result = await transcribe(backend, WHAT_TIME[: 14 * 1600])
    assert result.text == "what time is it"
    session = fake.sessions[0]
    assert session.query[0] == ("vad_silence_threshold_secs", "0.6")
    assert len(session.audio) == 14 * 1600 * 2 + (600 + 250) * 32


# Batch ----------------------------------------------------------------------------------------------------------


async def test_batch_posts_a_wav_with_the_documented_fields(fake: FakeElevenLabs) -> None:
    fake.script.text = lambda seconds: f"{seconds:.3f} seconds of audio"
    backend = ElevenLabsBackend(config(fake.realtime_url, mode="batch"))
    result = await transcribe(backend, WHAT_TIME)

    assert result == Recognition(f"{len(WHAT_TIME) / 16000:.3f} seconds of audio", language="en")
    [request] = fake.batch_requests
    assert request.fields == {"model_id": "scribe_v1", "language_code": "en"}
    assert request.headers["xi-api-key"] == KEY
    assert request.filename == "audio.wav"
    assert request.file is not None
    with wave.open(io.BytesIO(request.file), "rb") as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (1, 2, 16000)
        assert wav.readframes(wav.getnframes()) == WHAT_TIME.tobytes()
    assert not fake.sessions


async def test_batch_takes_a_full_batch_url_and_model(fake: FakeElevenLabs) -> None:
    backend = ElevenLabsBackend(config(fake.batch_url, mode="batch", model="scribe_v2"))
    result = await transcribe(backend, WHAT_TIME, options=SessionOptions())
    assert result == Recognition("what time is it", language="eng")
    assert fake.batch_requests[0].fields == {"model_id": "scribe_v2"}


@pytest.mark.parametrize(
    ("faults", "code", "retryable", "failover", "requests"),
    [
        ([Fault.http(401)], ErrorCode.BACKEND_AUTH, False, False, 1),
        ([Fault.http(422)], ErrorCode.BACKEND_REJECTED, False, False, 1),
        ([Fault.http(400)], ErrorCode.BACKEND_REJECTED, False, False, 1),
        ([Fault.http(500)] * 3, ErrorCode.BACKEND_UNAVAILABLE, True, True, 3),
        ([Fault.http(429, retry_after="0")] * 3, ErrorCode.BACKEND_RATE_LIMITED, True, True, 3),
        ([Fault.http(429, retry_after="60")], ErrorCode.BACKEND_RATE_LIMITED, True, True, 1),
    ],
)
async def test_batch_http_errors_map_and_retry_by_class(
    fake: FakeElevenLabs, faults: list[Fault], code: ErrorCode, retryable: bool, failover: bool, requests: int
) -> None:
    fake.faults = list(faults)
    error = await failure(ElevenLabsBackend(config(fake.realtime_url, mode="batch", max_retries=2)))
    assert (error.code, error.retryable, error.failover) == (code, retryable, failover)
    assert len(fake.batch_requests) == requests


async def test_batch_honours_retry_after_then_succeeds(fake: FakeElevenLabs) -> None:
    fake.faults = [Fault.http(429, retry_after="0"), Fault.http(503)]
    result = await transcribe(ElevenLabsBackend(config(fake.realtime_url, mode="batch", max_retries=2)), WHAT_TIME)
    assert result.text == "what time is it"
    assert len(fake.batch_requests) == 3


async def test_batch_wrong_key_is_an_auth_error_without_the_key(fake: FakeElevenLabs) -> None:
    backend = ElevenLabsBackend(config(fake.realtime_url, mode="batch", api_key="sk_wrong_secret_key"))
    with pytest.raises(BackendError) as caught:
        await transcribe(backend, WHAT_TIME)
    assert caught.value.code is ErrorCode.BACKEND_AUTH
    assert "sk_wrong_secret_key" not in str(caught.value)
    assert len(fake.batch_requests) == 1


async def test_batch_hang_times_out(fake: FakeElevenLabs) -> None:
    fake.faults = [Fault.hang(), Fault.hang()]
    backend = ElevenLabsBackend(config(fake.realtime_url, mode="batch", timeout_s=0.5, connect_timeout_s=0.5))
    async with asyncio.timeout(10):
        error = await failure(backend)
    assert error.code is ErrorCode.BACKEND_TIMEOUT and error.retryable and error.failover
    assert len(fake.batch_requests) == 2


# Realtime errors ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message_type", "code", "retryable", "connections"),
    [
        ("auth_error", ErrorCode.BACKEND_AUTH, False, 1),
        ("quota_exceeded", ErrorCode.BACKEND_RATE_LIMITED, True, 2),
        ("rate_limited", ErrorCode.BACKEND_RATE_LIMITED, True, 2),
        ("commit_throttled", ErrorCode.BACKEND_RATE_LIMITED, True, 2),
        ("queue_overflow", ErrorCode.BACKEND_RATE_LIMITED, True, 2),
        ("resource_exhausted", ErrorCode.BACKEND_RATE_LIMITED, True, 2),
        ("input_error", ErrorCode.BACKEND_REJECTED, False, 1),
        ("invalid_request", ErrorCode.BACKEND_REJECTED, False, 1),
        ("chunk_size_exceeded", ErrorCode.BACKEND_REJECTED, False, 1),
        ("unaccepted_terms", ErrorCode.BACKEND_REJECTED, False, 1),
        ("transcriber_error", ErrorCode.BACKEND_ERROR, True, 2),
        ("error", ErrorCode.BACKEND_ERROR, True, 2),
        ("session_time_limit_exceeded", ErrorCode.BACKEND_ERROR, True, 2),
    ],
)
async def test_realtime_error_messages_map_and_retry_by_class(
    fake: FakeElevenLabs, message_type: str, code: ErrorCode, retryable: bool, connections: int
) -> None:
    fake.faults = [Fault.message(message_type, when="audio", after_audio_s=0.5, error=f"{message_type} ({KEY})")] * 2
    error = await failure(ElevenLabsBackend(config(fake.realtime_url, max_retries=1)))
    assert (error.code, error.retryable, error.failover) == (code, retryable, retryable)
    assert message_type in str(error) and "***" in str(error)
    assert len(fake.sessions) == connections


async def test_insufficient_audio_activity_is_no_speech(fake: FakeElevenLabs) -> None:
    fake.faults = [Fault.message("insufficient_audio_activity", when="commit")]
    result = await transcribe(ElevenLabsBackend(config(fake.realtime_url)), WHAT_TIME)
    assert result == Recognition("", language="en", reason=EndReason.NO_SPEECH)


async def test_a_retryable_error_is_retried_with_the_whole_utterance(fake: FakeElevenLabs) -> None:
    fake.faults = [Fault.message("rate_limited", when="commit")]
    result = await transcribe(ElevenLabsBackend(config(fake.realtime_url)), WHAT_TIME)
    assert result.text == "what time is it"
    assert [bytes(s.audio) for s in fake.sessions] == [WHAT_TIME.tobytes()] * 2


@pytest.mark.parametrize("auth_failure", ["message", "http"])
async def test_a_wrong_key_is_an_auth_error_without_the_key(auth_failure: Any) -> None:
    async with FakeElevenLabs(api_key=KEY, auth_failure=auth_failure) as fake:
        error = await failure(ElevenLabsBackend(config(fake.realtime_url, api_key="sk_wrong_secret_key")))
        assert len(fake.sessions) == 1
        assert fake.sessions[0].headers["xi-api-key"] == "sk_wrong_secret_key"
    assert (error.code, error.retryable, error.failover) == (ErrorCode.BACKEND_AUTH, False, False)
    assert "sk_wrong_secret_key" not in str(error)


@pytest.mark.parametrize(
    ("fault", "code"),
    [
        (Fault.http(503), ErrorCode.BACKEND_UNAVAILABLE),
        (Fault.http(429, retry_after="0"), ErrorCode.BACKEND_RATE_LIMITED),
        (Fault.http(403), ErrorCode.BACKEND_AUTH),
    ],
)
async def test_a_refused_handshake_maps_like_http(fake: FakeElevenLabs, fault: Fault, code: ErrorCode) -> None:
    fake.faults = [fault, fault]
    error = await failure(ElevenLabsBackend(config(fake.realtime_url)))
    assert error.code is code
    assert len(fake.sessions) == (2 if error.retryable else 1)


async def test_a_refused_connection_is_retried_then_unavailable_with_failover() -> None:
    backend = ElevenLabsBackend(config(f"ws://127.0.0.1:{free_port()}", max_retries=2))
    async with asyncio.timeout(15):
        error = await failure(backend)
    assert (error.code, error.retryable, error.failover) == (ErrorCode.BACKEND_UNAVAILABLE, True, True)


async def test_batch_refused_connection_is_unavailable_not_a_timeout() -> None:
    backend = ElevenLabsBackend(config(f"ws://127.0.0.1:{free_port()}", mode="batch", max_retries=0))
    async with asyncio.timeout(15):
        error = await failure(backend)
    assert (error.code, error.retryable, error.failover) == (ErrorCode.BACKEND_UNAVAILABLE, True, True)


# Drops, hangs, cancel -------------------------------------------------------------------------------------------------


async def test_a_drop_mid_utterance_reconnects_and_replays_the_utterance(fake: FakeElevenLabs) -> None:
    fake.script.text = lambda seconds: f"{seconds:.3f} seconds of audio"
    fake.faults = [Fault.drop(after_audio_s=1.0)]
    listener = Listener()
    backend = ElevenLabsBackend(config(fake.realtime_url))
    stream = backend.open(EN, listener)
    await feed(stream, WHAT_TIME, pace=0.001)
    async with asyncio.timeout(20):
        result = await stream.finish()
    await backend.aclose()

    assert result.text == f"{len(WHAT_TIME) / 16000:.3f} seconds of audio"
    first, second = fake.sessions
    assert 1.0 <= len(first.audio) / 32000 < len(WHAT_TIME) / 16000
    assert first.commits == 0
    assert bytes(second.audio) == WHAT_TIME.tobytes()
    assert second.commits == 1


async def test_no_session_started_is_a_timeout_within_a_bounded_time(fake: FakeElevenLabs) -> None:
    fake.faults = [Fault.hang("open"), Fault.hang("open")]
    backend = ElevenLabsBackend(config(fake.realtime_url, connect_timeout_s=0.3))
    async with asyncio.timeout(10):
        error = await failure(backend)
    assert (error.code, error.retryable, error.failover) == (ErrorCode.BACKEND_TIMEOUT, True, True)
    assert len(fake.sessions) == 2


async def test_no_committed_transcript_is_a_timeout_within_a_bounded_time(fake: FakeElevenLabs) -> None:
    fake.faults = [Fault.hang("commit"), Fault.hang("commit")]
    backend = ElevenLabsBackend(config(fake.realtime_url, timeout_s=0.5))
    async with asyncio.timeout(10):
        error = await failure(backend)
    assert error.code is ErrorCode.BACKEND_TIMEOUT
    assert [s.commits for s in fake.sessions] == [1, 1]


async def test_a_hang_then_success_is_recovered(fake: FakeElevenLabs) -> None:
    fake.faults = [Fault.hang("commit")]
    result = await transcribe(ElevenLabsBackend(config(fake.realtime_url, timeout_s=0.5)), WHAT_TIME)
    assert result.text == "what time is it"
    assert len(fake.sessions) == 2


async def test_cancel_is_prompt_and_closes_the_socket(fake: FakeElevenLabs) -> None:
    fake.faults = [Fault.hang("commit")]
    backend = ElevenLabsBackend(config(fake.realtime_url, timeout_s=30))
    stream = backend.open(EN, Listener())
    await feed(stream, WHAT_TIME)
    finishing = asyncio.create_task(stream.finish())
    await fake.wait_until(lambda: bool(fake.sessions and fake.sessions[0].commits))
    loop = asyncio.get_running_loop()
    started = loop.time()
    await stream.cancel()
    assert loop.time() - started < 1.0
    with pytest.raises(asyncio.CancelledError):
        await finishing
    await fake.wait_until(lambda: fake.sessions[0].client_closed)
    await backend.aclose()


async def test_the_api_key_stays_out_of_logs(
    fake: FakeElevenLabs, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    fake.faults = [Fault.message("rate_limited", when="commit", error=f"slow down, {KEY}")]
    result = await transcribe(ElevenLabsBackend(config(fake.realtime_url)), WHAT_TIME)
    batch = await transcribe(ElevenLabsBackend(config(fake.realtime_url, mode="batch")), WHAT_TIME)
    assert result.text == batch.text == "what time is it"
    captured = capsys.readouterr()
    assert "elevenlabs.attempt_failed" in captured.out + captured.err + caplog.text
    assert KEY not in caplog.text + captured.out + captured.err
