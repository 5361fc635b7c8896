"""Loading the configuration: TOML → :class:`~service.config.schema.Config`, every problem with file:line: field.

``${VAR}`` in any string is replaced from the environment, so secrets never have to live in the file.
Each field is validated on its own so one bad value does not hide the next; semantic checks
(URLs, files, cross-field rules) run on what validated.
"""

from __future__ import annotations

import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec

from firmware_protocol import Endpointing, EndpointingOverrides, VadEngine, is_valid_device_id
from service.config.schema import (
    ECHOKIT_KEYS,
    PLATFORM_ALIASES,
    SETTINGS,
    AsrConfig,
    BackendSettings,
    Config,
    ElevenLabsSettings,
    ParaformerSettings,
    PocketsphinxSettings,
    Report,
    parse_listen,
)
from service.redact import redact_url


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
    if struct is AsrConfig:
        return _validate_asr(raw, path, report)
    return _validate_fields(raw, {f.encode_name: f for f in msgspec.structs.fields(struct)}, path, report)


def _validate_fields(
    raw: dict[str, Any], fields: dict[str, msgspec.structs.FieldInfo], path: str, report: Report
) -> dict[str, Any]:
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


_ASR_FIELDS = {f.encode_name: f for f in msgspec.structs.fields(AsrConfig) if f.name != "backend"}
_OURS_BY_PLATFORM = {
    platform: {f.encode_name for f in msgspec.structs.fields(settings)} - ECHOKIT_KEYS
    for platform, settings in SETTINGS.items()
}


def _validate_asr(raw: dict[str, Any], path: str, report: Report) -> dict[str, Any]:
    """An ``[asr]`` (or ``[[asr.fallback]]``) table: its own keys, and the backend keys of its ``platform``."""
    platform = raw.get("platform", BackendSettings.platform)
    canonical = PLATFORM_ALIASES.get(platform) if isinstance(platform, str) else None
    settings = SETTINGS.get(canonical or "", PocketsphinxSettings)
    known = {f.encode_name for f in msgspec.structs.fields(settings if canonical else BackendSettings)}
    own: dict[str, Any] = {}
    backend: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _ASR_FIELDS:
            own[key] = value
        elif key in known:
            backend[key] = value
        elif key in ECHOKIT_KEYS or (canonical is None and any(key in ours for ours in _OURS_BY_PLATFORM.values())):
            continue  # EchoKit's key of another platform; or no platform to judge it by (reported later)
        elif owners := sorted(p for p, ours in _OURS_BY_PLATFORM.items() if key in ours):
            report(_join(path, key), f"a setting of platform {' / '.join(owners)}, not of {platform!r}")
        else:
            report(_join(path, key), f"unknown field (known: {', '.join(sorted(_ASR_FIELDS.keys() | known))})")
    valid = _validate_fields(own, _ASR_FIELDS, path, report)
    valid["backend"] = _validate(backend, settings, path, report) | {"backend": canonical or "pocketsphinx"}
    return valid


def _check_mqtt(config: Config, report: Report) -> None:
    mqtt = config.mqtt
    if not _is_broker_url(mqtt.url):
        shown = redact_url(mqtt.url)  # never echo a secret
        report("mqtt.url", f"expected mqtt://host[:port] or mqtts://host[:port], got {shown!r}")
    if mqtt.ca_file and not Path(mqtt.ca_file).is_file():
        report("mqtt.ca_file", f"file not found: {mqtt.ca_file}")
    if not re.fullmatch(r"[A-Za-z0-9_\-]+(/[A-Za-z0-9_\-]+)*", mqtt.topic_prefix):
        report("mqtt.topic_prefix", "use letters, digits, '_', '-' and '/' separators, no wildcards")


def _is_broker_url(url: str) -> bool:
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unclosed [IPv6 bracket
        return False
    return parts.scheme in ("mqtt", "mqtts") and bool(parts.hostname)


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
    if config.asr.vad_realtime_url and _url_scheme(config.asr.vad_realtime_url) not in ("ws", "wss"):
        report(
            "asr.vad_realtime_url",
            f"expected ws://host:port/v1/audio/realtime_vad, got {redact_url(config.asr.vad_realtime_url)!r}",
        )
    if config.asr.vad_url and _url_scheme(config.asr.vad_url) not in ("http", "https"):
        report("asr.vad_url", f"expected http://host:port/v1/audio/vad, got {redact_url(config.asr.vad_url)!r}")


def _url_scheme(url: str) -> str | None:
    """The scheme of a URL that parses (host and port included), else ``None``; never raises."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:  # e.g. an unclosed [IPv6 bracket; the message would not say which field
        return None
    return parts.scheme


_REMOTE_NEEDS_URL = '"remote" needs asr.vad_realtime_url (silero_vad_server\'s ws://host:9093/v1/audio/realtime_vad)'


def _check_backend(asr: AsrConfig, path: str, report: Report) -> None:
    if asr.platform not in PLATFORM_ALIASES:
        available = ", ".join(sorted(PLATFORM_ALIASES))
        report(f"{path}.platform", f"unknown platform {asr.platform!r} (available: {available})")
        return
    backend = asr.backend
    if backend.url and _url_scheme(backend.url) is None:
        report(f"{path}.url", f"not a URL: {redact_url(backend.url)!r}")  # redacted: it may carry a key
    if isinstance(backend, PocketsphinxSettings) and backend.grammar:
        if backend.phrases:
            report(f"{path}.phrases", "set either grammar or phrases, not both")
        if not Path(backend.grammar).is_file():
            report(f"{path}.grammar", f"file not found: {backend.grammar}")


def backend_decides_turns(asr: AsrConfig) -> bool:
    """Whether the configured recogniser ends turns itself (needed for ``endpointing = "backend"``)."""
    backend = asr.backend
    return isinstance(backend, ParaformerSettings) or (
        isinstance(backend, ElevenLabsSettings) and backend.commit_strategy == "vad"
    )


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
