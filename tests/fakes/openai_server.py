"""A loopback fake of OpenAI's ``POST /v1/audio/transcriptions``, proven faithful by the official SDK.

Speaks the wire protocol of /work/shared/reference/cloud-asr.md §1: multipart with bracket
field names, bearer auth, the error envelope, ``json``/``text``/``verbose_json``/``srt``/
``vtt`` bodies, SSE when ``stream=true`` (ignored by ``whisper-1`` and by Groq, as upstream),
and a Groq flavour (``x_groq``). Every request is recorded (fields, headers, the WAV it
carried) and answered from a script of behaviours: a :class:`Transcript` (fixed text or a
function of the audio, latency, deltas), a :class:`Fault` (status + envelope + headers),
:class:`Hang` (never answer) or :class:`Drop` (close the connection unanswered).

Error messages marked "unverified" in the reference are plausible, not captured.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import secrets
import struct
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from aiohttp import BodyPartReader, web
from multidict import CIMultiDict, CIMultiDictProxy

from tests.fakes._loopback import serve

PATH = "/v1/audio/transcriptions"
MAX_CONTENT_BYTES = 26_214_400
SUPPORTED_FORMATS = ["flac", "m4a", "mp3", "mp4", "mpeg", "mpga", "oga", "ogg", "wav", "webm"]
RESPONSE_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")


# --- what the fake received -------------------------------------------------------------------


@dataclass(frozen=True)
class WavInfo:
    """The header of an uploaded WAV, as parsed chunk by chunk (not via :mod:`wave`, which is lenient)."""

    fmt_size: int
    audio_format: int
    channels: int
    sample_rate: int
    byte_rate: int
    block_align: int
    bits_per_sample: int
    data_bytes: int
    header_bytes: int
    """Bytes before the samples: 44 for the canonical RIFF/fmt(16)/data layout."""

    @property
    def duration_s(self) -> float:
        return self.data_bytes / self.byte_rate if self.byte_rate else 0.0


def parse_wav(data: bytes) -> WavInfo | None:
    """``None`` unless this is a RIFF/WAVE file with a ``fmt `` chunk before its ``data`` chunk."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    offset, fmt = 12, None
    while offset + 8 <= len(data):
        chunk_id, size = data[offset : offset + 4], struct.unpack_from("<I", data, offset + 4)[0]
        body = offset + 8
        if chunk_id == b"fmt " and size >= 16:
            fmt = (size, *struct.unpack_from("<HHIIHH", data, body))
        elif chunk_id == b"data" and fmt is not None:
            fmt_size, audio_format, channels, rate, byte_rate, block_align, bits = fmt
            return WavInfo(
                fmt_size, audio_format, channels, rate, byte_rate, block_align, bits, min(size, len(data) - body), body
            )
        offset = body + size + (size & 1)
    return None


@dataclass(frozen=True)
class Upload:
    filename: str | None
    content_type: str | None
    data: bytes


