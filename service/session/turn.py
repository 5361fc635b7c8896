"""One utterance of one device: audio → endpointing → backend → events, in order.

A :class:`Session` is fed in-order PCM by the ingest stage and runs as one task: it listens
(audio queue, endpointing, length cap), then hands the turn to its :class:`FinalRecogniser`.
Everything it tells the device goes through its :class:`OrderedOutbox`. The whole session runs
under a wall-clock limit (:attr:`Session.limit_s`), so whatever hangs, the device gets an answer
and the session's backend stream and VAD scorer are released.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import msgspec
import numpy as np
import structlog

from firmware_protocol import (
    SAMPLE_RATE,
    SAMPLES_PER_MS,
    BridgeMessage,
    Configured,
    Endpointing,
    EndReason,
    Error,
    ErrorCode,
    Listening,
    SpeechEnded,
    SpeechStarted,
    Transcript,
)
from service.config import VadConfig
from service.endpointing.endpointer import WINDOW, Endpointer, SpeechPause, SpeechResumed, SpeechStart, TurnEnd
from service.endpointing.engines import VadScorer
from service.recognition import RecognitionStream, SessionOptions
from service.session.final import FinalRecogniser, release
from service.session.outbox import OrderedOutbox
from service.session.services import SessionServices


@dataclass(frozen=True, slots=True)
class _End:
    reason: EndReason


class Session:
    """One turn of one device, from ``listening`` to its final; a new utterance is a new session."""

    def __init__(
        self,
        device_id: str,
        session_id: int,
        services: SessionServices,
        *,
        tuning: Configured,
        options: SessionOptions,
    ) -> None:
        self.device_id = device_id
        self.session_id = session_id
        self.tuning = tuning
        """Endpointing in force: the bridge's config, the device's overrides, the session's ``start``."""
        self.options = options
        self._services = services
        self._audio: asyncio.Queue[np.ndarray | _End] = asyncio.Queue()
        self._outbox = OrderedOutbox(services.publisher, device_id)
        self._cancelled = asyncio.Event()
        self._samples = 0
        self._max_samples = int(tuning.max_utterance_s * SAMPLE_RATE)
        self._stream: RecognitionStream | None = None
        self._started_ms: int | None = None
        self._first_partial_from: float | None = None
        """When speech started (monotonic) until the first partial is sent: time to first partial."""
        self._endpointer = self._make_endpointer()
        self._engines = services.engines
        self._scorer: VadScorer | None = None
        """Built from ``tuning`` with the first window (a remote engine opens its socket then)."""
        self._heard: list[np.ndarray] = []
        """Without server VAD and with ``asr.vad_url`` set: the turn's audio, for the legacy batch check."""
        self._vad_pending = np.zeros(0, dtype=np.int16)
        """Audio not yet scored (less than a window); it reaches the recogniser with its window."""
        self.ended = False
        self._ending = False
        self.log = structlog.get_logger(__name__).bind(device=device_id, session=session_id)
        self._final = FinalRecogniser(services, session_id, self._cancelled, self.log)
        self._deadline: asyncio.Timeout | None = None
        """The session's wall-clock limit while the turn runs; :meth:`abort` moves it to now."""
        self._aborted: str | None = None

    def _make_endpointer(self) -> Endpointer | None:
        t = self.tuning
        if t.endpointing is not Endpointing.SERVER_VAD:
            return None
        vad = VadConfig(
            threshold=t.threshold,
            neg_threshold=t.neg_threshold,
            min_speech_duration_ms=t.min_speech_duration_ms,
            max_silence_duration_ms=t.max_silence_duration_ms,
            hangover_ms=t.hangover_ms,
        )
        return Endpointer(vad, t.no_speech_timeout_ms)

    # Called by the ingest stage (synchronously, from the MQTT dispatch) ----------------------

    def push(self, pcm: bytes) -> None:
        if not self.ended:
            self._audio.put_nowait(np.frombuffer(pcm, dtype="<i2"))

    @property
    def queued(self) -> int:
        """Audio chunks (and the end marker) not yet taken by the task: read by metrics."""
        return self._audio.qsize()

    def end(self, reason: EndReason) -> None:
        """The device ended the turn (LAST frame), went quiet, or the backend decided; first wins."""
        if not self.ended and not self._ending:
            self._ending = True
            self._audio.put_nowait(_End(reason))

    def configure(self, endpointing: Endpointing, options: SessionOptions) -> None:
        """Late ``start`` options: taken while no audio has been processed, else only what still matters.

        Endpointing can change until the first audio is taken; language and prompt until the
        recogniser is opened (batch engines read them at the end, so in practice until then).
        """
        if self._samples == 0:
            self.tuning = msgspec.structs.replace(self.tuning, endpointing=endpointing)
            self._endpointer = self._make_endpointer()
        if self._stream is None:
            self.options = options

    def cancel(self) -> None:
        """Cancelled by the device or superseded by a new session: no transcript follows."""
        self._cancelled.set()
        self._audio.put_nowait(_End(EndReason.CANCEL))

    # The task --------------------------------------------------------------------------------

    async def run(self) -> None:
        self._services.running.add(self)
        try:
            async with asyncio.TaskGroup() as tg:
                sender = tg.create_task(self._outbox.run())
                try:
                    await self._bounded_turn()
                except Exception as exc:  # never let one device's failure escape to the service
                    self.log.exception("session.failed")
                    self._emit(self._final.error(ErrorCode.INTERNAL, type(exc).__name__))
                finally:
                    self.ended = True
                    self._outbox.close()
                await sender
        finally:
            self._services.running.discard(self)

    @property
    def limit_s(self) -> float:
        """Wall-clock limit from ``listening`` to the final: longest turn + idle timeout + the final's deadline."""
        return self.tuning.max_utterance_s + self._services.idle_timeout_s + self._services.final_timeout_s

    async def _bounded_turn(self) -> None:
        """The turn under the session's wall-clock limit (or :meth:`abort`): past it, a retryable error."""
        deadline = asyncio.timeout(self.limit_s)
        try:
            async with deadline:
                self._deadline = deadline
                if self._aborted is not None:
                    deadline.reschedule(-1)
                await self._turn()
        except TimeoutError:
            if not deadline.expired():
                raise  # not the session's limit: a fault like any other
            if self._aborted is None:  # an aborted session has told its device already
                reason = f"no final within {self.limit_s:g} s of the session's start"
                self.log.warning("session.deadline", reason=reason)
                self._emit(self._final.error(ErrorCode.BACKEND_UNAVAILABLE, reason))
        finally:
            self._deadline = None

    def abort(self, reason: str) -> None:
        """End the turn now (the bridge is shutting down): the device told ``reason`` at once, resources released.

        The error is the session's last message: whatever the turn would still emit while it unwinds is dropped.
        """
        if self._aborted is not None or self.ended:
            return
        self.log.warning("session.deadline", reason=reason)
        self._emit(self._final.error(ErrorCode.BACKEND_UNAVAILABLE, reason))
        self._aborted = reason
        self._cancelled.set()
        if self._deadline is not None:
            self._deadline.reschedule(-1)

    def _emit(self, message: BridgeMessage) -> None:
        if self._aborted is None:
            self._outbox.put(message)

    async def _turn(self) -> None:
        self._emit(Listening(session=self.session_id, endpointing=self.tuning.endpointing, sample_rate=SAMPLE_RATE))
        try:
            end = await self._listen()
            self._emit(SpeechEnded(session=self.session_id, offset_ms=end.offset_ms, reason=end.reason))
            if end.reason is not EndReason.CANCEL and not self._cancelled.is_set():
                await self._conclude(end)
        finally:
            self._final.cancel()
            if self._stream is not None:
                await release(self._stream.cancel())
            if self._scorer is not None:
                await release(self._scorer.aclose())

    async def _listen(self) -> TurnEnd:
        """Take audio until the turn ends: VAD, LAST frame, cancel, length cap, or the router's idle timeout.

        Whatever is queued when the task wakes is taken as one chunk, so a busy bridge pays
        the per-wake cost once per batch of frames rather than once per frame.
        """
        while True:
            items = [await self._audio.get()]
            while not self._audio.empty():
                items.append(self._audio.get_nowait())
            pcm: list[np.ndarray] = []
            ending: _End | None = None
            for item in items:
                if isinstance(item, _End):
                    ending = item
                    break
                pcm.append(item)
            if pcm and (end := await self._take(np.concatenate(pcm) if len(pcm) > 1 else pcm[0])) is not None:
                return end
            if ending is not None:
                return TurnEnd(self._offset_ms(), ending.reason)

    async def _take(self, pcm: np.ndarray) -> TurnEnd | None:
        if self._stream is None:
            self._stream = self._services.backend.open(self.options, self)
        room = self._max_samples - self._samples
        too_long = len(pcm) > room
        if too_long:
            pcm = pcm[:room]
        self._samples += len(pcm)
        if self._endpointer is not None:
            end = await self._detect(pcm)
        else:
            end = None
            self._stream.feed(pcm)
            if self._engines.batch_check is not None:
                self._heard.append(pcm)
            self._device_speaks(pcm)
        if end is None and too_long:
            limit = self.tuning.max_utterance_s
            self._emit(
                Error(
                    code=ErrorCode.UTTERANCE_TOO_LONG,
                    message=f"utterance longer than {limit:g} s; transcribing what came",
                    retryable=False,
                    session=self.session_id,
                )
            )
            end = TurnEnd(self._offset_ms(), EndReason.MAX_LENGTH)
        return end

    def _device_speaks(self, pcm: np.ndarray) -> None:
        """Push-to-talk: the device says speech starts with its first audio."""
        if self._started_ms is None and len(pcm):
            self._started_ms = 0
            self._first_partial_from = time.monotonic()
            self._emit(SpeechStarted(session=self.session_id, offset_ms=0))

    async def _detect(self, pcm: np.ndarray) -> TurnEnd | None:
        """Score 512-sample windows; each reaches the recogniser just before its score, so a
        speculation started at a pause holds exactly the audio up to that pause."""
        assert self._endpointer is not None and self._stream is not None
        pending = np.concatenate([self._vad_pending, pcm]) if len(self._vad_pending) else pcm
        taken = 0
        while len(pending) - taken >= WINDOW:
            window = pending[taken : taken + WINDOW]
            taken += WINDOW
            self._stream.feed(window)
            if self._scorer is None:
                t = self.tuning
                self._scorer = self._engines.scorer(t.vad_engine, self.device_id, webrtc_mode=t.webrtc_mode)
            probability = await self._scorer.score(window)
            for event in self._endpointer.update(probability):
                if isinstance(event, SpeechStart):
                    self._started_ms = event.offset_ms
                    self._first_partial_from = time.monotonic()
                    self._emit(SpeechStarted(session=self.session_id, offset_ms=event.offset_ms))
                elif isinstance(event, SpeechPause):
                    self._final.speculate(self._stream)
                elif isinstance(event, SpeechResumed) and (text := self._final.drop_speculation()):
                    self.partial(text)
                elif isinstance(event, TurnEnd):
                    self._vad_pending = pending[taken:]
                    return event
        self._vad_pending = pending[taken:]
        return None

    async def _conclude(self, end: TurnEnd) -> None:
        """Publish the final: the backend's, or an empty one when nobody spoke."""
        stream, self._stream = self._stream, None
        if stream is not None and len(self._vad_pending) and end.reason not in (EndReason.SILENCE, EndReason.NO_SPEECH):
            stream.feed(self._vad_pending)  # the tail after the last whole window: the device's, not silence
        heard = self._heard if self._endpointer is None else []
        if (message := await self._final.conclude(stream, end, self._started_ms, heard)) is not None:
            self._emit(message)

    # StreamListener: what the recognition stream reports while audio flows ---------------------

    def end_of_turn(self) -> None:
        self.end(EndReason.BACKEND)

    def partial(self, text: str) -> None:
        if not self.ended and not self._cancelled.is_set():
            if self._first_partial_from is not None and self._services.metrics is not None:
                self._services.metrics.first_partial.observe(time.monotonic() - self._first_partial_from)
                self._first_partial_from = None
            self._emit(
                Transcript(
                    session=self.session_id,
                    final=False,
                    text=text,
                    backend=self._services.backend.name,
                    start_ms=0,
                    end_ms=self._offset_ms(),
                )
            )

    def _offset_ms(self) -> int:
        return self._samples // SAMPLES_PER_MS
