"""Detected speech end → final published, with speculative recognition and a backend of fixed latency.

    .venv/bin/python bench/endpoint_latency.py
    .venv/bin/python bench/endpoint_latency.py --latencies 100,300,800 --settings echokit,ours-safe --json out.json

:class:`service.session.turn.Session` runs in process with the bridge's :class:`VadBatcher` and a
recording publish function (as ``tests/test_session.py`` builds it). The backend is a
:class:`BatchStream` whose ``transcribe`` sleeps L and returns "heard <samples>". A labeled
single-phrase clip of ``tests/fixtures/vad_set`` plus trailing non-speech (the clip's own tail,
mirrored) is pushed in 20 ms chunks at real-time pace (absolute deadlines), because the
speculation started at the pause runs while the hangover's audio is still arriving.

Per turn, all times on one monotonic clock:

- **ended → final**: the publish call of ``SpeechEnded`` (the moment the bridge decided the turn
  ended) to the publish call of the final ``Transcript``. Target: ≤ max(L, hangover) + 30 ms.
- **ideal**: when the final could be ready at best: max(SpeechEnded, start of the committed
  speculation + L); **overhead** = final − ideal, the bridge's own cost.
- **true end → final**: from the moment the clip's last speech sample was pushed, what a user waits.
- **speculations**: ``transcribe`` calls per turn (each is a backend request).

Several turns run at once (``--parallel``, staggered) to finish within a few minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vad_quality import DEFAULT_SET, NAMED, extend

from firmware_protocol import (
    Configured,
    Endpointing,
    EndpointingOverrides,
    EndReason,
    SpeechEnded,
    Topics,
    Transcript,
    decode_bridge_message,
)
from service.config import AsrConfig, Config, SessionConfig, VadConfig
from service.endpointing.engines import VadEngines
from service.endpointing.silero import SileroModel, VadBatcher
from service.endpointing.tuning import effective_tuning
from service.observability.logs import configure as configure_logs
from service.outputs.publisher import DevicePublisher
from service.recognition import Recognition, SessionOptions
from service.recognition.base import BatchStream, RecognitionStream, StreamListener, TranscriptionBackend
from service.session.services import SessionServices
from service.session.turn import Session
from service.wav import read_wav_16k_mono

CHUNK = 320  # 20 ms, a device frame


class FixedLatencyBackend(TranscriptionBackend):
    """Transcribes to "heard <samples>" after ``latency_s``; notes when each call started."""

    name = "fixed"

    def __init__(self, latency_s: float) -> None:
        self.latency_s = latency_s
        self.calls: list[tuple[float, int]] = []

    def open(self, options: SessionOptions, listener: StreamListener) -> RecognitionStream:
        backend = self

        class Stream(BatchStream):
            async def transcribe(self, audio: np.ndarray) -> Recognition:
                backend.calls.append((time.perf_counter(), len(audio)))
                await asyncio.sleep(backend.latency_s)
                return Recognition(f"heard {len(audio)}")

        return Stream()


@dataclass
class Turn:
    clip: str
    true_end_ms: int
    published: list[tuple[float, object]] = field(default_factory=list)
    t0: float = 0.0


async def one_turn(
    batcher: VadBatcher, vad_config: VadConfig, latency_s: float, clip: str, audio: np.ndarray, true_end_ms: int
) -> dict[str, Any]:
    backend = FixedLatencyBackend(latency_s)
    turn = Turn(clip, true_end_ms)

    def publish(topic: str, payload: bytes, **_: object) -> None:
        turn.published.append((time.perf_counter(), decode_bridge_message(payload)))

    limits = SessionConfig()
    services = SessionServices(
        backend=backend, engines=VadEngines(batcher), publisher=DevicePublisher(Topics(), publish, 1024)
    )
    tuning = session_tuning(vad_config, limits)
    session = Session("bench", 1, services, tuning=tuning, options=SessionOptions())
    runner = asyncio.create_task(session.run())
    turn.t0 = t0 = time.perf_counter()
    for i, start in enumerate(range(0, len(audio), CHUNK)):
        due = t0 + (i + 1) * CHUNK / 16000  # a chunk can be sent once its 20 ms have been spoken
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if session.ended or any(isinstance(m, SpeechEnded) for _, m in turn.published):
            break
        session.push(audio[start : start + CHUNK].tobytes())
    session.end(EndReason.TIMEOUT)  # only if the endpointer never ended the turn (shows up as the reason)
    async with asyncio.timeout(30):
        await runner

    ended = next((t, m) for t, m in turn.published if isinstance(m, SpeechEnded))
    final = next((t, m) for t, m in turn.published if isinstance(m, Transcript) and m.final)
    t_ended, t_final = ended[0], final[0]
    assert isinstance(final[1], Transcript)
    heard = int(final[1].text.split()[1]) if final[1].text.startswith("heard ") else None
    committed = next((t for t, n in reversed(backend.calls) if n == heard), None)
    ideal = max(t_ended, committed + latency_s) if committed is not None else t_ended + latency_s
    true_end = t0 + true_end_ms / 1000
    return {
        "clip": clip,
        "reason": ended[1].reason.value,  # type: ignore[attr-defined]
        "ended_to_final_ms": (t_final - t_ended) * 1000,
        "ideal_ms": (ideal - t_ended) * 1000,
        "overhead_ms": (t_final - ideal) * 1000,
        "true_end_to_ended_ms": (t_ended - true_end) * 1000,
        "true_end_to_final_ms": (t_final - true_end) * 1000,
        "speculations": len(backend.calls),
        "speculation_head_start_ms": (t_ended - committed) * 1000 if committed is not None else None,
        "session_latency_ms": final[1].latency_ms,
    }


def session_tuning(vad: VadConfig, limits: SessionConfig) -> Configured:
    """What the ingest stage hands a session: server VAD with ``vad``'s values."""
    config = Config(asr=AsrConfig(vad=vad), session=limits)
    return effective_tuning(config, EndpointingOverrides(endpointing=Endpointing.SERVER_VAD))


