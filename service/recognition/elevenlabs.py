"""ElevenLabs Scribe: realtime over a WebSocket (default) or whole utterances over HTTP (``mode = "batch"``).

``asr.url`` rule, the same in both modes: empty means ``wss://api.elevenlabs.io``. A trailing
``/v1/speech-to-text/realtime`` or ``/v1/speech-to-text`` is cut off to give the base; realtime connects to
``<base>/v1/speech-to-text/realtime`` (http→ws, https→wss) and batch posts to ``<base>/v1/speech-to-text``
(ws→http, wss→https). So the realtime URL, the batch URL or a bare host all work in either mode. The URL's own
query parameters are kept (``vad_silence_threshold_secs``, ``enable_logging``, …) and ours are added.

With ``commit_strategy = "vad"`` ElevenLabs commits after a pause; when the session ends the turn first (its
own endpointing, push-to-talk release), :meth:`finish` sends that pause as silence so the commit comes,
instead of waiting for audio that will never arrive.

Realtime keeps the utterance's PCM (bounded by the session's maximum length): when the socket drops or times
out, the retry policy reconnects and replays it, so the final covers the whole utterance.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx
import msgspec
import numpy as np
import structlog
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from firmware_protocol import SAMPLE_RATE, EndReason, ErrorCode
from service import __version__
from service.config import ElevenLabsSettings
from service.recognition.base import (
    BackendError,
    BatchStream,
    Recognition,
    RecognitionStream,
    SessionOptions,
    StreamListener,
    TranscriptionBackend,
)
from service.recognition.http import pooled_transport, status_error, transport_error
from service.recognition.retry import RetryPolicy
from service.redact import Redactor, url_secrets
from service.wav import wav_bytes

log = structlog.get_logger(__name__)
_ws_log = logging.getLogger(f"{__name__}.websocket")
_ws_log.setLevel(logging.INFO)  # websockets logs handshake headers, the api key among them, at DEBUG

DEFAULT_BASE = "wss://api.elevenlabs.io"
REALTIME_PATH = "/v1/speech-to-text/realtime"
BATCH_PATH = "/v1/speech-to-text"
REALTIME_MODEL = "scribe_v2_realtime"
BATCH_MODEL = "scribe_v1"
BYTES_PER_MS = SAMPLE_RATE * 2 // 1000
MIN_CHUNK_BYTES = 100 * BYTES_PER_MS
"""Audio is coalesced to at least 100 ms a message: 20 ms device frames would be 5x the messages."""
MAX_CHUNK_BYTES = 250 * BYTES_PER_MS
MIN_COMMIT_BYTES = 300 * BYTES_PER_MS
"""ElevenLabs answers a commit of less than 0.3 s of audio with ``commit_throttled``; shorter taps are padded."""
VAD_SILENCE_S = 1.5
"""ElevenLabs' default ``vad_silence_threshold_secs`` (``asr.url`` may carry another, 0.3–3.0)."""
VAD_TAIL_MARGIN_S = 0.25
CLOSE_TIMEOUT_S = 1.0
USER_AGENT = f"echokit-mqtt-bridge/{__version__}"


# Wire messages ---------------------------------------------------------------------------------------------


class InputAudioChunk(msgspec.Struct, kw_only=True):
    message_type: Literal["input_audio_chunk"] = "input_audio_chunk"
    audio_base_64: str
    commit: bool
    sample_rate: int = SAMPLE_RATE


class ServerMessage(msgspec.Struct, kw_only=True):
    """Every server message in one lenient shape: ``message_type`` says which fields mean something."""

    message_type: str
    text: str | None = None
    error: str | None = None
    language_code: str | None = None
    session_id: str | None = None


class BatchResult(msgspec.Struct, kw_only=True):
    text: str = ""
    language_code: str | None = None


class ErrorDetail(msgspec.Struct, kw_only=True):
    status: str | None = None
    message: str | None = None


class ValidationItem(msgspec.Struct, kw_only=True):
    msg: str = ""
    loc: list[str | int] = msgspec.field(default_factory=list)


class HttpErrorBody(msgspec.Struct, kw_only=True):
    detail: ErrorDetail | list[ValidationItem] | str | None = None


_encode = msgspec.json.Encoder().encode
_decode_server = msgspec.json.Decoder(ServerMessage).decode
_decode_batch = msgspec.json.Decoder(BatchResult).decode
_decode_http_error = msgspec.json.Decoder(HttpErrorBody).decode

