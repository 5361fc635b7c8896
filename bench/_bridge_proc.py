"""Child processes of ``bench/bridge_throughput.py``: the bridge under test and the bare subscriber.

Not meant to be run by hand. Both roles speak the same line protocol with the parent:

* child → parent (stdout): ``{"ready": ...}`` once subscribed, later ``{"result": ...}``;
* parent → child (stdin): a ``{"w0": t, "w1": t}`` line (the measurement window, in
  ``time.monotonic()`` seconds, which is one clock for every process on Linux), then a
  ``stop`` line when the load generators are done.

``--role bridge`` runs :class:`service.bridge.Bridge` with an instant fake backend (a
:class:`RecognitionStream` whose ``finish`` returns a fixed text at once), so everything
measured is the bridge's own overhead. ``--role subscriber`` is the ceiling: the bridge's own
MQTT connection (:class:`service.link.transport.MqttConnection`) on the same audio filter, counting
messages and nothing else.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
import time
from typing import Any

import numpy as np

from firmware_protocol import Topics
from service.bridge import Bridge
from service.config import parse_config
from service.link.transport import ConnectOptions, MqttConnection
from service.observability.logs import configure
from service.recognition import Recognition, RecognitionStream, SessionOptions, TranscriptionBackend

FINAL_TEXT = "what time is it"
SAMPLE_EVERY_S = 0.05  # backlog and event-loop lag sampling period inside the window


# The fake backend ---------------------------------------------------------------------------


class InstantStream(RecognitionStream):
    """Counts what it is fed; the final is ready the moment it is asked for."""

    __slots__ = ("samples",)

    def __init__(self) -> None:
        self.samples = 0

    def feed(self, pcm: np.ndarray) -> None:
        self.samples += len(pcm)

    async def finish(self) -> Recognition:
        return Recognition(text=FINAL_TEXT, language="en")

    async def cancel(self) -> None:
        pass


class InstantBackend(TranscriptionBackend):
    name = "instant"

    def __init__(self) -> None:
        self.opened = 0

    def open(self, options: SessionOptions, *args: Any, **kwargs: Any) -> RecognitionStream:
        """Any listener/partial callback is ignored: this backend never has a partial."""
        self.opened += 1
        return InstantStream()


class CountingBridge(Bridge):
    """The real bridge; only counts audio messages on their way into the message router."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.audio_messages = 0
        self._audio_suffix = "/in/audio"

    def _dispatch(self, topic: str, payload: bytes) -> None:
        if topic.endswith(self._audio_suffix):
            self.audio_messages += 1
        super()._dispatch(topic, payload)


# Experiments: candidate fixes, measured without touching service/ (off by default) -----------------

EXPERIMENTS = ("gc", "props")


class _FastProperties:
    """paho's ``Properties`` rebuilds two ~28-entry tables on every construction, i.e. per
    MQTT 5 PUBLISH received (~30 µs); this keeps them on the class and makes ``clear`` cheap."""

    @staticmethod
    def install() -> None:
        from paho.mqtt import _packet
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        template = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]

        class FastProperties(Properties):  # type: ignore[misc]
            types = template.types
            names = template.names
            properties = template.properties

            def __init__(self, packetType: int) -> None:
                object.__setattr__(self, "packetType", packetType)

            def clear(self) -> None:
                if len(self.__dict__) > 1:
                    super().clear()

        _packet.Properties = FastProperties


def apply_experiments(names: list[str]) -> None:
    if "gc" in names:
        import gc

        gc.collect()
        gc.freeze()  # startup objects (modules, model, config) leave the collected generations
        gc.set_threshold(10_000, 10, 10)
    if "props" in names:
        _FastProperties.install()


# Plumbing shared by both roles ------------------------------------------------------------------


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def stdin_lines() -> asyncio.Queue[str]:
    """Lines from the parent; a daemon thread, so a blocked read never holds up exit."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[str] = asyncio.Queue()

    def reader() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(queue.put_nowait, line.strip())
        loop.call_soon_threadsafe(queue.put_nowait, "stop")  # parent gone: stop as well

    threading.Thread(target=reader, daemon=True, name="stdin").start()
    return queue


def proc_status_kb(field: str) -> int:
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class WindowProbe:
    """Counter snapshots at the window edges, plus event-loop lag inside it."""

    def __init__(self, count: Any) -> None:
        self.gc = GcMeter()
        self._count = count  # () -> int
        self.snap: dict[str, float] = {}
        self.lags_ms: list[float] = []

    async def run(self, w0: float, w1: float) -> None:
        await asyncio.sleep(max(0.0, w0 - time.monotonic()))
        self.snap["t0"], self.snap["n0"] = time.monotonic(), self._count()
        self.gc.enabled = True
        next_at = time.monotonic() + SAMPLE_EVERY_S
        while next_at < w1:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            now = time.monotonic()
            self.lags_ms.append((now - next_at) * 1000)
            next_at += SAMPLE_EVERY_S
        await asyncio.sleep(max(0.0, w1 - time.monotonic()))
        self.snap["t1"], self.snap["n1"] = time.monotonic(), self._count()
        self.gc.enabled = False

    def result(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if "n1" in self.snap:
            dt = self.snap["t1"] - self.snap["t0"]
            out["window_s"] = dt
            out["window_messages"] = self.snap["n1"] - self.snap["n0"]
            out["rate"] = out["window_messages"] / dt if dt > 0 else 0.0
            out["gc"] = self.gc.result(dt)
        if self.lags_ms:
            lags = np.array(self.lags_ms)
            out["loop_lag_ms"] = {
                "p50": float(np.percentile(lags, 50)),
                "p99": float(np.percentile(lags, 99)),
                "max": float(lags.max()),
            }
        return out


class GcMeter:
    """Time spent in CPython's cyclic collector, per generation (a gc callback: ~1 µs a collection)."""

    def __init__(self) -> None:
        import gc

        self.count = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        self.longest = [0.0, 0.0, 0.0]
        self._started = 0.0
        self.enabled = False
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self.enabled:
            generation = info["generation"]
            took = time.perf_counter() - self._started
            self.count[generation] += 1
            self.seconds[generation] += took
            self.longest[generation] = max(self.longest[generation], took)

    def result(self, window_s: float) -> dict[str, Any]:
        return {
            "collections": self.count,
            "ms_per_s": [1000 * s / window_s for s in self.seconds] if window_s else None,
            "max_pause_ms": [1000 * s for s in self.longest],
        }


