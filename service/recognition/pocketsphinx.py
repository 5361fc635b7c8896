"""Embedded offline recognition with pocketsphinx (its en-US model ships in the wheel).

Audio is decoded while it arrives, so the final is ready right after end of speech.
Each decoder lives in a worker process (pocketsphinx holds the GIL); a session holds one
worker for its utterance, and sessions beyond ``asr.decoders`` wait for one, their audio
queued and decoded in one call when they get it. A phrase list or JSGF grammar restricts
the vocabulary, which is where pocketsphinx is accurate.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import re
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import structlog

from firmware_protocol import EndReason, ErrorCode
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

log = structlog.get_logger(__name__)
T = TypeVar("T")


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


class _Worker:
    """A single-process executor: calls run in order on the same decoder."""

    def __init__(self, jsgf: str | None) -> None:
        self._jsgf = jsgf
        self._executor = self._spawn()

    def _spawn(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            max_workers=1,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=worker.init,
            initargs=(self._jsgf,),
        )

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        except BrokenProcessPool:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = self._spawn()
            raise BackendError("the pocketsphinx worker died; it was restarted") from None

    def shutdown(self, *, wait: bool = False) -> None:
        self._executor.shutdown(wait=wait, cancel_futures=True)


class PocketsphinxBackend(TranscriptionBackend):
    name = "pocketsphinx"

    def __init__(self, config: PocketsphinxSettings) -> None:
        self._jsgf: str | None = None
        if config.grammar:
            self._jsgf = Path(config.grammar).read_text(encoding="utf-8")
        elif config.phrases:
            self._jsgf = phrases_to_jsgf(config.phrases)
        self._size = config.decoders
        self._partial_interval = config.partial_interval_ms / 1000
        self._idle: asyncio.Queue[_Worker] = asyncio.Queue()
        self._workers: list[_Worker] = []
        self._cleanup: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Spawn the workers and load their decoders now, so a bad grammar fails at startup."""
        self._workers = [_Worker(self._jsgf) for _ in range(self._size)]
        try:
            await asyncio.gather(*(w.call(worker.ready) for w in self._workers))
        except BackendError:
            await self.aclose()
            raise BackendError(
                "pocketsphinx failed to load (check asr.grammar / asr.phrases: every word must be"
                " in the en-US dictionary)",
                code=ErrorCode.BACKEND_UNAVAILABLE,
                retryable=False,
            ) from None
        for w in self._workers:
            self._idle.put_nowait(w)

    async def aclose(self) -> None:
        # Wait (off the event loop) until each worker and its executor's manager thread are gone: a
        # manager thread still closing its pipes at interpreter exit races concurrent.futures' exit
        # hook, which then prints an "OSError: Bad file descriptor" traceback.
        workers, self._workers = self._workers, []
        await asyncio.gather(*(asyncio.to_thread(w.shutdown, wait=True) for w in workers))

    def open(self, options: SessionOptions, listener: StreamListener) -> RecognitionStream:
        return _PocketsphinxStream(self, listener)

    async def acquire(self) -> _Worker:
        return await self._idle.get()

    def release(self, w: _Worker, *, dirty: bool) -> None:
        """Give a worker back; a ``dirty`` one first aborts its half-decoded utterance."""
        if not dirty:
            self._idle.put_nowait(w)
            return

        async def reset() -> None:
            with contextlib.suppress(Exception):
                await w.call(worker.abort)
            self._idle.put_nowait(w)

        task = asyncio.create_task(reset())
        self._cleanup.add(task)
        task.add_done_callback(self._cleanup.discard)

    @property
    def partial_interval(self) -> float:
        return self._partial_interval


class _PocketsphinxStream(RecognitionStream):
    def __init__(self, backend: PocketsphinxBackend, listener: StreamListener) -> None:
        self._backend = backend
        self._listener = listener
        self._queue: list[bytes] = []
        self._wake = asyncio.Event()
        self._closing = False
        self._task = asyncio.create_task(self._run())

    def feed(self, pcm: np.ndarray) -> None:
        self._queue.append(pcm.tobytes())
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
        w = await self._backend.acquire()
        dirty = True
        try:
            last_partial, last_sent = "", 0.0
            while True:
                await self._wake.wait()
                self._wake.clear()
                data = b"".join(self._queue)
                self._queue.clear()
                if self._closing:
                    text = await w.call(worker.finish, data)
                    dirty = False
                    return text
                if not data:
                    continue
                hypothesis = await w.call(worker.process, data)
                now = time.monotonic()
                if hypothesis and hypothesis != last_partial and now - last_sent >= self._backend.partial_interval:
                    last_partial, last_sent = hypothesis, now
                    self._listener.partial(hypothesis)
        finally:
            self._backend.release(w, dirty=dirty)
