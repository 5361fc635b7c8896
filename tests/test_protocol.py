"""The wire contract: every vector file, codec round trips, fuzzing, topics, PROTOCOL.md.

Pure and fast: no broker, no bridge. Vectors are picked up by glob, so a new pair of
files in ``firmware_protocol/vectors/`` is tested without touching this module.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import struct
import typing
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import firmware_protocol
from firmware_protocol import (
    DEFAULT_PREFIX,
    HEADER_SIZE,
    MAGIC,
    PROTOCOL_VERSION,
    AudioFrame,
    BridgeMessage,
    BridgeStatus,
    Cancel,
    Codec,
    Configure,
    Configured,
    DeviceMessage,
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
    TopicKind,
    Topics,
    Transcript,
    decode_bridge_message,
    decode_device_message,
    encode_message,
    is_valid_device_id,
)

PACKAGE = Path(firmware_protocol.__file__).parent
VECTORS = PACKAGE / "vectors"
PROTOCOL_MD = PACKAGE / "PROTOCOL.md"
DATA_SUFFIX = {"audio_frame": ".bin", "device_message": ".msg", "bridge_message": ".msg"}


def _vector_params() -> list[Any]:
    return [pytest.param(path, id=path.stem) for path in sorted(VECTORS.glob("*.json"))]


def _message_fields(message: Any) -> dict[str, Any]:
    """The tag and every field, defaults included, as JSON builtins (the vectors' ``decoded``)."""
    fields: dict[str, Any] = {"type": message.__struct_config__.tag}
    for name in message.__struct_fields__:
        fields[name] = msgspec.to_builtins(getattr(message, name))
    return fields


def _bridge_would_accept(frame: AudioFrame) -> bool:
    """What service/sessions.py accepts today: PCM s16le, 16 kHz, mono."""
    return frame.codec == Codec.PCM_S16LE and frame.sample_rate == 16000 and frame.channels == 1


# Vector files ------------------------------------------------------------------------------


def test_vector_directory_is_populated_and_paired() -> None:
    metas = sorted(VECTORS.glob("*.json"))
    assert metas, f"no vectors in {VECTORS}: run tests/make_vectors.py"
    data_files = {p.stem for p in VECTORS.iterdir() if p.suffix in (".bin", ".msg")}
    assert data_files == {p.stem for p in metas}, "every NAME.bin/NAME.msg needs a NAME.json and vice versa"
    kinds: dict[str, set[str]] = {}
    for path in metas:
        meta = json.loads(path.read_text(encoding="utf-8"))
        assert meta["kind"] in DATA_SUFFIX, path.name
        assert path.with_suffix(DATA_SUFFIX[meta["kind"]]).is_file(), path.name
        if meta["valid"] and meta["kind"] != "audio_frame":
            kinds.setdefault(meta["kind"], set()).add(meta["decoded"]["type"])

    def tags(union: Any) -> set[str]:
        return {member.__struct_config__.tag for member in typing.get_args(union)}

    assert kinds["device_message"] == tags(DeviceMessage)  # every message type has a vector
    assert kinds["bridge_message"] == tags(BridgeMessage)
    for code in ErrorCode:
        assert (VECTORS / f"bridge_error_{code.value}.msg").is_file(), code
    for reason in EndReason:
        assert (VECTORS / f"bridge_speech_ended_{reason.value}.msg").is_file(), reason


def test_vectors_are_reproducible() -> None:
    """The committed files are exactly what tests/make_vectors.py writes today."""
    spec = importlib.util.spec_from_file_location("make_vectors", Path(__file__).parent / "make_vectors.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    built: dict[str, bytes] = module.build()
    stale = [name for name, content in built.items() if (VECTORS / name).read_bytes() != content]
    assert not stale, f"re-run tests/make_vectors.py: {stale}"


@pytest.mark.parametrize("path", _vector_params())
def test_vector(path: Path) -> None:
    meta = json.loads(path.read_text(encoding="utf-8"))
    data = path.with_suffix(DATA_SUFFIX[meta["kind"]]).read_bytes()
    if meta["kind"] == "audio_frame":
        _check_frame_vector(meta, data)
    else:
        _check_message_vector(meta, data)


def _check_frame_vector(meta: dict[str, Any], data: bytes) -> None:
    if not meta["valid"]:
        with pytest.raises(ProtocolError) as info:
            AudioFrame.decode(data)
        assert (info.value.code.value, info.value.field) == (meta["error"]["code"], meta["error"]["field"])
        return
    frame = AudioFrame.decode(data)
    fields = meta["fields"]
    assert frame.session_id == fields["session_id"]
    assert frame.seq == fields["seq"]
    assert int(frame.flags) == fields["flags"]
    assert frame.first is fields["first"]
    assert frame.last is fields["last"]
    assert int(frame.codec) == fields["codec"]
    assert frame.channels == fields["channels"]
    assert frame.sample_rate == fields["sample_rate"]
    assert frame.version == fields["version"]
    assert len(frame.payload) == fields["payload_len"] == len(data) - HEADER_SIZE
    assert "payload_hex" in fields or "payload_sha256" in fields
    if "payload_hex" in fields:
        assert frame.payload.hex() == fields["payload_hex"]
    if "payload_sha256" in fields:
        assert hashlib.sha256(frame.payload).hexdigest() == fields["payload_sha256"]
    assert frame.encode() == data
    assert meta["supported"] is _bridge_would_accept(frame)
    if not meta["supported"]:
        expected = ErrorCode.UNSUPPORTED_CODEC if frame.codec != Codec.PCM_S16LE else ErrorCode.UNSUPPORTED_FORMAT
        assert meta["bridge_error"]["code"] == expected.value


def _check_message_vector(meta: dict[str, Any], data: bytes) -> None:
    decode = decode_device_message if meta["kind"] == "device_message" else decode_bridge_message
    if not meta["valid"]:
        with pytest.raises(ProtocolError) as info:
            decode(data)
        assert (info.value.code.value, info.value.field) == (meta["error"]["code"], meta["error"]["field"])
        return
    message = decode(data)
    assert _message_fields(message) == meta["decoded"]
    reencoded = encode_message(message)
    if meta["canonical"]:
        assert reencoded == data
    else:
        assert reencoded != data
        assert decode(reencoded) == message


# Audio frames ------------------------------------------------------------------------------

u32 = st.integers(0, 0xFFFFFFFF)
session_ids = st.integers(1, 0xFFFFFFFF)


@st.composite
def frames(draw: st.DrawFn) -> AudioFrame:
    codec = draw(st.sampled_from(list(Codec)) | st.integers(0, 255))
    channels = draw(st.sampled_from([1, 2]) | st.integers(1, 255))
    payload = draw(st.binary(max_size=1024))
    if codec == Codec.PCM_S16LE:
        payload = payload[: len(payload) - len(payload) % (2 * channels)]
    return AudioFrame(
        session_id=draw(session_ids),
        seq=draw(u32),
        payload=payload,
        flags=FrameFlags(draw(st.integers(0, 3))),
        codec=codec,
        channels=channels,
        sample_rate=draw(st.sampled_from([8000, 16000, 24000, 48000]) | st.integers(1, 0xFFFF)),
    )


@given(frames())
def test_frame_round_trip(frame: AudioFrame) -> None:
    data = frame.encode()
    assert len(data) == HEADER_SIZE + len(frame.payload)
    decoded = AudioFrame.decode(data)
    assert decoded == frame
    assert decoded.encode() == data


@given(frames())
def test_frame_header_layout_matches_the_documented_table(frame: AudioFrame) -> None:
    data = frame.encode()
    assert data[0:2] == MAGIC == b"EK"
    assert data[2] == PROTOCOL_VERSION == 1
    assert data[3] == int(frame.flags)
    assert int.from_bytes(data[4:8], "little") == frame.session_id
    assert int.from_bytes(data[8:12], "little") == frame.seq
    assert data[12] == int(frame.codec)
    assert data[13] == frame.channels
    assert int.from_bytes(data[14:16], "little") == frame.sample_rate
    assert data[16:] == frame.payload


def test_frame_flags_and_constants() -> None:
    assert HEADER_SIZE == 16
    assert (FrameFlags.FIRST, FrameFlags.LAST) == (1, 2)
    assert (Codec.PCM_S16LE, Codec.OPUS) == (0, 1)
    frame = AudioFrame(1, 0, b"", FrameFlags.FIRST | FrameFlags.LAST)
    assert frame.first and frame.last
    assert not AudioFrame(1, 5, b"").first
    assert AudioFrame.decode(AudioFrame(1, 0, b"", codec=200).encode()).codec == 200  # unknown codec ids kept


@pytest.mark.parametrize("flags", [0x04, 0x08, 0x10, 0x20, 0x40, 0x80, 0xFF])
def test_every_reserved_flag_bit_is_rejected(flags: int) -> None:
    data = bytearray(AudioFrame(1, 0, b"").encode())
    data[3] = flags
    with pytest.raises(ProtocolError) as info:
        AudioFrame.decode(bytes(data))
    assert (info.value.code, info.value.field) == (ErrorCode.MALFORMED_FRAME, "flags")


def test_decode_accepts_bytearray_and_memoryview() -> None:
    data = AudioFrame(9, 1, b"\x01\x00").encode()
    assert AudioFrame.decode(bytearray(data)) == AudioFrame.decode(memoryview(data)) == AudioFrame.decode(data)


def _mutations(seed: bytes) -> st.SearchStrategy[bytes]:
    """``seed`` truncated, or with one byte replaced, or with bytes inserted."""
    n = len(seed)
    truncated = st.integers(0, n).map(lambda i: seed[:i])
    replaced = st.tuples(st.integers(0, max(n - 1, 0)), st.integers(0, 255)).map(
        lambda t: seed[: t[0]] + bytes([t[1]]) + seed[t[0] + 1 :]
    )
    inserted = st.tuples(st.integers(0, n), st.binary(min_size=1, max_size=4)).map(
        lambda t: seed[: t[0]] + t[1] + seed[t[0] :]
    )
    return truncated | replaced | inserted


frame_fuzz = st.binary(max_size=64) | frames().flatmap(lambda f: _mutations(f.encode()))


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(frame_fuzz)
def test_frame_decode_never_raises_anything_but_protocol_error(data: bytes) -> None:
    try:
        frame = AudioFrame.decode(data)
    except ProtocolError as exc:
        assert isinstance(exc.code, ErrorCode)
        assert exc.field in {"header", "magic", "version", "flags", "session_id", "channels", "sample_rate", "payload"}
    else:
        assert frame.encode() == data


# JSON messages -----------------------------------------------------------------------------

text = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)  # lone surrogates are not UTF-8
optional_text = st.none() | text
millis = st.integers(0, 2**31 - 1)

device_messages = st.one_of(
    st.builds(
        Start,
        session=session_ids,
        language=optional_text,
        prompt=optional_text,
        endpointing=st.none() | st.sampled_from(Endpointing),
    ),
    st.builds(Cancel, session=session_ids),
    st.builds(
        Configure,
        reset=st.booleans(),
        endpointing=st.none() | st.sampled_from(Endpointing),
        threshold=st.none() | st.floats(0, 1, exclude_min=True),
        neg_threshold=st.none() | st.floats(0, 1),
        min_speech_duration_ms=st.none() | st.integers(0, 60_000),
        max_silence_duration_ms=st.none() | st.integers(0, 60_000),
        hangover_ms=st.none() | st.integers(0, 60_000),
        no_speech_timeout_ms=st.none() | st.integers(1, 60_000),
        max_utterance_s=st.none() | st.floats(0.001, 3600),
    ),
)
bridge_messages = st.one_of(
    st.builds(
        Listening, session=session_ids, endpointing=st.sampled_from(Endpointing), sample_rate=st.integers(1, 0xFFFF)
    ),
    st.builds(SpeechStarted, session=session_ids, offset_ms=millis),
    st.builds(SpeechEnded, session=session_ids, offset_ms=millis, reason=st.sampled_from(EndReason)),
    st.builds(
        Transcript,
        session=session_ids,
        final=st.booleans(),
        text=text,
        backend=text,
        start_ms=millis,
        end_ms=millis,
        language=optional_text,
        latency_ms=st.none() | millis,
        reason=st.none() | st.sampled_from(EndReason),
        truncated=st.booleans(),
    ),
    st.builds(
        Error,
        code=st.sampled_from(ErrorCode),
        message=text,
        retryable=st.booleans(),
        session=st.none() | session_ids,
    ),
    st.builds(
        Configured,
        endpointing=st.sampled_from(Endpointing),
        threshold=st.floats(0, 1),
        neg_threshold=st.floats(0, 1),
        min_speech_duration_ms=millis,
        max_silence_duration_ms=millis,
        hangover_ms=millis,
        no_speech_timeout_ms=millis,
        max_utterance_s=st.floats(0.001, 3600),
    ),
    st.builds(
        BridgeStatus,
        state=st.sampled_from(["online", "offline"]),
        version=text,
        instance=text,
        protocol=st.integers(1, 255),
    ),
)


@given(device_messages)
def test_device_message_round_trip(message: Start | Cancel | Configure) -> None:
    data = encode_message(message)
    assert decode_device_message(data) == message
    with pytest.raises(ProtocolError):
        decode_bridge_message(data)  # the two directions share no type


@given(bridge_messages)
def test_bridge_message_round_trip(message: Any) -> None:
    data = encode_message(message)
    assert decode_bridge_message(data) == message
    with pytest.raises(ProtocolError):
        decode_device_message(data)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=8,
)


