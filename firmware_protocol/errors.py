"""Error codes the bridge publishes on a device's error topic, and the decode error."""

from __future__ import annotations

import enum


class ErrorCode(enum.StrEnum):
    """Stable, machine-readable error codes (see PROTOCOL.md, "Error codes")."""

    MALFORMED_FRAME = "malformed_frame"
    UNSUPPORTED_VERSION = "unsupported_version"
    UNSUPPORTED_CODEC = "unsupported_codec"
    UNSUPPORTED_FORMAT = "unsupported_format"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    BAD_CONTROL = "bad_control"
    UNKNOWN_DEVICE = "unknown_device"
    UTTERANCE_TOO_LONG = "utterance_too_long"
    TOO_MANY_SESSIONS = "too_many_sessions"
    AUDIO_GAP = "audio_gap"
    """A session's frames skipped more audio than ``session.max_gap_ms``: the session is ended, not concealed."""
    SESSION_TIMEOUT = "session_timeout"
    BACKEND_ERROR = "backend_error"
    BACKEND_UNAVAILABLE = "backend_unavailable"
    BACKEND_TIMEOUT = "backend_timeout"
    BACKEND_RATE_LIMITED = "backend_rate_limited"
    BACKEND_AUTH = "backend_auth"
    """The backend refused the bridge's credentials (401/403): an operator must fix the config."""
    BACKEND_REJECTED = "backend_rejected"
    """The backend refused this request (400/413/422): retrying the same audio will not help."""
    INTERNAL = "internal"


class ProtocolError(ValueError):
    """A frame or message that does not follow the contract.

    ``field`` names the offending header field or JSON path so that firmware
    authors see exactly what to fix; ``code`` is what the bridge reports.
    """

    def __init__(self, code: ErrorCode, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.code = code
        self.field = field
        self.reason = reason


def ends_session(code: ErrorCode) -> bool:
    """An error naming a session ends it, except ``utterance_too_long``, which a final follows."""
    return code is not ErrorCode.UTTERANCE_TOO_LONG
