"""Device → Mosquitto → bridge → loopback OpenAI fake → results on MQTT, faults included."""

from __future__ import annotations

import asyncio

import pytest

from firmware_protocol import EndReason, Error, ErrorCode, Transcript
from service.tools.device_sim import send_utterance
from tests.conftest import BridgeProcess
from tests.fakes.openai_server import FakeOpenAI, Fault, Hang
from tests.fakes.openai_server import Transcript as Say

SECRET = "sk-test-0123456789abcdef-SECRET"


def _openai_config(fake: FakeOpenAI, extra: str = "") -> str:
    return f"""
    [asr]
    platform = "whisper"
    url = "{fake.url}"
    api_key = "{SECRET}"
    model = "whisper-1"
    lang = "en"
    prompt = "Hello\\n(noise)\\n"
    timeout_s = 2
    max_retries = 1
    {extra}
    """


async def test_openai_batch_turn(make_bridge: object, speech: dict) -> None:
    async with FakeOpenAI(api_key=SECRET, default=Say("[00:00:00.000 --> 00:00:01.000] What time is it?")) as fake:
        bridge: BridgeProcess = make_bridge(_openai_config(fake))  # type: ignore[operator]
        received = await send_utterance(bridge.broker.url, "oa1", speech["what_time"], prefix=bridge.prefix, speed=3)
        final = received[-1].message
        assert isinstance(final, Transcript) and final.final
        assert final.text == "What time is it?" and final.backend == "openai"
        request = fake.requests[-1]
        assert request.field("model") == "whisper-1" and request.field("language") == "en"
        assert request.field("prompt") == "Hello\n(noise)\n"
        assert request.headers["Authorization"] == f"Bearer {SECRET}"
        wav = request.wav
        assert wav is not None and (wav.sample_rate, wav.channels, wav.bits_per_sample) == (16000, 1, 16)
        # Speculative recognition: started at the pause, committed after the hangover: one request.
        assert len(fake.requests) == 1
        assert SECRET not in bridge.log()


async def test_openai_streaming_partials_then_final(make_bridge: object, speech: dict) -> None:
    say = Say("what time is it", deltas=["what ", "time ", "is ", "it"], delta_interval_s=0.05)
    async with FakeOpenAI(api_key=SECRET, default=say) as fake:
        bridge: BridgeProcess = make_bridge(  # type: ignore[operator]
            _openai_config(fake, 'stream = true\nmodel = "gpt-4o-mini-transcribe"').replace('model = "whisper-1"\n', "")
        )
        received = await send_utterance(
            bridge.broker.url, "oa2", speech["what_time"], prefix=bridge.prefix, speed=0, push_to_talk=True
        )
        transcripts = [r.message for r in received if isinstance(r.message, Transcript)]
        partial_texts = [t.text for t in transcripts if not t.final]
        assert partial_texts[:4] == ["what", "what time", "what time is", "what time is it"]
        assert transcripts[-1].final and transcripts[-1].text == "what time is it"
        assert fake.requests[-1].field("stream") == "true"


async def test_noise_answer_is_an_empty_final(make_bridge: object, speech: dict) -> None:
    async with FakeOpenAI(api_key=SECRET, default=Say("(noise)")) as fake:
        bridge: BridgeProcess = make_bridge(_openai_config(fake))  # type: ignore[operator]
        received = await send_utterance(
            bridge.broker.url, "oa3", speech["weather"], prefix=bridge.prefix, speed=0, push_to_talk=True
        )
        final = received[-1].message
        assert isinstance(final, Transcript) and final.text == "" and final.reason is EndReason.NO_SPEECH


@pytest.mark.parametrize(
    ("fault", "code"),
    [
        (Fault.unauthorized(), ErrorCode.BACKEND_AUTH),
        (Fault.too_large(), ErrorCode.BACKEND_REJECTED),
        (Fault.rate_limited(retry_after="0"), ErrorCode.BACKEND_RATE_LIMITED),
        (Fault.server_error(503), ErrorCode.BACKEND_UNAVAILABLE),
        (Hang(), ErrorCode.BACKEND_TIMEOUT),
    ],
    ids=["401", "413", "429", "503", "hang"],
)
async def test_backend_faults_reach_the_device_as_errors_within_a_deadline(
    make_bridge: object, speech: dict, fault: object, code: ErrorCode
) -> None:
    async with FakeOpenAI(api_key=SECRET, default=fault) as fake:  # type: ignore[arg-type]
        bridge: BridgeProcess = make_bridge(_openai_config(fake))  # type: ignore[operator]
        async with asyncio.timeout(30):
            received = await send_utterance(
                bridge.broker.url, "oa4", speech["what_time"], prefix=bridge.prefix, speed=0, push_to_talk=True
            )
        error = received[-1].message
        assert isinstance(error, Error) and error.code is code and error.session is not None
        assert SECRET not in error.message and SECRET not in bridge.log()
        retried = code not in (ErrorCode.BACKEND_AUTH, ErrorCode.BACKEND_REJECTED)
        assert len(fake.requests) == (2 if retried else 1)
        assert bridge.process is not None and bridge.process.poll() is None


async def test_failover_to_the_offline_engine_names_who_served(make_bridge: object, speech: dict) -> None:
    async with FakeOpenAI(api_key=SECRET, default=Fault.server_error(500)) as fake:
        bridge: BridgeProcess = make_bridge(  # type: ignore[operator]
            _openai_config(fake)
            + """
            [[asr.fallback]]
            platform = "pocketsphinx"
            decoders = 1
            """
        )
        received = await send_utterance(
            bridge.broker.url, "oa5", speech["what_time"], prefix=bridge.prefix, speed=0, push_to_talk=True
        )
        final = received[-1].message
        assert isinstance(final, Transcript) and final.text == "what time is it"
        assert final.backend == "pocketsphinx"
        assert '"asr.failover"' in bridge.log()
