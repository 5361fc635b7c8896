"""A loopback fake of DashScope's duplex realtime-ASR WebSocket (paraformer, fun-asr).

It speaks the protocol of ``/work/shared/reference/cloud-asr.md`` §2 as the official SDK
sees it: bearer check at the handshake (401), ``run-task`` → ``task-started``, binary audio
only after ``task-started``, ``result-generated`` sentences revealed word by word as audio
arrives, ``finish-task`` → the remaining finals then ``task-finished``, and the socket kept
for the next ``run-task``. A ``task-failed`` is always followed by the server closing.

What it says is scripted (:class:`Script`), when it misbehaves is scripted (:class:`Fault`),
and everything it received is recorded (:attr:`FakeDashScope.connections`,
:attr:`FakeDashScope.tasks`) so that tests assert on the wire, not on our own code.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Literal

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

PATH = "/api-ws/v1/inference"
BYTES_PER_MS = 32  # 16 kHz, s16le, mono

FaultKind = Literal["reject", "fail_run_task", "fail_mid", "drop", "hang", "hang_finish"]


@dataclass
class Script:
    """What the recogniser "hears": sentences revealed one word per ``bytes_per_word`` of audio.

    A sentence ends (``sentence_end: true``) once all its words are out and ``end_after_ms``
    more audio arrived; with ``end_after_ms=None`` sentences end only at ``finish-task``.
    """

    sentences: list[str] = field(default_factory=lambda: ["What time is it?"])
    bytes_per_word: int = 6400
    end_after_ms: int | None = 0
    heartbeat_every: int = 0
    """With ``parameters.heartbeat`` true: a heartbeat sentence after every N audio frames."""


@dataclass
class Fault:
    """A misbehaviour for the next ``times`` connections (``reject``) or tasks (the rest).

    ``reject``: refuse the handshake with ``status``. ``fail_run_task``: ``task-failed`` instead
    of ``task-started``. ``fail_mid``/``drop``: ``task-failed`` / abort the TCP connection once
    the task has ``after_bytes`` of audio. ``hang``: never answer the task; ``hang_finish``:
    never answer its ``finish-task``. ``times=-1``: forever.
    """

    kind: FaultKind
    after_bytes: int = 0
    error_code: str = "InternalError"
    error_message: str = "Internal server error."
    status: int = HTTPStatus.SERVICE_UNAVAILABLE
    times: int = 1


@dataclass
class ConnectionRecord:
    index: int
    path: str
    headers: Headers
    refused: int | None = None
    messages: list[dict[str, Any] | int] = field(default_factory=list)
    """Text messages decoded, binary ones as their length, in arrival order."""
    closed: bool = False


@dataclass
class TaskRecord:
    task_id: str
    connection: int
    run_task: dict[str, Any]
    frames: list[int] = field(default_factory=list)
    audio: bytearray = field(default_factory=bytearray)
    finish_task: dict[str, Any] | None = None
    sent: list[dict[str, Any]] = field(default_factory=list)

    @property
    def parameters(self) -> dict[str, Any]:
        params: dict[str, Any] = self.run_task["payload"]["parameters"]
        return params

    @property
    def events(self) -> list[str]:
        return [e["header"]["event"] for e in self.sent]


class FakeDashScope:
    """``async with FakeDashScope(api_key="sk-test") as fake:`` → ``fake.ws_url``."""

    def __init__(
        self,
        *,
        api_key: str = "sk-test-key",
        script: Script | None = None,
        latency_s: float = 0.0,
        silence_timeout_s: float = 23.0,
        idle_close_s: float = 60.0,
    ) -> None:
        self.api_key = api_key
        self.script = script or Script()
        self.latency_s = latency_s
        """Delay of every server event (events keep their order; audio keeps being read)."""
        self.silence_timeout_s = silence_timeout_s
        self.idle_close_s = idle_close_s
        self.faults: list[Fault] = []
        self.connections: list[ConnectionRecord] = []
        self.tasks: list[TaskRecord] = []
        self.open_connections = 0
        self.max_open_connections = 0
        self._server: Server | None = None
        self._handlers: dict[int, _Connection] = {}
        self._records: dict[ServerConnection, ConnectionRecord] = {}
        self.ws_url = ""

    async def __aenter__(self) -> FakeDashScope:
        self._server = await serve(
            self._handle, "127.0.0.1", 0, process_request=self._process_request, compression=None
        )
        port = self._server.sockets[0].getsockname()[1]
        self.ws_url = f"ws://127.0.0.1:{port}{PATH}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        for handler in list(self._handlers.values()):
            handler.abort()
        self._server.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await self._server.wait_closed()

    # What tests read ------------------------------------------------------------------------

    @property
    def accepted(self) -> list[ConnectionRecord]:
        return [c for c in self.connections if c.refused is None]

    def task(self, index: int = -1) -> TaskRecord:
        return self.tasks[index]

    def drop_all(self) -> None:
        """Abort every open connection, as a network failure would."""
        for handler in list(self._handlers.values()):
            handler.abort()

    def _take_fault(self, kinds: tuple[FaultKind, ...]) -> Fault | None:
        for fault in self.faults:
            if fault.kind in kinds and fault.times != 0:
                if fault.times > 0:
                    fault.times -= 1
                return fault
        return None

    # The server -----------------------------------------------------------------------------

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        record = ConnectionRecord(len(self.connections), request.path, request.headers)
        self.connections.append(record)
        if request.path.rstrip("/") != PATH:
            record.refused = HTTPStatus.NOT_FOUND
            return connection.respond(HTTPStatus.NOT_FOUND, "Not Found\n")
        scheme, _, key = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or key != self.api_key:
            record.refused = HTTPStatus.UNAUTHORIZED
            return connection.respond(HTTPStatus.UNAUTHORIZED, "Unauthorized\n")
        if (fault := self._take_fault(("reject",))) is not None:
            record.refused = fault.status
            return connection.respond(HTTPStatus(fault.status), f"{HTTPStatus(fault.status).phrase}\n")
        self._records[connection] = record
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        record = self._records.pop(ws)
        handler = _Connection(self, ws, record)
        self._handlers[record.index] = handler
        self.open_connections += 1
        self.max_open_connections = max(self.max_open_connections, self.open_connections)
        try:
            await handler.run()
        finally:
            self.open_connections -= 1
            record.closed = True
            del self._handlers[record.index]


@dataclass
class _Task:
    record: TaskRecord
    fault: Fault | None
    started_at: float
    """Loop time at which task-started reaches the client; audio before it is an error."""
    heartbeat: bool
    last_audio: float
    sentence: int = 0
    sentence_start: int = 0
    revealed: int = 0
    finishing: bool = False
    frames_since_heartbeat: int = 0


class _Connection:
    """One client socket: at most one task at a time, events sent in order by one writer."""

    def __init__(self, fake: FakeDashScope, ws: ServerConnection, record: ConnectionRecord) -> None:
        self.fake = fake
        self.ws = ws
        self.record = record
        self.task: _Task | None = None
        self.hung = False
        self.outbox: asyncio.Queue[tuple[float, dict[str, Any] | None]] = asyncio.Queue()
        self.loop = asyncio.get_running_loop()

    def abort(self) -> None:
        self.ws.transport.abort()

    async def run(self) -> None:
        writer = asyncio.create_task(self._write())
        try:
            while True:
                try:
                    async with asyncio.timeout(self._timeout()):
                        message = await self.ws.recv()
                except TimeoutError:
                    if self.task is not None:
                        seconds = f"{self.fake.silence_timeout_s:g}"
                        self._fail("CLIENT_ERROR", f"request timeout after {seconds} seconds.")
                    else:
                        self.outbox.put_nowait((self.loop.time(), None))
                    await writer
                    return
                if isinstance(message, bytes):
                    self.record.messages.append(len(message))
                    self._on_audio(message)
                else:
                    try:
                        decoded = json.loads(message)
                    except ValueError:
                        decoded = {"unparsed": message}
                    self.record.messages.append(decoded)
                    self._on_text(decoded)
        except ConnectionClosed:
            pass
        finally:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer

    def _timeout(self) -> float | None:
        if self.hung:
            return None
        if self.task is None:
            return self.fake.idle_close_s
        if self.task.finishing:
            return None
        return max(0.0, self.task.last_audio + self.fake.silence_timeout_s - self.loop.time())

    async def _write(self) -> None:
        while True:
            due, event = await self.outbox.get()
            if (delay := due - self.loop.time()) > 0:
                await asyncio.sleep(delay)
            if event is None:
                await self.ws.close()
                return
            try:
                await self.ws.send(json.dumps(event, ensure_ascii=False))
            except ConnectionClosed:
                return

    def _emit(self, event: dict[str, Any]) -> None:
        if self.task is not None and self.task.record.task_id == event["header"]["task_id"]:
            self.task.record.sent.append(event)
        self.outbox.put_nowait((self.loop.time() + self.fake.latency_s, event))

    def _fail(self, code: str, message: str, task_id: str | None = None) -> None:
        """``task-failed``, then the server closes the connection."""
        if task_id is None:
            task_id = self.task.record.task_id if self.task else ""
        self._emit(
            {
                "header": {
                    "task_id": task_id,
                    "event": "task-failed",
                    "error_code": code,
                    "error_message": message,
                    "attributes": {},
                },
                "payload": {},
            }
        )
        self.task = None
        self.hung = True  # nothing more is answered; the close follows
        self.outbox.put_nowait((self.loop.time() + self.fake.latency_s, None))

    # Client messages --------------------------------------------------------------------------

    def _on_text(self, message: dict[str, Any]) -> None:
        if self.hung:
            return
        header = message.get("header") if isinstance(message.get("header"), dict) else {}
        assert isinstance(header, dict)
        action, task_id = header.get("action"), header.get("task_id")
        if action == "run-task":
            self._run_task(message, header)
        elif action == "finish-task":
            if self.task is None or task_id != self.task.record.task_id:
                self._fail("InvalidParameter", f"finish-task for unknown task {task_id!r}.", task_id or "")
                return
            self.task.record.finish_task = message
            self._finish()
        elif action == "continue-task":
            return  # context updates of newer models; paraformer ignores them
        else:
            self._fail("InvalidParameter", f"unsupported action {action!r}.", task_id or "")

    def _run_task(self, message: dict[str, Any], header: dict[str, Any]) -> None:
        task_id = header.get("task_id")
        if not isinstance(task_id, str) or not task_id:
            self._fail("InvalidParameter", "header.task_id is required.", "")
            return
        if self.task is not None:
            self._fail("InvalidParameter", f"task {self.task.record.task_id} is still running.", task_id)
            return
        record = TaskRecord(task_id, self.record.index, message)
        self.fake.tasks.append(record)
        if problem := _run_task_problem(message, header):
            self.task = _Task(record, None, self.loop.time(), False, self.loop.time())
            self._fail("InvalidParameter", problem)
            return
        fault = self.fake._take_fault(("fail_run_task", "fail_mid", "drop", "hang", "hang_finish"))
        now = self.loop.time()
        heartbeat = bool(message["payload"]["parameters"].get("heartbeat"))
        self.task = _Task(record, fault, now + self.fake.latency_s, heartbeat, now)
        if fault is not None and fault.kind == "fail_run_task":
            self._fail(fault.error_code, fault.error_message)
            return
        if fault is not None and fault.kind == "hang":
            self.hung = True
            return
        self._emit({"header": {"task_id": task_id, "event": "task-started", "attributes": {}}, "payload": {}})

    def _on_audio(self, data: bytes) -> None:
        if self.hung:
            return
        task = self.task
        if task is None or self.loop.time() < task.started_at:
            self._fail("InvalidParameter", "audio received before task-started.")
            return
        if task.finishing:
            self._fail("InvalidParameter", "audio received after finish-task.")
            return
        task.record.frames.append(len(data))
        task.record.audio += data
        task.last_audio = self.loop.time()
        fault = task.fault
        if fault is not None and len(task.record.audio) >= fault.after_bytes:
            if fault.kind == "drop":
                self.hung = True
                self.abort()
                return
            if fault.kind == "fail_mid":
                self._fail(fault.error_code, fault.error_message)
                return
        self._heartbeat(task)
        self._progress(task)

    def _finish(self) -> None:
        task = self.task
        assert task is not None
        task.finishing = True
        if task.fault is not None and task.fault.kind == "hang_finish":
            self.hung = True
            return
        self._progress(task)
        sentences = self.fake.script.sentences
        if task.record.audio:
            for index in range(task.sentence, len(sentences)):
                words = sentences[index].split()
                if words:
                    self._sentence(task, words, len(words), end=True)
                task.sentence_start = len(task.record.audio)
        self._emit(
            {
                "header": {"task_id": task.record.task_id, "event": "task-finished", "attributes": {}},
                "payload": {"output": {}, "usage": None},
            }
        )
        self.task = None

    # Recognition ------------------------------------------------------------------------------

    def _progress(self, task: _Task) -> None:
        """Reveal words for the audio heard so far; end sentences after their trailing audio."""
        script = self.fake.script
        per_word = max(1, script.bytes_per_word)
        while task.sentence < len(script.sentences):
            words = script.sentences[task.sentence].split()
            heard = len(task.record.audio) - task.sentence_start
            count = min(len(words), heard // per_word)
            if count > task.revealed:
                task.revealed = count
                self._sentence(task, words, count, end=False)
            if script.end_after_ms is None or count < len(words):
                return
            needed = len(words) * per_word + script.end_after_ms * BYTES_PER_MS
            if heard < needed:
                return
            self._sentence(task, words, len(words), end=True)
            task.sentence += 1
            task.sentence_start += needed
            task.revealed = 0

    def _sentence(self, task: _Task, words: list[str], count: int, *, end: bool) -> None:
        per_word_ms = max(1, self.fake.script.bytes_per_word) // BYTES_PER_MS
        begin_ms = task.sentence_start // BYTES_PER_MS
        heard_ms = len(task.record.audio) // BYTES_PER_MS
        word_list = []
        for i, word in enumerate(words[:count]):
            text = word.rstrip(".,!?;:。，！？")
            start = begin_ms + i * per_word_ms
            word_list.append(
                {"begin_time": start, "end_time": start + per_word_ms, "text": text, "punctuation": word[len(text) :]}
            )
        sentence = {
            "begin_time": begin_ms,
            "end_time": heard_ms if end else None,
            "text": " ".join(words[:count]),
            "heartbeat": False,
            "sentence_end": end,
            "words": word_list,
        }
        usage = {"duration": max(1, math.ceil(heard_ms / 1000))} if end else None
        self._emit(
            {
                "header": {"task_id": task.record.task_id, "event": "result-generated", "attributes": {}},
                "payload": {"output": {"sentence": sentence}, "usage": usage},
            }
        )

    def _heartbeat(self, task: _Task) -> None:
        every = self.fake.script.heartbeat_every
        if not task.heartbeat or every <= 0:
            return
        task.frames_since_heartbeat += 1
        if task.frames_since_heartbeat < every:
            return
        task.frames_since_heartbeat = 0
        heard_ms = len(task.record.audio) // BYTES_PER_MS
        sentence: dict[str, Any] = {
            "begin_time": heard_ms,
            "end_time": None,
            "text": "",
            "heartbeat": True,
            "sentence_end": False,
            "words": [],
        }
        self._emit(
            {
                "header": {"task_id": task.record.task_id, "event": "result-generated", "attributes": {}},
                "payload": {"output": {"sentence": sentence}, "usage": None},
            }
        )


def _run_task_problem(message: dict[str, Any], header: dict[str, Any]) -> str | None:
    """What DashScope would reject in a run-task (fields the paraformer API requires)."""
    if header.get("streaming") != "duplex":
        return "header.streaming must be 'duplex'."
    payload = message.get("payload")
    if not isinstance(payload, dict):
        return "payload is required."
    for key, value in (("task_group", "audio"), ("task", "asr"), ("function", "recognition")):
        if payload.get(key) != value:
            return f"payload.{key} must be {value!r}."
    if not isinstance(payload.get("model"), str) or not payload["model"]:
        return "payload.model is required."
    if not isinstance(payload.get("input"), dict):
        return "payload.input is required."
    parameters = payload.get("parameters")
    if not isinstance(parameters, dict):
        return "payload.parameters is required."
    if not isinstance(parameters.get("format"), str):
        return "parameters.format is required."
    if not isinstance(parameters.get("sample_rate"), int):
        return "parameters.sample_rate is required."
    return None
