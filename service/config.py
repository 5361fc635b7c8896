"""Configuration: TOML decoded into msgspec Structs, with every problem reported by line.

``[asr]`` is the EchoKit server's section accepted as it is (``platform``, ``url``,
``api_key``, ``model``, ``lang``, ``prompt``, ``vad_url``, ``paraformer_token``,
``[asr.vad]``); the rest is ours. ``${VAR}`` in any string is replaced from the
environment, so secrets never have to live in the file.
"""

from __future__ import annotations

import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import msgspec

from firmware_protocol import DEFAULT_PREFIX, Endpointing, EndpointingOverrides, VadEngine, is_valid_device_id

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
    """Empty: ``echokit-bridge-<instance>``; a fixed id makes two bridges kick each other off."""
    topic_prefix: str = DEFAULT_PREFIX
    ca_file: str = ""
    keepalive_s: PositiveInt = 30
    protocol: Literal[3, 5] = 3
    """MQTT version of the bridge's own connection (devices use either): 3 = 3.1.1, or 5.

    3.1.1 by default: the bridge uses no MQTT 5 feature (clean session = clean start with
    expiry 0), and paho parses MQTT 5 packets about 7x slower, which cost 0.2 core and raised
    last-frame → final p99 from 33 ms to 508 ms at 100 devices (bench/bridge_throughput.py).
    """
    reconnect_max_s: Positive = 30.0


class VadConfig(_Section):
    """EchoKit's ``[asr.vad]`` with its defaults (echokit_server ``src/ai/vad.rs``)."""

    threshold: Probability = 0.5
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
        return max(min(self.threshold, 0.95) - 0.15, 0.05)


class AsrConfig(_Section):
    platform: str = "pocketsphinx"
    url: str = ""
    api_key: str = ""
    model: str = ""
    lang: str = ""
    prompt: str = ""
    paraformer_token: str = ""
    vad_url: str = ""
    vad_realtime_url: str = ""
    vad: VadConfig = msgspec.field(default_factory=VadConfig)
    # Network backends (ours; EchoKit hard-codes 3 attempts x 10 s)
    timeout_s: Positive = 10.0
    """HTTP engines: per attempt, request to response. Sockets: the whole ``finish``, shared by its attempts."""
    connect_timeout_s: Positive = 3.0
    max_retries: Annotated[int, msgspec.Meta(ge=0, le=10)] = 2
    max_connections: PositiveInt = 256
    """HTTP engines: one pooled client for all devices, at most this many connections (utterances in flight)."""
    # openai
    stream: bool = False
    """gpt-4o-transcribe family: read SSE ``transcript.text.delta`` events as partials."""
    # paraformer_v2 (run-task parameters)
    semantic_punctuation_enabled: bool = True
    max_sentence_silence: Annotated[int, msgspec.Meta(ge=200, le=6000)] | None = None
    disfluency_removal_enabled: bool = False
    heartbeat: bool = False
    max_sockets: PositiveInt = 100
    """Concurrent DashScope sockets (one per device, reused across turns)."""
    # elevenlabs
    mode: Literal["realtime", "batch"] = "realtime"
    commit_strategy: Literal["manual", "vad"] = "manual"
    # pocketsphinx (ours)
    grammar: str = ""
    """Path to a JSGF grammar; restricts recognition to a command vocabulary."""
    phrases: list[str] = msgspec.field(default_factory=list)
    """Command phrases; compiled into a one-rule JSGF grammar."""
    decoders: PositiveInt = 2
    """Pocketsphinx decoders kept loaded; sessions beyond this wait for one."""
    partial_interval_ms: Annotated[int, msgspec.Meta(ge=0)] = 250
    fallback: list[AsrConfig] = msgspec.field(default_factory=list)
    """``[[asr.fallback]]``: further backends, in order, for when this one fails or is open-circuit."""


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


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    file: str
    line: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.field}: {self.message}"


