"""The HTTP seam shared by the network backends: httpx's API over aiohttp's connection pool, and one failure policy.

httpcore's pool rescans every connection for every request, which costs quadratic time with
hundreds in flight (bench/backend_concurrency.py compares the two).

:func:`status_error` and :func:`transport_error` decide, for every HTTP backend (OpenAI-compatible,
ElevenLabs, the DashScope and ElevenLabs handshakes, the VAD service), which error code a failure is,
whether retrying can help and whether another backend should take over.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from firmware_protocol import ErrorCode
from service.recognition.base import BackendError
from service.recognition.retry import retry_after_seconds

_AUTH = frozenset({401, 403})
_REJECTED = frozenset({400, 413, 422})
"""This request, as sent, is refused: resending the same audio (here or elsewhere) cannot help."""
_RETRYABLE_4XX = frozenset({409})
"""Conflict (e.g. a lock timeout): the OpenAI SDK retries it like a 5xx."""


def status_error(status: int, headers: Mapping[str, str], message: str) -> BackendError:
    """A non-success HTTP status (of a request or a WebSocket handshake) as the error the device gets.

    - 401/403: the operator must fix the key; no retry, no failover (``backend_auth``).
    - 400/413/422: this audio is refused; no retry, no failover (``backend_rejected``).
    - 429: retry, honouring ``Retry-After``; then fail over (``backend_rate_limited``).
    - 408: retry, then fail over (``backend_timeout``).
    - 409 and 5xx: retry, honouring ``Retry-After``; then fail over (``backend_unavailable``).
    - anything else (404: a wrong URL or model): retrying cannot help, another backend may (``backend_error``).
    """
    if status in _AUTH:
        return BackendError(message, code=ErrorCode.BACKEND_AUTH, retryable=False, failover=False)
    if status in _REJECTED:
        return BackendError(message, code=ErrorCode.BACKEND_REJECTED, retryable=False, failover=False)
    if status == 429:
        return BackendError(message, code=ErrorCode.BACKEND_RATE_LIMITED, retry_after_s=retry_after_seconds(headers))
    if status == 408:
        return BackendError(message, code=ErrorCode.BACKEND_TIMEOUT)
    if status >= 500 or status in _RETRYABLE_4XX:
        return BackendError(message, code=ErrorCode.BACKEND_UNAVAILABLE, retry_after_s=retry_after_seconds(headers))
    return BackendError(message, code=ErrorCode.BACKEND_ERROR, retryable=False, failover=True)


def transport_error(exc: BaseException, message: str) -> BackendError:
    """A request that got no HTTP answer: ``message`` says where, the class of ``exc`` decides the rest.

    - a timeout: retry, then fail over (``backend_timeout``).
    - a URL that cannot work (no http(s)/ws(s) scheme, unparsable, refused by the client): like a 404,
      retrying cannot help, another backend may (``backend_error``).
    - a refused, reset or dropped connection, a failed handshake: retry, then fail over (``backend_unavailable``).
    """
    if isinstance(exc, TimeoutError | httpx.TimeoutException):
        return BackendError(message, code=ErrorCode.BACKEND_TIMEOUT)
    if isinstance(exc, httpx.UnsupportedProtocol | httpx.InvalidURL | InvalidURI | ValueError):
        return BackendError(message, code=ErrorCode.BACKEND_ERROR, retryable=False, failover=True)
    if isinstance(exc, httpx.TransportError | OSError | ConnectionClosed | InvalidHandshake):
        return BackendError(message, code=ErrorCode.BACKEND_UNAVAILABLE)
    return BackendError(message, code=ErrorCode.BACKEND_ERROR)


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
