"""The bridge rides out a broker restart: reconnects, re-subscribes, says online, serves again."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from pathlib import Path

from service.link.backoff import Backoff
from service.link.client import mqtt_client
from service.link.takeover import IN_A_ROW, SHORT_LIVED_S, TakeoverWatch
from service.link.transport import ConnectOptions, LinkError, MqttConnection
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


def test_backoff_doubles_to_its_max_with_jitter_and_starts_over_after_a_connection() -> None:
    top = Backoff(0.5, 4.0, jitter="half", uniform=lambda low, high: high)
    assert [top.next_wait() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    top.reset()
    assert top.delay == 0.5 and top.next_wait() == 0.5
    half = Backoff(1.0, 30.0, jitter="half", uniform=lambda low, high: low)
    full = Backoff(1.0, 30.0, jitter="full", uniform=lambda low, high: low)
    assert (half.next_wait(), full.next_wait()) == (0.5, 0.0)
    real = Backoff(1.0, 8.0, jitter="full")
    waits = [real.next_wait() for _ in range(200)]
    assert all(0.0 <= w <= 8.0 for w in waits) and len(set(waits)) > 100


def test_a_takeover_is_named_by_mqtt_5_or_seen_as_short_connections_in_a_row() -> None:
    watch = TakeoverWatch()
    assert watch.closed("Session taken over", lived_s=60) and watch.suspected  # MQTT 5 says so (0x8E)
    watch.failed()  # a failed reconnect: the broker was away, nobody took anything
    assert not watch.suspected
    short = SHORT_LIVED_S / 2
    seen = [watch.closed("Unspecified error", lived_s=short) for _ in range(IN_A_ROW)]
    assert seen == [False] * (IN_A_ROW - 1) + [True] and watch.suspected
    assert not watch.closed("Unspecified error", lived_s=SHORT_LIVED_S * 2)  # a long connection ends the streak
    assert not watch.suspected
    for _ in range(IN_A_ROW - 1):
        watch.closed("Unspecified error", lived_s=short)
    watch.failed()
    assert not watch.closed("Unspecified error", lived_s=short)  # a restart between them: no takeover


async def test_messages_reach_the_handler_as_read_without_a_queue_or_a_task(broker: Broker) -> None:
    """The receive seam: the handler runs from the socket's reader callback, never from a task."""
    received: list[tuple[str, bytes, bool]] = []
    got_all = asyncio.Event()
    prefix = f"seam{uuid.uuid4().hex[:8]}"

    def handler(topic: str, payload: bytes) -> None:
        received.append((topic, payload, asyncio.current_task() is None))
        if len(received) == 50:
            got_all.set()

    options = ConnectOptions(broker.url, identifier=f"seam-{prefix}")
    async with MqttConnection(options, handler) as listener, mqtt_client(broker.url, identifier=f"pub-{prefix}") as pub:
        await listener.subscribe(f"{prefix}/+/in/audio", qos=1)
        for i in range(50):
            await pub.publish(f"{prefix}/dev{i % 3}/in/audio", bytes([i]) * 4, qos=i % 2)
        async with asyncio.timeout(10):
            await got_all.wait()
    assert [(t, p) for t, p, _ in received] == [(f"{prefix}/dev{i % 3}/in/audio", bytes([i]) * 4) for i in range(50)]
    assert all(type(p) is bytes for _, p, _ in received)
    assert all(outside_a_task for _, _, outside_a_task in received)


async def test_the_connection_reports_a_lost_broker_and_fails_what_was_in_flight() -> None:
    """A broker that dies: ``wait_closed`` returns, and publishing afterwards raises instead of hanging."""
    with PrivateMosquitto() as private:
        options = ConnectOptions(private.url, identifier="lost-broker", timeout_s=2)
        async with MqttConnection(options, lambda topic, payload: None) as connection:
            await connection.publish("lost/a", b"x", qos=1)
            private.stop()
            async with asyncio.timeout(10):
                reason = await connection.wait_closed()
            assert reason
            try:
                await connection.publish("lost/b", b"y", qos=1)
            except LinkError:
                pass
            else:
                raise AssertionError("a publish on a lost connection must raise LinkError")


async def test_connecting_to_nothing_raises_link_error_within_the_timeout() -> None:
    with PrivateMosquitto() as private:
        url = private.url
    options = ConnectOptions(url, identifier="nobody-home", timeout_s=2)
    try:
        async with asyncio.timeout(5):
            async with MqttConnection(options, lambda topic, payload: None):
                pass
    except LinkError as exc:
        assert "connecting to 127.0.0.1" in str(exc)
    else:
        raise AssertionError("connecting to a closed port must raise LinkError")


async def test_filters_added_at_run_time_are_subscribed_now_and_after_a_reconnect() -> None:
    """The cluster's per-device audio subscriptions: added, kept across a broker restart, removed."""
    from firmware_protocol import Topics
    from service.config import MqttConfig
    from service.link.connection import MqttLink

    got: list[str] = []
    arrived = asyncio.Event()

    def handler(topic: str, payload: bytes) -> None:
        got.append(topic)
        arrived.set()

    async def expect_one(pub_url: str, payload: bytes) -> None:
        arrived.clear()
        async with mqtt_client(pub_url, identifier=f"dyn-pub-{payload!r}") as pub:
            await pub.publish("dyn/b/in/audio", payload, qos=1)  # not chosen: never delivered
            await pub.publish("dyn/a/in/audio", payload, qos=1)
            async with asyncio.timeout(5):
                await arrived.wait()

    with PrivateMosquitto() as first:
        port = first.port
        config = MqttConfig(url=first.url, reconnect_max_s=0.5)
        link = MqttLink(config, Topics("dyn"), handler, instance="dyn", version="test", all_audio=False)
        runner = asyncio.create_task(link.run())
        try:
            async with asyncio.timeout(10):
                await link.connected.wait()
            await link.subscribe("dyn/a/in/audio")
            await expect_one(first.url, b"1")
            first.stop()
            with PrivateMosquitto(port=port) as second:
                async with asyncio.timeout(15):
                    while link.stats.connects < 2:  # noqa: ASYNC110 - polling a counter of the link under test
                        await asyncio.sleep(0.05)
                await expect_one(second.url, b"2")
                await link.unsubscribe("dyn/a/in/audio")
                async with mqtt_client(second.url, identifier="dyn-pub-after") as pub:
                    await pub.publish("dyn/a/in/audio", b"3", qos=1)
                    await asyncio.sleep(0.5)
        finally:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
    assert got == ["dyn/a/in/audio", "dyn/a/in/audio"]