@given(device_messages | bridge_messages, st.from_regex(r"x_[a-z]{1,8}", fullmatch=True), json_values)
def test_unknown_fields_are_ignored(message: Any, name: str, value: Any) -> None:
    data = encode_message(message)
    extended = data[:-1] + b"," + msgspec.json.encode(name) + b":" + msgspec.json.encode(value) + b"}"
    decode = decode_device_message if isinstance(message, Start | Cancel | Configure) else decode_bridge_message
    assert decode(extended) == message


def test_required_fields_always_on_the_wire_optional_ones_only_when_set() -> None:
    listening = encode_message(Listening(session=5, endpointing=Endpointing.SERVER_VAD, sample_rate=16000))
    assert listening == b'{"type":"listening","session":5,"endpointing":"server_vad","sample_rate":16000}'
    status = encode_message(BridgeStatus(state="online", version="1", instance="i", protocol=PROTOCOL_VERSION))
    assert status == b'{"type":"status","state":"online","version":"1","instance":"i","protocol":1}'
    error = encode_message(Error(code=ErrorCode.INTERNAL, message="x", retryable=False))
    assert error == b'{"type":"error","code":"internal","message":"x","retryable":false}'
    partial = Transcript(session=1, final=False, text="a", backend="b", start_ms=0, end_ms=20)
    assert encode_message(partial) == (
        b'{"type":"transcript","session":1,"final":false,"text":"a","backend":"b","start_ms":0,"end_ms":20}'
    )
    cut = encode_message(msgspec.structs.replace(partial, truncated=True))
    assert cut.endswith(b',"truncated":true}')
    assert decode_bridge_message(
        b'{"type":"transcript","session":1,"final":true,"text":"","backend":"b",'
        b'"start_ms":0,"end_ms":0,"language":null,"reason":null}'
    ) == (msgspec.structs.replace(partial, final=True, text="", end_ms=0))


