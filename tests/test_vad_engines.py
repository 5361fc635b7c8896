"""VAD engines (silero, webrtc, webrtc+silero, remote) and EchoKit's legacy vad_url check."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np
import pytest
import structlog

from firmware_protocol import (
    Configure,
    Configured,
    Endpointing,
    EndpointingOverrides,
    EndReason,
    Error,
    SpeechEnded,
    SpeechStarted,
    Topics,
    Transcript,
    VadEngine,
    decode_bridge_message,
)
from service.config import Config, ConfigError, parse_config
from service.endpointing.engines import GatedScorer, RemoteScorer, SileroScorer, VadCounts, VadEngines, WebrtcScorer
from service.endpointing.silero import SileroModel, VadBatcher
from service.endpointing.tuning import effective_tuning
from service.outputs.publisher import DevicePublisher
from service.recognition import SessionOptions
from service.session.services import SessionServices
from service.session.turn import Session
from service.tools.device_sim import frames_of
from tests.conftest import BridgeProcess
from tests.device import RawDevice
from tests.fakes.silero_vad_server import FakeSileroVadServer
from tests.test_session import CountingBatchBackend

SILENCE_1S = np.zeros(16000, dtype=np.int16)


def windows(audio: np.ndarray) -> list[np.ndarray]:
    return [audio[i : i + 512] for i in range(0, len(audio) // 512 * 512, 512)]


def voiced_mask(audio: np.ndarray) -> np.ndarray:
    return np.array([np.sqrt(np.mean(w.astype(np.float64) ** 2)) > 1000 for w in windows(audio)])


@pytest.fixture
async def batcher() -> AsyncIterator[VadBatcher]:
    vad = VadBatcher(SileroModel())
    runner = asyncio.create_task(vad.run())
    yield vad
    runner.cancel()


@pytest.fixture
async def fake() -> AsyncIterator[FakeSileroVadServer]:
    async with FakeSileroVadServer() as server:
        yield server


# Engines on real audio ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0, 3])
async def test_webrtc_scores_speech_high_and_noise_low(speech: dict, mode: int) -> None:
    scorer = WebrtcScorer(mode)
    audio = speech["what_time"]
    probs = np.array([await scorer.score(w) for w in windows(audio)])
    assert probs[voiced_mask(audio)].mean() > 0.8
    noise = WebrtcScorer(3)
    assert np.mean([await noise.score(w) for w in windows(speech["noise"])]) < 0.1


def test_webrtc_carries_the_samples_past_the_last_10ms_frame() -> None:
    scorer = WebrtcScorer(3)
    for _ in range(5):  # 5 x 512 = 2560 samples = 16 whole 10 ms frames: nothing may be dropped
        scorer.score_now(np.zeros(512, dtype=np.int16))
    assert len(scorer._carry) == 0


async def test_webrtc_gate_skips_silero_on_noise_and_keeps_speech_high(speech: dict, batcher: VadBatcher) -> None:
    gated = GatedScorer(WebrtcScorer(3), SileroScorer(batcher), counts := VadCounts())
    audio = speech["what_time"]
    probs = np.array([await gated.score(w) for w in windows(audio)])
    assert probs[voiced_mask(audio)].mean() > 0.8
    assert counts.gate_skipped > 0 and batcher.windows < len(probs)

    noise = GatedScorer(WebrtcScorer(3), SileroScorer(batcher), VadCounts())
    before = batcher.windows
    noise_probs = [await noise.score(w) for w in windows(speech["noise"])]
    assert max(noise_probs) < 0.5 and batcher.windows - before < len(noise_probs) // 4


async def test_engines_are_built_from_the_tuning(batcher: VadBatcher) -> None:
    engines = VadEngines(batcher, webrtc_mode=1, realtime_url="ws://127.0.0.1:9/v1/audio/realtime_vad")
    assert isinstance(engines.scorer(VadEngine.SILERO), SileroScorer)
    webrtc = engines.scorer(VadEngine.WEBRTC)
    assert isinstance(webrtc, WebrtcScorer) and webrtc.mode == 1  # no session tuning: the config's mode
    gated = engines.scorer(VadEngine.WEBRTC_SILERO, webrtc_mode=0)
    assert isinstance(gated, GatedScorer) and gated.gate.mode == 0
    assert isinstance(engines.scorer(VadEngine.REMOTE), RemoteScorer)
    # Without a realtime URL "remote" cannot be configured (config validation); the factory still never fails.
    assert isinstance(VadEngines(batcher).scorer(VadEngine.REMOTE), SileroScorer)


# Remote engine against the fake silero_vad_server ----------------------------------------------


async def _score_paced(scorer: RemoteScorer, audio: np.ndarray) -> list[float]:
    probs = []
    for window in windows(audio):
        probs.append(await scorer.score(window))
        await asyncio.sleep(0.003)  # let the server's events come back, as they would in real time
    return probs


async def test_remote_events_become_probabilities(speech: dict, batcher: VadBatcher, fake: FakeSileroVadServer) -> None:
    scorer = RemoteScorer(fake.realtime_url, SileroScorer(batcher), connect_timeout_s=2, counts=VadCounts())
    audio = np.concatenate([SILENCE_1S[:4096], speech["what_time"], SILENCE_1S])
    probs = await _score_paced(scorer, audio)
    await scorer.aclose()
    assert scorer.failed is None
    assert set(fake.received_frames) == {1024} and fake.connections == 1
    assert fake.events_sent[0] == "speech_start" and fake.events_sent[-1] == "speech_end"
    assert set(probs) == {0.0, 1.0}
    assert probs[0] == 0.0 and probs[-1] == 0.0 and sum(probs) > 20


async def test_remote_error_falls_back_to_silero(speech: dict, batcher: VadBatcher, fake: FakeSileroVadServer) -> None:
    fake.error_after_bytes = 1024 * 10
    counts = VadCounts()
    fallback = SileroScorer(batcher, counts)
    scorer = RemoteScorer(fake.realtime_url, fallback, connect_timeout_s=2, counts=counts)
    audio = np.concatenate([speech["what_time"], SILENCE_1S])
    probs = np.array(await _score_paced(scorer, audio))
    await scorer.aclose()
    assert scorer.failed is not None and "VAD processing error" in scorer.failed
    assert counts.silero > 0
    assert probs[voiced_mask(audio)].mean() > 0.8  # Silero carries on


async def test_remote_refused_or_dead_falls_back_to_silero(speech: dict, batcher: VadBatcher) -> None:
    async with FakeSileroVadServer() as refusing:
        refusing.refuse = True
        scorer = RemoteScorer(refusing.realtime_url, SileroScorer(batcher), connect_timeout_s=2, counts=VadCounts())
        assert await scorer.score(speech["what_time"][:512]) < 0.5
        assert scorer.failed is not None
        await scorer.aclose()
    dead = FakeSileroVadServer()
    async with dead:
        url = dead.realtime_url
    scorer = RemoteScorer(url, SileroScorer(batcher), connect_timeout_s=2, counts=VadCounts())
    await scorer.score(speech["what_time"][:512])
    assert scorer.failed is not None
    await scorer.aclose()


# Sessions with engines ---------------------------------------------------------------------------


def _tuning(endpointing: Endpointing, engine: VadEngine) -> Configured:
    return effective_tuning(Config(), EndpointingOverrides(endpointing=endpointing, vad_engine=engine))


async def _session(
    engines: VadEngines,
    backend: CountingBatchBackend,
    audio: np.ndarray,
    *,
    endpointing: Endpointing = Endpointing.SERVER_VAD,
    engine: VadEngine = VadEngine.SILERO,
    tuning: Configured | None = None,
    pace_s: float = 0.0,
) -> list[object]:
    published: list[object] = []

    def publish(topic: str, payload: bytes, **_: object) -> None:
        published.append(decode_bridge_message(payload))

    services = SessionServices(
        backend=backend,
        engines=engines,
        publisher=DevicePublisher(Topics(), publish, 1024),
    )
    tuning = tuning or _tuning(endpointing, engine)
    session = Session("dev", 1, services, tuning=tuning, options=SessionOptions())
    runner = asyncio.create_task(session.run())
    for i in range(0, len(audio), 320):
        session.push(audio[i : i + 320].tobytes())
        if pace_s:
            await asyncio.sleep(pace_s)
    session.end(EndReason.DEVICE)
    await asyncio.wait_for(runner, 30)
    return published


@pytest.mark.parametrize("engine", [VadEngine.WEBRTC, VadEngine.WEBRTC_SILERO])
async def test_local_engines_end_the_turn_on_silence(speech: dict, batcher: VadBatcher, engine: VadEngine) -> None:
    backend = CountingBatchBackend()
    audio = np.concatenate([speech["what_time"], SILENCE_1S])
    messages = await _session(VadEngines(batcher), backend, audio, engine=engine)
    ended = next(m for m in messages if isinstance(m, SpeechEnded))
    assert ended.reason is EndReason.SILENCE
    final = messages[-1]
    assert isinstance(final, Transcript) and final.final and final.text.startswith("heard")


async def test_a_sessions_webrtc_mode_comes_from_its_devices_tuning(speech: dict, batcher: VadBatcher) -> None:
    """WebRTC hears the noise fixture as speech at aggressiveness 0, as silence at 3."""
    config = parse_config('[asr.vad]\nengine = "webrtc"\n[devices.lenient]\nwebrtc_mode = 0\n')
    engines = VadEngines.from_config(batcher, config.asr)
    lenient = effective_tuning(config, config.devices.tuning["lenient"])
    strict = effective_tuning(config)
    assert (lenient.vad_engine, lenient.webrtc_mode, strict.webrtc_mode) == (VadEngine.WEBRTC, 0, 3)
    backend = CountingBatchBackend()
    heard = await _session(engines, backend, speech["noise"], tuning=lenient)
    assert any(isinstance(m, SpeechStarted) for m in heard)
    quiet = await _session(engines, backend, speech["noise"], tuning=strict)
    assert not any(isinstance(m, SpeechStarted) for m in quiet)
    final = quiet[-1]
    assert isinstance(final, Transcript) and final.reason is EndReason.NO_SPEECH
    assert engines.counts.webrtc == 2 * len(windows(speech["noise"])) and batcher.windows == 0


async def test_the_gate_counts_what_it_spared_silero(speech: dict, batcher: VadBatcher) -> None:
    engines = VadEngines(batcher)
    audio = np.concatenate([SILENCE_1S, speech["what_time"], SILENCE_1S])
    await _session(engines, CountingBatchBackend(), audio, engine=VadEngine.WEBRTC_SILERO)
    counts = engines.counts
    assert 0 < counts.gate_skipped < counts.webrtc_silero <= len(windows(audio))
    assert (counts.silero, counts.webrtc, counts.remote) == (0, 0, 0)
    assert batcher.windows == counts.webrtc_silero - counts.gate_skipped  # every other window went to Silero
    assert 1 <= batcher.runs <= batcher.windows


@pytest.mark.parametrize("fault", [None, "error"])
async def test_remote_engine_ends_the_turn_even_when_the_server_fails(
    speech: dict, batcher: VadBatcher, fake: FakeSileroVadServer, fault: str | None
) -> None:
    if fault == "error":
        fake.error_after_bytes = 1024 * 5
    backend = CountingBatchBackend()
    engines = VadEngines(batcher, realtime_url=fake.realtime_url)
    audio = np.concatenate([speech["what_time"], SILENCE_1S, SILENCE_1S])
    messages = await _session(engines, backend, audio, engine=VadEngine.REMOTE, pace_s=0.004)
    ended = next(m for m in messages if isinstance(m, SpeechEnded))
    assert ended.reason is EndReason.SILENCE, messages
    final = messages[-1]
    assert isinstance(final, Transcript) and final.final and final.text.startswith("heard") and backend.heard
    assert fake.connections == 1 and fake.received_frames
    counts = engines.counts
    if fault is None:
        assert fake.events_sent[0] == "speech_start" and fake.events_sent[-1] == "speech_end"
        assert counts.remote > 0 and (counts.silero, counts.remote_fallbacks) == (0, 0)
    else:  # the windows after the failure are Silero's
        assert counts.remote > 0 and counts.silero > 0 and counts.remote_fallbacks == 1
        assert batcher.windows == counts.silero


async def test_vad_url_skips_the_recogniser_when_nobody_spoke(
    speech: dict, batcher: VadBatcher, fake: FakeSileroVadServer
) -> None:
    engines = VadEngines(batcher, batch_url=fake.batch_url)
    backend = CountingBatchBackend()
    messages = await _session(engines, backend, speech["noise"], endpointing=Endpointing.PUSH_TO_TALK)
    final = messages[-1]
    assert isinstance(final, Transcript) and final.final and final.text == "" and final.reason is EndReason.NO_SPEECH
    assert backend.heard == [] and fake.batch_requests == 1

    messages = await _session(engines, backend, speech["what_time"], endpointing=Endpointing.PUSH_TO_TALK)
    final = messages[-1]
    assert isinstance(final, Transcript) and final.text == f"heard {len(speech['what_time'])}"
    assert fake.batch_requests == 2
    await engines.aclose()


@pytest.mark.parametrize("fault", ["dead", "error"])
async def test_vad_url_failure_counts_as_speech(speech: dict, batcher: VadBatcher, fault: str) -> None:
    server = FakeSileroVadServer()
    async with server:
        server.batch_error = True
        url = server.batch_url
        engines = VadEngines(batcher, batch_url=url, connect_timeout_s=1, timeout_s=2)
        if fault == "dead":
            await server.stop()
        backend = CountingBatchBackend()
        messages = await _session(engines, backend, speech["noise"], endpointing=Endpointing.PUSH_TO_TALK)
        await engines.aclose()
    final = messages[-1]
    assert isinstance(final, Transcript) and final.text == f"heard {len(speech['noise'])}"


async def test_fake_batch_api_answers_like_the_server(speech: dict, fake: FakeSileroVadServer) -> None:
    import httpx

    from service.wav import wav_bytes

    async with httpx.AsyncClient() as client:
        missing = await client.post(fake.batch_url, files={"other": ("a.wav", b"x")})
        assert missing.status_code == 200 and missing.json() == {"error": "No audio provided"}
        spans = await client.post(fake.batch_url, files={"audio": ("a.wav", wav_bytes(speech["what_time"]))})
        assert spans.status_code == 200 and spans.json()["timestamps"]
        quiet = await client.post(fake.batch_url, files={"audio": ("a.wav", wav_bytes(speech["noise"]))})
        assert quiet.json() == {"timestamps": []}


# Configuration -------------------------------------------------------------------------------------


def _problems(text: str) -> dict[str, str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    return {p.field: p.message for p in caught.value.problems}


def test_engine_config_is_validated_with_the_field_named() -> None:
    config = parse_config('[asr.vad]\nengine = "webrtc+silero"\nwebrtc_mode = 1\n')
    assert config.asr.vad.engine is VadEngine.WEBRTC_SILERO and config.asr.vad.webrtc_mode == 1
    assert parse_config("").asr.vad.engine is VadEngine.SILERO
    problems = _problems('[asr.vad]\nengine = "rnnoise"\nwebrtc_mode = 4\n')
    assert set(problems) == {"asr.vad.engine", "asr.vad.webrtc_mode"}
    assert "vad_realtime_url" in _problems('[asr.vad]\nengine = "remote"\n')["asr.vad.engine"]
    assert "vad_realtime_url" in _problems('[devices.far]\nvad_engine = "remote"\n')["devices.far.vad_engine"]
    assert "devices.far.vad_engine" in _problems('[devices.far]\nvad_engine = "loud"\n')
    assert "asr.vad_realtime_url" in _problems('[asr]\nvad_realtime_url = "http://x/v1/audio/realtime_vad"\n')
    ok = parse_config(
        '[asr]\nvad_realtime_url = "ws://127.0.0.1:9093/v1/audio/realtime_vad"\n'
        '[asr.vad]\nengine = "remote"\n[devices.near]\nvad_engine = "webrtc"\n'
    )
    assert ok.asr.vad.engine is VadEngine.REMOTE


# Through MQTT ----------------------------------------------------------------------------------------


async def test_remote_engine_per_device_end_to_end(
    make_bridge: object, speech: dict, fake: FakeSileroVadServer
) -> None:
    bridge: BridgeProcess = make_bridge(  # type: ignore[operator]
        f"""
        [asr]
        platform = "pocketsphinx"
        vad_realtime_url = "{fake.realtime_url}"
        [session]
        max_frame_bytes = 4096
        [devices.far]
        vad_engine = "remote"
        """
    )
    broker = bridge.broker
    async with RawDevice(broker.host, broker.port, bridge.prefix, "near") as near:
        await near.control(Configure(vad_engine=VadEngine.WEBRTC))
        configured = await near.wait_for(lambda m: isinstance(m, Configured))
        assert isinstance(configured, Configured) and configured.vad_engine is VadEngine.WEBRTC
        await near.control(b'{"type":"configure","vad_engine":"loud"}')
        error = await near.wait_for(lambda m: isinstance(m, Error))
        assert isinstance(error, Error) and "$.vad_engine" in error.message

    async with RawDevice(broker.host, broker.port, bridge.prefix, "far") as far:
        await far.control(Configure(hangover_ms=300))
        configured = await far.wait_for(lambda m: isinstance(m, Configured))
        assert isinstance(configured, Configured) and configured.vad_engine is VadEngine.REMOTE  # [devices.far]
        audio = np.concatenate([speech["what_time"], SILENCE_1S, SILENCE_1S])
        await far.stream(frames_of(audio, session_id=3), frame_s=0.01)
        ended = await far.wait_for(lambda m: isinstance(m, SpeechEnded))
        assert isinstance(ended, SpeechEnded) and ended.reason is EndReason.SILENCE, bridge.log()
        final = await far.wait_for(lambda m: isinstance(m, Transcript) and m.final)
        assert isinstance(final, Transcript) and final.text
    assert fake.connections == 1 and set(fake.received_frames) == {1024}
    assert fake.events_sent[:1] == ["speech_start"] and "speech_end" in fake.events_sent
    assert "vad.remote_failed" not in bridge.log()


async def test_remote_engine_needs_the_realtime_url(bridge: BridgeProcess) -> None:
    broker = bridge.broker
    async with RawDevice(broker.host, broker.port, bridge.prefix, "remote-wish") as device:
        await device.control(Configure(vad_engine=VadEngine.REMOTE))
        error = await device.wait_for(lambda m: isinstance(m, Error))
        assert isinstance(error, Error) and "$.vad_engine" in error.message and "vad_realtime_url" in error.message


async def test_remote_failure_logs_the_url_without_its_secrets(batcher: VadBatcher) -> None:
    async with FakeSileroVadServer() as refusing:
        refusing.refuse = True
        url = refusing.realtime_url.replace("ws://", "ws://vad:hunter2@") + "?token=s3cret"
        scorer = RemoteScorer(url, SileroScorer(batcher), connect_timeout_s=2, counts=VadCounts())
        with structlog.testing.capture_logs() as logs:
            await scorer.score(np.zeros(512, dtype=np.int16))
        await scorer.aclose()
    (line,) = [entry for entry in logs if entry["event"] == "vad.remote_failed"]
    assert "hunter2" not in line["url"] and "s3cret" not in line["url"] and "token=***" in line["url"]
