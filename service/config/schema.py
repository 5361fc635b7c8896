"""The configuration's shape: one msgspec Struct per TOML table, with defaults and ranges.

``[asr]`` is the EchoKit server's section accepted as it is (``platform``, ``url``,
``api_key``, ``model``, ``lang``, ``prompt``, ``vad_url``, ``paraformer_token``,
``[asr.vad]``); the rest is ours. Its recogniser keys become one settings struct per backend
(:class:`BackendSettings` and its subclasses), chosen by ``platform``.
"""

from __future__ import annotations

import typing
from typing import Annotated, Literal

import msgspec

from firmware_protocol import DEFAULT_PREFIX, Endpointing, EndpointingOverrides, VadEngine

Report = typing.Callable[[str, str], None]
Positive = Annotated[float, msgspec.Meta(gt=0)]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
Probability = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class MqttConfig(_Section):
    url: str = "mqtt://127.0.0.1:1883"
    username: str = ""
    password: str = ""
    client_id: str = ""
    """Empty: ``echokit-bridge-<instance>-<random>``, new on every start and never published (the
    status shows only ``instance``); a fixed id makes two bridges kick each other off."""
    topic_prefix: str = DEFAULT_PREFIX
    ca_file: str = ""
    keepalive_s: PositiveInt = 30
    protocol: Literal[3, 5] = 3
    """MQTT version of the bridge's own connection (devices use either): 3 = 3.1.1, or 5.

    3.1.1 by default: the bridge uses no MQTT 5 feature (clean session = clean start with
    expiry 0), and paho parses MQTT 5 packets several times slower, which shows in CPU and in
    last-frame → final latency with many devices (bench/bridge_throughput.py measures it).
    """
    reconnect_max_s: Positive = 30.0
    publish_queue: PositiveInt = 5000
    """Messages waiting to be published, at most; when full the least important, oldest one is
    dropped (partials and ``speech_started`` first, then the rest a device acts on, errors, finals last)."""
    publish_inflight: PositiveInt = 100
    """QoS 1 publishes awaiting their PUBACK, at most (and at most the broker's Receive Maximum)."""
    publish_max_age_s: Positive = 60.0
    """A message not published within this (e.g. across a broker outage) is dropped and counted."""
    resume_delay_s: Annotated[float, msgspec.Meta(ge=0)] = 2.0
    """After a reconnect, how long messages from before the outage wait for devices to re-subscribe."""


class VadConfig(_Section):
    """EchoKit's ``[asr.vad]`` with its defaults (echokit_server ``src/ai/vad.rs``)."""

    threshold: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 0.5
    """Above 0: ``neg_threshold`` must be below it."""
    neg_threshold: Probability | None = None
    min_speech_duration_ms: Annotated[int, msgspec.Meta(ge=0)] = 400
    max_silence_duration_ms: Annotated[int, msgspec.Meta(ge=0)] = 200
    hangover_ms: Annotated[int, msgspec.Meta(ge=0)] = 500
    # Ours: what scores each window (EchoKit always runs Silero)
    engine: VadEngine = VadEngine.SILERO
    """``silero`` | ``webrtc`` | ``webrtc+silero`` | ``remote`` (needs ``asr.vad_realtime_url``)."""
    webrtc_mode: Annotated[int, msgspec.Meta(ge=0, le=3)] = 3
    """WebRTC VAD aggressiveness, 0 (keeps most audio as speech) to 3 (filters the most)."""

    @property
    def effective_neg_threshold(self) -> float:
        if self.neg_threshold is not None:
            return self.neg_threshold
        return derived_neg_threshold(self.threshold)


def derived_neg_threshold(threshold: float) -> float:
    """EchoKit's ``neg_threshold`` when none is set: ``threshold`` - 0.15, at least 0.05; always below it."""
    return max(min(threshold, 0.95) - 0.15, min(0.05, threshold / 2))


