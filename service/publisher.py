"""Bridge → device messages: the topic for each message type, QoS, and the size cap.

ESP-MQTT's default buffer is 1024 bytes; a transcript longer than
``max_device_message_bytes`` is cut on a character boundary and marked ``truncated``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import msgspec

from firmware_protocol import (
    BridgeMessage,
    Error,
    Listening,
    SpeechEnded,
    SpeechStarted,
    TopicKind,
    Topics,
    Transcript,
    encode_message,
)

PublishFn = Callable[..., Awaitable[None]]

_KIND: dict[type, TopicKind] = {
    Listening: TopicKind.SESSION,
    SpeechStarted: TopicKind.VAD,
    SpeechEnded: TopicKind.VAD,
    Transcript: TopicKind.TRANSCRIPT,
    Error: TopicKind.ERROR,
}


class DevicePublisher:
    def __init__(self, topics: Topics, publish: PublishFn, max_bytes: int) -> None:
        self._topics = topics
        self._publish = publish
        self._max_bytes = max_bytes

    async def send(self, device_id: str, message: BridgeMessage) -> None:
        payload = fit(message, self._max_bytes)
        partial = isinstance(message, Transcript) and not message.final
        topic = self._topics.device(device_id, _KIND[type(message)])
        await self._publish(topic, payload, qos=0 if partial else 1)


def fit(message: BridgeMessage, max_bytes: int) -> bytes:
    """Encode; shorten a transcript's text until the message fits in ``max_bytes``."""
    payload = encode_message(message)
    if len(payload) <= max_bytes or not isinstance(message, Transcript):
        return payload
    text = message.text.encode("utf-8")
    while len(payload) > max_bytes and text:
        text = text[: max(0, len(text) - (len(payload) - max_bytes) - 1)]
        shortened = text.decode("utf-8", errors="ignore")
        payload = encode_message(msgspec.structs.replace(message, text=shortened, truncated=True))
    return payload
