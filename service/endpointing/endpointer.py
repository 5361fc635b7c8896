"""EchoKit's endpointer: speech probabilities, one per 32 ms window, in; turn events out.

Pure logic, no I/O and no clock: whichever engine scores the windows (:mod:`.engines`), the
rules that start, pause, resume and end a turn are these.
"""

from __future__ import annotations

from dataclasses import dataclass

from firmware_protocol import SAMPLE_RATE, EndReason
from service.config import VadConfig

WINDOW = 512  # samples: 32 ms, the window EchoKit and Silero v5 use at 16 kHz
WINDOW_MS = WINDOW * 1000 // SAMPLE_RATE


@dataclass(frozen=True, slots=True)
class SpeechStart:
    offset_ms: int


@dataclass(frozen=True, slots=True)
class SpeechPause:
    """EchoKit's "speech end": enough speech then silence; the turn may still resume."""

    offset_ms: int


@dataclass(frozen=True, slots=True)
class SpeechResumed:
    """After a pause, ``min_speech_duration_ms`` of new speech: the turn goes on (EchoKit cancels its ASR)."""

    offset_ms: int


@dataclass(frozen=True, slots=True)
class TurnEnd:
    offset_ms: int
    reason: EndReason


EndpointEvent = SpeechStart | SpeechPause | SpeechResumed | TurnEnd


class Endpointer:
    """EchoKit's turn loop (``src/services/ws/stable/asr.rs``), one 32 ms probability at a time.

    A window above ``threshold`` is speech; ``max_silence_duration_ms`` of windows below
    ``neg_threshold`` leave speech. Once ``min_speech_duration_ms`` of speech is followed by
    silence the speech has paused; silence lasting ``hangover_ms`` longer ends the turn.
    Unlike EchoKit, waiting for the first word has its own timeout (``no_speech_timeout_ms``)
    because a push-to-talk or wake-word device may open the stream before the user speaks.
    """

    def __init__(self, config: VadConfig, no_speech_timeout_ms: int) -> None:
        self._threshold = min(config.threshold, 0.95)
        self._neg_threshold = config.effective_neg_threshold
        # As EchoKit's vad.rs: 200 ms * 16 / 512 = 6 windows (integer division, not rounded up).
        self._silence_windows = max(1, config.max_silence_duration_ms * SAMPLE_RATE // 1000 // WINDOW)
        self._min_speech_ms = config.min_speech_duration_ms
        self._hangover_ms = config.hangover_ms
        self._no_speech_ms = no_speech_timeout_ms
        self._now_ms = 0
        self._in_speech = False
        self._silent_windows = 0
        self._speech_ms = 0
        self._silence_ms = 0
        self._started = False
        self._paused_at: int | None = None
        self._resumed = False
        self._last_voiced_ms = 0
        self.finished = False

    def update(self, probability: float) -> list[EndpointEvent]:
        if self.finished:
            return []
        events: list[EndpointEvent] = []
        window_start = self._now_ms
        self._now_ms += WINDOW_MS
        if probability > self._threshold:
            self._in_speech = True
            self._silent_windows = 0
            self._last_voiced_ms = self._now_ms
        elif probability < self._neg_threshold:
            self._silent_windows += 1
            if self._silent_windows >= self._silence_windows:
                self._in_speech = False
        if self._in_speech:
            if not self._started:
                self._started = True
                events.append(SpeechStart(window_start))
            self._speech_ms += WINDOW_MS
            self._silence_ms = 0
            if self._paused_at is not None and not self._resumed and self._speech_ms >= self._min_speech_ms:
                self._resumed = True
                events.append(SpeechResumed(self._now_ms))
            return events
        self._silence_ms += WINDOW_MS
        if self._speech_ms >= self._min_speech_ms:
            self._speech_ms = 0
            self._paused_at = self._last_voiced_ms
            self._resumed = False
            events.append(SpeechPause(self._last_voiced_ms))
        if self._paused_at is not None:
            if self._silence_ms > self._hangover_ms:
                events.append(self._finish(self._last_voiced_ms, EndReason.SILENCE))
        elif self._silence_ms > self._no_speech_ms:
            events.append(self._finish(self._now_ms, EndReason.NO_SPEECH))
        return events

    def _finish(self, offset_ms: int, reason: EndReason) -> TurnEnd:
        self.finished = True
        return TurnEnd(offset_ms, reason)
