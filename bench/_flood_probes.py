"""What ``bench/flood.py`` watches: the real bridge process, its RSS, and its HTTP endpoints.

* :class:`BridgeUnderTest`: ``echokit-bridge run`` with a generated config, its JSON log in a file;
  the metrics port comes from the log's ``metrics.listening`` event.
* :class:`Probes`: threads that sample the bridge's ``VmRSS`` and time ``GET /healthz`` and
  ``GET /metrics`` every 100 ms, each sample stamped with ``time.monotonic`` so it can be
  assigned to a phase afterwards. Every request has a timeout; every loop stops on :meth:`stop`.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_EVERY_S = 0.1
HTTP_TIMEOUT_S = 10.0
CHILDREN_EVERY = 10
"""Look for the bridge's child processes every 10th RSS sample (once a second)."""
WATCHED_GAUGES = ("echokit_bridge_devices", "echokit_bridge_sessions_active")
"""Gauges whose peak the /metrics sampler keeps (a line scan, not a full parse, every 100 ms)."""


def rss_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def descendants(pid: int) -> set[int]:
    """Every process below ``pid``, from the parent ids in ``/proc/*/stat``."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pids: set[int]) -> set[int]:
    """Those of ``pids`` still running (not zombies)."""
    out = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    out.add(pid)
        except OSError:
            pass
    return out


def http_get(port: int, path: str, timeout: float = HTTP_TIMEOUT_S) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def scrape(port: int) -> dict[str, float]:
    """Every sample of ``/metrics`` as ``name{label="v",...}`` → value."""
    status, body = http_get(port, "/metrics", timeout=30)
    if status != 200:
        raise RuntimeError(f"/metrics answered {status}")
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


class BridgeUnderTest:
    """The bridge as operators run it: ``python -m service.cli run --config <generated>``."""

    def __init__(self, config_toml: str, workdir: Path) -> None:
        self.config_path = workdir / "bridge.toml"
        self.config_path.write_text(config_toml)
        self.log_path = workdir / "bridge.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.pid = 0

    def start(self, timeout: float = 90.0) -> int:
        """Start and wait until connected; returns the metrics port."""
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "run", "--config", str(self.config_path)],
            stdout=self.log_path.open("wb"),
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=env,
        )
        self.pid = self.process.pid
        port, connected = None, False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not (port and connected):
            if self.process.poll() is not None:
                raise RuntimeError(f"bridge exited ({self.process.returncode}):\n{self.tail()}")
            for event in self._events():
                if event.get("event") == "metrics.listening":
                    port = int(event["port"])
                connected = connected or event.get("event") == "mqtt.connected"
            time.sleep(0.2)
        if not (port and connected):
            raise RuntimeError(f"bridge not connected with metrics within {timeout:g} s:\n{self.tail()}")
        return port

    def _events(self) -> list[dict[str, Any]]:
        out = []
        with self.log_path.open(errors="replace") as f:
            for line in f:
                if line.startswith("{"):
                    try:
                        out.append(json.loads(line))
                    except json.JSONDecodeError:
                        pass
        return out

    def log_summary(self) -> dict[str, Any]:
        """Lines, lines that are not JSON (a library writing plain text), and the commonest events."""
        lines = non_json = 0
        events: Counter[str] = Counter()
        levels: Counter[str] = Counter()
        with self.log_path.open(errors="replace") as f:
            for line in f:
                lines += 1
                try:
                    event = json.loads(line)
                    events[str(event.get("event"))] += 1
                    levels[str(event.get("level"))] += 1
                except (json.JSONDecodeError, AttributeError):
                    non_json += 1
        return {"lines": lines, "non_json": non_json, "levels": dict(levels), "events": dict(events.most_common(12))}

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (the bridge drains), then SIGKILL if it has not exited in ``timeout``."""
        process = self.process
        if process is None or process.poll() is not None:
            return None if process is None else process.returncode
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()  # our own child, by its Popen handle
            return process.wait(timeout=10)


@dataclass
class Probes:
    """RSS and endpoint latency samples of one bridge: ``(monotonic time, value)`` lists."""

    pid: int
    port: int
    rss: list[tuple[float, int]] = field(default_factory=list)
    requests: dict[str, list[tuple[float, float, int]]] = field(default_factory=dict)
    """path → ``(sent at, seconds, HTTP status or 0 for a failure)``."""
    gauges: list[tuple[float, dict[str, float]]] = field(default_factory=list)
    children: set[int] = field(default_factory=set)
    """Every process seen below the bridge (decoder workers, multiprocessing's resource tracker)."""
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        self._threads = [threading.Thread(target=self._sample_rss, daemon=True)]
        for path in ("/healthz", "/metrics"):
            self.requests[path] = []
            self._threads.append(threading.Thread(target=self._sample_http, args=(path,), daemon=True))
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=HTTP_TIMEOUT_S + 5)

    def rss_now_kb(self) -> int:
        return rss_kb(self.pid) or 0

    def _sample_rss(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            value = rss_kb(self.pid)
            if value is not None:
                self.rss.append((time.monotonic(), value))
            if len(self.rss) % CHILDREN_EVERY == 0:
                self.children |= descendants(self.pid)
            next_at += SAMPLE_EVERY_S
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def _sample_http(self, path: str) -> None:
        samples = self.requests[path]
        next_at = time.monotonic()
        while not self._stop.is_set():
            t = time.monotonic()
            try:
                status, body = http_get(self.port, path)
            except OSError:
                status, body = 0, b""
            samples.append((t, time.monotonic() - t, status))
            if path == "/metrics" and status == 200:
                self.gauges.append((t, _gauges(body)))
            next_at = max(next_at + SAMPLE_EVERY_S, time.monotonic())  # a slow answer is not made up for
            self._stop.wait(max(0.0, next_at - time.monotonic()))


def _gauges(body: bytes) -> dict[str, float]:
    out = {}
    for line in body.split(b"\n"):
        name, _, value = line.partition(b" ")
        if name.decode() in WATCHED_GAUGES:
            out[name.decode()] = float(value)
    return out
