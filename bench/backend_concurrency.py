"""Cloud-backend concurrency: utterances in flight, event-loop lag, and our client vs the vendor SDK.

A loopback OpenAI fake with a fixed latency (default 300 ms) runs in its own process. In this
process, rounds of N concurrent utterances go through

* **ours** — :class:`service.recognition.openai.OpenAIBackend` exactly as the bridge drives it
  (open a stream, feed 20 ms chunks, ``finish()``), one pooled client for all;
* **sdk** — the official ``openai`` SDK (``AsyncOpenAI(base_url=...)``) posting the same WAV.

Rounds alternate (ours, sdk, ours, ...) so that machine noise hits both alike. A monitor task
sleeps 5 ms at a time and records how late it wakes: the event-loop lag while N are in flight.
Reported: latency p50/p95/p99, added latency (latency − the fake's latency), the ratio of the
added medians ours/sdk, lag p50/p99, CPU ms per utterance.

    .venv/bin/python bench/backend_concurrency.py --in-flight 200 --rounds 4 --json bench/results/bc.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from _lag import LagMonitor  # noqa: E402

from service.config import OpenAISettings  # noqa: E402
from service.recognition import SessionOptions  # noqa: E402
from service.recognition.openai import OpenAIBackend  # noqa: E402
from service.wav import read_wav_16k_mono, wav_bytes  # noqa: E402

KEY = "sk-bench"


class _Quiet:
    def partial(self, text: str) -> None:
        pass

    def end_of_turn(self) -> None:
        pass


def pct(values: list[float]) -> dict[str, float]:
    arr = np.array(values) if values else np.zeros(1)
    return {q: float(np.percentile(arr, int(q[1:]))) for q in ("p50", "p95", "p99")} | {"max": float(arr.max())}


async def round_ours(backend: OpenAIBackend, audio: np.ndarray, n: int) -> list[float]:
    async def one() -> float:
        stream = backend.open(SessionOptions(language="en"), _Quiet())
        for i in range(0, len(audio), 320):
            stream.feed(audio[i : i + 320])
        start = time.perf_counter()
        result = await stream.finish()
        assert result.text == "what time is it", result
        return time.perf_counter() - start

    return list(await asyncio.gather(*(one() for _ in range(n))))


async def round_sdk(client: Any, wav: bytes, n: int) -> list[float]:
    async def one() -> float:
        start = time.perf_counter()
        result = await client.audio.transcriptions.create(model="whisper-1", file=("audio.wav", wav), language="en")
        assert result.text == "what time is it", result
        return time.perf_counter() - start

    return list(await asyncio.gather(*(one() for _ in range(n))))


async def run(args: argparse.Namespace, port: int) -> dict[str, Any]:
    import httpx
    from openai import AsyncOpenAI

    audio = read_wav_16k_mono(ROOT / "tests" / "fixtures" / "what_time.wav")
    url = f"http://127.0.0.1:{port}/v1/audio/transcriptions"
    config = OpenAISettings(
        platform="openai",
        url=url,
        api_key=KEY,
        model="whisper-1",
        timeout_s=60,
        max_retries=0,
        max_connections=max(256, args.in_flight),
    )
    ours = OpenAIBackend(config)
    await ours.start()
    limits = httpx.Limits(max_connections=max(256, args.in_flight), max_keepalive_connections=64)
    sdk = AsyncOpenAI(
        api_key=KEY,
        base_url=f"http://127.0.0.1:{port}/v1",
        max_retries=0,
        timeout=60,
        http_client=httpx.AsyncClient(limits=limits, timeout=60),
    )
    wav = wav_bytes(audio)
    monitor = LagMonitor()
    results: dict[str, dict[str, list[float]]] = {
        "ours": {"latency_ms": [], "lag_ms": [], "cpu_ms_per_utt": []},
        "sdk": {"latency_ms": [], "lag_ms": [], "cpu_ms_per_utt": []},
    }
    await round_ours(ours, audio, min(20, args.in_flight))  # warm-up: connections, imports
    await round_sdk(sdk, wav, min(20, args.in_flight))
    for r in range(args.rounds):
        for name in ("ours", "sdk") if r % 2 == 0 else ("sdk", "ours"):
            cpu0 = time.process_time()
            monitor.start()
            if name == "ours":
                latencies = await round_ours(ours, audio, args.in_flight)
            else:
                latencies = await round_sdk(sdk, wav, args.in_flight)
            lags = monitor.stop()
            cpu = time.process_time() - cpu0
            results[name]["latency_ms"] += [x * 1000 for x in latencies]
            results[name]["lag_ms"] += lags
            results[name]["cpu_ms_per_utt"].append(cpu * 1000 / args.in_flight)
    await ours.aclose()
    await sdk.close()

    summary: dict[str, Any] = {
        "config": {
            "in_flight": args.in_flight,
            "rounds": args.rounds,
            "fake_latency_ms": args.latency_ms,
            "audio_s": round(len(audio) / 16000, 3),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
        }
    }
    for name, data in results.items():
        added = [x - args.latency_ms for x in data["latency_ms"]]
        summary[name] = {
            "latency_ms": pct(data["latency_ms"]),
            "added_ms": pct(added),
            "event_loop_lag_ms": pct(data["lag_ms"]),
            "cpu_ms_per_utterance": float(np.median(data["cpu_ms_per_utt"])),
            "utterances": len(data["latency_ms"]),
        }
    ratio = summary["ours"]["added_ms"]["p50"] / max(summary["sdk"]["added_ms"]["p50"], 1e-9)
    summary["ratio_added_p50_ours_over_sdk"] = ratio
    summary["targets"] = {
        "in_flight>=200": args.in_flight >= 200,
        "lag_p99<=50ms": summary["ours"]["event_loop_lag_ms"]["p99"] <= 50,
    }
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--in-flight", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--latency-ms", type=float, default=300)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    fake = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "_fake_openai_proc.py"), "--latency-ms", str(args.latency_ms)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert fake.stdout is not None
        line = fake.stdout.readline()
        port = int(line.split()[1])
        summary = asyncio.run(run(args, port))
    finally:
        if fake.stdin:
            fake.stdin.close()
        try:
            fake.wait(timeout=10)
        except subprocess.TimeoutExpired:
            fake.kill()
    print(f"{args.in_flight} utterances in flight x {args.rounds} rounds, fake latency {args.latency_ms:g} ms")
    print(
        f"{'client':6} {'lat p50':>8} {'p95':>8} {'p99':>8} {'added p50':>10}"
        f" {'lag p50':>8} {'lag p99':>8} {'cpu/utt':>8}"
    )
    for name in ("ours", "sdk"):
        s = summary[name]
        print(
            f"{name:6} {s['latency_ms']['p50']:8.1f} {s['latency_ms']['p95']:8.1f} {s['latency_ms']['p99']:8.1f}"
            f" {s['added_ms']['p50']:10.1f} {s['event_loop_lag_ms']['p50']:8.2f} {s['event_loop_lag_ms']['p99']:8.2f}"
            f" {s['cpu_ms_per_utterance']:8.2f}"
        )
    print(f"added latency p50, ours / sdk: {summary['ratio_added_p50_ours_over_sdk']:.2f}")
    print("targets:", ", ".join(f"{k} {'PASS' if v else 'FAIL'}" for k, v in summary["targets"].items()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
