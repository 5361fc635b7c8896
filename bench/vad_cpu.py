"""VAD CPU per stream-second for each local engine, at 1 to 500 concurrent streams.

    .venv/bin/python bench/vad_cpu.py                       # about 4 minutes on 2 cores
    .venv/bin/python bench/vad_cpu.py --streams 200 --engines silero --json bench/results/vad-cpu.json

Every stream is one asyncio task that scores 512-sample int16 windows of real speech (the
fixtures under ``tests/``, pauses included) through the scorer a session would get from
:meth:`service.endpointing.engines.VadEngines.scorer`, so Silero batches exactly as in the bridge.
Windows fall due at real time (every 32 ms, each stream at its own random phase, as devices
do). Engines (``--engines``):

- **silero**: the bridge's :class:`~service.endpointing.silero.VadBatcher` (it holds a window up to 10 ms
  when enough streams are active that a batch fills).
- **silero-nohold**: the same batcher with ``hold_ms=0``: every window is scored as soon as the
  VAD thread is free (the bridge before it held windows), for comparison in the same run.
- **webrtc**: WebRTC's VAD inline on the loop, mode 3.
- **webrtc+silero**: WebRTC gates Silero.
- **none**: a scorer that answers 0 at once: what the harness itself costs (its timers and
  tasks). ``vad`` = the engine's process CPU minus this baseline at the same stream count.

Per run: process CPU (all threads) / (streams x audio seconds) = ms CPU per stream-second; the
same for the VAD thread alone (Silero and batch assembly); ``vad`` (see above); windows per ONNX
run; how late scores came back after their window was due (p50/p99: the latency the batching
adds); "other" = cores used by other processes during the run (CPU per window rises when the
machine is shared: read it first). Medians over ``--repeats``. Target from the issue: <= 2 ms
CPU per stream-second at 200 streams.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


from firmware_protocol import VadEngine
from service.endpointing.endpointer import WINDOW
from service.endpointing.engines import VadEngines, VadScorer
from service.endpointing.silero import SileroModel, SileroState, VadBatcher
from service.wav import read_wav_16k_mono

ROOT = Path(__file__).resolve().parent.parent

WINDOW_S = WINDOW / 16000


class ThreadNotingModel(SileroModel):
    """Notes which thread runs the model (the VAD thread, whose CPU clock the bench reads)."""

    thread = 0

    def score(self, inputs: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.thread = threading.get_ident()
        return super().score(inputs, state)


class NullScorer:
    """Answers at once: the harness's own cost."""

    async def score(self, window: np.ndarray) -> float:
        return 0.0

    async def aclose(self) -> None:
        return None


ENGINES = ("none", "silero", "silero-nohold", "webrtc", "webrtc+silero")


def speech_pool() -> np.ndarray:
    """All speech in the repository's fixtures, back to back, as float32 windows' source."""
    fixtures = ROOT / "tests" / "fixtures"
    files = sorted(fixtures.glob("*.wav")) + sorted((fixtures / "vad_set").glob("[ps]*.wav"))
    pcm = np.concatenate([read_wav_16k_mono(f) for f in files if f.stem != "noise"])
    return pcm


def make_scorer(engine: str, model: SileroModel) -> tuple[VadBatcher, Callable[[], VadScorer]]:
    """A fresh batcher (its own VAD thread) and a factory of per-stream scorers for ``engine``."""
    batcher = VadBatcher(model, hold_ms=0.0) if engine == "silero-nohold" else VadBatcher(model)
    engines = VadEngines(batcher, webrtc_mode=3)

    def factory() -> VadScorer:
        if engine == "none":
            return NullScorer()
        return engines.scorer(VadEngine(engine.removesuffix("-nohold")))

    return batcher, factory


async def run(model: ThreadNotingModel, pool: np.ndarray, streams: int, seconds: float, engine: str) -> dict[str, Any]:
    """One run of ``streams`` concurrent paced streams of ``seconds`` of audio each."""
    batcher, factory = make_scorer(engine, model)
    runner = asyncio.create_task(batcher.run())
    await batcher.score(SileroState(), np.zeros(WINDOW, dtype=np.float32))  # starts the VAD thread
    clock = time.pthread_getcpuclockid(model.thread)  # the batcher's thread, which just ran the model
    windows = int(seconds / WINDOW_S)
    rng = random.Random(streams)
    starts = [rng.randrange(0, len(pool) - windows * WINDOW) for _ in range(streams)]
    phases = [rng.uniform(0, WINDOW_S) for _ in range(streams)]
    late_ms: list[float] = []

    async def stream(index: int, t0: float) -> None:
        scorer = factory()
        audio = pool[starts[index] : starts[index] + windows * WINDOW]
        for k in range(windows):
            due = t0 + phases[index] + (k + 1) * WINDOW_S
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await scorer.score(audio[k * WINDOW : (k + 1) * WINDOW])
            late_ms.append((time.perf_counter() - due) * 1000)
        await scorer.aclose()

    runs0, windows0 = batcher.runs, batcher.windows
    ticks0 = machine_ticks()
    cpu0, vad0, wall0 = time.process_time(), time.clock_gettime(clock), time.perf_counter()
    await asyncio.gather(*(stream(i, wall0) for i in range(streams)))
    busy = busy_cores(ticks0, machine_ticks())
    cpu, vad, wall = time.process_time() - cpu0, time.clock_gettime(clock) - vad0, time.perf_counter() - wall0
    runner.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await runner
    stream_seconds = streams * windows * WINDOW_S
    return {
        "engine": engine,
        "streams": streams,
        "audio_s": windows * WINDOW_S,
        "wall_s": wall,
        "cpu_ms_per_stream_s": cpu * 1000 / stream_seconds,
        "vad_thread_ms_per_stream_s": vad * 1000 / stream_seconds,
        "cpu_cores": cpu / wall,
        "other_cores": max(0.0, busy - cpu / wall),
        "windows_per_run": (batcher.windows - windows0) / max(batcher.runs - runs0, 1),
        "onnx_runs": batcher.runs - runs0,
        "late_ms": {"p50": float(np.percentile(late_ms, 50)), "p99": float(np.percentile(late_ms, 99))},
    }


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def med(get: Any) -> float:
        return statistics.median(get(r) for r in runs)

    return {
        "engine": runs[0]["engine"],
        "streams": runs[0]["streams"],
        "cpu_ms_per_stream_s": med(lambda r: r["cpu_ms_per_stream_s"]),
        "vad_thread_ms_per_stream_s": med(lambda r: r["vad_thread_ms_per_stream_s"]),
        "cpu_cores": med(lambda r: r["cpu_cores"]),
        "other_cores": med(lambda r: r["other_cores"]),
        "windows_per_run": med(lambda r: r["windows_per_run"]),
        "late_p50_ms": med(lambda r: r["late_ms"]["p50"]),
        "late_p99_ms": med(lambda r: r["late_ms"]["p99"]),
    }


