"""Home Assistant MQTT discovery: a real bridge announces a device that speaks and feeds its entities.

The discovery payload is checked against Home Assistant's documented rules for device-based
discovery (written out below: required keys, abbreviations, platforms, unique ids, availability,
per-platform options) and every topic it names is seen carrying state.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import Callable
from types import TracebackType
from typing import Any

import aiomqtt
import pytest

from firmware_protocol import (
    Error,
    ErrorCode,
    Listening,
    SpeechEnded,
    SpeechStarted,
    Topics,
    Transcript,
    decode_bridge_message,
)
from firmware_protocol.messages import EndReason
from service.config import HomeAssistantConfig
from service.outputs.homeassistant import MAX_STATE_CHARS, HomeAssistant, mac_of, sensor_state
from service.tools.device_sim import send_utterance
from tests.conftest import BridgeProcess, Broker

# Home Assistant's documented schema, as much of it as these entities touch ------------------------

ABBREVIATIONS = {
    "avty": "availability",
    "avty_mode": "availability_mode",
    "avty_t": "availability_topic",
    "avty_tpl": "availability_template",
    "cmps": "components",
    "dev": "device",
    "dev_cla": "device_class",
    "ent_cat": "entity_category",
    "evt_typ": "event_types",
    "ic": "icon",
    "json_attr_t": "json_attributes_topic",
    "json_attr_tpl": "json_attributes_template",
    "o": "origin",
    "p": "platform",
    "pl_avail": "payload_available",
    "pl_not_avail": "payload_not_available",
    "pl_off": "payload_off",
    "pl_on": "payload_on",
    "stat_cla": "state_class",
    "stat_t": "state_topic",
    "sug_dsp_prc": "suggested_display_precision",
    "t": "topic",
    "uniq_id": "unique_id",
    "unit_of_meas": "unit_of_measurement",
    "val_tpl": "value_template",
}
DEVICE_ABBREVIATIONS = {
    "cns": "connections",
    "cu": "configuration_url",
    "hw": "hw_version",
    "ids": "identifiers",
    "mdl": "model",
    "mdl_id": "model_id",
    "mf": "manufacturer",
    "sa": "suggested_area",
    "sn": "serial_number",
    "sw": "sw_version",
    "via_device": "via_device",
}
ORIGIN_ABBREVIATIONS = {"sw": "sw_version", "url": "support_url"}
DEVICE_KEYS = {"name", *DEVICE_ABBREVIATIONS.values()}
ORIGIN_KEYS = {"name", "sw_version", "support_url"}
AVAILABILITY_KEYS = {"availability", "availability_mode", "availability_topic", "availability_template"} | {
    "payload_available",
    "payload_not_available",
}
SHARED_KEYS = {"device", "origin", "components", "state_topic", "command_topic", "encoding", "qos"} | AVAILABILITY_KEYS
PLATFORMS = {
    "alarm_control_panel", "binary_sensor", "button", "camera", "climate", "cover", "device_automation",
    "device_tracker", "event", "fan", "humidifier", "image", "lawn_mower", "light", "lock", "notify", "number",
    "scene", "select", "sensor", "siren", "switch", "tag", "text", "update", "vacuum", "valve", "water_heater",
}  # fmt: skip
ENTITY_KEYS = {
    "platform", "unique_id", "name", "icon", "state_topic", "value_template", "json_attributes_topic",
    "json_attributes_template", "device_class", "entity_category", "enabled_by_default", "qos", "encoding",
    "object_id", "default_entity_id", "entity_picture",
} | AVAILABILITY_KEYS  # fmt: skip
PLATFORM_KEYS = {
    "sensor": ENTITY_KEYS | {
        "unit_of_measurement", "state_class", "suggested_display_precision", "expire_after", "force_update",
        "last_reset_value_template", "options",
    },
    "binary_sensor": ENTITY_KEYS | {"payload_on", "payload_off", "off_delay", "expire_after", "force_update"},
    "event": ENTITY_KEYS | {"event_types"},
}  # fmt: skip
BINARY_SENSOR_CLASSES = {"sound", "occupancy", "presence", "running", "problem", "connectivity", "motion"}
SENSOR_CLASSES_WITH_UNITS = {"duration": {"d", "h", "min", "s", "ms", "µs"}}
STATE_CLASSES = {"measurement", "measurement_angle", "total", "total_increasing"}
ID = re.compile(r"[a-zA-Z0-9_-]+")


def expand(payload: dict[str, Any], abbreviations: dict[str, str] = ABBREVIATIONS) -> dict[str, Any]:
    """Home Assistant's abbreviation expansion (each key may be spelt out or abbreviated, not both)."""
    out: dict[str, Any] = {}
    for key, value in payload.items():
        full = abbreviations.get(key, key)
        assert full not in out, f"{key!r} given twice (abbreviated and spelt out)"
        out[full] = value
    return out