@dataclass
class ReceivedRequest:
    fields: dict[str, list[str]]
    """Text parts by their wire name (``timestamp_granularities[]`` keeps its brackets); repeated parts in order."""
    files: dict[str, Upload]
    headers: CIMultiDictProxy[str]
    peer: tuple[str, int]
    """The client's address: one per TCP connection."""
    received_at: float
    """``time.monotonic()`` when the body had been read."""
    wav: WavInfo | None = None
    status: int | None = None
    """What the fake answered; ``None`` while pending, hung or dropped."""
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when the client closed the connection before the fake had answered."""

    def field(self, name: str) -> str | None:
        values = self.fields.get(name)
        return values[0] if values else None

    @property
    def form(self) -> dict[str, Any]:
        """The fields with bracket names folded: ``a[]`` → list, ``a[b]`` → dict."""
        return fold_brackets(self.fields)

    @property
    def audio(self) -> bytes:
        """The samples of the uploaded WAV (empty when ``file`` is not a WAV)."""
        upload = self.files.get("file")
        if upload is None or self.wav is None:
            return b""
        return upload.data[self.wav.header_bytes : self.wav.header_bytes + self.wav.data_bytes]


def fold_brackets(fields: Mapping[str, list[str]]) -> dict[str, Any]:
    folded: dict[str, Any] = {}
    for name, values in fields.items():
        if match := re.fullmatch(r"([^\[]+)\[\]", name):
            folded.setdefault(match.group(1), []).extend(values)
        elif match := re.fullmatch(r"([^\[]+)\[([^\]]+)\]", name):
            folded.setdefault(match.group(1), {})[match.group(2)] = values[-1]
        else:
            folded[name] = values[-1]
    return folded


# --- scripted behaviours ----------------------------------------------------------------------

TextSource = str | Callable[[ReceivedRequest], str]


@dataclass
class Transcript:
    """A successful answer in whatever format (or stream) the request asked for."""

    text: TextSource = "Hello."
    latency_s: float = 0.0
    """Before the first byte of the answer."""
    deltas: list[str] | None = None
    """Streaming pieces; default: the text split after each word."""
    delta_interval_s: float = 0.0
    sse_extras: bool = False
    """Add ``event:`` lines, a comment and a final ``data: [DONE]``: OpenAI sends none, clients must tolerate them."""
    language: str = "english"
    """``verbose_json`` reports the language by its English name."""

    def resolve(self, request: ReceivedRequest) -> str:
        return self.text(request) if callable(self.text) else self.text


@dataclass
class Fault:
    """An HTTP error with OpenAI's envelope ``{"error":{"message","type","param","code"}}``."""

    status: int
    message: str
    type: str = "invalid_request_error"
    code: str | None = None
    param: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    latency_s: float = 0.0

    @classmethod
    def bad_request(cls, message: str | None = None, *, code: str | None = None, param: str | None = None) -> Fault:
        return cls(
            400, message or f"Invalid file format. Supported formats: {SUPPORTED_FORMATS}", code=code, param=param
        )

    @classmethod
    def unauthorized(cls, shown_key: str = "sk-abc1*********************xyz9") -> Fault:
        return cls(
            401,
            f"Incorrect API key provided: {shown_key}. You can find your API key at"
            " https://platform.openai.com/account/api-keys.",
            code="invalid_api_key",
        )

    @classmethod
    def too_large(cls, bytes_read: int = 26_738_688) -> Fault:
        return cls(
            413, f"Maximum content size limit ({MAX_CONTENT_BYTES}) exceeded ({bytes_read} bytes read)", "server_error"
        )

    @classmethod
    def rate_limited(cls, *, retry_after: str | None = None, retry_after_ms: str | None = None) -> Fault:
        headers = {"retry-after": retry_after, "retry-after-ms": retry_after_ms}
        return cls(
            429,
            "Rate limit reached for whisper-1 in organization org-fake on requests per min (RPM): Limit 3,"
            " Used 3, Requested 1. Please try again in 20s. Visit https://platform.openai.com/account/rate-limits"
            " to learn more.",
            "requests",
            code="rate_limit_exceeded",
            headers={k: v for k, v in headers.items() if v is not None},
        )

    @classmethod
    def server_error(cls, status: int = 500) -> Fault:
        return cls(
            status,
            "The server had an error while processing your request. Sorry about that!",
            "server_error",
        )


@dataclass
class Hang:
    """Read the request, never answer (until the client goes away or the fake stops)."""


@dataclass
class Drop:
    """Read the request, then close the connection without a response."""

    after_s: float = 0.0


Behaviour = Transcript | Fault | Hang | Drop


# --- the server -------------------------------------------------------------------------------