async def _serve(lines: asyncio.Queue[str], probe: WindowProbe) -> None:
    go = json.loads(await lines.get())
    probe_task = asyncio.create_task(probe.run(go["w0"], go["w1"]))
    while (await lines.get()) != "stop":
        pass
    try:  # an overloaded loop may reach the window's end late; its snapshot still has true times
        async with asyncio.timeout(15):
            await probe_task
    except TimeoutError:
        pass


# Roles --------------------------------------------------------------------------------------------


async def run_bridge(args: argparse.Namespace) -> None:
    host, port = args.host, args.port
    config = parse_config(
        f"""
[mqtt]
url = "mqtt://{host}:{port}"
topic_prefix = "{args.prefix}"
protocol = {args.protocol}

[session]
endpointing = "{args.endpointing}"
max_sessions = {max(200, 2 * args.devices)}

[log]
level = "{args.log_level}"
format = "json"

[metrics]
enabled = {"true" if args.metrics == "on" else "false"}
listen = "127.0.0.1:0"
"""
    )
    configure(config.log.level, config.log.format)
    backend = InstantBackend()
    bridge = CountingBridge(config, backend=backend)
    apply_experiments(args.experiment)
    lines = stdin_lines()
    runner = asyncio.create_task(bridge.run(drain_timeout=2.0))
    async with asyncio.timeout(30):
        await bridge.link.connected.wait()
    emit({"ready": {"pid": os.getpid(), "rss_kb": proc_status_kb("VmRSS")}})

    probe = WindowProbe(lambda: bridge.audio_messages)
    await _serve(lines, probe)
    sessions = bridge.sessions.stats
    emit(
        {
            "result": {
                **probe.result(),
                "audio_messages": bridge.audio_messages,
                "messages": sessions.messages,
                "rejected": sum(sessions.rejected_by_code.values()),
                "sessions_started": sessions.sessions_started,
                "sessions_refused": sessions.sessions_refused,
                "backend_streams": backend.opened,
                "published": bridge.link.stats.published,
                "publish_dropped": bridge.link.stats.publish_dropped,
                "peak_rss_kb": proc_status_kb("VmHWM"),
                "rss_kb": proc_status_kb("VmRSS"),
            }
        }
    )
    bridge.stop()
    try:
        async with asyncio.timeout(5):
            await runner
    except (TimeoutError, asyncio.CancelledError):
        runner.cancel()


async def run_subscriber(args: argparse.Namespace) -> None:
    topics = Topics(args.prefix)
    lines = stdin_lines()
    count = 0

    def count_one(topic: str, payload: bytes) -> None:
        nonlocal count
        count += 1

    # The bridge's own connection and options (protocol, clean session, messages handed to the
    # handler as they are read), audio subscribed at QoS 1 (delivered at 0: devices publish at 0).
    options = ConnectOptions(
        f"mqtt://{args.host}:{args.port}", identifier=f"bench-bare-subscriber-{os.getpid()}", protocol=args.protocol
    )
    async with MqttConnection(options, count_one) as connection:
        await connection.subscribe(topics.audio_filter, qos=1)
        apply_experiments(args.experiment)
        emit({"ready": {"pid": os.getpid(), "rss_kb": proc_status_kb("VmRSS")}})
        probe = WindowProbe(lambda: count)
        await _serve(lines, probe)
        emit(
            {
                "result": {
                    **probe.result(),
                    "audio_messages": count,
                    "peak_rss_kb": proc_status_kb("VmHWM"),
                    "rss_kb": proc_status_kb("VmRSS"),
                }
            }
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--role", choices=["bridge", "subscriber"], required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--prefix", default="echokit")
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--endpointing", default="push_to_talk")
    parser.add_argument("--protocol", type=int, choices=[3, 5], default=3, help="MQTT version of bridge/subscriber")
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--metrics", choices=["on", "off"], default="on", help="[metrics] enabled (port 0)")
    parser.add_argument("--experiment", default="", help="comma-separated: " + ",".join(EXPERIMENTS))
    args = parser.parse_args()
    args.experiment = [x for x in args.experiment.split(",") if x]
    asyncio.run(run_bridge(args) if args.role == "bridge" else run_subscriber(args))


if __name__ == "__main__":
    main()
