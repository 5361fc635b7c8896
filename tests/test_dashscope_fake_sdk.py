"""The DashScope fake, driven by the official ``dashscope`` SDK: if the SDK is happy, the fake is faithful.

The SDK is synchronous and runs its own event loop in threads, so each SDK call runs in
``asyncio.to_thread`` while the fake keeps serving in the test's loop. A few rules the SDK
never exercises (socket reuse, audio before ``task-started``) are checked with a raw client.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import dashscope
import pytest
from dashscope.audio.asr import Recognition, RecognitionCallback, RecognitionResult
from dashscope.common.error import InvalidParameter
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from service.wav import read_wav_16k_mono
from tests.fakes.dashscope_server import FakeDashScope, Fault, Script

FIXTURES = Path(__file__).parent / "fixtures"
KEY = "sk-fake-dashscope-key"
MODEL = "paraformer-realtime-v2"


@pytest.fixture(scope="module")
def pcm_bytes() -> bytes:
    return read_wav_16k_mono(FIXTURES / "what_time.wav").astype("<i2").tobytes()


@pytest.fixture
def pcm_file(tmp_path: Path, pcm_bytes: bytes) -> Path:
    path = tmp_path / "what_time.pcm"
    path.write_bytes(pcm_bytes)
    return path


@asynccontextmanager
async def sdk_on_fake(monkeypatch: pytest.MonkeyPatch, **kwargs: Any) -> AsyncIterator[FakeDashScope]:
    kwargs.setdefault("script", Script(["What time is it?"], bytes_per_word=6400, end_after_ms=200))
    async with FakeDashScope(api_key=KEY, **kwargs) as fake:
        monkeypatch.setattr(dashscope, "base_websocket_api_url", fake.ws_url)
        monkeypatch.setattr(dashscope, "api_key", KEY)
        yield fake


class Collector(RecognitionCallback):
    """Records what the SDK reports; callbacks arrive on SDK threads."""

    def __init__(self) -> None:
        self.sentences: list[dict[str, Any]] = []
        self.errors: list[RecognitionResult] = []
        self.completed = threading.Event()
        self.closed = threading.Event()

    def on_event(self, result: RecognitionResult) -> None:
        sentence = result.get_sentence()
        assert isinstance(sentence, dict)
        self.sentences.append(sentence)

    def on_error(self, result: RecognitionResult) -> None:
        self.errors.append(result)

    def on_complete(self) -> None:
        self.completed.set()

    def on_close(self) -> None:
        self.closed.set()

    @property
    def interim(self) -> list[str]:
        return [s["text"] for s in self.sentences if not RecognitionResult.is_sentence_end(s)]

    @property
    def finals(self) -> list[str]:
        return [s["text"] for s in self.sentences if RecognitionResult.is_sentence_end(s)]


def stream_with_sdk(recognition: Recognition, audio: bytes, *, frame: int = 3200, pause_s: float = 0.002) -> None:
    recognition.start()
    for start in range(0, len(audio), frame):
        recognition.send_audio_frame(audio[start : start + frame])
        time.sleep(pause_s)
    recognition.stop()


# call(file) --------------------------------------------------------------------------------


async def test_call_gets_the_scripted_sentence_and_run_task_is_as_documented(
    monkeypatch: pytest.MonkeyPatch, pcm_file: Path, pcm_bytes: bytes
) -> None:
    async with sdk_on_fake(monkeypatch) as fake:
        recognition = Recognition(model=MODEL, format="pcm", sample_rate=16000, callback=RecognitionCallback())
        result = await asyncio.to_thread(recognition.call, str(pcm_file))
    assert result.status_code == 200
    sentences = result.get_sentence()
    assert isinstance(sentences, list)
    assert [s["text"] for s in sentences] == ["What time is it?"]
    assert sentences[0]["words"][-1] == {"begin_time": 600, "end_time": 800, "text": "it", "punctuation": "?"}
    assert result.get_usage(sentences[0]) == {"duration": 2}

    task = fake.task(0)
    assert re.fullmatch(r"[0-9a-f]{32}", task.task_id)
    assert task.run_task == {
        "header": {"streaming": "duplex", "task_id": task.task_id, "action": "run-task"},
        "payload": {
            "model": MODEL,
            "task_group": "audio",
            "task": "asr",
            "function": "recognition",
            "parameters": {"sample_rate": 16000, "format": "pcm"},
            "input": {},
        },
    }
    assert task.finish_task == {
        "header": {"streaming": "duplex", "task_id": task.task_id, "action": "finish-task"},
        "payload": {"input": {}},
    }
    assert bytes(task.audio) == pcm_bytes
    assert all(size == 12800 for size in task.frames[:-1])  # call() sends 12 800-byte frames back to back
    headers = fake.connections[0].headers
    assert headers["Authorization"] == f"Bearer {KEY}"
    assert "X-DashScope-DataInspection" not in headers  # the SDK sends it only when asked to
    assert task.events == ["task-started", "result-generated", "result-generated", "result-generated", "task-finished"]


async def test_call_with_the_documented_parameters_and_two_sentences(
    monkeypatch: pytest.MonkeyPatch, pcm_file: Path
) -> None:
    monkeypatch.setenv("DASHSCOPE_DISABLE_DATA_INSPECTION", "false")
    script = Script(["Hello.", "What time is it?"], bytes_per_word=3200, end_after_ms=100)
    async with sdk_on_fake(monkeypatch, script=script) as fake:
        recognition = Recognition(
            model=MODEL,
            format="pcm",
            sample_rate=16000,
            callback=RecognitionCallback(),
            language_hints=["zh", "en"],
            semantic_punctuation_enabled=False,
            heartbeat=False,
        )
        result = await asyncio.to_thread(recognition.call, str(pcm_file))
    assert [s["text"] for s in result.get_sentence()] == ["Hello.", "What time is it?"]
    assert fake.task(0).parameters == {
        "sample_rate": 16000,
        "format": "pcm",
        "language_hints": ["zh", "en"],
        "semantic_punctuation_enabled": False,
        "heartbeat": False,
    }
    assert fake.connections[0].headers["X-DashScope-DataInspection"] == "enable"


async def test_call_with_a_wav_file(monkeypatch: pytest.MonkeyPatch) -> None:
    wav = FIXTURES / "what_time.wav"
    async with sdk_on_fake(monkeypatch) as fake:
        recognition = Recognition(model=MODEL, format="wav", sample_rate=16000, callback=RecognitionCallback())
        result = await asyncio.to_thread(recognition.call, str(wav))
    assert [s["text"] for s in result.get_sentence()] == ["What time is it?"]
    assert fake.task(0).parameters["format"] == "wav"
    assert bytes(fake.task(0).audio) == wav.read_bytes()  # the file as it is, header included


async def test_call_sees_task_failed_as_an_error(monkeypatch: pytest.MonkeyPatch, pcm_file: Path) -> None:
    async with sdk_on_fake(monkeypatch) as fake:
        fake.faults.append(Fault("fail_run_task", error_code="InvalidParameter", error_message="bad format"))
        recognition = Recognition(model=MODEL, format="pcm", sample_rate=16000, callback=RecognitionCallback())
        result = await asyncio.to_thread(recognition.call, str(pcm_file))
    assert (result.status_code, result.code, result.message) == (44, "InvalidParameter", "bad format")
    assert fake.connections[0].closed


async def test_call_with_a_wrong_key_is_unauthorized(monkeypatch: pytest.MonkeyPatch, pcm_file: Path) -> None:
    async with sdk_on_fake(monkeypatch) as fake:
        monkeypatch.setattr(dashscope, "api_key", "sk-wrong")
        recognition = Recognition(model=MODEL, format="pcm", sample_rate=16000, callback=RecognitionCallback())
        result = await asyncio.to_thread(recognition.call, str(pcm_file))
    assert result.status_code == 401
    assert result.message == "Unauthorized, your api-key is invalid!"
    assert [c.refused for c in fake.connections] == [401]


# start() / send_audio_frame() / stop() --------------------------------------------------------


async def test_streaming_gets_interim_and_final_results(monkeypatch: pytest.MonkeyPatch, pcm_bytes: bytes) -> None:
    callback = Collector()
    async with sdk_on_fake(monkeypatch) as fake:
        recognition = Recognition(model=MODEL, format="pcm", sample_rate=16000, callback=callback)
        await asyncio.to_thread(stream_with_sdk, recognition, pcm_bytes)
    assert callback.completed.is_set() and not callback.errors
    assert callback.interim == ["What", "What time", "What time is", "What time is it?"]
    assert callback.finals == ["What time is it?"]
    task = fake.task(0)
    assert bytes(task.audio) == pcm_bytes
    assert all(size == 3200 for size in task.frames[:-1])
    assert task.finish_task is not None


async def test_streaming_sdk_drops_heartbeats(monkeypatch: pytest.MonkeyPatch, pcm_bytes: bytes) -> None:
    callback = Collector()
    script = Script(["What time is it?"], bytes_per_word=6400, end_after_ms=200, heartbeat_every=3)
    async with sdk_on_fake(monkeypatch, script=script) as fake:
        recognition = Recognition(model=MODEL, format="pcm", sample_rate=16000, callback=callback, heartbeat=True)
        await asyncio.to_thread(stream_with_sdk, recognition, pcm_bytes)
    sent = [e["payload"]["output"]["sentence"] for e in fake.task(0).sent if e["header"]["event"] == "result-generated"]
    assert any(s["heartbeat"] for s in sent)
    assert not any(s["heartbeat"] for s in callback.sentences)
    assert callback.finals == ["What time is it?"]


async def test_streaming_sees_task_failed_mid_stream(monkeypatch: pytest.MonkeyPatch, pcm_bytes: bytes) -> None:
    callback = Collector()
    async with sdk_on_fake(monkeypatch) as fake:
        fake.faults.append(Fault("fail_mid", after_bytes=16000, error_code="InternalError", error_message="oops"))
        recognition = Recognition(model=MODEL, format="pcm", sample_rate=16000, callback=callback)

        def run() -> None:
            try:
                stream_with_sdk(recognition, pcm_bytes)
            except InvalidParameter:
                pass  # "Speech recognition has stopped.": the SDK stopped on the error

        await asyncio.to_thread(run)
    assert len(callback.errors) == 1
    error = callback.errors[0]
    assert (error.status_code, error.code, error.message) == (44, "InternalError", "oops")
    assert not callback.completed.is_set()


async def test_streaming_silence_times_out(monkeypatch: pytest.MonkeyPatch, pcm_bytes: bytes) -> None:
    callback = Collector()
    async with sdk_on_fake(monkeypatch, silence_timeout_s=0.4):
        recognition = Recognition(model=MODEL, format="pcm", sample_rate=16000, callback=callback)

        def run() -> None:
            recognition.start()
            recognition.send_audio_frame(pcm_bytes[:3200])
            # The SDK polls its audio queue with time.sleep inside its event loop, so it reads
            # the task-failed only after stop() ends that polling.
            time.sleep(1.0)
            try:
                recognition.stop()
            except InvalidParameter:
                pass

        await asyncio.to_thread(run)
    assert [e.message for e in callback.errors] == ["request timeout after 0.4 seconds."]
    assert callback.errors[0].code == "CLIENT_ERROR"


# Rules the SDK never exercises, with a raw client --------------------------------------------


def run_task(task_id: str) -> str:
    return json.dumps(
        {
            "header": {"action": "run-task", "task_id": task_id, "streaming": "duplex"},
            "payload": {
                "task_group": "audio",
                "task": "asr",
                "function": "recognition",
                "model": MODEL,
                "parameters": {"format": "pcm", "sample_rate": 16000},
                "input": {},
            },
        }
    )


def finish_task(task_id: str) -> str:
    return json.dumps(
        {"header": {"action": "finish-task", "task_id": task_id, "streaming": "duplex"}, "payload": {"input": {}}}
    )


async def events_until(ws: ClientConnection, last: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    async with asyncio.timeout(5):
        while True:
            event = json.loads(await ws.recv())
            events.append(event)
            if event["header"]["event"] in (last, "task-failed"):
                return events


@asynccontextmanager
async def raw(fake: FakeDashScope, key: str = KEY) -> AsyncIterator[ClientConnection]:
    async with connect(fake.ws_url, additional_headers={"Authorization": f"Bearer {key}"}) as ws:
        yield ws


async def test_socket_serves_a_second_task(pcm_bytes: bytes) -> None:
    async with FakeDashScope(api_key=KEY, script=Script(["Hi."], bytes_per_word=3200)) as fake, raw(fake) as ws:
        for task_id in ("a" * 32, "b" * 32):
            await ws.send(run_task(task_id))
            assert (await events_until(ws, "task-started"))[-1]["header"] == {
                "task_id": task_id,
                "event": "task-started",
                "attributes": {},
            }
            await ws.send(pcm_bytes[:6400])
            await ws.send(finish_task(task_id))
            events = await events_until(ws, "task-finished")
            assert events[-1] == {
                "header": {"task_id": task_id, "event": "task-finished", "attributes": {}},
                "payload": {"output": {}, "usage": None},
            }
            final = events[-2]["payload"]
            assert final["output"]["sentence"]["sentence_end"] and final["usage"] == {"duration": 1}
    assert [t.connection for t in fake.tasks] == [0, 0]


async def test_audio_before_task_started_fails_the_task(pcm_bytes: bytes) -> None:
    async with FakeDashScope(api_key=KEY, latency_s=0.2) as fake, raw(fake) as ws:
        await ws.send(run_task("c" * 32))
        await ws.send(pcm_bytes[:3200])
        events = await events_until(ws, "task-failed")  # task-started was already on its way
        assert events[-1]["header"]["error_message"] == "audio received before task-started."
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)


async def test_unknown_action_fails_the_task() -> None:
    async with FakeDashScope(api_key=KEY) as fake, raw(fake) as ws:
        await ws.send(json.dumps({"header": {"action": "pause-task", "task_id": "d" * 32}, "payload": {}}))
        event = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert event["header"]["event"] == "task-failed" and event["header"]["task_id"] == "d" * 32


async def test_idle_socket_is_closed_by_the_server() -> None:
    async with FakeDashScope(api_key=KEY, idle_close_s=0.2) as fake, raw(fake) as ws:
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)


async def test_wrong_key_is_refused_at_the_handshake() -> None:
    async with FakeDashScope(api_key=KEY) as fake:
        with pytest.raises(InvalidStatus) as caught:
            async with raw(fake, key="nope"):
                pass
    assert caught.value.response.status_code == 401
