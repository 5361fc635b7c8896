"""A loopback fake of EchoKit's silero_vad_server (0.2.0), built from its documented API.

/work/shared/reference/echokit.md §5:

- ``POST /v1/audio/vad``: multipart, part ``audio`` = a WAV. Always HTTP 200, with
  ``{"timestamps":[{"start":int,"end":int},…]}`` (16 kHz samples) or ``{"error":"No audio provided"}``
  / ``{"error":"VAD processing error"}``.
- WebSocket ``/v1/audio/realtime_vad``: binary PCM s16le 16 kHz mono in, text ``"reset"`` clears
  the state; out ``{"event":"speech_start"}`` / ``{"event":"speech_end"}``, or
  ``{"error":"VAD processing error","message":"…"}`` and then the server closes.

Instead of Silero, a plain energy detector over 512-sample windows: RMS above ``rms_threshold``
is voiced; ``start_windows`` voiced windows in a row start speech, ``end_windows`` unvoiced ones
end it. Scripted faults: ``error_after_bytes`` (send the error, then close, once that much audio
has arrived), ``refuse`` (reject the WebSocket handshake), ``batch_error`` (answer the batch API
with the processing error). Everything received is recorded.
"""

from __future__ import annotations

import io
import json
import wave
from dataclasses import dataclass, field
from types import TracebackType

import numpy as np
from aiohttp import WSMsgType, web

from tests.fakes._loopback import serve

REALTIME_PATH = "/v1/audio/realtime_vad"
BATCH_PATH = "/v1/audio/vad"
WINDOW = 512


@dataclass
class EnergyDetector:
    rms_threshold: float = 1000.0
    start_windows: int = 2
    end_windows: int = 8
    speaking: bool = False
    _run: int = 0
    _pending: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int16))

    def reset(self) -> None:
        self.speaking, self._run, self._pending = False, 0, np.zeros(0, dtype=np.int16)

    def feed(self, pcm: np.ndarray) -> list[str]:
        """Events (``speech_start`` / ``speech_end``) for the whole windows now available."""
        audio = np.concatenate([self._pending, pcm])
        events: list[str] = []
        whole = len(audio) // WINDOW * WINDOW
        for start in range(0, whole, WINDOW):
            window = audio[start : start + WINDOW].astype(np.float64)
            voiced = float(np.sqrt(np.mean(window**2))) > self.rms_threshold
            if voiced != self.speaking:
                self._run += 1
                if self._run >= (self.start_windows if voiced else self.end_windows):
                    self.speaking, self._run = voiced, 0
                    events.append("speech_start" if voiced else "speech_end")
            else:
                self._run = 0
        self._pending = audio[whole:]
        return events

    def timestamps(self, pcm: np.ndarray) -> list[dict[str, int]]:
        self.reset()
        spans: list[dict[str, int]] = []
        start = 0
        for i in range(0, len(pcm) // WINDOW * WINDOW, WINDOW):
            for event in self.feed(pcm[i : i + WINDOW]):
                if event == "speech_start":
                    start = max(0, i - (self.start_windows - 1) * WINDOW)
                else:
                    spans.append({"start": start, "end": i})
        if self.speaking:
            spans.append({"start": start, "end": len(pcm)})
        self.reset()
        return spans


class FakeSileroVadServer:
    """``async with FakeSileroVadServer() as server:`` → ``server.realtime_url`` / ``server.batch_url``."""

    def __init__(self, *, rms_threshold: float = 1000.0) -> None:
        self.rms_threshold = rms_threshold
        self.refuse = False
        self.error_after_bytes: int | None = None
        self.batch_error = False
        self.connections = 0
        self.received_frames: list[int] = []
        """Byte length of every binary frame received on the realtime socket."""
        self.events_sent: list[str] = []
        self.batch_requests = 0
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def realtime_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}{REALTIME_PATH}"

    @property
    def batch_url(self) -> str:
        return f"http://127.0.0.1:{self.port}{BATCH_PATH}"

    async def __aenter__(self) -> FakeSileroVadServer:
        app = web.Application(client_max_size=10 * 1024 * 1024)
        app.router.add_get(REALTIME_PATH, self._realtime)
        app.router.add_post(BATCH_PATH, self._batch)
        self._runner, self.port = await serve(app, self.port)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def stop(self) -> None:
        """A dead server: later connections are refused (the port is closed)."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _realtime(self, request: web.Request) -> web.StreamResponse:
        if self.refuse:
            return web.Response(status=503, text="refused")
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.connections += 1
        detector = EnergyDetector(self.rms_threshold)
        received = 0
        async for message in ws:
            if message.type is WSMsgType.TEXT:
                if message.data == "reset":
                    detector.reset()
                continue
            if message.type is not WSMsgType.BINARY:
                break
            data: bytes = message.data
            self.received_frames.append(len(data))
            received += len(data)
            if len(data) < 1024 or (self.error_after_bytes is not None and received >= self.error_after_bytes):
                # The real server's handler can crash on frames under 1024 bytes; either way it reports and closes.
                await ws.send_str(json.dumps({"error": "VAD processing error", "message": "scripted fault"}))
                await ws.close()
                break
            for event in detector.feed(np.frombuffer(data[: len(data) // 2 * 2], dtype="<i2")):
                self.events_sent.append(event)
                await ws.send_str(json.dumps({"event": event}))
        return ws

    async def _batch(self, request: web.Request) -> web.Response:
        self.batch_requests += 1
        audio: bytes | None = None
        if request.content_type.startswith("multipart/"):
            reader = await request.multipart()
            async for part in reader:
                if getattr(part, "name", None) == "audio":
                    audio = await part.read()  # type: ignore[union-attr]
        if not audio:
            return web.json_response({"error": "No audio provided"})
        if self.batch_error:
            return web.json_response({"error": "VAD processing error"})
        try:
            with wave.open(io.BytesIO(audio), "rb") as wav:
                channels, width = wav.getnchannels(), wav.getsampwidth()
                frames = wav.readframes(wav.getnframes())
        except (wave.Error, EOFError):
            return web.json_response({"error": "VAD processing error"})
        if width != 2:
            return web.json_response({"error": "VAD processing error"})
        pcm = np.frombuffer(frames, dtype="<i2").reshape(-1, channels).mean(axis=1).astype(np.int16)
        return web.json_response({"timestamps": EnergyDetector(self.rms_threshold).timestamps(pcm)})
