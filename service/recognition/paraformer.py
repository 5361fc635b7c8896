"""DashScope paraformer realtime ASR over its duplex WebSocket, the way EchoKit uses it.

Each device gets one socket, opened on its first utterance and reused across turns with
one ``run-task`` per utterance (a handshake per turn would add its latency to every
reply). DashScope decides the end of the turn: its first ``sentence_end`` ends it, as in
EchoKit. An utterance keeps its PCM, so a dropped socket is replaced and the audio so far
replayed without the device noticing.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import msgspec
import numpy as np
import structlog
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
from websockets.protocol import State

from firmware_protocol import SAMPLE_RATE, EndReason, ErrorCode
from service.config import ParaformerSettings
from service.recognition.base import (
    BackendError,
    Recognition,
    RecognitionStream,
    SessionOptions,
    StreamListener,
    TranscriptionBackend,
)
from service.recognition.http import status_error, transport_error
from service.recognition.retry import RetryPolicy
from service.redact import Redactor, redact_url, url_secrets

log = structlog.get_logger(__name__)

DEFAULT_URL = "wss://dashscope.aliyuncs.com/api-ws/v1/inference"
DEFAULT_MODEL = "paraformer-realtime-v2"
FRAME_BYTES = 3200
"""100 ms of 16 kHz s16le, the frame size DashScope's docs suggest."""
IDLE_CLOSE_S = 50.0
"""DashScope closes a socket after 60 s without a task; we close ours first."""

# Wire messages (cloud-asr.md §2) -----------------------------------------------------------


class _TaskHeader(msgspec.Struct):
    action: str
    task_id: str
    streaming: str = "duplex"


class _Parameters(msgspec.Struct):
    semantic_punctuation_enabled: bool
    disfluency_removal_enabled: bool
    heartbeat: bool
    format: str = "pcm"
    sample_rate: int = SAMPLE_RATE
    language_hints: list[str] | msgspec.UnsetType = msgspec.UNSET
    max_sentence_silence: int | msgspec.UnsetType = msgspec.UNSET


class _RunTaskPayload(msgspec.Struct):
    model: str
    parameters: _Parameters
    task_group: str = "audio"
    task: str = "asr"
    function: str = "recognition"
    input: dict[str, Any] = msgspec.field(default_factory=dict)


class _RunTask(msgspec.Struct):
    header: _TaskHeader
    payload: _RunTaskPayload


class _FinishTaskPayload(msgspec.Struct):
    task_group: str = "audio"
    input: dict[str, Any] = msgspec.field(default_factory=dict)


class _FinishTask(msgspec.Struct):
    header: _TaskHeader
    payload: _FinishTaskPayload = msgspec.field(default_factory=_FinishTaskPayload)


class _EventHeader(msgspec.Struct):
    event: str = ""
    task_id: str = ""
    error_code: str | None = None
    error_message: str | None = None


class _Sentence(msgspec.Struct):
    text: str = ""
    sentence_end: bool = False
    heartbeat: bool | None = None


class _Output(msgspec.Struct):
    sentence: _Sentence | None = None


class _EventPayload(msgspec.Struct):
    output: _Output | None = None


class _Event(msgspec.Struct):
    header: _EventHeader
    payload: _EventPayload | None = None


_encoder = msgspec.json.Encoder()
_event_decoder = msgspec.json.Decoder(_Event)

_AUTH_CODES = frozenset({"InvalidApiKey", "AccessDenied", "Unauthorized", "Forbidden"})
_CLIENT_CODES = frozenset(
    {"CLIENT_ERROR", "ClientError", "BadRequest", "DataInspectionFailed", "Arrearage", "ModelNotFound"}
)


def _task_failed(code: str, message: str) -> BackendError:
    """Map a ``task-failed`` to what the device is told; a rejected request is not retried."""
    text = f"DashScope task failed: {code}: {message[:300]}"
    if code in _AUTH_CODES:
        return BackendError(text, code=ErrorCode.BACKEND_AUTH, retryable=False, failover=False)
    if code.startswith("Throttling") or "RateLimit" in code:
        return BackendError(text, code=ErrorCode.BACKEND_RATE_LIMITED)
    client = code in _CLIENT_CODES or code.startswith("Invalid")
    return BackendError(text, code=ErrorCode.BACKEND_ERROR, retryable=not client)