def check_discovery(payload: dict[str, Any], *, bridge_prefix: str, device_id: str) -> dict[str, dict[str, Any]]:
    """Every rule of device-based discovery this payload relies on; returns the expanded components."""
    top = expand(payload)
    assert {"device", "origin", "components"} <= top.keys(), "device-based discovery needs dev, o and cmps"
    assert not top.keys() - SHARED_KEYS, f"unknown shared keys {top.keys() - SHARED_KEYS}"

    device = expand(top["device"], DEVICE_ABBREVIATIONS)
    assert not device.keys() - DEVICE_KEYS, device
    identifiers = device["identifiers"]
    identifiers = [identifiers] if isinstance(identifiers, str) else identifiers
    assert identifiers == [f"echokit_{device_id}"]
    assert device["name"] == f"EchoKit {device_id}"
    assert device["sw_version"] and device["manufacturer"] and device["model"]
    for connection in device.get("connections", []):
        assert isinstance(connection, list) and len(connection) == 2, connection
    if re.fullmatch(r"[0-9a-f]{12}", device_id):
        mac = ":".join(device_id[i : i + 2] for i in range(0, 12, 2))
        assert device["connections"] == [["mac", mac]]
    else:
        assert "connections" not in device

    origin = expand(top["origin"], ORIGIN_ABBREVIATIONS)
    assert not origin.keys() - ORIGIN_KEYS, origin
    assert origin["name"] == "echokit-mqtt-bridge" and origin["sw_version"]
    assert origin["support_url"].startswith("https://")

    # Availability follows the bridge's retained status JSON and its last will.
    assert "availability_topic" not in top or "availability" not in top, "one availability style, not both"
    if "availability" in top:
        (entry,) = [expand(a) for a in top["availability"]]
    else:
        entry = {"topic": top["availability_topic"], "value_template": top.get("availability_template")}
        entry |= {k: top[k] for k in ("payload_available", "payload_not_available") if k in top}
    assert entry["topic"] == f"{bridge_prefix}/status"
    assert entry["value_template"].replace(" ", "") == "{{value_json.state}}"
    assert (entry.get("payload_available", "online"), entry.get("payload_not_available", "offline")) == (
        "online",
        "offline",
    )
    assert top.get("qos", 0) in (0, 1, 2)

    components = {object_id: expand(c) for object_id, c in top["components"].items()}
    assert components
    unique_ids = [c["unique_id"] for c in components.values()]
    assert all(unique_ids) and len(set(unique_ids)) == len(unique_ids), unique_ids
    for object_id, c in components.items():
        assert ID.fullmatch(object_id), object_id
        platform = c["platform"]
        assert platform in PLATFORMS, platform
        assert not c.keys() - PLATFORM_KEYS[platform], (
            f"{object_id}: keys HA would refuse: {c.keys() - PLATFORM_KEYS[platform]}"
        )
        topic = c.get("state_topic", top.get("state_topic"))
        assert topic, f"{object_id} has no state_topic"
        for key in ("state_topic", "json_attributes_topic"):
            if key in c:
                assert not set(c[key]) & {"+", "#"}, c[key]
                assert c[key].startswith(f"{bridge_prefix}/{device_id}/ha/"), "HA traffic stays off the device's out/"
        if "entity_category" in c:
            assert c["entity_category"] == "diagnostic" or platform != "sensor", "a sensor cannot be config"
        if platform == "event":
            assert c["event_types"] and all(isinstance(t, str) for t in c["event_types"])
        if platform == "binary_sensor" and "device_class" in c:
            assert c["device_class"] in BINARY_SENSOR_CLASSES
        if platform == "sensor":
            if "state_class" in c:
                assert c["state_class"] in STATE_CLASSES
            if c.get("device_class") in SENSOR_CLASSES_WITH_UNITS:
                assert c.get("unit_of_measurement") in SENSOR_CLASSES_WITH_UNITS[c["device_class"]]
    return components