class FakeOpenAI:
    """``async with FakeOpenAI() as fake:`` serves on 127.0.0.1 at a free port until the block ends."""

    def __init__(
        self,
        *,
        api_key: str | None = None,
        require_model: bool = True,
        groq: bool = False,
        default: Behaviour | None = None,
        min_duration_s: float = 0.1,
    ) -> None:
        self.api_key = api_key
        """When set, requests must carry ``Authorization: Bearer <api_key>``."""
        self.require_model = require_model
        """OpenAI and Groq require ``model``; many local Whisper servers do not."""
        self.groq = groq
        self.default: Behaviour = default or Transcript()
        """Used when the script is empty."""
        self.min_duration_s = min_duration_s
        self.requests: list[ReceivedRequest] = []
        self._script: deque[Behaviour] = deque()
        self._stopping = asyncio.Event()
        self._arrived = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0

    # lifecycle

    async def __aenter__(self) -> FakeOpenAI:
        app = web.Application(client_max_size=MAX_CONTENT_BYTES * 2)
        app.router.add_post(PATH, self._handle)
        # handler_cancellation: a client that hangs up cancels its handler, which is how a
        # hung request learns that it was abandoned.
        self._runner, self.port = await serve(app, handler_cancellation=True, shutdown_timeout=0.5, access_log=None)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{PATH}"

    # scripting and inspection

    def script(self, *behaviours: Behaviour) -> None:
        """Queue behaviours, one per request, before falling back to :attr:`default`."""
        self._script.extend(behaviours)

    @property
    def connections(self) -> set[tuple[str, int]]:
        """Distinct TCP connections that carried a request."""
        return {r.peer for r in self.requests}

    async def wait_for_requests(self, count: int, timeout: float = 5.0) -> list[ReceivedRequest]:
        async with asyncio.timeout(timeout):
            while len(self.requests) < count:
                self._arrived.clear()
                await self._arrived.wait()
        return self.requests

    # handling

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        peer = request.transport.get_extra_info("peername") if request.transport else None
        parsed = await self._read_form(request)
        if isinstance(parsed, web.Response):
            return parsed
        fields, files = parsed
        upload = files.get("file")
        record = ReceivedRequest(
            fields=fields,
            files=files,
            headers=request.headers,
            peer=tuple(peer[:2]) if peer else ("", 0),
            received_at=time.monotonic(),
            wav=parse_wav(upload.data) if upload else None,
        )
        self.requests.append(record)
        self._arrived.set()
        try:
            response = await self._answer(request, record, started)
        except asyncio.CancelledError:
            record.disconnected.set()
            raise
        record.status = response.status
        return response

    async def _read_form(self, request: web.Request) -> tuple[dict[str, list[str]], dict[str, Upload]] | web.Response:
        if not request.content_type.startswith("multipart/form-data"):
            return _error(400, "Invalid Content-Type header (application/json), expected multipart/form-data.")
        fields: dict[str, list[str]] = {}
        files: dict[str, Upload] = {}
        total = 0
        reader = await request.multipart()
        async for part in reader:
            if not isinstance(part, BodyPartReader) or part.name is None:
                continue
            data = bytearray()
            while chunk := await part.read_chunk(65536):
                data += chunk
                total += len(chunk)
                if total > MAX_CONTENT_BYTES:
                    fault = Fault.too_large(total)
                    return _error(fault.status, fault.message, fault.type)
            if part.filename is not None:
                files[part.name] = Upload(part.filename, part.headers.get("Content-Type"), bytes(data))
            else:
                fields.setdefault(part.name, []).append(data.decode(part.get_charset("utf-8")))
        return fields, files

    def _validate(self, request: web.Request, record: ReceivedRequest) -> web.Response | None:
        """Auth first, then the checks OpenAI makes before transcribing."""
        if self.api_key is not None:
            auth = request.headers.get("Authorization", "")
            if not auth:
                return _error(
                    401,
                    "You didn't provide an API key. You need to provide your API key in an Authorization header"
                    " using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                )
            if auth != f"Bearer {self.api_key}":
                fault = Fault.unauthorized(_mask(auth.removeprefix("Bearer ")))
                return _error(fault.status, fault.message, code=fault.code)
        upload = record.files.get("file")
        if upload is None:
            return _error(
                400, "1 validation error for Request\nbody -> file\n  field required (type=value_error.missing)"
            )
        if self.require_model and not record.field("model"):
            return _error(400, "you must provide a model parameter")
        extension = (upload.filename or "").rpartition(".")[2].lower()
        if extension not in SUPPORTED_FORMATS:
            return _error(400, f"Invalid file format. Supported formats: {SUPPORTED_FORMATS}")
        if extension == "wav" and record.wav is None:
            return _error(400, "The audio file could not be decoded or its format is not supported.", param="file")
        if record.wav is not None and record.wav.duration_s < self.min_duration_s:
            return _error(
                400,
                f"Audio file is too short. Minimum audio length is {self.min_duration_s:g} seconds.",
                param="file",
                code="audio_too_short",
            )
        response_format = record.field("response_format") or "json"
        if response_format not in RESPONSE_FORMATS:
            return _error(
                400,
                f"Invalid value: '{response_format}'. Supported values are: {list(RESPONSE_FORMATS)}",
                param="response_format",
            )
        return None

    async def _answer(self, request: web.Request, record: ReceivedRequest, started: float) -> web.StreamResponse:
        if (invalid := self._validate(request, record)) is not None:
            return invalid
        behaviour = self._script.popleft() if self._script else self.default
        if isinstance(behaviour, Hang):
            await self._stopping.wait()
            return _error(503, "The fake is shutting down.", "server_error")
        if isinstance(behaviour, Drop):
            await asyncio.sleep(behaviour.after_s)
            assert request.transport is not None
            request.transport.close()
            await asyncio.sleep(3600)  # connection_lost cancels this handler
            raise AssertionError("unreachable")
        await asyncio.sleep(behaviour.latency_s)
        if isinstance(behaviour, Fault):
            return _error(
                behaviour.status, behaviour.message, behaviour.type, behaviour.param, behaviour.code, behaviour.headers
            )
        return await self._transcript(request, record, behaviour, started)

    async def _transcript(
        self, request: web.Request, record: ReceivedRequest, behaviour: Transcript, started: float
    ) -> web.StreamResponse:
        text = behaviour.resolve(record)
        model = record.field("model") or ""
        duration = record.wav.duration_s if record.wav else 0.0
        stream = record.field("stream") == "true" and model != "whisper-1" and not self.groq
        if stream:
            return await self._stream(request, record, behaviour, text, duration, started)
        response_format = record.field("response_format") or "json"
        headers = _headers(started)
        if response_format == "text":
            return web.Response(text=text + "\n", content_type="text/plain", headers=headers)
        if response_format in ("srt", "vtt"):
            return web.Response(
                text=_subtitles(text, duration, response_format), content_type="text/plain", headers=headers
            )
        body: dict[str, Any] = {"text": text}
        if response_format == "verbose_json":
            body = _verbose(text, duration, behaviour.language, record.form.get("timestamp_granularities") or [])
        elif not self.groq:
            body["usage"] = _usage(model, duration, text)
            if "logprobs" in (record.form.get("include") or []):
                body["logprobs"] = [_logprob(word) for word in text.split()]
        if self.groq:
            body["x_groq"] = {"id": f"req_{secrets.token_hex(13)}"}
        return web.json_response(body, headers=headers)

    async def _stream(
        self,
        request: web.Request,
        record: ReceivedRequest,
        behaviour: Transcript,
        text: str,
        duration: float,
        started: float,
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8", **_headers(started)})
        await response.prepare(request)
        logprobs = "logprobs" in (record.form.get("include") or [])
        deltas = behaviour.deltas if behaviour.deltas is not None else re.findall(r"\S+\s*", text)

        async def send(event: dict[str, Any]) -> None:
            if behaviour.sse_extras:
                await response.write(f"event: {event['type']}\n".encode())
            await response.write(f"data: {json.dumps(event)}\n\n".encode())

        if behaviour.sse_extras:
            await response.write(b": keep-alive\n\n")
        for i, delta in enumerate(deltas):
            if i and behaviour.delta_interval_s:
                await asyncio.sleep(behaviour.delta_interval_s)
            event: dict[str, Any] = {"type": "transcript.text.delta", "delta": delta}
            if logprobs:
                event["logprobs"] = [_logprob(delta)]
            await send(event)
        done: dict[str, Any] = {"type": "transcript.text.done", "text": text, "usage": _usage("", duration, text)}
        if logprobs:
            done["logprobs"] = [_logprob(word) for word in text.split()]
        await send(done)
        if behaviour.sse_extras:
            await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


def _error(
    status: int,
    message: str,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    envelope = {"error": {"message": message, "type": type, "param": param, "code": code}}
    all_headers = CIMultiDict(_headers(time.monotonic()))
    all_headers.update(headers or {})
    return web.json_response(envelope, status=status, headers=all_headers)


def _headers(started: float) -> dict[str, str]:
    return {
        "x-request-id": f"req_{secrets.token_hex(16)}",
        "openai-processing-ms": str(round((time.monotonic() - started) * 1000)),
        "openai-version": "2020-10-01",
    }


def _mask(key: str) -> str:
    return f"{key[:4]}{'*' * max(len(key) - 8, 4)}{key[-4:]}" if len(key) > 8 else "*" * len(key)


def _usage(model: str, duration: float, text: str) -> dict[str, Any]:
    if model == "whisper-1":
        return {"type": "duration", "seconds": math.ceil(duration)}
    audio_tokens = max(1, math.ceil(duration * 10))
    output_tokens = max(1, len(text.split()))
    return {
        "type": "tokens",
        "input_tokens": audio_tokens,
        "input_token_details": {"text_tokens": 0, "audio_tokens": audio_tokens},
        "output_tokens": output_tokens,
        "total_tokens": audio_tokens + output_tokens,
    }


def _logprob(token: str) -> dict[str, Any]:
    return {"token": token, "logprob": -0.01, "bytes": list(token.encode())}


def _verbose(text: str, duration: float, language: str, granularities: list[str]) -> dict[str, Any]:
    words = text.split()
    body: dict[str, Any] = {"task": "transcribe", "language": language, "duration": round(duration, 2), "text": text}
    if "segment" in granularities or not granularities:
        body["segments"] = [
            {
                "id": 0,
                "seek": 0,
                "start": 0.0,
                "end": round(duration, 2),
                "text": f" {text}",
                "tokens": [50364 + i for i in range(len(words))],
                "temperature": 0.0,
                "avg_logprob": -0.25,
                "compression_ratio": 0.9,
                "no_speech_prob": 0.01,
            }
        ]
    if "word" in granularities:
        step = duration / max(len(words), 1)
        body["words"] = [
            {"word": word, "start": round(i * step, 2), "end": round((i + 1) * step, 2)} for i, word in enumerate(words)
        ]
    body["usage"] = {"type": "duration", "seconds": math.ceil(duration)}
    return body


def _subtitles(text: str, duration: float, kind: str) -> str:
    def stamp(seconds: float) -> str:
        ms = round(seconds * 1000)
        sep = "," if kind == "srt" else "."
        return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}{sep}{ms % 1000:03d}"

    cue = f"{stamp(0)} --> {stamp(duration)}\n{text}\n"
    return f"1\n{cue}\n" if kind == "srt" else f"WEBVTT\n\n{cue}\n"
