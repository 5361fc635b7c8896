"""The ElevenLabs fake is faithful: the official ``elevenlabs`` SDK, pointed at it, gets what it expects.

Batch goes through ``AsyncElevenLabs.speech_to_text.convert``; realtime through
``speech_to_text.realtime.connect`` (``ScribeRealtime``/``RealtimeConnection``), which takes ``base_url`` and
turns http into ws. Each test also checks that the fake recorded exactly what the SDK sent.
"""

from __future__ import annotations

import asyncio
import base64
import io
import wave
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from elevenlabs import AsyncElevenLabs, AudioFormat, CommitStrategy, RealtimeEvents, SpeechToTextChunkResponseModel
from elevenlabs.core.api_error import ApiError
from elevenlabs.errors import UnprocessableEntityError
from elevenlabs.realtime import RealtimeAudioOptions, RealtimeConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus

from service.wav import read_wav_16k_mono
from tests.fakes.elevenlabs_server import FakeElevenLabs, Fault, Script

KEY = "sk_fake_sdk_0123"
FIXTURES = Path(__file__).parent / "fixtures"
WHAT_TIME = read_wav_16k_mono(FIXTURES / "what_time.wav")
SDK_NULL_FIELDS = {"webhook_metadata": "null", "entity_detection": "null", "entity_redaction": "null"}
"""The SDK always sends these three form fields, JSON-encoded, even when unset: the service must take them."""


def wav(pcm: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16000)
        out.writeframes(pcm.tobytes())
    return buffer.getvalue()


@pytest.fixture
async def fake() -> AsyncIterator[FakeElevenLabs]:
    async with FakeElevenLabs(api_key=KEY) as server:
        yield server


class Events:
    """Every event a RealtimeConnection emits, and a way to wait for one."""

    def __init__(self, connection: RealtimeConnection) -> None:
        self.seen: list[tuple[str, Any]] = []
        self._changed = asyncio.Event()
        for event in RealtimeEvents:
            connection.on(event, self._recorder(event.value))

    def _recorder(self, name: str) -> Any:
        def record(data: Any = None) -> None:
            self.seen.append((name, data))
            self._changed.set()

        return record

    def of(self, name: str) -> list[Any]:
        return [data for kind, data in self.seen if kind == name]

    async def wait_for(self, name: str, timeout: float = 10.0) -> Any:
        async with asyncio.timeout(timeout):
            while not self.of(name):
                self._changed.clear()
                await self._changed.wait()
        return self.of(name)[0]


async def connect(client: AsyncElevenLabs, **options: Any) -> tuple[RealtimeConnection, Events]:
    settings: dict[str, Any] = {
        "model_id": "scribe_v2_realtime",
        "audio_format": AudioFormat.PCM_16000,
        "sample_rate": 16000,
    }
    settings.update(options)
    connection = await client.speech_to_text.realtime.connect(RealtimeAudioOptions(**settings))  # type: ignore[typeddict-item]
    return connection, Events(connection)


async def send_audio(connection: RealtimeConnection, pcm: np.ndarray, chunk: int = 1600) -> None:
    for start in range(0, len(pcm), chunk):
        await connection.send({"audio_base_64": base64.b64encode(pcm[start : start + chunk].tobytes()).decode()})


# Batch ------------------------------------------------------------------------------------------------------------


async def test_sdk_batch_convert_gets_a_full_response(fake: FakeElevenLabs) -> None:
    client = AsyncElevenLabs(api_key=KEY, base_url=fake.base_url)
    result = await client.speech_to_text.convert(
        model_id="scribe_v1", file=("clip.wav", wav(WHAT_TIME), "audio/wav"), language_code="en"
    )
    assert isinstance(result, SpeechToTextChunkResponseModel)
    assert result.text == "what time is it"
    assert result.language_code == "en" and 0 <= result.language_probability <= 1
    assert result.audio_duration_secs == pytest.approx(len(WHAT_TIME) / 16000)
    assert result.transcription_id
    assert [w.text for w in result.words if w.type == "word"] == ["what", "time", "is", "it"]
    assert {w.type for w in result.words} == {"word", "spacing"}

    [request] = fake.batch_requests
    assert request.fields == {"model_id": "scribe_v1", "language_code": "en", **SDK_NULL_FIELDS}
    assert request.file == wav(WHAT_TIME)
    assert (request.filename, request.content_type) == ("clip.wav", "audio/wav")
    assert request.headers["xi-api-key"] == KEY
    assert request.headers["content-type"].startswith("multipart/form-data; boundary=")
    assert request.query == {}