async def staggered(after_s: float, *args: Any) -> dict[str, Any]:
    await asyncio.sleep(after_s)
    return await one_turn(*args)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    labels = json.loads((DEFAULT_SET / "labels.json").read_text())
    clips = []
    for entry in labels["clips"]:
        if entry["kind"] == "speech" and not entry["pauses"]:
            pcm = read_wav_16k_mono(DEFAULT_SET / entry["file"])
            true_end = entry["segments"][-1][1]
            clips.append((entry["file"], extend(pcm, (true_end + 60) * 16, args.tail_ms * 16), true_end))
    batcher = VadBatcher(SileroModel())
    batcher_task = asyncio.create_task(batcher.run())
    results: dict[str, Any] = {}
    print(
        f"{'setting':<10} {'L':>5} {'n':>3} {'ended->final p50':>16} {'p95':>6} {'target':>6}  {'ideal p50':>9} "
        f"{'overhead p50':>12} {'p95':>5}  {'true end->final p50':>19} {'p95':>6}  {'spec/turn':>9}"
    )
    for name in args.settings.split(","):
        vad_config = VadConfig(**NAMED[name])
        for latency_ms in (int(v) for v in args.latencies.split(",")):
            jobs = [clips[i % len(clips)] for i in range(args.repeats)]
            turns: list[dict[str, Any]] = []
            for first in range(0, len(jobs), args.parallel):
                group = jobs[first : first + args.parallel]

                turns.extend(
                    await asyncio.gather(
                        *(
                            staggered(k * 0.23, batcher, vad_config, latency_ms / 1000, *job)
                            for k, job in enumerate(group)
                        )
                    )
                )
            e2f = [t["ended_to_final_ms"] for t in turns]
            target = max(latency_ms, vad_config.hangover_ms) + 30
            summary = {
                "setting": name,
                "vad": NAMED[name],
                "latency_ms": latency_ms,
                "n": len(turns),
                "target_ms": target,
                "ended_to_final_ms": {"p50": pct(e2f, 50), "p95": pct(e2f, 95), "max": max(e2f)},
                "ideal_ms": {"p50": pct([t["ideal_ms"] for t in turns], 50)},
                "overhead_ms": {
                    "p50": pct([t["overhead_ms"] for t in turns], 50),
                    "p95": pct([t["overhead_ms"] for t in turns], 95),
                },
                "true_end_to_final_ms": {
                    "p50": pct([t["true_end_to_final_ms"] for t in turns], 50),
                    "p95": pct([t["true_end_to_final_ms"] for t in turns], 95),
                },
                "true_end_to_ended_ms": {"p50": pct([t["true_end_to_ended_ms"] for t in turns], 50)},
                "speculations_per_turn": statistics.mean(t["speculations"] for t in turns),
                "reasons": sorted({t["reason"] for t in turns}),
                "turns": turns,
            }
            results[f"{name}/L={latency_ms}"] = summary
            s = summary
            print(
                f"{name:<10} {latency_ms:>5} {s['n']:>3} {s['ended_to_final_ms']['p50']:>16.1f} "
                f"{s['ended_to_final_ms']['p95']:>6.1f} {target:>6}  {s['ideal_ms']['p50']:>9.1f} "
                f"{s['overhead_ms']['p50']:>12.1f} {s['overhead_ms']['p95']:>5.1f}  "
                f"{s['true_end_to_final_ms']['p50']:>19.1f} {s['true_end_to_final_ms']['p95']:>6.1f}  "
                f"{s['speculations_per_turn']:>9.2f}",
                flush=True,
            )
    batcher_task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await batcher_task
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latencies", default="100,300,800", help="backend latencies L in ms")
    parser.add_argument("--settings", default="echokit,ours-safe", help=f"[asr.vad] settings: {', '.join(NAMED)}")
    parser.add_argument("--repeats", type=int, default=12, help="turns per setting and L")
    parser.add_argument("--parallel", type=int, default=4, help="turns at once (staggered by 230 ms)")
    parser.add_argument("--tail-ms", type=int, default=2500, help="non-speech pushed after each clip")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    configure_logs("warning")
    began = time.perf_counter()
    results = asyncio.run(main_async(args))
    print(f"total {time.perf_counter() - began:.0f} s")
    failed = [k for k, s in results.items() if s["ended_to_final_ms"]["p95"] > s["target_ms"]]
    print(f"target ended->final p95 <= max(L, hangover) + 30 ms: {'met' if not failed else 'NOT met: ' + str(failed)}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"command": " ".join(sys.argv), "results": results}, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