message_fuzz = st.one_of(
    st.binary(max_size=80),
    json_values.map(msgspec.json.encode),
    st.builds(
        lambda tag, session, extra: msgspec.json.encode({"type": tag, "session": session, **extra}),
        st.sampled_from(["start", "cancel", "listening", "transcript", "error", "status"]) | text,
        json_values,
        st.dictionaries(st.sampled_from(["language", "prompt", "endpointing", "final", "text", "code"]), json_values),
    ),
    (device_messages | bridge_messages).flatmap(lambda m: _mutations(encode_message(m))),
)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(message_fuzz)
def test_message_decoders_never_raise_anything_but_protocol_error(data: bytes) -> None:
    for decode in (decode_device_message, decode_bridge_message):
        try:
            decode(data)
        except ProtocolError as exc:
            assert exc.code is ErrorCode.BAD_CONTROL
            assert exc.field == "$" or exc.field.startswith("$.") or exc.field.startswith("$[")


@pytest.mark.parametrize(
    "data",
    [b'{"type":"\xff","session":1}', b'{"type":"start","session":1,"prompt":"\xc3("}'],
)
def test_invalid_utf8_in_a_decoded_string_is_bad_control(data: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_device_message(data)
    assert info.value.code is ErrorCode.BAD_CONTROL


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (b'{"type":"start","session":-1}', "$.session"),
        (b'{"type":"start","session":1,"prompt":["a"]}', "$.prompt"),
        (b'{"type":"cancel","session":null}', "$.session"),
        (b'{"type":5,"session":1}', "$.type"),
        (b"", "$"),
        (b"null", "$"),
    ],
)
def test_bad_control_names_the_json_path(data: bytes, field: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_device_message(data)
    assert (info.value.code, info.value.field) == (ErrorCode.BAD_CONTROL, field)


# Topics ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "topic"),
    [
        (TopicKind.AUDIO, "echokit/aabbccddeeff/in/audio"),
        (TopicKind.CONTROL, "echokit/aabbccddeeff/in/control"),
        (TopicKind.SESSION, "echokit/aabbccddeeff/out/session"),
        (TopicKind.VAD, "echokit/aabbccddeeff/out/vad"),
        (TopicKind.TRANSCRIPT, "echokit/aabbccddeeff/out/transcript"),
        (TopicKind.ERROR, "echokit/aabbccddeeff/out/error"),
    ],
)
def test_device_topics(kind: TopicKind, topic: str) -> None:
    topics = Topics()
    assert topics.device("aabbccddeeff", kind) == topic
    assert topics.parse(topic) == ("aabbccddeeff", kind)


