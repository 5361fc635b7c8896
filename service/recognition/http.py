"""The HTTP seam shared by the network backends: httpx's API over aiohttp's connection pool.

httpcore's pool rescans every connection for every request, which costs quadratic time with
hundreds in flight: measured with 200 utterances in flight (bench/backend_concurrency.py),
27 ms CPU per request and 78 ms event-loop lag p99 with httpcore, 2 ms and 9-23 ms with this.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport


def _remapped(exc: httpx.TimeoutException) -> httpx.TransportError:
    """httpx-aiohttp reports every connection error (refused, dropped) as ``ConnectTimeout``.

    A timeout stays a timeout; a refused or dropped connection becomes what httpcore would
    have raised, so callers tell "slow" from "unreachable" without knowing the transport.
    """
    cause = exc.__cause__
    if isinstance(cause, aiohttp.ClientConnectionError) and not isinstance(cause, TimeoutError):
        if isinstance(cause, aiohttp.ClientConnectorError):
            return httpx.ConnectError(str(exc))
        return httpx.RemoteProtocolError(str(exc))
    return exc


class _RemappedStream(httpx.AsyncByteStream):
    def __init__(self, inner: httpx.AsyncByteStream) -> None:
        self._inner = inner

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._inner:
                yield chunk
        except httpx.TimeoutException as exc:
            raise _remapped(exc) from exc.__cause__

    async def aclose(self) -> None:
        await self._inner.aclose()


class _Transport(AiohttpTransport):
    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            response = await super().handle_async_request(request)
        except httpx.TimeoutException as exc:
            raise _remapped(exc) from exc.__cause__
        assert isinstance(response.stream, httpx.AsyncByteStream)
        response.stream = _RemappedStream(response.stream)
        return response


def pooled_transport(limits: httpx.Limits) -> httpx.AsyncBaseTransport:
    return _Transport(limits=limits)