def _is_cjk(char: str) -> bool:
    return "\u2e80" <= char <= "\u9fff" or "\uac00" <= char <= "\ud7af" or "\uff00" <= char <= "\uffef"


def join_sentences(sentences: list[str]) -> str:
    """Sentences as one text: a space between Latin ones, nothing around CJK."""
    text = ""
    for sentence in (s.strip() for s in sentences):
        if not sentence:
            continue
        if text and not (_is_cjk(text[-1]) or _is_cjk(sentence[0])):
            text += " "
        text += sentence
    return text


# The per-device sockets --------------------------------------------------------------------


class _Socket:
    """A device's connection; ``busy`` while one of its utterances runs a task on it."""

    def __init__(self, device_id: str) -> None:
        self.device_id = device_id
        self.ws: ClientConnection | None = None
        self.busy = True
        self.last_used = asyncio.get_running_loop().time()
        self.expiry: asyncio.TimerHandle | None = None

    @property
    def healthy(self) -> bool:
        return self.ws is not None and self.ws.state is State.OPEN

    async def send(self, message: str | bytes, timeout: float) -> None:
        assert self.ws is not None
        async with asyncio.timeout(timeout):
            await self.ws.send(message)

    async def receive(self) -> _Event | None:
        """The next event; ``None`` for a binary message (DashScope sends none for ASR)."""
        assert self.ws is not None
        message = await self.ws.recv()
        if isinstance(message, bytes):
            return None
        return _event_decoder.decode(message)

    async def close(self) -> None:
        if self.expiry is not None:
            self.expiry.cancel()
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await self.ws.close()


