"""Device → Mosquitto → bridge → loopback DashScope fake → results on MQTT, one socket per device."""

from __future__ import annotations

from firmware_protocol import Endpointing, EndReason, Error, ErrorCode, Listening, SpeechEnded, Transcript
from service.tools.device_sim import send_utterance
from tests.conftest import BridgeProcess
from tests.fakes.dashscope_server import FakeDashScope, Fault, Script

TOKEN = "sk-dashscope-SECRET"


def _config(fake: FakeDashScope) -> str:
    return f"""
    [asr]
    platform = "paraformer_v2"
    url = "{fake.ws_url}"
    paraformer_token = "{TOKEN}"
    lang = "en"
    timeout_s = 5
    """


async def test_backend_sentence_end_ends_the_turn_and_the_socket_is_reused(make_bridge: object, speech: dict) -> None:
    # Four words revealed over 1.4 s of audio, sentence_end 100 ms later: before our VAD's
    # 192 ms + 500 ms hangover after the speech (which ends at 1.44 s) would end the turn.
    script = Script(sentences=["What time is it?"], bytes_per_word=11000, end_after_ms=100)
    async with FakeDashScope(api_key=TOKEN, script=script) as fake:
        bridge: BridgeProcess = make_bridge(_config(fake))  # type: ignore[operator]
        for turn in range(2):
            received = await send_utterance(
                bridge.broker.url, "ds1", speech["what_time"], prefix=bridge.prefix, speed=2
            )
            ended = next(r.message for r in received if isinstance(r.message, SpeechEnded))
            assert ended.reason is EndReason.BACKEND, turn
            transcripts = [r.message for r in received if isinstance(r.message, Transcript)]
            assert any(not t.final for t in transcripts)
            final = transcripts[-1]
            assert final.final and final.text == "What time is it?" and final.backend == "paraformer_v2"
        assert len(fake.connections) == 1 and len(fake.tasks) == 2
        run = fake.tasks[0].run_task
        assert run["payload"]["model"] == "paraformer-realtime-v2"
        assert fake.tasks[0].parameters["language_hints"] == ["en"]
        assert fake.connections[0].headers["Authorization"] == f"Bearer {TOKEN}"
        assert TOKEN not in bridge.log()


async def test_task_failed_reaches_the_device(make_bridge: object, speech: dict) -> None:
    async with FakeDashScope(api_key=TOKEN) as fake:
        fake.faults.append(Fault("fail_run_task", times=-1))
        bridge: BridgeProcess = make_bridge(_config(fake))  # type: ignore[operator]
        received = await send_utterance(
            bridge.broker.url, "ds2", speech["what_time"], prefix=bridge.prefix, speed=0, push_to_talk=True
        )
        error = received[-1].message
        assert isinstance(error, Error) and error.code is ErrorCode.BACKEND_ERROR
        assert TOKEN not in error.message


async def test_backend_endpointing_waits_for_the_recogniser(make_bridge: object, speech: dict) -> None:
    # sentence_end 1.5 s after the last word: our VAD would have ended the turn long before.
    script = Script(sentences=["What time is it?"], bytes_per_word=11000, end_after_ms=1500)
    async with FakeDashScope(api_key=TOKEN, script=script) as fake:
        bridge: BridgeProcess = make_bridge(_config(fake) + '\n[session]\nendpointing = "backend"\n')  # type: ignore[operator]
        received = await send_utterance(bridge.broker.url, "ds3", speech["what_time"], prefix=bridge.prefix, speed=2)
        messages = [r.message for r in received]
        assert isinstance(messages[0], Listening) and messages[0].endpointing is Endpointing.BACKEND
        ended = next(m for m in messages if isinstance(m, SpeechEnded))
        assert ended.reason is EndReason.BACKEND
        final = messages[-1]
        assert isinstance(final, Transcript) and final.text == "What time is it?"
