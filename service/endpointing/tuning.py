"""Endpointing tuning in layers: the config, then ``[devices.<id>]``, then the device's ``configure``, then ``start``.

Later layers win field by field. Pure functions of the config and the messages, so what a
session runs with (and what ``configured`` tells the device) follows from them alone.
"""

from __future__ import annotations

from typing import TypeVar

import msgspec

from firmware_protocol import Configure, Configured, EndpointingOverrides, Start
from service.config import Config, overrides_problem
from service.config.schema import derived_neg_threshold

T = TypeVar("T")


class TuningRejected(ValueError):
    """A ``configure`` whose result, taken as a whole, the bridge would not run (``$.<field>: <why>``)."""


class DeviceTuning:
    """The tuning layers of every device under one config."""

    def __init__(self, config: Config) -> None:
        self._config = config

    def effective(self, device_id: str, overrides: EndpointingOverrides | None, start: Start | None) -> Configured:
        """What a session of ``device_id`` runs with, given its ``configure`` overrides and its ``start``."""
        layered = _layer(self._config.devices.tuning.get(device_id), overrides)
        return effective_tuning(self._config, layered, start)

    def reconfigure(
        self, device_id: str, current: EndpointingOverrides | None, message: Configure
    ) -> EndpointingOverrides:
        """The device's overrides after ``message`` (``reset`` starts over); raises :class:`TuningRejected`."""
        base = EndpointingOverrides() if message.reset or current is None else current
        overrides = msgspec.structs.replace(base, **_set_fields(message))
        if problem := overrides_problem(self._config, _layer(self._config.devices.tuning.get(device_id), overrides)):
            raise TuningRejected(f"$.{problem[0]}: {problem[1]}")
        return overrides


def effective_tuning(
    config: Config, layered: EndpointingOverrides | None = None, start: Start | None = None
) -> Configured:
    """The endpointing a session runs with: ``config`` under per-device ``layered`` overrides and ``start``."""
    vad = config.asr.vad
    layered = layered or EndpointingOverrides()
    threshold = _pick(layered.threshold, vad.threshold)
    negative = layered.neg_threshold
    if negative is None:
        negative = vad.neg_threshold if layered.threshold is None and vad.neg_threshold is not None else None
    return Configured(
        endpointing=(start.endpointing if start and start.endpointing else None)
        or _pick(layered.endpointing, config.session.endpointing),
        threshold=threshold,
        neg_threshold=negative if negative is not None else derived_neg_threshold(threshold),
        min_speech_duration_ms=_pick(layered.min_speech_duration_ms, vad.min_speech_duration_ms),
        max_silence_duration_ms=_pick(layered.max_silence_duration_ms, vad.max_silence_duration_ms),
        hangover_ms=_pick(layered.hangover_ms, vad.hangover_ms),
        no_speech_timeout_ms=_pick(layered.no_speech_timeout_ms, config.session.no_speech_timeout_ms),
        max_utterance_s=_pick(layered.max_utterance_s, config.session.max_utterance_s),
        vad_engine=_pick(layered.vad_engine, vad.engine),
        webrtc_mode=_pick(layered.webrtc_mode, vad.webrtc_mode),
    )


def _layer(*layers: EndpointingOverrides | None) -> EndpointingOverrides:
    """Later layers win field by field; ``None`` fields and layers are transparent."""
    merged = EndpointingOverrides()
    for overrides in layers:
        if overrides is not None:
            merged = msgspec.structs.replace(merged, **_set_fields(overrides))
    return merged


def _set_fields(overrides: EndpointingOverrides) -> dict[str, object]:
    return {f: v for f in EndpointingOverrides.__struct_fields__ if (v := getattr(overrides, f)) is not None}


def _pick(value: T | None, default: T) -> T:
    return default if value is None else value