async def test_sdk_batch_raw_pcm_with_file_format(fake: FakeElevenLabs) -> None:
    fake.script.text = lambda seconds: f"{seconds:.3f}"
    client = AsyncElevenLabs(api_key=KEY, base_url=fake.base_url)
    result = await client.speech_to_text.convert(
        model_id="scribe_v2", file=WHAT_TIME.tobytes(), file_format="pcm_s16le_16"
    )
    assert isinstance(result, SpeechToTextChunkResponseModel)
    assert result.text == f"{len(WHAT_TIME) / 16000:.3f}"
    assert fake.batch_requests[0].fields["file_format"] == "pcm_s16le_16"
    assert fake.batch_requests[0].file == WHAT_TIME.tobytes()


async def test_sdk_batch_missing_model_is_a_422_validation_error(fake: FakeElevenLabs) -> None:
    client = AsyncElevenLabs(api_key=KEY, base_url=fake.base_url)
    with pytest.raises(UnprocessableEntityError) as caught:
        await client.speech_to_text.convert(model_id=None, file=("a.wav", wav(WHAT_TIME)))  # type: ignore[arg-type]
    assert caught.value.body == {"detail": [{"loc": ["body", "model_id"], "msg": "Field required", "type": "missing"}]}
    assert "model_id" not in fake.batch_requests[0].fields  # the SDK drops a None field


async def test_sdk_batch_wrong_key_is_401_invalid_api_key(fake: FakeElevenLabs) -> None:
    client = AsyncElevenLabs(api_key="wrong", base_url=fake.base_url)
    with pytest.raises(ApiError) as caught:
        await client.speech_to_text.convert(model_id="scribe_v1", file=("a.wav", wav(WHAT_TIME)))
    assert caught.value.status_code == 401
    assert caught.value.body["detail"]["status"] == "invalid_api_key"


async def test_sdk_batch_retry_after_429_loses_its_form_fields(fake: FakeElevenLabs) -> None:
    """elevenlabs 2.78.0 retries 429/5xx itself but drops ``data`` on the retry: only the file goes again.

    The retried request then lacks ``model_id`` and the service (and so the fake) answers 422. Our backend
    does not use the SDK, so it is not affected; this pins the fake's retry-visible behaviour.
    """
    fake.faults = [Fault.http(429, retry_after="0")]
    client = AsyncElevenLabs(api_key=KEY, base_url=fake.base_url)
    with pytest.raises(UnprocessableEntityError):
        await client.speech_to_text.convert(model_id="scribe_v1", file=("a.wav", wav(WHAT_TIME)))
    first, retry = fake.batch_requests
    assert first.fields == {"model_id": "scribe_v1", **SDK_NULL_FIELDS}
    assert retry.fields == {} and retry.file == first.file


async def test_sdk_batch_gives_up_with_the_status_after_its_retries(fake: FakeElevenLabs) -> None:
    fake.faults = [Fault.http(500)] * 2
    client = AsyncElevenLabs(api_key=KEY, base_url=fake.base_url)
    with pytest.raises(ApiError) as caught:
        await client.speech_to_text.convert(
            model_id="scribe_v1", file=("a.wav", wav(WHAT_TIME)), request_options={"max_retries": 1}
        )
    assert caught.value.status_code == 500
    assert caught.value.body == {"detail": {"status": "internal_error", "message": "Scripted server error"}}
    assert len(fake.batch_requests) == 2


# Realtime -----------------------------------------------------------------------------------------------------------


