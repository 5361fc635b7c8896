"""``GET /metrics``, ``/healthz`` and ``/readyz`` on a minimal HTTP/1.1 server (asyncio streams).

No web framework: three routes, one request per connection (``Connection: close``), a request
head of at most :data:`MAX_REQUEST_BYTES` read within :data:`READ_TIMEOUT_S`; anything else is
answered 404 (unknown path), 405 (not GET/HEAD), 400, 408 or 431, and the connection closed.

The server runs on the bridge's own event loop, so ``/healthz`` answering at all is the proof
that the loop runs; ``/readyz`` asks the bridge whether it can serve devices right now.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import structlog

log = structlog.get_logger(__name__)

MAX_REQUEST_BYTES = 8192
READ_TIMEOUT_S = 5.0
WRITE_TIMEOUT_S = 10.0
LINGER_S = 1.0
TEXT = "text/plain; charset=utf-8"
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""What ``prometheus_client.generate_latest`` writes: the classic text format every Prometheus reads."""

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class HealthServer:
    """Serves the bridge's metrics and health; ``port`` is the bound port once :meth:`start` succeeded."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        metrics: Callable[[], bytes],
        not_ready: Callable[[], str | None],
    ) -> None:
        self._host = host
        self._requested_port = port
        self._metrics = metrics
        self._not_ready = not_ready
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[object]] = set()
        self.port: int | None = None

    async def start(self) -> bool:
        """Bind and start accepting. A failure is logged, not raised: devices matter more than metrics."""
        try:
            self._server = await asyncio.start_server(
                self._handle, self._host, self._requested_port, limit=MAX_REQUEST_BYTES, reuse_address=True
            )
        except OSError as exc:
            log.error(
                "metrics.listen_failed",
                listen=f"{self._host}:{self._requested_port}",
                error=str(exc),
                hint="set [metrics] listen to a free host:port, or enabled = false",
            )
            return False
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.info("metrics.listening", host=self._host, port=self.port, paths=["/metrics", "/healthz", "/readyz"])
        return True

    async def serve(self) -> None:
        """Serve until cancelled (a task of the bridge's TaskGroup); returns at once if not started."""
        if self._server is not None:
            await self._server.serve_forever()

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for task in list(self._connections):
            task.cancel()
        if server is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1):
                    await server.wait_closed()

    # One connection ----------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        try:
            request = await _read_request(reader)
            if request is None:
                return  # the client left before finishing its request
            method, status, content_type, body, extra = self._respond(request)
            head = (
                f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\nConnection: close\r\n{extra}\r\n"
            )
            writer.write(head.encode("latin-1") + (b"" if method == "HEAD" else body))
            async with asyncio.timeout(WRITE_TIMEOUT_S):
                await writer.drain()
        except (ConnectionError, TimeoutError):
            pass
        except Exception:
            log.exception("metrics.request_failed")
        finally:
            await _linger(reader, writer)
            writer.close()
            if task is not None:
                self._connections.discard(task)

    def _respond(self, request: tuple[str, str] | int) -> tuple[str, int, str, bytes, str]:
        """(method, status, content type, body, extra header lines) for a parsed request or an error status."""
        if isinstance(request, int):
            return "GET", request, TEXT, f"{_REASONS[request].lower()}\n".encode(), ""
        method, path = request
        if path not in ("/metrics", "/healthz", "/readyz"):
            return method, 404, TEXT, b"not found: try /metrics, /healthz or /readyz\n", ""
        if method not in ("GET", "HEAD"):
            return method, 405, TEXT, b"method not allowed\n", "Allow: GET, HEAD\r\n"
        if path == "/healthz":
            return method, 200, TEXT, b"ok\n", ""
        if path == "/readyz":
            reason = self._not_ready()
            if reason is not None:
                return method, 503, TEXT, f"not ready: {reason}\n".encode(), ""
            return method, 200, TEXT, b"ready\n", ""
        try:
            body = self._metrics()
        except Exception:
            log.exception("metrics.collect_failed")
            return method, 500, TEXT, b"metrics collection failed; see the bridge's log\n", ""
        return method, 200, METRICS_CONTENT_TYPE, body, ""


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Half-close, then discard what the client still sends for a moment before closing.

    Closing a socket with unread input resets the connection, and a reset can destroy the
    answer (a 431, say) before the client reads it; clients close as soon as they have it.
    """
    with contextlib.suppress(Exception):
        if writer.can_write_eof():
            writer.write_eof()
        async with asyncio.timeout(LINGER_S):
            while await reader.read(65536):
                pass


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str] | int | None:
    """``(method, path)`` from the request head, an error status, or ``None`` when the client left."""
    try:
        async with asyncio.timeout(READ_TIMEOUT_S):
            head = await reader.readuntil(b"\r\n\r\n")
    except TimeoutError:
        return 408
    except asyncio.LimitOverrunError:
        return 431
    except asyncio.IncompleteReadError as exc:
        if not exc.partial.strip():
            return None
        return 400
    parts = head.split(b"\r\n", 1)[0].split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        return 400
    method, target = parts[0].decode("latin-1"), parts[1].decode("latin-1")
    return method, target.split("?", 1)[0]
