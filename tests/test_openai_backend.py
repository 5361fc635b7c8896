"""OpenAIBackend against the loopback OpenAI fake: EchoKit's request and result rules, retries, cancel, pooling."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import structlog
from aiohttp import web

from firmware_protocol import EndReason, ErrorCode
from service.config import OpenAISettings, parse_config
from service.recognition.base import BackendError, Recognition, SessionOptions
from service.recognition.openai import OpenAIBackend, echokit_text
from service.recognition.registry import build_backend
from service.wav import read_wav_16k_mono
from tests.fakes._loopback import serve
from tests.fakes.openai_server import Drop, FakeOpenAI, Fault, Hang, ReceivedRequest, Transcript

KEY = "sk-proj-SECRET0123456789abcdefSECRET"
FIXTURE = Path(__file__).parent / "fixtures" / "what_time.wav"
EN = SessionOptions(language="en")


@pytest.fixture(scope="module")
def pcm() -> np.ndarray:
    return read_wav_16k_mono(FIXTURE)


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI(api_key=KEY) as server:
        yield server


def config(fake: FakeOpenAI, **overrides: Any) -> OpenAISettings:
    settings: dict[str, Any] = {
        "platform": "openai",
        "url": fake.url,
        "api_key": KEY,
        "model": "whisper-1",
        "timeout_s": 5.0,
        "connect_timeout_s": 2.0,
        "max_retries": 2,
    }
    settings.update(overrides)
    return OpenAISettings(**settings)


@asynccontextmanager
async def running(asr: OpenAISettings) -> AsyncIterator[OpenAIBackend]:
    backend = OpenAIBackend(asr)
    await backend.start()
    try:
        yield backend
    finally:
        await backend.aclose()


class Recorder:
    """A StreamListener that keeps what it heard, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def partial(self, text: str) -> None:
        self.events.append(("partial", text))

    def end_of_turn(self) -> None:
        self.events.append(("end_of_turn", ""))

    @property
    def partials(self) -> list[str]:
        return [text for kind, text in self.events if kind == "partial"]


async def recognise(
    backend: OpenAIBackend, pcm: np.ndarray, options: SessionOptions = EN, listener: Recorder | None = None
) -> Recognition:
    stream = backend.open(options, listener or Recorder())
    for chunk in np.array_split(pcm, 8):  # as the session feeds it: frame by frame
        stream.feed(chunk)
    return await stream.finish()


async def failure(backend: OpenAIBackend, pcm: np.ndarray) -> BackendError:
    with pytest.raises(BackendError) as raised:
        await recognise(backend, pcm)
    return raised.value


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# --- the request, as EchoKit sends it ---------------------------------------------------------


async def test_request_is_echokits(fake: FakeOpenAI, pcm: np.ndarray) -> None:
    prompt = "Hello\n你好\n(noise)\n(bgm)\n(silence)\n"
    async with running(config(fake)) as backend:
        result = await recognise(backend, pcm, SessionOptions(language="en", prompt=prompt))
    assert result == Recognition("Hello.", language="en")
    (seen,) = fake.requests
    assert seen.fields == {"model": ["whisper-1"], "language": ["en"], "prompt": [prompt]}
    assert seen.headers["Authorization"] == f"Bearer {KEY}"
    upload = seen.files["file"]
    assert (upload.filename, upload.content_type) == ("audio.wav", "audio/wav")
    assert upload.data[:4] == b"RIFF" and upload.data[8:16] == b"WAVEfmt "
    wav = seen.wav
    assert wav is not None
    assert (wav.fmt_size, wav.audio_format, wav.channels, wav.sample_rate, wav.bits_per_sample) == (16, 1, 1, 16000, 16)
    assert (wav.byte_rate, wav.block_align, wav.header_bytes) == (32000, 2, 44)
    assert seen.audio == pcm.astype("<i2").tobytes()


async def test_empty_settings_are_left_out(pcm: np.ndarray) -> None:
    async with FakeOpenAI(require_model=False) as local:
        async with running(config(local, api_key="", model="")) as backend:
            result = await recognise(backend, pcm, SessionOptions())
    assert result.text == "Hello."
    (seen,) = local.requests
    assert seen.fields == {}
    assert "Authorization" not in seen.headers
    assert list(seen.files) == ["file"]


