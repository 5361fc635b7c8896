"""JSON control and event messages, each a msgspec Struct tagged by ``type``.

Device → bridge on ``in/control``: :class:`Start`, :class:`Cancel`.
Bridge → device on ``out/*``: :class:`Listening`, :class:`SpeechStarted`,
:class:`SpeechEnded`, :class:`Transcript`, :class:`Error`; the bridge's retained
:class:`BridgeStatus` on ``<prefix>/status``.
"""

from __future__ import annotations

import enum
import re
from typing import Annotated

import msgspec

from firmware_protocol.errors import ErrorCode, ProtocolError

SessionId = Annotated[int, msgspec.Meta(ge=1, le=0xFFFFFFFF)]


class Endpointing(enum.StrEnum):
    SERVER_VAD = "server_vad"
    """The bridge's VAD decides when the speaker stopped."""
    PUSH_TO_TALK = "push_to_talk"
    """Only the device's LAST frame ends the turn."""
    BACKEND = "backend"
    """The streaming recogniser decides (DashScope ``sentence_end``, ElevenLabs VAD); LAST still ends it."""


class VadEngine(enum.StrEnum):
    """What scores each 32 ms window for the endpointer (the turn rules are the same for all)."""

    SILERO = "silero"
    """Silero VAD in the bridge (the default)."""
    WEBRTC = "webrtc"
    """WebRTC's VAD: cheap, less accurate; the fraction of 10 ms frames judged speech."""
    WEBRTC_SILERO = "webrtc+silero"
    """WebRTC as a gate: windows it calls silent are not sent to Silero."""
    REMOTE = "remote"
    """EchoKit's silero_vad_server over its realtime WebSocket (``asr.vad_realtime_url``)."""


class EndReason(enum.StrEnum):
    SILENCE = "silence"
    DEVICE = "device"
    MAX_LENGTH = "max_length"
    BACKEND = "backend"
    CANCEL = "cancel"
    TIMEOUT = "timeout"
    NO_SPEECH = "no_speech"


class _Message(msgspec.Struct, tag_field="type", forbid_unknown_fields=False, omit_defaults=True, kw_only=True):
    """Unknown fields are ignored so either side can add fields in a minor version.

    Optional fields default to ``None`` (or ``False``) and are left out of the JSON when
    unset, which keeps messages small for 1 KB device buffers; every field a receiver
    always needs has no default, so it is always on the wire.
    """


# Device → bridge ---------------------------------------------------------------------------


class Start(_Message, tag="start"):
    """Options for a session, sent before (or while) its audio arrives."""

    session: SessionId
    language: str | None = None
    prompt: str | None = None
    endpointing: Endpointing | None = None


class Cancel(_Message, tag="cancel"):
    session: SessionId


Millis = Annotated[int, msgspec.Meta(ge=0, le=60_000)]
Probability = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
Threshold = Annotated[float, msgspec.Meta(gt=0.0, le=1.0)]
"""Above 0: ``neg_threshold`` must be below it, and a probability cannot be below 0."""
WebrtcMode = Annotated[int, msgspec.Meta(ge=0, le=3)]
"""WebRTC VAD aggressiveness: 0 keeps the most audio as speech, 3 filters the most."""


