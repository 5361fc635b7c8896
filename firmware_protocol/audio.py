"""Binary audio frames: a 16-byte little-endian header followed by samples.

    offset size field
    0      2    magic        b"EK"
    2      1    version      1
    3      1    flags        bit 0 FIRST, bit 1 LAST, bits 2-7 reserved (0)
    4      4    session_id   u32, chosen by the device, non-zero
    8      4    seq          u32, 0 for the first frame of a session, +1 per frame
    12     1    codec        0 = PCM s16le, 1 = Opus (reserved)
    13     1    channels     1
    14     2    sample_rate  u16, Hz (16000)

Encoding and decoding are pure; validation of what the bridge *supports* (rate,
channels, codec) is separate from what is *well-formed*, so a future bridge can accept
more without a new frame version.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from firmware_protocol.errors import ErrorCode, ProtocolError

MAGIC = b"EK"
PROTOCOL_VERSION = 1
HEADER = struct.Struct("<2sBBIIBBH")
HEADER_SIZE = HEADER.size  # 16
_RESERVED_FLAGS = 0xFC
SAMPLE_RATE = 16000
"""Hz: the only rate the bridge takes (mono, 16-bit); frames carry it, ``listening`` announces it."""
SAMPLES_PER_MS = SAMPLE_RATE // 1000


class FrameFlags(enum.IntFlag):
    NONE = 0
    FIRST = 0x01
    """First frame of a session (seq 0). Repeated on a running session it restarts it."""
    LAST = 0x02
    """Last frame of a session: the device stopped talking (push-to-talk release)."""


class Codec(enum.IntEnum):
    PCM_S16LE = 0
    OPUS = 1


@dataclass(frozen=True, slots=True)
class AudioFrame:
    session_id: int
    seq: int
    payload: bytes
    flags: FrameFlags = FrameFlags.NONE
    codec: Codec | int = Codec.PCM_S16LE
    channels: int = 1
    sample_rate: int = SAMPLE_RATE
    version: int = PROTOCOL_VERSION

    @property
    def first(self) -> bool:
        return bool(self.flags & FrameFlags.FIRST)

    @property
    def last(self) -> bool:
        return bool(self.flags & FrameFlags.LAST)

    def encode(self) -> bytes:
        return (
            HEADER.pack(
                MAGIC,
                self.version,
                int(self.flags),
                self.session_id,
                self.seq,
                int(self.codec),
                self.channels,
                self.sample_rate,
            )
            + self.payload
        )

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> AudioFrame:
        """Parse a frame; raise :class:`ProtocolError` naming the bad field."""
        if len(data) < HEADER_SIZE:
            raise ProtocolError(
                ErrorCode.MALFORMED_FRAME,
                "header",
                f"frame is {len(data)} bytes, the header alone is {HEADER_SIZE}",
            )
        magic, version, flags, session_id, seq, codec, channels, rate = HEADER.unpack_from(data)
        if magic != MAGIC:
            raise ProtocolError(ErrorCode.MALFORMED_FRAME, "magic", f"expected b'EK', got {magic!r}")
        if version != PROTOCOL_VERSION:
            raise ProtocolError(
                ErrorCode.UNSUPPORTED_VERSION,
                "version",
                f"version {version} is not supported (this bridge speaks {PROTOCOL_VERSION})",
            )
        if flags & _RESERVED_FLAGS:
            raise ProtocolError(ErrorCode.MALFORMED_FRAME, "flags", f"reserved bits set in {flags:#04x}")
        if session_id == 0:
            raise ProtocolError(ErrorCode.MALFORMED_FRAME, "session_id", "must be non-zero")
        if channels == 0:
            raise ProtocolError(ErrorCode.MALFORMED_FRAME, "channels", "must be at least 1")
        if rate == 0:
            raise ProtocolError(ErrorCode.MALFORMED_FRAME, "sample_rate", "must be non-zero")
        payload = bytes(data[HEADER_SIZE:])
        if codec == Codec.PCM_S16LE and len(payload) % (2 * channels):
            raise ProtocolError(
                ErrorCode.MALFORMED_FRAME,
                "payload",
                f"{len(payload)} bytes is not a whole number of {channels}-channel s16 samples",
            )
        try:
            codec_value: Codec | int = Codec(codec)
        except ValueError:
            codec_value = codec
        return cls(
            session_id=session_id,
            seq=seq,
            payload=payload,
            flags=FrameFlags(flags),
            codec=codec_value,
            channels=channels,
            sample_rate=rate,
            version=version,
        )
