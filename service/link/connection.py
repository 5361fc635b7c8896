"""The broker connection via aiomqtt (3.1.1 or 5), reconnecting with backoff, status with a will.

:class:`MqttLink` owns the client; everything else publishes through it and receives
messages through one callback. Publishing while disconnected drops the message and
counts it: results are only useful live, and a device that lost its session retries.
"""

from __future__ import annotations

import asyncio
import random
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiomqtt
import structlog
from aiomqtt import ProtocolVersion
from paho.mqtt import client as paho_client
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from firmware_protocol import PROTOCOL_VERSION, BridgeStatus, Topics, encode_message
from service.config import MqttConfig

log = structlog.get_logger(__name__)

MessageHandler = Callable[[aiomqtt.Message], None]


def _dispatching_queue(handler: MessageHandler) -> type[asyncio.Queue[aiomqtt.Message]]:
    """aiomqtt's ``queue_type`` hook: each message goes to ``handler`` as paho reads it.

    No task and no ``asyncio.wait`` per message, and no backlog in the bridge's memory: when
    the bridge falls behind, messages wait in the socket and at the broker, which bounds
    them (``max_queued_messages``) and counts what it drops.
    """

    class DispatchingQueue(asyncio.Queue[aiomqtt.Message]):
        def put_nowait(self, item: aiomqtt.Message) -> None:
            handler(item)

    return DispatchingQueue


@dataclass(slots=True)
class LinkStats:
    connects: int = 0
    published: int = 0
    publish_dropped: int = 0


class MqttLink:
    def __init__(
        self,
        config: MqttConfig,
        topics: Topics,
        on_message: MessageHandler,
        *,
        instance: str,
        version: str,
        audio_qos: int = 1,
        extra_subscriptions: tuple[str, ...] = (),
    ) -> None:
        self._config = config
        self._topics = topics
        self._on_message = on_message
        self._instance = instance
        self._version = version
        self._audio_qos = audio_qos
        self._extra_subscriptions = extra_subscriptions
        """Further filters (QoS 1) whose messages go to ``on_message`` too, e.g. Home Assistant's status."""
        self._client: aiomqtt.Client | None = None
        self.connected = asyncio.Event()
        self.stats = LinkStats()

    def _status(self, state: str) -> bytes:
        return encode_message(
            BridgeStatus(state=state, version=self._version, instance=self._instance, protocol=PROTOCOL_VERSION)
        )

    def _make_client(self) -> aiomqtt.Client:
        url = urlsplit(self._config.url)
        tls: ssl.SSLContext | None = None
        if url.scheme == "mqtts":
            tls = ssl.create_default_context(cafile=self._config.ca_file or None)
        v5 = self._config.protocol == 5
        connect_properties = None
        if v5:
            connect_properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            connect_properties.SessionExpiryInterval = 0
        return aiomqtt.Client(
            hostname=url.hostname or "localhost",
            port=url.port or (8883 if tls else 1883),
            username=self._config.username or None,
            password=self._config.password or None,
            identifier=self._config.client_id or f"echokit-bridge-{self._instance}",
            protocol=ProtocolVersion.V5 if v5 else ProtocolVersion.V311,
            clean_start=True if v5 else paho_client.MQTT_CLEAN_START_FIRST_ONLY,  # paho: v5 only
            clean_session=None if v5 else True,
            properties=connect_properties,
            keepalive=self._config.keepalive_s,
            tls_context=tls,
            will=aiomqtt.Will(self._topics.status, self._status("offline"), qos=1, retain=True),
            queue_type=_dispatching_queue(self._on_message),
            timeout=10,
        )

    async def run(self) -> None:
        """Connect, subscribe and dispatch until cancelled; reconnect on any broker error."""
        delay = 0.5
        while True:
            client = self._make_client()
            try:
                async with client:
                    self._client = client
                    await client.subscribe(self._topics.audio_filter, qos=self._audio_qos)
                    await client.subscribe(self._topics.control_filter, qos=1)
                    for extra in self._extra_subscriptions:
                        await client.subscribe(extra, qos=1)
                    await client.publish(self._topics.status, self._status("online"), qos=1, retain=True)
                    self.stats.connects += 1
                    self.connected.set()
                    log.info("mqtt.connected", url=_redact(self._config.url))
                    delay = 0.5
                    async for _ in client.messages:  # messages go to the handler; this waits for a disconnect
                        pass
            except aiomqtt.MqttError as exc:
                log.warning("mqtt.disconnected", error=str(exc), retry_in_s=round(delay, 2))
            finally:
                self._client = None
                self.connected.clear()
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, self._config.reconnect_max_s)

    async def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        client = self._client
        if client is None:
            self.stats.publish_dropped += 1
            return
        try:
            await client.publish(topic, payload, qos=qos, retain=retain)
            self.stats.published += 1
        except aiomqtt.MqttError as exc:
            self.stats.publish_dropped += 1
            log.warning("mqtt.publish_failed", topic=topic, error=str(exc))

    async def say_offline(self) -> None:
        """Graceful stop: the will only fires on an unclean disconnect."""
        await self.publish(self._topics.status, self._status("offline"), qos=1, retain=True)


def _redact(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}:{parts.port}" if parts.port else f"{parts.scheme}://{parts.hostname}"
