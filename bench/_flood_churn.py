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
from typing import Any

BAD_FRAME = b"\x01\x02\x03"
"""Shorter than any frame header: ``malformed_frame``."""
BATCH = 500


def remaining_length(length: int) -> bytes:
    out = bytearray()
    while True:
        byte, length = length % 128, length // 128
        out.append(byte | (0x80 if length else 0))
        if not length:
            return bytes(out)


def packet(kind: int, body: bytes) -> bytes:
    return bytes([kind]) + remaining_length(len(body)) + body


def field(data: bytes) -> bytes:
    return len(data).to_bytes(2, "big") + data


def connect(host: str, port: int, client_id: str) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=10)
    # MQTT 3.1.1: protocol name, level 4, clean session, keepalive 60 s, then the client id.
    sock.sendall(packet(0x10, field(b"MQTT") + b"\x04\x02\x00\x3c" + field(client_id.encode())))
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
            b"".join(packet(0x30, field(f"{spec['prefix']}/churn{i:07d}/in/audio".encode()) + BAD_FRAME) for i in ids)
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
