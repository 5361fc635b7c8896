"""Topic layout: ``<prefix>/<device>/in/{audio,control}`` and ``<prefix>/<device>/out/<kind>``.

Devices publish under ``in/`` and subscribe to ``out/#``; that split lets a broker ACL
confine each device to its own subtree with two pattern lines.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

DEFAULT_PREFIX = "echokit"
_DEVICE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def is_valid_device_id(device_id: str) -> bool:
    """EchoKit ids are 12 lower-case MAC hex digits; any ``[A-Za-z0-9_-]{1,64}`` is accepted."""
    return _DEVICE_ID.fullmatch(device_id) is not None


class TopicKind(enum.StrEnum):
    AUDIO = "in/audio"
    CONTROL = "in/control"
    SESSION = "out/session"
    VAD = "out/vad"
    TRANSCRIPT = "out/transcript"
    ERROR = "out/error"


@dataclass(frozen=True, slots=True)
class Topics:
    """Builds and parses topic names for one prefix."""

    prefix: str = DEFAULT_PREFIX

    def device(self, device_id: str, kind: TopicKind) -> str:
        return f"{self.prefix}/{device_id}/{kind.value}"

    @property
    def status(self) -> str:
        """Retained bridge status; two levels, so it never collides with a device topic."""
        return f"{self.prefix}/status"

    @property
    def audio_filter(self) -> str:
        return f"{self.prefix}/+/{TopicKind.AUDIO.value}"

    @property
    def control_filter(self) -> str:
        return f"{self.prefix}/+/{TopicKind.CONTROL.value}"

    def parse(self, topic: str) -> tuple[str, TopicKind] | None:
        """Return ``(device_id, kind)`` for a device topic under this prefix, else ``None``.

        The device id is returned even when it is not a valid id, so the caller can
        decide how to report it; the kind must be one of ours.
        """
        head = self.prefix + "/"
        if not topic.startswith(head):
            return None
        device_id, sep, rest = topic[len(head) :].partition("/")
        if not sep:
            return None
        try:
            return device_id, TopicKind(rest)
        except ValueError:
            return None
