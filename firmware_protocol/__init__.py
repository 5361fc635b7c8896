"""The EchoKit MQTT ASR wire contract: topics, binary audio frames, JSON messages.

Pure Python, no I/O. Firmware authors read ``PROTOCOL.md``; this package is the
reference encoder/decoder that the bridge and the device simulator share.
"""

from firmware_protocol.audio import (
    HEADER_SIZE,
    MAGIC,
    PROTOCOL_VERSION,
    SAMPLE_RATE,
    SAMPLES_PER_MS,
    AudioFrame,
    Codec,
    FrameFlags,
)
from firmware_protocol.errors import ErrorCode, ProtocolError, ends_session
from firmware_protocol.messages import (
    BridgeMessage,
    BridgeStatus,
    Cancel,
    Configure,
    Configured,
    DeviceMessage,
    Endpointing,
    EndpointingOverrides,
    EndReason,
    Error,
    Listening,
    SpeechEnded,
    SpeechStarted,
    Start,
    Transcript,
    VadEngine,
    decode_bridge_message,
    decode_device_message,
    encode_message,
)
from firmware_protocol.routing import DEVICE_TOPIC_KINDS, STATUS_QOS, Route, device_route
from firmware_protocol.topics import DEFAULT_PREFIX, TopicKind, Topics, is_valid_device_id

__all__ = [
    "DEFAULT_PREFIX",
    "DEVICE_TOPIC_KINDS",
    "HEADER_SIZE",
    "MAGIC",
    "PROTOCOL_VERSION",
    "SAMPLES_PER_MS",
    "SAMPLE_RATE",
    "STATUS_QOS",
    "AudioFrame",
    "BridgeMessage",
    "BridgeStatus",
    "Cancel",
    "Codec",
    "Configure",
    "Configured",
    "DeviceMessage",
    "EndReason",
    "Endpointing",
    "EndpointingOverrides",
    "Error",
    "ErrorCode",
    "FrameFlags",
    "Listening",
    "ProtocolError",
    "Route",
    "SpeechEnded",
    "SpeechStarted",
    "Start",
    "TopicKind",
    "Topics",
    "Transcript",
    "VadEngine",
    "decode_bridge_message",
    "decode_device_message",
    "device_route",
    "encode_message",
    "ends_session",
    "is_valid_device_id",
]
