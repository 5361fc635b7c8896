"""Stage 5 of the data path: speech-recognition backends behind one interface (:mod:`service.recognition.base`)."""

from service.recognition.base import (
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
