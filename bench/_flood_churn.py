"""The distinct-id churn of ``bench/flood.py``: N device ids, one malformed audio frame each.

One raw MQTT 3.1.1 connection (CONNECT, then pre-framed QoS 0 PUBLISH packets written in batches,
then DISCONNECT): the bridge sees N devices it never heard of, each sending one frame too short to
decode, as a hostile or broken fleet would. Bounded by the count and by ``max_s``; ``rate`` 0 sends
as fast as the socket takes them.

    python bench/_flood_churn.py '<spec as JSON>'   # prints one result line
"""

from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from service.link.mqtt311 import connect_packet, publish_packet  # noqa: E402
from service.link.options import ConnectOptions  # noqa: E402

BAD_FRAME = b"\x01\x02\x03"
"""Shorter than any frame header: ``malformed_frame``."""
BATCH = 500


def connect(host: str, port: int, client_id: str) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=10)
    sock.sendall(connect_packet(ConnectOptions(f"mqtt://{host}:{port}", identifier=client_id, keepalive_s=60)))
    connack = sock.recv(4)
    if len(connack) < 4 or connack[0] != 0x20 or connack[3] != 0:
        raise RuntimeError(f"churn: CONNACK refused: {connack!r}")
    return sock


def send_churn(spec: dict[str, Any]) -> dict[str, Any]:
    count, rate, max_s = int(spec["count"]), float(spec["rate"]), float(spec["max_s"])
    sock = connect(spec["host"], spec["port"], "flood-churn")
    t0 = time.monotonic()
    sent = 0
    while sent < count and time.monotonic() - t0 < max_s:
        n = min(BATCH, count - sent)
        ids = range(sent, sent + n)
        sock.sendall(
            b"".join(publish_packet(f"{spec['prefix']}/churn{i:07d}/in/audio", BAD_FRAME, 0, False, 0) for i in ids)
        )
        sent += n
        if rate > 0:
            time.sleep(max(0.0, t0 + sent / rate - time.monotonic()))
    took = time.monotonic() - t0
    sock.sendall(b"\xe0\x00")  # DISCONNECT
    sock.close()
    return {"sent": sent, "send_s": took, "t0": t0, "t1": t0 + took}


def main() -> None:
    print(json.dumps({"result": send_churn(json.loads(sys.argv[1]))}), flush=True)


if __name__ == "__main__":
    main()
