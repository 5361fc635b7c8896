"""The bridge's broker link (MQTT 3.1.1 or 5): subscriptions, a retained status with a will, reconnects with backoff.

:class:`MqttLink` owns the client; everything else publishes through it and receives
messages through one :data:`~service.link.transport.MessageHandler`. Publishing never waits:
a message joins the link's :class:`~service.link.outgoing.OutgoingQueue` (bounded, by priority)
and goes out when the connection can take it, so what a device is owed survives a broker outage
(up to ``mqtt.publish_max_age_s``). Retained messages on device topics are stale by definition
(a broker replays them on every subscribe) and are handed to nobody.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
from dataclasses import dataclass, field
from functools import partial

import structlog

from firmware_protocol import PROTOCOL_VERSION, STATUS_QOS, BridgeStatus, Topics, encode_message
from service.config import MqttConfig
from service.link.backoff import Backoff
from service.link.outgoing import Outgoing, OutgoingQueue, Priority, QueueStats
from service.link.takeover import TakeoverWatch
from service.link.transport import ConnectOptions, LastWill, LinkError, MessageHandler, MqttConnection
from service.redact import redact_url

log = structlog.get_logger(__name__)

FIRST_RETRY_S = 0.5
RETAINED_LOG_LIMIT = 1024
"""Topics whose ignored retained message is logged (once each); beyond that they are only counted."""
FLUSH_POLL_S = 0.02


@dataclass(slots=True)
class LinkStats:
    connects: int = 0
    published: int = 0
    retained_ignored: int = 0
    """Retained messages on device topics, replayed by the broker and handed to nobody."""
    taken_over: int = 0
    """Connections that ended as another client took this client id."""
    outgoing: QueueStats = field(default_factory=QueueStats)

    @property
    def publish_dropped(self) -> int:
        return sum(self.outgoing.dropped.values())


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
        all_audio: bool = True,
    ) -> None:
        self._config = config
        self._topics = topics
        self._on_message = on_message
        self._instance = instance
        self._version = version
        self._audio_qos = audio_qos
        self._extra_subscriptions = extra_subscriptions
        """Further topics (QoS 1) whose messages, retained or not, go to ``on_message`` (Home Assistant's status)."""
        self._all_audio = all_audio
        """Every device's audio (``<prefix>/+/in/audio``); off in cluster mode: :meth:`subscribe` picks devices."""
        self._chosen: dict[str, int] = {}
        """Filters added at run time with their QoS, subscribed again after every reconnect."""
        self._connection: MqttConnection | None = None
        self._queue = OutgoingQueue(config.publish_queue, config.publish_max_age_s)
        self._inflight: dict[int, Outgoing] = {}
        """Messages handed to the connection and not yet through (written, or acknowledged), in the order sent."""
        self._tokens = itertools.count()
        self._retained_logged: set[str] = set()
        self.connected = asyncio.Event()
        self.stats = LinkStats(outgoing=self._queue.stats)

    @property
    def publish_queued(self) -> int:
        """Messages waiting to be published (the bounded queue's depth)."""
        return len(self._queue)

    def _status(self, state: str) -> bytes:
        return encode_message(
            BridgeStatus(state=state, version=self._version, instance=self._instance, protocol=PROTOCOL_VERSION)
        )

    def _options(self) -> ConnectOptions:
        config = self._config
        return ConnectOptions(
            config.url,
            # Unguessable: the status publishes the instance, and whoever knows a client id can take it over.
            identifier=config.client_id or f"echokit-bridge-{self._instance}-{secrets.token_hex(4)}",
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
        takeover = TakeoverWatch()
        options = self._options()
        while True:
            try:
                async with MqttConnection(options, self._on_message, self._on_retained) as connection:
                    reason, lived_s = await self._serve(connection, backoff, takeover.suspected)
                if takeover.closed(reason, lived_s):
                    self.stats.taken_over += 1
                    log.warning("mqtt.taken_over", error=reason, client_id=options.identifier, hint=takeover.HINT)
                log.warning("mqtt.disconnected", error=reason, retry_in_s=round(backoff.delay, 2))
            except LinkError as exc:
                takeover.failed()
                log.warning("mqtt.disconnected", error=str(exc), retry_in_s=round(backoff.delay, 2))
            finally:
                self._connection = None
                self.connected.clear()
            await backoff.sleep()

    async def _serve(self, connection: MqttConnection, backoff: Backoff, contested: bool) -> tuple[str, float]:
        """One connection: subscribe, say online, publish the queue until it closes; returns why and after how long."""
        loop = asyncio.get_running_loop()
        await self._subscribe(connection)
        await connection.publish(self._topics.status, self._status("online"), qos=STATUS_QOS, retain=True)
        self.stats.connects += 1
        self._connection = connection
        self.connected.set()
        log.info("mqtt.connected", url=redact_url(self._config.url))
        if not contested:  # a connection taken over again and again must not reconnect at once each time
            backoff.reset()
        # After an outage devices re-subscribe too: what they were owed waits for them a moment.
        hold_s = self._config.resume_delay_s if len(self._queue) and self.stats.connects > 1 else 0.0
        started = loop.time()
        sender = asyncio.create_task(self._send(connection, hold_s))
        try:
            reason = await connection.wait_closed()
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, LinkError):
                await sender
            self._queue.requeue(self._inflight.values())
            self._inflight.clear()
        return reason, loop.time() - started

    async def _subscribe(self, connection: MqttConnection) -> None:
        if self._all_audio:
            await connection.subscribe(self._topics.audio_filter, qos=self._audio_qos)
        await connection.subscribe(self._topics.control_filter, qos=1)
        for extra in self._extra_subscriptions:
            await connection.subscribe(extra, qos=1)
        for topic_filter, qos in list(self._chosen.items()):
            await connection.subscribe(topic_filter, qos=qos)

    async def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        """Add a filter now (once its SUBACK came) and after every reconnect; while disconnected, from the next."""
        self._chosen[topic_filter] = qos
        connection = self._connection
        if connection is not None:
            with contextlib.suppress(LinkError):  # lost meanwhile: the reconnect subscribes it
                await connection.subscribe(topic_filter, qos=qos)

    async def unsubscribe(self, topic_filter: str) -> None:
        """Drop a filter added with :meth:`subscribe`."""
        if self._chosen.pop(topic_filter, None) is None:
            return
        connection = self._connection
        if connection is not None:
            with contextlib.suppress(LinkError):
                await connection.unsubscribe(topic_filter)

    async def _send(self, connection: MqttConnection, hold_s: float) -> None:
        """The queue's one consumer, in priority order; at most ``publish_inflight`` messages are unfinished
        (QoS 0 not yet written to the socket, QoS 1 not yet acknowledged), so paho buffers no more than that."""
        if hold_s:
            await asyncio.sleep(hold_s)
        window = asyncio.Semaphore(min(self._config.publish_inflight, connection.receive_maximum))
        while True:
            await window.acquire()
            item = await self._queue.get()
            try:
                ack = connection.send(item.topic, item.payload, item.qos, item.retain)
            except LinkError:  # the connection is going: the item waits for the next one
                self._queue.requeue([item])
                await connection.wait_closed()
                return
            token = next(self._tokens)
            self._inflight[token] = item
            ack.add_done_callback(partial(self._acknowledged, token, window))

    def _acknowledged(self, token: int, window: asyncio.Semaphore, ack: asyncio.Future[None]) -> None:
        window.release()
        if ack.cancelled() or ack.exception() is not None:
            return  # lost with the connection: still in _inflight, requeued by _serve
        if self._inflight.pop(token, None) is not None:
            self.stats.published += 1

    def _on_retained(self, topic: str, payload: bytes) -> None:
        if topic in self._extra_subscriptions:  # Home Assistant's status: retained or not, it is current
            self._on_message(topic, payload)
            return
        self.stats.retained_ignored += 1
        if topic not in self._retained_logged and len(self._retained_logged) < RETAINED_LOG_LIMIT:
            self._retained_logged.add(topic)
            log.warning(
                "mqtt.retained_ignored",
                topic=topic,
                hint="a retained message on a device topic is replayed on every connect; clear it by "
                "publishing an empty retained message to that topic",
            )

    def post(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        priority: Priority = Priority.OWED,
        key: str | None = None,
    ) -> None:
        """Queue one message (never waits); ``key`` (default: the topic) is whose order it keeps."""
        self._queue.put(topic, payload, qos, retain, priority, topic if key is None else key)

    async def flush(self) -> None:
        """Until everything queued is published and acknowledged (bound it with a timeout)."""
        while len(self._queue) or self._inflight:  # noqa: ASYNC110 - a drain at shutdown, polled
            await asyncio.sleep(FLUSH_POLL_S)

    async def say_offline(self, flush_s: float = 1.5) -> None:
        """Graceful stop: what is owed first (for up to ``flush_s``), then the status (the will is for unclean ends)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(flush_s):
                await self.flush()
        connection = self._connection
        if connection is not None:
            await connection.publish(self._topics.status, self._status("offline"), qos=STATUS_QOS, retain=True)
