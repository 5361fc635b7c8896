"""The good device of ``bench/flood.py``: push-to-talk utterances back to back, each one timed.

One paho client (MQTT 3.1.1, as ESP-MQTT) on its own process, so the flood's generators cannot
delay it. Per utterance: ``start`` (QoS 1), real speech in 20 ms frames paced in real time, the
last one flagged LAST, then wait for this session's final or error. An error is honoured as a
device would: wait ``retry_after_ms`` when the bridge gave one (else 1 s), then try again.
Each utterance is recorded with the time its LAST frame went out, so the orchestrator can split
them by phase (``time.monotonic`` is one clock for every process of the machine).

    python bench/_flood_good.py '<spec as JSON>'   # go line, then "stop", on stdin; prints one result line
"""

from __future__ import annotations

import json
import os
import queue
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import paho.mqtt.client as mqtt  # noqa: E402
from bridge_throughput import FRAME_S, load_clips  # noqa: E402

from firmware_protocol import (  # noqa: E402
    Endpointing,
    Error,
    ProtocolError,
    Start,
    TopicKind,
    Topics,
    Transcript,
    decode_bridge_message,
    encode_message,
)
from service.tools.device_sim import frames_of  # noqa: E402

PAUSE_S = 0.2
"""Between one final and the next ``start``: a user does not speak again at once."""


class GoodDevice:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        topics = Topics(spec["prefix"])
        self.device_id = spec["device_id"]
        self.audio_topic = topics.device(self.device_id, TopicKind.AUDIO)
        self.control_topic = topics.device(self.device_id, TopicKind.CONTROL)
        self.out_filter = f"{spec['prefix']}/{self.device_id}/out/#"
        self.clips = load_clips()
        self.inbox: queue.Queue[tuple[float, Any]] = queue.Queue()
        self.subscribed = threading.Event()
        self.stopping = threading.Event()
        self.records: list[dict[str, Any]] = []
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"flood-good-{os.getpid()}", protocol=mqtt.MQTTv311
        )
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(self.out_filter, qos=1)
        self.client.on_subscribe = lambda c, u, mid, rc, p: self.subscribed.set()
        self.client.on_message = self._on_message

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        now = time.monotonic()
        try:
            self.inbox.put((now, decode_bridge_message(message.payload)))
        except ProtocolError:
            pass

    def connect(self) -> None:
        self.client.connect(self.spec["host"], self.spec["port"], keepalive=60)
        self.client.loop_start()
        if not self.subscribed.wait(30):
            raise RuntimeError("good device: not subscribed within 30 s")

    def run(self, t_end: float) -> None:
        rng = random.Random(self.spec["seed"])
        n = 0
        while not self.stopping.is_set() and time.monotonic() < t_end:
            session = rng.randint(1, 0xFFFFFFFF)
            record = self._utterance(session, self.clips[n % len(self.clips)])
            self.records.append(record)
            n += 1
            retry_ms = record.get("retry_after_ms")
            wait_s = PAUSE_S if record["outcome"] == "final" else (retry_ms / 1000 if retry_ms else 1.0)
            self.stopping.wait(min(wait_s, 10.0))

    def _utterance(self, session: int, clip: Any) -> dict[str, Any]:
        start = Start(session=session, endpointing=Endpointing.PUSH_TO_TALK)
        self.client.publish(self.control_topic, encode_message(start), qos=1)
        frames = [f.encode() for f in frames_of(clip, session, 20, last=True)]
        base = time.monotonic()
        for k, frame in enumerate(frames):
            time.sleep(max(0.0, base + k * FRAME_S - time.monotonic()))
            self.client.publish(self.audio_topic, frame, qos=0)
        t_last = time.monotonic()
        deadline = t_last + float(self.spec["final_timeout"])
        while (left := deadline - time.monotonic()) > 0:
            try:
                t, message = self.inbox.get(timeout=left)
            except queue.Empty:
                break
            if getattr(message, "session", None) != session:
                continue
            if isinstance(message, Transcript) and message.final:
                return {"t_last": t_last, "outcome": "final", "latency_ms": (t - t_last) * 1000}
            if isinstance(message, Error):
                retry = getattr(message, "retry_after_ms", None)
                return {"t_last": t_last, "outcome": str(message.code), "retry_after_ms": retry}
        return {"t_last": t_last, "outcome": "timeout"}


def main() -> None:
    device = GoodDevice(json.loads(sys.argv[1]))
    device.connect()
    print(json.dumps({"ready": {"pid": os.getpid()}}), flush=True)
    go = json.loads(sys.stdin.readline() or "{}")
    if not go:
        return

    def wait_for_stop() -> None:
        sys.stdin.readline()  # "stop", or EOF
        device.stopping.set()

    threading.Thread(target=wait_for_stop, daemon=True).start()
    device.run(float(go["t_end"]))
    device.client.disconnect()
    device.client.loop_stop()
    print(json.dumps({"result": {"utterances": device.records}}), flush=True)


if __name__ == "__main__":
    main()
