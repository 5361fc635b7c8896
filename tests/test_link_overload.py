"""The link under overload: one bounded publish queue, owed messages first, each device's order kept.

The queue's policy is checked directly; then a real :class:`MqttLink` on a real Mosquitto shows a
flood of optional messages to other devices costing a good device none of what it is owed, its
messages arriving in the order they were emitted, and owed messages waiting out a broker outage.
"""

from __future__ import annotations

import asyncio
import uuid

import aiomqtt

from firmware_protocol import Topics
from service.config import MqttConfig
from service.link.client import mqtt_client
from service.link.connection import MqttLink
from service.link.outgoing import OutgoingQueue, Priority
from service.tools.devbroker import PrivateMosquitto
from tests.conftest import Broker

FINAL, ERROR, OWED, OPTIONAL = Priority.FINAL, Priority.ERROR, Priority.OWED, Priority.OPTIONAL


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def put(queue: OutgoingQueue, key: str, name: str, priority: Priority) -> None:
    queue.put(f"{key}/{name}", name.encode(), 1, False, priority, key)


async def drain(queue: OutgoingQueue) -> list[str]:
    sent = []
    while len(queue):
        async with asyncio.timeout(1):
            sent.append((await queue.get()).topic)
    return sent


async def test_owed_messages_go_first_without_reordering_a_device() -> None:
    queue = OutgoingQueue(100, 60)
    put(queue, "a", "partial1", OPTIONAL)
    put(queue, "b", "partial1", OPTIONAL)
    put(queue, "a", "speech_started", OPTIONAL)
    put(queue, "c", "listening", OWED)
    put(queue, "a", "final", FINAL)  # takes a's partial and speech_started along, in order
    put(queue, "b", "partial2", OPTIONAL)
    sent = await drain(queue)
    assert sent == ["a/partial1", "a/speech_started", "a/final", "c/listening", "b/partial1", "b/partial2"]
    assert len(queue) == 0 and queue.stats.queued == 6


async def test_a_full_queue_drops_the_least_important_oldest_first_and_counts_it() -> None:
    queue = OutgoingQueue(3, 60)
    put(queue, "flood", "partial0", OPTIONAL)
    put(queue, "good", "listening", OWED)
    put(queue, "flood", "partial1", OPTIONAL)
    put(queue, "good", "final", FINAL)  # full: the oldest optional goes
    assert queue.stats.dropped == {"final": 0, "error": 0, "owed": 0, "optional": 1}
    put(queue, "flood", "error", ERROR)  # takes partial1 along, which is still the first to go
    assert queue.stats.dropped == {"final": 0, "error": 0, "owed": 0, "optional": 2}
    put(queue, "flood", "error2", ERROR)  # no optional left: the oldest owed
    assert queue.stats.dropped == {"final": 0, "error": 0, "owed": 1, "optional": 2}
    put(queue, "flood", "error3", ERROR)  # errors before finals: the oldest error, logged and counted
    assert queue.stats.dropped == {"final": 0, "error": 1, "owed": 1, "optional": 2}
    assert await drain(queue) == ["good/final", "flood/error2", "flood/error3"]
    finals = OutgoingQueue(1, 60)
    put(finals, "a", "final", FINAL)
    put(finals, "b", "final", FINAL)  # nothing else left: the oldest final
    assert finals.stats.dropped["final"] == 1 and await drain(finals) == ["b/final"]


async def test_dropping_under_a_long_flood_keeps_memory_bounded() -> None:
    queue = OutgoingQueue(100, 60)
    for i in range(20000):
        put(queue, f"d{i % 7}", f"m{i}", Priority(i % 4))
    assert len(queue) == 100
    assert all(len(lane) <= 2 * 100 + 64 for lane in queue._lanes + queue._by_priority)
    sent = await drain(queue)
    for device in range(7):  # each device's survivors in the order it emitted them
        numbers = [int(topic.split("/m")[1]) for topic in sent if topic.startswith(f"d{device}/")]
        assert numbers == sorted(numbers)


async def test_messages_older_than_the_max_age_are_dropped_when_their_turn_comes() -> None:
    clock = Clock()
    queue = OutgoingQueue(10, 30, clock=clock)
    put(queue, "a", "final", FINAL)
    clock.now = 20
    put(queue, "b", "final", FINAL)
    clock.now = 45
    assert await drain(queue) == ["b/final"]  # a's waited 45 s
    assert queue.stats.expired == 1 and queue.stats.dropped["final"] == 1


