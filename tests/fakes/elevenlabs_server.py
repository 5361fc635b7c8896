"""A loopback ElevenLabs speech-to-text service: realtime WebSocket and batch HTTP, scripted and recording.

It speaks the protocol as the official ``elevenlabs`` SDK (2.x) speaks it, which
``tests/test_elevenlabs_fake_sdk.py`` proves by driving it with that SDK:

* ``GET /v1/speech-to-text/realtime`` (WebSocket). Auth: ``xi-api-key`` header or ``token`` query. Query:
  ``model_id`` (required), ``audio_format`` (``pcm_8000``…``pcm_48000``, ``ulaw_8000``), ``commit_strategy``
  (``manual``/``vad``), ``language_code``, ``include_timestamps``, ``vad_silence_threshold_secs``, … The server
  opens with ``session_started {session_id, config}``, answers audio with ``partial_transcript {text}`` and a
  commit (``commit: true``, or with ``vad`` a pause after speech) with ``committed_transcript {text}`` and, when
  asked, ``committed_transcript_with_timestamps {text, language_code, words}``. Errors are
  ``{"message_type": X, "error": "..."}`` followed by a close (code 1000, reason X, as observed from the real
  service for ``commit_throttled``).
* ``POST /v1/speech-to-text`` (multipart): ``model_id`` required (422 FastAPI-style ``detail`` list when
  missing), ``file`` (WAV or anything ``wave`` reads; raw PCM with ``file_format=pcm_s16le_16``), optional
  ``language_code``. 401 ``{"detail": {"status": "invalid_api_key", "message": ...}}`` on a wrong key.

Where neither the SDK nor the reference says, the fake is strict so that client mistakes show: a binary frame,
bad JSON or base64, an odd byte count, a ``sample_rate`` unlike ``audio_format``'s or a ``previous_text`` after
the first chunk (the documented rule) get ``input_error``. The SDK's batch call always sends
``webhook_metadata``/``entity_detection``/``entity_redaction`` as the string ``"null"``; they are accepted. Its
speech detector is an RMS gate on 20 ms frames (``ulaw_8000`` bytes are not decoded, only counted).

Behaviour is scripted with :class:`Script` (text, fixed or by audio duration; partial pace; latency; VAD
silence) and :class:`Fault` s queued in ``fake.faults``: each new connection or request takes the next one.
Everything received is recorded in ``fake.sessions`` and ``fake.batch_requests``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import math
import uuid
import wave
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from aiohttp import BodyPartReader, WSMsgType, web

from tests.fakes._loopback import serve

REALTIME_PATH = "/v1/speech-to-text/realtime"
BATCH_PATH = "/v1/speech-to-text"
AUDIO_FORMATS = {
    "pcm_8000": 8000,
    "pcm_16000": 16000,
    "pcm_22050": 22050,
    "pcm_24000": 24000,
    "pcm_44100": 44100,
    "pcm_48000": 48000,
    "ulaw_8000": 8000,
}
INVALID_KEY = {"detail": {"status": "invalid_api_key", "message": "Invalid API key"}}


@dataclass
class Script:
    """How the fake transcribes."""

    text: str | Callable[[float], str] = "what time is it"
    """The transcript of a segment with speech; a callable gets the segment's duration in seconds."""
    words_per_s: float = 3.0
    """Partials reveal the transcript word by word at this pace of received speech."""
    latency_s: float = 0.0
    """Delay before a committed transcript or a batch response."""
    vad_silence_s: float = 0.5
    """With ``commit_strategy=vad`` and no ``vad_silence_threshold_secs``: the pause that commits."""
    speech_rms: float = 1000.0
    """A 20 ms frame louder than this (int16 RMS) is speech."""
    min_commit_s: float = 0.3
    """A manual commit of less uncommitted audio gets ``commit_throttled``, as the real service does."""
    language_code: str = "eng"
    chatter: list[dict[str, Any]] = field(default_factory=list)
    """Extra server messages sent right after ``session_started`` (warnings, future message types)."""

    def transcript(self, duration_s: float) -> str:
        return self.text(duration_s) if callable(self.text) else self.text


