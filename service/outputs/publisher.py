"""Bridge → device messages on the topic and QoS the wire contract gives each type, within the size cap.

ESP-MQTT's default buffer (1024 bytes) holds a whole incoming PUBLISH packet; a bigger one
reaches the firmware in pieces. ``max_device_message_bytes`` caps the packet, so a long
transcript is cut on a character boundary (``truncated``) and an error's message shortened.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import msgspec

from firmware_protocol import (
    BridgeMessage,
    Configured,
    Error,
    Listening,
    SpeechEnded,
    Topics,
    Transcript,
    device_route,
    encode_message,
)
from service.link.outgoing import Priority

Observer = Callable[[str, BridgeMessage], None]
"""Told ``(device_id, message)`` of every bridge → device message before it is published; must not block."""


class Post(Protocol):
    """``MqttLink.post``: queue one message, never wait."""

    def __call__(self, topic: str, payload: bytes, *, qos: int, priority: Priority, key: str) -> None: ...


def priority(message: BridgeMessage) -> Priority:
    """What the device is owed goes first and is dropped last (the drop policy: README.md, link)."""
    if isinstance(message, Transcript) and message.final:
        return Priority.FINAL
    if isinstance(message, Error):
        return Priority.ERROR
    if isinstance(message, Listening | SpeechEnded | Configured):
        return Priority.OWED
    return Priority.OPTIONAL  # partial transcripts, speech_started


class DevicePublisher:
    def __init__(self, topics: Topics, post: Post, max_bytes: int) -> None:
        self._topics = topics
        self._post = post
        self._max_bytes = max_bytes
        self.observers: list[Observer] = []
        """E.g. Home Assistant discovery: sees the whole message (before :func:`fit` cuts it)."""

    def post(self, device_id: str, message: BridgeMessage) -> None:
        """Queue ``message`` for ``device_id`` on the link; a device's messages keep their order."""
        for observer in self.observers:
            observer(device_id, message)
        route = device_route(message)
        topic = self._topics.device(device_id, route.kind)
        payload = fit(message, self._max_bytes - packet_overhead(topic, route.qos))
        self._post(topic, payload, qos=route.qos, priority=priority(message), key=device_id)


def packet_overhead(topic: str, qos: int) -> int:
    """Bytes of an MQTT 3.1.1 PUBLISH around its payload: fixed header, topic, packet id."""
    return 1 + 2 + 2 + len(topic.encode("utf-8")) + (2 if qos else 0)


def fit(message: BridgeMessage, max_bytes: int) -> bytes:
    """Encode; shorten a transcript's text or an error's message until it fits in ``max_bytes``."""
    payload = encode_message(message)
    if isinstance(message, Transcript):
        field, value = "text", message.text
    elif isinstance(message, Error):
        field, value = "message", message.message
    else:
        return payload
    encoded = value.encode("utf-8")
    while len(payload) > max_bytes and encoded:
        encoded = encoded[: max(0, len(encoded) - (len(payload) - max_bytes) - 1)]
        changes: dict[str, object] = {field: encoded.decode("utf-8", errors="ignore")}
        if field == "text":
            changes["truncated"] = True
        payload = encode_message(msgspec.structs.replace(message, **changes))
    return payload
