"""MQTT 5 through paho-mqtt, driven by the asyncio loop through paho's documented external-loop API.

paho-mqtt documents how to run its client on someone else's event loop: the socket callbacks
(``on_socket_open``, ``on_socket_close``, ``on_socket_register_write``,
``on_socket_unregister_write``) hand the socket over, and ``loop_read``, ``loop_write`` and
``loop_misc`` do the protocol work when it is readable, writable, or once a second. Each PUBLISH
goes to the handler synchronously as paho decodes it: no queue, no task per message. MQTT 3.1.1,
the default and the hot path, has its own engine (:mod:`service.link.mqtt311`); paho stays for
MQTT 5's properties and reason codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any

from paho.mqtt import client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from service.link.client import BrokerAddress, tls_context
from service.link.options import NO_RECEIVE_MAXIMUM, ConnectOptions, LinkError, MessageHandler


class PahoConnection:
    """``async with PahoConnection(options, handler) as conn``: connected until the block ends or the broker goes.

    A clean session on either version (3.1.1 clean session; 5 clean start with expiry 0), so the
    broker keeps nothing for a bridge that is gone. Retained messages (what a broker replays on
    every subscribe) go to ``on_retained`` when given, else to ``on_message`` like any other.
    """

    def __init__(
        self, options: ConnectOptions, on_message: MessageHandler, on_retained: MessageHandler | None = None
    ) -> None:
        self._options = options
        self._on_message = on_message
        self._on_retained = on_retained
        self.receive_maximum = NO_RECEIVE_MAXIMUM
        """QoS 1 publishes the broker accepts in flight (its CONNACK's Receive Maximum on MQTT 5)."""
        self._loop = asyncio.get_running_loop()
        self._client = self._paho_client()
        self._connected: asyncio.Future[None] = self._loop.create_future()
        self._closed: asyncio.Future[str] = self._loop.create_future()
        self._acks: dict[int, asyncio.Future[None]] = {}
        self._misc: asyncio.Task[None] | None = None

    def _paho_client(self) -> paho.Client:
        o = self._options
        v5 = o.protocol == 5
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=o.identifier,
            clean_session=None if v5 else True,
            protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
            reconnect_on_failure=False,
        )
        if o.username:
            client.username_pw_set(o.username, o.password or None)
        if BrokerAddress.parse(o.url).tls:
            client.tls_set_context(tls_context(o.ca_file))
        if o.will is not None:
            client.will_set(o.will.topic, o.will.payload, qos=o.will.qos, retain=o.will.retain)
        client.max_inflight_messages_set(0)  # no second queue in paho: the caller bounds what is in flight
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_ack
        client.on_subscribe = self._on_subscribe
        client.on_unsubscribe = self._on_unsubscribe
        client.on_message = self._deliver
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        return client

    # The connection ----------------------------------------------------------------------------

    async def __aenter__(self) -> PahoConnection:
        o = self._options
        address = BrokerAddress.parse(o.url)
        properties = None
        if o.protocol == 5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = 0
        connect = (address.host, address.port, o.keepalive_s)
        try:
            async with asyncio.timeout(o.timeout_s):
                # paho's connect() resolves and connects a blocking socket: off the loop.
                await self._loop.run_in_executor(None, lambda: self._client.connect(*connect, properties=properties))
                sock = self._client.socket()
                if isinstance(sock, socket.socket):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                await asyncio.shield(self._connected)
        except (OSError, TimeoutError, LinkError) as exc:
            self._abort()
            raise LinkError(f"connecting to {address.host}:{address.port}: {exc or type(exc).__name__}") from None
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if not self._closed.done():
            self._client.disconnect()
            with contextlib.suppress(TimeoutError, LinkError):
                async with asyncio.timeout(1):
                    await asyncio.shield(self._closed)
        self._abort()

    async def wait_closed(self) -> str:
        """Until the broker or the network ends the connection; returns why."""
        return await asyncio.shield(self._closed)

    def _abort(self) -> None:
        if self._misc is not None:
            self._misc.cancel()
        sock = self._client.socket()
        if sock is not None:
            self._forget(sock)
            with contextlib.suppress(OSError):
                sock.close()
        self._lost("closed")

    # Requests ----------------------------------------------------------------------------------

    async def subscribe(self, topic_filter: str, qos: int) -> None:
        result, mid = self._client.subscribe(topic_filter, qos=qos)
        await self._await_ack(result, mid)

    async def unsubscribe(self, topic_filter: str) -> None:
        result, mid = self._client.unsubscribe(topic_filter)
        await self._await_ack(result, mid)

    async def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        """QoS 0: once handed to the socket; QoS 1: once the broker's PUBACK came."""
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if qos == 0:
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                raise LinkError(paho.error_string(info.rc))
            return
        await self._await_ack(info.rc, info.mid)

    def send(self, topic: str, payload: bytes, qos: int, retain: bool) -> asyncio.Future[None]:
        """Hand one PUBLISH to paho without waiting; the future is done once it is through.

        Through means written to the socket (QoS 0) or acknowledged by the broker (QoS 1), so a
        caller that bounds its unfinished futures bounds paho's own output buffer too. The future
        fails with :class:`LinkError` when the connection is lost first; it has no timeout of its
        own (the keepalive notices a dead broker).
        """
        if self._closed.done():
            raise LinkError(f"connection lost: {self._closed.result()}")
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise LinkError(paho.error_string(info.rc))
        ack = self._acks[info.mid] = self._loop.create_future()
        ack.add_done_callback(lambda _: self._acks.pop(info.mid, None))
        return ack

    async def _await_ack(self, result: MQTTErrorCode, mid: int | None) -> None:
        if result != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            raise LinkError(paho.error_string(result))
        if self._closed.done():
            raise LinkError(f"connection lost: {self._closed.result()}")
        ack = self._acks[mid] = self._loop.create_future()
        try:
            async with asyncio.timeout(self._options.timeout_s):
                await ack
        except TimeoutError:
            raise LinkError("operation timed out") from None
        finally:
            self._acks.pop(mid, None)

    # paho's callbacks (on the loop, except socket open/register during connect) ---------------

    def _deliver(self, _client: paho.Client, _userdata: Any, message: paho.MQTTMessage) -> None:
        payload = message.payload  # bytes as paho 2.x decodes a PUBLISH (typed bytes | bytearray)
        handler = self._on_retained if message.retain and self._on_retained is not None else self._on_message
        handler(message.topic, payload if type(payload) is bytes else bytes(payload))

    def _on_connect(self, _c: paho.Client, _u: Any, _flags: Any, reason: ReasonCode, properties: Any) -> None:
        if self._connected.done():
            return
        self.receive_maximum = getattr(properties, "ReceiveMaximum", NO_RECEIVE_MAXIMUM)
        if reason.is_failure:
            self._connected.set_exception(LinkError(f"the broker refused the connection: {reason}"))
        else:
            self._connected.set_result(None)

    def _on_disconnect(self, _c: paho.Client, _u: Any, _flags: Any, reason: ReasonCode, _p: Any) -> None:
        self._lost(str(reason))

    def _on_ack(self, _c: paho.Client, _u: Any, mid: int, _reason: Any, _p: Any) -> None:
        ack = self._acks.get(mid)  # QoS 0: written to the socket; QoS 1: the PUBACK came
        if ack is not None and not ack.done():
            ack.set_result(None)

    def _on_subscribe(self, client: paho.Client, userdata: Any, mid: int, reasons: Any, properties: Any) -> None:
        refused = [r for r in reasons if r.is_failure]
        ack = self._acks.get(mid)
        if ack is not None and not ack.done():
            if refused:
                ack.set_exception(LinkError(f"subscription refused: {refused[0]}"))
            else:
                ack.set_result(None)

    def _on_unsubscribe(self, _c: paho.Client, _u: Any, mid: int, _reasons: Any, _p: Any) -> None:
        ack = self._acks.get(mid)
        if ack is not None and not ack.done():
            ack.set_result(None)

    def _lost(self, reason: str) -> None:
        if not self._closed.done():
            self._closed.set_result(reason)
        if not self._connected.done():
            self._connected.set_exception(LinkError(reason))
            self._connected.exception()  # retrieved: nobody may be waiting any more
        for ack in self._acks.values():
            if not ack.done():
                ack.set_exception(LinkError(f"connection lost: {reason}"))

    def _on_socket_open(self, _c: paho.Client, _u: Any, sock: Any) -> None:
        self._loop.call_soon_threadsafe(self._watch, sock)

    def _watch(self, sock: Any) -> None:
        self._loop.add_reader(sock, self._readable)
        self._misc = self._loop.create_task(self._housekeeping())

    def _on_socket_close(self, _c: paho.Client, _u: Any, sock: Any) -> None:
        self._forget(sock)

    def _on_register_write(self, _c: paho.Client, _u: Any, sock: Any) -> None:
        self._loop.call_soon_threadsafe(self._loop.add_writer, sock, self._writable)

    def _on_unregister_write(self, _c: paho.Client, _u: Any, sock: Any) -> None:
        self._loop.remove_writer(sock)

    def _forget(self, sock: Any) -> None:
        if sock.fileno() >= 0:
            self._loop.remove_reader(sock)
            self._loop.remove_writer(sock)
        if self._misc is not None:
            self._misc.cancel()

    def _readable(self) -> None:
        try:
            self._client.loop_read()
            sock = self._client.socket()
            # TLS: decrypted bytes can wait in the SSL object with nothing left on the socket.
            while sock is not None and getattr(sock, "pending", lambda: 0)() > 0:
                self._client.loop_read()
        except OSError as exc:
            self._lost(f"read failed: {exc}")

    def _writable(self) -> None:
        try:
            self._client.loop_write()
        except OSError as exc:
            self._lost(f"write failed: {exc}")

    async def _housekeeping(self) -> None:
        """Keepalive pings and the broker's silence timeout: paho's ``loop_misc``, once a second."""
        while self._client.loop_misc() == MQTTErrorCode.MQTT_ERR_SUCCESS:  # noqa: ASYNC110 - a clock, not a wait
            await asyncio.sleep(1)