# A broker-side observer --------------------------------------------------------------------------


class Recorder:
    """Subscribes to some filters and keeps ``(topic, payload, retain)`` of everything that arrives."""

    def __init__(self, broker: Broker, *filters: str) -> None:
        self._client = aiomqtt.Client(broker.host, broker.port, identifier=f"rec-{uuid.uuid4().hex[:8]}")
        self._filters = filters
        self.seen: list[tuple[str, bytes, bool]] = []
        self._arrived = asyncio.Condition()
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Recorder:
        await self._client.__aenter__()
        for topic_filter in self._filters:
            await self._client.subscribe(topic_filter, qos=1)
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        if self._reader:
            self._reader.cancel()
        await self._client.__aexit__(t, e, tb)

    async def _read(self) -> None:
        async for message in self._client.messages:
            async with self._arrived:
                self.seen.append((message.topic.value, bytes(message.payload), bool(message.retain)))  # type: ignore[arg-type,unused-ignore]
                self._arrived.notify_all()

    async def wait_for(self, predicate: Callable[[list[tuple[str, bytes, bool]]], bool], timeout: float = 30) -> None:
        async with asyncio.timeout(timeout), self._arrived:
            await self._arrived.wait_for(lambda: predicate(self.seen))

    def on(self, topic: str) -> list[bytes]:
        return [payload for t, payload, _ in self.seen if t == topic]


def _ha_bridge(make_bridge: Any) -> tuple[BridgeProcess, str]:
    discovery_prefix = f"ha_{uuid.uuid4().hex[:10]}"  # the broker is shared by every test
    bridge: BridgeProcess = make_bridge(
        f"""
        [asr]
        platform = "pocketsphinx"
        decoders = 1
        [homeassistant]
        enabled = true
        discovery_prefix = "{discovery_prefix}"
        """
    )
    return bridge, discovery_prefix


# End to end -------------------------------------------------------------------------------------------


