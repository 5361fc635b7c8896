"""Start an aiohttp app on 127.0.0.1 (a free port unless one is given): the fakes' shared plumbing."""

from __future__ import annotations

from typing import Any

from aiohttp import web


async def serve(app: web.Application, port: int = 0, **runner_options: Any) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, **runner_options)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, int(runner.addresses[0][1])
