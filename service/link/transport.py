"""One MQTT connection on the asyncio loop; each received PUBLISH handed to one handler as it is read.

Two engines behind one interface: MQTT 3.1.1 (the default, and every audio frame's path) is our
own ``asyncio.Protocol`` (:mod:`service.link.mqtt311`), which parses a PUBLISH where the loop read
it; MQTT 5 goes through paho-mqtt on the same loop (:mod:`service.link.paho_engine`) for its
properties and reason codes. Either way there is no queue and no task per message: the backlog
stays in the socket and at the broker.
"""

from __future__ import annotations

import asyncio

from service.link.mqtt311 import Mqtt311Connection
from service.link.options import NO_RECEIVE_MAXIMUM, ConnectOptions, LastWill, LinkError, MessageHandler
from service.link.paho_engine import PahoConnection

__all__ = ["NO_RECEIVE_MAXIMUM", "ConnectOptions", "LastWill", "LinkError", "MessageHandler", "MqttConnection"]


class MqttConnection:
    """``async with MqttConnection(options, handler) as conn``: connected until the block ends or the broker goes.

    A clean session on either version (3.1.1 clean session; 5 clean start with expiry 0), so the
    broker keeps nothing for a bridge that is gone. Retained messages (what a broker replays on
    every subscribe) go to ``on_retained`` when given, else to ``on_message`` like any other.
    """

    def __init__(
        self, options: ConnectOptions, on_message: MessageHandler, on_retained: MessageHandler | None = None
    ) -> None:
        engine = Mqtt311Connection if options.protocol == 3 else PahoConnection
        self._engine: Mqtt311Connection | PahoConnection = engine(options, on_message, on_retained)

    @property
    def receive_maximum(self) -> int:
        """QoS 1 publishes the broker accepts in flight (its CONNACK's Receive Maximum on MQTT 5)."""
        return self._engine.receive_maximum

    async def __aenter__(self) -> MqttConnection:
        await self._engine.__aenter__()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._engine.__aexit__(*exc_info)

    async def wait_closed(self) -> str:
        """Until the broker or the network ends the connection; returns why."""
        return await self._engine.wait_closed()

    async def subscribe(self, topic_filter: str, qos: int) -> None:
        await self._engine.subscribe(topic_filter, qos)

    async def unsubscribe(self, topic_filter: str) -> None:
        await self._engine.unsubscribe(topic_filter)

    async def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        """QoS 0: once handed to the socket; QoS 1: once the broker's PUBACK came."""
        await self._engine.publish(topic, payload, qos=qos, retain=retain)

    def send(self, topic: str, payload: bytes, qos: int, retain: bool) -> asyncio.Future[None]:
        """Hand one PUBLISH over without waiting; the future is done once it is through.

        Through means written (QoS 0) or acknowledged by the broker (QoS 1), so a caller that
        bounds its unfinished futures bounds the output buffer too. The future fails with
        :class:`LinkError` when the connection is lost first; it has no timeout of its own (the
        keepalive notices a dead broker).
        """
        return self._engine.send(topic, payload, qos, retain)