def machine_ticks() -> tuple[int, int]:
    """(all, idle) jiffies of the whole machine, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    return sum(fields), fields[3] + fields[4]


def busy_cores(before: tuple[int, int], after: tuple[int, int]) -> float:
    total, idle = after[0] - before[0], after[1] - before[1]
    return (1 - idle / max(total, 1)) * (os.cpu_count() or 1)


def machine_busy(seconds: float = 1.0) -> float:
    """Whole-machine CPU use, in cores, over a short sample (read it before trusting the numbers)."""
    before = machine_ticks()
    time.sleep(seconds)
    return busy_cores(before, machine_ticks())


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    model = ThreadNotingModel()
    pool = speech_pool()
    counts = [int(n) for n in args.streams.split(",")]
    engines = ["none", *(e for e in args.engines.split(",") if e != "none")]
    unknown = set(engines) - set(ENGINES)
    if unknown:
        raise SystemExit(f"unknown engine(s) {sorted(unknown)}; known: {', '.join(ENGINES)}")
    results: list[dict[str, Any]] = []
    summaries: list[dict[str, Any]] = []
    print(
        f"{'engine':<14} {'streams':>7} {'process':>8} {'vad':>6} {'thread':>6} {'cores':>5} "
        f"{'win/run':>7} {'late p50':>8} {'p99':>6} {'other':>5}   (CPU ms per stream-second; late in ms)"
    )
    for n in counts:
        baseline = 0.0
        for engine in engines:
            runs = [await run(model, pool, n, args.seconds, engine) for _ in range(args.repeats)]
            results.extend(runs)
            s = median_of(runs)
            if engine == "none":
                baseline = s["cpu_ms_per_stream_s"]
            s["vad_ms_per_stream_s"] = max(0.0, s["cpu_ms_per_stream_s"] - baseline)
            summaries.append(s)
            print(
                f"{engine:<14} {n:>7} {s['cpu_ms_per_stream_s']:>8.3f} {s['vad_ms_per_stream_s']:>6.3f} "
                f"{s['vad_thread_ms_per_stream_s']:>6.3f} {s['cpu_cores']:>5.2f} {s['windows_per_run']:>7.1f} "
                f"{s['late_p50_ms']:>8.2f} {s['late_p99_ms']:>6.1f} {s['other_cores']:>5.2f}",
                flush=True,
            )
    return {"runs": results, "summary": summaries}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", default="1,50,200,500", help="comma-separated stream counts")
    parser.add_argument("--seconds", type=float, default=4.0, help="audio per stream and run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--engines", default=",".join(ENGINES), help=f"comma-separated, of {', '.join(ENGINES)} (none always runs)"
    )
    parser.add_argument("--target-ms", type=float, default=2.0, help="CPU ms per stream-second at --target-streams")
    parser.add_argument("--target-streams", type=int, default=200)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    busy = machine_busy()
    print(f"machine busy before the run: {busy:.2f} of {os.cpu_count()} cores (numbers are only fair when ~0)")
    began = time.perf_counter()
    out = asyncio.run(main_async(args))
    print(f"total {time.perf_counter() - began:.0f} s")
    for s in out["summary"]:
        if s["engine"] == "silero" and s["streams"] == args.target_streams:
            verdict = "met" if s["vad_ms_per_stream_s"] <= args.target_ms else "NOT met"
            print(
                f"target: <= {args.target_ms:g} ms CPU per stream-second at {args.target_streams} streams (silero, "
                f"process minus harness): {s['vad_ms_per_stream_s']:.3f} ms -> {verdict}; whole process "
                f"{s['cpu_ms_per_stream_s']:.3f} ms, VAD thread alone {s['vad_thread_ms_per_stream_s']:.3f} ms"
            )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "command": " ".join(sys.argv),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "busy_cores_before": busy},
            **out,
        }
        args.json.write_text(json.dumps(payload, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
