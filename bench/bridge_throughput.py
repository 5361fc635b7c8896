"""Bridge throughput and overhead: how many real-time devices one bridge process serves.

One run, one private Mosquitto, two phases with the same simulated fleet:

1. **ceiling** — a bare subscriber on the bridge's own MQTT connection (own process, the bridge's
   MQTT version) on ``<prefix>/+/in/audio`` counts frames while N devices stream 20 ms frames
   at 50 frames/s each for D seconds.
2. **bridge** — :class:`service.bridge.Bridge` (own process, instant fake backend, see
   ``bench/_bridge_proc.py``) serves the same N devices, each doing back-to-back utterances:
   ``start`` (QoS 1) → 1–2 s of real speech in 20 ms frames (QoS 0) → LAST frame (push-to-talk)
   → wait for the final on ``out/transcript`` → next utterance with a new session id.
   The overhead measured per utterance is *last frame published → final received*.
   ``--endpointing server_vad`` instead sends speech then silence until ``speech_ended``.

Devices run in separate load-generator processes: paho-mqtt, one MQTT 3.1.1 connection per
device (as ESP-MQTT), all of a process's clients driven by one thread and one epoll
selector, frames paced by absolute deadlines. Everything is loopback; the run stops by itself.

    .venv/bin/python bench/bridge_throughput.py --devices 100 --seconds 20 --json bench/results/bt.json
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import os
import platform
import random
import select
import selectors
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from firmware_protocol import (  # noqa: E402
    AudioFrame,
    Endpointing,
    Error,
    FrameFlags,
    ProtocolError,
    SpeechEnded,
    Start,
    TopicKind,
    Topics,
    Transcript,
    decode_bridge_message,
    encode_message,
)
from service.link.mqtt311 import remaining_length  # noqa: E402
from service.tools.device_sim import frames_of  # noqa: E402
from service.wav import read_wav_16k_mono  # noqa: E402

FRAME_MS = 20
FRAME_S = FRAME_MS / 1000
FRAME_SAMPLES = 16 * FRAME_MS
FIXTURES = ROOT / "tests" / "fixtures"
CLIP_FILES = ("what_time.wav", "timer.wav", "weather.wav", "kitchen_light_espeak.wav")
SILENCE_FRAME = bytes(2 * FRAME_SAMPLES)
MAX_SILENCE_FRAMES = 250  # server VAD: give up after 5 s of silence without speech_ended

TARGET_RATIO = 0.70
TARGET_P99_MS = 20.0
TARGET_DEVICES = 100


# Audio -------------------------------------------------------------------------------------------


def load_clips(max_s: float = 2.0) -> list[np.ndarray]:
    """The speech fixtures cut to their spoken part (+0.3 s before, +0.2 s after), at most ``max_s``."""
    clips = []
    for name in CLIP_FILES:
        pcm = read_wav_16k_mono(FIXTURES / name)
        usable = len(pcm) // FRAME_SAMPLES * FRAME_SAMPLES
        energy = np.abs(pcm[:usable].astype(np.float64)).reshape(-1, FRAME_SAMPLES).mean(axis=1)
        active = np.nonzero(energy > 0.05 * energy.max())[0]
        start = max(0, (int(active[0]) * FRAME_SAMPLES) - int(0.3 * 16000))
        end = min(len(pcm), (int(active[-1]) + 1) * FRAME_SAMPLES + int(0.2 * 16000))
        end = min(end, start + int(max_s * 16000))
        clips.append(pcm[start:end].copy())
    return clips


def vad_decision_frames(clips: list[np.ndarray]) -> list[int | None]:
    """Server VAD: index of the frame whose arrival lets the bridge's endpointer end the turn.

    Replays what a session does (512-sample Silero windows with a 64-sample context, the
    default ``[asr.vad]`` endpointer) on clip + silence, so the generator can time
    ``speech_ended`` and the final from the moment the decisive frame was published.
    """
    from service.config import Config
    from service.endpointing.endpointer import WINDOW, Endpointer
    from service.endpointing.silero import SileroModel

    config = Config()
    model = SileroModel()
    out: list[int | None] = []
    for clip in clips:
        audio = np.concatenate([clip, np.zeros(MAX_SILENCE_FRAMES * FRAME_SAMPLES, dtype=np.int16)])
        audio = audio.astype(np.float32) / 32768.0
        endpointer = Endpointer(config.asr.vad, config.session.no_speech_timeout_ms)
        state = np.zeros((2, 1, 128), dtype=np.float32)
        context = np.zeros(64, dtype=np.float32)
        decided = None
        for w in range(len(audio) // WINDOW):
            window = audio[w * WINDOW : (w + 1) * WINDOW]
            probs, state = model.score(np.concatenate([context, window])[None, :], state)
            context = window[-64:]
            endpointer.update(float(probs[0]))
            if endpointer.finished:
                decided = math.ceil((w + 1) * WINDOW / FRAME_SAMPLES) - 1
                break
        out.append(decided)
    return out


# /proc sampling ------------------------------------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pid: int) -> float | None:
    """utime + stime of all threads of ``pid``, in seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    rest = data[data.rindex(")") + 2 :].split()
    return (int(rest[11]) + int(rest[12])) / CLK_TCK