async def test_a_device_that_speaks_appears_in_home_assistant(make_bridge: Any, broker: Broker, speech: dict) -> None:
    bridge, discovery_prefix = _ha_bridge(make_bridge)
    device_id = uuid.uuid4().hex[:12]  # an EchoKit-style id: its MAC as 12 hex digits
    config_topic = f"{discovery_prefix}/device/echokit_{device_id}/config"
    ha = f"{bridge.prefix}/{device_id}/ha"
    async with Recorder(broker, f"{discovery_prefix}/#", f"{ha}/#", f"{bridge.prefix}/{device_id}/out/#") as watch:
        await asyncio.sleep(0.2)
        assert not watch.seen, "nothing is announced before a device speaks"
        received = await send_utterance(
            broker.url, device_id, speech["what_time"], prefix=bridge.prefix, speed=0, push_to_talk=True
        )
        final = received[-1].message
        assert isinstance(final, Transcript) and final.text == "what time is it"
        await watch.wait_for(lambda seen: {f"{ha}/event", f"{ha}/latency"} <= {t for t, _, _ in seen})

        (config,) = watch.on(config_topic)
        components = check_discovery(json.loads(config), bridge_prefix=bridge.prefix, device_id=device_id)
        by_platform: dict[str, list[dict[str, Any]]] = {}
        for c in components.values():
            by_platform.setdefault(c["platform"], []).append(c)
        assert sorted(by_platform) == ["binary_sensor", "event", "sensor"]
        (voice,) = by_platform["binary_sensor"]
        (event,) = by_platform["event"]
        transcript, latency = sorted(by_platform["sensor"], key=lambda c: "entity_category" in c)
        assert voice["device_class"] == "sound"
        assert event["event_types"] == ["transcript"]
        assert "json_attributes_topic" in transcript and "entity_category" not in transcript
        assert latency["entity_category"] == "diagnostic" and latency["unit_of_measurement"] == "ms"
        assert latency["state_class"] == "measurement"

        # Every topic the discovery names carried state, in the documented form.
        assert watch.on(voice["state_topic"]) == [b"ON", b"OFF"]
        assert watch.on(transcript["state_topic"]) == [b"what time is it"]
        (attributes,) = [json.loads(p) for p in watch.on(transcript["json_attributes_topic"])]
        assert attributes["text"] == "what time is it" and attributes["backend"] == "pocketsphinx"
        assert attributes["session"] == final.session and attributes["language"] == "en"
        assert attributes["latency_ms"] == final.latency_ms
        (fired,) = [json.loads(p) for p in watch.on(event["state_topic"])]
        assert fired["event_type"] == "transcript" and fired["event_type"] in event["event_types"]
        assert fired["text"] == "what time is it" and fired["latency_ms"] == final.latency_ms
        assert watch.on(latency["state_topic"]) == [str(final.latency_ms).encode()]

        # The device's own topics carry protocol messages only.
        device_topics = [(t, p) for t, p, _ in watch.seen if t.startswith(f"{bridge.prefix}/{device_id}/out/")]
        assert device_topics
        for _, payload in device_topics:
            decode_bridge_message(payload)

        # Availability: the value template reads the bridge's retained status.
        async with Recorder(broker, f"{bridge.prefix}/status") as status:
            await status.wait_for(lambda seen: bool(seen))
            assert json.loads(status.seen[0][1])["state"] == "online"

        # What Home Assistant finds when it (re)subscribes: discovery and sensor states retained, events not.
        async with Recorder(broker, f"{discovery_prefix}/#", f"{ha}/#") as late:
            await late.wait_for(lambda seen: len(seen) >= 5)
            await asyncio.sleep(0.3)
            retained = {t for t, _, r in late.seen if r}
            assert retained == {
                config_topic,
                voice["state_topic"],
                transcript["state_topic"],
                transcript["json_attributes_topic"],
                latency["state_topic"],
            }

        # Home Assistant restarted: its birth message makes the bridge announce the device again.
        async with aiomqtt.Client(broker.host, broker.port) as ha_core:
            await ha_core.publish(f"{discovery_prefix}/status", b"offline", qos=1)
            await asyncio.sleep(0.3)
            assert len(watch.on(config_topic)) == 1, "offline changes nothing"
            await ha_core.publish(f"{discovery_prefix}/status", b"online", qos=1)
        await watch.wait_for(lambda seen: len([t for t, _, _ in seen if t == config_topic]) == 2)
        assert json.loads(watch.on(config_topic)[1]) == json.loads(config)

    # Clean up the retained messages this test left on the shared broker.
    async with aiomqtt.Client(broker.host, broker.port) as cleaner:
        for topic in (
            config_topic,
            *(f"{ha}/{n}" for n in ("voice", "transcript", "transcript/attributes", "latency")),
        ):
            await cleaner.publish(topic, b"", qos=1, retain=True)
    assert bridge.stop() == 0


# The module on its own ------------------------------------------------------------------------------


def test_sensor_state_fits_home_assistants_255_characters() -> None:
    assert sensor_state("turn on the light") == "turn on the light"
    exact = "a" * MAX_STATE_CHARS
    assert sensor_state(exact) == exact
    long = " ".join(["turn on the kitchen light and play some music"] * 20)  # 919 characters
    state = sensor_state(long)
    assert len(state) == MAX_STATE_CHARS and state.endswith("…") and long.startswith(state[:-1])
    wide = "打开厨房的灯" * 100  # characters, not bytes, are what Home Assistant counts
    assert len(sensor_state(wide)) == MAX_STATE_CHARS


def test_mac_connections_only_for_mac_like_ids() -> None:
    assert mac_of("a1b2c3d4e5f6") == "a1:b2:c3:d4:e5:f6"
    assert mac_of("A1B2C3D4E5F6") == "a1:b2:c3:d4:e5:f6"
    assert mac_of("kitchen") is None and mac_of("a1b2c3d4e5f6a") is None


