"""OpenAI-compatible HTTP transcription (OpenAI, Groq, local Whisper servers), called as EchoKit calls it.

The utterance is buffered and POSTed whole as a 16 kHz mono WAV when the turn ends; with
``asr.stream`` the server's SSE deltas become partials while it transcribes. One pooled
HTTP client serves every session, so a burst of turns shares keep-alive connections
instead of paying a TLS handshake each.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httpx
import msgspec
import numpy as np
import structlog

from firmware_protocol import SAMPLE_RATE, EndReason, ErrorCode
from service import __version__
from service.config import OpenAISettings
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
from service.redact import Redactor, redact_url, url_host, url_secrets
from service.wav import wav_bytes

log = structlog.get_logger(__name__)

KEEPALIVE_CONNECTIONS = 64
"""Idle connections kept warm; bursts beyond it open (and later close) more, up to ``max_connections``."""
MIN_SAMPLES = SAMPLE_RATE // 10
"""OpenAI rejects audio under 0.1 s (400 ``audio_too_short``); such a turn is no speech, not an error."""
DRAIN_S = 0.5
"""After ``transcript.text.done``, how long to wait for the stream's end so the connection can be reused."""


class _Transcription(msgspec.Struct):
    text: str | None = None


class _VendorError(msgspec.Struct):
    message: str | None = None
    type: str | None = None
    param: str | None = None
    code: str | int | None = None


class _ErrorEnvelope(msgspec.Struct):
    error: _VendorError


class _StreamEvent(msgspec.Struct):
    type: str = ""
    delta: str | None = None
    text: str | None = None
    error: _VendorError | None = None


def echokit_text(raw: str) -> str:
    """EchoKit's cleanup: on each line drop everything through the first ``"] "`` (Whisper timestamps).

    Lines split as Rust's ``str::lines`` does: ``\\n`` or ``\\r\\n``, a final newline ignored.
    """
    lines = raw.split("\n")
    if lines[-1] == "":
        lines.pop()
    return "\n".join(line.removesuffix("\r").split("] ", 1)[-1] for line in lines)


def is_no_speech(text: str) -> bool:
    """Empty, or a bracketed tag like ``(noise)``/``(silence)`` that EchoKit's prompt asks Whisper for."""
    stripped = text.strip()
    return not stripped or stripped.startswith("(")


