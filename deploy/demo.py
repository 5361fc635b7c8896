"""`make demo`: a private Mosquitto, the bridge on pocketsphinx, one spoken utterance, clean stop.

Everything runs on loopback and shuts down at the end, whatever happens in between.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from service.link.client import mqtt_client
from service.tools.devbroker import PrivateMosquitto

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "tests" / "fixtures" / "weather.wav"
PREFIX = "echokit"


async def wait_online(url: str, timeout: float = 60) -> None:
    async with asyncio.timeout(timeout), mqtt_client(url, identifier="echokit-demo") as client:
        await client.subscribe(f"{PREFIX}/status", qos=1)
        async for message in client.messages:
            if json.loads(bytes(message.payload)).get("state") == "online":  # type: ignore[arg-type]
                return


def main() -> int:
    bin_dir = Path(sys.executable).parent
    with PrivateMosquitto() as broker, tempfile.TemporaryDirectory(prefix="echokit-demo-") as tmp:
        config = Path(tmp) / "bridge.toml"
        config.write_text(
            f'[mqtt]\nurl = "{broker.url}"\ntopic_prefix = "{PREFIX}"\n\n'
            '[asr]\nplatform = "pocketsphinx"\n\n[log]\nformat = "console"\nlevel = "info"\n'
        )
        print(f"== mosquitto on {broker.url}; starting the bridge (pocketsphinx, offline)")
        log_path = Path(tmp) / "bridge.log"
        bridge = subprocess.Popen(
            [str(bin_dir / "echokit-bridge"), "run", "--config", str(config)],
            stdout=log_path.open("wb"),
            stderr=subprocess.STDOUT,
        )
        try:
            started = time.monotonic()
            asyncio.run(wait_online(broker.url))
            print(f"== bridge online after {time.monotonic() - started:.1f} s; a device says: {SAMPLE.name}")
            code = subprocess.call(
                [
                    str(bin_dir / "echokit-device"),
                    "send",
                    str(SAMPLE),
                    "--device",
                    "demo0a1b2c3d",
                    "--broker",
                    broker.url,
                ]
            )
        except TimeoutError:
            print("== the bridge did not come online; its log:\n" + log_path.read_text(errors="replace"))
            code = 1
        finally:
            bridge.send_signal(signal.SIGTERM)
            try:
                bridge.wait(timeout=20)
            except subprocess.TimeoutExpired:
                bridge.kill()
        print(f"== bridge stopped (exit {bridge.returncode}); demo {'OK' if code == 0 else 'FAILED'}")
        return code


if __name__ == "__main__":
    sys.exit(main())