def proc_status_kb(pid: int, field_name: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def machine_busy_s() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    total = sum(values[:8])
    return (total - idle) / CLK_TCK, total / CLK_TCK


def generator_slices(devices: int, generators: int = 0) -> list[tuple[int, int]]:
    """``(first device, count)`` per load-generator process: ``generators``, else one per 150 devices."""
    n_gen = generators or max(1, math.ceil(devices / 150))
    per = math.ceil(devices / n_gen)
    return [(g * per, min(per, devices - g * per)) for g in range(n_gen) if devices - g * per > 0]


# The load generator (child process) --------------------------------------------------------------


@dataclass
class Device:
    index: int
    device_id: str
    client: Any
    audio_topic: str
    control_topic: str
    rng: random.Random
    inbox: list[tuple[float, Any]] = field(default_factory=list)
    connected: bool = False
    subscribed: bool = False
    writing: bool = False
    state: str = "idle"  # idle | sending | waiting | done
    session: int = 0
    seq: int = 0
    utterances: int = 0
    frames: list[bytes] = field(default_factory=list)
    speech_frames: int = 0
    base: float = 0.0
    clip: int = 0
    t_last: float = 0.0
    wait_since: float = 0.0
    pub_times: list[float] = field(default_factory=list)
    t_speech_ended: float | None = None
    sock: Any = None
    epoch: int = 0  # bumped per utterance: heap entries of an earlier utterance are ignored
    topic_field: bytes = b""  # MQTT length-prefixed audio topic, for pre-framed PUBLISH packets


class Generator:
    """All devices of one process: one thread, one epoll selector, one deadline heap."""

    def __init__(self, spec: dict[str, Any]) -> None:
        import paho.mqtt.client as mqtt

        self.mqtt = mqtt
        self.spec = spec
        self.mode: str = spec["mode"]  # stream | push_to_talk | server_vad
        self.topics = Topics(spec["prefix"])
        self.clips = load_clips()
        self.fdec: list[int | None] = spec.get("fdec") or [None] * len(self.clips)
        self.final_timeout = float(spec["final_timeout"])
        self.paho_publish = bool(spec.get("paho_publish"))
        self.raw_fallbacks = 0
        self.selector = selectors.DefaultSelector()
        self.heap: list[tuple[float, int, int, Device]] = []
        self.devices: list[Device] = []
        self.touched: set[int] = set()
        self.window = (0.0, 0.0)
        self.t_end = 0.0
        # results
        self.sent_total = 0
        self.sent_window = 0
        self.lateness_ms: list[float] = []
        self.started = 0
        self.completed = 0
        self.latencies: list[float] = []  # ms, utterances whose last frame fell in the window
        self.se_latencies: list[float] = []  # server VAD: decisive frame → speech_ended
        self.se_final_ms: list[float] = []  # server VAD: speech_ended → final
        self.timeouts = 0
        self.errors: dict[str, int] = {}
        self.disconnects = 0
        self.vad_mismatch = 0
        self.others = 0
        self.closing = False

    # setup

    def connect_all(self) -> float:
        mqtt = self.mqtt
        t = time.monotonic()
        seed = self.spec["seed"]
        for i in range(self.spec["first"], self.spec["first"] + self.spec["count"]):
            device_id = f"bench{i:04d}"
            client = mqtt.Client(
                mqtt.CallbackAPIVersion.VERSION2,
                client_id=f"bench-{self.spec['phase']}-{device_id}",
                protocol=mqtt.MQTTv311,
                clean_session=True,
            )
            dev = Device(
                index=i,
                device_id=device_id,
                client=client,
                audio_topic=self.topics.device(device_id, TopicKind.AUDIO),
                control_topic=self.topics.device(device_id, TopicKind.CONTROL),
                rng=random.Random(seed * 100003 + i),
            )
            client.user_data_set(dev)
            client.on_connect = self._on_connect
            client.on_subscribe = self._on_subscribe
            client.on_message = self._on_message
            client.on_disconnect = self._on_disconnect
            client.max_inflight_messages_set(100)
            client.connect(self.spec["host"], self.spec["port"], keepalive=60)
            dev.sock = client.socket()
            dev.sock.setblocking(False)
            # No Nagle: a frame held back waiting for an ACK would count as bridge latency.
            dev.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            topic = dev.audio_topic.encode()
            dev.topic_field = len(topic).to_bytes(2, "big") + topic
            self.selector.register(dev.sock, selectors.EVENT_READ, dev)
            self.devices.append(dev)
            self._flush(dev)
        need_sub = self.mode != "stream"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            self._poll(0.05)
            if all(d.connected and (d.subscribed or not need_sub) for d in self.devices):
                return time.monotonic() - t
        raise RuntimeError("devices did not all connect/subscribe within 60 s")

    def _on_connect(self, client: Any, dev: Device, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            raise RuntimeError(f"{dev.device_id}: connect refused: {reason}")
        dev.connected = True
        if self.mode != "stream":
            client.subscribe(f"{self.topics.prefix}/{dev.device_id}/out/#", qos=1)
            self.touched.add(dev.index)  # the SUBSCRIBE is queued inside the callback: flush it

    def _on_subscribe(self, client: Any, dev: Device, mid: int, reasons: Any, properties: Any) -> None:
        dev.subscribed = True

    def _on_message(self, client: Any, dev: Device, message: Any) -> None:
        now = time.monotonic()
        if (
            message.topic.endswith("/out/transcript")
            or message.topic.endswith("/out/vad")
            or message.topic.endswith("/out/error")
        ):
            try:
                decoded = decode_bridge_message(message.payload)
            except ProtocolError:
                self.others += 1
                return
            dev.inbox.append((now, decoded))
            self.touched.add(dev.index)

    def _on_disconnect(self, client: Any, dev: Device, flags: Any, reason: Any, properties: Any) -> None:
        if not self.closing:
            self.disconnects += 1
        try:
            self.selector.unregister(client.socket())
        except (KeyError, ValueError, TypeError):
            pass

    # I/O

    def _flush(self, dev: Device) -> None:
        """Write what paho queued; watch for writability only while something is left."""
        client = dev.client
        if client.want_write():
            client.loop_write()
        want = client.want_write()
        if want != dev.writing and client.socket() is not None:
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if want else 0)
            self.selector.modify(client.socket(), events, dev)
            dev.writing = want

    def _poll(self, timeout: float) -> None:
        for key, mask in self.selector.select(timeout):
            dev = key.data
            if mask & selectors.EVENT_READ:
                dev.client.loop_read()
            if mask & selectors.EVENT_WRITE:
                self._flush(dev)
        while self.touched:
            idx = self.touched.pop()
            dev = self.devices[idx - self.spec["first"]]
            if dev.inbox:
                self._handle_inbox(dev)
            self._flush(dev)

    # device behaviour

    def _schedule(self, dev: Device, due: float) -> None:
        heapq.heappush(self.heap, (due, dev.index, dev.epoch, dev))

    def _start_utterance(self, dev: Device, now: float) -> None:
        if now >= self.t_end:
            dev.state = "done"
            return
        dev.session = dev.rng.randint(1, 0xFFFFFFFF)
        dev.clip = (dev.index + dev.utterances) % len(self.clips)
        dev.utterances += 1
        dev.epoch += 1
        ptt = self.mode == "push_to_talk"
        frames = frames_of(self.clips[dev.clip], dev.session, FRAME_MS, last=ptt)
        dev.frames = [f.encode() for f in frames]
        dev.speech_frames = len(frames)
        dev.seq = 0
        dev.pub_times = []
        dev.t_speech_ended = None
        endpointing = Endpointing.PUSH_TO_TALK if ptt else Endpointing.SERVER_VAD
        dev.client.publish(
            dev.control_topic, encode_message(Start(session=dev.session, endpointing=endpointing)), qos=1
        )
        self._flush(dev)
        dev.state = "sending"
        dev.base = now
        self.started += 1
        self._schedule(dev, now)

    def _frame(self, dev: Device) -> bytes | None:
        if self.mode == "stream":
            clip = self.clips[dev.index % len(self.clips)]
            n_frames = len(clip) // FRAME_SAMPLES
            k = dev.seq % n_frames
            payload = clip[k * FRAME_SAMPLES : (k + 1) * FRAME_SAMPLES].astype("<i2").tobytes()
            flags = FrameFlags.FIRST if dev.seq == 0 else FrameFlags.NONE
            return AudioFrame(session_id=dev.session, seq=dev.seq, payload=payload, flags=flags).encode()
        if dev.seq < len(dev.frames):
            return dev.frames[dev.seq]
        if self.mode == "server_vad" and dev.seq < dev.speech_frames + MAX_SILENCE_FRAMES:
            return AudioFrame(session_id=dev.session, seq=dev.seq, payload=SILENCE_FRAME).encode()
        return None

    def _send_due(self, dev: Device, due: float) -> None:
        if dev.state != "sending":
            return  # speech_ended (or an error) stopped this device meanwhile
        payload = self._frame(dev)
        if payload is None:  # server VAD never ended the turn: wait for a timeout
            dev.state, dev.wait_since = "waiting", time.monotonic()
            return
        self._publish_audio(dev, payload)
        t = time.monotonic()
        self.sent_total += 1
        if self.window[0] <= t < self.window[1]:
            self.sent_window += 1
            self.lateness_ms.append((t - due) * 1000)
        if self.mode == "server_vad":
            dev.pub_times.append(t)
        dev.seq += 1
        if self.mode == "push_to_talk" and dev.seq == len(dev.frames):
            dev.state, dev.t_last, dev.wait_since = "waiting", t, t
            return
        self._schedule(dev, dev.base + dev.seq * FRAME_S)

    def _publish_audio(self, dev: Device, payload: bytes) -> None:
        """QoS 0 PUBLISH of one frame.

        paho's ``publish`` costs ~35 µs of CPU per message here, so by default the packet
        (byte-identical to paho's MQTT 3.1.1 QoS 0 PUBLISH) is written with one ``send``
        on the device's own connection, unless paho has output queued on it (then paho
        sends it, keeping the byte stream in order).
        """
        client = dev.client
        if self.paho_publish or client.want_write():
            if not self.paho_publish:
                self.raw_fallbacks += 1
            client.publish(dev.audio_topic, payload, qos=0)
            if client.want_write() or dev.writing:
                self._flush(dev)
            return
        # PUBLISH, QoS 0, no DUP/retain (0x30) · remaining length · topic · payload
        packet = b"\x30" + remaining_length(len(dev.topic_field) + len(payload)) + dev.topic_field + payload
        view = memoryview(packet)
        while view:
            try:
                sent = dev.sock.send(view)
            except BlockingIOError:
                sent = 0
            view = view[sent:]
            if view:  # socket buffer full (broker not reading): block like a device's send would
                select.select([], [dev.sock], [], 1.0)

    def _handle_inbox(self, dev: Device) -> None:
        items, dev.inbox = dev.inbox, []
        for t, message in items:
            if getattr(message, "session", None) != dev.session or dev.state not in ("sending", "waiting"):
                continue
            if isinstance(message, SpeechEnded) and self.mode == "server_vad":
                dev.state, dev.wait_since, dev.t_speech_ended = "waiting", t, t
                f = self.fdec[dev.clip]
                if f is not None and f < len(dev.pub_times) and self._in_window(dev.pub_times[f]):
                    self.se_latencies.append((t - dev.pub_times[f]) * 1000)
            elif isinstance(message, Transcript) and message.final:
                self._completed(dev, t)
            elif isinstance(message, Error):
                code = str(message.code)
                self.errors[code] = self.errors.get(code, 0) + 1
                dev.state = "idle"
                self._start_utterance(dev, t)

    def _in_window(self, t: float) -> bool:
        return self.window[0] <= t < self.window[1]

    def _completed(self, dev: Device, t: float) -> None:
        self.completed += 1
        if self.mode == "push_to_talk":
            if self._in_window(dev.t_last):
                self.latencies.append((t - dev.t_last) * 1000)
        elif self.mode == "server_vad":
            f = self.fdec[dev.clip]
            if f is not None and f < len(dev.pub_times):
                if self._in_window(dev.pub_times[f]):
                    self.latencies.append((t - dev.pub_times[f]) * 1000)
                    if dev.t_speech_ended is not None:
                        self.se_final_ms.append((t - dev.t_speech_ended) * 1000)
            else:
                self.vad_mismatch += 1
        dev.state = "idle"
        self._start_utterance(dev, t)

    # main loop

    def run(self, go: dict[str, Any]) -> None:
        t0, self.t_end = go["t0"], go["t_end"]
        self.window = (go["w0"], go["w1"])
        stop_at = self.t_end + float(go["grace"])
        for dev in self.devices:
            if self.mode == "stream":
                dev.session = dev.rng.randint(1, 0xFFFFFFFF)
                dev.state, dev.base = "sending", t0 + dev.rng.uniform(0, FRAME_S)
                self._schedule(dev, dev.base)
            else:  # spread utterance phases over one utterance length, like an unsynchronised fleet
                dev.state = "idle"
                self._schedule(dev, t0 + dev.rng.uniform(0, 2.0))
        next_misc = time.monotonic() + 1.0
        while True:
            now = time.monotonic()
            if now >= stop_at:
                break
            if now >= self.t_end and all(d.state in ("done", "idle", "sending") for d in self.devices):
                if not self.heap or self.heap[0][0] >= self.t_end:
                    break  # nothing left to wait for
            timeout = min(0.05, max(0.0, self.heap[0][0] - now)) if self.heap else 0.05
            self._poll(timeout)
            now = time.monotonic()
            while self.heap and self.heap[0][0] <= now:
                due, _, epoch, dev = heapq.heappop(self.heap)
                if epoch != dev.epoch:
                    continue  # scheduled for an utterance that has ended since
                if due >= self.t_end:
                    dev.state = "done" if dev.state != "waiting" else dev.state
                    continue
                if dev.state == "idle":
                    self._start_utterance(dev, now)
                else:
                    self._send_due(dev, due)
            if now >= next_misc:
                next_misc = now + 1.0
                for dev in self.devices:
                    dev.client.loop_misc()
                    if dev.state == "waiting" and now - dev.wait_since > self.final_timeout:
                        self.timeouts += 1
                        dev.state = "idle"
                        self._start_utterance(dev, now)
                    self._flush(dev)
        for dev in self.devices:
            if dev.state == "waiting" and self._in_window(dev.wait_since):
                self.timeouts += 1  # never got its final
        self.closing = True
        for dev in self.devices:
            try:
                dev.client.disconnect()
            except Exception:
                pass

    def result(self) -> dict[str, Any]:
        late = np.array(self.lateness_ms) if self.lateness_ms else np.zeros(1)
        return {
            "devices": len(self.devices),
            "sent_total": self.sent_total,
            "sent_window": self.sent_window,
            "window_s": self.window[1] - self.window[0],
            "lateness_ms": {
                "p50": float(np.percentile(late, 50)),
                "p99": float(np.percentile(late, 99)),
                "max": float(late.max()),
                "over_10ms": float((late > 10).mean()),
            },
            "utterances_started": self.started,
            "utterances_completed": self.completed,
            "latencies_ms": self.latencies,
            "speech_ended_ms": self.se_latencies,
            "speech_ended_to_final_ms": self.se_final_ms,
            "timeouts": self.timeouts,
            "errors": self.errors,
            "disconnects": self.disconnects,
            "vad_mismatch": self.vad_mismatch,
            "raw_fallbacks": self.raw_fallbacks,
        }


def generator_main(spec: dict[str, Any]) -> None:
    gen = Generator(spec)
    connect_s = gen.connect_all()
    print(json.dumps({"ready": {"pid": os.getpid(), "connect_s": connect_s}}), flush=True)
    line = sys.stdin.readline()
    if not line:
        return
    gen.run(json.loads(line))
    print(json.dumps({"result": {**gen.result(), "connect_s": connect_s}}), flush=True)


# The orchestrator -----------------------------------------------------------------------------------


class Child:
    """A child process speaking JSON lines on stdin/stdout; stderr goes to a log file."""

    def __init__(self, name: str, argv: list[str], logdir: Path) -> None:
        self.name = name
        self.log_path = logdir / f"{name}.log"
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log_path.open("wb"),
            bufsize=0,
        )
        self.pid = self.proc.pid
        self._buffer = b""

    def expect(self, key: str, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        sel = selectors.DefaultSelector()
        sel.register(fd, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        try:
            while True:
                while b"\n" in self._buffer:
                    line, self._buffer = self._buffer.split(b"\n", 1)
                    try:
                        msg = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # stray print
                    if isinstance(msg, dict) and key in msg:
                        return msg[key]  # type: ignore[no-any-return]
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    raise RuntimeError(f"{self.name}: no {key!r} within {timeout:g} s; see {self.log_path}")
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"{self.name} exited ({self.proc.wait()}); see {self.log_path}:\n{self.tail()}")
                self._buffer += chunk
        finally:
            sel.close()

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write((line + "\n").encode())
        except BrokenPipeError:
            pass

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def finish(self, timeout: float = 15.0) -> None:
        if self.proc.poll() is None:
            try:
                if self.proc.stdin:
                    self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()  # our own child, by its Popen handle
                self.proc.wait(timeout=5)


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None, "max": None, "mean": None}
    arr = np.array(values)
    return {
        "p50": float(np.percentile(arr, 50)),
        "p95": float(np.percentile(arr, 95)),
        "p99": float(np.percentile(arr, 99)),
        "max": float(arr.max()),
        "mean": float(arr.mean()),
    }