async def test_language_and_prompt_come_from_the_session(fake: FakeOpenAI, pcm: np.ndarray) -> None:
    table = f'[asr]\nplatform = "openai"\nurl = "{fake.url}"\napi_key = "{KEY}"\nmodel = "whisper-1"\n'
    table += 'lang = "en"\nprompt = "config prompt"\n'
    backend = build_backend(parse_config(table).asr)
    assert isinstance(backend, OpenAIBackend)
    try:
        result = await recognise(backend, pcm, SessionOptions(language="zh", prompt="device prompt"))
    finally:
        await backend.aclose()
    assert result.language == "zh"
    assert fake.requests[0].fields["language"] == ["zh"]
    assert fake.requests[0].fields["prompt"] == ["device prompt"]


# --- EchoKit's result rules -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "text"),
    [
        ("[00:00:00.000 --> 00:00:02.000] hello", "hello"),
        ("[00:00:00.000 --> 00:00:01.000] what time\n[00:00:01.000 --> 00:00:02.000] is it", "what time\nis it"),
        ("what [really] time] is it", "time] is it"),
        (" What time is it?", "What time is it?"),
        ("line one\r\nline two\n", "line one\nline two"),
    ],
)
async def test_timestamps_are_stripped(fake: FakeOpenAI, pcm: np.ndarray, reply: str, text: str) -> None:
    fake.script(Transcript(reply))
    async with running(config(fake)) as backend:
        assert await recognise(backend, pcm) == Recognition(text, language="en")


@pytest.mark.parametrize(
    "reply", ["(noise)", "  (bgm) ", "", "   ", "[00:00:00.000 --> 00:00:02.000] (silence)", "(inaudible) hello"]
)
async def test_bracketed_or_empty_is_no_speech(fake: FakeOpenAI, pcm: np.ndarray, reply: str) -> None:
    fake.script(Transcript(reply))
    async with running(config(fake)) as backend:
        assert await recognise(backend, pcm) == Recognition("", reason=EndReason.NO_SPEECH)


def test_echokit_text_matches_rust_lines() -> None:
    assert echokit_text("a\n\nb") == "a\n\nb"
    assert echokit_text("a\n") == "a"
    assert echokit_text("") == ""
    assert echokit_text("[x] [y] z") == "[y] z"


async def test_groq_extra_fields_are_ignored(pcm: np.ndarray) -> None:
    async with FakeOpenAI(api_key=KEY, groq=True) as groq:
        groq.script(Transcript("what time is it"))
        async with running(config(groq, model="whisper-large-v3")) as backend:
            assert (await recognise(backend, pcm)).text == "what time is it"


async def test_text_by_audio(fake: FakeOpenAI, pcm: np.ndarray) -> None:
    def by_duration(request: ReceivedRequest) -> str:
        assert request.wav is not None
        return f"{request.wav.duration_s:.2f} seconds"

    fake.default = Transcript(by_duration)
    async with running(config(fake)) as backend:
        long, short = await asyncio.gather(recognise(backend, pcm), recognise(backend, pcm[:8000]))
    assert long.text == f"{len(pcm) / 16000:.2f} seconds"
    assert short.text == "0.50 seconds"


@asynccontextmanager
async def answering(reply: Callable[[], web.Response]) -> AsyncIterator[tuple[str, list[bytes]]]:
    """A loopback server that answers every transcription request with ``reply()``; yields its URL and the bodies."""
    bodies: list[bytes] = []

    async def handle(request: web.Request) -> web.Response:
        bodies.append(await request.read())
        return reply()

    app = web.Application()
    app.router.add_post("/v1/audio/transcriptions", handle)
    runner, port = await serve(app)
    try:
        yield f"http://127.0.0.1:{port}/v1/audio/transcriptions", bodies
    finally:
        await runner.cleanup()


async def test_missing_text_is_no_speech(pcm: np.ndarray) -> None:
    async with answering(lambda: web.json_response({"x_groq": {"id": "req_1"}})) as (url, seen):
        async with running(OpenAISettings(platform="openai", url=url, api_key=KEY)) as backend:
            result = await recognise(backend, pcm)
    assert result == Recognition("", reason=EndReason.NO_SPEECH)
    assert len(seen) == 1


async def test_a_too_short_utterance_is_not_sent(fake: FakeOpenAI, pcm: np.ndarray) -> None:
    async with running(config(fake)) as backend:
        assert await recognise(backend, pcm[:800]) == Recognition("", reason=EndReason.NO_SPEECH)
        assert await recognise(backend, pcm[:0]) == Recognition("", reason=EndReason.NO_SPEECH)
    assert fake.requests == []