async def test_sdk_realtime_manual_commit(fake: FakeElevenLabs) -> None:
    client = AsyncElevenLabs(api_key=KEY, base_url=fake.base_url)
    connection, events = await connect(client, language_code="en")
    started = await events.wait_for("session_started")
    await send_audio(connection, WHAT_TIME)
    await connection.commit()
    committed = await events.wait_for("committed_transcript")
    await connection.close()

    assert started["config"]["audio_format"] == "pcm_16000" and started["session_id"]
    assert committed == {"message_type": "committed_transcript", "text": "what time is it"}
    partials = [data["text"] for data in events.of("partial_transcript")]
    assert partials and partials[0] == "what" and all("what time is it".startswith(p) for p in partials)
    assert not events.of("error")

    [session] = fake.sessions
    assert session.query == [
        ("model_id", "scribe_v2_realtime"),
        ("audio_format", "pcm_16000"),
        ("commit_strategy", "manual"),
        ("language_code", "en"),
        ("include_timestamps", "false"),
    ]
    assert session.headers["xi-api-key"] == KEY
    *chunks, commit = session.messages
    assert all(
        set(chunk) == {"message_type", "audio_base_64", "commit", "sample_rate", "previous_text"}
        and chunk["previous_text"] is None
        and chunk["commit"] is False
        for chunk in chunks
    )
    assert commit == {"message_type": "input_audio_chunk", "audio_base_64": "", "commit": True, "sample_rate": 16000}
    assert bytes(session.audio) == WHAT_TIME.tobytes()
    assert session.client_closed


async def test_sdk_realtime_timestamps(fake: FakeElevenLabs) -> None:
    client = AsyncElevenLabs(api_key=KEY, base_url=fake.base_url)
    connection, events = await connect(client, include_timestamps=True)
    await send_audio(connection, WHAT_TIME)
    await connection.commit()
    detailed = await events.wait_for("committed_transcript_with_timestamps")
    await connection.close()
    assert detailed["text"] == "what time is it" and detailed["language_code"] == "eng"
    assert [w["text"] for w in detailed["words"] if w["type"] == "word"] == ["what", "time", "is", "it"]
    assert events.of("committed_transcript")[0]["text"] == "what time is it"
    assert fake.sessions[0].params["include_timestamps"] == "true"


async def test_sdk_realtime_vad_commits_after_a_pause(fake: FakeElevenLabs) -> None:
    client = AsyncElevenLabs(api_key=KEY, base_url=fake.base_url)
    connection, events = await connect(client, commit_strategy=CommitStrategy.VAD, vad_silence_threshold_secs=0.4)
    started = await events.wait_for("session_started")
    await send_audio(connection, np.concatenate([WHAT_TIME, np.zeros(8000, dtype=np.int16)]))
    committed = await events.wait_for("committed_transcript")
    await connection.close()
    assert committed["text"] == "what time is it"
    assert started["config"]["commit_strategy"] == "vad"
    assert started["config"]["vad_silence_threshold_secs"] == 0.4
    session = fake.sessions[0]
    assert session.params["commit_strategy"] == "vad" and session.params["vad_silence_threshold_secs"] == "0.4"
    assert session.commits == 0


async def test_sdk_realtime_single_use_token_replaces_the_key(fake: FakeElevenLabs) -> None:
    client = AsyncElevenLabs(api_key=KEY, base_url=fake.base_url)
    connection, events = await connect(client, token="single-use-token")
    await events.wait_for("session_started")
    await connection.close()
    assert fake.sessions[0].params["token"] == "single-use-token"
    assert "xi-api-key" not in fake.sessions[0].headers


async def test_sdk_realtime_wrong_key_gets_auth_error_then_close(fake: FakeElevenLabs) -> None:
    client = AsyncElevenLabs(api_key="wrong", base_url=fake.base_url)
    connection, events = await connect(client)
    auth = await events.wait_for("auth_error")
    close = await events.wait_for("close")
    await connection.close()
    assert auth == {"message_type": "auth_error", "error": "Invalid API key or token"}
    assert events.of("error") == [auth]  # the SDK re-emits specific errors as ERROR too
    assert close == {"code": 1000, "reason": "auth_error"}
    assert not events.of("session_started")


async def test_sdk_realtime_wrong_key_as_a_refused_handshake() -> None:
    async with FakeElevenLabs(api_key=KEY, auth_failure="http") as fake:
        client = AsyncElevenLabs(api_key="wrong", base_url=fake.base_url)
        with pytest.raises(InvalidStatus) as caught:
            await connect(client)
    assert caught.value.response.status_code == 401