class ConfigError(Exception):
    def __init__(self, problems: list[ConfigProblem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


def load_config(path: str | Path) -> Config:
    """Load and validate; raise :class:`ConfigError` listing *every* problem found."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([ConfigProblem(str(path), None, "<file>", exc.strerror or str(exc))]) from None
    return parse_config(text, str(path))


def parse_config(text: str, filename: str = "<config>", env: typing.Mapping[str, str] | None = None) -> Config:
    env = os.environ if env is None else env
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line = _line_from_toml_error(str(exc))
        raise ConfigError([ConfigProblem(filename, line, "<toml>", str(exc))]) from None
    lines = _KeyLines(text)
    problems: list[ConfigProblem] = []

    def report(path: str, message: str) -> None:
        path = path.replace("devices.tuning.", "devices.")  # as the file writes it
        problems.append(ConfigProblem(filename, lines.find(path), path, message))

    raw = _expand_env(raw, "", env, report)
    if isinstance(devices := raw.get("devices"), dict):  # [devices.<id>] tables sit beside `allow`
        tables = {k: v for k, v in devices.items() if k != "allow"}
        raw["devices"] = {k: v for k, v in devices.items() if k == "allow"} | ({"tuning": tables} if tables else {})
    valid = _validate(raw, Config, "", report)
    # Semantic checks run on what did validate, with defaults for what did not.
    partial = msgspec.convert(valid, Config)
    for check in _SEMANTIC_CHECKS:
        check(partial, report)
    if problems:
        raise ConfigError(problems)
    return partial


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _expand_env(value: Any, path: str, env: typing.Mapping[str, str], report: Report) -> Any:
    if isinstance(value, str):

        def sub(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in env:
                report(path, f"environment variable {name} is not set")
                return ""
            return env[name]

        return _ENV.sub(sub, value)
    if isinstance(value, dict):
        return {k: _expand_env(v, _join(path, k), env, report) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, f"{path}[{i}]", env, report) for i, v in enumerate(value)]
    return value


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _struct_of(tp: Any) -> type[msgspec.Struct] | None:
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if isinstance(arg, type) and issubclass(arg, msgspec.Struct):
                return arg
    return None


def _list_item(tp: Any) -> Any:
    return typing.get_args(tp)[0] if typing.get_origin(tp) is list else None


def _dict_value(tp: Any) -> Any:
    return typing.get_args(tp)[1] if typing.get_origin(tp) is dict else None


def _validate(raw: Any, struct: type[msgspec.Struct], path: str, report: Report) -> dict[str, Any]:
    """Check each field on its own so that one bad value does not hide the next.

    Returns the table without the fields that failed, so later checks can still run on
    the rest (a bad ``asr.vad.threshold`` must not hide an unknown ``asr.platform``).
    """
    if not isinstance(raw, dict):
        report(path or "<root>", f"expected a table, got {type(raw).__name__}")
        return {}
    fields = {f.encode_name: f for f in msgspec.structs.fields(struct)}
    valid: dict[str, Any] = {}
    for key in raw:
        if key not in fields:
            known = ", ".join(sorted(fields))
            report(_join(path, key), f"unknown field (known: {known})")
    for name, field in fields.items():
        if name not in raw:
            if field.required:
                report(_join(path, name), "required field is missing")
            continue
        sub = _struct_of(field.type)
        if sub is not None and isinstance(raw[name], dict):
            valid[name] = _validate(raw[name], sub, _join(path, name), report)
            continue
        item = _struct_of(_list_item(field.type))
        if item is not None and isinstance(raw[name], list):
            valid[name] = [_validate(v, item, f"{_join(path, name)}[{i}]", report) for i, v in enumerate(raw[name])]
            continue
        value = _struct_of(_dict_value(field.type))
        if value is not None and isinstance(raw[name], dict):
            valid[name] = {k: _validate(v, value, _join(_join(path, name), k), report) for k, v in raw[name].items()}
            continue
        try:
            msgspec.convert(raw[name], field.type)
            valid[name] = raw[name]
        except msgspec.ValidationError as exc:
            report(_join(path, name), str(exc))
    return valid


def _check_mqtt(config: Config, report: Report) -> None:
    mqtt = config.mqtt
    url = urlsplit(mqtt.url)
    if url.scheme not in ("mqtt", "mqtts") or not url.hostname:
        shown = mqtt.url.replace(url.password, "***") if url.password else mqtt.url  # never echo a secret
        report("mqtt.url", f"expected mqtt://host[:port] or mqtts://host[:port], got {shown!r}")
    if mqtt.ca_file and not Path(mqtt.ca_file).is_file():
        report("mqtt.ca_file", f"file not found: {mqtt.ca_file}")
    if not re.fullmatch(r"[A-Za-z0-9_\-]+(/[A-Za-z0-9_\-]+)*", mqtt.topic_prefix):
        report("mqtt.topic_prefix", "use letters, digits, '_', '-' and '/' separators, no wildcards")


def _check_asr(config: Config, report: Report) -> None:
    _check_backend(config.asr, "asr", report)
    for i, fallback in enumerate(config.asr.fallback):
        path = f"asr.fallback[{i}]"
        _check_backend(fallback, path, report)
        if fallback.fallback:
            report(f"{path}.fallback", "fallbacks are one list under [asr]; they cannot nest")
    vad = config.asr.vad
    if vad.neg_threshold is not None and vad.neg_threshold >= vad.threshold:
        report("asr.vad.neg_threshold", "must be below asr.vad.threshold")
    if vad.engine is VadEngine.REMOTE and not config.asr.vad_realtime_url:
        report("asr.vad.engine", _REMOTE_NEEDS_URL)
    if config.asr.vad_realtime_url and urlsplit(config.asr.vad_realtime_url).scheme not in ("ws", "wss"):
        report(
            "asr.vad_realtime_url",
            f"expected ws://host:port/v1/audio/realtime_vad, got {config.asr.vad_realtime_url!r}",
        )
    if config.asr.vad_url and urlsplit(config.asr.vad_url).scheme not in ("http", "https"):
        report("asr.vad_url", f"expected http://host:port/v1/audio/vad, got {config.asr.vad_url!r}")


_REMOTE_NEEDS_URL = '"remote" needs asr.vad_realtime_url (silero_vad_server\'s ws://host:9093/v1/audio/realtime_vad)'


def _check_backend(asr: AsrConfig, path: str, report: Report) -> None:
    if asr.platform not in PLATFORM_ALIASES:
        available = ", ".join(sorted(PLATFORM_ALIASES))
        report(f"{path}.platform", f"unknown platform {asr.platform!r} (available: {available})")
    if asr.grammar and asr.phrases:
        report(f"{path}.phrases", "set either grammar or phrases, not both")
    if asr.grammar and not Path(asr.grammar).is_file():
        report(f"{path}.grammar", f"file not found: {asr.grammar}")


def backend_decides_turns(asr: AsrConfig) -> bool:
    """Whether the configured recogniser ends turns itself (needed for ``endpointing = "backend"``)."""
    platform = PLATFORM_ALIASES.get(asr.platform)
    return platform == "paraformer_v2" or (platform == "elevenlabs" and asr.commit_strategy == "vad")


def _check_session(config: Config, report: Report) -> None:
    if config.session.endpointing is Endpointing.BACKEND and not backend_decides_turns(config.asr):
        report(
            "session.endpointing",
            '"backend" needs a recogniser that ends turns: platform "paraformer_v2", or "elevenlabs"'
            ' with commit_strategy = "vad"',
        )


def _check_devices(config: Config, report: Report) -> None:
    for i, device in enumerate(config.devices.allow):
        if not is_valid_device_id(device):
            report(f"devices.allow[{i}]", f"{device!r} is not a valid device id ([A-Za-z0-9_-]{{1,64}})")
    for device, overrides in config.devices.tuning.items():
        if not is_valid_device_id(device):
            report(f"devices.{device}", f"{device!r} is not a valid device id ([A-Za-z0-9_-]{{1,64}})")
        elif problem := overrides_problem(config, overrides):
            report(f"devices.{device}.{problem[0]}", problem[1])


def overrides_problem(config: Config, overrides: EndpointingOverrides) -> tuple[str, str] | None:
    """What is wrong with per-device endpointing as a whole (field, reason), or ``None``."""
    vad = config.asr.vad
    threshold = overrides.threshold if overrides.threshold is not None else vad.threshold
    negative = overrides.neg_threshold if overrides.neg_threshold is not None else vad.neg_threshold
    if negative is not None and negative >= threshold:
        return "neg_threshold", f"must be below threshold ({threshold:g})"
    if overrides.max_utterance_s is not None and overrides.max_utterance_s > config.session.max_utterance_s:
        limit = config.session.max_utterance_s
        return "max_utterance_s", f"may not exceed the bridge's session.max_utterance_s ({limit:g})"
    if overrides.vad_engine is VadEngine.REMOTE and not config.asr.vad_realtime_url:
        return "vad_engine", _REMOTE_NEEDS_URL
    return None


def _check_metrics(config: Config, report: Report) -> None:
    try:
        parse_listen(config.metrics.listen)
    except ValueError as exc:
        report("metrics.listen", str(exc))


_SEMANTIC_CHECKS: tuple[typing.Callable[[Config, Report], None], ...] = (
    _check_mqtt,
    _check_asr,
    _check_session,
    _check_devices,
    _check_metrics,
)


def _line_from_toml_error(message: str) -> int | None:
    match = re.search(r"line (\d+)", message)
    return int(match.group(1)) if match else None


class _KeyLines:
    """Maps dotted key paths to the line that sets them, for error messages."""

    _HEADER = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
    _KEY = re.compile(r'^\s*([A-Za-z0-9_\-."]+)\s*=')

    def __init__(self, text: str) -> None:
        self._lines: dict[str, int] = {}
        arrays: dict[str, int] = {}  # [[name]] → index of its latest element
        table = ""
        for number, line in enumerate(text.splitlines(), start=1):
            if header := self._HEADER.match(line):
                table = header.group(1).replace('"', "").replace(" ", "")
                for name, index in arrays.items():  # [a.b.c] inside the latest [[a.b]] element
                    if table.startswith(name + "."):
                        table = f"{name}[{index}]{table[len(name) :]}"
                if line.lstrip().startswith("[["):
                    arrays[table] = arrays.get(table, -1) + 1
                    table = f"{table}[{arrays[table]}]"
                self._lines.setdefault(table, number)
            elif key := self._KEY.match(line):
                name = key.group(1).replace('"', "")
                self._lines.setdefault(_join(table, name), number)

    def find(self, path: str) -> int | None:
        while path:
            if path in self._lines:
                return self._lines[path]
            trimmed = re.sub(r"\[\d+\]$", "", path)
            path = trimmed if trimmed != path else path.rpartition(".")[0]
        return None
