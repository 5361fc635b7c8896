"""What every MQTT connection of the bridge shares, whichever engine speaks the protocol."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

MessageHandler = Callable[[str, bytes], None]
"""``(topic, payload)`` of one received PUBLISH; called on the event loop, must not block."""

NO_RECEIVE_MAXIMUM = 65535
"""MQTT 5's default Receive Maximum (QoS 1 publishes in flight to the broker), and 3.1.1's none."""


class LinkError(Exception):
    """The connection failed, was refused, or was lost; what was in flight did not complete."""


@dataclass(frozen=True, slots=True)
class LastWill:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True, slots=True)
class ConnectOptions:
    url: str
    identifier: str
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    protocol: Literal[3, 5] = 3
    keepalive_s: int = 30
    will: LastWill | None = None
    timeout_s: float = 10.0
    """Connect (TCP, TLS and CONNACK), each SUBACK and each PUBACK."""