def start_profiler(args: argparse.Namespace, phase: str, pid: int, seconds: float) -> subprocess.Popen[bytes]:
    """py-spy (``pip install py-spy``) on the receiver for the measurement window: collapsed stacks."""
    exe = Path(sys.executable).with_name("py-spy")
    out = Path(args.profile)
    out.mkdir(parents=True, exist_ok=True)
    argv = [str(exe) if exe.exists() else "py-spy", "record", "--pid", str(pid), "--duration", str(int(seconds))]
    argv += ["--rate", "250", "--nonblocking", "--threads", "--format", "raw", "--output", str(out / f"{phase}.txt")]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=(out / f"{phase}.py-spy.log").open("wb"))


def run_phase(
    phase: str, args: argparse.Namespace, broker: Any, logdir: Path, fdec: list[int | None] | None
) -> dict[str, Any]:
    py = sys.executable
    here = Path(__file__).resolve()
    role = "subscriber" if phase == "ceiling" else "bridge"
    server = Child(
        role,
        [
            py,
            str(here.parent / "_bridge_proc.py"),
            "--role",
            role,
            "--port",
            str(broker.port),
            "--prefix",
            args.prefix,
            "--devices",
            str(args.devices),
            "--endpointing",
            args.endpointing,
            "--log-level",
            args.bridge_log_level,
            "--experiment",
            args.experiment,
            "--protocol",
            str(args.protocol),
            "--metrics",
            "off" if args.no_metrics else "on",
        ],
        logdir,
    )
    children = [server]
    try:
        ready = server.expect("ready", 60)
        mode = "stream" if phase == "ceiling" else args.endpointing
        gens = []
        for g, (first, count) in enumerate(generator_slices(args.devices, args.generators)):
            spec = {
                "phase": phase,
                "mode": mode,
                "host": broker.host,
                "port": broker.port,
                "prefix": args.prefix,
                "first": first,
                "count": count,
                "seed": args.seed + g,
                "final_timeout": args.final_timeout,
                "fdec": fdec,
                "paho_publish": args.paho_publish,
            }
            gens.append(Child(f"{phase}-gen{g}", [py, str(here), "--_generator", json.dumps(spec)], logdir))
        children += gens
        gen_ready = [g.expect("ready", 90) for g in gens]

        t0 = time.monotonic() + 0.5
        go = {"t0": t0, "w0": t0 + args.warmup, "w1": t0 + args.seconds, "t_end": t0 + args.seconds}
        go["grace"] = 1.0 if phase == "ceiling" else min(args.final_timeout, 5.0) + 0.5
        for child in children:
            child.send(json.dumps(go))

        pids = {"receiver": server.pid, **{g.name: g.pid for g in gens}}
        broker_proc = getattr(broker, "_process", None)
        if broker_proc is not None:
            pids["mosquitto"] = broker_proc.pid
        time.sleep(max(0.0, go["w0"] - time.monotonic()))
        profiler = start_profiler(args, phase, server.pid, go["w1"] - go["w0"]) if args.profile else None
        cpu0 = {k: proc_cpu_s(p) for k, p in pids.items()}
        m0, tm0 = machine_busy_s(), time.monotonic()
        time.sleep(max(0.0, go["w1"] - time.monotonic()))
        cpu1 = {k: proc_cpu_s(p) for k, p in pids.items()}
        m1, tm1 = machine_busy_s(), time.monotonic()
        dt = tm1 - tm0
        cores = {k: (cpu1[k] - cpu0[k]) / dt for k in pids if cpu0.get(k) is not None and cpu1.get(k) is not None}
        machine_cores = (m1[0] - m0[0]) / dt
        ours = sum(cores.values())

        if profiler is not None:
            profiler.wait(timeout=60)
        gen_results = [g.expect("result", args.seconds + go["grace"] + 60) for g in gens]
        server.send("stop")
        server_result = server.expect("result", 30)
        for child in children:
            child.finish()
    except BaseException:
        for child in children:
            if child.proc.poll() is None:
                child.proc.kill()
                child.proc.wait(timeout=5)
        raise

    sent_total = sum(r["sent_total"] for r in gen_results)
    sent_window = sum(r["sent_window"] for r in gen_results)
    window_s = gen_results[0]["window_s"]
    received_total = server_result["audio_messages"]
    out: dict[str, Any] = {
        "phase": phase,
        "mode": mode,
        "devices": args.devices,
        "generators": len(gens),
        "connect_s": max(r["connect_s"] for r in gen_ready),
        "offered_fps": sent_window / window_s,
        "received_fps": server_result.get("rate", 0.0),
        "sent_total": sent_total,
        "received_total": received_total,
        "loss": 1 - received_total / sent_total if sent_total else None,
        "cpu_cores": cores,
        "receiver_cores": cores.get("receiver"),
        "generator_cores": sum(v for k, v in cores.items() if "-gen" in k),
        "mosquitto_cores": cores.get("mosquitto"),
        "machine_busy_cores": machine_cores,
        "other_load_cores": max(0.0, machine_cores - ours),
        "receiver_peak_rss_mb": server_result["peak_rss_kb"] / 1024,
        "receiver_ready_rss_mb": ready["rss_kb"] / 1024,
        "receiver_loop_lag_ms": server_result.get("loop_lag_ms"),
        "receiver_gc": server_result.get("gc"),
        "generator_lateness_ms": {
            "p99_worst": max(r["lateness_ms"]["p99"] for r in gen_results),
            "max": max(r["lateness_ms"]["max"] for r in gen_results),
            "over_10ms": float(np.mean([r["lateness_ms"]["over_10ms"] for r in gen_results])),
        },
        "generator_disconnects": sum(r["disconnects"] for r in gen_results),
        "server": server_result,
    }
    if phase == "bridge":
        latencies = [x for r in gen_results for x in r["latencies_ms"]]
        errors: dict[str, int] = {}
        for r in gen_results:
            for k, v in r["errors"].items():
                errors[k] = errors.get(k, 0) + v
        out.update(
            {
                "utterances_started": sum(r["utterances_started"] for r in gen_results),
                "utterances_completed": sum(r["utterances_completed"] for r in gen_results),
                "utterances_measured": len(latencies),
                "timeouts": sum(r["timeouts"] for r in gen_results),
                "errors": errors,
                "latency_ms": percentiles(latencies),
            }
        )
        if mode == "server_vad":
            out["speech_ended_ms"] = percentiles([x for r in gen_results for x in r["speech_ended_ms"]])
            out["speech_ended_to_final_ms"] = percentiles(
                [x for r in gen_results for x in r["speech_ended_to_final_ms"]]
            )
            out["vad_mismatch"] = sum(r["vad_mismatch"] for r in gen_results)
    return out


