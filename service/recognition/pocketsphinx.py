"""Embedded offline recognition with pocketsphinx (its en-US model ships in the wheel).

Audio is decoded while it arrives, so the final is ready right after end of speech.
Each decoder lives in a supervised worker process (pocketsphinx holds the GIL;
:mod:`service.recognition.workers`). ``asr.decoders`` decoders are shared between sessions:

- a session takes one only once it has audio worth decoding (``_WORTH_DECODING_S`` not yet
  decoded, or its end), so a device that sent a stray frame holds none;
- it gives it back while others wait as soon as its audio comes slower than half real time
  (it went quiet, or its device trickles); when it gets one again, it decodes its utterance
  from the start (it keeps its audio, at most ``session.max_utterance_s``, for that);
- waiting sessions are served first come, first served, and a device holds at most one.

A phrase list or JSGF grammar restricts the vocabulary, which is where pocketsphinx is accurate.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from pathlib import Path

import numpy as np
import structlog

from firmware_protocol import SAMPLE_RATE, EndReason, ErrorCode
from service.config import PocketsphinxSettings
from service.recognition import _sphinx_worker as worker
from service.recognition.base import (
    BackendError,
    Recognition,
    RecognitionStream,
    SessionOptions,
    StreamListener,
    TranscriptionBackend,
)
from service.recognition.workers import FairPool, WorkerError, WorkerProcess

log = structlog.get_logger(__name__)

_BYTES_PER_S = SAMPLE_RATE * 2
_WORTH_DECODING_S = 0.3
"""Undecoded audio a session needs before it takes a decoder (or its end)."""
_SHARE_TICK_S = 0.5
"""While others wait, a holder that got less than half of this much audio in this long gives its decoder back."""
_CALL_TIMEOUT_S = 30.0
"""One call decodes at most one utterance (``max_utterance_s``, far faster than real time); a worker
that takes longer is hung and replaced."""


def phrases_to_jsgf(phrases: list[str]) -> str:
    """One public rule whose alternatives are the phrases, lower-cased, punctuation dropped."""
    cleaned = []
    for phrase in phrases:
        words = re.sub(r"[^\w' ]+", " ", phrase.lower()).split()
        if words:
            cleaned.append(" ".join(words))
    if not cleaned:
        raise ValueError("the phrase list has no words")
    return "#JSGF V1.0;\ngrammar commands;\npublic <command> = " + " | ".join(cleaned) + " ;\n"


class PocketsphinxBackend(TranscriptionBackend):
    name = "pocketsphinx"

    def __init__(self, config: PocketsphinxSettings) -> None:
        jsgf: str | None = None
        if config.grammar:
            jsgf = Path(config.grammar).read_text(encoding="utf-8")
        elif config.phrases:
            jsgf = phrases_to_jsgf(config.phrases)
        self.partial_interval = config.partial_interval_ms / 1000
        self.workers = [
            WorkerProcess(worker.__name__, (jsgf,), name="pocketsphinx", call_timeout_s=_CALL_TIMEOUT_S)
            for _ in range(config.decoders)
        ]
        self.pool = FairPool(list(self.workers))

    async def start(self) -> None:
        """Spawn the workers and load their decoders now, so a bad grammar fails at startup."""
        try:
            await asyncio.gather(*(w.start() for w in self.workers))
        except WorkerError as error:
            log.error("pocketsphinx.start_failed", error=str(error))
            await self.aclose()
            raise BackendError(
                "pocketsphinx failed to load (check asr.grammar / asr.phrases: every word must be"
                " in the en-US dictionary)",
                code=ErrorCode.BACKEND_UNAVAILABLE,
                retryable=False,
            ) from None

    async def aclose(self) -> None:
        await asyncio.gather(*(w.aclose() for w in self.workers))

    def open(self, options: SessionOptions, listener: StreamListener) -> RecognitionStream:
        return _PocketsphinxStream(self, listener, options.device_id)


class _PocketsphinxStream(RecognitionStream):
    def __init__(self, backend: PocketsphinxBackend, listener: StreamListener, device_id: str) -> None:
        self._backend = backend
        self._pool = backend.pool
        self._listener = listener
        self._owner = device_id or f"stream-{id(self)}"
        self._audio = bytearray()
        """The whole utterance: a session that gets a decoder back decodes it from the start."""
        self._wake = asyncio.Event()
        self._closing = False
        self._last_partial, self._last_partial_at = "", 0.0
        self._tick_end, self._tick_from = 0.0, 0
        """The current fair-share tick while it holds a decoder: when it ends, and the audio length at its start."""
        self._task = asyncio.create_task(self._run())

    def feed(self, pcm: np.ndarray) -> None:
        self._audio += np.ascontiguousarray(pcm).data
        self._wake.set()

    async def finish(self) -> Recognition:
        self._closing = True
        self._wake.set()
        text = await self._task
        if not text:
            return Recognition("", language="en", reason=EndReason.NO_SPEECH)
        return Recognition(text, language="en")

    async def cancel(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, BackendError):
            await self._task

    async def _run(self) -> str:
        decoded = 0
        while True:
            await self._until_worth_decoding(decoded)
            w = await self._pool.acquire(self._owner)
            try:
                text = await self._decode_on(w)
            except WorkerError as error:
                if not error.died:
                    log.warning("pocketsphinx.failed", error=str(error))
                    raise BackendError("pocketsphinx failed to decode the audio") from None
                raise BackendError(str(error)) from None
            finally:
                self._pool.release(w, self._owner)
            if text is not None:
                return text
            decoded = len(self._audio)

    async def _until_worth_decoding(self, decoded: int) -> None:
        while not self._closing and len(self._audio) - decoded < _WORTH_DECODING_S * _BYTES_PER_S:
            self._wake.clear()
            await self._wake.wait()

    async def _decode_on(self, w: WorkerProcess) -> str | None:
        """Decode on ``w`` until the end (the text) or until others need it more (``None``)."""
        sent, fresh = 0, True
        self._tick_end, self._tick_from = time.monotonic() + _SHARE_TICK_S, len(self._audio)
        while True:
            self._wake.clear()
            data, sent = self._audio[sent:], len(self._audio)
            if self._closing:
                text: str = await w.call("finish", data, fresh)
                return text
            if data:
                self._partial(await w.call("process", data, fresh))
                fresh = False
            if not await self._keep():
                return None

    async def _keep(self) -> bool:
        """Wait for more audio; ``False``: while others wait, it came slower than half real time
        over the last tick (ticks run from when the decoder was taken, across waits)."""
        while not self._wake.is_set():
            now = time.monotonic()
            if now >= self._tick_end:
                slow = len(self._audio) - self._tick_from < _SHARE_TICK_S * _BYTES_PER_S / 2
                if slow and self._pool.wanted(self._owner):
                    return False
                self._tick_end, self._tick_from = now + _SHARE_TICK_S, len(self._audio)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._tick_end - now):
                    await self._wake.wait()
        return True

    def _partial(self, hypothesis: str) -> None:
        now = time.monotonic()
        if (
            hypothesis
            and hypothesis != self._last_partial
            and now - self._last_partial_at >= self._backend.partial_interval
        ):
            self._last_partial, self._last_partial_at = hypothesis, now
            self._listener.partial(hypothesis)
