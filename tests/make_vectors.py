"""Generate the wire-contract test vectors in ``firmware_protocol/vectors/``.

Every vector is produced by the reference codec in :mod:`firmware_protocol` (and, for the
truncated transcript, by the bridge's own size cap), so the files are what the bridge
really sends and accepts. Output is deterministic: re-running rewrites identical bytes.

    .venv/bin/python tests/make_vectors.py            # (re)write the files
    .venv/bin/python tests/make_vectors.py --check    # exit 1 if any file is missing or differs

Files this script does not produce (hand-written vectors) are left alone.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from pathlib import Path
from typing import Any

import msgspec

from firmware_protocol import (
    HEADER_SIZE,
    PROTOCOL_VERSION,
    AudioFrame,
    BridgeStatus,
    Cancel,
    Codec,
    Configure,
    Configured,
    Endpointing,
    EndReason,
    Error,
    ErrorCode,
    FrameFlags,
    Listening,
    ProtocolError,
    SpeechEnded,
    SpeechStarted,
    Start,
    Transcript,
    VadEngine,
    decode_bridge_message,
    decode_device_message,
    encode_message,
)
from service.outputs.publisher import fit

VECTORS_DIR = Path(__file__).resolve().parent.parent / "firmware_protocol" / "vectors"
HEX_LIMIT = 64
"""Payloads up to this many bytes are described by ``payload_hex``, longer ones by ``payload_sha256``."""

SESSION = 0x9E3779B9  # what a device's esp_random() might give; any non-zero u32 is fine
DEVICE_MESSAGE_CAP = 1000  # a payload budget: 1024-byte packet minus header and topic

# Eight samples that show byte order and the int16 extremes: 0, 1000, -1000, max, min, 1, -1, 0.
SHORT_PCM = b"".join(v.to_bytes(2, "little", signed=True) for v in (0, 1000, -1000, 32767, -32768, 1, -1, 0))


def sine_pcm(freq_hz: float, ms: int, *, rate: int = 16000, amplitude: int = 8000, phase: int = 0) -> bytes:
    """s16le mono sine; integer rounding of math.sin keeps the bytes stable across runs."""
    count = rate * ms // 1000
    samples = (round(amplitude * math.sin(2 * math.pi * freq_hz * (phase + i) / rate)) for i in range(count))
    return b"".join(s.to_bytes(2, "little", signed=True) for s in samples)


# Audio frames ------------------------------------------------------------------------------


def frame_fields(frame: AudioFrame) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "session_id": frame.session_id,
        "seq": frame.seq,
        "flags": int(frame.flags),
        "first": frame.first,
        "last": frame.last,
        "codec": int(frame.codec),
        "channels": frame.channels,
        "sample_rate": frame.sample_rate,
        "version": frame.version,
        "payload_len": len(frame.payload),
    }
    if len(frame.payload) <= HEX_LIMIT:
        fields["payload_hex"] = frame.payload.hex()
    else:
        fields["payload_sha256"] = hashlib.sha256(frame.payload).hexdigest()
    return fields


def bridge_error_for(frame: AudioFrame) -> str | None:
    """What the bridge answers to a well-formed frame today (service/sessions.py ``_on_audio``)."""
    if frame.codec != Codec.PCM_S16LE:
        return ErrorCode.UNSUPPORTED_CODEC.value
    if frame.sample_rate != 16000 or frame.channels != 1:
        return ErrorCode.UNSUPPORTED_FORMAT.value
    return None


def valid_frame(description: str, frame: AudioFrame) -> tuple[bytes, dict[str, Any]]:
    data = frame.encode()
    decoded = AudioFrame.decode(data)  # the vector must be well-formed by the reference decoder
    assert decoded == frame, (decoded, frame)
    meta: dict[str, Any] = {"kind": "audio_frame", "valid": True, "description": description}
    error = bridge_error_for(frame)
    meta["supported"] = error is None
    if error is not None:
        meta["bridge_error"] = {"code": error}
    meta["fields"] = frame_fields(frame)
    return data, meta


def invalid_frame(description: str, data: bytes) -> tuple[bytes, dict[str, Any]]:
    try:
        AudioFrame.decode(data)
    except ProtocolError as exc:
        error = {"code": exc.code.value, "field": exc.field}
    else:
        raise AssertionError(f"{description}: decoded although it should not")
    return data, {"kind": "audio_frame", "valid": False, "description": description, "error": error}


def good(**overrides: Any) -> AudioFrame:
    """A well-formed frame to corrupt: session SESSION, seq 7, 4 samples."""
    base: dict[str, Any] = {"session_id": SESSION, "seq": 7, "payload": SHORT_PCM[:8]}
    base.update(overrides)
    return AudioFrame(**base)


def audio_vectors() -> dict[str, tuple[bytes, dict[str, Any]]]:
    first, last, both = FrameFlags.FIRST, FrameFlags.LAST, FrameFlags.FIRST | FrameFlags.LAST
    sine = sine_pcm(440.0, 20)
    header_only = good().encode()[:HEADER_SIZE]
    return {
        "frame_first": valid_frame(
            "First frame of a session: FIRST set, seq 0 (8 samples, shows s16le byte order)",
            AudioFrame(SESSION, 0, SHORT_PCM, first),
        ),
        "frame_middle": valid_frame(
            "A frame in the middle of a session: no flags", AudioFrame(SESSION, 1, SHORT_PCM[::-1])
        ),
        "frame_last": valid_frame(
            "Last frame of a push-to-talk session: LAST set", AudioFrame(SESSION, 2, SHORT_PCM[:4], last)
        ),
        "frame_first_last": valid_frame(
            "A whole push-to-talk utterance in one frame: FIRST and LAST on seq 0",
            AudioFrame(0x00000001, 0, SHORT_PCM, both),
        ),
        "frame_empty_last": valid_frame(
            "Button released with no audio left to send: LAST with an empty payload",
            AudioFrame(SESSION, 3, b"", last),
        ),
        "frame_sine_20ms": valid_frame(
            "20 ms of a 440 Hz sine at 16 kHz: 320 samples, 640-byte payload, 656 bytes on the wire",
            AudioFrame(SESSION, 5, sine),
        ),
        "frame_max_values": valid_frame(
            "Largest session id and sequence number (u32 max); seq does not wrap within a session",
            AudioFrame(0xFFFFFFFF, 0xFFFFFFFF, SHORT_PCM[:2]),
        ),
        "frame_opus": valid_frame(
            "Opus codec id: well-formed, but this bridge answers unsupported_codec",
            AudioFrame(SESSION, 0, bytes.fromhex("f8fffe"), first, codec=Codec.OPUS),
        ),
        "frame_48k_stereo": valid_frame(
            "48 kHz stereo PCM header: well-formed, but this bridge answers unsupported_format",
            AudioFrame(SESSION, 0, SHORT_PCM, first, channels=2, sample_rate=48000),
        ),
        "frame_invalid_too_short": invalid_frame("Shorter than the 16-byte header", header_only[:10]),
        "frame_invalid_empty": invalid_frame("Zero bytes", b""),
        "frame_invalid_bad_magic": invalid_frame("Magic is not b'EK' (lower case here)", b"ek" + good().encode()[2:]),
        "frame_invalid_version_2": invalid_frame("Frame version 2", good(version=2).encode()),
        "frame_invalid_reserved_flags": invalid_frame(
            "Reserved flag bit 2 set (flags 0x05)", good(flags=0x05).encode()
        ),
        "frame_invalid_session_zero": invalid_frame("Session id 0", good(session_id=0).encode()),
        "frame_invalid_channels_zero": invalid_frame("Zero channels", good(channels=0).encode()),
        "frame_invalid_sample_rate_zero": invalid_frame("Sample rate 0", good(sample_rate=0).encode()),
        "frame_invalid_odd_payload": invalid_frame(
            "PCM payload of 3 bytes: not a whole number of s16 samples", good(payload=b"\x01\x02\x03").encode()
        ),
        "frame_invalid_stereo_partial_sample": invalid_frame(
            "Stereo PCM payload of 6 bytes: not a whole number of 2-channel samples",
            good(channels=2, payload=SHORT_PCM[:6]).encode(),
        ),
    }


# JSON messages -----------------------------------------------------------------------------


def message_fields(message: Any) -> dict[str, Any]:
    """Every field after decoding, defaults included (absent on the wire means the default)."""
    fields: dict[str, Any] = {"type": message.__struct_config__.tag}
    for name in message.__struct_fields__:
        fields[name] = msgspec.to_builtins(getattr(message, name))
    return fields


def message(
    kind: str, description: str, data: bytes, *, canonical: bool, contract_error: dict[str, str] | None = None
) -> tuple[bytes, dict[str, Any]]:
    """Describe ``data`` as the reference decoder sees it.

    ``contract_error`` is what the contract requires where today's decoder raises something
    other than :class:`ProtocolError` (a known bug, listed in tests/test_protocol.py).
    """
    decode = decode_device_message if kind == "device_message" else decode_bridge_message
    meta: dict[str, Any] = {"kind": kind, "description": description}
    try:
        decoded = decode(data)
    except ProtocolError as exc:
        meta["valid"] = False
        meta["error"] = {"code": exc.code.value, "field": exc.field}
        assert contract_error in (None, meta["error"]), (description, meta["error"])
        return data, meta
    except UnicodeDecodeError:
        if contract_error is None:
            raise
        meta["valid"] = False
        meta["error"] = contract_error
        return data, meta
    meta["valid"] = True
    meta["canonical"] = canonical
    assert (encode_message(decoded) == data) == canonical, description
    meta["decoded"] = message_fields(decoded)
    return data, meta


def encoded(kind: str, description: str, value: Any) -> tuple[bytes, dict[str, Any]]:
    return message(kind, description, encode_message(value), canonical=True)


def device(description: str, value: Any) -> tuple[bytes, dict[str, Any]]:
    return encoded("device_message", description, value)


def bridge(description: str, value: Any) -> tuple[bytes, dict[str, Any]]:
    return encoded("bridge_message", description, value)


def raw_device(
    description: str, data: bytes, contract_error: dict[str, str] | None = None
) -> tuple[bytes, dict[str, Any]]:
    return message("device_message", description, data, canonical=False, contract_error=contract_error)


def raw_bridge(description: str, data: bytes) -> tuple[bytes, dict[str, Any]]:
    return message("bridge_message", description, data, canonical=False)


ERROR_EXAMPLES: dict[str, tuple[str, bool, int | None]] = {
    # code: (message as the bridge words it, retryable, session)
    "malformed_frame": ("magic: expected b'EK', got b'ek'", False, None),
    "unsupported_version": ("version: version 2 is not supported (this bridge speaks 1)", False, None),
    "unsupported_codec": ("codec: 1 is not supported (0 = PCM s16le)", False, SESSION),
    "unsupported_format": ("sample_rate/channels: 48000 Hz x 2 is not supported (16000 Hz mono)", False, SESSION),
    "payload_too_large": ("audio frame of 20016 bytes exceeds 16400", False, None),
    "bad_control": ("$.session: Expected `int` >= 1 - at `$.session`", False, None),
    "unknown_device": ("this device is not in the bridge's devices.allow list", False, None),
    "utterance_too_long": ("utterance longer than 30 s; transcribing what came", False, SESSION),
    "too_many_sessions": ("200 sessions are active; retry shortly", True, SESSION),
    "audio_gap": ("seq: 2400 ms of audio missing, over the 1000 ms the bridge conceals; retry", True, SESSION),
    "session_timeout": ("no audio for 10 s", False, SESSION),
    "backend_error": ("the pocketsphinx worker died; it was restarted", True, SESSION),
    "backend_unavailable": ("no result within 30 s", True, SESSION),
    "backend_timeout": ("openai: no response within 10 s", True, SESSION),
    "backend_rate_limited": ("openai: HTTP 429 Too Many Requests", True, SESSION),
    "backend_auth": ("openai: HTTP 401 Unauthorized", False, SESSION),
    "backend_rejected": ("openai: HTTP 413 Request Entity Too Large", False, SESSION),
    "internal": ("RuntimeError", True, SESSION),
}
"""One example per error code (message texts of codes the bridge does not send yet are illustrative)."""

RESERVED_CODES = {ErrorCode.SESSION_TIMEOUT}


def message_vectors() -> dict[str, tuple[bytes, dict[str, Any]]]:
    s = SESSION
    vectors = {
        # Device → bridge (in/control).
        "device_start_minimal": device("start with only the session: bridge defaults apply", Start(session=s)),
        "device_start_push_to_talk": device(
            "start for push-to-talk with a language",
            Start(session=s, language="en", endpointing=Endpointing.PUSH_TO_TALK),
        ),
        "device_start_full": device(
            "start with every option",
            Start(session=s, language="zh", prompt="Hello\n你好", endpointing=Endpointing.SERVER_VAD),
        ),
        "device_cancel": device("cancel: drop the session, no transcript follows", Cancel(session=s)),
        "device_configure": device(
            "configure: this device's endpointing for its next sessions (unset fields keep their values)",
            Configure(hangover_ms=300, max_silence_duration_ms=160, threshold=0.6),
        ),
        "device_configure_reset": device(
            "configure with reset: back to the bridge's config, then push-to-talk",
            Configure(reset=True, endpointing=Endpointing.PUSH_TO_TALK),
        ),
        "device_configure_webrtc": device(
            "configure: WebRTC's VAD for this device, at its most lenient aggressiveness",
            Configure(vad_engine=VadEngine.WEBRTC, webrtc_mode=0),
        ),
        "device_invalid_configure_range": raw_device(
            "configure with a negative hangover", b'{"type":"configure","hangover_ms":-5}'
        ),
        "device_invalid_configure_webrtc_mode": raw_device(
            "configure with a WebRTC aggressiveness out of 0..3", b'{"type":"configure","webrtc_mode":7}'
        ),
        "device_start_firmware_style": raw_device(
            "start as a firmware might write it: other key order, spaces, an unknown field (ignored)",
            b'{ "session": 2654435769, "fw": "1.4.2", "type": "start", "endpointing": "push_to_talk" }',
        ),
        "device_invalid_bad_json": raw_device("truncated JSON", b'{"type":"start","session":'),
        "device_invalid_not_utf8": raw_device(
            "invalid UTF-8 inside a string value",
            b'{"type":"start","session":1,"language":"\xff"}',
            {"code": "bad_control", "field": "$"},
        ),
        "device_invalid_not_object": raw_device("a JSON array instead of an object", b'[{"type":"start","session":1}]'),
        "device_invalid_unknown_type": raw_device("unknown message type", b'{"type":"stop","session":1}'),
        "device_invalid_missing_type": raw_device("no type field", b'{"session":1}'),
        "device_invalid_session_zero": raw_device("session 0 is not a session id", b'{"type":"start","session":0}'),
        "device_invalid_session_too_large": raw_device("session above u32", b'{"type":"cancel","session":4294967296}'),
        "device_invalid_missing_session": raw_device("session is required", b'{"type":"start"}'),
        "device_invalid_session_string": raw_device(
            "session must be a JSON number", b'{"type":"start","session":"2654435769"}'
        ),
        "device_invalid_session_float": raw_device("session must be an integer", b'{"type":"cancel","session":1.0}'),
        "device_invalid_language_type": raw_device(
            "language must be a string or null", b'{"type":"start","session":1,"language":5}'
        ),
        "device_invalid_endpointing": raw_device(
            "unknown endpointing mode", b'{"type":"start","session":1,"endpointing":"wake_word"}'
        ),
        "device_invalid_configure_threshold_zero": raw_device(
            "configure with threshold 0: nothing could be below it for neg_threshold",
            b'{"type":"configure","threshold":0}',
        ),
        "device_invalid_nested_deep": raw_device(
            "an unknown field nested 2000 arrays deep (4033 bytes, under the control limit): bad_control, at $",
            b'{"type":"start","session":1,"x":' + b"[" * 2000 + b"]" * 2000 + b"}",
        ),
        # Bridge → device (out/session, out/vad, out/transcript, out/error) and <prefix>/status.
        "bridge_listening_server_vad": bridge(
            "session accepted, server VAD",
            Listening(session=s, endpointing=Endpointing.SERVER_VAD, sample_rate=16000),
        ),
        "bridge_listening_push_to_talk": bridge(
            "session accepted, push-to-talk",
            Listening(session=s, endpointing=Endpointing.PUSH_TO_TALK, sample_rate=16000),
        ),
        "bridge_speech_started": bridge(
            "the VAD heard speech starting 160 ms into the audio", SpeechStarted(session=s, offset_ms=160)
        ),
        "bridge_transcript_partial": bridge(
            "partial transcript (QoS 0); may be revised",
            Transcript(session=s, final=False, text="turn on the", backend="pocketsphinx", start_ms=0, end_ms=1240),
        ),
        "bridge_transcript_final": bridge(
            "final transcript",
            Transcript(
                session=s,
                final=True,
                text="turn on the kitchen light",
                backend="pocketsphinx",
                start_ms=160,
                end_ms=1850,
                language="en",
                latency_ms=212,
            ),
        ),
        "bridge_transcript_no_speech": bridge(
            "final with nothing recognised: empty text and reason no_speech",
            Transcript(
                session=s,
                final=True,
                text="",
                backend="pocketsphinx",
                start_ms=0,
                end_ms=3008,
                latency_ms=0,
                reason=EndReason.NO_SPEECH,
            ),
        ),
        "bridge_configured": bridge(
            "configured: every endpointing value now in force for the device's next sessions",
            Configured(
                endpointing=Endpointing.SERVER_VAD,
                threshold=0.6,
                neg_threshold=0.45,
                min_speech_duration_ms=400,
                max_silence_duration_ms=160,
                hangover_ms=300,
                no_speech_timeout_ms=3000,
                max_utterance_s=30.0,
                vad_engine=VadEngine.SILERO,
                webrtc_mode=3,
            ),
        ),
        "bridge_status_online": bridge(
            "retained bridge status",
            BridgeStatus(state="online", version="0.1.0", instance="3f9a1c2e", protocol=PROTOCOL_VERSION),
        ),
        "bridge_status_offline": bridge(
            "retained status after a graceful stop, and the last will",
            BridgeStatus(state="offline", version="0.1.0", instance="3f9a1c2e", protocol=PROTOCOL_VERSION),
        ),
        "bridge_transcript_future_field": raw_bridge(
            "a future bridge adds a field: decoders must ignore it",
            b'{"type":"transcript","session":2654435769,"final":true,"text":"timer","backend":"pocketsphinx",'
            b'"start_ms":40,"end_ms":610,"confidence":0.93,"words":[{"w":"timer","start_ms":40}],"latency_ms":80}',
        ),
        "bridge_invalid_transcript_missing_final": raw_bridge(
            "final is required", b'{"type":"transcript","session":1,"text":"hi","backend":"x","start_ms":0,"end_ms":0}'
        ),
    }
    for reason, offset in [
        (EndReason.SILENCE, 1850),
        (EndReason.DEVICE, 2400),
        (EndReason.MAX_LENGTH, 30000),
        (EndReason.BACKEND, 1200),
        (EndReason.CANCEL, 640),
        (EndReason.TIMEOUT, 5120),
        (EndReason.NO_SPEECH, 3008),
    ]:
        vectors[f"bridge_speech_ended_{reason.value}"] = bridge(
            f"turn over, reason {reason.value}", SpeechEnded(session=s, offset_ms=offset, reason=reason)
        )
    missing = [code.value for code in ErrorCode if code.value not in ERROR_EXAMPLES]
    assert not missing, f"add an example to ERROR_EXAMPLES for every error code: {missing}"
    for code in ErrorCode:
        text, retryable, session = ERROR_EXAMPLES[code.value]
        note = " (reserved: not sent by this bridge version)" if code in RESERVED_CODES else ""
        vectors[f"bridge_error_{code.value}"] = bridge(
            f"error {code.value}{note}", Error(code=code, message=text, retryable=retryable, session=session)
        )
    vectors["bridge_error_too_many_sessions_retry_after"] = bridge(
        "too_many_sessions with the optional retry_after_ms hint: wait at least this long, then a new session id",
        Error(
            code=ErrorCode.TOO_MANY_SESSIONS,
            message="200 sessions are active; retry shortly",
            retryable=True,
            session=s,
            retry_after_ms=1500,
        ),
    )
    # A transcript longer than the device cap, cut by the bridge's own publisher (service/publisher.py).
    # Mixed ASCII and 3-byte UTF-8 characters, so the cut has to respect character boundaries.
    long_text = "turn on the kitchen light 打开厨房的灯 " * 40
    long = Transcript(
        session=s, final=True, text=long_text, backend="pocketsphinx", start_ms=420, end_ms=29000, latency_ms=640
    )
    cut = fit(long, DEVICE_MESSAGE_CAP)
    assert len(cut) <= DEVICE_MESSAGE_CAP
    vectors["bridge_transcript_truncated"] = message(
        "bridge_message",
        f"final transcript cut by the bridge to fit {DEVICE_MESSAGE_CAP} bytes; truncated is true",
        cut,
        canonical=True,
    )
    return vectors


# Output ------------------------------------------------------------------------------------


def build() -> dict[str, bytes]:
    """Every file name → its exact content."""
    files: dict[str, bytes] = {}
    for name, (data, meta) in sorted(audio_vectors().items()):
        files[f"{name}.bin"] = data
        files[f"{name}.json"] = describe(meta)
    for name, (data, meta) in sorted(message_vectors().items()):
        files[f"{name}.msg"] = data
        files[f"{name}.json"] = describe(meta)
    return files


def describe(meta: dict[str, Any]) -> bytes:
    return (json.dumps(meta, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=VECTORS_DIR)
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    files = build()
    stale = []
    for name, content in files.items():
        path = args.out / name
        if args.check:
            if not path.is_file() or path.read_bytes() != content:
                stale.append(name)
        elif not path.is_file() or path.read_bytes() != content:
            args.out.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
            stale.append(name)
    if args.check:
        for name in stale:
            print(f"out of date: {name}", file=sys.stderr)
        return 1 if stale else 0
    print(f"{len(files)} files in {args.out}, {len(stale)} written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
