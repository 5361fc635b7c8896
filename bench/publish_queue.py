"""The link's outgoing queue under a burst: what a good device waits for its final, and what is dropped.

One :class:`service.link.connection.MqttLink` on a private Mosquitto (loopback). Each round posts a
burst of ``--burst`` messages to ``--flooders`` other devices (a mix of QoS 1 errors and QoS 0
partials, the optional priority; ``--errors`` is the errors' share), with one
good device's turn (``listening``, ``speech_ended``, final) posted in the middle of it. A subscriber
for the good device times post → arrival of its final. Reported per round: that latency, the
burst's publish rate, drops by priority, and the CPU cost of one ``post``.

    .venv/bin/python bench/publish_queue.py --burst 20000 --flooders 1000 --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from firmware_protocol import Topics  # noqa: E402
from service.config import MqttConfig  # noqa: E402
from service.link.client import mqtt_client  # noqa: E402
from service.link.connection import MqttLink  # noqa: E402
from service.link.outgoing import Priority  # noqa: E402
from service.tools.devbroker import PrivateMosquitto  # noqa: E402


async def one_round(link: MqttLink, url: str, prefix: str, burst: int, flooders: int, errors: float) -> dict[str, Any]:
    good_final: asyncio.Future[float] = asyncio.get_running_loop().create_future()
    async with mqtt_client(url, identifier=f"good-{uuid.uuid4().hex[:6]}") as device:
        await device.subscribe(f"{prefix}/good/out/#", qos=1)

        async def read() -> None:
            async for message in device.messages:
                if message.payload == b"final":
                    good_final.set_result(time.perf_counter())
                    return

        reader = asyncio.create_task(read())
        before = dict(link.stats.outgoing.dropped)
        published = link.stats.published
        error_every = max(1, round(1 / errors)) if errors else 0
        started = time.perf_counter()
        posted_final = 0.0
        for i in range(burst):
            key = f"f{i % flooders}"
            if error_every and i % error_every == 0:
                link.post(f"{prefix}/{key}/out/error", b"error", qos=1, priority=Priority.ERROR, key=key)
            else:
                link.post(f"{prefix}/{key}/out/transcript", b"partial", qos=0, priority=Priority.OPTIONAL, key=key)
            if i == burst // 2:
                for step, priority in (("listening", Priority.OWED), ("speech_ended", Priority.OWED)):
                    link.post(f"{prefix}/good/out/x", step.encode(), qos=1, priority=priority, key="good")
                posted_final = time.perf_counter()
                link.post(f"{prefix}/good/out/x", b"final", qos=1, priority=Priority.FINAL, key="good")
        post_s = time.perf_counter() - started
        async with asyncio.timeout(60):
            await link.flush()
        took = time.perf_counter() - started
        arrived = good_final.result() if good_final.done() else None  # flushed, so it came or was dropped
        reader.cancel()
    dropped = {k: v - before[k] for k, v in link.stats.outgoing.dropped.items()}
    return {
        "good_final_ms": None if arrived is None else round((arrived - posted_final) * 1000, 1),
        "published": link.stats.published - published,
        "publish_rate_per_s": round((link.stats.published - published) / took),
        "dropped": dropped,
        "post_us": round(post_s / burst * 1e6, 2),
    }


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    with PrivateMosquitto() as broker:
        prefix = f"pq{uuid.uuid4().hex[:6]}"
        config = MqttConfig(url=broker.url, topic_prefix=prefix, publish_queue=args.queue)
        link = MqttLink(config, Topics(prefix), lambda topic, payload: None, instance="bench", version="bench")
        runner = asyncio.create_task(link.run())
        async with asyncio.timeout(10):
            await link.connected.wait()
        rounds = [
            await one_round(link, broker.url, prefix, args.burst, args.flooders, args.errors)
            for _ in range(args.rounds)
        ]
        runner.cancel()
    return rounds


def main(args: argparse.Namespace) -> None:
    rounds = asyncio.run(run(args))
    finals = sorted(r["good_final_ms"] for r in rounds if r["good_final_ms"] is not None)
    print(f"burst {args.burst} to {args.flooders} devices, queue {args.queue}, errors {args.errors:.0%}")
    for r in rounds:
        print(
            f"  good final {r['good_final_ms'] or 'lost':>7} ms  published {r['published']:6d} "
            f"({r['publish_rate_per_s']:6d}/s)  dropped {r['dropped']}  post {r['post_us']} us"
        )
    if finals:
        median, worst = finals[len(finals) // 2], finals[-1]
        print(f"good final: {len(finals)}/{len(rounds)} came; median {median} ms, max {worst} ms")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rounds": rounds}, indent=2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--burst", type=int, default=20000)
    parser.add_argument("--flooders", type=int, default=1000)
    parser.add_argument("--errors", type=float, default=0.2, help="share of the burst that is QoS 1 errors")
    parser.add_argument("--queue", type=int, default=MqttConfig().publish_queue)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json")
    main(parser.parse_args())
