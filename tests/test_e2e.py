"""Device → Mosquitto → bridge (subprocess) → pocketsphinx → results back on MQTT."""

from __future__ import annotations

import asyncio
import json
import random
import signal

import numpy as np
import pytest

from firmware_protocol import (
    AudioFrame,
    Cancel,
    Codec,
    Endpointing,
    EndReason,
    Error,
    ErrorCode,
    FrameFlags,
    Listening,
    SpeechEnded,
    SpeechStarted,
    Start,
    Transcript,
)
from service.tools.device_sim import frames_of, send_utterance
from tests.conftest import BridgeProcess, Broker, wait_for_status
from tests.device import RawDevice


def _final(message: object) -> bool:
    return isinstance(message, Transcript) and message.final


def _kinds(messages: list[object]) -> list[str]:
    return [m.__struct_config__.tag for m in messages]  # type: ignore[attr-defined]


async def test_server_vad_turn_gives_events_partials_and_final(bridge: BridgeProcess, speech: dict) -> None:
    received = await send_utterance(
        bridge.broker.url, "a1b2c3d4e5f6", speech["what_time"], prefix=bridge.prefix, speed=2, timeout_s=40
    )
    messages = [r.message for r in received]
    assert isinstance(messages[0], Listening) and messages[0].endpointing is Endpointing.SERVER_VAD
    started = next(m for m in messages if isinstance(m, SpeechStarted))
    ended = next(m for m in messages if isinstance(m, SpeechEnded))
    final = messages[-1]
    assert isinstance(final, Transcript) and final.final
    assert final.text == "what time is it"
    assert final.backend == "pocketsphinx" and final.language == "en"
    assert final.latency_ms is not None and final.latency_ms >= 0
    # Speech energy in the fixture runs from 720 ms to 1440 ms (RMS over 10 ms windows > 300).
    assert 620 <= started.offset_ms <= 820
    assert ended.reason is EndReason.SILENCE
    assert 1340 <= ended.offset_ms <= 1700
    assert (final.start_ms, final.end_ms) == (started.offset_ms, ended.offset_ms)
    partials = [m for m in messages if isinstance(m, Transcript) and not m.final]
    assert partials, "pocketsphinx decodes while audio arrives, so partials come before the end"
    kinds = _kinds(messages)
    assert kinds.index("speech_started") < kinds.index("speech_ended") < len(kinds) - 1


async def test_push_to_talk_ends_on_last_frame(bridge: BridgeProcess, speech: dict) -> None:
    audio = speech["weather"]
    received = await send_utterance(
        bridge.broker.url, "ptt-device", audio, prefix=bridge.prefix, speed=0, push_to_talk=True
    )
    messages = [r.message for r in received]
    ended = next(m for m in messages if isinstance(m, SpeechEnded))
    assert ended.reason is EndReason.DEVICE
    assert ended.offset_ms == len(audio) // 16
    final = messages[-1]
    assert isinstance(final, Transcript) and final.text == "what is the weather today"


async def test_noise_only_gives_an_empty_final_with_a_reason(bridge: BridgeProcess, speech: dict) -> None:
    received = await send_utterance(bridge.broker.url, "noisy", speech["noise"], prefix=bridge.prefix, speed=4)
    messages = [r.message for r in received]
    assert not any(isinstance(m, SpeechStarted) for m in messages)
    final = messages[-1]
    assert isinstance(final, Transcript) and final.final
    assert final.text == "" and final.reason is EndReason.NO_SPEECH


async def test_devices_are_served_concurrently(bridge: BridgeProcess, speech: dict) -> None:
    url, prefix = bridge.broker.url, bridge.prefix
    a, b = await asyncio.gather(
        send_utterance(url, "dev-a", speech["weather"], prefix=prefix, speed=2, push_to_talk=True),
        send_utterance(url, "dev-b", speech["what_time"], prefix=prefix, speed=2, push_to_talk=True),
    )
    assert a[-1].message.text == "what is the weather today"  # type: ignore[union-attr]
    assert b[-1].message.text == "what time is it"  # type: ignore[union-attr]