def git_describe() -> str | None:
    """The commit measured, ``+dirty`` when the work tree has changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return None
    if head.returncode:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _fmt(value: Any, spec: str = ".0f", unit: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:{spec}}{unit}"


def summarize(result: dict[str, Any]) -> str:
    c, b, cfg = result["ceiling"], result["bridge"], result["config"]
    lines = [
        "",
        f"EchoKit MQTT bridge throughput: {cfg['devices']} devices x {cfg['seconds']:g} s, {FRAME_MS} ms frames "
        f"(50 frames/s each), endpointing {cfg['endpointing']}, window {cfg['seconds'] - cfg['warmup']:g} s "
        f"after {cfg['warmup']:g} s warm-up",
        f"machine: {result['env']['cpus']} CPUs, load average before run {result['env']['loadavg_before']}; "
        f"code {result['env']['git']}",
        *([f"EXPERIMENTS applied to both receivers: {cfg['experiment']}"] if cfg.get("experiment") else []),
        "",
        f"{'':34}{'ceiling (bare subscriber)':>24}{'bridge':>14}",
    ]

    def row(label: str, key_fn: Any, spec: str = ".0f", unit: str = "") -> None:
        lines.append(f"{label:34}{_fmt(key_fn(c), spec, unit):>24}{_fmt(key_fn(b), spec, unit):>14}")

    row("offered frames/s (devices sent)", lambda p: p["offered_fps"])
    row("received frames/s (sustained)", lambda p: p["received_fps"])
    row("loss (whole run)", lambda p: None if p["loss"] is None else 100 * p["loss"], ".2f", " %")
    row("receiver CPU (cores)", lambda p: p["receiver_cores"], ".2f")
    row("receiver peak RSS (MB)", lambda p: p["receiver_peak_rss_mb"], ".0f")
    row("receiver loop lag p99 (ms)", lambda p: (p["receiver_loop_lag_ms"] or {}).get("p99"), ".1f")
    row(
        "receiver in gc (ms/s, gen0/1/2)",
        lambda p: "/".join(f"{x:.0f}" for x in p["receiver_gc"]["ms_per_s"]) if p.get("receiver_gc") else None,
        "",
    )
    row(
        "receiver longest gc pause (ms)",
        lambda p: max(p["receiver_gc"]["max_pause_ms"]) if p.get("receiver_gc") else None,
        ".0f",
    )
    row("mosquitto CPU (cores)", lambda p: p["mosquitto_cores"], ".2f")
    row("load generators CPU (cores)", lambda p: p["generator_cores"], ".2f")
    row(
        "machine busy / other work (cores)",
        lambda p: f"{p['machine_busy_cores']:.2f} / {p['other_load_cores']:.2f}",
        "",
    )
    row("generator pacing p99 late (ms)", lambda p: p["generator_lateness_ms"]["p99_worst"], ".1f")
    lat = b["latency_ms"]
    label = "last frame → final" if cfg["endpointing"] == "push_to_talk" else "decisive frame → final"
    lines += [
        "",
        f"utterances: {b['utterances_completed']} completed ({b['utterances_measured']} in window), "
        f"{b['timeouts']} timeouts, errors {b['errors'] or 'none'}",
        f"{label} (ms): p50 {_fmt(lat['p50'], '.1f')}  p95 {_fmt(lat['p95'], '.1f')}  "
        f"p99 {_fmt(lat['p99'], '.1f')}  max {_fmt(lat['max'], '.1f')}",
    ]
    if cfg["endpointing"] == "server_vad":
        se, sf = b["speech_ended_ms"], b["speech_ended_to_final_ms"]
        lines.append(
            f"decisive frame → speech_ended (ms): p50 {_fmt(se['p50'], '.1f')}  p99 {_fmt(se['p99'], '.1f')};  "
            f"speech_ended → final: p50 {_fmt(sf['p50'], '.1f')}  p99 {_fmt(sf['p99'], '.1f')}"
        )
    ratio = result["ratio"]
    lines += [
        f"ratio bridge ÷ bare subscriber frames/s: {100 * ratio:.1f} %",
        "",
        "targets (shown, not asserted):",
        f"  [{'PASS' if ratio >= TARGET_RATIO else 'FAIL'}] bridge ≥ {100 * TARGET_RATIO:.0f} % of the bare "
        f"subscriber's frame rate: {100 * ratio:.1f} %",
    ]
    p99 = lat["p99"]
    note = "" if cfg["devices"] == TARGET_DEVICES else f" (target is defined at {TARGET_DEVICES} devices)"
    verdict = "n/a" if p99 is None else ("PASS" if p99 <= TARGET_P99_MS else "FAIL")
    lines.append(f"  [{verdict}] p99 {label} ≤ {TARGET_P99_MS:g} ms: {_fmt(p99, '.1f', ' ms')}{note}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_generator"]:
        generator_main(json.loads(argv[1]))
        return 0
    parser = argparse.ArgumentParser(
        description="Measure how many real-time devices the bridge serves, against a bare-subscriber ceiling."
    )
    parser.add_argument("--devices", type=int, default=100, help="simulated devices (default 100)")
    parser.add_argument("--seconds", type=float, default=20.0, help="streaming time per phase (default 20)")
    parser.add_argument(
        "--endpointing", choices=["push_to_talk", "server_vad"], default="push_to_talk", help="phase 2 device mode"
    )
    parser.add_argument("--json", metavar="PATH", help="write every number measured as JSON")
    parser.add_argument("--warmup", type=float, default=None, help="seconds excluded at the start (default 3, ≤ D/3)")
    parser.add_argument(
        "--generators", type=int, default=0, help="load-generator processes (default 1 per 150 devices)"
    )
    parser.add_argument("--final-timeout", type=float, default=5.0, help="give up on a final after this many seconds")
    parser.add_argument(
        "--experiment",
        default="",
        help="candidate fixes applied to both receivers, comma-separated: gc (gen0 threshold 10000 on top of "
        "the bridge's own gc.freeze), props (cached paho MQTT 5 property tables); default none",
    )
    parser.add_argument(
        "--protocol",
        type=int,
        choices=[3, 5],
        default=3,
        help="MQTT version of both receivers (the bridge's default: 3)",
    )
    parser.add_argument("--profile", metavar="DIR", help="py-spy the receiver during each window (collapsed stacks)")
    parser.add_argument("--prefix", default="echokit")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--bridge-log-level", choices=["debug", "info", "warning", "error"], default="info")
    parser.add_argument("--no-metrics", action="store_true", help="run the bridge with [metrics] enabled = false")
    parser.add_argument(
        "--paho-publish", action="store_true", help="send audio with paho's publish() instead of pre-framed packets"
    )
    args = parser.parse_args(argv)
    if args.devices < 1 or args.seconds <= 1:
        parser.error("--devices must be ≥ 1 and --seconds > 1")
    if args.warmup is None:
        args.warmup = min(3.0, args.seconds / 3)
    if args.warmup >= args.seconds:
        parser.error("--warmup must be shorter than --seconds")

    from service.tools.devbroker import PrivateMosquitto

    fdec = vad_decision_frames(load_clips()) if args.endpointing == "server_vad" else None
    env = {
        "cpus": os.cpu_count(),
        "loadavg_before": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git": git_describe(),
    }
    result: dict[str, Any] = {
        "config": {
            "devices": args.devices,
            "seconds": args.seconds,
            "warmup": args.warmup,
            "endpointing": args.endpointing,
            "frame_ms": FRAME_MS,
            "clips": list(CLIP_FILES),
            "clip_seconds": [round(len(c) / 16000, 2) for c in load_clips()],
            "vad_decision_frames": fdec,
            "experiment": args.experiment,
            "protocol": args.protocol,
            "metrics": not args.no_metrics,
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
        },
        "env": env,
    }
    logdir = Path(tempfile.mkdtemp(prefix="echokit-bench-"))
    ok = False
    try:
        with PrivateMosquitto() as broker:
            print(f"broker {broker.url}; ceiling phase ({args.devices} devices, {args.seconds:g} s) ...", flush=True)
            result["ceiling"] = run_phase("ceiling", args, broker, logdir, None)
            time.sleep(1.0)
            print(f"bridge phase ({args.endpointing}) ...", flush=True)
            result["bridge"] = run_phase("bridge", args, broker, logdir, fdec)
        ceiling_fps = result["ceiling"]["received_fps"]
        result["ratio"] = result["bridge"]["received_fps"] / ceiling_fps if ceiling_fps else 0.0
        lat = result["bridge"]["latency_ms"]
        result["targets"] = {
            "ratio_min": TARGET_RATIO,
            "ratio_pass": result["ratio"] >= TARGET_RATIO,
            "p99_ms_max": TARGET_P99_MS,
            "p99_pass": lat["p99"] is not None and lat["p99"] <= TARGET_P99_MS,
            "p99_target_devices": TARGET_DEVICES,
        }
        ok = True
    finally:
        if ok:
            for path in logdir.iterdir():
                path.unlink()
            logdir.rmdir()
        else:
            print(f"child logs kept in {logdir}", file=sys.stderr)
    print(summarize(result))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
