"""Speech-recognition backends behind one interface (:mod:`service.backends.base`)."""

from service.backends.base import (
    BackendError,
    Recognition,
    RecognitionStream,
    SessionOptions,
    StreamListener,
    TranscriptionBackend,
)

__all__ = [
    "BackendError",
    "Recognition",
    "RecognitionStream",
    "SessionOptions",
    "StreamListener",
    "TranscriptionBackend",
]