async def test_bad_input_is_reported_to_that_device_and_others_keep_working(
    bridge: BridgeProcess, speech: dict
) -> None:
    broker = bridge.broker
    good = asyncio.create_task(
        send_utterance(broker.url, "good-one", speech["what_time"], prefix=bridge.prefix, speed=1.5)
    )
    pcm = speech["timer"][:320].tobytes()
    bad_inputs = {
        ErrorCode.MALFORMED_FRAME: b"\x00garbage that is not a frame",
        ErrorCode.PAYLOAD_TOO_LARGE: AudioFrame(5, 0, bytes(8000), FrameFlags.FIRST).encode(),
        ErrorCode.UNSUPPORTED_CODEC: AudioFrame(6, 0, b"\x01\x02\x03", codec=Codec.OPUS).encode(),
        ErrorCode.UNSUPPORTED_FORMAT: AudioFrame(7, 0, pcm, sample_rate=48000, channels=2).encode(),
        ErrorCode.UNSUPPORTED_VERSION: AudioFrame(8, 0, pcm, version=2).encode(),
    }
    async with RawDevice(broker.host, broker.port, bridge.prefix, "bad-one") as device:
        for payload in bad_inputs.values():
            await device.send(payload)
        await device.control(b'{"type": "start", "session": "not a number"}')
        for code in [*bad_inputs, ErrorCode.BAD_CONTROL]:
            error = await device.wait_for(lambda m, c=code: isinstance(m, Error) and m.code is c)  # type: ignore[misc]
            assert isinstance(error, Error) and error.message
        errors = {m.code: m for m in device.messages() if isinstance(m, Error)}
        assert "magic" in errors[ErrorCode.MALFORMED_FRAME].message
        assert "$.session" in errors[ErrorCode.BAD_CONTROL].message
        assert errors[ErrorCode.UNSUPPORTED_FORMAT].session == 7
    received = await good
    assert received[-1].message.text == "what time is it"  # type: ignore[union-attr]
    assert bridge.process is not None and bridge.process.poll() is None