async def test_non_json_success_is_an_error(pcm: np.ndarray) -> None:
    async with answering(lambda: web.Response(text="<html>proxy login</html>")) as (url, seen):
        async with running(OpenAISettings(platform="openai", url=url, max_retries=2)) as backend:
            error = await failure(backend, pcm)
    calls = len(seen)
    assert error.code is ErrorCode.BACKEND_ERROR
    assert "proxy login" in str(error)
    assert (error.retryable, error.failover, calls) == (False, True, 1)


# --- streaming ------------------------------------------------------------------------------


@pytest.mark.parametrize("extras", [False, True], ids=["openai", "event-lines-and-done-marker"])
async def test_streaming_partials_then_final(fake: FakeOpenAI, pcm: np.ndarray, extras: bool) -> None:
    fake.script(Transcript("what time is it", delta_interval_s=0.01, sse_extras=extras))
    listener = Recorder()
    async with running(config(fake, model="gpt-4o-mini-transcribe", stream=True)) as backend:
        result = await recognise(backend, pcm, listener=listener)
        listener.events.append(("final", result.text))
    assert listener.events == [
        ("partial", "what"),
        ("partial", "what time"),
        ("partial", "what time is"),
        ("partial", "what time is it"),
        ("final", "what time is it"),
    ]
    assert fake.requests[0].fields["stream"] == ["true"]


async def test_streaming_final_comes_from_done_event(fake: FakeOpenAI, pcm: np.ndarray) -> None:
    fake.script(Transcript("What time is it?", deltas=["what ", "time"]))
    listener = Recorder()
    async with running(config(fake, model="gpt-4o-transcribe", stream=True)) as backend:
        result = await recognise(backend, pcm, listener=listener)
    assert listener.partials == ["what", "what time"]
    assert result == Recognition("What time is it?", language="en")


async def test_streaming_noise_gives_no_partial(fake: FakeOpenAI, pcm: np.ndarray) -> None:
    fake.script(Transcript("(noise)", deltas=["(", "noise", ")"]))
    listener = Recorder()
    async with running(config(fake, model="gpt-4o-transcribe", stream=True)) as backend:
        result = await recognise(backend, pcm, listener=listener)
    assert listener.partials == []
    assert result == Recognition("", reason=EndReason.NO_SPEECH)


async def test_stream_ignored_by_whisper_1(fake: FakeOpenAI, pcm: np.ndarray) -> None:
    """whisper-1 (and Groq, and most local servers) answer plain JSON even when asked to stream."""
    listener = Recorder()
    async with running(config(fake, model="whisper-1", stream=True)) as backend:
        result = await recognise(backend, pcm, listener=listener)
    assert result.text == "Hello."
    assert listener.partials == []


async def test_streaming_reuses_the_connection(fake: FakeOpenAI, pcm: np.ndarray) -> None:
    async with running(config(fake, model="gpt-4o-transcribe", stream=True)) as backend:
        for _ in range(3):
            assert (await recognise(backend, pcm)).text == "Hello."
    assert len(fake.connections) == 1


# --- retries ---------------------------------------------------------------------------------


async def test_429_retry_after_ms_is_honoured(fake: FakeOpenAI, pcm: np.ndarray) -> None:
    fake.script(Fault.rate_limited(retry_after_ms="200"))
    async with running(config(fake)) as backend:
        assert (await recognise(backend, pcm)).text == "Hello."
    first, second = fake.requests
    assert (first.status, second.status) == (429, 200)
    assert second.received_at - first.received_at >= 0.19


async def test_429_retry_after_seconds_is_honoured(fake: FakeOpenAI, pcm: np.ndarray) -> None:
    fake.script(Fault.rate_limited(retry_after="1"))
    async with running(config(fake)) as backend:
        assert (await recognise(backend, pcm)).text == "Hello."
    first, second = fake.requests
    assert second.received_at - first.received_at >= 0.95


async def test_429_exhausted_reports_the_servers_advice(fake: FakeOpenAI, pcm: np.ndarray) -> None:
    fake.script(Fault.rate_limited(retry_after="7"))
    async with running(config(fake, max_retries=0)) as backend:
        error = await failure(backend, pcm)
    assert error.code is ErrorCode.BACKEND_RATE_LIMITED
    assert (error.retryable, error.failover, error.retry_after_s) == (True, True, 7.0)
    assert "HTTP 429" in str(error) and "Rate limit reached" in str(error) and "rate_limit_exceeded" in str(error)