def test_prefix_status_and_filters() -> None:
    assert DEFAULT_PREFIX == "echokit"
    topics = Topics()
    assert topics.status == "echokit/status"
    assert topics.audio_filter == "echokit/+/in/audio"
    assert topics.control_filter == "echokit/+/in/control"
    home = Topics("home/voice")
    assert home.device("kitchen-1", TopicKind.VAD) == "home/voice/kitchen-1/out/vad"
    assert home.status == "home/voice/status"
    assert home.parse("home/voice/kitchen-1/in/audio") == ("kitchen-1", TopicKind.AUDIO)
    assert home.parse("echokit/kitchen-1/in/audio") is None


@pytest.mark.parametrize(
    "topic",
    [
        "echokit/status",  # the bridge's status: two levels, never a device topic
        "echokit",
        "echokit/",
        "echokit/dev",
        "echokit/dev/",
        "echokit/dev/in",
        "echokit/dev/in/",
        "echokit/dev/in/other",
        "echokit/dev/out/other",
        "echokit/dev/in/audio/extra",
        "echokit/dev/audio",
        "echokit/dev/IN/AUDIO",
        "echokitx/dev/in/audio",
        "other/dev/in/audio",
        "/echokit/dev/in/audio",
        "",
    ],
)
def test_parse_rejects_foreign_topics_and_unknown_kinds(topic: str) -> None:
    assert Topics().parse(topic) is None


