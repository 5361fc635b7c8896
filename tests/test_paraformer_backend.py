"""ParaformerBackend against the loopback DashScope fake, with real audio in 20 ms chunks."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from firmware_protocol import EndReason, ErrorCode
from service.config import ParaformerSettings
from service.recognition.base import BackendError, Recognition, RecognitionStream, SessionOptions
from service.recognition.paraformer import DEFAULT_URL, ParaformerBackend, join_sentences
from service.wav import read_wav_16k_mono
from tests.fakes.dashscope_server import FakeDashScope, Fault, Script

FIXTURES = Path(__file__).parent / "fixtures"
CHUNK = 320  # 20 ms at 16 kHz
TOKEN = "sk-paraformer-secret-0123456789"
WHAT_TIME = "What time is it?"


@pytest.fixture(scope="module")
def what_time() -> np.ndarray:
    return read_wav_16k_mono(FIXTURES / "what_time.wav")


@pytest.fixture(scope="module")
def weather() -> np.ndarray:
    return read_wav_16k_mono(FIXTURES / "weather.wav")


class Listener:
    def __init__(self) -> None:
        self.partials: list[str] = []
        self.ends = 0
        self.ended = asyncio.Event()
        self.partials_at_end: list[str] | None = None

    def partial(self, text: str) -> None:
        self.partials.append(text)

    def end_of_turn(self) -> None:
        self.ends += 1
        if self.partials_at_end is None:
            self.partials_at_end = list(self.partials)
        self.ended.set()


def asr(fake: FakeDashScope, **overrides: Any) -> ParaformerSettings:
    settings: dict[str, Any] = {
        "platform": "paraformer_v2",
        "url": fake.ws_url,
        "paraformer_token": TOKEN,
        "connect_timeout_s": 1.0,
        "timeout_s": 5.0,
        "max_retries": 2,
    }
    settings.update(overrides)
    return ParaformerSettings(**settings)


@asynccontextmanager
async def dashscope(**kwargs: Any) -> AsyncIterator[FakeDashScope]:
    kwargs.setdefault("script", Script([WHAT_TIME], bytes_per_word=6400, end_after_ms=None))
    async with FakeDashScope(api_key=TOKEN, **kwargs) as fake:
        yield fake


@asynccontextmanager
async def running(config: ParaformerSettings, **kwargs: Any) -> AsyncIterator[ParaformerBackend]:
    backend = ParaformerBackend(config, **kwargs)
    await backend.start()
    try:
        yield backend
    finally:
        await backend.aclose()


async def feed(stream: RecognitionStream, pcm: np.ndarray, *, pace_s: float = 0.0) -> None:
    """20 ms chunks, as the session feeds them; ``pace_s`` between chunks (0: just yield)."""
    for start in range(0, len(pcm), CHUNK):
        stream.feed(pcm[start : start + CHUNK])
        await asyncio.sleep(pace_s)


async def utterance(
    backend: ParaformerBackend, pcm: np.ndarray, device: str = "dev-1", listener: Listener | None = None
) -> Recognition:
    stream = backend.open(SessionOptions(device_id=device), listener or Listener())
    await feed(stream, pcm)
    return await stream.finish()


async def wait_until(predicate: Any, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 - polling the fake's records
            await asyncio.sleep(0.01)


# The wire ----------------------------------------------------------------------------------


async def test_run_task_and_finish_task_as_echokit_sends_them(what_time: np.ndarray) -> None:
    async with dashscope() as fake:
        config = asr(fake, max_sentence_silence=800, disfluency_removal_enabled=True)
        async with running(config, language="en") as backend:
            result = await utterance(backend, what_time)
    assert result == Recognition(WHAT_TIME, language="en")
    headers = fake.connections[0].headers
    assert headers["Authorization"] == f"Bearer {TOKEN}"
    assert headers["X-DashScope-DataInspection"] == "enable"
    task = fake.task(0)
    header = task.run_task["header"]
    assert re.fullmatch(r"[0-9a-f]{32}", header["task_id"])
    assert header == {"action": "run-task", "task_id": task.task_id, "streaming": "duplex"}
    assert task.run_task["payload"] == {
        "task_group": "audio",
        "task": "asr",
        "function": "recognition",
        "model": "paraformer-realtime-v2",
        "parameters": {
            "format": "pcm",
            "sample_rate": 16000,
            "semantic_punctuation_enabled": True,
            "language_hints": ["en"],
            "max_sentence_silence": 800,
            "disfluency_removal_enabled": True,
            "heartbeat": False,
        },
        "input": {},
    }
    assert task.finish_task == {
        "header": {"action": "finish-task", "task_id": task.task_id, "streaming": "duplex"},
        "payload": {"task_group": "audio", "input": {}},
    }
    assert task.events[0] == "task-started" and task.events[-1] == "task-finished"


async def test_optional_parameters_are_left_out_and_model_is_configurable(what_time: np.ndarray) -> None:
    async with dashscope() as fake:
        config = asr(fake, model="fun-asr-realtime", semantic_punctuation_enabled=False, heartbeat=True)
        async with running(config) as backend:
            result = await utterance(backend, what_time)
    assert result.language is None
    payload = fake.task(0).run_task["payload"]
    assert payload["model"] == "fun-asr-realtime"
    assert payload["parameters"] == {
        "format": "pcm",
        "sample_rate": 16000,
        "semantic_punctuation_enabled": False,
        "disfluency_removal_enabled": False,
        "heartbeat": True,
    }


async def test_session_language_wins_over_the_configured_one(what_time: np.ndarray) -> None:
    async with dashscope() as fake, running(asr(fake), language="zh") as backend:
        stream = backend.open(SessionOptions(device_id="d", language="en"), Listener())
        await feed(stream, what_time)
        result = await stream.finish()
    assert result.language == "en"
    assert fake.task(0).parameters["language_hints"] == ["en"]


def test_default_url_when_empty() -> None:
    backend = ParaformerBackend(ParaformerSettings(platform="paraformer_v2", paraformer_token="k"))
    assert backend.url == DEFAULT_URL == "wss://dashscope.aliyuncs.com/api-ws/v1/inference"
    assert backend.name == "paraformer_v2"


async def test_start_refuses_an_empty_token() -> None:
    backend = ParaformerBackend(ParaformerSettings(platform="paraformer_v2"))
    with pytest.raises(BackendError) as caught:
        await backend.start()
    assert caught.value.code is ErrorCode.BACKEND_AUTH


async def test_audio_goes_out_in_100ms_frames_and_every_byte_arrives(what_time: np.ndarray) -> None:
    async with dashscope() as fake, running(asr(fake)) as backend:
        await utterance(backend, what_time)
    task = fake.task(0)
    assert bytes(task.audio) == what_time.astype("<i2").tobytes()
    assert all(size == 3200 for size in task.frames[:-1])
    assert 0 < task.frames[-1] <= 3200


async def test_audio_fed_before_task_started_is_queued_not_lost(what_time: np.ndarray) -> None:
    """With a slow server the whole utterance is fed before task-started arrives."""
    async with dashscope(latency_s=0.3) as fake, running(asr(fake)) as backend:
        stream = backend.open(SessionOptions(device_id="d"), Listener())
        await feed(stream, what_time)
        assert not fake.tasks or not fake.task(0).audio
        result = await stream.finish()
    assert result.text == WHAT_TIME
    assert bytes(fake.task(0).audio) == what_time.astype("<i2").tobytes()


async def test_a_half_frame_is_held_until_more_audio_or_the_end() -> None:
    pcm = np.zeros(CHUNK * 3, dtype=np.int16)  # 1920 bytes
    async with dashscope() as fake, running(asr(fake)) as backend:
        stream = backend.open(SessionOptions(device_id="d"), Listener())
        await feed(stream, pcm)
        await wait_until(lambda: fake.tasks and "task-started" in fake.task(0).events)
        await asyncio.sleep(0.1)
        assert fake.task(0).frames == []
        await stream.finish()
    assert fake.task(0).frames == [1920]


# Results -----------------------------------------------------------------------------------


async def test_partials_then_the_final(what_time: np.ndarray) -> None:
    listener = Listener()
    async with dashscope() as fake, running(asr(fake)) as backend:
        result = await utterance(backend, what_time, listener=listener)
    assert result == Recognition(WHAT_TIME)
    assert listener.partials == ["What", "What time", "What time is", "What time is it?"]
    assert listener.ends == 1  # the sentence ended at finish-task


async def test_first_sentence_end_ends_the_turn_and_later_sentences_are_kept(weather: np.ndarray) -> None:
    script = Script(["What is the weather?", "And tomorrow."], bytes_per_word=4800, end_after_ms=300)
    listener = Listener()
    async with dashscope(script=script) as fake, running(asr(fake)) as backend:
        stream = backend.open(SessionOptions(device_id="d"), listener)
        await feed(stream, weather, pace_s=0.001)
        await asyncio.wait_for(listener.ended.wait(), 5)
        result = await stream.finish()
    assert listener.ends == 1
    assert listener.partials_at_end == ["What", "What is", "What is the", "What is the weather?"]
    assert listener.partials[-2:] == ["What is the weather? And", "What is the weather? And tomorrow."]
    assert result.text == "What is the weather? And tomorrow."


async def test_no_speech_is_an_empty_final(what_time: np.ndarray) -> None:
    async with dashscope(script=Script([])) as fake, running(asr(fake)) as backend:
        result = await utterance(backend, what_time)
    assert result == Recognition("", reason=EndReason.NO_SPEECH)


async def test_heartbeat_sentences_are_ignored(what_time: np.ndarray) -> None:
    script = Script([WHAT_TIME], bytes_per_word=6400, end_after_ms=None, heartbeat_every=2)
    listener = Listener()
    async with dashscope(script=script) as fake, running(asr(fake, heartbeat=True)) as backend:
        result = await utterance(backend, what_time, listener=listener)
    heartbeats = [e for e in fake.task(0).sent if e["payload"].get("output", {}).get("sentence", {}).get("heartbeat")]
    assert heartbeats
    assert "" not in listener.partials
    assert result.text == WHAT_TIME


def test_sentences_join_with_spaces_except_around_cjk() -> None:
    assert join_sentences(["Hello.", " How are you? "]) == "Hello. How are you?"
    assert join_sentences(["你好。", "今天天气怎么样？"]) == "你好。今天天气怎么样？"
    assert join_sentences(["", "ok"]) == "ok"


# Sockets -----------------------------------------------------------------------------------


async def test_one_socket_per_device_reused_across_turns(what_time: np.ndarray, weather: np.ndarray) -> None:
    async with dashscope() as fake, running(asr(fake)) as backend:
        first = await utterance(backend, what_time, "dev-a")
        fake.script = Script(["What is the weather today?"], bytes_per_word=6400, end_after_ms=None)
        second = await utterance(backend, weather, "dev-a")
        assert len(fake.accepted) == 1
        await utterance(backend, what_time, "dev-b")
        assert len(fake.accepted) == 2
    assert (first.text, second.text) == (WHAT_TIME, "What is the weather today?")
    assert [t.connection for t in fake.tasks] == [0, 0, 1]
    assert len({t.task_id for t in fake.tasks}) == 3
    assert bytes(fake.task(1).audio) == weather.astype("<i2").tobytes()


async def test_concurrent_devices_get_their_own_sockets(what_time: np.ndarray) -> None:
    async with dashscope() as fake, running(asr(fake)) as backend:
        results = await asyncio.gather(*(utterance(backend, what_time, f"dev-{i}") for i in range(3)))
    assert [r.text for r in results] == [WHAT_TIME] * 3
    assert fake.max_open_connections == 3
    assert sorted(t.connection for t in fake.tasks) == [0, 1, 2]


async def test_max_sockets_closes_the_least_recently_used_idle_socket(what_time: np.ndarray) -> None:
    async with dashscope() as fake, running(asr(fake, max_sockets=2)) as backend:
        await utterance(backend, what_time, "dev-a")
        await utterance(backend, what_time, "dev-b")
        await utterance(backend, what_time, "dev-a")  # dev-b is now the least recently used
        await utterance(backend, what_time, "dev-c")
        await wait_until(lambda: fake.open_connections == 2)
        assert fake.connections[1].closed and not fake.connections[0].closed
        assert len(backend.registry) == 2
    assert fake.max_open_connections <= 3  # the evicted socket closes while the new one opens
    assert [t.connection for t in fake.tasks] == [0, 1, 0, 2]


async def test_max_sockets_all_busy_fails_the_new_stream(what_time: np.ndarray) -> None:
    async with dashscope() as fake, running(asr(fake, max_sockets=1, max_retries=0)) as backend:
        busy = backend.open(SessionOptions(device_id="dev-a"), Listener())
        busy.feed(what_time[:CHUNK])
        await wait_until(lambda: fake.tasks)
        refused = backend.open(SessionOptions(device_id="dev-b"), Listener())
        refused.feed(what_time[:CHUNK])
        with pytest.raises(BackendError) as caught:
            await refused.finish()
        assert caught.value.code is ErrorCode.BACKEND_UNAVAILABLE
        assert caught.value.retryable and caught.value.failover
        await feed(busy, what_time)
        assert (await busy.finish()).text == WHAT_TIME
    assert len(fake.accepted) == 1


async def test_idle_sockets_are_closed(what_time: np.ndarray) -> None:
    async with dashscope() as fake, running(asr(fake), idle_close_s=0.2) as backend:
        await utterance(backend, what_time)
        await wait_until(lambda: fake.connections[0].closed)
        assert len(backend.registry) == 0
        assert (await utterance(backend, what_time)).text == WHAT_TIME
    assert len(fake.accepted) == 2


async def test_a_socket_the_server_closed_is_replaced(what_time: np.ndarray) -> None:
    async with dashscope(idle_close_s=0.2) as fake, running(asr(fake, max_retries=0)) as backend:
        await utterance(backend, what_time)
        await wait_until(lambda: fake.connections[0].closed)
        await asyncio.sleep(0.05)
        assert (await utterance(backend, what_time)).text == WHAT_TIME
    assert len(fake.accepted) == 2


async def test_aclose_closes_every_socket(what_time: np.ndarray) -> None:
    async with dashscope() as fake:
        async with running(asr(fake)) as backend:
            await asyncio.gather(*(utterance(backend, what_time, f"dev-{i}") for i in range(2)))
            assert fake.open_connections == 2
        await wait_until(lambda: fake.open_connections == 0)


# Failures ----------------------------------------------------------------------------------


async def test_task_failed_client_error_is_not_retried(what_time: np.ndarray) -> None:
    async with dashscope() as fake, running(asr(fake)) as backend:
        fake.faults.append(Fault("fail_run_task", error_code="InvalidParameter", error_message="bad sample_rate"))
        with pytest.raises(BackendError) as caught:
            await utterance(backend, what_time)
    error = caught.value
    assert error.code is ErrorCode.BACKEND_ERROR and not error.retryable
    assert "InvalidParameter" in str(error) and "bad sample_rate" in str(error)
    assert TOKEN not in str(error)
    assert len(fake.tasks) == 1


async def test_task_failed_mid_stream_is_retried_with_the_audio_replayed(what_time: np.ndarray) -> None:
    listener = Listener()
    async with dashscope() as fake, running(asr(fake)) as backend:
        fake.faults.append(Fault("fail_mid", after_bytes=16000, error_code="InternalError.Algo"))
        result = await utterance(backend, what_time, listener=listener)
    assert result.text == WHAT_TIME
    assert fake.task(0).events[-1] == "task-failed"
    assert bytes(fake.task(1).audio) == what_time.astype("<i2").tobytes()
    assert listener.partials == ["What", "What time", "What time is", "What time is it?"]


async def test_task_failed_every_time_gives_up_with_failover(what_time: np.ndarray) -> None:
    async with dashscope() as fake, running(asr(fake, max_retries=1)) as backend:
        fake.faults.append(Fault("fail_run_task", error_code="InternalError", error_message="boom", times=-1))
        with pytest.raises(BackendError) as caught:
            await utterance(backend, what_time)
    assert caught.value.code is ErrorCode.BACKEND_ERROR
    assert caught.value.retryable and caught.value.failover
    assert "InternalError" in str(caught.value) and TOKEN not in str(caught.value)
    assert len(fake.tasks) == 2


async def test_socket_dropped_mid_utterance_reconnects_and_replays(what_time: np.ndarray) -> None:
    listener = Listener()
    async with dashscope() as fake, running(asr(fake)) as backend:
        fake.faults.append(Fault("drop", after_bytes=20000))
        stream = backend.open(SessionOptions(device_id="d"), listener)
        await feed(stream, what_time, pace_s=0.001)
        result = await stream.finish()
    assert result.text == WHAT_TIME
    assert len(fake.accepted) == 2
    assert len(fake.task(0).audio) >= 20000
    assert bytes(fake.task(1).audio) == what_time.astype("<i2").tobytes()
    assert listener.partials == ["What", "What time", "What time is", "What time is it?"]
    assert listener.ends == 1


async def test_a_refused_handshake_is_retried(what_time: np.ndarray) -> None:
    async with dashscope() as fake, running(asr(fake)) as backend:
        fake.faults.append(Fault("reject", status=503))
        assert (await utterance(backend, what_time)).text == WHAT_TIME
    assert [c.refused for c in fake.connections] == [503, None]


async def test_unauthorized_is_backend_auth_without_retry(what_time: np.ndarray) -> None:
    async with dashscope() as fake:
        config = asr(fake, paraformer_token="sk-wrong-secret-key")
        async with running(config) as backend:
            with pytest.raises(BackendError) as caught:
                await utterance(backend, what_time)
    error = caught.value
    assert error.code is ErrorCode.BACKEND_AUTH
    assert not error.retryable and error.failover is False
    assert "401" in str(error) and "sk-wrong-secret-key" not in str(error)
    assert [c.refused for c in fake.connections] == [401]


async def test_forbidden_is_backend_auth(what_time: np.ndarray) -> None:
    async with dashscope() as fake, running(asr(fake)) as backend:
        fake.faults.append(Fault("reject", status=403, times=-1))
        with pytest.raises(BackendError) as caught:
            await utterance(backend, what_time)
    assert caught.value.code is ErrorCode.BACKEND_AUTH and len(fake.connections) == 1


async def test_unreachable_server_is_unavailable_with_failover(what_time: np.ndarray) -> None:
    async with dashscope() as fake:
        url = fake.ws_url
    config = asr(fake, url=url, max_retries=1)
    async with running(config) as backend:
        with pytest.raises(BackendError) as caught:
            await asyncio.wait_for(utterance(backend, what_time), 20)
    assert caught.value.code is ErrorCode.BACKEND_UNAVAILABLE
    assert caught.value.failover and TOKEN not in str(caught.value)


async def test_a_server_that_never_starts_the_task_times_out(what_time: np.ndarray) -> None:
    async with dashscope() as fake:
        config = asr(fake, connect_timeout_s=0.3, timeout_s=2.0, max_retries=1)
        async with running(config) as backend:
            fake.faults.append(Fault("hang", times=-1))
            with pytest.raises(BackendError) as caught:
                await asyncio.wait_for(utterance(backend, what_time), 20)
    assert caught.value.code in (ErrorCode.BACKEND_TIMEOUT, ErrorCode.BACKEND_UNAVAILABLE)
    assert caught.value.retryable and caught.value.failover
    assert len(fake.tasks) == 2


async def test_a_server_that_never_finishes_is_bounded_by_timeout_s(what_time: np.ndarray) -> None:
    async with dashscope() as fake:
        config = asr(fake, connect_timeout_s=0.5, timeout_s=1.5, max_retries=2)
        async with running(config) as backend:
            fake.faults.append(Fault("hang_finish", times=-1))
            stream = backend.open(SessionOptions(device_id="d"), Listener())
            await feed(stream, what_time)
            with pytest.raises(BackendError) as caught:
                await asyncio.wait_for(stream.finish(), 20)
    assert caught.value.code in (ErrorCode.BACKEND_TIMEOUT, ErrorCode.BACKEND_UNAVAILABLE)
    assert caught.value.failover
    assert len(fake.tasks) >= 2  # the hang was retried on a fresh socket before time ran out


async def test_a_hang_once_is_retried_to_success(what_time: np.ndarray) -> None:
    async with dashscope() as fake:
        config = asr(fake, connect_timeout_s=0.3, timeout_s=5.0)
        async with running(config) as backend:
            fake.faults.append(Fault("hang"))
            assert (await utterance(backend, what_time)).text == WHAT_TIME
    assert len(fake.accepted) == 2


async def test_server_silence_timeout_is_reported(what_time: np.ndarray) -> None:
    async with dashscope(silence_timeout_s=0.3) as fake, running(asr(fake)) as backend:
        stream = backend.open(SessionOptions(device_id="d"), Listener())
        await feed(stream, what_time[: CHUNK * 10])
        await wait_until(lambda: fake.tasks and fake.task(0).events[-1:] == ["task-failed"])
        with pytest.raises(BackendError) as caught:
            await stream.finish()
    assert "request timeout after 0.3 seconds." in str(caught.value)
    assert not caught.value.retryable


# Cancel ------------------------------------------------------------------------------------


async def test_cancel_is_prompt_and_keeps_the_socket(what_time: np.ndarray) -> None:
    async with dashscope(latency_s=0.05) as fake, running(asr(fake)) as backend:
        stream = backend.open(SessionOptions(device_id="d"), Listener())
        await feed(stream, what_time[: len(what_time) // 2], pace_s=0.001)
        await wait_until(lambda: fake.tasks and fake.task(0).audio)
        async with asyncio.timeout(1):
            await stream.cancel()
        await wait_until(lambda: fake.task(0).events[-1:] == ["task-finished"])
        assert (await utterance(backend, what_time, "d")).text == WHAT_TIME
    assert fake.task(0).finish_task is not None
    assert len(fake.accepted) == 1


async def test_cancel_while_the_server_hangs_closes_the_socket(what_time: np.ndarray) -> None:
    async with dashscope() as fake, running(asr(fake, connect_timeout_s=0.3)) as backend:
        fake.faults.append(Fault("hang_finish"))
        stream = backend.open(SessionOptions(device_id="d"), Listener())
        await feed(stream, what_time)
        finishing = asyncio.create_task(stream.finish())
        await wait_until(lambda: fake.tasks and fake.task(0).finish_task is not None)
        finishing.cancel()
        async with asyncio.timeout(1):
            await stream.cancel()
        await wait_until(lambda: fake.connections[0].closed)
        assert (await utterance(backend, what_time, "d")).text == WHAT_TIME
    assert len(fake.accepted) == 2


async def test_cancel_before_anything_was_sent(what_time: np.ndarray) -> None:
    async with dashscope() as fake, running(asr(fake)) as backend:
        stream = backend.open(SessionOptions(device_id="d"), Listener())
        async with asyncio.timeout(1):
            await stream.cancel()
        assert (await utterance(backend, what_time, "d")).text == WHAT_TIME
