"""The bridge's broker link (MQTT 3.1.1 or 5): subscriptions, a retained status with a will, reconnects with backoff.

:class:`MqttLink` owns the client; everything else publishes through it and receives
messages through one :data:`~service.link.transport.MessageHandler`. Publishing while
disconnected drops the message and counts it: results are only useful live, and a device
that lost its session retries.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import structlog

from firmware_protocol import PROTOCOL_VERSION, STATUS_QOS, BridgeStatus, Topics, encode_message
from service.config import MqttConfig
from service.link.backoff import Backoff
from service.link.transport import ConnectOptions, LastWill, LinkError, MessageHandler, MqttConnection
from service.redact import redact_url

log = structlog.get_logger(__name__)

FIRST_RETRY_S = 0.5


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
        self._connection: MqttConnection | None = None
        self.connected = asyncio.Event()
        self.stats = LinkStats()

    def _status(self, state: str) -> bytes:
        return encode_message(
            BridgeStatus(state=state, version=self._version, instance=self._instance, protocol=PROTOCOL_VERSION)
        )

    def _options(self) -> ConnectOptions:
        config = self._config
        return ConnectOptions(
            config.url,
            identifier=config.client_id or f"echokit-bridge-{self._instance}",
            username=config.username,
            password=config.password,
            ca_file=config.ca_file,
            protocol=config.protocol,
            keepalive_s=config.keepalive_s,
            will=LastWill(self._topics.status, self._status("offline"), qos=STATUS_QOS, retain=True),
        )

    async def run(self) -> None:
        """Connect, subscribe and dispatch until cancelled; reconnect on any broker error."""
        backoff = Backoff(FIRST_RETRY_S, self._config.reconnect_max_s, jitter="half")
        options = self._options()
        while True:
            try:
                async with MqttConnection(options, self._on_message) as connection:
                    self._connection = connection
                    await self._subscribe(connection)
                    await connection.publish(self._topics.status, self._status("online"), qos=STATUS_QOS, retain=True)
                    self.stats.connects += 1
                    self.connected.set()
                    log.info("mqtt.connected", url=redact_url(self._config.url))
                    backoff.reset()
                    reason = await connection.wait_closed()
                    log.warning("mqtt.disconnected", error=reason, retry_in_s=round(backoff.delay, 2))
            except LinkError as exc:
                log.warning("mqtt.disconnected", error=str(exc), retry_in_s=round(backoff.delay, 2))
            finally:
                self._connection = None
                self.connected.clear()
            await backoff.sleep()

    async def _subscribe(self, connection: MqttConnection) -> None:
        await connection.subscribe(self._topics.audio_filter, qos=self._audio_qos)
        await connection.subscribe(self._topics.control_filter, qos=1)
        for extra in self._extra_subscriptions:
            await connection.subscribe(extra, qos=1)

    async def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        connection = self._connection
        if connection is None:
            self.stats.publish_dropped += 1
            return
        try:
            await connection.publish(topic, payload, qos=qos, retain=retain)
            self.stats.published += 1
        except LinkError as exc:
            self.stats.publish_dropped += 1
            log.warning("mqtt.publish_failed", topic=topic, error=str(exc))

    async def say_offline(self) -> None:
        """Graceful stop: the will only fires on an unclean disconnect."""
        await self.publish(self._topics.status, self._status("offline"), qos=STATUS_QOS, retain=True)