class SocketRegistry:
    """One socket per device, at most ``max_sockets`` at once, idle ones closed after ``idle_close_s``.

    When full, the least recently used idle socket makes room; when none is idle the new
    utterance fails with ``backend_unavailable``.
    """

    def __init__(
        self,
        connect: Callable[[], Awaitable[ClientConnection]],
        *,
        max_sockets: int,
        idle_close_s: float,
        wait_s: float,
    ) -> None:
        self._connect = connect
        self._max = max_sockets
        self._idle_close_s = idle_close_s
        self._wait_s = wait_s
        self._sockets: dict[str, _Socket] = {}
        self._live: set[_Socket] = set()
        self._changed = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    def __len__(self) -> int:
        return len(self._sockets)

    async def acquire(self, device_id: str) -> _Socket:
        """Lease the device's socket, waiting for its previous utterance to hand it back."""
        if self._closed:
            raise BackendError(
                "the paraformer backend is shut down", code=ErrorCode.BACKEND_UNAVAILABLE, retryable=False
            )
        try:
            async with asyncio.timeout(self._wait_s):
                while (sock := self._sockets.get(device_id)) is not None and sock.busy:
                    changed = self._changed
                    await changed.wait()
        except TimeoutError:
            raise BackendError(
                "the device's previous DashScope task is still running", code=ErrorCode.BACKEND_UNAVAILABLE
            ) from None
        if sock is not None and sock.healthy:
            self._lease(sock)
            return sock
        if sock is not None:
            self._forget(sock)
        self._make_room()
        sock = _Socket(device_id)
        self._sockets[device_id] = sock
        self._live.add(sock)
        try:
            sock.ws = await self._connect()
        except BaseException:
            self._forget(sock)
            raise
        if self._closed:
            await sock.close()
            raise BackendError(
                "the paraformer backend is shut down", code=ErrorCode.BACKEND_UNAVAILABLE, retryable=False
            )
        return sock

    def release(self, sock: _Socket) -> None:
        """The task ended cleanly: the socket waits for the device's next utterance."""
        sock.busy = False
        sock.last_used = asyncio.get_running_loop().time()
        if not sock.healthy or self._sockets.get(sock.device_id) is not sock:
            self._forget(sock)
            return
        sock.expiry = asyncio.get_running_loop().call_later(self._idle_close_s, self._expire, sock)
        self._notify()

    def discard(self, sock: _Socket) -> None:
        """The socket failed or its state is unknown: close it."""
        sock.busy = False
        self._forget(sock)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def aclose(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._sockets.clear()
        live, self._live = self._live, set()
        await asyncio.gather(*(sock.close() for sock in live), return_exceptions=True)

    def _lease(self, sock: _Socket) -> None:
        sock.busy = True
        sock.last_used = asyncio.get_running_loop().time()
        if sock.expiry is not None:
            sock.expiry.cancel()
            sock.expiry = None

    def _make_room(self) -> None:
        if len(self._sockets) < self._max:
            return
        idle = [s for s in self._sockets.values() if not s.busy]
        if not idle:
            raise BackendError(
                f"all {self._max} DashScope sockets are busy (asr.max_sockets)", code=ErrorCode.BACKEND_UNAVAILABLE
            )
        self._forget(min(idle, key=lambda s: s.last_used))

    def _expire(self, sock: _Socket) -> None:
        sock.expiry = None
        if not sock.busy:
            self._forget(sock)

    def _forget(self, sock: _Socket) -> None:
        if self._sockets.get(sock.device_id) is sock:
            del self._sockets[sock.device_id]
        self._notify()

        async def close() -> None:
            await sock.close()
            self._live.discard(sock)

        self.spawn(close())

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()


# One DashScope task ------------------------------------------------------------------------


class _Task:
    """One ``run-task`` … ``task-finished`` exchange on a leased socket."""

    def __init__(self, sock: _Socket, config: ParaformerSettings, parameters: _Parameters, model: str) -> None:
        self.sock = sock
        self.task_id = uuid.uuid4().hex
        self.started = False
        self.finish_sent = False
        self._io_timeout = config.connect_timeout_s
        self._redact = Redactor(config.paraformer_token, config.api_key, *url_secrets(config.url))
        """DashScope's ``error_message`` may quote what it was sent."""
        self._run_task = _RunTask(
            _TaskHeader("run-task", self.task_id), _RunTaskPayload(model=model, parameters=parameters)
        )

    async def start(self) -> None:
        """``run-task``, then wait for its ``task-started``."""
        await self.sock.send(_encoder.encode(self._run_task).decode(), self._io_timeout)
        async with asyncio.timeout(self._io_timeout):
            while True:
                event = await self.next_event()
                if event is None:
                    continue
                if event.header.event == "task-started":
                    self.started = True
                    return
                raise BackendError(f"DashScope answered run-task with {event.header.event!r}")

    async def send_audio(self, data: bytes) -> None:
        await self.sock.send(data, self._io_timeout)

    async def finish(self) -> None:
        self.finish_sent = True
        message = _FinishTask(_TaskHeader("finish-task", self.task_id))
        await self.sock.send(_encoder.encode(message).decode(), self._io_timeout)

    async def next_event(self) -> _Event | None:
        """The next event of this task (``None`` for ones to skip); ``task-failed`` raises."""
        event = await self.sock.receive()
        if event is None or event.header.task_id != self.task_id:
            return None
        if event.header.event == "task-failed":
            raise _task_failed(event.header.error_code or "unknown", self._redact(event.header.error_message or ""))
        return event

    async def wind_down(self) -> bool:
        """End an abandoned task so the socket can serve the next turn; ``True`` when it did."""
        try:
            async with asyncio.timeout(self._io_timeout):
                if not self.finish_sent:
                    await self.finish()
                while True:
                    event = await self.next_event()
                    if event is not None and event.header.event == "task-finished":
                        return True
        except Exception:
            return False


# One utterance -----------------------------------------------------------------------------


class _ParaformerStream(RecognitionStream):
    """Audio goes out as it arrives; on a lost socket the utterance restarts on a new one."""

    def __init__(self, backend: ParaformerBackend, options: SessionOptions, listener: StreamListener) -> None:
        self._backend = backend
        self._config = backend.config
        self._device = options.device_id
        self._language = options.language if options.language not in (None, "", "auto") else backend.language
        self._listener = listener
        self._pcm = bytearray()
        """The whole utterance, for replay after a reconnect (the session caps its length)."""
        self._wake = asyncio.Event()
        self._finishing = False
        self._deadline: float | None = None
        self._attempt = 0
        self._attempt_timeout: asyncio.Timeout | None = None
        self._last_partial = ""
        self._turn_ended = False
        self._task = asyncio.create_task(self._run())

    def feed(self, pcm: np.ndarray) -> None:
        if self._finishing:
            return
        self._pcm += pcm.astype("<i2", copy=False).tobytes()
        self._wake.set()

    async def finish(self) -> Recognition:
        loop = asyncio.get_running_loop()
        self._finishing = True
        self._deadline = loop.time() + self._config.timeout_s
        if self._attempt_timeout is not None and not self._attempt_timeout.expired():
            self._attempt_timeout.reschedule(self._attempt_deadline())
        self._wake.set()
        try:
            async with asyncio.timeout_at(self._deadline):
                sentences = await self._task
        except TimeoutError:
            raise BackendError(
                f"DashScope gave no final within {self._config.timeout_s:g} s", code=ErrorCode.BACKEND_TIMEOUT
            ) from None
        text = join_sentences(sentences)
        if not text:
            return Recognition("", language=self._language, reason=EndReason.NO_SPEECH)
        return Recognition(text, language=self._language)

    async def cancel(self) -> None:
        self._finishing = True
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, BackendError):
            await self._task

    async def _run(self) -> list[str]:
        policy = self._backend.policy
        try:
            return await policy.run(self._try_once)
        except BackendError as exc:
            if not exc.retryable:
                raise
            attempts = f"{self._attempt} attempt{'s' if self._attempt > 1 else ''}"
            raise BackendError(
                f"{exc} (after {attempts})",
                code=exc.code,
                retryable=True,
                failover=True,
                retry_after_s=exc.retry_after_s,
            ) from None

    def _attempt_deadline(self) -> float | None:
        """Once finishing, each attempt left gets an equal share of the time that remains."""
        if self._deadline is None:
            return None
        now = asyncio.get_running_loop().time()
        left = max(1, self._backend.policy.attempts - self._attempt + 1)
        return now + max(0.0, self._deadline - now) / left

    async def _try_once(self) -> list[str]:
        self._attempt += 1
        registry = self._backend.registry
        sock: _Socket | None = None
        task: _Task | None = None
        phase = "connecting"
        try:
            async with asyncio.timeout_at(self._attempt_deadline()) as self._attempt_timeout:
                sock = await registry.acquire(self._device)
                task = self._backend.new_task(sock, self._language)
                phase = "starting the task"
                await task.start()
                phase = "streaming"
                sentences = await self._stream(task)
            registry.release(sock)
            sock = None
            return sentences
        except asyncio.CancelledError:
            if sock is not None and task is not None and task.started and sock.healthy:
                registry.spawn(self._wind_down(task))
                sock = None
            raise
        except BackendError as exc:
            log.warning("paraformer.attempt_failed", device=self._device, attempt=self._attempt, reason=str(exc))
            raise
        except TimeoutError:
            raise self._failed(f"DashScope did not answer in time while {phase}", ErrorCode.BACKEND_TIMEOUT) from None
        except ConnectionClosed:
            raise self._failed(f"the DashScope connection was lost while {phase}") from None
        except (msgspec.DecodeError, msgspec.ValidationError):
            raise self._failed("DashScope sent a message that is not an event", ErrorCode.BACKEND_ERROR) from None
        finally:
            self._attempt_timeout = None
            if sock is not None:
                registry.discard(sock)

    def _failed(self, message: str, code: ErrorCode = ErrorCode.BACKEND_UNAVAILABLE) -> BackendError:
        log.warning("paraformer.attempt_failed", device=self._device, attempt=self._attempt, reason=message)
        return BackendError(message, code=code)

    async def _wind_down(self, task: _Task) -> None:
        ended = False
        try:
            ended = await task.wind_down()
        finally:
            if ended:
                self._backend.registry.release(task.sock)
            else:
                self._backend.registry.discard(task.sock)

    async def _stream(self, task: _Task) -> list[str]:
        """Send audio and read results at once; done at ``task-finished``."""
        pump = asyncio.create_task(self._pump(task))
        reader = asyncio.create_task(self._read(task))
        try:
            done, _ = await asyncio.wait({pump, reader}, return_when=asyncio.FIRST_COMPLETED)
            if reader in done:
                return reader.result()
            pump.result()
            return await reader
        finally:
            for child in (pump, reader):
                child.cancel()
            await asyncio.gather(pump, reader, return_exceptions=True)

    async def _pump(self, task: _Task) -> None:
        """The utterance from its start (a replay after a reconnect) in 100 ms frames, then finish-task."""
        sent = 0
        try:
            while True:
                self._wake.clear()
                pending = len(self._pcm) - sent
                if pending >= FRAME_BYTES or (self._finishing and pending > 0):
                    size = min(FRAME_BYTES, pending)
                    await task.send_audio(bytes(self._pcm[sent : sent + size]))
                    sent += size
                elif self._finishing:
                    await task.finish()
                    return
                else:
                    await self._wake.wait()
        except ConnectionClosed:
            return  # the reader reports it, after any task-failed that came first

    async def _read(self, task: _Task) -> list[str]:
        sentences: list[str] = []
        while True:
            event = await task.next_event()
            if event is None:
                continue
            if event.header.event == "task-finished":
                return sentences
            output = event.payload.output if event.payload is not None else None
            sentence = output.sentence if output is not None else None
            if event.header.event != "result-generated" or sentence is None or sentence.heartbeat:
                continue
            if sentence.sentence_end:
                sentences.append(sentence.text)
                if sentence.text and not self._turn_ended:  # an empty one was noise: keep listening
                    self._turn_ended = True
                    self._listener.end_of_turn()
            elif sentence.text:
                self._partial(join_sentences([*sentences, sentence.text]))

    def _partial(self, text: str) -> None:
        """New interim text only; a replay's re-run of what the device already saw is skipped."""
        if text == self._last_partial or (self._attempt > 1 and self._last_partial.startswith(text)):
            return
        self._last_partial = text
        self._listener.partial(text)


