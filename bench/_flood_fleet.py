"""The flooding fleet of ``bench/flood.py``: ``bridge_throughput``'s push-to-talk generator, counting replies.

Each device does utterances back to back, as in ``bench/bridge_throughput.py`` (``start``, 1.2–2 s of
speech in pre-framed QoS 0 frames, LAST, wait for the final or an error, next), and every message
the bridge sends it is counted by kind, so the run shows what the bridge sends a flooding fleet.

    python bench/_flood_fleet.py '<spec as JSON>'   # reads the go line on stdin, prints one result line
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from bridge_throughput import Device, Generator  # noqa: E402


class FloodGenerator(Generator):
    """A :class:`Generator` that also counts every message its devices receive, by topic kind."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__(spec)
        self.received: dict[str, int] = {}

    def _on_message(self, client: Any, dev: Device, message: Any) -> None:
        kind = message.topic.rsplit("/", 1)[-1]
        self.received[kind] = self.received.get(kind, 0) + 1
        super()._on_message(client, dev, message)

    def result(self) -> dict[str, Any]:
        out = super().result()
        del out["latencies_ms"], out["speech_ended_ms"], out["speech_ended_to_final_ms"]
        return {**out, "received": self.received}


def main() -> None:
    gen = FloodGenerator(json.loads(sys.argv[1]))
    connect_s = gen.connect_all()
    print(json.dumps({"ready": {"pid": os.getpid(), "connect_s": connect_s}}), flush=True)
    line = sys.stdin.readline()
    if not line:
        return
    gen.run(json.loads(line))
    print(json.dumps({"result": {**gen.result(), "connect_s": connect_s}}), flush=True)


if __name__ == "__main__":
    main()