@pytest.mark.parametrize("message_type", ["quota_exceeded", "rate_limited", "input_error", "transcriber_error"])
async def test_sdk_realtime_surfaces_scripted_errors(fake: FakeElevenLabs, message_type: str) -> None:
    fake.faults = [Fault.message(message_type, when="audio", after_audio_s=0.5)]
    client = AsyncElevenLabs(api_key=KEY, base_url=fake.base_url)
    connection, events = await connect(client)
    await events.wait_for("session_started")
    with pytest.raises(ConnectionClosed):  # the socket closes under the sender
        for _ in range(50):
            await send_audio(connection, WHAT_TIME[:1600])
            await asyncio.sleep(0.01)
    specific = await events.wait_for(message_type)
    assert specific == {"message_type": message_type, "error": f"scripted {message_type}"}
    assert specific in events.of("error")
    assert (await events.wait_for("close"))["reason"] == message_type
    await connection.close()


async def test_sdk_realtime_commit_of_too_little_audio_is_throttled(fake: FakeElevenLabs) -> None:
    client = AsyncElevenLabs(api_key=KEY, base_url=fake.base_url)
    connection, events = await connect(client)
    await send_audio(connection, WHAT_TIME[16000:16320])
    await connection.commit()
    throttled = await events.wait_for("commit_throttled")
    await connection.close()
    assert "0.02s of uncommitted audio" in throttled["error"]


async def test_sdk_realtime_previous_text_only_on_the_first_chunk(fake: FakeElevenLabs) -> None:
    client = AsyncElevenLabs(api_key=KEY, base_url=fake.base_url)
    connection, events = await connect(client)
    chunk = base64.b64encode(WHAT_TIME[16000:17600].tobytes()).decode()
    await connection.send({"audio_base_64": chunk, "previous_text": "So as I was saying"})
    await connection.send({"audio_base_64": chunk, "previous_text": "again"})
    error = await events.wait_for("input_error")
    await connection.close()
    assert "previous_text" in error["error"]
    assert fake.sessions[0].messages[0]["previous_text"] == "So as I was saying"


async def test_sdk_realtime_sees_a_dropped_connection(fake: FakeElevenLabs) -> None:
    fake.faults = [Fault.drop(after_audio_s=0.3)]
    client = AsyncElevenLabs(api_key=KEY, base_url=fake.base_url)
    connection, events = await connect(client)
    await events.wait_for("session_started")
    with pytest.raises(ConnectionClosed):
        for _ in range(50):
            await send_audio(connection, WHAT_TIME[:1600])
            await asyncio.sleep(0.01)
    close = await events.wait_for("close")
    await connection.close()
    assert close["code"] in (1006, None)
    assert events.of("error")
    assert not events.of("committed_transcript")


async def test_sdk_realtime_hang_leaves_the_sdk_waiting(fake: FakeElevenLabs) -> None:
    fake.faults = [Fault.hang("open")]
    client = AsyncElevenLabs(api_key=KEY, base_url=fake.base_url)
    connection, events = await connect(client)
    with pytest.raises(TimeoutError):
        await events.wait_for("session_started", timeout=0.5)
    await connection.close()
    await fake.wait_until(lambda: fake.sessions[0].client_closed)


async def test_script_partials_and_latency() -> None:
    async with FakeElevenLabs(api_key=KEY, script=Script(text="turn on the kitchen light", latency_s=0.2)) as fake:
        client = AsyncElevenLabs(api_key=KEY, base_url=fake.base_url)
        connection, events = await connect(client)
        await send_audio(connection, WHAT_TIME)
        loop = asyncio.get_running_loop()
        committed_at = loop.time()
        await connection.commit()
        committed = await events.wait_for("committed_transcript")
        assert loop.time() - committed_at >= 0.2
        await connection.close()
    assert committed["text"] == "turn on the kitchen light"
    partials = [data["text"] for data in events.of("partial_transcript")]
    assert partials == sorted(partials, key=len) and partials[0] == "turn"
