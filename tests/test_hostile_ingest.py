"""A hostile or broken fleet against a real bridge process on a real Mosquitto.

Every attack is bounded in count and time. What is asserted is behaviour the protocol
promises (codes, bounds on what is sent, state that is or is not kept), never speed.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import numpy as np
import pytest

from firmware_protocol import (
    AudioFrame,
    Cancel,
    Endpointing,
    Error,
    ErrorCode,
    FrameFlags,
    Listening,
    Start,
    TopicKind,
    Transcript,
    encode_message,
)
from service.ingest.limits import ERROR_INTERVAL_S, START_BURST, ErrorLimiter, StartBucket
from service.tools.device_sim import frames_of
from tests.conftest import BridgeProcess, Broker
from tests.device import RawDevice
from tests.test_metrics import metrics_port, scrape, value

MAX_ERRORS_PER_S = 100
CONFIG = f"""
[asr]
platform = "pocketsphinx"
decoders = 1
[session]
max_sessions = 3
max_errors_per_s = {MAX_ERRORS_PER_S}
max_frame_bytes = 4096
idle_timeout_s = 10
max_utterance_s = 8
[metrics]
enabled = true
listen = "127.0.0.1:0"
"""


@pytest.fixture(scope="module")
def hostile(broker: Broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BridgeProcess]:
    process = BridgeProcess(broker, tmp_path_factory.mktemp("hostile"), CONFIG).start()
    yield process
    process.stop()


def _device(bridge: BridgeProcess, name: str) -> RawDevice:
    return RawDevice(bridge.broker.host, bridge.broker.port, bridge.prefix, f"{name}{uuid.uuid4().hex[:6]}")


def _errors(device: RawDevice, code: ErrorCode) -> list[Error]:
    return [m for m in device.messages() if isinstance(m, Error) and m.code is code]


def _rss_kb(bridge: BridgeProcess) -> int:
    assert bridge.process is not None
    for line in Path(f"/proc/{bridge.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def _raw_publish(bridge: BridgeProcess, messages: list[tuple[str, bytes]], batch: int = 500) -> None:
    """Many topics from one client, QoS 1 so none is lost on the way (bounded: the list)."""
    client = aiomqtt.Client(bridge.broker.host, bridge.broker.port, identifier=f"flood-{uuid.uuid4().hex[:8]}")
    async with asyncio.timeout(120), client:
        for i in range(0, len(messages), batch):
            await asyncio.gather(*(client.publish(topic, payload, qos=1) for topic, payload in messages[i : i + batch]))


async def _settle(
    port: int, name: str, target: float, timeout: float = 90, *, below: bool = False, **labels: str
) -> dict:
    """Scrape until ``name`` reaches ``target`` (or falls to it, ``below``): the bridge has read what was sent."""
    async with asyncio.timeout(timeout):
        while True:
            samples = await scrape(port)
            current = value(samples, name, **labels)
            if (current <= target) if below else (current >= target):
                return samples
            await asyncio.sleep(0.2)


def _log_is_clean(bridge: BridgeProcess) -> None:
    log = Path(bridge.log_path).read_text(errors="replace")
    for bad in ("Traceback", "RecursionError", "dispatch.failed"):
        assert bad not in log, bad


# The limits themselves (pure) --------------------------------------------------------------------


def test_the_error_limiter_allows_one_per_device_and_code_per_interval() -> None:
    limiter = ErrorLimiter(per_s=100)
    assert limiter.allow("d1", "malformed_frame", 10.0)
    assert not limiter.allow("d1", "malformed_frame", 10.5)
    assert limiter.allow("d1", "bad_control", 10.5)  # another code
    assert limiter.allow("d2", "malformed_frame", 10.5)  # another device
    assert limiter.allow("d1", "malformed_frame", 10.0 + ERROR_INTERVAL_S)
    assert (limiter.counts.sent, limiter.counts.dropped_device) == (4, 1)


def test_the_error_limiter_has_a_fleet_budget_and_forgets_within_the_interval() -> None:
    limiter = ErrorLimiter(per_s=50)
    allowed = sum(limiter.allow(f"d{i}", "malformed_frame", 100.0 + i / 10_000) for i in range(10_000))
    assert allowed <= 50 + 50 + 1  # the full bucket (one second's budget), plus what refilled in that second
    assert limiter.counts.dropped_fleet == 10_000 - allowed
    assert len(limiter) <= limiter.max_entries == 100
    limiter.expire(102.0)
    assert len(limiter) == 0
    # Over many seconds: never more than the budget a second, and the entries stay bounded.
    sent_before = limiter.counts.sent
    for step in range(20_000):
        limiter.allow(f"x{step}", "bad_control", 200.0 + step / 1000)  # 1000 a second for 20 s
        assert len(limiter) <= limiter.max_entries
    assert limiter.counts.sent - sent_before <= 50 * 21


def test_the_start_bucket_allows_a_burst_then_paces() -> None:
    bucket = StartBucket()
    assert [bucket.take(2.0, 50.0) for _ in range(START_BURST)] == [0.0] * START_BURST
    wait = bucket.take(2.0, 50.0)
    assert wait == pytest.approx(0.5)
    assert bucket.take(2.0, 50.0 + wait) == 0.0


# Bounded memory for any seq ------------------------------------------------------------------


async def test_a_seq_jump_ends_the_session_with_audio_gap_and_allocates_nothing(
    hostile: BridgeProcess, speech: dict
) -> None:
    rss_before = _rss_kb(hostile)
    audio: np.ndarray = speech["what_time"]
    async with _device(hostile, "gap") as device:
        for session, jump in ((11, 4294967295 - 5), (12, 1_000_000)):
            frames = frames_of(audio, session_id=session)[:5]
            await device.stream(frames)
            await device.send(AudioFrame(session, 5 + jump, frames[1].payload))
            error = await device.wait_for(lambda m, s=session: isinstance(m, Error) and m.session == s)
            assert isinstance(error, Error) and error.code is ErrorCode.AUDIO_GAP and error.retryable
            assert error.message.startswith("seq: ")
            await asyncio.sleep(1.1)  # the next audio_gap is not rate-limited away
        # A gap the bridge conceals (600 ms of 20 ms frames) is no error; the session goes on to its final.
        frames = frames_of(audio, session_id=13, last=True)
        await device.stream(frames[:10] + frames[40:])
        final = await device.wait_for(lambda m: isinstance(m, Transcript) and m.final and m.session == 13, timeout=60)
        assert isinstance(final, Transcript)
        assert not [m for m in device.messages(13) if isinstance(m, Error)]
    # 3.5 GB before the bound; the bound itself is 1 s of silence.
    assert _rss_kb(hostile) - rss_before < 150_000
    _log_is_clean(hostile)


# Garbage costs nothing; errors bounded per device and fleet-wide ------------------------------


async def test_a_churn_of_distinct_garbage_ids_keeps_no_state_and_errors_stay_bounded(hostile: BridgeProcess) -> None:
    port = metrics_port(hostile)
    before = await scrape(port)
    ids = 20_000
    churn = [(f"{hostile.prefix}/churn{i:05d}/in/audio", b"not a frame") for i in range(ids)]
    churn += [(f"{hostile.prefix}/churn{i:05d}/in/control", b"[1]") for i in range(0, ids, 10)]
    async with _device(hostile, "victim") as victim:
        victim_topic = victim.topics.device(victim.device_id, TopicKind.AUDIO)
        # The victim's own bad frames, mixed into the churn: still one error per code per second.
        mixed = []
        for i, message in enumerate(churn):
            mixed.append(message)
            if i % 200 == 0:
                mixed.append((victim_topic, b"EK\x09"))
        started = time.monotonic()
        await _raw_publish(hostile, mixed)
        received = value(before, "echokit_bridge_messages_received_total") + len(mixed)
        during = await _settle(port, "echokit_bridge_messages_received_total", received)
        elapsed = time.monotonic() - started
        await asyncio.sleep(1.5)
        victim_errors = _errors(victim, ErrorCode.MALFORMED_FRAME)
    assert 1 <= len(victim_errors) <= elapsed + 2, (len(victim_errors), elapsed)

    def delta(samples: dict, name: str, **labels: str) -> float:
        return value(samples, name, **labels) - value(before, name, **labels)

    sent = delta(during, "echokit_bridge_device_errors_total", outcome="sent")
    assert sent <= MAX_ERRORS_PER_S * (elapsed + 2), (sent, elapsed)
    assert delta(during, "echokit_bridge_device_errors_total", outcome="dropped_fleet") > 0
    assert delta(during, "echokit_bridge_messages_rejected_total", code="malformed_frame") >= ids
    # No state for ids that only sent garbage, and the limiter bounded by the fleet budget.
    assert value(during, "echokit_bridge_devices") <= value(before, "echokit_bridge_devices")
    assert value(during, "echokit_bridge_error_limiter_entries") <= 2 * MAX_ERRORS_PER_S
    after = await scrape(port)
    assert value(after, "echokit_bridge_error_limiter_entries") == 0  # forgotten after ERROR_INTERVAL_S
    _log_is_clean(hostile)


async def test_devices_refused_by_the_allow_list_keep_no_state(make_bridge: object, speech: dict) -> None:
    bridge: BridgeProcess = make_bridge(  # type: ignore[operator]
        CONFIG + '\n[devices]\nallow = ["known"]\n'
    )
    port = metrics_port(bridge)
    frame = frames_of(speech["what_time"], session_id=7)[0].encode()
    ids = 5_000
    await _raw_publish(bridge, [(f"{bridge.prefix}/stranger{i}/in/audio", frame) for i in range(ids)])
    samples = await _settle(port, "echokit_bridge_messages_rejected_total", ids, code="unknown_device")
    assert value(samples, "echokit_bridge_devices") == 0
    assert value(samples, "echokit_bridge_sessions_started_total") == 0
    assert value(samples, "echokit_bridge_error_limiter_entries") <= 2 * MAX_ERRORS_PER_S


# Starts rate-limited per device; admission refuses early with a retry hint ---------------------


async def test_a_start_storm_from_one_device_is_paced_and_what_it_is_sent_is_bounded(hostile: BridgeProcess) -> None:
    port = metrics_port(hostile)
    before = await scrape(port)
    storm = 300
    async with _device(hostile, "storm") as device:
        started = time.monotonic()
        for session in range(1, storm + 1):
            await device.control(Start(session=1000 + session))
        await _settle(
            port,
            "echokit_bridge_messages_received_total",
            value(before, "echokit_bridge_messages_received_total") + storm,
        )
        elapsed = time.monotonic() - started
        await asyncio.sleep(1.5)
        listening = [m for m in device.messages() if isinstance(m, Listening)]
        refused = _errors(device, ErrorCode.TOO_MANY_SESSIONS)
        total = len(device.messages())
        for message in listening:  # leave no session holding capacity
            await device.control(Cancel(session=message.session))
    after = await scrape(port)
    sessions = value(after, "echokit_bridge_sessions_started_total") - value(
        before, "echokit_bridge_sessions_started_total"
    )
    assert 1 <= sessions <= 5 + 2 * (elapsed + 1), (sessions, elapsed)
    assert len(listening) <= sessions
    assert 1 <= len(refused) <= elapsed + 3
    assert all(e.retryable and e.retry_after_ms is not None and e.retry_after_ms > 0 for e in refused)
    rate = value(after, "echokit_bridge_session_refusals_total", reason="rate") - value(
        before, "echokit_bridge_session_refusals_total", reason="rate"
    )
    assert rate == storm - sessions
    # Each started session says listening and, superseded, speech_ended: nothing else but the errors.
    assert total <= 2 * sessions + len(refused) + 2


async def test_over_capacity_a_new_session_is_refused_with_a_hint_and_admitted_ones_finish(
    hostile: BridgeProcess, speech: dict
) -> None:
    port = metrics_port(hostile)
    await _settle(port, "echokit_bridge_sessions_active", 0, below=True)  # earlier tests' sessions are over
    audio: np.ndarray = speech["what_time"]
    frames = {}
    async with (
        _device(hostile, "held1") as one,
        _device(hostile, "held2") as two,
        _device(hostile, "held3") as three,
        _device(hostile, "late") as late,
    ):
        held = (one, two, three)
        for n, device in enumerate(held, start=1):
            frames[n] = frames_of(audio, session_id=n, last=True)
            await device.control(Start(session=n, endpointing=Endpointing.PUSH_TO_TALK))
            await device.send(frames[n][0])
            await device.wait_for(lambda m: isinstance(m, Listening))
        await late.send(frames_of(audio, session_id=99)[0])
        error = await late.wait_for(lambda m: isinstance(m, Error))
        assert isinstance(error, Error) and error.code is ErrorCode.TOO_MANY_SESSIONS and error.retryable
        assert error.session == 99 and error.retry_after_ms is not None and 1000 <= error.retry_after_ms <= 2000
        for n, device in enumerate(held, start=1):
            await device.stream(frames[n][1:])
        for n, device in enumerate(held, start=1):
            final = await device.wait_for(lambda m, s=n: isinstance(m, Transcript) and m.final and m.session == s, 90)
            assert isinstance(final, Transcript) and "time" in final.text


# Malformed control, however nested ------------------------------------------------------------


def _nested(prefix: bytes, open_: bytes, inner: bytes, close: bytes, suffix: bytes) -> bytes:
    """As deep as fits in the 4096-byte control limit."""
    depth = (4096 - len(prefix) - len(inner) - len(suffix)) // (len(open_) + len(close))
    return prefix + open_ * depth + inner + close * depth + suffix


@pytest.mark.parametrize(
    "payload",
    [
        _nested(b'{"type":"start","session":1,"x":', b"[", b"", b"]", b"}"),
        _nested(b'{"type":"start","session":1,"language":', b'{"a":', b"0", b"}", b"}"),
        _nested(b"", b"[", b"", b"]", b""),
        _nested(b"", b'{"a":', b"0", b"}", b""),
        _nested(b'{"type":"configure","threshold":', b"[", b"", b"]", b"}"),
    ],
    ids=["arrays-in-unknown-field", "objects-in-known-field", "arrays", "objects", "arrays-in-known-field"],
)
async def test_deeply_nested_control_gets_bad_control_and_no_traceback(hostile: BridgeProcess, payload: bytes) -> None:
    assert len(payload) <= 4096
    async with _device(hostile, "nest") as device:
        await device.control(payload)
        error = await device.wait_for(lambda m: isinstance(m, Error))
        assert isinstance(error, Error) and error.code is ErrorCode.BAD_CONTROL and not error.retryable
        assert error.message.startswith("$")
        await device.control(encode_message(Start(session=5)))
        await device.send(AudioFrame(5, 0, bytes(640), FrameFlags.FIRST))
        await device.wait_for(lambda m: isinstance(m, Listening))  # the device is served after it
        await device.control(Cancel(session=5))  # leave no session holding capacity
    _log_is_clean(hostile)