async def test_reordered_duplicated_and_lost_frames_are_reassembled(bridge: BridgeProcess, speech: dict) -> None:
    broker = bridge.broker
    frames = frames_of(speech["weather"], session_id=4242, last=True)
    rng = random.Random(7)
    order: list[AudioFrame] = []
    for i in range(0, len(frames), 4):  # shuffle inside blocks of 4 (the window is 8)
        block = frames[i : i + 4]
        rng.shuffle(block)
        order.extend(block)
    lost = {3, 160}  # one frame in the leading silence, one in the trailing silence
    duplicated = set(rng.sample(range(len(frames)), 15))
    wire = []
    for frame in order:
        if frame.seq in lost:
            continue
        wire.append(frame)
        if frame.seq in duplicated:
            wire.append(frame)
    async with RawDevice(broker.host, broker.port, bridge.prefix, "shaky") as device:
        await device.control(Start(session=4242, endpointing=Endpointing.PUSH_TO_TALK))
        await device.stream(wire, frame_s=0.002)
        final = await device.wait_for(_final, timeout=30)
    assert isinstance(final, Transcript) and final.text == "what is the weather today"
    assert final.end_ms == len(frames) * 20 - (20 - len(frames[-1].payload) // 32)
    stats = await _closed_stats(bridge, 4242)
    assert stats["lost"] == len(lost)
    assert stats["duplicates"] == len(duplicated - lost)
    assert stats["reordered"] > 0


async def _closed_stats(bridge: BridgeProcess, session: int) -> dict[str, int]:
    """The bridge logs a session's stream counters just after its final is out: wait for the line."""
    async with asyncio.timeout(10):
        while True:
            for line in bridge.log().splitlines():
                if '"session.closed"' in line and (entry := json.loads(line)).get("session") == session:
                    return entry  # type: ignore[no-any-return]
            await asyncio.sleep(0.05)


async def test_new_session_supersedes_and_cancel_stops(bridge: BridgeProcess, speech: dict) -> None:
    broker = bridge.broker
    first = frames_of(speech["timer"], session_id=11)
    second = frames_of(speech["what_time"], session_id=12, last=True)
    async with RawDevice(broker.host, broker.port, bridge.prefix, "impatient") as device:
        await device.control(Start(session=11, endpointing=Endpointing.PUSH_TO_TALK))
        await device.stream(first[:40], frame_s=0.002)
        await device.wait_for(lambda m: isinstance(m, Listening) and m.session == 11)
        await device.control(Start(session=12, endpointing=Endpointing.PUSH_TO_TALK))
        await device.stream(first[40:60] + second, frame_s=0.002)  # stale frames of 11 mixed in
        final = await device.wait_for(lambda m: _final(m) and m.session == 12, timeout=30)  # type: ignore[attr-defined]
        assert isinstance(final, Transcript) and final.text == "what time is it"
        ended_11 = await device.wait_for(lambda m: isinstance(m, SpeechEnded) and m.session == 11)
        assert isinstance(ended_11, SpeechEnded) and ended_11.reason is EndReason.CANCEL
        assert not any(_final(m) for m in device.messages(11))

        await device.control(Start(session=13, endpointing=Endpointing.PUSH_TO_TALK))
        await device.stream(frames_of(speech["weather"], session_id=13)[:30])
        await device.control(Cancel(session=13))
        ended_13 = await device.wait_for(lambda m: isinstance(m, SpeechEnded) and m.session == 13)
        assert isinstance(ended_13, SpeechEnded) and ended_13.reason is EndReason.CANCEL
        await asyncio.sleep(1.0)
        assert not any(_final(m) for m in device.messages(13))


async def test_rebooted_device_reusing_its_session_id_restarts(bridge: BridgeProcess, speech: dict) -> None:
    broker = bridge.broker
    async with RawDevice(broker.host, broker.port, bridge.prefix, "reboots") as device:
        await device.control(Start(session=1, endpointing=Endpointing.PUSH_TO_TALK))
        await device.stream(frames_of(speech["timer"], session_id=1)[:50], frame_s=0.002)
        await device.wait_for(lambda m: isinstance(m, Listening))
        # Rebooted: the same session id from seq 0 with FIRST, a different utterance.
        await device.stream(frames_of(speech["what_time"], session_id=1, last=True), frame_s=0.002)
        final = await device.wait_for(_final, timeout=30)
    assert isinstance(final, Transcript) and final.text == "what time is it"


async def test_abandoned_session_times_out(bridge: BridgeProcess, speech: dict) -> None:
    broker = bridge.broker
    async with RawDevice(broker.host, broker.port, bridge.prefix, "vanishes") as device:
        await device.control(Start(session=77, endpointing=Endpointing.PUSH_TO_TALK))
        await device.stream(frames_of(speech["what_time"], session_id=77)[:-5])  # no LAST frame ever
        ended = await device.wait_for(lambda m: isinstance(m, SpeechEnded), timeout=15)
        final = await device.wait_for(_final, timeout=15)
    assert isinstance(ended, SpeechEnded) and ended.reason is EndReason.TIMEOUT
    assert isinstance(final, Transcript) and final.text == "what time is it"


async def test_max_utterance_length_is_enforced(bridge: BridgeProcess, speech: dict) -> None:
    long_audio = np.concatenate([speech["timer"]] * 3)  # 10.4 s; the bridge allows 8 s
    received = await send_utterance(
        bridge.broker.url, "chatty", long_audio, prefix=bridge.prefix, speed=0, push_to_talk=True
    )
    messages = [r.message for r in received]
    error = next(m for m in messages if isinstance(m, Error))
    assert error.code is ErrorCode.UTTERANCE_TOO_LONG
    ended = next(m for m in messages if isinstance(m, SpeechEnded))
    assert ended.reason is EndReason.MAX_LENGTH and ended.offset_ms == 8000
    assert _final(messages[-1])


async def test_session_limit_and_allow_list(make_bridge: object, speech: dict) -> None:
    bridge: BridgeProcess = make_bridge(  # type: ignore[operator]
        """
        [session]
        max_sessions = 1
        [devices]
        allow = ["aabbccddeeff", "second"]
        """
    )
    broker = bridge.broker
    async with (
        RawDevice(broker.host, broker.port, bridge.prefix, "aabbccddeeff") as first,
        RawDevice(broker.host, broker.port, bridge.prefix, "second") as second,
        RawDevice(broker.host, broker.port, bridge.prefix, "stranger") as stranger,
    ):
        await first.control(Start(session=1, endpointing=Endpointing.PUSH_TO_TALK))
        await first.wait_for(lambda m: isinstance(m, Listening))
        await second.control(Start(session=2, endpointing=Endpointing.PUSH_TO_TALK))
        refused = await second.wait_for(lambda m: isinstance(m, Error))
        assert isinstance(refused, Error) and refused.code is ErrorCode.TOO_MANY_SESSIONS and refused.retryable
        await stranger.send(frames_of(speech["timer"], session_id=3)[0])
        unknown = await stranger.wait_for(lambda m: isinstance(m, Error))
        assert isinstance(unknown, Error) and unknown.code is ErrorCode.UNKNOWN_DEVICE
        # The first device is still served.
        await first.stream(frames_of(speech["what_time"], session_id=1, last=True))
        final = await first.wait_for(_final, timeout=30)
        assert isinstance(final, Transcript) and final.text == "what time is it"


async def test_phrase_list_restricts_the_vocabulary(make_bridge: object, speech: dict) -> None:
    bridge: BridgeProcess = make_bridge(  # type: ignore[operator]
        """
        [asr]
        platform = "pocketsphinx"
        decoders = 1
        phrases = ["turn on the kitchen light", "turn off the kitchen light", "what time is it"]
        """
    )
    received = await send_utterance(
        bridge.broker.url, "kitchen", speech["kitchen_light_espeak"], prefix=bridge.prefix, speed=0, push_to_talk=True
    )
    assert received[-1].message.text == "turn on the kitchen light"  # type: ignore[union-attr]


async def test_status_is_retained_and_goes_offline_on_stop(make_bridge: object, broker: Broker) -> None:
    graceful: BridgeProcess = make_bridge("")  # type: ignore[operator]
    online = await wait_for_status(broker, graceful.prefix, "online", timeout=5)
    assert online is not None and online["version"] and online["instance"]
    assert graceful.stop(signal.SIGTERM) == 0
    assert await wait_for_status(broker, graceful.prefix, "offline", timeout=5) is not None

    crashed: BridgeProcess = make_bridge("", mqtt_extra="keepalive_s = 1")  # type: ignore[operator]
    crashed.stop(signal.SIGKILL)
    will = await wait_for_status(broker, crashed.prefix, "offline", timeout=10)
    assert will is not None and will["instance"] != online["instance"]


@pytest.mark.parametrize("limit", [300])
def test_transcripts_fit_a_small_device_buffer(limit: int) -> None:
    from service.outputs.publisher import fit

    message = Transcript(
        session=1, final=True, text="ünïcode words " * 100, backend="pocketsphinx", start_ms=0, end_ms=0
    )
    payload = fit(message, limit)
    assert len(payload) <= limit
    decoded = json.loads(payload)
    assert decoded["truncated"] is True and "ünïcode words ünïcode".startswith(decoded["text"][:21])


async def test_errors_are_rate_limited_per_device_and_code(bridge: BridgeProcess) -> None:
    broker = bridge.broker
    async with RawDevice(broker.host, broker.port, bridge.prefix, "spammer") as device:
        for _ in range(30):
            await device.send(b"\xffnot a frame at all")
        await device.control(b"{broken")
        await device.wait_for(lambda m: isinstance(m, Error) and m.code is ErrorCode.BAD_CONTROL)
        await asyncio.sleep(0.3)
        malformed = [m for m in device.messages() if isinstance(m, Error) and m.code is ErrorCode.MALFORMED_FRAME]
    assert 1 <= len(malformed) <= 2  # 30 bad frames inside about a second: one error per second per code