_RATE_LIMITED = frozenset(
    {"quota_exceeded", "rate_limited", "commit_throttled", "queue_overflow", "resource_exhausted"}
)
_REJECTED = frozenset(
    {"input_error", "invalid_request", "chunk_size_exceeded", "unaccepted_terms", "unaccepted_terms_error"}
)
_OTHER_ERRORS = frozenset({"error", "transcriber_error", "session_time_limit_exceeded"})
NO_SPEECH_ERROR = "insufficient_audio_activity"
ERROR_TYPES = _RATE_LIMITED | _REJECTED | _OTHER_ERRORS | {"auth_error", NO_SPEECH_ERROR}
"""Message types that carry ``error``; anything else unknown (``warning``, new types) is ignored."""


# URLs -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Endpoints:
    realtime: str
    batch: str


def endpoints(url: str) -> Endpoints:
    """Both endpoints from ``asr.url`` (see the module docstring for the rule)."""
    parts = urlsplit(url.strip() or DEFAULT_BASE)
    path = parts.path.rstrip("/")
    for suffix in (REALTIME_PATH, BATCH_PATH):
        if path.endswith(suffix):
            path = path[: -len(suffix)]
            break
    secure = parts.scheme in ("wss", "https")
    ws_scheme, http_scheme = ("wss", "https") if secure else ("ws", "http")
    return Endpoints(
        realtime=urlunsplit((ws_scheme, parts.netloc, path + REALTIME_PATH, parts.query, "")),
        batch=urlunsplit((http_scheme, parts.netloc, path + BATCH_PATH, parts.query, "")),
    )


def with_query(url: str, params: Sequence[tuple[str, str]]) -> str:
    parts = urlsplit(url)
    query = [*parse_qsl(parts.query, keep_blank_values=True), *params]
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), ""))


# Errors -----------------------------------------------------------------------------------------------------


DETAIL_LIMIT = 200
"""Characters of server text kept in an error (after redaction)."""


def server_error(message_type: str, text: str) -> BackendError:
    """A realtime ``{"message_type": X, "error": ...}`` as the error the device gets."""
    message = f"ElevenLabs {message_type}: {text}" if text else f"ElevenLabs {message_type}"
    if message_type == "auth_error":
        return BackendError(message, code=ErrorCode.BACKEND_AUTH, retryable=False, failover=False)
    if message_type in _RATE_LIMITED:
        return BackendError(message, code=ErrorCode.BACKEND_RATE_LIMITED, retryable=True)
    if message_type in _REJECTED:
        return BackendError(message, code=ErrorCode.BACKEND_REJECTED, retryable=False, failover=False)
    return BackendError(message, code=ErrorCode.BACKEND_ERROR, retryable=True)


def http_error(status: int, headers: httpx.Headers, detail: str) -> BackendError:
    return status_error(
        status, headers, f"ElevenLabs HTTP {status}: {detail}" if detail else f"ElevenLabs HTTP {status}"
    )


def _detail(body: bytes | bytearray) -> str:
    try:
        detail = _decode_http_error(body).detail
    except msgspec.DecodeError:
        return ""
    if isinstance(detail, ErrorDetail):
        return detail.message or detail.status or ""
    if isinstance(detail, list):
        return "; ".join(f"{'.'.join(map(str, item.loc))}: {item.msg}" for item in detail)
    return detail or ""


def _dropped(reason: str) -> BackendError:
    return BackendError(f"ElevenLabs connection lost ({reason})", code=ErrorCode.BACKEND_UNAVAILABLE)


def _no_speech(language: str | None = None) -> Recognition:
    return Recognition("", language=language, reason=EndReason.NO_SPEECH)


# The backend ------------------------------------------------------------------------------------------------


