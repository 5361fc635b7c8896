"""The OpenAI fake, driven by the official ``openai`` SDK: if the SDK is satisfied, so is our backend's target.

Each test also checks what the fake recorded against what the SDK was asked to send,
so the recording our backend tests rely on is proven accurate too.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import openai
import pytest
from openai import AsyncOpenAI
from openai.types.audio import TranscriptionTextDeltaEvent, TranscriptionTextDoneEvent

from service.wav import read_wav_16k_mono, wav_bytes
from tests.fakes.openai_server import Drop, FakeOpenAI, Fault, Hang, Transcript

KEY = "sk-test-0123456789abcdef"
FIXTURE = Path(__file__).parent / "fixtures" / "what_time.wav"


@pytest.fixture(scope="module")
def pcm() -> np.ndarray:
    return read_wav_16k_mono(FIXTURE)


@pytest.fixture
def wav(pcm: np.ndarray) -> bytes:
    return wav_bytes(pcm)


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI(api_key=KEY) as server:
        yield server


@pytest.fixture
async def client(fake: FakeOpenAI) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(api_key=KEY, base_url=fake.base_url, max_retries=0, timeout=10) as sdk:
        yield sdk


async def test_json(fake: FakeOpenAI, client: AsyncOpenAI, wav: bytes, pcm: np.ndarray) -> None:
    fake.script(Transcript("What time is it?"))
    result = await client.audio.transcriptions.create(
        model="gpt-4o-mini-transcribe", file=("audio.wav", wav, "audio/wav"), language="en", prompt="Hello"
    )
    assert result.text == "What time is it?"
    assert result.usage is not None and result.usage.type == "tokens"
    (seen,) = fake.requests
    assert seen.fields == {"model": ["gpt-4o-mini-transcribe"], "language": ["en"], "prompt": ["Hello"]}
    assert seen.headers["Authorization"] == f"Bearer {KEY}"
    assert seen.headers["Content-Type"].startswith("multipart/form-data; boundary=")
    upload = seen.files["file"]
    assert (upload.filename, upload.content_type, upload.data) == ("audio.wav", "audio/wav", wav)
    assert seen.wav is not None and seen.wav.sample_rate == 16000 and seen.wav.channels == 1
    assert seen.audio == pcm.astype("<i2").tobytes()
    assert seen.status == 200


async def test_whisper_usage_is_duration(fake: FakeOpenAI, client: AsyncOpenAI, wav: bytes, pcm: np.ndarray) -> None:
    result = await client.audio.transcriptions.create(model="whisper-1", file=("audio.wav", wav))
    assert result.usage is not None and result.usage.type == "duration"
    assert result.usage.seconds == math.ceil(len(pcm) / 16000)
    # Without a content type the SDK guesses one from the file name.
    assert fake.requests[0].files["file"].content_type in ("audio/x-wav", "audio/wav")


async def test_text_format_is_returned_verbatim(fake: FakeOpenAI, client: AsyncOpenAI, wav: bytes) -> None:
    fake.script(Transcript("[00:00:00.000 --> 00:00:02.000] hello"))
    result = await client.audio.transcriptions.create(model="whisper-1", file=("a.wav", wav), response_format="text")
    assert result == "[00:00:00.000 --> 00:00:02.000] hello\n"
    assert fake.requests[0].field("response_format") == "text"


async def test_verbose_json_with_word_timestamps(
    fake: FakeOpenAI, client: AsyncOpenAI, wav: bytes, pcm: np.ndarray
) -> None:
    fake.script(Transcript("what time is it"))
    result = await client.audio.transcriptions.create(
        model="whisper-1",
        file=("audio.wav", wav),
        response_format="verbose_json",
        timestamp_granularities=["word", "segment"],
    )
    assert result.text == "what time is it"
    assert result.language == "english"
    assert result.duration == pytest.approx(len(pcm) / 16000, abs=0.01)
    assert result.segments is not None and result.segments[0].text == " what time is it"
    assert result.words is not None and [w.word for w in result.words] == ["what", "time", "is", "it"]
    seen = fake.requests[0]
    assert seen.fields["timestamp_granularities[]"] == ["word", "segment"]
    assert seen.form["timestamp_granularities"] == ["word", "segment"]


async def test_bracket_fields(fake: FakeOpenAI, client: AsyncOpenAI, wav: bytes) -> None:
    result = await client.audio.transcriptions.create(
        model="gpt-4o-transcribe",
        file=("audio.wav", wav),
        include=["logprobs"],
        chunking_strategy={"type": "server_vad", "threshold": 0.5, "silence_duration_ms": 200},
        temperature=0.0,
    )
    assert result.logprobs and result.logprobs[0].token == "Hello."
    form = fake.requests[0].form
    assert form["include"] == ["logprobs"]
    assert form["chunking_strategy"] == {"type": "server_vad", "threshold": "0.5", "silence_duration_ms": "200"}
    assert form["temperature"] in ("0", "0.0")


async def test_file_from_path(fake: FakeOpenAI, client: AsyncOpenAI) -> None:
    await client.audio.transcriptions.create(model="whisper-1", file=FIXTURE)
    seen = fake.requests[0]
    assert seen.files["file"].filename == "what_time.wav"
    assert seen.files["file"].data == FIXTURE.read_bytes()


@pytest.mark.parametrize("extras", [False, True], ids=["openai", "event-lines-and-done-marker"])
async def test_streaming_events(fake: FakeOpenAI, client: AsyncOpenAI, wav: bytes, extras: bool) -> None:
    fake.script(Transcript("what time is it", delta_interval_s=0.01, sse_extras=extras))
    stream = await client.audio.transcriptions.create(
        model="gpt-4o-mini-transcribe", file=("audio.wav", wav), stream=True
    )
    events = [event async for event in stream]
    deltas = [e for e in events if isinstance(e, TranscriptionTextDeltaEvent)]
    assert [e.delta for e in deltas] == ["what ", "time ", "is ", "it"]
    done = events[-1]
    assert isinstance(done, TranscriptionTextDoneEvent)
    assert done.text == "what time is it"
    assert done.usage is not None and done.usage.total_tokens > 0
    assert len(events) == 5
    assert fake.requests[0].field("stream") == "true"


async def test_groq_flavour(wav: bytes) -> None:
    async with FakeOpenAI(api_key=KEY, groq=True) as groq:
        async with AsyncOpenAI(api_key=KEY, base_url=groq.base_url, max_retries=0) as client:
            result = await client.audio.transcriptions.create(model="whisper-large-v3", file=("audio.wav", wav))
    assert result.text == "Hello."
    extra = result.model_extra or {}
    assert extra["x_groq"]["id"].startswith("req_")


async def test_local_whisper_without_model(wav: bytes) -> None:
    async with FakeOpenAI(require_model=False) as local:
        async with AsyncOpenAI(api_key="unused", base_url=local.base_url, max_retries=0) as client:
            result = await client.audio.transcriptions.create(model="", file=("audio.wav", wav))
    assert result.text == "Hello."


async def test_response_headers(fake: FakeOpenAI, client: AsyncOpenAI, wav: bytes) -> None:
    raw = await client.audio.transcriptions.with_raw_response.create(model="whisper-1", file=("audio.wav", wav))
    assert raw.headers["x-request-id"].startswith("req_")
    assert int(raw.headers["openai-processing-ms"]) >= 0
    assert raw.request_id == raw.headers["x-request-id"]


@pytest.mark.parametrize(
    ("fault", "error", "code", "type_"),
    [
        (Fault.bad_request(), openai.BadRequestError, None, "invalid_request_error"),
        (Fault.unauthorized(), openai.AuthenticationError, "invalid_api_key", "invalid_request_error"),
        (
            Fault(403, "You are not allowed to sample from this model", "invalid_request_error"),
            openai.PermissionDeniedError,
            None,
            "invalid_request_error",
        ),
        (Fault.too_large(), openai.APIStatusError, None, "server_error"),
        (Fault.rate_limited(retry_after="20"), openai.RateLimitError, "rate_limit_exceeded", "requests"),
        (Fault.server_error(), openai.InternalServerError, None, "server_error"),
        (Fault.server_error(503), openai.InternalServerError, None, "server_error"),
    ],
    ids=["400", "401", "403", "413", "429", "500", "503"],
)
async def test_errors(
    fake: FakeOpenAI,
    client: AsyncOpenAI,
    wav: bytes,
    fault: Fault,
    error: type[openai.APIStatusError],
    code: str | None,
    type_: str,
) -> None:
    fake.script(fault)
    with pytest.raises(error) as raised:
        await client.audio.transcriptions.create(model="whisper-1", file=("audio.wav", wav))
    exc = raised.value
    assert exc.status_code == fault.status
    assert exc.code == code
    assert exc.type == type_
    assert exc.param is None
    assert fault.message in exc.message
    assert exc.request_id is not None and exc.request_id.startswith("req_")
    assert fake.requests[0].status == fault.status


async def test_413_message(fake: FakeOpenAI, client: AsyncOpenAI, wav: bytes) -> None:
    fake.script(Fault.too_large(27_000_000))
    with pytest.raises(openai.APIStatusError) as raised:
        await client.audio.transcriptions.create(model="whisper-1", file=("audio.wav", wav))
    assert raised.value.status_code == 413
    assert "Maximum content size limit (26214400) exceeded (27000000 bytes read)" in raised.value.message


async def test_real_size_limit(fake: FakeOpenAI, client: AsyncOpenAI) -> None:
    big = wav_bytes(np.zeros(26_214_400 // 2 + 1000, dtype=np.int16))
    with pytest.raises(openai.APIStatusError) as raised:
        await client.audio.transcriptions.create(model="whisper-1", file=("audio.wav", big))
    assert raised.value.status_code == 413
    assert raised.value.type == "server_error"


async def test_wrong_and_missing_key(fake: FakeOpenAI, wav: bytes) -> None:
    async with AsyncOpenAI(api_key="sk-wrong-key-0000000000", base_url=fake.base_url, max_retries=0) as wrong:
        with pytest.raises(openai.AuthenticationError) as raised:
            await wrong.audio.transcriptions.create(model="whisper-1", file=("audio.wav", wav))
    assert raised.value.code == "invalid_api_key"
    assert "sk-wrong-key-0000000000" not in raised.value.message  # masked, as OpenAI does
    # The SDK refuses an empty key; an omitted header is how it sends none.
    async with AsyncOpenAI(api_key="unused", base_url=fake.base_url, max_retries=0) as keyless:
        with pytest.raises(openai.AuthenticationError) as raised:
            await keyless.audio.transcriptions.create(
                model="whisper-1", file=("audio.wav", wav), extra_headers={"Authorization": openai.omit}
            )
    assert "Authorization" not in fake.requests[-1].headers
    assert "didn't provide an API key" in raised.value.message


async def test_request_validation(fake: FakeOpenAI, client: AsyncOpenAI, wav: bytes) -> None:
    with pytest.raises(openai.BadRequestError, match="must provide a model"):
        await client.audio.transcriptions.create(model="", file=("audio.wav", wav))
    with pytest.raises(openai.BadRequestError, match="Invalid file format") as raised:
        await client.audio.transcriptions.create(model="whisper-1", file=("audio.xyz", wav))
    short = wav_bytes(np.zeros(800, dtype=np.int16))
    with pytest.raises(openai.BadRequestError) as raised:
        await client.audio.transcriptions.create(model="whisper-1", file=("audio.wav", short))
    assert (raised.value.code, raised.value.param) == ("audio_too_short", "file")
    with pytest.raises(openai.BadRequestError) as raised:
        await client.audio.transcriptions.create(model="whisper-1", file=("audio.wav", wav), response_format="yaml")  # type: ignore[call-overload]
    assert raised.value.param == "response_format"


async def test_sdk_retries_on_429_with_retry_after_ms(fake: FakeOpenAI, wav: bytes) -> None:
    fake.script(Fault.rate_limited(retry_after_ms="50"), Fault.server_error())
    async with AsyncOpenAI(api_key=KEY, base_url=fake.base_url, max_retries=2) as client:
        result = await client.audio.transcriptions.create(model="whisper-1", file=("audio.wav", wav))
    assert result.text == "Hello."
    assert [r.status for r in fake.requests] == [429, 500, 200]
    assert [r.headers["x-stainless-retry-count"] for r in fake.requests] == ["0", "1", "2"]
    assert fake.requests[1].received_at - fake.requests[0].received_at >= 0.04


async def test_drop_and_hang(fake: FakeOpenAI, client: AsyncOpenAI, wav: bytes) -> None:
    fake.script(Drop(), Hang())
    with pytest.raises(openai.APIConnectionError):
        await client.audio.transcriptions.create(model="whisper-1", file=("audio.wav", wav))
    with pytest.raises(openai.APITimeoutError):
        await client.audio.transcriptions.create(model="whisper-1", file=("audio.wav", wav), timeout=0.3)
    hung = fake.requests[1]
    await hung.disconnected.wait()
    assert hung.status is None


async def test_text_from_audio(fake: FakeOpenAI, client: AsyncOpenAI, pcm: np.ndarray) -> None:
    def by_duration(request: object) -> str:
        wav = getattr(request, "wav", None)
        assert wav is not None
        return "long" if wav.duration_s > 1 else "short"

    fake.default = Transcript(by_duration)
    long = await client.audio.transcriptions.create(model="whisper-1", file=("audio.wav", wav_bytes(pcm)))
    short = await client.audio.transcriptions.create(model="whisper-1", file=("audio.wav", wav_bytes(pcm[:8000])))
    assert (long.text, short.text) == ("long", "short")