async def test_long_transcript_keeps_the_full_text_in_attributes() -> None:
    sent: list[tuple[str, bytes, bool]] = []

    def publish(topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        sent.append((topic, payload, retain))

    ha = HomeAssistant(HomeAssistantConfig(enabled=True), Topics("echokit"), publish, version="9.9")
    long = " ".join(["please write down that the meeting moved to thursday afternoon"] * 10)
    for message in (
        Error(code=ErrorCode.TOO_MANY_SESSIONS, message="busy", retryable=True, session=7),  # before any session
        Listening(session=8, endpointing="server_vad", sample_rate=16000),  # type: ignore[arg-type]
        SpeechStarted(session=8, offset_ms=100),
        SpeechEnded(session=8, offset_ms=9000, reason=EndReason.SILENCE),
        Transcript(session=8, final=True, text=long, backend="x", start_ms=100, end_ms=9000, latency_ms=42),
        Listening(session=9, endpointing="server_vad", sample_rate=16000),  # type: ignore[arg-type]
        SpeechStarted(session=9, offset_ms=100),
        Error(code=ErrorCode.BACKEND_ERROR, message="worker died", retryable=True, session=9),
        Transcript(session=9, final=True, text="", backend="x", start_ms=0, end_ms=3000, reason=EndReason.NO_SPEECH),
    ):
        ha.observe("kitchen", message)
    await asyncio.sleep(0)
    topics = [t for t, _, _ in sent]
    assert topics == [
        "homeassistant/device/echokit_kitchen/config",  # once, at the first session
        "echokit/kitchen/ha/voice",
        "echokit/kitchen/ha/voice",
        "echokit/kitchen/ha/transcript",
        "echokit/kitchen/ha/transcript/attributes",
        "echokit/kitchen/ha/event",
        "echokit/kitchen/ha/latency",
        "echokit/kitchen/ha/voice",  # ON
        "echokit/kitchen/ha/voice",  # OFF: the error ended the session
    ]
    payloads = {t: p for t, p, _ in sent}
    assert len(payloads["echokit/kitchen/ha/transcript"].decode()) == MAX_STATE_CHARS
    assert json.loads(payloads["echokit/kitchen/ha/transcript/attributes"])["text"] == long
    assert json.loads(payloads["echokit/kitchen/ha/event"])["text"] == long
    assert [p for t, p, _ in sent if t.endswith("/voice")] == [b"ON", b"OFF", b"ON", b"OFF"]
    assert {t: r for t, _, r in sent}["echokit/kitchen/ha/event"] is False
    check_discovery(ha.discovery("kitchen"), bridge_prefix="echokit", device_id="kitchen")
    ha.on_status(b"online")
    await asyncio.sleep(0)
    assert sent[-1][0] == "homeassistant/device/echokit_kitchen/config"


@pytest.mark.parametrize("abbreviated", [False, True])
def test_the_schema_check_accepts_abbreviations_and_catches_mistakes(abbreviated: bool) -> None:
    def publish(topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        pass

    ha = HomeAssistant(HomeAssistantConfig(enabled=True), Topics("echokit"), publish, version="1")
    payload = ha.discovery("a1b2c3d4e5f6")
    if abbreviated:
        reverse = {v: k for k, v in ABBREVIATIONS.items()}
        payload["cmps"] = {k: {reverse.get(f, f): v for f, v in c.items()} for k, c in payload["cmps"].items()}
    check_discovery(payload, bridge_prefix="echokit", device_id="a1b2c3d4e5f6")
    broken = json.loads(json.dumps(payload))
    next(iter(broken["cmps"].values()))["unknown_option"] = 1
    with pytest.raises(AssertionError):
        check_discovery(broken, bridge_prefix="echokit", device_id="a1b2c3d4e5f6")
    duplicate = json.loads(json.dumps(payload))
    first, second = list(duplicate["cmps"].values())[:2]
    uid = "uniq_id" if abbreviated else "unique_id"
    second[uid] = first[uid]
    with pytest.raises(AssertionError):
        check_discovery(duplicate, bridge_prefix="echokit", device_id="a1b2c3d4e5f6")