class EndpointingOverrides(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Per-device endpointing: the same fields in ``configure`` messages and ``[devices.<id>]`` tables."""

    endpointing: Endpointing | None = None
    threshold: Threshold | None = None
    neg_threshold: Probability | None = None
    min_speech_duration_ms: Millis | None = None
    max_silence_duration_ms: Millis | None = None
    hangover_ms: Millis | None = None
    no_speech_timeout_ms: Annotated[int, msgspec.Meta(ge=1, le=60_000)] | None = None
    max_utterance_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] | None = None
    vad_engine: VadEngine | None = None
    webrtc_mode: WebrtcMode | None = None
    """Used by the ``webrtc`` and ``webrtc+silero`` engines; the others ignore it."""


class Configure(_Message, EndpointingOverrides, tag="configure"):
    """Endpointing for this device's next sessions, over the bridge's config; unset fields keep theirs.

    ``reset`` first drops earlier ``configure`` values. Answered with :class:`Configured`.
    """

    reset: bool = False


DeviceMessage = Start | Cancel | Configure

# Bridge → device ---------------------------------------------------------------------------


class Listening(_Message, tag="listening"):
    """The session is accepted; audio is being processed."""

    session: SessionId
    endpointing: Endpointing
    sample_rate: int


class SpeechStarted(_Message, tag="speech_started"):
    session: SessionId
    offset_ms: int


class SpeechEnded(_Message, tag="speech_ended"):
    session: SessionId
    offset_ms: int
    reason: EndReason


class Transcript(_Message, tag="transcript"):
    """A partial (``final`` false) or the final transcript of a session.

    A final with empty ``text`` and a ``reason`` means nothing was recognised.
    """

    session: SessionId
    final: bool
    text: str
    backend: str
    start_ms: int
    end_ms: int
    language: str | None = None
    latency_ms: int | None = None
    reason: EndReason | None = None
    truncated: bool = False
    """Present (true) only when the text was cut to fit the device's buffer."""


class Error(_Message, tag="error"):
    code: ErrorCode
    message: str
    retryable: bool
    session: SessionId | None = None
    retry_after_ms: int | None = None
    """With a retryable refusal (``too_many_sessions``): wait at least this long before retrying."""


class BridgeStatus(_Message, tag="status"):
    state: str  # "online" | "offline"
    version: str
    instance: str
    protocol: int


class Configured(_Message, tag="configured"):
    """The endpointing now in force for the device's next sessions (every value, effective)."""

    endpointing: Endpointing
    threshold: float
    neg_threshold: float
    min_speech_duration_ms: int
    max_silence_duration_ms: int
    hangover_ms: int
    no_speech_timeout_ms: int
    max_utterance_s: float
    vad_engine: VadEngine
    webrtc_mode: int


BridgeMessage = Listening | SpeechStarted | SpeechEnded | Transcript | Error | BridgeStatus | Configured

_encoder = msgspec.json.Encoder()
_device_decoder: msgspec.json.Decoder[DeviceMessage] = msgspec.json.Decoder(DeviceMessage)
_bridge_decoder: msgspec.json.Decoder[BridgeMessage] = msgspec.json.Decoder(BridgeMessage)


def encode_message(message: DeviceMessage | BridgeMessage) -> bytes:
    return _encoder.encode(message)


def decode_device_message(data: bytes) -> DeviceMessage:
    """Decode a control message; errors name the JSON path (``$.session``)."""
    try:
        return _device_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise ProtocolError(ErrorCode.BAD_CONTROL, _path_of(str(exc)), str(exc)) from None
    except UnicodeDecodeError as exc:
        raise ProtocolError(ErrorCode.BAD_CONTROL, "$", f"invalid UTF-8 at byte {exc.start}") from None
    except RecursionError:  # msgspec skips unknown fields recursively: a deep one exhausts the stack
        raise ProtocolError(ErrorCode.BAD_CONTROL, "$", "JSON nested too deeply") from None


def decode_bridge_message(data: bytes) -> BridgeMessage:
    try:
        return _bridge_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise ProtocolError(ErrorCode.BAD_CONTROL, _path_of(str(exc)), str(exc)) from None
    except UnicodeDecodeError as exc:
        raise ProtocolError(ErrorCode.BAD_CONTROL, "$", f"invalid UTF-8 at byte {exc.start}") from None
    except RecursionError:
        raise ProtocolError(ErrorCode.BAD_CONTROL, "$", "JSON nested too deeply") from None


def _path_of(message: str) -> str:
    """The JSON path msgspec names (``- at `$.field```), or a missing field's path, or ``$``."""
    marker = "- at `"
    if marker in message:
        return message.rsplit(marker, 1)[1].rstrip("`")
    missing = re.search(r"missing required field `([^`]+)`", message)
    return f"$.{missing.group(1)}" if missing else "$"
