"""PROTOCOL.md §7's deadline through a real bridge: a turn whose backend stalls still ends, retryably, in time.

The OpenAI-compatible fake answers every request 503 with ``Retry-After: 10``, which the retry
policy honours: five attempts take 40 s, more than the 30 s deadline of the end of the turn that
``timeout_s`` and ``max_retries`` give. The device gets ``backend_unavailable`` at the deadline,
naming no backend address, and once the backend recovers its next utterance is served.
"""

from __future__ import annotations

import asyncio

from firmware_protocol import Error, ErrorCode, Transcript
from service.tools.device_sim import send_utterance
from tests.conftest import BridgeProcess
from tests.fakes.openai_server import FakeOpenAI, Fault
from tests.fakes.openai_server import Transcript as Say

KEY = "sk-deadline-0123456789"


async def test_a_stalled_backend_gets_backend_unavailable_at_the_deadline(make_bridge: object, speech: dict) -> None:
    stall = Fault(503, "overloaded", "server_error", headers={"Retry-After": "10"})
    async with FakeOpenAI(api_key=KEY, default=stall) as fake:
        bridge: BridgeProcess = make_bridge(  # type: ignore[operator]
            f"""
            [asr]
            platform = "openai"
            url = "{fake.url}"
            api_key = "{KEY}"
            model = "whisper-1"
            timeout_s = 1
            max_retries = 4
            """
        )
        async with asyncio.timeout(90):
            received = await send_utterance(
                bridge.broker.url, "late", speech["what_time"], prefix=bridge.prefix, speed=0, push_to_talk=True
            )
        error = received[-1].message
        assert isinstance(error, Error) and error.code is ErrorCode.BACKEND_UNAVAILABLE, error
        assert error.retryable and error.session is not None and "30 s" in error.message
        assert f"127.0.0.1:{fake.port}" not in error.message
        assert len(fake.requests) < 5  # the last attempt was still waiting out Retry-After
        fake.default = Say("What time is it?")

        async with asyncio.timeout(60):
            again = await send_utterance(
                bridge.broker.url, "late", speech["what_time"], prefix=bridge.prefix, speed=0, push_to_talk=True
            )
        final = again[-1].message
        assert isinstance(final, Transcript) and final.final and final.text == "What time is it?"
    log = bridge.log_path.read_text(errors="replace")
    assert '"session.final_deadline"' in log and "Traceback" not in log, bridge.log()
