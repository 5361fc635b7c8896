"""MQTT 3.1.1 as an ``asyncio.Protocol``: the bridge's receive hot path, parsed where it lands.

Every audio frame of every device is one PUBLISH, so what a client does per message is the
bridge's floor. Here ``data_received`` walks the bytes the loop read and hands each PUBLISH's
``(topic, payload)`` to the handler at once: no message object, no queue, no task, one slice for
the payload and one decode for the topic (``bench/mqtt_receive.py`` measures it against paho,
gmqtt and pymosquitto). Only what the bridge uses is spoken: CONNECT with clean session, will
and credentials; PUBLISH at QoS 0 and 1 both ways (PUBACK sent and awaited); SUBSCRIBE and
UNSUBSCRIBE with their acks; PINGREQ; DISCONNECT. Subscriptions are at most QoS 1, so the broker
never sends QoS 2.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import struct

from service.link.client import BrokerAddress, tls_context
from service.link.options import NO_RECEIVE_MAXIMUM, ConnectOptions, LinkError, MessageHandler

REFUSED = {
    1: "unacceptable protocol version",
    2: "identifier rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorised",
}
"""CONNACK return codes (MQTT 3.1.1 §3.2.2.3)."""

PINGREQ = b"\xc0\x00"
DISCONNECT = b"\xe0\x00"
SUBACK_FAILURE = 0x80
MAX_PACKET_ID = 65535
_PUBACK = b"\x40\x02"
_PACKET_ID = struct.Struct(">H")


class ProtocolViolation(Exception):
    """The broker sent something that is not MQTT 3.1.1."""


def remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        n, byte = divmod(n, 128)
        out.append(byte | 0x80 if n else byte)
        if not n:
            return bytes(out)


def field(data: bytes) -> bytes:
    """A length-prefixed string or binary field."""
    return _PACKET_ID.pack(len(data)) + data


def connect_packet(options: ConnectOptions) -> bytes:
    flags = 0x02  # clean session: the broker keeps nothing for a bridge that is gone
    payload = field(options.identifier.encode())
    if options.will is not None:
        will = options.will
        flags |= 0x04 | will.qos << 3 | (0x20 if will.retain else 0)
        payload += field(will.topic.encode()) + field(will.payload)
    if options.username:
        flags |= 0x80
        payload += field(options.username.encode())
        if options.password:
            flags |= 0x40
            payload += field(options.password.encode())
    body = field(b"MQTT") + bytes([4, flags]) + _PACKET_ID.pack(options.keepalive_s) + payload
    return b"\x10" + remaining_length(len(body)) + body


def publish_packet(topic: str, payload: bytes, qos: int, retain: bool, packet_id: int) -> bytes:
    head = field(topic.encode()) + (_PACKET_ID.pack(packet_id) if qos else b"")
    first = 0x30 | qos << 1 | (1 if retain else 0)
    return bytes([first]) + remaining_length(len(head) + len(payload)) + head + payload


def subscribe_packet(packet_id: int, topic_filter: str, qos: int) -> bytes:
    body = _PACKET_ID.pack(packet_id) + field(topic_filter.encode()) + bytes([qos])
    return b"\x82" + remaining_length(len(body)) + body


def unsubscribe_packet(packet_id: int, topic_filter: str) -> bytes:
    body = _PACKET_ID.pack(packet_id) + field(topic_filter.encode())
    return b"\xa2" + remaining_length(len(body)) + body


def long_length(data: bytes, at: int) -> tuple[int, int]:
    """A remaining length of three or four bytes from ``at``: (value, first body byte), or (-1, 0) if incomplete."""
    value = 0
    for k in range(4):
        if at + k >= len(data):
            return -1, 0
        byte = data[at + k]
        value |= (byte & 0x7F) << (7 * k)
        if not byte & 0x80:
            return value, at + k + 1
    raise ProtocolViolation("a remaining length longer than four bytes")


class Mqtt311Connection(asyncio.Protocol):
    """``async with Mqtt311Connection(options, handler) as conn``: connected until the block ends or the broker goes.

    Retained messages (what a broker replays on every subscribe) go to ``on_retained`` when
    given, else to ``on_message`` like any other. A handler that raises is reported to the
    loop's exception handler and the stream goes on.
    """

    receive_maximum = NO_RECEIVE_MAXIMUM
    """3.1.1 has no Receive Maximum: the caller's own window bounds QoS 1 in flight."""

    def __init__(
        self, options: ConnectOptions, on_message: MessageHandler, on_retained: MessageHandler | None = None
    ) -> None:
        self._options = options
        self._on_message = on_message
        self._on_retained = on_retained or on_message
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._rest = b""
        """The start of a packet the last read cut off."""
        self._heard = False
        """Bytes came since the last ping: the broker is alive even if its PINGRESP waits behind them."""
        self._connected: asyncio.Future[None] = self._loop.create_future()
        self._closed: asyncio.Future[str] = self._loop.create_future()
        self._acks: dict[int, asyncio.Future[None]] = {}
        self._ids = itertools.cycle(range(1, MAX_PACKET_ID + 1))
        self._paused = False
        self._written: list[asyncio.Future[None]] = []
        """QoS 0 sends waiting for the transport's buffer to drain below its high-water mark."""
        self._keepalive: asyncio.Task[None] | None = None

    # The connection ----------------------------------------------------------------------------

    async def __aenter__(self) -> Mqtt311Connection:
        o = self._options
        address = BrokerAddress.parse(o.url)
        tls = tls_context(o.ca_file) if address.tls else None
        try:
            async with asyncio.timeout(o.timeout_s):
                await self._loop.create_connection(lambda: self, address.host, address.port, ssl=tls)
                await asyncio.shield(self._connected)
        except (OSError, TimeoutError, LinkError) as exc:
            self._abort()
            raise LinkError(f"connecting to {address.host}:{address.port}: {exc or type(exc).__name__}") from None
        if o.keepalive_s > 0:
            self._keepalive = self._loop.create_task(self._ping())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if not self._closed.done() and self._transport is not None:
            self._transport.write(DISCONNECT)
            self._transport.close()  # after the buffer is written
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1):
                    await asyncio.shield(self._closed)
        self._abort()

    async def wait_closed(self) -> str:
        """Until the broker or the network ends the connection; returns why."""
        return await asyncio.shield(self._closed)

    def _abort(self) -> None:
        if self._keepalive is not None:
            self._keepalive.cancel()
        if self._transport is not None:
            self._transport.abort()
        self._lost("closed")

    async def _ping(self) -> None:
        """A PINGREQ every keepalive; a broker that sent nothing for a whole keepalive since the last one is gone."""
        while True:
            await asyncio.sleep(self._options.keepalive_s)
            if not self._heard:
                self._lost("the broker did not answer within the keepalive")
                if self._transport is not None:
                    self._transport.abort()
                return
            self._heard = False
            self._write(PINGREQ)

    # Requests ----------------------------------------------------------------------------------

    async def subscribe(self, topic_filter: str, qos: int) -> None:
        packet_id = self._next_id()
        self._write(subscribe_packet(packet_id, topic_filter, qos))
        await self._await_ack(packet_id)

    async def unsubscribe(self, topic_filter: str) -> None:
        packet_id = self._next_id()
        self._write(unsubscribe_packet(packet_id, topic_filter))
        await self._await_ack(packet_id)

    async def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        """QoS 0: once handed to the transport; QoS 1: once the broker's PUBACK came."""
        if qos == 0:
            self._write(publish_packet(topic, payload, 0, retain, 0))
            return
        packet_id = self._next_id()
        self._write(publish_packet(topic, payload, qos, retain, packet_id))
        await self._await_ack(packet_id)

    def send(self, topic: str, payload: bytes, qos: int, retain: bool) -> asyncio.Future[None]:
        """Hand one PUBLISH to the transport without waiting; the future is done once it is through.

        Through means in a transport buffer below its high-water mark (QoS 0) or acknowledged by
        the broker (QoS 1), so a caller that bounds its unfinished futures bounds the buffer too.
        The future fails with :class:`LinkError` when the connection is lost first; it has no
        timeout of its own (the keepalive notices a dead broker).
        """
        packet_id = self._next_id() if qos else 0
        self._write(publish_packet(topic, payload, qos, retain, packet_id))
        done = self._loop.create_future()
        if qos:
            self._acks[packet_id] = done
        elif self._paused:
            self._written.append(done)
        else:
            done.set_result(None)
        return done

    def _write(self, packet: bytes) -> None:
        if self._closed.done() or self._transport is None:
            raise LinkError(f"connection lost: {self._closed.result() if self._closed.done() else 'not connected'}")
        self._transport.write(packet)

    def _next_id(self) -> int:
        for packet_id in self._ids:  # ids still awaiting their ack are skipped
            if packet_id not in self._acks:
                return packet_id
        raise AssertionError("unreachable: itertools.cycle never ends")

    async def _await_ack(self, packet_id: int) -> None:
        ack = self._acks[packet_id] = self._loop.create_future()
        try:
            async with asyncio.timeout(self._options.timeout_s):
                await ack
        except TimeoutError:
            raise LinkError("operation timed out") from None
        finally:
            self._acks.pop(packet_id, None)

    # asyncio.Protocol --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        transport.write(connect_packet(self._options))

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(f"connection lost: {exc}" if exc else "the broker closed the connection")

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        written, self._written = self._written, []
        for done in written:
            if not done.done():
                done.set_result(None)

    def data_received(self, data: bytes) -> None:
        """Every whole packet in what was read; a packet cut off waits in ``_rest`` for the next read."""
        if self._rest:
            data = self._rest + data
        self._heard = True
        size = len(data)
        at = 0
        try:
            while size - at >= 2:
                first = data[at]
                length = data[at + 1]
                start = at + 2
                if length & 0x80:  # an audio frame's PUBLISH: two length bytes
                    if size - at < 3:
                        break
                    second = data[start]
                    if second & 0x80:
                        length, start = long_length(data, at + 1)
                        if length < 0:
                            break
                    else:
                        length = (length & 0x7F) | second << 7
                        start += 1
                end = start + length
                if end > size:
                    break
                if first & 0xF0 == 0x30:
                    self._publish(first, data, start, end)
                else:
                    self._control(first, data[start:end])
                at = end
        except (ProtocolViolation, IndexError, UnicodeDecodeError) as exc:
            self._lost(f"protocol error: {exc}")
            if self._transport is not None:
                self._transport.abort()
            return
        self._rest = data[at:] if at < size else b""

    def _publish(self, first: int, data: bytes, start: int, end: int) -> None:
        body = start + 2 + (data[start] << 8 | data[start + 1])
        topic = data[start + 2 : body].decode()
        if first & 0x06:  # QoS 1: acknowledge it now, the handler takes it synchronously
            if self._transport is not None:
                self._transport.write(_PUBACK + data[body : body + 2])
            body += 2
        try:
            (self._on_retained if first & 0x01 else self._on_message)(topic, data[body:end])
        except Exception as exc:
            self._loop.call_exception_handler({"message": "MQTT message handler failed", "exception": exc})

    def _control(self, first: int, body: bytes) -> None:
        kind = first & 0xF0
        if kind == 0x20:  # CONNACK
            if not self._connected.done():
                code = body[1]
                if code:
                    reason = REFUSED.get(code, f"return code {code}")
                    self._connected.set_exception(LinkError(f"the broker refused the connection: {reason}"))
                else:
                    self._connected.set_result(None)
        elif kind in (0x40, 0x90, 0xB0):  # PUBACK, SUBACK, UNSUBACK
            ack = self._acks.pop(body[0] << 8 | body[1], None)
            if ack is None or ack.done():
                return
            if kind == 0x90 and SUBACK_FAILURE in body[2:]:
                ack.set_exception(LinkError("subscription refused: the broker granted no QoS"))
            else:
                ack.set_result(None)
        # PINGRESP needs nothing: any bytes heard count

    def _lost(self, reason: str) -> None:
        if not self._closed.done():
            self._closed.set_result(reason)
        if not self._connected.done():
            self._connected.set_exception(LinkError(reason))
            self._connected.exception()  # retrieved: nobody may be waiting any more
        for ack in [*self._acks.values(), *self._written]:
            if not ack.done():
                ack.set_exception(LinkError(f"connection lost: {reason}"))
        self._written.clear()