class OpenAIBackend(TranscriptionBackend):
    name = "openai"

    def __init__(self, config: OpenAISettings) -> None:
        self._config = config
        limit = config.max_connections
        self._limits = httpx.Limits(max_connections=limit, max_keepalive_connections=min(limit, KEEPALIVE_CONNECTIONS))
        self._timeout = httpx.Timeout(config.timeout_s, connect=config.connect_timeout_s)
        self._retry = RetryPolicy(attempts=1 + config.max_retries)
        self._client: httpx.AsyncClient | None = None
        self._host = url_host(config.url, "the ASR server")
        self._redact = Redactor(config.api_key, *url_secrets(config.url))
        """Error bodies and URLs may echo the key or the URL's own secrets: never to reach a device or a log."""

    async def start(self) -> None:
        """Refuse a URL that can never work now rather than on every turn; open the pool."""
        try:
            scheme = urlsplit(self._config.url).scheme
        except ValueError:  # e.g. an unclosed [IPv6 bracket
            scheme = ""
        if scheme not in ("http", "https"):
            raise BackendError(
                "asr.url must be the full http(s) URL of /v1/audio/transcriptions,"
                f" got {self._redact(redact_url(self._config.url))!r}",
                code=ErrorCode.BACKEND_UNAVAILABLE,
                retryable=False,
            )
        self._ensure_client()

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def open(self, options: SessionOptions, listener: StreamListener) -> RecognitionStream:
        self._ensure_client()
        return _OpenAIStream(self, options, listener)

    def _ensure_client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                transport=pooled_transport(self._limits),
                limits=self._limits,
                timeout=self._timeout,
                headers={"User-Agent": f"echokit-mqtt-bridge/{__version__}"},
            )
        return self._client

    async def transcribe(self, audio: np.ndarray, options: SessionOptions, listener: StreamListener) -> Recognition:
        """One utterance, with retries; raises :class:`BackendError` when every attempt failed."""
        if len(audio) < MIN_SAMPLES:
            return Recognition("", reason=EndReason.NO_SPEECH)
        wav = wav_bytes(audio)
        fields = {
            name: value
            for name, value in (
                ("model", self._config.model),
                ("language", options.language or ""),
                ("prompt", options.prompt or ""),
                ("stream", "true" if self._config.stream else ""),
            )
            if value
        }
        attempt = 0

        async def once() -> str:
            nonlocal attempt
            attempt += 1
            try:
                return await self._attempt(wav, fields, listener)
            except BackendError as exc:
                log.warning(
                    "openai.attempt_failed",
                    attempt=attempt,
                    attempts=self._retry.attempts,
                    code=exc.code.value,
                    retryable=exc.retryable,
                    error=str(exc),
                )
                raise

        text = echokit_text(await self._retry.run(once))
        if is_no_speech(text):
            return Recognition("", reason=EndReason.NO_SPEECH)
        return Recognition(text.strip(), language=options.language)

    async def _attempt(self, wav: bytes, fields: dict[str, str], listener: StreamListener) -> str:
        """One POST, bounded by ``timeout_s`` in total; returns the raw transcript text."""
        client = self._ensure_client()
        headers = {"Authorization": f"Bearer {self._config.api_key}"} if self._config.api_key else {}
        files = {"file": ("audio.wav", wav, "audio/wav")}
        final: list[str] = []  # set once a stream's done event arrived, even if its tail then times out
        try:
            async with asyncio.timeout(self._config.timeout_s) as deadline:
                async with client.stream("POST", self._config.url, data=fields, files=files, headers=headers) as reply:
                    if not reply.is_success:
                        raise self._http_error(reply.status_code, reply.headers, await reply.aread())
                    if reply.headers.get("content-type", "").startswith("text/event-stream"):
                        return await self._read_events(reply.aiter_lines(), listener, final, deadline)
                    return self._decode(await reply.aread())
        except TimeoutError as exc:
            if final:
                return final[0]
            raise transport_error(
                exc, f"openai ASR: no answer from {self._host} within {self._config.timeout_s:g} s"
            ) from None
        except (httpx.HTTPError, ValueError) as exc:  # ValueError: aiohttp refuses e.g. credentials next to a key
            raise transport_error(
                exc, f"openai ASR: {type(exc).__name__} talking to {self._host}: {self._redact(str(exc))}"
            ) from None

    def _decode(self, body: bytes) -> str:
        try:
            return msgspec.json.decode(body, type=_Transcription).text or ""
        except msgspec.MsgspecError:
            raise BackendError(
                f"openai ASR: {self._host} answered 200 without a transcription JSON: {self._excerpt(body)}",
                code=ErrorCode.BACKEND_ERROR,
                retryable=False,
                failover=True,
            ) from None

    async def _read_events(
        self, lines: AsyncIterator[str], listener: StreamListener, final: list[str], deadline: asyncio.Timeout
    ) -> str:
        """SSE: deltas become partials; ``transcript.text.done`` carries the final text.

        After the done event the rest of the stream is still read (briefly) so that the
        connection returns to the pool instead of being closed half-read.
        """
        shown = ""
        accumulated = ""
        data: list[str] = []

        def dispatch() -> None:
            nonlocal shown, accumulated
            payload = "\n".join(data).strip()
            data.clear()
            if not payload or payload == "[DONE]" or final:
                return
            try:
                event = msgspec.json.decode(payload, type=_StreamEvent)
            except msgspec.MsgspecError:
                raise BackendError(
                    f"openai ASR: malformed stream event from {self._host}: {self._excerpt(payload.encode())}",
                    code=ErrorCode.BACKEND_ERROR,
                    retryable=False,
                    failover=True,
                ) from None
            if event.error is not None:
                raise BackendError(
                    f"openai ASR: stream error: {self._vendor(event.error)}", code=ErrorCode.BACKEND_ERROR
                )
            if event.type == "transcript.text.delta" and event.delta:
                accumulated += event.delta
                text = echokit_text(accumulated).strip()
                if text != shown and not is_no_speech(text):
                    shown = text
                    listener.partial(text)
            elif event.type == "transcript.text.done":
                final.append(accumulated if event.text is None else event.text)
                loop = asyncio.get_running_loop()
                deadline.reschedule(min(deadline.when() or float("inf"), loop.time() + DRAIN_S))

        async for line in lines:
            if not line:
                dispatch()
            elif line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))
            # other fields (event:, id:, retry:) and comments carry nothing we use
        dispatch()
        if not final:
            raise BackendError(
                f"openai ASR: the transcript stream from {self._host} ended without transcript.text.done",
                code=ErrorCode.BACKEND_UNAVAILABLE,
            )
        return final[0]

    def _http_error(self, status: int, headers: httpx.Headers, body: bytes) -> BackendError:
        detail = self._excerpt(body)
        try:
            detail = self._vendor(msgspec.json.decode(body, type=_ErrorEnvelope).error)
        except msgspec.MsgspecError:
            pass
        if request_id := headers.get("x-request-id"):
            detail += f" (request {request_id})"
        return status_error(status, headers, f"openai ASR: HTTP {status} from {self._host}: {detail}")

    def _vendor(self, error: _VendorError) -> str:
        tags = ", ".join(f"{k}={v}" for k, v in (("type", error.type), ("code", error.code)) if v is not None)
        text = error.message or "(no message)"
        return self._redact(f"{text} [{tags}]" if tags else text)

    def _excerpt(self, body: bytes) -> str:
        text = body.decode("utf-8", "replace").strip()
        return self._redact(text[:300] or "(empty body)")


class _OpenAIStream(BatchStream):
    """Each request runs in a task of its own so that :meth:`cancel` can abort it mid-flight.

    There may be two at once: a speculation (:meth:`BatchStream.speculate`) and the final.
    """

    def __init__(self, backend: OpenAIBackend, options: SessionOptions, listener: StreamListener) -> None:
        super().__init__()
        self._backend = backend
        self._options = options
        self._listener = listener
        self._requests: set[asyncio.Task[Recognition]] = set()
        self._cancelled = False

    async def transcribe(self, audio: np.ndarray) -> Recognition:
        if self._cancelled:
            raise _cancelled()
        request = asyncio.create_task(self._backend.transcribe(audio, self._options, self._listener))
        self._requests.add(request)
        request.add_done_callback(self._requests.discard)
        try:
            return await request
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if self._cancelled and (current is None or not current.cancelling()):
                raise _cancelled() from None  # our cancel(), not the caller's: report, don't leak CancelledError
            raise

    async def cancel(self) -> None:
        self._cancelled = True
        await super().cancel()
        pending = [request for request in self._requests if not request.done()]
        for request in pending:
            request.cancel()
        if pending:
            await asyncio.wait(pending)


def _cancelled() -> BackendError:
    return BackendError("the utterance was cancelled", code=ErrorCode.BACKEND_ERROR, retryable=False, failover=False)