class ElevenLabsBackend(TranscriptionBackend):
    name = "elevenlabs"

    def __init__(self, config: ElevenLabsSettings) -> None:
        self.config = config
        self.endpoints = endpoints(config.url)
        self.policy = RetryPolicy(attempts=1 + config.max_retries)
        self.redact = Redactor(config.api_key, *url_secrets(config.url))
        self._http: httpx.AsyncClient | None = None
        self._closing: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        if self.config.mode == "batch":
            self.http()

    async def aclose(self) -> None:
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    def http(self) -> httpx.AsyncClient:
        """The one HTTP client for every batch request (made here too if :meth:`start` was skipped)."""
        if self._http is None:
            timeout = httpx.Timeout(self.config.timeout_s, connect=self.config.connect_timeout_s)
            limits = httpx.Limits(max_connections=self.config.max_connections, max_keepalive_connections=64)
            self._http = httpx.AsyncClient(
                transport=pooled_transport(limits), timeout=timeout, headers={"user-agent": USER_AGENT}
            )
        return self._http

    def open(self, options: SessionOptions, listener: StreamListener) -> RecognitionStream:
        if self.config.mode == "batch":
            return _BatchStream(self, options)
        return _RealtimeStream(self, options, listener)

    def close_later(self, ws: ClientConnection) -> None:
        """Close a finished socket without making the caller wait for the closing handshake."""
        task = asyncio.create_task(_close(ws))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    @property
    def vad_tail_bytes(self) -> int:
        """Silence that makes ElevenLabs' VAD commit: its threshold from ``asr.url``, or the default, plus a margin."""
        query = dict(parse_qsl(urlsplit(self.endpoints.realtime).query))
        try:
            threshold = float(query.get("vad_silence_threshold_secs", VAD_SILENCE_S))
        except ValueError:
            threshold = VAD_SILENCE_S
        return int((min(max(threshold, 0.3), 3.0) + VAD_TAIL_MARGIN_S) * 1000) * BYTES_PER_MS

    def realtime_url(self, options: SessionOptions) -> str:
        params = [
            ("model_id", self.config.model or REALTIME_MODEL),
            ("audio_format", f"pcm_{SAMPLE_RATE}"),
            ("commit_strategy", self.config.commit_strategy),
        ]
        if options.language:
            params.append(("language_code", options.language))
        return with_query(self.endpoints.realtime, params)


async def _close(ws: ClientConnection) -> None:
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT_S):
            await ws.close()
    except (TimeoutError, OSError, ConnectionClosed):
        _abort(ws)


def _abort(ws: ClientConnection) -> None:
    with contextlib.suppress(Exception):
        ws.transport.abort()


# Realtime ---------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Exchange:
    """One connection's share of the utterance: what was sent and committed on it."""

    ws: ClientConnection
    result: asyncio.Future[Recognition]
    committed: list[str] = field(default_factory=list)
    last_commit: tuple[str, str] | None = None
    language: str | None = None
    commit_sent: bool = False