@pytest.mark.parametrize("kind", ["in/other", "out/status", "audio", "in/audio/", ""])
def test_invalid_kinds(kind: str) -> None:
    with pytest.raises(ValueError):
        TopicKind(kind)


def test_parse_returns_invalid_ids_for_the_caller_to_judge() -> None:
    assert Topics().parse("echokit//in/audio") == ("", TopicKind.AUDIO)
    assert Topics().parse("echokit/a b/in/control") == ("a b", TopicKind.CONTROL)
    assert Topics().parse("echokit/status/in/audio") == ("status", TopicKind.AUDIO)  # no clash with the status topic
    assert not is_valid_device_id("") and not is_valid_device_id("a b")


@pytest.mark.parametrize(
    ("device_id", "valid"),
    [
        ("aabbccddeeff", True),  # EchoKit: Wi-Fi STA MAC, 12 lower-case hex digits
        ("AABBCCDDEEFF", True),
        ("a", True),
        ("0", True),
        ("kitchen_satellite-01", True),
        ("-", True),
        ("_", True),
        ("x" * 64, True),
        ("x" * 65, False),
        ("", False),
        ("aa:bb:cc:dd:ee:ff", False),  # a MAC with separators is not an id
        ("aa-bb-cc-dd-ee-ff", True),
        ("a/b", False),
        ("a+b", False),
        ("#", False),
        ("+", False),
        ("a b", False),
        ("a.b", False),
        ("dév", False),
        ("١٢٣", False),  # non-ASCII digits
        ("abc\n", False),
        ("\nabc", False),
        ("abc\x00", False),
    ],
)
def test_device_id_rules(device_id: str, valid: bool) -> None:
    assert is_valid_device_id(device_id) is valid


