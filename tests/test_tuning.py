"""Per-device endpointing: [devices.<id>] in config and `configure` on the control topic."""

from __future__ import annotations

import asyncio

import pytest

from firmware_protocol import (
    Configure,
    Configured,
    Endpointing,
    EndReason,
    Error,
    ErrorCode,
    Listening,
    SpeechEnded,
    SpeechStarted,
    Start,
    Transcript,
    VadEngine,
)
from service.config import parse_config
from service.endpointing.tuning import DeviceTuning, TuningRejected
from service.tools.device_sim import frames_of
from tests.conftest import BridgeProcess
from tests.device import RawDevice


async def test_config_and_runtime_overrides_reach_the_next_session(make_bridge: object, speech: dict) -> None:
    bridge: BridgeProcess = make_bridge(  # type: ignore[operator]
        """
        [devices.button]
        endpointing = "push_to_talk"
        [devices.quick]
        hangover_ms = 250
        """
    )
    broker = bridge.broker
    async with RawDevice(broker.host, broker.port, bridge.prefix, "button") as button:
        await button.send(frames_of(speech["what_time"], session_id=5)[0])
        listening = await button.wait_for(lambda m: isinstance(m, Listening))
        assert isinstance(listening, Listening) and listening.endpointing is Endpointing.PUSH_TO_TALK

    async with RawDevice(broker.host, broker.port, bridge.prefix, "quick") as quick:
        await quick.control(Configure(no_speech_timeout_ms=600, threshold=0.6))
        configured = await quick.wait_for(lambda m: isinstance(m, Configured))
        assert isinstance(configured, Configured)
        assert (configured.hangover_ms, configured.no_speech_timeout_ms) == (250, 600)  # config + runtime
        assert configured.threshold == 0.6 and abs(configured.neg_threshold - 0.45) < 1e-9
        assert configured.endpointing is Endpointing.SERVER_VAD
        # Noise only: with a 600 ms no-speech timeout the turn ends long before the default 3 s.
        await quick.stream(frames_of(speech["noise"], session_id=9), frame_s=0.002)
        ended = await quick.wait_for(lambda m: isinstance(m, SpeechEnded))
        assert isinstance(ended, SpeechEnded) and ended.reason is EndReason.NO_SPEECH and ended.offset_ms < 1000
        final = await quick.wait_for(lambda m: isinstance(m, Transcript) and m.final)
        assert isinstance(final, Transcript) and final.reason is EndReason.NO_SPEECH

        # reset drops the runtime values; the [devices.quick] table stays.
        await quick.control(Configure(reset=True, endpointing=Endpointing.PUSH_TO_TALK))
        again = await quick.wait_for(lambda m: isinstance(m, Configured) and m is not configured)
        assert isinstance(again, Configured) and again.no_speech_timeout_ms == 3000 and again.hangover_ms == 250
        await quick.control(Start(session=10))
        listening = await quick.wait_for(lambda m: isinstance(m, Listening) and m.session == 10)
        assert isinstance(listening, Listening) and listening.endpointing is Endpointing.PUSH_TO_TALK


async def test_invalid_tuning_is_refused_with_the_field_named(bridge: BridgeProcess) -> None:
    broker = bridge.broker
    async with RawDevice(broker.host, broker.port, bridge.prefix, "tuner") as device:
        await device.control(Configure(threshold=0.3, neg_threshold=0.4))
        error = await device.wait_for(lambda m: isinstance(m, Error))
        assert isinstance(error, Error) and error.code is ErrorCode.BAD_CONTROL and "$.neg_threshold" in error.message
        await asyncio.sleep(1.1)  # errors are limited to one per second per device and code
        await device.control(b'{"type":"configure","hangover_ms":-5}')
        error = await device.wait_for(lambda m: isinstance(m, Error) and "hangover_ms" in m.message)
        assert isinstance(error, Error)
        await asyncio.sleep(1.1)
        await device.control(Configure(max_utterance_s=600))  # over the bridge's 8 s cap
        error = await device.wait_for(lambda m: isinstance(m, Error) and "max_utterance_s" in m.message)
        assert isinstance(error, Error)
        await asyncio.sleep(1.1)
        await device.control(b'{"type":"configure","vad_engine":"webrtc","webrtc_mode":7}')
        error = await device.wait_for(lambda m: isinstance(m, Error) and "webrtc_mode" in m.message)
        assert isinstance(error, Error) and error.message.startswith("$.webrtc_mode: ") and "<= 3" in error.message
        assert not any(isinstance(m, Configured) for m in device.messages())


async def test_webrtc_mode_per_device_reaches_the_scorer(make_bridge: object, speech: dict) -> None:
    """The noise fixture is speech to WebRTC's VAD at aggressiveness 0 and silence at 3 (the default)."""
    bridge: BridgeProcess = make_bridge(  # type: ignore[operator]
        """
        [devices.lenient]
        vad_engine = "webrtc"
        webrtc_mode = 0
        """
    )
    broker = bridge.broker

    async def noise_heard_as_speech(device: RawDevice, session: int) -> bool:
        await device.stream(frames_of(speech["noise"], session_id=session, last=True), frame_s=0.002)
        await device.wait_for(lambda m: isinstance(m, Transcript) and m.final and m.session == session)
        return any(isinstance(m, SpeechStarted) for m in device.messages(session))

    async with RawDevice(broker.host, broker.port, bridge.prefix, "lenient") as lenient:
        assert await noise_heard_as_speech(lenient, 1)  # [devices.lenient]

    async with RawDevice(broker.host, broker.port, bridge.prefix, "tuner") as tuner:
        await tuner.control(Configure(vad_engine=VadEngine.WEBRTC))
        configured = await tuner.wait_for(lambda m: isinstance(m, Configured))
        assert isinstance(configured, Configured) and configured.webrtc_mode == 3  # asr.vad.webrtc_mode
        assert not await noise_heard_as_speech(tuner, 2)

        await tuner.control(Configure(webrtc_mode=0))
        again = await tuner.wait_for(lambda m: isinstance(m, Configured) and m is not configured)
        assert isinstance(again, Configured) and (again.vad_engine, again.webrtc_mode) == (VadEngine.WEBRTC, 0)
        assert await noise_heard_as_speech(tuner, 3)


def test_tuning_layers_win_in_order_config_devices_table_configure_start() -> None:
    config = parse_config("[asr.vad]\nhangover_ms = 300\n[devices.d1]\nhangover_ms = 250\nthreshold = 0.6\n")
    tuning = DeviceTuning(config)
    assert tuning.effective("other", None, None).hangover_ms == 300
    assert tuning.effective("d1", None, None).hangover_ms == 250
    overrides = tuning.reconfigure("d1", None, Configure(hangover_ms=200))
    overrides = tuning.reconfigure("d1", overrides, Configure(max_silence_duration_ms=400))
    session = tuning.effective("d1", overrides, Start(session=1, endpointing=Endpointing.PUSH_TO_TALK))
    assert (session.hangover_ms, session.max_silence_duration_ms, session.threshold) == (200, 400, 0.6)
    assert session.endpointing is Endpointing.PUSH_TO_TALK
    reset = tuning.reconfigure("d1", overrides, Configure(reset=True))
    assert tuning.effective("d1", reset, None).hangover_ms == 250
    # Validated with the devices table under it: its threshold makes this neg_threshold too high.
    with pytest.raises(TuningRejected, match=r"^\$\.neg_threshold: must be below threshold \(0\.6\)$"):
        tuning.reconfigure("d1", reset, Configure(neg_threshold=0.7))
