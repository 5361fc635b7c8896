"""Graceful stop: a signal mid-utterance lets that utterance finish, refuses new ones, then says offline.

Two ways users stop the bridge: SIGTERM to its process (``docker stop``, ``kill``), and Ctrl-C in
a terminal or a service manager stopping the whole process group, which signals the decoder worker
processes too.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aiomqtt
import pytest

from firmware_protocol import (
    Endpointing,
    EndReason,
    Error,
    ErrorCode,
    Listening,
    SpeechEnded,
    SpeechStarted,
    Start,
    Transcript,
    decode_bridge_message,
)
from service.tools.device_sim import frames_of
from tests.conftest import REPO, BridgeProcess, Broker, wait_for_status
from tests.device import RawDevice

CONFIG = """
[asr]
platform = "pocketsphinx"
decoders = 1
"""


class ProcessGroupBridge(BridgeProcess):
    """The bridge as a terminal runs it: leader of its own process group, with its decoder workers in it."""

    def start(self) -> ProcessGroupBridge:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "run", "--config", str(self.config_path)],
            stdout=self.log_path.open("wb"),
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
            start_new_session=True,
        )
        with ThreadPoolExecutor(1) as pool:
            status = pool.submit(asyncio.run, wait_for_status(self.broker, self.prefix, "online", timeout=60)).result()
        assert status is not None, f"bridge did not come online:\n{self.log()}"
        return self


async def _wait_for_log(bridge: BridgeProcess, event: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while f'"{event}"' not in bridge.log_path.read_text(errors="replace"):
        assert time.monotonic() < deadline, f"no {event} in the log:\n{bridge.log()}"
        await asyncio.sleep(0.05)


async def _stop_mid_utterance(bridge: BridgeProcess, speech: dict, send_signal: Callable[[], None]) -> None:
    broker = bridge.broker
    frames = frames_of(speech["what_time"], session := random.randint(1, 0xFFFFFFFF), 20, last=True)
    half = len(frames) // 2
    order: list[str] = []  # what a bystander sees, in order: the talker's messages and the bridge's status

    talker_id, latecomer_id = (f"{name}-{random.getrandbits(32):08x}" for name in ("talker", "latecomer"))
    async with (
        RawDevice(broker.host, broker.port, bridge.prefix, talker_id) as talker,
        RawDevice(broker.host, broker.port, bridge.prefix, latecomer_id) as latecomer,
        aiomqtt.Client(broker.host, broker.port) as bystander,
    ):
        await bystander.subscribe(f"{bridge.prefix}/{talker_id}/out/#", qos=1)
        await bystander.subscribe(f"{bridge.prefix}/status", qos=1)

        watcher = asyncio.create_task(_record_order(bystander, order))
        # Push-to-talk: half of the utterance, the button still held.
        await talker.control(Start(session=session, endpointing=Endpointing.PUSH_TO_TALK))
        await talker.stream(frames[:half])
        await talker.wait_for(lambda m: isinstance(m, SpeechStarted))

        send_signal()
        await _wait_for_log(bridge, "bridge.stopping")

        # A new session during the drain is refused, retryably.
        other = random.randint(1, 0xFFFFFFFF)
        await latecomer.control(Start(session=other))
        await latecomer.send(frames_of(speech["what_time"][:3200], other, 20)[0])
        refused = await latecomer.wait_for(lambda m: isinstance(m, Error))
        assert isinstance(refused, Error) and refused.code is ErrorCode.TOO_MANY_SESSIONS
        assert refused.retryable and refused.session == other and "shutting down" in refused.message
        assert not any(isinstance(m, Listening) for m in latecomer.messages())

        # The button is released: the rest, LAST on the final frame. The in-flight utterance completes.
        await talker.stream(frames[half:])
        final = await talker.wait_for(lambda m: isinstance(m, Transcript) and m.final)
        assert isinstance(final, Transcript) and final.text == "what time is it"
        ended = next(m for m in talker.messages(session) if isinstance(m, SpeechEnded))
        assert ended.reason is EndReason.DEVICE

        assert bridge.process is not None
        code = await asyncio.to_thread(bridge.process.wait, 30)
        assert code == 0, bridge.log()
        status = await wait_for_status(broker, bridge.prefix, "offline", timeout=10)
        assert status is not None
        await asyncio.sleep(0.2)
        watcher.cancel()

    assert order[0] == "online"
    assert order.index("transcript") < order.index("offline"), order
    log = bridge.log_path.read_text(errors="replace")
    assert '"session.crashed"' not in log and "Traceback" not in log, bridge.log()


async def test_sigterm_finishes_the_utterance_in_flight(make_bridge: object, speech: dict) -> None:
    bridge: BridgeProcess = make_bridge(CONFIG)  # type: ignore[operator]
    assert bridge.process is not None
    await _stop_mid_utterance(bridge, speech, lambda: bridge.process.send_signal(signal.SIGTERM))  # type: ignore[union-attr]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "service-manager"])
async def test_a_signal_to_the_whole_process_group_spares_the_decoders(
    broker: Broker, tmp_path: Path, speech: dict, sig: signal.Signals
) -> None:
    bridge = ProcessGroupBridge(broker, tmp_path, CONFIG).start()
    assert bridge.process is not None
    group = bridge.process.pid
    try:
        await _stop_mid_utterance(bridge, speech, lambda: os.killpg(group, sig))
        # The decoder workers left with the bridge: nothing of the group lingers.
        deadline = time.monotonic() + 10
        while _group_alive(group):
            assert time.monotonic() < deadline, "decoder workers outlived the bridge"
            await asyncio.sleep(0.1)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
        bridge.process.wait()


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


async def test_a_session_still_running_at_the_drain_limit_gets_a_retryable_error_before_offline(
    make_bridge: object, speech: dict
) -> None:
    """Push-to-talk with the button still held when the drain runs out: never silence, an error then offline."""
    bridge: BridgeProcess = make_bridge(CONFIG + "[session]\nidle_timeout_s = 60\n")  # type: ignore[operator]
    assert bridge.process is not None
    broker = bridge.broker
    session = random.randint(1, 0xFFFFFFFF)
    frames = frames_of(speech["what_time"], session, 20)
    order: list[str] = []
    holder_id = f"holder-{random.getrandbits(32):08x}"
    async with (
        RawDevice(broker.host, broker.port, bridge.prefix, holder_id) as holder,
        aiomqtt.Client(broker.host, broker.port) as bystander,
    ):
        await bystander.subscribe(f"{bridge.prefix}/{holder_id}/out/#", qos=1)
        await bystander.subscribe(f"{bridge.prefix}/status", qos=1)

        watcher = asyncio.create_task(_record_order(bystander, order))
        await holder.control(Start(session=session, endpointing=Endpointing.PUSH_TO_TALK))
        await holder.stream(frames[: len(frames) // 2])
        await holder.wait_for(lambda m: isinstance(m, SpeechStarted))

        bridge.process.send_signal(signal.SIGTERM)
        await _wait_for_log(bridge, "bridge.stopping")
        error = await holder.wait_for(lambda m: isinstance(m, Error), timeout=40)
        assert isinstance(error, Error) and error.code is ErrorCode.BACKEND_UNAVAILABLE
        assert error.retryable and error.session == session and "shutting down" in error.message
        assert not any(isinstance(m, Transcript) and m.final for m in holder.messages(session))

        code = await asyncio.to_thread(bridge.process.wait, 30)
        assert code == 0, bridge.log()
        assert await wait_for_status(broker, bridge.prefix, "offline", timeout=10) is not None
        await asyncio.sleep(0.2)
        watcher.cancel()

    assert order.index("error") < order.index("offline"), order
    log = bridge.log_path.read_text(errors="replace")
    assert '"session.deadline"' in log and "Traceback" not in log, bridge.log()


async def _record_order(bystander: aiomqtt.Client, order: list[str]) -> None:
    """What a bystander sees, in order: each message's type, or the bridge status's state."""
    async for message in bystander.messages:
        decoded = decode_bridge_message(bytes(message.payload))  # type: ignore[arg-type,unused-ignore]
        order.append(str(getattr(decoded, "state", None) or decoded.__struct_config__.tag))
