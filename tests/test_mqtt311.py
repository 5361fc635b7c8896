"""The MQTT 3.1.1 engine against a real Mosquitto: what a hand-written client must not get wrong."""

from __future__ import annotations

import asyncio
import uuid

from service.link.client import mqtt_client
from service.link.transport import ConnectOptions, MqttConnection
from tests.conftest import Broker


async def test_big_payloads_retained_messages_and_a_failing_handler(broker: Broker) -> None:
    """Every length size, packets cut across reads; retained to ``on_retained``; a raising handler stops nothing."""
    prefix = f"m311{uuid.uuid4().hex[:8]}"
    sizes = [0, 1, 127, 128, 640, 16_383, 16_384, 300_000]
    live: list[tuple[str, bytes]] = []
    retained: list[tuple[str, bytes]] = []
    done = asyncio.Event()

    def on_message(topic: str, payload: bytes) -> None:
        live.append((topic, payload))
        if payload == b"boom":
            raise RuntimeError("a handler bug")
        if topic.endswith(("/last", "/kept")):
            done.set()

    async with mqtt_client(broker.url, identifier=f"pub-{prefix}") as pub:
        await pub.publish(f"{prefix}/kept", b"stale", qos=1, retain=True)
        options = ConnectOptions(broker.url, identifier=f"sub-{prefix}")
        async with MqttConnection(options, on_message, lambda t, p: retained.append((t, p))) as sub:
            await sub.subscribe(f"{prefix}/#", qos=1)
            await pub.publish(f"{prefix}/x", b"boom", qos=1)
            for i, size in enumerate(sizes):
                await pub.publish(f"{prefix}/size{i}", bytes([i]) * size, qos=i % 2)
            await pub.publish(f"{prefix}/last", b"end", qos=1)
            async with asyncio.timeout(20):
                await done.wait()
                done.clear()
                await sub.publish(f"{prefix}/kept", b"", qos=1, retain=True)  # QoS 1 out: PUBACK awaited
                await done.wait()  # our own publish comes back to us, live
    assert retained == [(f"{prefix}/kept", b"stale")]
    assert live[0] == (f"{prefix}/x", b"boom")
    assert live[1:-2] == [(f"{prefix}/size{i}", bytes([i]) * size) for i, size in enumerate(sizes)]
    assert live[-2:] == [(f"{prefix}/last", b"end"), (f"{prefix}/kept", b"")]  # our own publish, delivered live
