"""One HTTP failure policy: the same status is the same code, retryability and failover for every backend.

Each backend meets the status from its real loopback fake: OpenAI's POST, ElevenLabs' batch POST and realtime
handshake, DashScope's handshake, and silero_vad_server's batch check (which logs it and counts the turn as speech).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import structlog
from aiohttp import web

from firmware_protocol import ErrorCode
from service.config import ElevenLabsSettings, OpenAISettings, ParaformerSettings
from service.endpointing.engines import BatchVadCheck
from service.recognition.base import BackendError, SessionOptions, TranscriptionBackend
from service.recognition.elevenlabs import ElevenLabsBackend
from service.recognition.http import status_error, transport_error
from service.recognition.openai import OpenAIBackend
from service.recognition.paraformer import ParaformerBackend
from service.wav import read_wav_16k_mono
from tests.fakes import dashscope_server, elevenlabs_server, openai_server
from tests.fakes._loopback import serve

PCM = read_wav_16k_mono(Path(__file__).parent / "fixtures" / "what_time.wav")
KEY = "sk-policy-0123456789abcdef"
Outcome = tuple[ErrorCode, bool, bool]

POLICY: dict[int, Outcome] = {
    400: (ErrorCode.BACKEND_REJECTED, False, False),
    401: (ErrorCode.BACKEND_AUTH, False, False),
    403: (ErrorCode.BACKEND_AUTH, False, False),
    404: (ErrorCode.BACKEND_ERROR, False, True),
    408: (ErrorCode.BACKEND_TIMEOUT, True, True),
    409: (ErrorCode.BACKEND_UNAVAILABLE, True, True),
    413: (ErrorCode.BACKEND_REJECTED, False, False),
    422: (ErrorCode.BACKEND_REJECTED, False, False),
    429: (ErrorCode.BACKEND_RATE_LIMITED, True, True),
    500: (ErrorCode.BACKEND_UNAVAILABLE, True, True),
    503: (ErrorCode.BACKEND_UNAVAILABLE, True, True),
}
STATUSES = sorted(POLICY)


def outcome(error: BackendError) -> Outcome:
    return error.code, error.retryable, error.failover


async def final_error(backend: TranscriptionBackend) -> BackendError:
    await backend.start()
    try:
        stream = backend.open(SessionOptions(language="en", device_id="dev-1"), _Listener())
        stream.feed(PCM)
        with pytest.raises(BackendError) as caught:
            async with asyncio.timeout(20):
                await stream.finish()
    finally:
        await backend.aclose()
    assert KEY not in str(caught.value)
    return caught.value


class _Listener:
    def partial(self, text: str) -> None:
        pass

    def end_of_turn(self) -> None:
        pass


@pytest.mark.parametrize("status", STATUSES)
def test_the_policy(status: int) -> None:
    assert outcome(status_error(status, {}, f"HTTP {status}")) == POLICY[status]


def test_retry_after_is_kept_for_rate_limits_and_outages() -> None:
    assert status_error(429, {"retry-after": "2"}, "").retry_after_s == 2.0
    assert status_error(503, {"retry-after-ms": "500"}, "").retry_after_s == 0.5


def test_transport_failures() -> None:
    assert outcome(transport_error(TimeoutError(), "")) == (ErrorCode.BACKEND_TIMEOUT, True, True)
    assert outcome(transport_error(httpx.ReadTimeout("slow"), "")) == (ErrorCode.BACKEND_TIMEOUT, True, True)
    refused = httpx.ConnectError("refused")
    assert outcome(transport_error(refused, "")) == (ErrorCode.BACKEND_UNAVAILABLE, True, True)
    assert outcome(transport_error(ConnectionResetError(), "")) == (ErrorCode.BACKEND_UNAVAILABLE, True, True)
    bad_url = httpx.UnsupportedProtocol("ftp://")
    assert outcome(transport_error(bad_url, "")) == (ErrorCode.BACKEND_ERROR, False, True)


@pytest.mark.parametrize("status", STATUSES)
async def test_openai(status: int) -> None:
    async with openai_server.FakeOpenAI(api_key=KEY) as fake:
        fake.script(openai_server.Fault(status, f"scripted {status}"))
        settings = OpenAISettings(url=fake.url, api_key=KEY, model="whisper-1", max_retries=0)
        error = await final_error(OpenAIBackend(settings))
    assert f"HTTP {status}" in str(error)
    assert outcome(error) == POLICY[status]


@pytest.mark.parametrize("status", STATUSES)
@pytest.mark.parametrize("mode", ["batch", "realtime"])
async def test_elevenlabs(status: int, mode: str) -> None:
    async with elevenlabs_server.FakeElevenLabs(api_key=KEY) as fake:
        fake.faults = [elevenlabs_server.Fault.http(status)]
        settings = ElevenLabsSettings(
            url=fake.realtime_url, api_key=KEY, mode="batch" if mode == "batch" else "realtime", max_retries=0
        )
        error = await final_error(ElevenLabsBackend(settings))
    assert f"HTTP {status}" in str(error)
    assert outcome(error) == POLICY[status]


@pytest.mark.parametrize("status", STATUSES)
async def test_dashscope_handshake(status: int) -> None:
    script = dashscope_server.Script(["what time is it"], bytes_per_word=6400, end_after_ms=None)
    async with dashscope_server.FakeDashScope(api_key=KEY, script=script) as fake:
        fake.faults.append(dashscope_server.Fault("reject", status=status))
        settings = ParaformerSettings(url=fake.ws_url, paraformer_token=KEY, max_retries=0, connect_timeout_s=2)
        error = await final_error(ParaformerBackend(settings))
    assert f"HTTP {status}" in str(error)
    assert outcome(error) == POLICY[status]


@asynccontextmanager
async def vad_service(status: int) -> AsyncIterator[str]:
    """silero_vad_server's ``/v1/audio/vad`` answering ``status``."""

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"error": f"scripted {status}"}, status=status)

    app = web.Application()
    app.router.add_post("/v1/audio/vad", handle)
    runner, port = await serve(app)
    try:
        yield f"http://user:hunter2@127.0.0.1:{port}/v1/audio/vad?token=s3cret"
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("status", STATUSES)
async def test_vad_batch_check(status: int) -> None:
    async with vad_service(status) as url:
        check = BatchVadCheck(url, timeout_s=5, connect_timeout_s=2)
        try:
            with structlog.testing.capture_logs() as logs:
                assert await check.has_speech(np.zeros(16000, dtype=np.int16))  # a failure never loses the turn
        finally:
            await check.aclose()
    (line,) = [entry for entry in logs if entry["event"] == "vad.batch_check_failed"]
    assert (ErrorCode(line["code"]), line["retryable"], line["failover"]) == POLICY[status]
    assert "hunter2" not in line["url"] and "s3cret" not in line["url"]