async def test_5xx_retried_then_success(fake: FakeOpenAI, pcm: np.ndarray) -> None:
    fake.script(Fault.server_error(), Fault.server_error(503))
    async with running(config(fake, max_retries=2)) as backend:
        assert (await recognise(backend, pcm)).text == "Hello."
    assert [r.status for r in fake.requests] == [500, 503, 200]


async def test_5xx_exhausted(fake: FakeOpenAI, pcm: np.ndarray) -> None:
    fake.script(*[Fault.server_error()] * 3)
    async with running(config(fake, max_retries=2)) as backend:
        error = await failure(backend, pcm)
    assert error.code is ErrorCode.BACKEND_UNAVAILABLE
    assert (error.retryable, error.failover) == (True, True)
    assert "HTTP 500" in str(error) and "The server had an error" in str(error)
    assert len(fake.requests) == 3


@pytest.mark.parametrize(
    ("fault", "code"),
    [
        (Fault.bad_request(), ErrorCode.BACKEND_REJECTED),
        (
            Fault.bad_request("Audio file is too short.", code="audio_too_short", param="file"),
            ErrorCode.BACKEND_REJECTED,
        ),
        (Fault.too_large(), ErrorCode.BACKEND_REJECTED),
        (Fault(422, "Unprocessable audio"), ErrorCode.BACKEND_REJECTED),
        (Fault.unauthorized(), ErrorCode.BACKEND_AUTH),
        (
            Fault(403, "Country, region, or territory not supported", code="unsupported_country_region_territory"),
            ErrorCode.BACKEND_AUTH,
        ),
    ],
    ids=["400", "400-too-short", "413", "422", "401", "403"],
)
async def test_not_retried(fake: FakeOpenAI, pcm: np.ndarray, fault: Fault, code: ErrorCode) -> None:
    fake.script(fault)
    async with running(config(fake, max_retries=2)) as backend:
        error = await failure(backend, pcm)
    assert error.code is code
    assert (error.retryable, error.failover) == (False, False)
    assert f"HTTP {fault.status}" in str(error)
    assert fault.message in str(error)
    assert len(fake.requests) == 1


async def test_a_long_retry_after_is_not_waited_for(fake: FakeOpenAI, pcm: np.ndarray) -> None:
    fake.script(Fault.rate_limited(retry_after="60"))
    async with running(config(fake, max_retries=2)) as backend:
        error = await asyncio.wait_for(failure(backend, pcm), 5)
    assert (error.code, error.retry_after_s) == (ErrorCode.BACKEND_RATE_LIMITED, 60.0)
    assert len(fake.requests) == 1


async def test_not_found_is_a_configuration_error(fake: FakeOpenAI, pcm: np.ndarray) -> None:
    """A wrong URL or model: retrying cannot help, another backend might."""
    fake.script(Fault(404, "The model `whisper-2` does not exist", code="model_not_found"))
    async with running(config(fake)) as backend:
        error = await failure(backend, pcm)
    assert error.code is ErrorCode.BACKEND_ERROR
    assert (error.retryable, error.failover) == (False, True)
    assert "HTTP 404" in str(error) and "model_not_found" in str(error)
    assert len(fake.requests) == 1


async def test_a_wrong_key_is_an_auth_error(fake: FakeOpenAI, pcm: np.ndarray) -> None:
    async with running(config(fake, api_key="sk-wrong-0000000000000000")) as backend:
        error = await failure(backend, pcm)
    assert error.code is ErrorCode.BACKEND_AUTH
    assert "invalid_api_key" in str(error) and "Incorrect API key provided" in str(error)
    assert len(fake.requests) == 1


async def test_hang_times_out_per_attempt(fake: FakeOpenAI, pcm: np.ndarray) -> None:
    fake.script(Hang(), Hang())
    timeout_s, attempts = 0.3, 2
    started = time.monotonic()
    async with running(config(fake, timeout_s=timeout_s, connect_timeout_s=0.3, max_retries=attempts - 1)) as backend:
        error = await failure(backend, pcm)
    elapsed = time.monotonic() - started
    assert error.code is ErrorCode.BACKEND_TIMEOUT
    assert error.retryable
    assert len(fake.requests) == attempts
    assert elapsed < timeout_s * attempts + 0.25 + 3.0  # attempts, one backoff, generous slack
    for request in fake.requests:
        await asyncio.wait_for(request.disconnected.wait(), 2)