@dataclass
class Fault:
    """One misbehaviour, for the next connection (realtime) or request (batch)."""

    kind: Literal["http", "message", "hang", "drop"]
    status: int = 500
    retry_after: str | None = None
    message_type: str = "error"
    error: str = "scripted failure"
    when: Literal["open", "audio", "commit"] = "open"
    after_audio_s: float = 0.0

    @classmethod
    def http(cls, status: int, retry_after: str | None = None) -> Fault:
        """Realtime: the WebSocket handshake is refused with this status; batch: the response status."""
        return cls("http", status=status, retry_after=retry_after)

    @classmethod
    def message(
        cls,
        message_type: str,
        when: Literal["open", "audio", "commit"] = "open",
        after_audio_s: float = 0.0,
        error: str | None = None,
    ) -> Fault:
        """Realtime: ``{"message_type": X, "error": ...}`` then close, at session start, after audio or at commit."""
        text = error if error is not None else f"scripted {message_type}"
        return cls("message", message_type=message_type, error=text, when=when, after_audio_s=after_audio_s)

    @classmethod
    def hang(cls, when: Literal["open", "commit"] = "open") -> Fault:
        """Say nothing more: no ``session_started`` (open) or no committed transcript (commit); batch: no response."""
        return cls("hang", when=when)

    @classmethod
    def drop(cls, after_audio_s: float) -> Fault:
        """Realtime: abort the TCP connection (no close frame) once this much audio has arrived."""
        return cls("drop", after_audio_s=after_audio_s)


@dataclass
class RealtimeSession:
    """What one realtime connection received and sent."""

    query: list[tuple[str, str]]
    headers: dict[str, str]
    """Lower-case names."""
    messages: list[dict[str, Any]] = field(default_factory=list)
    """Client messages, decoded JSON, in order."""
    sent: list[dict[str, Any]] = field(default_factory=list)
    audio: bytearray = field(default_factory=bytearray)
    commits: int = 0
    client_closed: bool = False
    """The client closed the socket (rather than the fake, or a drop)."""
    ended: bool = False

    @property
    def params(self) -> dict[str, str]:
        return dict(self.query)

    def sent_types(self) -> list[str]:
        return [m["message_type"] for m in self.sent]


@dataclass
class BatchRequest:
    headers: dict[str, str]
    query: dict[str, str]
    fields: dict[str, str] = field(default_factory=dict)
    file: bytes | None = None
    filename: str | None = None
    content_type: str | None = None
    """The ``file`` part's own content type, if it has one."""


def _headers(request: web.Request) -> dict[str, str]:
    """Request headers with lower-case names, for exact assertions."""
    return {name.lower(): value for name, value in request.headers.items()}