@given(st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True), st.sampled_from(TopicKind))
def test_every_valid_id_round_trips_through_every_topic(device_id: str, kind: TopicKind) -> None:
    assert is_valid_device_id(device_id)
    topics = Topics()
    assert topics.parse(topics.device(device_id, kind)) == (device_id, kind)


@given(st.text(max_size=70))
def test_device_id_validity_is_exactly_the_documented_pattern(device_id: str) -> None:
    expected = 1 <= len(device_id) <= 64 and all(c.isascii() and (c.isalnum() or c in "_-") for c in device_id)
    assert is_valid_device_id(device_id) is expected


# PROTOCOL.md -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def protocol_md() -> str:
    return PROTOCOL_MD.read_text(encoding="utf-8")


def test_protocol_md_names_every_code_reason_mode_and_topic(protocol_md: str) -> None:
    for value in [*ErrorCode, *EndReason, *Endpointing, *TopicKind]:
        assert f"`{value.value}`" in protocol_md, value


def test_protocol_md_json_examples_are_real_encoder_output(protocol_md: str) -> None:
    examples = [line.strip() for line in protocol_md.splitlines() if line.strip().startswith('{"type":')]
    assert len(examples) >= 10
    for line in examples:
        data = line.encode("utf-8")
        try:
            message: Any = decode_bridge_message(data)
        except ProtocolError:
            message = decode_device_message(data)
        assert encode_message(message) == data, line


def test_protocol_md_header_table_matches_the_struct(protocol_md: str) -> None:
    assert struct.calcsize("<2sBBIIBBH") == HEADER_SIZE
    rows = re.findall(r"^\| (\d+) \| (\d+) \| `(\w+)` \|", protocol_md, flags=re.MULTILINE)
    assert [(int(o), int(s), name) for o, s, name in rows] == [
        (0, 2, "magic"),
        (2, 1, "version"),
        (3, 1, "flags"),
        (4, 4, "session_id"),
        (8, 4, "seq"),
        (12, 1, "codec"),
        (13, 1, "channels"),
        (14, 2, "sample_rate"),
    ]


def test_protocol_md_hex_example_is_the_first_frame_vector(protocol_md: str) -> None:
    rows = re.findall(r"^((?:[0-9A-F]{2} ){8} (?:[0-9A-F]{2} ?){8}) ", protocol_md, flags=re.MULTILINE)
    assert len(rows) == 2
    assert bytes.fromhex("".join(rows)) == (VECTORS / "frame_first.bin").read_bytes()


def test_protocol_md_limits_match_the_defaults(protocol_md: str) -> None:
    from service.config import Config
    from service.ingest.devices import QUIET_FLUSH_S
    from service.ingest.limits import ERROR_INTERVAL_S, START_BURST
    from service.ingest.router import MAX_CONTROL_BYTES

    session = Config().session
    expected = {
        "session.max_frame_bytes": session.max_frame_bytes,
        "session.max_device_message_bytes": session.max_device_message_bytes,
        "session.max_utterance_s": f"{session.max_utterance_s:g} s",
        "session.reorder_window": f"{session.reorder_window} frames",
        "session.idle_timeout_s": f"{session.idle_timeout_s:g} s",
        "session.no_speech_timeout_ms": f"{session.no_speech_timeout_ms} ms",
        "session.max_sessions": session.max_sessions,
        "MAX_CONTROL_BYTES": MAX_CONTROL_BYTES,
        "ERROR_INTERVAL_S": f"{ERROR_INTERVAL_S:g} s",
        "session.max_gap_ms": f"{session.max_gap_ms} ms",
        "session.max_starts_per_s": f"{session.max_starts_per_s:g} per second",
        "START_BURST": START_BURST,
        "session.max_errors_per_s": f"{session.max_errors_per_s} per second",
        "QUIET_FLUSH_S": f"{QUIET_FLUSH_S * 1000:g} ms",
    }
    for key, value in expected.items():
        rows = [line for line in protocol_md.splitlines() if line.startswith("|") and f"`{key}`" in line]
        assert rows, f"PROTOCOL.md has no limits row naming `{key}`"
        assert any(f"| {value} |" in row for row in rows), (key, value, rows)