class _RealtimeStream(RecognitionStream):
    def __init__(self, backend: ElevenLabsBackend, options: SessionOptions, listener: StreamListener) -> None:
        self._backend = backend
        self._config = backend.config
        self._options = options
        self._listener = listener
        self._manual = backend.config.commit_strategy == "manual"
        self._pcm = bytearray()
        self._wake = asyncio.Event()
        self._finishing = False
        self._deadline: asyncio.Timeout | None = None
        self._last_partial = ""
        self._turn_ended = False
        self._task = asyncio.create_task(self._run())

    def feed(self, pcm: np.ndarray) -> None:
        if not self._finishing:
            self._pcm += pcm.astype("<i2", copy=False).tobytes()
            self._wake.set()

    async def finish(self) -> Recognition:
        if not self._finishing:
            self._finishing = True
            self._wake.set()
            if self._deadline is not None:
                self._deadline.reschedule(asyncio.get_running_loop().time() + self._config.timeout_s)
        return await self._task

    async def cancel(self) -> None:
        self._finishing = True
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, BackendError):
            await self._task

    async def _run(self) -> Recognition:
        return await self._backend.policy.run(self._logged_attempt)

    async def _logged_attempt(self) -> Recognition:
        try:
            return await self._attempt()
        except BackendError as exc:
            log.info("elevenlabs.attempt_failed", code=exc.code.value, retryable=exc.retryable, error=str(exc))
            raise

    async def _attempt(self) -> Recognition:
        ws = await self._connect()
        loop = asyncio.get_running_loop()
        exchange = _Exchange(ws, loop.create_future())
        tasks = [asyncio.create_task(self._send(exchange)), asyncio.create_task(self._receive(exchange))]
        clean = False
        try:
            async with asyncio.timeout(None) as deadline:
                self._deadline = deadline
                if self._finishing:
                    deadline.reschedule(loop.time() + self._config.timeout_s)
                result = await exchange.result
            clean = True
            return result
        except TimeoutError:
            raise BackendError(
                f"ElevenLabs gave no final within {self._config.timeout_s:g} s", code=ErrorCode.BACKEND_TIMEOUT
            ) from None
        finally:
            self._deadline = None
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if clean:
                self._backend.close_later(ws)
            else:
                _abort(ws)

    async def _connect(self) -> ClientConnection:
        """Open the socket and wait for ``session_started``, both within ``connect_timeout_s``."""
        url = self._backend.realtime_url(self._options)
        headers = {"xi-api-key": self._config.api_key}
        try:
            async with asyncio.timeout(self._config.connect_timeout_s):
                ws = await connect(
                    url,
                    additional_headers=headers,
                    user_agent_header=USER_AGENT,
                    open_timeout=None,
                    close_timeout=CLOSE_TIMEOUT_S,
                    max_size=2**20,
                    logger=_ws_log,
                )
                try:
                    while True:
                        message = self._decode(await ws.recv())
                        if message is None or message.message_type in ("warning", "partial_transcript"):
                            continue
                        if message.message_type == "session_started":
                            return ws
                        if message.message_type in ERROR_TYPES:
                            raise server_error(
                                message.message_type, self._backend.redact(message.error or "", DETAIL_LIMIT)
                            )
                except BaseException:
                    _abort(ws)
                    raise
        except TimeoutError:
            raise BackendError(
                f"ElevenLabs did not start a session within {self._config.connect_timeout_s:g} s",
                code=ErrorCode.BACKEND_TIMEOUT,
            ) from None
        except InvalidStatus as exc:
            response = exc.response
            body = _detail(response.body or b"")
            headers_ = httpx.Headers(list(response.headers.raw_items()))
            raise http_error(response.status_code, headers_, self._backend.redact(body, DETAIL_LIMIT)) from None
        except InvalidURI as exc:
            raise transport_error(exc, "asr.url is not a valid WebSocket URL") from None
        except ConnectionClosed as exc:
            raise _dropped(f"closed before the session started, code {exc.rcvd.code if exc.rcvd else 1006}") from None
        except (OSError, InvalidHandshake) as exc:
            raise transport_error(exc, f"cannot connect to ElevenLabs: {type(exc).__name__}") from None

    def _decode(self, raw: str | bytes) -> ServerMessage | None:
        try:
            return _decode_server(raw)
        except msgspec.DecodeError:
            log.debug("elevenlabs.undecodable_message", size=len(raw))
            return None

    async def _send(self, exchange: _Exchange) -> None:
        """Replay from the first byte, then follow the audio as it arrives; when finishing, make the commit come."""
        ws, sent = exchange.ws, 0
        try:
            while True:
                pending = len(self._pcm) - sent
                if pending >= MIN_CHUNK_BYTES or (self._finishing and pending > 0):
                    size = min(pending, MAX_CHUNK_BYTES)
                    await ws.send(self._chunk(bytes(self._pcm[sent : sent + size])))
                    sent += size
                    continue
                if self._finishing:
                    break
                self._wake.clear()
                await self._wake.wait()
            if exchange.result.done():
                return
            if not sent:
                exchange.result.set_result(_no_speech(self._options.language))
            elif self._manual:
                if sent < MIN_COMMIT_BYTES:
                    await ws.send(self._chunk(bytes(MIN_COMMIT_BYTES - sent)))
                exchange.commit_sent = True
                await ws.send(self._chunk(b"", commit=True))
            elif exchange.committed:
                exchange.result.set_result(self._result(exchange))
            else:
                tail = self._backend.vad_tail_bytes
                for offset in range(0, tail, MAX_CHUNK_BYTES):
                    await ws.send(self._chunk(bytes(min(MAX_CHUNK_BYTES, tail - offset))))
        except ConnectionClosed:
            pass  # the receiver reads what the server said before closing, and reports it
        except Exception as exc:
            if not exchange.result.done():
                exchange.result.set_exception(exc)

    def _chunk(self, pcm: bytes, *, commit: bool = False) -> str:
        """A JSON *text* frame: the service takes no binary frames."""
        message = InputAudioChunk(audio_base_64=base64.b64encode(pcm).decode("ascii"), commit=commit)
        return _encode(message).decode("ascii")

    async def _receive(self, exchange: _Exchange) -> None:
        try:
            async for raw in exchange.ws:
                message = self._decode(raw)
                if message is not None and self._handle(exchange, message):
                    return
            reason = "closed by the server"
        except ConnectionClosed as exc:
            reason = f"code {exc.rcvd.code}" if exc.rcvd else "no close frame"
        except Exception as exc:
            if not exchange.result.done():
                exchange.result.set_exception(exc)
            return
        if not exchange.result.done():
            exchange.result.set_exception(_dropped(reason))

    def _handle(self, exchange: _Exchange, message: ServerMessage) -> bool:
        """Act on one server message; ``True`` once the utterance's outcome is settled."""
        if exchange.result.done():
            return True
        kind = message.message_type
        if kind == "partial_transcript":
            text = (message.text or "").strip()
            if text and text != self._last_partial:
                self._last_partial = text
                self._listener.partial(text)
            return False
        if kind in ("committed_transcript", "committed_transcript_with_timestamps"):
            return self._commit(exchange, kind, message)
        if kind == NO_SPEECH_ERROR:
            exchange.result.set_result(_no_speech(self._options.language))
            return True
        if kind in ERROR_TYPES:
            exchange.result.set_exception(server_error(kind, self._backend.redact(message.error or "", DETAIL_LIMIT)))
            return True
        return False  # session_started, warning, and whatever ElevenLabs adds next

    def _commit(self, exchange: _Exchange, kind: str, message: ServerMessage) -> bool:
        text = (message.text or "").strip()
        language = message.language_code
        if language:
            exchange.language = language
        previous = exchange.last_commit
        exchange.last_commit = (kind, text)
        if previous is not None and previous[0] != kind and previous[1] == text:
            return False  # the same segment again, with timestamps (or without)
        if text:
            exchange.committed.append(text)
        if self._manual:
            if not exchange.commit_sent:
                return False  # ElevenLabs' own periodic commit in a long utterance: more follows
        elif not self._turn_ended:
            self._turn_ended = True
            self._listener.end_of_turn()
        if self._manual or self._finishing:
            exchange.result.set_result(self._result(exchange))
            return True
        return False

    def _result(self, exchange: _Exchange) -> Recognition:
        text = " ".join(exchange.committed)
        language = self._options.language or exchange.language
        return Recognition(text, language=language) if text else _no_speech(language)