class _Segment:
    """The uncommitted audio of a realtime session and what the fake has heard in it."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.frame = rate // 50
        self.samples = 0
        self.speech_samples = 0
        self.trailing_silence = 0
        self.pending = np.zeros(0, dtype=np.int16)

    @property
    def duration_s(self) -> float:
        return self.samples / self.rate

    def add(self, pcm: np.ndarray) -> list[float]:
        """Take samples; the RMS of every whole 20 ms frame completed."""
        self.samples += len(pcm)
        self.pending = np.concatenate([self.pending, pcm])
        verdicts = []
        while len(self.pending) >= self.frame:
            frame, self.pending = self.pending[: self.frame], self.pending[self.frame :]
            rms = math.sqrt(float(np.mean(frame.astype(np.float64) ** 2)))
            verdicts.append(rms)
        return verdicts


class FakeElevenLabs:
    def __init__(
        self,
        *,
        api_key: str = "test-key",
        tokens: tuple[str, ...] = ("single-use-token",),
        script: Script | None = None,
        auth_failure: Literal["message", "http"] = "message",
    ) -> None:
        self.api_key = api_key
        self.tokens = set(tokens)
        self.script = script or Script()
        self.auth_failure = auth_failure
        """How a realtime connection with a wrong key fails: ``auth_error`` message, or HTTP 401 handshake."""
        self.faults: list[Fault] = []
        self.sessions: list[RealtimeSession] = []
        self.batch_requests: list[BatchRequest] = []
        self._stop = asyncio.Event()
        self._changed = asyncio.Event()
        self._sockets: set[web.WebSocketResponse] = set()
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def realtime_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}{REALTIME_PATH}"

    @property
    def batch_url(self) -> str:
        return f"{self.base_url}{BATCH_PATH}"

    async def __aenter__(self) -> FakeElevenLabs:
        app = web.Application(client_max_size=64 * 2**20)
        app.router.add_get(REALTIME_PATH, self._realtime)
        app.router.add_post(BATCH_PATH, self._batch)
        self._runner, self.port = await serve(app, access_log=None, shutdown_timeout=1.0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        for ws in list(self._sockets):
            await ws.close(code=1001)
        if self._runner is not None:
            await self._runner.cleanup()

    def touch(self) -> None:
        """Something was recorded: wake :meth:`wait_until`."""
        self._changed.set()

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Wait until the records satisfy ``predicate`` (e.g. a commit arrived, the client closed)."""
        async with asyncio.timeout(timeout):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

    # Shared -------------------------------------------------------------------------------------------------

    def _next_fault(self) -> Fault | None:
        return self.faults.pop(0) if self.faults else None

    def _authorized(self, request: web.Request) -> bool:
        token = request.query.get("token")
        if token is not None:
            return token in self.tokens
        return request.headers.get("xi-api-key") == self.api_key

    @staticmethod
    def _status_response(status: int, retry_after: str | None = None) -> web.Response:
        headers = {"Retry-After": retry_after} if retry_after is not None else None
        if status == 401:
            body: dict[str, Any] = INVALID_KEY
        elif status == 429:
            body = {"detail": {"status": "too_many_concurrent_requests", "message": "Too many concurrent requests"}}
        elif status == 422:
            body = {"detail": [{"loc": ["body", "file"], "msg": "Invalid audio", "type": "value_error"}]}
        elif status >= 500:
            body = {"detail": {"status": "internal_error", "message": "Scripted server error"}}
        else:
            body = {"detail": {"status": "invalid_request", "message": "Scripted rejection"}}
        return web.json_response(body, status=status, headers=headers)

    def _words(self, text: str, duration_s: float) -> list[dict[str, Any]]:
        tokens = text.split()
        if not tokens:
            return []
        step = duration_s / len(tokens)
        words: list[dict[str, Any]] = []
        for i, token in enumerate(tokens):
            start, end = round(i * step, 3), round((i + 0.8) * step, 3)
            if i:
                words.append(
                    {
                        "text": " ",
                        "start": words[-1]["end"],
                        "end": start,
                        "type": "spacing",
                        "speaker_id": "speaker_0",
                        "logprob": 0.0,
                    }
                )
            words.append(
                {"text": token, "start": start, "end": end, "type": "word", "speaker_id": "speaker_0", "logprob": -0.05}
            )
        return words

    # Batch --------------------------------------------------------------------------------------------------

    async def _batch(self, request: web.Request) -> web.StreamResponse:
        record = BatchRequest(headers=_headers(request), query=dict(request.query))
        self.batch_requests.append(record)
        if not request.content_type.startswith("multipart/"):
            return web.json_response(
                {"detail": [{"loc": ["body"], "msg": "Expected multipart/form-data", "type": "value_error"}]},
                status=422,
            )
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader) or part.name is None:
                continue
            if part.name == "file":
                record.file = bytes(await part.read())
                record.filename = part.filename
                record.content_type = part.headers.get("Content-Type")
            else:
                record.fields[part.name] = await part.text()
        if not self._authorized(request):
            return web.json_response(INVALID_KEY, status=401)
        fault = self._next_fault()
        if fault is not None and fault.kind == "hang":
            await self._stop.wait()
            return web.json_response({"detail": {"status": "shutting_down"}}, status=503)
        if fault is not None and fault.kind == "http":
            return self._status_response(fault.status, fault.retry_after)
        if not record.fields.get("model_id"):
            return web.json_response(
                {"detail": [{"loc": ["body", "model_id"], "msg": "Field required", "type": "missing"}]}, status=422
            )
        if record.file is None and not record.fields.get("source_url") and not record.fields.get("cloud_storage_url"):
            return web.json_response(
                {"detail": {"status": "invalid_parameters", "message": "Must provide either file or source_url"}},
                status=400,
            )
        duration = self._duration(record)
        if duration is None:
            return web.json_response(
                {"detail": {"status": "invalid_content", "message": "Audio could not be decoded"}}, status=400
            )
        if self.script.latency_s:
            await asyncio.sleep(self.script.latency_s)
        text = self.script.transcript(duration)
        return web.json_response(
            {
                "language_code": record.fields.get("language_code") or self.script.language_code,
                "language_probability": 0.98,
                "text": text,
                "words": self._words(text, duration),
                "transcription_id": uuid.uuid4().hex[:20],
                "audio_duration_secs": round(duration, 3),
            }
        )

    @staticmethod
    def _duration(record: BatchRequest) -> float | None:
        data = record.file or b""
        if record.fields.get("file_format") == "pcm_s16le_16":
            return len(data) / 32000 if len(data) % 2 == 0 else None
        try:
            with wave.open(io.BytesIO(data), "rb") as wav:
                return wav.getnframes() / wav.getframerate()
        except (wave.Error, EOFError):
            return None

    # Realtime -----------------------------------------------------------------------------------------------

    async def _realtime(self, request: web.Request) -> web.StreamResponse:
        session = RealtimeSession(query=list(request.query.items()), headers=_headers(request))
        self.sessions.append(session)
        fault = self._next_fault()
        if fault is not None and fault.kind == "http":
            return self._status_response(fault.status, fault.retry_after)
        authorized = self._authorized(request)
        if not authorized and self.auth_failure == "http":
            return web.json_response(INVALID_KEY, status=401)
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        self._sockets.add(ws)
        try:
            await _RealtimeRun(self, request, ws, session, fault, authorized).run()
        finally:
            self._sockets.discard(ws)
            session.ended = True
            self.touch()
        return ws


