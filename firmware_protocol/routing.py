"""Which topic and QoS each bridge message is published on: PROTOCOL.md §3 as data.

Partial transcripts go at QoS 0 (a lost partial is replaced by the next); every other
message a device acts on goes at QoS 1. The bridge's status is retained at QoS 1.
"""

from __future__ import annotations

from dataclasses import dataclass

from firmware_protocol.messages import (
    BridgeMessage,
    Configured,
    Error,
    Listening,
    SpeechEnded,
    SpeechStarted,
    Transcript,
)
from firmware_protocol.topics import TopicKind

STATUS_QOS = 1
"""``<prefix>/status`` (retained) and the bridge's last will."""

DEVICE_TOPIC_KINDS: dict[type[BridgeMessage], TopicKind] = {
    Listening: TopicKind.SESSION,
    Configured: TopicKind.SESSION,
    SpeechStarted: TopicKind.VAD,
    SpeechEnded: TopicKind.VAD,
    Transcript: TopicKind.TRANSCRIPT,
    Error: TopicKind.ERROR,
}
"""Bridge → device messages by type; :class:`~firmware_protocol.BridgeStatus` is not one (it has its own topic)."""


@dataclass(frozen=True, slots=True)
class Route:
    kind: TopicKind
    qos: int


def device_route(message: BridgeMessage) -> Route:
    """The ``out/`` topic kind and QoS of a bridge → device message; ``KeyError`` for a status."""
    partial = isinstance(message, Transcript) and not message.final
    return Route(DEVICE_TOPIC_KINDS[type(message)], 0 if partial else 1)