async def test_unacknowledged_messages_are_sent_again_first_in_their_order() -> None:
    queue = OutgoingQueue(10, 60)
    put(queue, "a", "listening", OWED)
    put(queue, "a", "final", FINAL)
    in_flight = [await queue.get(), await queue.get()]
    put(queue, "b", "error", ERROR)
    put(queue, "a", "partial", OPTIONAL)
    queue.requeue(in_flight)
    assert await drain(queue) == ["a/listening", "a/final", "b/error", "a/partial"]
    assert queue.stats.resent == 2


# ---- a real link on a real broker ---------------------------------------------------------------


async def collect(client: aiomqtt.Client, into: list[tuple[str, bytes]], until: bytes) -> None:
    async for message in client.messages:
        into.append((message.topic.value, bytes(message.payload)))  # type: ignore[arg-type]
        if message.payload == until:
            return


async def test_a_flood_to_other_devices_costs_a_good_device_nothing_it_is_owed(broker: Broker) -> None:
    prefix = f"ov{uuid.uuid4().hex[:8]}"
    config = MqttConfig(url=broker.url, topic_prefix=prefix, publish_queue=200, publish_inflight=20)
    link = MqttLink(config, Topics(prefix), lambda topic, payload: None, instance="ov", version="test")
    good: list[tuple[str, bytes]] = []
    async with mqtt_client(broker.url, identifier=f"good-{prefix}") as device:
        await device.subscribe(f"{prefix}/good/out/#", qos=1)
        runner = asyncio.create_task(link.run())
        async with asyncio.timeout(10):
            await link.connected.wait()
        reader = asyncio.create_task(collect(device, good, b"final"))
        emitted = []
        for i in range(5000):  # a burst far past the queue: partials to 50 flooding devices, the good turn inside it
            link.post(f"{prefix}/f{i % 50}/out/transcript", b"partial", qos=0, priority=OPTIONAL, key=f"f{i % 50}")
            if i % 1000 == 500:
                step = (["listening", "speech_started", "partial", "speech_ended", "final"])[i // 1000]
                priority = {"listening": OWED, "speech_ended": OWED, "final": FINAL}.get(step, OPTIONAL)
                link.post(f"{prefix}/good/out/x", step.encode(), qos=1, priority=priority, key="good")
                emitted.append(step)
        async with asyncio.timeout(20):
            await reader
            await link.flush()
        runner.cancel()
    received = [payload.decode() for _, payload in good]
    assert [step for step in emitted if step in received] == received  # in order, nothing twice
    assert {"listening", "speech_ended", "final"} <= set(received)
    dropped = link.stats.outgoing.dropped
    assert dropped["final"] == dropped["error"] == dropped["owed"] == 0 and dropped["optional"] > 4000
    assert link.stats.publish_dropped == dropped["optional"]


async def test_owed_messages_wait_out_a_broker_outage() -> None:
    first = PrivateMosquitto().start()
    port, prefix = first.port, f"out{uuid.uuid4().hex[:6]}"
    config = MqttConfig(url=first.url, topic_prefix=prefix, reconnect_max_s=1, resume_delay_s=0.5)
    link = MqttLink(config, Topics(prefix), lambda topic, payload: None, instance="out", version="test")
    runner = asyncio.create_task(link.run())
    try:
        async with asyncio.timeout(10):
            await link.connected.wait()
        first.stop()
        async with asyncio.timeout(10):
            while link.connected.is_set():  # noqa: ASYNC110 - the link has no "disconnected" event
                await asyncio.sleep(0.05)
        for step in ("speech_ended", "final"):  # emitted while the broker is away
            link.post(f"{prefix}/dev/out/x", step.encode(), qos=1, priority=FINAL, key="dev")
        await asyncio.sleep(3)  # longer than the reconnect backoff
        with PrivateMosquitto(port=port) as second:
            got: list[tuple[str, bytes]] = []
            async with mqtt_client(second.url, identifier=f"dev-{prefix}") as device:
                await device.subscribe(f"{prefix}/dev/out/#", qos=1)  # within resume_delay_s of the link's return
                async with asyncio.timeout(20):
                    await collect(device, got, b"final")
            assert [payload for _, payload in got] == [b"speech_ended", b"final"]
            assert link.stats.connects == 2 and link.stats.publish_dropped == 0
    finally:
        runner.cancel()
        first.stop()
