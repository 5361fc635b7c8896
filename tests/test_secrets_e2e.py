"""No secret in any device message or log line: a bridge with a secret in every URL and key, against failing fakes.

Every credential the configuration can hold is set (MQTT password, API keys, userinfo and query
tokens of ``asr.url``, ``asr.vad_url``, ``asr.vad_realtime_url`` and a fallback's URL); the fake
answers 503 with the key and a request id in its body. Everything the bridge published and its
whole log are then searched for the secrets, and device messages for the backend's address too.
"""

from __future__ import annotations

import asyncio
import random
import signal

import aiomqtt

from firmware_protocol import Error
from service.tools.device_sim import send_utterance
from tests.conftest import BridgeProcess
from tests.fakes.openai_server import FakeOpenAI, Fault

API_KEY = "sk-e2e-KEY-0123456789"
SECRETS = (
    API_KEY,
    "mqtt-PASS-4821",
    "asr-PASS-7310",
    "asr-TOKEN-5529",
    "vad-PASS-1187",
    "vad-TOKEN-9064",
    "rt-TOKEN-3375",
    "fallback-TOKEN-6642",
)
REQUEST_ID = "req-e2e-77f1c0"


def _config(fake: FakeOpenAI) -> str:
    host = f"127.0.0.1:{fake.port}"
    return f"""
    [asr]
    platform = "openai"
    url = "http://asr-user:asr-PASS-7310@{host}/v1/audio/transcriptions?token=asr-TOKEN-5529"
    api_key = "{API_KEY}"
    model = "whisper-1"
    timeout_s = 2
    max_retries = 0
    vad_url = "http://vad-user:vad-PASS-1187@{host}/v1/audio/vad?token=vad-TOKEN-9064"
    vad_realtime_url = "ws://127.0.0.1:1/v1/audio/realtime_vad?token=rt-TOKEN-3375"
    [[asr.fallback]]
    platform = "openai"
    url = "{fake.url}?key=fallback-TOKEN-6642"
    api_key = "{API_KEY}"
    model = "whisper-1"
    timeout_s = 2
    max_retries = 0
    """


async def test_no_secret_or_backend_address_reaches_a_device_or_the_log(make_bridge: object, speech: dict) -> None:
    failing = Fault(503, f"upstream overloaded for key {API_KEY}", "server_error", headers={"x-request-id": REQUEST_ID})
    async with FakeOpenAI(api_key=API_KEY, default=failing) as fake:
        bridge: BridgeProcess = make_bridge(  # type: ignore[operator]
            _config(fake), mqtt_extra='username = "bridge"\npassword = "mqtt-PASS-4821"'
        )
        published: list[bytes] = []
        async with aiomqtt.Client(bridge.broker.host, bridge.broker.port) as everything:
            await everything.subscribe(f"{bridge.prefix}/+/out/#", qos=1)
            await everything.subscribe(f"{bridge.prefix}/status", qos=1)

            async def record() -> None:
                async for message in everything.messages:
                    published.append(bytes(message.payload))  # type: ignore[arg-type]

            recorder = asyncio.create_task(record())
            device = f"sec-{random.getrandbits(32):08x}"
            async with asyncio.timeout(60):
                received = await send_utterance(
                    bridge.broker.url, device, speech["what_time"], prefix=bridge.prefix, speed=0, push_to_talk=True
                )
            error = received[-1].message
            assert isinstance(error, Error) and error.session is not None and error.retryable
            assert len(fake.requests) >= 1  # the fallback reached the fake and was refused with 503
            await asyncio.sleep(0.5)
            recorder.cancel()
        assert bridge.stop(signal.SIGTERM) == 0

    device_text = "\n".join(payload.decode("utf-8", "replace") for payload in published)
    assert error.message in device_text
    for forbidden in (*SECRETS, REQUEST_ID, f"127.0.0.1:{fake.port}", "asr-user", "vad-user"):
        assert forbidden not in device_text, (forbidden, device_text)
    log = bridge.log_path.read_text(errors="replace")
    assert '"session.backend_failed"' in log and "vad.batch_check_failed" in log, bridge.log()
    for secret in SECRETS:
        assert secret not in log, (secret, bridge.log())
    assert "Traceback" not in log
