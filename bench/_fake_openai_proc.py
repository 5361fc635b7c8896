"""The loopback OpenAI fake in a process of its own (so it does not share the measured event loop).

Prints ``PORT <n>`` once listening; serves until stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.fakes.openai_server import FakeOpenAI, Transcript  # noqa: E402


async def main(latency_s: float) -> None:
    async with FakeOpenAI(api_key="sk-bench", default=Transcript("what time is it", latency_s=latency_s)) as fake:
        print(f"PORT {fake.port}", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--latency-ms", type=float, default=300)
    asyncio.run(main(parser.parse_args().latency_ms / 1000))
