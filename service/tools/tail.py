"""``echokit-bridge tail``: a live view of what the bridge tells every device, and of its status.

Subscribes ``<prefix>/+/out/#`` (or one device's ``out/#``) and ``<prefix>/status`` with MQTT
3.1.1 and prints one line per message::

    14:02:11.348  bridge        -         bridge online (version 0.1.0, instance 3f9a1c2e, protocol 1)
    14:02:15.120  a1b2c3d4e5f6  9e3779b9  listening (server_vad, 16000 Hz)
    14:02:15.871  a1b2c3d4e5f6  9e3779b9  speech started at 736 ms

(session ids in hex), or with ``--json`` the message's own JSON object with ``time``, ``device``
(``null`` for the status) and ``topic`` added, one per line. A lost broker is reconnected; the
status is printed when it changes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import aiomqtt

from firmware_protocol import ProtocolError, decode_bridge_message, is_valid_device_id
from service.link.backoff import Backoff
from service.link.client import BrokerAddress, mqtt_client
from service.redact import redact_url
from service.tools.describe import describe

Write = Callable[[str], None]


class Formatter:
    """Turns ``(topic, payload)`` into a line, or ``None`` for what is not shown."""

    def __init__(self, prefix: str, *, as_json: bool) -> None:
        self._head = prefix + "/"
        self._status = prefix + "/status"
        self._as_json = as_json
        self._last_status: bytes | None = None

    def line(self, topic: str, payload: bytes, now: datetime | None = None) -> str | None:
        now = now or datetime.now(UTC)
        if topic == self._status:
            if not payload or payload == self._last_status:  # cleared, or the same again after a reconnect
                return None
            self._last_status = payload
            device = None
        else:
            device, _, kind = topic.removeprefix(self._head).partition("/")
            if not kind.startswith("out/"):
                return None
        return self._json(now, device, topic, payload) if self._as_json else self._text(now, device, topic, payload)

    def _json(self, now: datetime, device: str | None, topic: str, payload: bytes) -> str:
        record: dict[str, Any] = {"time": now.isoformat(timespec="milliseconds"), "device": device, "topic": topic}
        try:
            message = json.loads(payload)
        except ValueError:
            message = {"error": "not JSON", "payload": payload[:200].decode("utf-8", "replace")}
        if isinstance(message, dict):
            record.update((k, v) for k, v in message.items() if k not in record)
        else:
            record["payload"] = message
        return json.dumps(record, ensure_ascii=False, separators=(",", ":"))

    def _text(self, now: datetime, device: str | None, topic: str, payload: bytes) -> str:
        stamp = now.astimezone().strftime("%H:%M:%S.%f")[:-3]
        try:
            message = decode_bridge_message(payload)
        except ProtocolError as exc:
            what = f"undecodable on {topic}: {exc} ({payload[:80]!r})"
            return f"{stamp}  {device or 'bridge':<12}  {'':<8}  {what}"
        session = getattr(message, "session", None)
        short = f"{session:08x}" if isinstance(session, int) else "-"
        return f"{stamp}  {device or 'bridge':<12}  {short:<8}  {describe(message)}"


FIRST_RETRY_S = 1.0
MAX_RETRY_S = 30.0


async def tail(
    broker: str,
    prefix: str = "echokit",
    *,
    device: str | None = None,
    as_json: bool = False,
    username: str | None = None,
    password: str | None = None,
    ca_file: str | None = None,
    write: Write = print,
    on_subscribed: Callable[[], None] | None = None,
) -> None:
    """Print until cancelled; a broker lost after the first connection is reconnected with backoff."""
    formatter = Formatter(prefix, as_json=as_json)
    device_filter = f"{prefix}/{device or '+'}/out/#"
    connected_once = False
    backoff = Backoff(FIRST_RETRY_S, MAX_RETRY_S, jitter="half")
    while True:
        client = mqtt_client(
            broker,
            identifier=f"echokit-tail-{uuid.uuid4().hex[:8]}",
            username=username,
            password=password,
            ca_file=ca_file,
        )
        try:
            async with client:
                await client.subscribe(device_filter, qos=1)
                await client.subscribe(f"{prefix}/status", qos=1)
                if connected_once:
                    print("echokit-bridge tail: reconnected", file=sys.stderr, flush=True)
                connected_once = True
                backoff.reset()
                if on_subscribed:
                    on_subscribed()
                async for message in client.messages:
                    payload = message.payload
                    if isinstance(payload, bytes | bytearray):
                        line = formatter.line(message.topic.value, bytes(payload))
                        if line is not None:
                            write(line)
        except aiomqtt.MqttError as exc:
            if not connected_once:
                raise
            print(f"echokit-bridge tail: lost the broker ({exc}); reconnecting", file=sys.stderr, flush=True)
        await backoff.sleep()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--broker", required=True, help="mqtt://HOST[:PORT] or mqtts://HOST[:PORT]")
    parser.add_argument("--prefix", default="echokit", help="the bridge's mqtt.topic_prefix (default: echokit)")
    parser.add_argument("--device", help="only this device")
    parser.add_argument("--json", action="store_true", help="one JSON object per line, with device and topic")
    parser.add_argument("--username")
    parser.add_argument("--ca-file", help="CA certificate(s) to verify an mqtts:// broker (default: the system's)")
    parser.add_argument("--password", help="default: $MQTT_PASSWORD")


def run(args: argparse.Namespace) -> int:
    if args.device is not None and not is_valid_device_id(args.device):
        print(f"echokit-bridge tail: {args.device!r} is not a valid device id", file=sys.stderr)
        return 2
    try:
        BrokerAddress.parse(args.broker)
    except ValueError as exc:
        print(f"echokit-bridge tail: {exc}", file=sys.stderr)
        return 2

    def write(line: str) -> None:
        print(line, flush=True)

    async def main() -> None:
        task = asyncio.create_task(
            tail(
                args.broker,
                args.prefix,
                device=args.device,
                as_json=args.json,
                username=args.username,
                password=args.password or os.environ.get("MQTT_PASSWORD") or None,
                ca_file=args.ca_file,
                write=write,
            )
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await task

    try:
        asyncio.run(main())
    except aiomqtt.MqttError as exc:
        print(f"echokit-bridge tail: broker {redact_url(args.broker)}: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # e.g. piped into head
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # quiet the interpreter's last flush
        return 0
    return 0
