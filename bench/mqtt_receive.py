"""What one MQTT receive costs: µs of subscriber CPU per message, candidate clients side by side.

A private Mosquitto, one paced publisher process (``--rate`` QoS 0 messages of ``--size`` bytes
per second, round robin over ``--topics`` device audio topics), and each candidate subscriber in
a process of its own, alone against the same load, subscribed to ``<prefix>/+/in/audio`` at QoS
1 like the bridge and counting messages and nothing else. CPU is the subscriber's utime + stime
from /proc over a window after a warm-up; the candidates take turns, ``--runs`` rounds, and the
median per candidate is printed (and written with every run to ``--json``).

    .venv/bin/python bench/mqtt_receive.py --seconds 8 --runs 3 --json bench/results/mqtt-receive.json

Candidates: ``ours`` (the bridge's MQTT 3.1.1 engine, :mod:`service.link.mqtt311`), ``paho-loop``
(paho-mqtt on the bridge's asyncio driver, its previous transport and still its MQTT 5 path),
``aiomqtt``, ``gmqtt`` and ``pymosquitto`` (libmosquitto through ctypes, its own loop), when installed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.link.mqtt311 import connect_packet, publish_packet
from service.link.options import ConnectOptions
from service.tools.devbroker import PrivateMosquitto

CANDIDATES = ("ours", "paho-loop", "aiomqtt", "gmqtt", "pymosquitto")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PREFIX = "bench"


def proc_cpu_s(pid: int) -> float:
    """utime + stime of all threads of ``pid``, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / CLK_TCK


# The subscriber process ----------------------------------------------------------------------


class Counter:
    """Messages seen; a thread answers ``mark`` lines on stdin with the count so far."""

    def __init__(self) -> None:
        self.count = 0
        threading.Thread(target=self._answer, daemon=True).start()

    def one(self, *_: Any) -> None:
        self.count += 1

    def _answer(self) -> None:
        for line in sys.stdin:
            if line.strip() == "mark":
                print(json.dumps({"count": self.count}), flush=True)
            else:
                os._exit(0)
        os._exit(0)


def ready() -> None:
    print(json.dumps({"ready": os.getpid()}), flush=True)


async def subscribe_ours(port: int, counter: Counter, protocol: str) -> None:
    from service.link.mqtt311 import Mqtt311Connection
    from service.link.paho_engine import PahoConnection

    options = ConnectOptions(f"mqtt://127.0.0.1:{port}", identifier=f"recv-{os.getpid()}")
    engine = Mqtt311Connection if protocol == "ours" else PahoConnection
    async with engine(options, counter.one) as connection:
        await connection.subscribe(f"{PREFIX}/+/in/audio", qos=1)
        ready()
        await connection.wait_closed()


async def subscribe_aiomqtt(port: int, counter: Counter) -> None:
    import aiomqtt

    async with aiomqtt.Client("127.0.0.1", port, identifier=f"recv-{os.getpid()}") as client:
        await client.subscribe(f"{PREFIX}/+/in/audio", qos=1)
        ready()
        async for message in client.messages:
            counter.one(message)


async def subscribe_gmqtt(port: int, counter: Counter) -> None:
    from gmqtt import Client
    from gmqtt.mqtt.constants import MQTTv311

    def on_message(*_: Any) -> int:
        counter.count += 1
        return 0

    client = Client(f"recv-{os.getpid()}")
    client.on_message = on_message
    await client.connect("127.0.0.1", port, version=MQTTv311)
    client.subscribe(f"{PREFIX}/+/in/audio", qos=1)
    await asyncio.sleep(0.5)  # gmqtt's subscribe does not wait for its SUBACK
    ready()
    await asyncio.Event().wait()


def subscribe_pymosquitto(port: int, counter: Counter) -> None:
    from pymosquitto.client import Mosquitto

    client = Mosquitto(f"recv-{os.getpid()}")
    client.on_message = counter.one
    client.on_subscribe = lambda *_: ready()
    client.connect("127.0.0.1", port)
    client.subscribe(f"{PREFIX}/+/in/audio", qos=1)
    client.loop_forever()


def subscriber_main(candidate: str, port: int) -> None:
    counter = Counter()
    if candidate == "pymosquitto":
        subscribe_pymosquitto(port, counter)
    elif candidate == "aiomqtt":
        asyncio.run(subscribe_aiomqtt(port, counter))
    elif candidate == "gmqtt":
        asyncio.run(subscribe_gmqtt(port, counter))
    else:
        asyncio.run(subscribe_ours(port, counter, candidate))


# The publisher process -----------------------------------------------------------------------