class _RealtimeRun:
    """One realtime connection, from ``session_started`` to close."""

    def __init__(
        self,
        fake: FakeElevenLabs,
        request: web.Request,
        ws: web.WebSocketResponse,
        session: RealtimeSession,
        fault: Fault | None,
        authorized: bool,
    ) -> None:
        self.fake = fake
        self.script = fake.script
        self.request = request
        self.ws = ws
        self.session = session
        self.fault = fault
        self.authorized = authorized
        params = session.params
        self.audio_format = params.get("audio_format", "")
        self.rate = AUDIO_FORMATS.get(self.audio_format, 16000)
        self.strategy = params.get("commit_strategy", "manual")
        self.timestamps = params.get("include_timestamps", "false") == "true"
        self.language = params.get("language_code")
        silence = params.get("vad_silence_threshold_secs")
        self.vad_silence_s = float(silence) if silence else self.script.vad_silence_s
        self.segment = _Segment(self.rate)
        self.revealed = 0
        self.received_s = 0.0
        self.chunks = 0

    async def send(self, message: dict[str, Any]) -> None:
        self.session.sent.append(message)
        await self.ws.send_str(json.dumps(message))

    async def fail(self, message_type: str, error: str) -> None:
        await self.send({"message_type": message_type, "error": error})
        await self.ws.close(code=1000, message=message_type.encode())

    async def hang(self) -> None:
        """Say nothing, keep reading (so pings and the client's close still work) until the fake stops."""
        stop = asyncio.ensure_future(self.fake._stop.wait())
        try:
            while not self.ws.closed:
                receive = asyncio.ensure_future(self.ws.receive())
                done, _ = await asyncio.wait({receive, stop}, return_when=asyncio.FIRST_COMPLETED)
                if stop in done:
                    receive.cancel()
                    return
                if receive.result().type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING, WSMsgType.ERROR):
                    self.session.client_closed = True
                    return
        finally:
            stop.cancel()

    def problem(self) -> str | None:
        params = self.session.params
        if not params.get("model_id"):
            return "model_id is required"
        if self.audio_format and self.audio_format not in AUDIO_FORMATS:
            return f"audio_format {self.audio_format!r} is not supported"
        if self.strategy not in ("manual", "vad"):
            return f"commit_strategy {self.strategy!r} is not supported"
        return None

    async def run(self) -> None:
        if not self.authorized:
            await self.fail("auth_error", "Invalid API key or token")
            return
        if (problem := self.problem()) is not None:
            await self.fail("invalid_request", problem)
            return
        fault = self.fault
        if fault is not None and fault.when == "open":
            if fault.kind == "hang":
                await self.hang()
                return
            if fault.kind == "message":
                await self.fail(fault.message_type, fault.error)
                return
        await self.send({"message_type": "session_started", "session_id": uuid.uuid4().hex, "config": self.config()})
        for message in self.script.chatter:
            await self.send(message)
        async for msg in self.ws:
            if msg.type == WSMsgType.BINARY:
                await self.fail("input_error", "Expected a JSON text message")
                return
            if msg.type != WSMsgType.TEXT:
                continue
            if not await self.on_message(msg.data):
                return
        self.session.client_closed = True

    def config(self) -> dict[str, Any]:
        params = self.session.params
        config: dict[str, Any] = {
            "sample_rate": self.rate,
            "audio_format": self.audio_format or "pcm_16000",
            "language_code": self.language,
            "commit_strategy": self.strategy,
            "model_id": params.get("model_id"),
            "include_timestamps": self.timestamps,
        }
        if self.strategy == "vad":
            config["vad_silence_threshold_secs"] = self.vad_silence_s
        return config

    async def on_message(self, data: str) -> bool:
        """Handle one client message; ``False`` when the connection is over."""
        try:
            message = json.loads(data)
        except json.JSONDecodeError:
            await self.fail("input_error", "Invalid JSON")
            return False
        self.session.messages.append(message)
        self.fake.touch()
        problem = self.check(message)
        if problem is not None:
            await self.fail("input_error", problem)
            return False
        self.chunks += 1
        pcm = base64.b64decode(message["audio_base_64"])
        if pcm and not await self.on_audio(pcm):
            return False
        if message["commit"]:
            return await self.commit()
        return True

    def check(self, message: Any) -> str | None:
        if not isinstance(message, dict) or message.get("message_type") != "input_audio_chunk":
            return "expected message_type input_audio_chunk"
        audio = message.get("audio_base_64")
        if not isinstance(audio, str):
            return "audio_base_64 must be a string"
        try:
            pcm = base64.b64decode(audio, validate=True)
        except binascii.Error:
            return "audio_base_64 is not base64"
        if len(pcm) % 2:
            return "audio must be whole 16-bit samples"
        if not isinstance(message.get("commit"), bool):
            return "commit must be a boolean"
        if message.get("sample_rate") != self.rate:
            return f"sample_rate {message.get('sample_rate')!r} does not match audio_format {self.audio_format}"
        if message.get("previous_text") is not None and self.chunks:
            return "previous_text can only be sent with the first audio chunk"
        return None

    async def on_audio(self, pcm_bytes: bytes) -> bool:
        self.session.audio += pcm_bytes
        self.received_s += len(pcm_bytes) / 2 / self.rate
        fault = self.fault
        if fault is not None and fault.when != "commit" and self.received_s >= fault.after_audio_s:
            if fault.kind == "drop":
                if self.request.transport is not None:
                    self.request.transport.abort()
                return False
            if fault.kind == "message" and fault.when == "audio":
                await self.fail(fault.message_type, fault.error)
                return False
        for rms in self.segment.add(np.frombuffer(pcm_bytes, dtype="<i2")):
            if rms > self.script.speech_rms:
                self.segment.speech_samples += self.segment.frame
                self.segment.trailing_silence = 0
            else:
                self.segment.trailing_silence += self.segment.frame
            if (
                self.strategy == "vad"
                and self.segment.speech_samples
                and self.segment.trailing_silence / self.rate >= self.vad_silence_s
            ):
                await self.committed()
        await self.partial()
        return True

    async def partial(self) -> None:
        if not self.segment.speech_samples:
            return
        words = self.script.transcript(self.segment.duration_s).split()
        speech_s = self.segment.speech_samples / self.rate
        revealed = min(len(words), 1 + int(speech_s * self.script.words_per_s))
        if revealed > self.revealed:
            self.revealed = revealed
            await self.send({"message_type": "partial_transcript", "text": " ".join(words[:revealed])})

    async def commit(self) -> bool:
        self.session.commits += 1
        self.fake.touch()
        fault = self.fault
        if fault is not None and fault.when == "commit":
            if fault.kind == "hang":
                await self.hang()
                return False
            if fault.kind == "message":
                await self.fail(fault.message_type, fault.error)
                return False
        if self.segment.duration_s < self.script.min_commit_s:
            uncommitted = self.segment.duration_s
            await self.fail(
                "commit_throttled",
                f"Commit request ignored: only {uncommitted:.2f}s of uncommitted audio. You need at least "
                f"{self.script.min_commit_s:.1f}s of uncommitted audio before committing.",
            )
            return False
        await self.committed()
        return True

    async def committed(self) -> None:
        segment, self.segment, self.revealed = self.segment, _Segment(self.rate), 0
        text = self.script.transcript(segment.duration_s) if segment.speech_samples else ""
        if self.script.latency_s:
            await asyncio.sleep(self.script.latency_s)
        await self.send({"message_type": "committed_transcript", "text": text})
        if self.timestamps:
            await self.send(
                {
                    "message_type": "committed_transcript_with_timestamps",
                    "text": text,
                    "language_code": self.language or self.script.language_code,
                    "words": self._words(text, segment.duration_s),
                }
            )

    def _words(self, text: str, duration_s: float) -> list[dict[str, Any]]:
        words = self.fake._words(text, duration_s)
        for word in words:
            word.pop("speaker_id", None)
        return words
