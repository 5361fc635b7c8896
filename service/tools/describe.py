"""One readable line per bridge message, shared by ``echokit-device send`` and ``echokit-bridge tail``."""

from __future__ import annotations

import msgspec

from firmware_protocol import BridgeMessage, BridgeStatus, Error, Listening, SpeechEnded, SpeechStarted, Transcript


def describe(m: BridgeMessage) -> str:
    """What the message says, without who it is for or when it came (callers add those)."""
    if isinstance(m, SpeechStarted):
        return f"speech started at {m.offset_ms} ms"
    if isinstance(m, SpeechEnded):
        return f"speech ended at {m.offset_ms} ms ({m.reason.value})"
    if isinstance(m, Transcript):
        if not m.final:
            return f"partial: {m.text}"
        shown = m.text or f"<nothing recognised: {m.reason.value if m.reason else 'empty'}>"
        details = [f"backend {m.backend}"]
        if m.latency_ms is not None:
            details.append(f"{m.latency_ms} ms after end of speech")
        if m.truncated:
            details.append("text truncated to fit the device's buffer")
        return f"final: {shown}  ({', '.join(details)})"
    if isinstance(m, Listening):
        return f"listening ({m.endpointing.value}, {m.sample_rate} Hz)"
    if isinstance(m, Error):
        retry = " (retryable)" if m.retryable else ""
        return f"error {m.code.value}{retry}: {m.message}"
    if isinstance(m, BridgeStatus):
        return f"bridge {m.state} (version {m.version}, instance {m.instance}, protocol {m.protocol})"
    tag = m.__struct_config__.tag
    fields = {k: v for k, v in msgspec.to_builtins(m).items() if k not in ("session", "type")}
    return f"{tag}: {fields}"
