"""Per-frame cost of the ingest hot path: ``MessageRouter.handle`` → ``_on_audio`` with real sessions.

    .venv/bin/python bench/ingest_frames.py
    .venv/bin/python bench/ingest_frames.py --devices 400 --seconds 5 --repeat 3

A :class:`service.bridge.Bridge` is built in process (its documented constructor, with a
backend that returns a fixed text) and never connected: what it publishes goes to the link's
queue or is dropped, which ``handle`` does not wait for. ``--devices`` devices each run one
push-to-talk session of ``--seconds`` of 20 ms PCM frames, fed round by round (one frame per
device per round) straight into ``bridge.sessions.handle(topic, payload)``, the same call the
MQTT dispatch makes. Only the ``handle`` calls are timed; between rounds the event loop runs
the sessions' tasks. The first frame of each session (which starts it) is timed apart.

Prints the median and p99 over rounds of the mean ``handle`` time per frame, in µs.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import structlog

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from firmware_protocol import AudioFrame, FrameFlags, TopicKind
from service.bridge import Bridge
from service.config import parse_config
from service.recognition import Recognition, RecognitionStream, SessionOptions, TranscriptionBackend
from service.recognition.base import BatchStream, StreamListener

FRAME_SAMPLES = 320


class FixedText(TranscriptionBackend):
    name = "fixed"

    def open(self, options: SessionOptions, listener: StreamListener) -> RecognitionStream:
        class Stream(BatchStream):
            async def transcribe(self, audio: np.ndarray) -> Recognition:
                return Recognition("fixed")

        return Stream()


async def run(devices: int, seconds: float) -> dict[str, float]:
    config = parse_config(
        f'[session]\nendpointing = "push_to_talk"\nmax_sessions = {devices}\nmax_utterance_s = {seconds + 5}\n'
        "[metrics]\nenabled = false\n"
    )
    bridge = Bridge(config, backend=FixedText())
    handle = bridge.sessions.handle
    rng = np.random.default_rng(1)
    pcm = rng.integers(-3000, 3000, FRAME_SAMPLES, dtype=np.int16).astype("<i2").tobytes()
    rounds = int(seconds * 50)
    topics = [bridge.topics.device(f"dev{i:04d}", TopicKind.AUDIO) for i in range(devices)]
    frames = []
    for seq in range(rounds):
        flags = FrameFlags.FIRST if seq == 0 else FrameFlags.NONE
        if seq == rounds - 1:
            flags |= FrameFlags.LAST
        frames.append(AudioFrame(session_id=7, seq=seq, payload=pcm, flags=flags).encode())
    per_frame_us: list[float] = []
    first_us = 0.0
    for seq, payload in enumerate(frames):
        started = time.perf_counter()
        for topic in topics:
            handle(topic, payload)
        elapsed = (time.perf_counter() - started) / devices * 1e6
        if seq == 0:
            first_us = elapsed
        else:
            per_frame_us.append(elapsed)
        for _ in range(3):  # let the sessions take their audio, outside the timed part
            await asyncio.sleep(0)
    await bridge.sessions.drain(10)
    per_frame_us.sort()
    return {
        "devices": devices,
        "frames": devices * rounds,
        "first_frame_us": first_us,
        "median_us": statistics.median(per_frame_us),
        "p99_us": per_frame_us[int(len(per_frame_us) * 0.99)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=400)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    for _ in range(args.repeat):
        result = asyncio.run(run(args.devices, args.seconds))
        print(
            f"{result['devices']} devices, {result['frames']} frames: handle per frame"
            f" median {result['median_us']:.2f} µs, p99 {result['p99_us']:.2f} µs;"
            f" session-starting frame {result['first_frame_us']:.1f} µs"
        )


if __name__ == "__main__":
    main()
