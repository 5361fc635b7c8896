"""A real bridge across a broker outage, and retained messages replayed at it by a broker.

Devices here are paho clients that reconnect by themselves and re-subscribe on every connect, as
ESP-MQTT firmware does (PROTOCOL.md §11). The broker is a real Mosquitto, stopped for longer than
the bridge's reconnect backoff and restarted on the same port.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from firmware_protocol import (
    BridgeMessage,
    Endpointing,
    Error,
    Listening,
    Start,
    TopicKind,
    Topics,
    Transcript,
    decode_bridge_message,
    encode_message,
)
from service.tools.devbroker import PrivateMosquitto
from service.tools.device_sim import frames_of
from tests.conftest import BridgeProcess, Broker, wait_for_status


class ReconnectingDevice:
    """A device on its own paho thread: reconnects after an outage and subscribes ``out/#`` again."""

    def __init__(self, broker: Broker, prefix: str, device_id: str) -> None:
        self.topics = Topics(prefix)
        self.device_id = device_id
        self.received: list[BridgeMessage] = []
        self.arrived: dict[int, float] = {}
        """``id()`` of each received message → when it came (monotonic)."""
        self._cond = threading.Condition()
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"dev-{device_id}", protocol=paho.MQTTv311, clean_session=True
        )
        self._client.reconnect_delay_set(min_delay=1, max_delay=1)
        self._client.on_connect = lambda c, *_: c.subscribe(f"{prefix}/{device_id}/out/#", qos=1)
        self._client.on_message = self._on_message
        self._client.connect(broker.host, broker.port, keepalive=5)
        self._client.loop_start()

    def _on_message(self, _c: Any, _u: Any, message: paho.MQTTMessage) -> None:
        decoded = decode_bridge_message(bytes(message.payload))
        with self._cond:
            self.received.append(decoded)
            self.arrived[id(decoded)] = time.monotonic()
            self._cond.notify_all()

    def wait_for(self, predicate: Any, timeout: float) -> BridgeMessage | None:
        with self._cond:
            self._cond.wait_for(lambda: any(predicate(m) for m in self.received), timeout)
            return next((m for m in self.received if predicate(m)), None)

    def publish(self, kind: TopicKind, payload: bytes) -> None:
        info = self._client.publish(self.topics.device(self.device_id, kind), payload, qos=1)
        info.wait_for_publish(timeout=10)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def ended(session: int) -> Any:
    """A final for ``session``, or an error for it that the device may retry."""

    def check(message: BridgeMessage) -> bool:
        if isinstance(message, Transcript):
            return message.final and message.session == session
        return isinstance(message, Error) and message.session == session and message.retryable

    return check


def every_line_is_json(log: str) -> bool:
    return all(line.startswith("{") and json.loads(line) for line in log.splitlines() if line.strip())


async def test_every_utterance_in_flight_ends_for_its_device_after_a_broker_outage(
    tmp_path: Path, speech: dict[str, np.ndarray]
) -> None:
    first = PrivateMosquitto().start()
    port, broker = first.port, Broker(first.host, first.port)
    bridge = BridgeProcess(
        broker,
        tmp_path,
        """
        [asr]
        platform = "pocketsphinx"
        decoders = 2
        [session]
        idle_timeout_s = 2
        """,
        mqtt_extra="reconnect_max_s = 1",
    ).start()
    devices = [ReconnectingDevice(broker, bridge.prefix, f"outage{i}") for i in range(3)]
    second: PrivateMosquitto | None = None
    try:
        sessions = []
        for device in devices:  # half an utterance each, no LAST: the turns end while the broker is away
            session = int(uuid.uuid4().int % 0xFFFFFFFE) + 1
            sessions.append(session)
            start = Start(session=session, endpointing=Endpointing.PUSH_TO_TALK)
            device.publish(TopicKind.CONTROL, encode_message(start))
            frames = frames_of(speech["what_time"], session)
            for frame in frames[: len(frames) // 2]:
                device.publish(TopicKind.AUDIO, frame.encode())
        for device, session in zip(devices, sessions, strict=True):
            assert device.wait_for(lambda m, s=session: isinstance(m, Listening) and m.session == s, 20)
        first.stop()
        await asyncio.sleep(5)  # past the idle timeout (2 s) and the reconnect backoff (1 s)
        second = PrivateMosquitto(port=port).start()
        back = time.monotonic()
        for device, session in zip(devices, sessions, strict=True):
            end = device.wait_for(ended(session), 30)
            assert end is not None, (device.received, bridge.log())
            assert device.arrived[id(end)] > back  # it was owed across the outage, and came once it was over
        log = bridge.log_path.read_text()
        assert '"mqtt.disconnected"' in log and every_line_is_json(log)
    finally:
        for device in devices:
            device.close()
        if bridge.process is not None and bridge.process.poll() is None:
            bridge.process.kill()
        first.stop()
        if second is not None:
            second.stop()


async def test_retained_device_messages_are_ignored_and_the_bridge_id_is_its_own(
    tmp_path: Path, speech: dict[str, np.ndarray]
) -> None:
    with PrivateMosquitto() as mosquitto:
        broker = Broker(mosquitto.host, mosquitto.port)
        bridge = BridgeProcess(broker, tmp_path, '[homeassistant]\nenabled = true\ndiscovery_prefix = "hatest"\n')
        topics = Topics(bridge.prefix)
        stale = 0x5EED
        publisher = paho.Client(CallbackAPIVersion.VERSION2, client_id="retainer", protocol=paho.MQTTv311)
        publisher.connect(broker.host, broker.port)
        publisher.loop_start()
        retained = {
            topics.device("stale1", TopicKind.CONTROL): encode_message(Start(session=stale)),
            topics.device("stale2", TopicKind.AUDIO): frames_of(speech["what_time"][:320], stale)[0].encode(),
            "hatest/status": b"online",  # Home Assistant's birth, retained: still current
        }
        for topic, payload in retained.items():
            publisher.publish(topic, payload, qos=1, retain=True).wait_for_publish(timeout=10)
        devices = [ReconnectingDevice(broker, bridge.prefix, name) for name in ("stale1", "stale2")]
        try:
            bridge.start()  # subscribes after the retained messages were stored: the broker replays them
            deadline = time.monotonic() + 20
            while bridge.log().count('"mqtt.retained_ignored"') < 2 or '"homeassistant.online"' not in bridge.log():
                assert time.monotonic() < deadline, bridge.log()
                await asyncio.sleep(0.1)
            # The stale start opened nothing: the first thing stale1 hears is about a fresh session.
            fresh = stale + 1
            devices[0].publish(TopicKind.CONTROL, encode_message(Start(session=fresh)))
            first = devices[0].wait_for(lambda m: True, 20)
            assert isinstance(first, Listening) and first.session == fresh, devices[0].received
            assert devices[1].received == []
            status = await wait_for_status(broker, bridge.prefix, "online", timeout=10)
            assert status is not None
            mosquitto_log = mosquitto.log_path.read_text()
            client_ids = re.findall(rf"as (echokit-bridge-{status['instance']}-[0-9a-f]+) ", mosquitto_log)
            assert client_ids and len(client_ids[0]) > len(f"echokit-bridge-{status['instance']}-")
            assert client_ids[0].rsplit("-", 1)[1] not in json.dumps(status)  # the status does not give it away
        finally:
            for device in devices:
                device.close()
            for topic in retained:
                publisher.publish(topic, b"", qos=1, retain=True).wait_for_publish(timeout=10)
            publisher.disconnect()
            publisher.loop_stop()
            bridge.stop()