def publisher_main(port: int, rate: int, size: int, topics: int, seconds: float) -> None:
    """Raw MQTT on a blocking socket, paced per millisecond: the cheapest load generator there is."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(connect_packet(ConnectOptions("", identifier=f"load-{os.getpid()}", keepalive_s=0)))
    sock.recv(4)
    payload = bytes(size)
    packets = [publish_packet(f"{PREFIX}/dev{i:04d}/in/audio", payload, 0, False, 0) for i in range(topics)]
    sent = 0
    start = time.monotonic()
    while (now := time.monotonic()) - start < seconds:
        due = int((now - start) * rate)
        if due > sent:
            sock.sendall(b"".join(packets[k % topics] for k in range(sent, due)))
            sent = due
        time.sleep(0.001)
    sock.close()


# The parent ----------------------------------------------------------------------------------


def available(candidate: str) -> bool:
    module = {"aiomqtt": "aiomqtt", "gmqtt": "gmqtt", "pymosquitto": "pymosquitto.client"}.get(candidate)
    if module is None:
        return True
    probe = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True)
    return probe.returncode == 0


def measure(candidate: str, args: argparse.Namespace, port: int) -> dict[str, Any]:
    me = [sys.executable, __file__]
    sub = subprocess.Popen(
        [*me, "--role", "subscriber", "--candidate", candidate, "--port", str(port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert sub.stdin is not None and sub.stdout is not None
    try:
        pid = json.loads(sub.stdout.readline())["ready"]
        load_s = args.warmup + args.seconds + 1
        pub = subprocess.Popen([*me, "--role", "publisher", "--port", str(port), "--load-seconds", str(load_s)])
        time.sleep(args.warmup)

        def mark() -> tuple[float, float, int]:
            sub.stdin.write("mark\n")  # type: ignore[union-attr]
            sub.stdin.flush()  # type: ignore[union-attr]
            count = json.loads(sub.stdout.readline())["count"]  # type: ignore[union-attr]
            return time.monotonic(), proc_cpu_s(pid), count

        t0, cpu0, n0 = mark()
        time.sleep(args.seconds)
        t1, cpu1, n1 = mark()
        pub.wait(timeout=load_s + 10)
    finally:
        sub.kill()
        sub.wait()
    messages = n1 - n0
    expected = args.rate * (t1 - t0)
    return {
        "candidate": candidate,
        "messages": messages,
        "received_of_sent": round(messages / expected, 4),
        "cpu_s": round(cpu1 - cpu0, 3),
        "us_per_msg": round((cpu1 - cpu0) / messages * 1e6, 2) if messages else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--role", choices=["parent", "subscriber", "publisher"], default="parent")
    parser.add_argument("--candidate", choices=CANDIDATES)
    parser.add_argument("--candidates", default=",".join(CANDIDATES), help="comma-separated (default: all)")
    parser.add_argument("--port", type=int)
    parser.add_argument("--rate", type=int, default=20_000, help="messages per second (default 20000)")
    parser.add_argument("--size", type=int, default=640, help="payload bytes (default 640: one 20 ms frame)")
    parser.add_argument("--topics", type=int, default=400, help="device topics (default 400)")
    parser.add_argument("--seconds", type=float, default=8.0, help="measurement window per run (default 8)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before the window (default 2)")
    parser.add_argument("--runs", type=int, default=3, help="rounds over the candidates (default 3)")
    parser.add_argument("--load-seconds", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--json", metavar="PATH", help="write every run as JSON")
    args = parser.parse_args()
    if args.role == "subscriber":
        subscriber_main(args.candidate, args.port)
        return
    if args.role == "publisher":
        publisher_main(args.port, args.rate, args.size, args.topics, args.load_seconds)
        return
    candidates = [c for c in args.candidates.split(",") if c]
    missing = [c for c in candidates if not available(c)]
    candidates = [c for c in candidates if c not in missing]
    if missing:
        print(f"not installed, skipped: {', '.join(missing)}", file=sys.stderr)
    runs: list[dict[str, Any]] = []
    with PrivateMosquitto() as broker:
        for round_no in range(args.runs):
            for candidate in candidates:
                result = measure(candidate, args, broker.port)
                runs.append({"round": round_no, **result})
                print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    table = {}
    print(f"{'candidate':<12} {'µs/msg (median)':>16} {'runs':>24} {'received':>9}")
    for candidate in candidates:
        mine = [r for r in runs if r["candidate"] == candidate and r["us_per_msg"] is not None]
        values = [r["us_per_msg"] for r in mine]
        median = statistics.median(values) if values else None
        table[candidate] = median
        received = min(r["received_of_sent"] for r in mine) if mine else 0
        shown = " ".join(f"{v:.1f}" for v in values)
        print(f"{candidate:<12} {median if median is None else f'{median:.1f}':>16} {shown:>24} {received:>9.3f}")
    if args.json:
        settings = {k: getattr(args, k) for k in ("rate", "size", "topics", "seconds", "warmup", "runs")}
        report = {"settings": settings, "median_us_per_msg": table, "runs": runs}
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