async def test_slow_stream_times_out_in_total(fake: FakeOpenAI, pcm: np.ndarray) -> None:
    """Each delta arrives within the read timeout, but the whole answer must fit in timeout_s."""
    fake.script(Transcript("a b c d e f g h", delta_interval_s=0.15))
    async with running(config(fake, model="gpt-4o-transcribe", stream=True, timeout_s=0.4, max_retries=0)) as backend:
        error = await failure(backend, pcm)
    assert error.code is ErrorCode.BACKEND_TIMEOUT


async def test_dropped_connection_is_retried(fake: FakeOpenAI, pcm: np.ndarray) -> None:
    fake.script(Drop())
    async with running(config(fake)) as backend:
        assert (await recognise(backend, pcm)).text == "Hello."
    assert [r.status for r in fake.requests] == [None, 200]


async def test_dropped_every_time(fake: FakeOpenAI, pcm: np.ndarray) -> None:
    fake.script(Drop(), Drop())
    async with running(config(fake, max_retries=1)) as backend:
        error = await failure(backend, pcm)
    assert error.code is ErrorCode.BACKEND_UNAVAILABLE
    assert error.retryable and error.failover


async def test_connection_refused(pcm: np.ndarray) -> None:
    url = f"http://127.0.0.1:{free_port()}/v1/audio/transcriptions"
    asr = OpenAISettings(platform="openai", url=url, api_key=KEY, max_retries=1)
    async with running(asr) as backend:
        error = await failure(backend, pcm)
    assert error.code is ErrorCode.BACKEND_UNAVAILABLE
    assert error.retryable


async def test_start_refuses_a_url_that_cannot_work() -> None:
    for url in ("", "ws://127.0.0.1/v1/audio/transcriptions", "127.0.0.1:9000/v1/audio/transcriptions"):
        with pytest.raises(BackendError) as raised:
            await OpenAIBackend(OpenAISettings(platform="openai", url=url)).start()
        assert not raised.value.retryable


# --- cancellation ----------------------------------------------------------------------------


async def test_cancel_aborts_the_request(fake: FakeOpenAI, pcm: np.ndarray) -> None:
    fake.script(Hang())
    async with running(config(fake, timeout_s=30)) as backend:
        stream = backend.open(EN, Recorder())
        stream.feed(pcm)
        finish = asyncio.create_task(stream.finish())
        (request,) = await fake.wait_for_requests(1)
        await asyncio.wait_for(stream.cancel(), 2)
        assert finish.done()
        with pytest.raises(BackendError) as raised:
            await finish
        assert (raised.value.retryable, raised.value.failover) == (False, False)
        await asyncio.wait_for(request.disconnected.wait(), 2)
        # The pool is still healthy afterwards.
        assert (await recognise(backend, pcm)).text == "Hello."
    assert len(fake.requests) == 2


async def test_cancelling_the_finish_task_aborts_the_request(fake: FakeOpenAI, pcm: np.ndarray) -> None:
    """What the session does when a turn is superseded: cancel finish(), then cancel() the stream."""
    fake.script(Hang())
    async with running(config(fake, timeout_s=30)) as backend:
        stream = backend.open(EN, Recorder())
        stream.feed(pcm)
        finish = asyncio.ensure_future(stream.finish())
        (request,) = await fake.wait_for_requests(1)
        finish.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(finish, 2)
        await asyncio.wait_for(stream.cancel(), 2)
        await asyncio.wait_for(request.disconnected.wait(), 2)


async def test_cancel_during_retry_backoff(fake: FakeOpenAI, pcm: np.ndarray) -> None:
    fake.script(Fault.rate_limited(retry_after="5"))
    async with running(config(fake)) as backend:
        stream = backend.open(EN, Recorder())
        stream.feed(pcm)
        finish = asyncio.create_task(stream.finish())
        await fake.wait_for_requests(1)
        await asyncio.sleep(0.05)
        await asyncio.wait_for(stream.cancel(), 1)
        with pytest.raises(BackendError):
            await finish
    assert len(fake.requests) == 1


async def test_speculation_transcribes_the_audio_so_far(fake: FakeOpenAI, pcm: np.ndarray) -> None:
    fake.default = Transcript(lambda r: f"{len(r.audio) // 2} samples")
    async with running(config(fake)) as backend:
        stream = backend.open(EN, Recorder())
        stream.feed(pcm[:8000])
        speculation = stream.speculate()
        assert speculation is not None
        stream.feed(pcm[8000:16000])
        assert (await speculation).text == "8000 samples"
        assert (await stream.finish()).text == "16000 samples"