class BackendSettings(_Section, tag_field="backend"):
    """What every recogniser's table shares: EchoKit's ``platform``/``url``/``api_key``/``model`` and our timeouts.

    Each backend has a subclass with its own keys; the loader picks it by ``platform`` (its tag is the
    backend's canonical name from :data:`PLATFORM_ALIASES`). In the file they sit flat in ``[asr]``.
    """

    platform: str = "pocketsphinx"
    """As written (EchoKit's spellings, see :data:`PLATFORM_ALIASES`)."""
    url: str = ""
    api_key: str = ""
    model: str = ""
    # Ours; EchoKit hard-codes 3 attempts x 10 s
    timeout_s: Positive = 10.0
    """HTTP engines: per attempt, request to response. Sockets: the whole ``finish``, shared by its attempts."""
    connect_timeout_s: Positive = 3.0
    max_retries: Annotated[int, msgspec.Meta(ge=0, le=10)] = 2


class PocketsphinxSettings(BackendSettings, tag="pocketsphinx"):
    grammar: str = ""
    """Path to a JSGF grammar; restricts recognition to a command vocabulary."""
    phrases: list[str] = msgspec.field(default_factory=list)
    """Command phrases; compiled into a one-rule JSGF grammar."""
    decoders: PositiveInt = 2
    """Pocketsphinx decoders kept loaded; sessions beyond this wait for one."""
    partial_interval_ms: Annotated[int, msgspec.Meta(ge=0)] = 250


class OpenAISettings(BackendSettings, tag="openai"):
    max_connections: PositiveInt = 256
    """One pooled client for all devices, at most this many connections (utterances in flight)."""
    stream: bool = False
    """gpt-4o-transcribe family: read SSE ``transcript.text.delta`` events as partials."""


class ParaformerSettings(BackendSettings, tag="paraformer_v2"):
    paraformer_token: str = ""
    # run-task parameters
    semantic_punctuation_enabled: bool = True
    max_sentence_silence: Annotated[int, msgspec.Meta(ge=200, le=6000)] | None = None
    disfluency_removal_enabled: bool = False
    heartbeat: bool = False
    max_sockets: PositiveInt = 100
    """Concurrent DashScope sockets (one per device, reused across turns)."""


class ElevenLabsSettings(BackendSettings, tag="elevenlabs"):
    max_connections: PositiveInt = 256
    """Batch mode: one pooled client for all devices, at most this many connections."""
    mode: Literal["realtime", "batch"] = "realtime"
    commit_strategy: Literal["manual", "vad"] = "manual"


Settings = PocketsphinxSettings | OpenAISettings | ParaformerSettings | ElevenLabsSettings
"""One recogniser's settings; which one is chosen by ``platform``."""

SETTINGS: dict[str, type[Settings]] = {
    "pocketsphinx": PocketsphinxSettings,
    "openai": OpenAISettings,
    "paraformer_v2": ParaformerSettings,
    "elevenlabs": ElevenLabsSettings,
}
"""Canonical backend name → its settings struct."""

ECHOKIT_KEYS = frozenset({"paraformer_token"})
"""EchoKit keys of one platform that any ``[asr]`` table may carry, as EchoKit allows: ignored where unused.

Our own keys of another platform (``stream`` under ``paraformer_v2``, ``decoders`` under ``openai``) are
errors instead: they would silently do nothing.
"""


class AsrConfig(_Section):
    """EchoKit's ``[asr]`` table; the recogniser's keys are written beside these and land in ``backend``."""

    backend: Settings = msgspec.field(default_factory=PocketsphinxSettings)
    lang: str = ""
    prompt: str = ""
    vad_url: str = ""
    vad_realtime_url: str = ""
    vad: VadConfig = msgspec.field(default_factory=VadConfig)
    fallback: list[AsrConfig] = msgspec.field(default_factory=list)
    """``[[asr.fallback]]``: further backends, in order, for when this one fails or is open-circuit."""

    @property
    def platform(self) -> str:
        return self.backend.platform


