"""Home Assistant MQTT discovery: every device that speaks appears as a Home Assistant device.

Opt-in (``[homeassistant] enabled = true``). When a device's first session starts, one retained
device-based discovery message goes to ``<discovery_prefix>/device/echokit_<id>/config``; it
declares four entities whose state lives under ``<prefix>/<id>/ha/``, never under the device's
``out/`` topics, so firmware with a 1 KB MQTT buffer never receives Home Assistant traffic:

| entity | platform | topic (under ``<prefix>/<id>/ha/``) | retained |
|---|---|---|---|
| last transcript | ``sensor``, state cut to 255 chars | ``transcript``, details in ``transcript/attributes`` | yes |
| transcript | ``event`` (``event_types: [transcript]``) | ``event`` | no: an event fires once |
| voice activity | ``binary_sensor``, ``device_class: sound`` | ``voice`` (``ON`` / ``OFF``) | yes |
| transcript latency | ``sensor``, diagnostic, ms | ``latency`` | yes |

Entities are available while the bridge's retained ``<prefix>/status`` says ``online``, so the
bridge's last will marks them unavailable. Home Assistant's birth message (``online`` on
``<discovery_prefix>/status``) makes the bridge announce every device it knows again.

The module is fed by :class:`~service.outputs.publisher.DevicePublisher` observers: it sees each bridge →
device message (a handful per utterance) and never touches the audio path.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import msgspec
import structlog

from firmware_protocol import (
    BridgeMessage,
    Error,
    Listening,
    SpeechEnded,
    SpeechStarted,
    Topics,
    Transcript,
    ends_session,
)
from service.config import HomeAssistantConfig

log = structlog.get_logger(__name__)

Post = Callable[..., None]
"""``MqttLink.post``: ``(topic, payload, *, qos, retain)``, queued at once (one topic's messages keep their order)."""

MAX_STATE_CHARS = 255
"""Home Assistant refuses longer sensor states (``MAX_LENGTH_STATE_STATE``) and shows ``unknown``."""
ORIGIN_NAME = "echokit-mqtt-bridge"
SUPPORT_URL = "https://github.com/second-state/echokit"
_MAC = re.compile(r"[0-9A-Fa-f]{12}")
_encode = msgspec.json.Encoder().encode


def sensor_state(text: str) -> str:
    """A transcript as a sensor state: at most 255 characters, an ellipsis marking a cut."""
    if len(text) <= MAX_STATE_CHARS:
        return text
    return text[: MAX_STATE_CHARS - 1] + "…"


def mac_of(device_id: str) -> str | None:
    """``aa:bb:cc:dd:ee:ff`` for an EchoKit id (its Wi-Fi MAC as 12 hex digits), else ``None``."""
    if not _MAC.fullmatch(device_id):
        return None
    low = device_id.lower()
    return ":".join(low[i : i + 2] for i in range(0, 12, 2))


class HomeAssistant:
    def __init__(self, config: HomeAssistantConfig, topics: Topics, post: Post, *, version: str) -> None:
        self._prefix = config.discovery_prefix
        self._topics = topics
        self._post = post
        self._version = version
        self._known: set[str] = set()
        self._voice_on: set[str] = set()

    def discovery_topic(self, device_id: str) -> str:
        return f"{self._prefix}/device/echokit_{device_id}/config"

    def state_topic(self, device_id: str, name: str) -> str:
        return f"{self._topics.prefix}/{device_id}/ha/{name}"

    # Inputs -------------------------------------------------------------------------------------

    def observe(self, device_id: str, message: BridgeMessage) -> None:
        """A :class:`~service.outputs.publisher.DevicePublisher` observer; never raises into the publisher."""
        try:
            self._observe(device_id, message)
        except Exception:
            log.exception("homeassistant.observe_failed", device=device_id)

    def on_status(self, payload: bytes | bytearray) -> None:
        """Home Assistant (re)started: it forgets non-retained discovery, so announce everyone again."""
        if bytes(payload).strip() != b"online":
            return
        log.info("homeassistant.online", devices=len(self._known))
        for device_id in sorted(self._known):
            self._announce(device_id)

    def _observe(self, device_id: str, message: BridgeMessage) -> None:
        if isinstance(message, Listening):
            if device_id not in self._known:
                self._known.add(device_id)
                self._announce(device_id)
            return
        if device_id not in self._known:  # errors for devices that never had a session
            return
        if isinstance(message, SpeechStarted):
            self._voice_on.add(device_id)
            self._send(self.state_topic(device_id, "voice"), b"ON", retain=True)
        elif isinstance(message, SpeechEnded) or (
            isinstance(message, Error) and message.session is not None and ends_session(message.code)
        ):
            if device_id in self._voice_on:
                self._voice_on.discard(device_id)
                self._send(self.state_topic(device_id, "voice"), b"OFF", retain=True)
        elif isinstance(message, Transcript) and message.final and message.text:
            self._transcript(device_id, message)

    def _transcript(self, device_id: str, t: Transcript) -> None:
        attributes: dict[str, Any] = {
            "text": t.text,
            "latency_ms": t.latency_ms,
            "backend": t.backend,
            "session": t.session,
            "language": t.language,
            "start_ms": t.start_ms,
            "end_ms": t.end_ms,
        }
        event: dict[str, Any] = {"event_type": "transcript", "text": t.text, "latency_ms": t.latency_ms}
        event.update(backend=t.backend, session=t.session, language=t.language)
        self._send(self.state_topic(device_id, "transcript"), sensor_state(t.text).encode(), retain=True)
        self._send(self.state_topic(device_id, "transcript/attributes"), _encode(attributes), retain=True)
        self._send(self.state_topic(device_id, "event"), _encode(event), retain=False)
        if t.latency_ms is not None:
            self._send(self.state_topic(device_id, "latency"), str(t.latency_ms).encode(), retain=True)

    # Discovery ----------------------------------------------------------------------------------

    def discovery(self, device_id: str) -> dict[str, Any]:
        """The device-based discovery payload (Home Assistant 2024.11+) for one device."""
        return {
            "dev": self._device(device_id),
            "o": {"name": ORIGIN_NAME, "sw_version": self._version, "support_url": SUPPORT_URL},
            "availability": [
                {
                    "topic": self._topics.status,
                    "value_template": "{{ value_json.state }}",
                    "payload_available": "online",
                    "payload_not_available": "offline",
                }
            ],
            "qos": 1,
            "cmps": self._components(device_id),
        }

    def _device(self, device_id: str) -> dict[str, Any]:
        """Home Assistant's device registry entry; the MAC links it to the same device seen by other integrations."""
        device: dict[str, Any] = {
            "identifiers": [f"echokit_{device_id}"],
            "name": f"EchoKit {device_id}",
            "manufacturer": "Second State",
            "model": "EchoKit",
            "sw_version": self._version,
        }
        if mac := mac_of(device_id):
            device["connections"] = [["mac", mac]]
        return device

    def _components(self, device_id: str) -> dict[str, Any]:
        """The four entities of the table in the module docstring, each on its ``ha/`` state topic."""
        uid = f"echokit_{device_id}"
        return {
            "transcript": {
                "p": "sensor",
                "unique_id": f"{uid}_transcript",
                "name": "Last transcript",
                "icon": "mdi:text-box-outline",
                "state_topic": self.state_topic(device_id, "transcript"),
                "json_attributes_topic": self.state_topic(device_id, "transcript/attributes"),
            },
            "transcript_event": {
                "p": "event",
                "unique_id": f"{uid}_transcript_event",
                "name": "Transcript",
                "icon": "mdi:account-voice",
                "state_topic": self.state_topic(device_id, "event"),
                "event_types": ["transcript"],
            },
            "voice": {
                "p": "binary_sensor",
                "unique_id": f"{uid}_voice",
                "name": "Voice activity",
                "device_class": "sound",
                "state_topic": self.state_topic(device_id, "voice"),
                "payload_on": "ON",
                "payload_off": "OFF",
            },
            "latency": {
                "p": "sensor",
                "unique_id": f"{uid}_latency",
                "name": "Transcript latency",
                "entity_category": "diagnostic",
                "device_class": "duration",
                "unit_of_measurement": "ms",
                "state_class": "measurement",
                "state_topic": self.state_topic(device_id, "latency"),
            },
        }

    def _announce(self, device_id: str) -> None:
        log.info("homeassistant.announce", device=device_id)
        self._send(self.discovery_topic(device_id), _encode(self.discovery(device_id)), retain=True)

    def _send(self, topic: str, payload: bytes, *, retain: bool) -> None:
        self._post(topic, payload, qos=1, retain=retain)  # queued in order: ON always precedes OFF
