"""The HTTP seam shared by the network backends: one pooled client transport.

httpx's API (tests and fakes use it) over aiohttp's connection pool.
"""

from __future__ import annotations

import asyncio

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport


def connection_failed(exc: httpx.TimeoutException) -> bool:
    """The aiohttp transport reports every connection error (refused, dropped) as ConnectTimeout."""
    cause = exc.__cause__
    return isinstance(cause, aiohttp.ClientConnectionError) and not isinstance(cause, asyncio.TimeoutError)


def pooled_transport(limits: httpx.Limits) -> httpx.AsyncBaseTransport:
    """httpx's API over aiohttp's connection pool.

    httpcore's pool rescans every connection for every request, which costs quadratic time
    with hundreds in flight: measured with 200 utterances in flight (bench/backend_concurrency.py),
    27 ms CPU per request and 78 ms event-loop lag p99 with httpcore, 2 ms and 9-23 ms with this.
    """
    return AiohttpTransport(limits=limits)