class SessionConfig(_Section):
    endpointing: Endpointing = Endpointing.SERVER_VAD
    max_utterance_s: Positive = 30.0
    max_sessions: PositiveInt = 200
    idle_timeout_s: Positive = 10.0
    """A session that receives no frame for this long is abandoned (device gone, LAST lost)."""
    no_speech_timeout_ms: PositiveInt = 3000
    """With server VAD, end the turn empty if nobody speaks this long (EchoKit: 500)."""
    reorder_window: Annotated[int, msgspec.Meta(ge=0, le=256)] = 8
    max_frame_bytes: PositiveInt = 16400
    max_device_message_bytes: Annotated[int, msgspec.Meta(ge=256)] = 1024
    """Largest MQTT packet sent to a device (ESP-MQTT's default buffer); longer texts are cut."""
    max_gap_ms: PositiveInt = 1000
    """Audio a session's missing frames may skip and still be concealed with silence; a longer gap ends it."""
    max_starts_per_s: Positive = 2.0
    """Sessions one device may start per second (after a burst of 5); more are refused ``too_many_sessions``."""
    max_errors_per_s: PositiveInt = 200
    """Errors about incoming messages sent per second to the whole fleet; more are dropped (and counted)."""


class DevicesConfig(_Section):
    allow: list[str] = msgspec.field(default_factory=list)
    """Empty: any valid device id. Otherwise only these ids; others get ``unknown_device``."""
    tuning: dict[str, EndpointingOverrides] = msgspec.field(default_factory=dict)
    """``[devices.<id>]`` tables: endpointing for one device (written in TOML without ``tuning``)."""


class LogConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class HomeAssistantConfig(_Section):
    """MQTT discovery: each device that speaks appears in Home Assistant (off unless enabled)."""

    enabled: bool = False
    discovery_prefix: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_\-]+(/[A-Za-z0-9_\-]+)*$")] = "homeassistant"
    """Home Assistant's ``discovery_prefix``; its birth message is expected on ``<discovery_prefix>/status``."""


class MetricsConfig(_Section):
    """Prometheus ``/metrics`` and the ``/healthz`` / ``/readyz`` probes on one small HTTP listener."""

    enabled: bool = True
    listen: str = "127.0.0.1:9464"
    """``host:port`` (``[::1]:9464`` for IPv6); ``0.0.0.0:9464`` in a container; port 0 picks a free one."""

    @property
    def address(self) -> tuple[str, int]:
        return parse_listen(self.listen)


def parse_listen(value: str) -> tuple[str, int]:
    """``"host:port"`` → ``(host, port)``; :class:`ValueError` saying what is wrong."""
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"expected host:port with a port from 0 to 65535 (e.g. 127.0.0.1:9464), got {value!r}")
    return host, int(port)


class Config(_Section):
    mqtt: MqttConfig = msgspec.field(default_factory=MqttConfig)
    asr: AsrConfig = msgspec.field(default_factory=AsrConfig)
    session: SessionConfig = msgspec.field(default_factory=SessionConfig)
    devices: DevicesConfig = msgspec.field(default_factory=DevicesConfig)
    log: LogConfig = msgspec.field(default_factory=LogConfig)
    metrics: MetricsConfig = msgspec.field(default_factory=MetricsConfig)
    homeassistant: HomeAssistantConfig = msgspec.field(default_factory=HomeAssistantConfig)


PLATFORM_ALIASES = {
    "pocketsphinx": "pocketsphinx",
    "openai": "openai",
    "OpenAI": "openai",
    "whisper": "openai",
    "Whisper": "openai",
    "paraformer_v2": "paraformer_v2",
    "elevenlabs": "elevenlabs",
}
"""EchoKit's platform spellings (and ours) → backend names."""
