"""The bridge rides out a broker restart: reconnects, re-subscribes, says online, serves again."""

from __future__ import annotations

import asyncio
from pathlib import Path

from service.tools.devbroker import PrivateMosquitto
from service.tools.device_sim import send_utterance
from tests.conftest import BridgeProcess, Broker, wait_for_status


async def test_bridge_reconnects_after_the_broker_restarts(tmp_path: Path, speech: dict) -> None:
    first = PrivateMosquitto().start()
    port = first.port
    broker = Broker(first.host, port)
    bridge = BridgeProcess(broker, tmp_path, mqtt_extra="reconnect_max_s = 1").start()
    try:
        first.stop()
        await asyncio.sleep(1.5)
        second = PrivateMosquitto(port=port).start()
        try:
            status = await wait_for_status(broker, bridge.prefix, "online", timeout=20)
            assert status is not None
            received = await send_utterance(
                broker.url, "after-restart", speech["what_time"], prefix=bridge.prefix, speed=0, push_to_talk=True
            )
            assert received[-1].message.text == "what time is it"  # type: ignore[union-attr]
            assert '"mqtt.disconnected"' in bridge.log()
        finally:
            bridge.stop()
            second.stop()
    finally:
        if bridge.process is not None and bridge.process.poll() is None:
            bridge.process.kill()


async def test_bridge_on_mqtt_5(make_bridge: object, speech: dict) -> None:
    bridge: BridgeProcess = make_bridge("", mqtt_extra="protocol = 5")  # type: ignore[operator]
    received = await send_utterance(
        bridge.broker.url, "v5", speech["what_time"], prefix=bridge.prefix, speed=0, push_to_talk=True
    )
    assert received[-1].message.text == "what time is it"  # type: ignore[union-attr]
