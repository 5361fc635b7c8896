"""Device → Mosquitto → bridge → loopback ElevenLabs fake (realtime and batch) → results on MQTT."""

from __future__ import annotations

from firmware_protocol import EndReason, SpeechEnded, Transcript
from service.tools.device_sim import send_utterance
from tests.conftest import BridgeProcess
from tests.fakes.elevenlabs_server import FakeElevenLabs, Script

KEY = "xi-test-key-SECRET"


def _config(fake: FakeElevenLabs, extra: str = "") -> str:
    return f"""
    [asr]
    platform = "elevenlabs"
    url = "{fake.realtime_url}"
    api_key = "{KEY}"
    lang = "en"
    timeout_s = 5
    {extra}
    """


async def test_realtime_partials_and_committed_final(make_bridge: object, speech: dict) -> None:
    async with FakeElevenLabs(api_key=KEY, script=Script(text="what time is it", words_per_s=8)) as fake:
        bridge: BridgeProcess = make_bridge(_config(fake))  # type: ignore[operator]
        received = await send_utterance(
            bridge.broker.url, "el1", speech["what_time"], prefix=bridge.prefix, speed=2, push_to_talk=True
        )
        transcripts = [r.message for r in received if isinstance(r.message, Transcript)]
        assert any(not t.final for t in transcripts), "partial_transcript messages become partials"
        final = transcripts[-1]
        assert final.final and final.text == "what time is it" and final.backend == "elevenlabs"
        (session,) = fake.sessions
        assert session.params["model_id"] == "scribe_v2_realtime"
        assert session.params["audio_format"] == "pcm_16000" and session.params["language_code"] == "en"
        assert KEY not in bridge.log()


async def test_backend_vad_commit_ends_the_turn(make_bridge: object, speech: dict) -> None:
    script = Script(text="what is the weather today", vad_silence_s=0.3)
    async with FakeElevenLabs(api_key=KEY, script=script) as fake:
        bridge: BridgeProcess = make_bridge(  # type: ignore[operator]
            _config(fake, 'commit_strategy = "vad"')
            + """
            [asr.vad]
            hangover_ms = 3000
            """
        )
        received = await send_utterance(bridge.broker.url, "el2", speech["weather"], prefix=bridge.prefix, speed=2)
        ended = next(r.message for r in received if isinstance(r.message, SpeechEnded))
        assert ended.reason is EndReason.BACKEND  # ElevenLabs committed before our 3 s hangover ran out
        final = received[-1].message
        assert isinstance(final, Transcript) and final.text == "what is the weather today"


async def test_batch_mode(make_bridge: object, speech: dict) -> None:
    async with FakeElevenLabs(api_key=KEY, script=Script(text="what time is it")) as fake:
        bridge: BridgeProcess = make_bridge(_config(fake, 'mode = "batch"'))  # type: ignore[operator]
        received = await send_utterance(
            bridge.broker.url, "el3", speech["what_time"], prefix=bridge.prefix, speed=0, push_to_talk=True
        )
        final = received[-1].message
        assert isinstance(final, Transcript) and final.text == "what time is it"
        (request,) = fake.batch_requests
        assert request.fields["model_id"] == "scribe_v1"