class ParaformerBackend(TranscriptionBackend):
    name = "paraformer_v2"

    def __init__(self, config: ParaformerSettings, *, language: str = "", idle_close_s: float = IDLE_CLOSE_S) -> None:
        """``language``: the ``[asr]`` table's ``lang``, the hint when a session asks for none (or ``auto``)."""
        self.config = config
        self.url = config.url or DEFAULT_URL
        self._redact = Redactor(config.paraformer_token, config.api_key, *url_secrets(self.url))
        self.policy = RetryPolicy(attempts=1 + config.max_retries)
        self.language = language if language and language != "auto" else None
        self.registry = SocketRegistry(
            self._connect,
            max_sockets=config.max_sockets,
            idle_close_s=idle_close_s,
            wait_s=2 * config.connect_timeout_s,
        )

    async def start(self) -> None:
        if not self.config.paraformer_token:
            raise BackendError(
                "asr.paraformer_token is empty: set it to a DashScope API key",
                code=ErrorCode.BACKEND_AUTH,
                retryable=False,
                failover=False,
            )

    async def aclose(self) -> None:
        await self.registry.aclose()

    def open(self, options: SessionOptions, listener: StreamListener) -> RecognitionStream:
        return _ParaformerStream(self, options, listener)

    def new_task(self, sock: _Socket, language: str | None = None) -> _Task:
        config = self.config
        hints = language or self.language
        parameters = _Parameters(
            semantic_punctuation_enabled=config.semantic_punctuation_enabled,
            disfluency_removal_enabled=config.disfluency_removal_enabled,
            heartbeat=config.heartbeat,
            language_hints=[hints] if hints else msgspec.UNSET,
            max_sentence_silence=(
                config.max_sentence_silence if config.max_sentence_silence is not None else msgspec.UNSET
            ),
        )
        return _Task(sock, config, parameters, config.model or DEFAULT_MODEL)

    async def _connect(self) -> ClientConnection:
        """Open a socket; refusals become errors that say whether retrying can help, never with the key."""
        headers = {
            "Authorization": f"Bearer {self.config.paraformer_token}",
            "X-DashScope-DataInspection": "enable",
        }
        try:
            async with asyncio.timeout(self.config.connect_timeout_s):
                return await connect(
                    self.url,
                    additional_headers=headers,
                    open_timeout=None,
                    close_timeout=2,
                    compression=None,
                )
        except InvalidStatus as exc:
            raise _refused(exc) from None
        except InvalidURI as exc:
            raise transport_error(exc, f"asr.url {redact_url(self.url)!r} is not a WebSocket URL") from None
        except TimeoutError as exc:
            raise transport_error(exc, "DashScope did not accept the connection in time") from None
        except (OSError, InvalidHandshake) as exc:
            detail = self._redact(str(exc), 300)
            raise transport_error(exc, f"cannot connect to DashScope: {type(exc).__name__}: {detail}") from None


def _refused(exc: InvalidStatus) -> BackendError:
    status = exc.response.status_code
    hint = " (check asr.paraformer_token)" if status in (401, 403) else ""
    return status_error(status, exc.response.headers, f"DashScope refused the connection: HTTP {status}{hint}")
