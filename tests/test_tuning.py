"""Per-device endpointing: [devices.<id>] in config and `configure` on the control topic."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware_protocol import (
    Configure,
    Configured,
    Endpointing,
    EndpointingOverrides,
    EndReason,
    Error,
    ErrorCode,
    Listening,
    ProtocolError,
    SpeechEnded,
    SpeechStarted,
    Start,
    Transcript,
    VadEngine,
    decode_device_message,
    encode_message,
)
from service.config import ConfigError, overrides_problem, parse_config
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


# What `configured` says always satisfies the rules `configure` enforces -------------------------

_probability = st.floats(0, 1) | st.sampled_from([0.0, 5e-324, 1e-320, 0.05, 0.15, 0.2, 0.95, 1.0])
_threshold = st.none() | _probability
_neg = st.none() | _probability


def _toml_table(name: str, values: dict[str, object]) -> str:
    lines = [f"{key} = {value!r}" for key, value in values.items() if value is not None]
    return f"[{name}]\n" + "\n".join(lines) + "\n"


@settings(max_examples=300, deadline=None)
@given(
    vad_threshold=_threshold,
    vad_neg=_neg,
    table_threshold=_threshold,
    table_neg=_neg,
    threshold=_threshold,
    neg=_neg,
    max_utterance_s=st.none() | st.floats(0.001, 60),
)
def test_effective_tuning_satisfies_the_rules_configure_enforces(
    vad_threshold: float | None,
    vad_neg: float | None,
    table_threshold: float | None,
    table_neg: float | None,
    threshold: float | None,
    neg: float | None,
    max_utterance_s: float | None,
) -> None:
    text = _toml_table("asr.vad", {"threshold": vad_threshold, "neg_threshold": vad_neg}) + _toml_table(
        "devices.d1", {"threshold": table_threshold, "neg_threshold": table_neg}
    )
    try:
        config = parse_config(text)
    except ConfigError:
        return  # refused by check-config: never runs
    tuning = DeviceTuning(config)
    fields = {"threshold": threshold, "neg_threshold": neg, "max_utterance_s": max_utterance_s}
    wire = encode_message(Configure(**{k: v for k, v in fields.items() if v is not None}))  # type: ignore[arg-type]
    try:
        overrides = tuning.reconfigure("d1", None, msgspec.convert(decode_device_message(wire), Configure))
    except (ProtocolError, TuningRejected):
        overrides = None  # refused with bad_control: the device keeps the config's tuning
    for device_overrides in (None, overrides):
        effective = tuning.effective("d1", device_overrides, None)
        assert 0 <= effective.neg_threshold < effective.threshold <= 1, effective
        echoed = EndpointingOverrides(
            threshold=effective.threshold,
            neg_threshold=effective.neg_threshold,
            max_utterance_s=effective.max_utterance_s,
            vad_engine=effective.vad_engine,
        )
        assert overrides_problem(config, echoed) is None, effective
        # A device may send what it was told back as a configure: it must be accepted as it is.
        back = Configure(**{f: getattr(echoed, f) for f in ("threshold", "neg_threshold", "max_utterance_s")})
        assert decode_device_message(encode_message(back)) == back
        tuning.reconfigure("d1", device_overrides, back)


@pytest.mark.parametrize("threshold", [5e-324, 1e-320, 0.01, 0.05, 0.1, 0.15])
def test_a_tiny_threshold_gets_a_neg_threshold_below_it(threshold: float) -> None:
    tuning = DeviceTuning(parse_config(""))
    configured = tuning.effective("d", tuning.reconfigure("d", None, Configure(threshold=threshold)), None)
    assert 0 <= configured.neg_threshold < configured.threshold == threshold


def test_threshold_zero_is_refused_by_configure_and_by_config() -> None:
    with pytest.raises(ProtocolError, match=r"^\$\.threshold: "):
        decode_device_message(b'{"type":"configure","threshold":0}')
    for text in ("[asr.vad]\nthreshold = 0.0\n", "[devices.d1]\nthreshold = 0.0\n"):
        with pytest.raises(ConfigError, match="threshold"):
            parse_config(text)