# Batch ------------------------------------------------------------------------------------------------------


class _BatchStream(BatchStream):
    """The whole utterance as a 16 kHz mono 16-bit WAV (so no ``file_format``), posted once per attempt."""

    def __init__(self, backend: ElevenLabsBackend, options: SessionOptions) -> None:
        super().__init__()
        self._backend = backend
        self._options = options

    async def transcribe(self, audio: np.ndarray) -> Recognition:
        if not len(audio):
            return _no_speech(self._options.language)
        body = wav_bytes(audio)
        return await self._backend.policy.run(lambda: self._post(body))

    async def _post(self, wav: bytes) -> Recognition:
        config = self._backend.config
        data: dict[str, str] = {"model_id": config.model or BATCH_MODEL}
        if self._options.language:
            data["language_code"] = self._options.language
        try:
            async with asyncio.timeout(config.timeout_s + config.connect_timeout_s):
                response = await self._backend.http().post(
                    self._backend.endpoints.batch,
                    data=data,
                    files={"file": ("audio.wav", wav, "audio/wav")},
                    headers={"xi-api-key": config.api_key},
                )
        except (TimeoutError, httpx.TimeoutException) as exc:
            raise transport_error(exc, f"ElevenLabs gave no transcript within {config.timeout_s:g} s") from None
        except httpx.TransportError as exc:
            raise transport_error(exc, f"cannot reach ElevenLabs: {type(exc).__name__}") from None
        if response.status_code != 200:
            detail = self._backend.redact(_detail(response.content), DETAIL_LIMIT)
            raise http_error(response.status_code, response.headers, detail)
        try:
            result = _decode_batch(response.content)
        except msgspec.DecodeError:
            raise BackendError("ElevenLabs sent an unreadable transcript", code=ErrorCode.BACKEND_ERROR) from None
        text = result.text.strip()
        language = self._options.language or result.language_code
        return Recognition(text, language=language) if text else _no_speech(language)