async def test_cancel_aborts_speculation_and_final_alike(fake: FakeOpenAI, pcm: np.ndarray) -> None:
    fake.script(Hang(), Hang())
    async with running(config(fake, timeout_s=30)) as backend:
        stream = backend.open(EN, Recorder())
        stream.feed(pcm)
        speculation = stream.speculate()
        assert speculation is not None
        finish = asyncio.create_task(stream.finish())
        requests = await fake.wait_for_requests(2)
        await asyncio.wait_for(stream.cancel(), 2)
        for task in (speculation, finish):
            with pytest.raises(BackendError):
                await task
        for request in requests:
            await asyncio.wait_for(request.disconnected.wait(), 2)


async def test_cancel_without_finish(fake: FakeOpenAI, pcm: np.ndarray) -> None:
    async with running(config(fake)) as backend:
        stream = backend.open(EN, Recorder())
        stream.feed(pcm)
        await stream.cancel()
        with pytest.raises(BackendError):
            await stream.finish()
    assert fake.requests == []


# --- one pooled client -----------------------------------------------------------------------


async def test_one_pool_for_many_concurrent_utterances(pcm: np.ndarray) -> None:
    limit = 8
    async with FakeOpenAI(api_key=KEY, default=Transcript(lambda r: f"{len(r.audio)} bytes", latency_s=0.05)) as fake:
        async with running(config(fake, max_connections=limit)) as backend:
            for wave in range(2):
                lengths = [8000 + 160 * i for i in range(50)]
                results = await asyncio.gather(*(recognise(backend, pcm[:n]) for n in lengths))
                assert [r.text for r in results] == [f"{2 * n} bytes" for n in lengths]
                assert len(fake.requests) == 50 * (wave + 1)
                assert len(fake.connections) <= limit
    assert all(r.status == 200 for r in fake.requests)


async def test_open_before_start_creates_the_client(fake: FakeOpenAI, pcm: np.ndarray) -> None:
    backend = OpenAIBackend(config(fake))
    try:
        assert (await recognise(backend, pcm)).text == "Hello."
    finally:
        await backend.aclose()
    await backend.aclose()  # twice is harmless


# --- secrets ---------------------------------------------------------------------------------


async def test_the_key_never_appears_in_errors_or_logs(
    fake: FakeOpenAI, pcm: np.ndarray, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """Even a server that echoes the key verbatim must not get it into a message or a log line."""
    caplog.set_level(logging.DEBUG)
    echo = f"Incorrect API key provided: {KEY}."
    fake.script(
        Fault(401, echo, code="invalid_api_key"),
        Fault(400, echo),
        Fault(413, echo, "server_error"),
        Fault.rate_limited(retry_after_ms="1"),
        Fault(429, echo, "requests", headers={"retry-after-ms": "1"}),
        Fault(500, echo, "server_error"),
        Fault(500, echo, "server_error"),
        Drop(),
        Hang(),
        Drop(),
        Drop(),
    )
    errors: list[BackendError] = []
    with structlog.testing.capture_logs() as logs:
        async with running(config(fake, timeout_s=0.3, max_retries=1)) as backend:
            for _ in range(7):
                errors.append(await failure(backend, pcm))
        bad_url = f"http://user:{KEY}@127.0.0.1:{free_port()}/v1/audio/transcriptions?api-key={KEY}"
        async with running(config(fake, url=bad_url, max_retries=0)) as backend:
            errors.append(await failure(backend, pcm))
    assert len(fake.requests) == 11
    assert all(r.headers["Authorization"] == f"Bearer {KEY}" for r in fake.requests)
    assert {e.code for e in errors} >= {
        ErrorCode.BACKEND_AUTH,
        ErrorCode.BACKEND_REJECTED,
        ErrorCode.BACKEND_RATE_LIMITED,
        ErrorCode.BACKEND_UNAVAILABLE,
        ErrorCode.BACKEND_TIMEOUT,
    }
    assert any("Incorrect API key provided: ***" in str(e) for e in errors)
    assert logs, "attempt failures are logged"
    texts = [str(e) for e in errors] + [repr(e.args) for e in errors] + [json.dumps(logs, default=str)]
    texts += [record.getMessage() for record in caplog.records]
    captured = capsys.readouterr()
    texts += [captured.out, captured.err]
    for text in texts:
        assert KEY not in text
