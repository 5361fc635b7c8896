"""VAD engines: what turns each 512-sample window into the speech probability the endpointer reads.

The turn rules (:class:`service.endpointing.silero.Endpointer`, EchoKit's) are the same whatever the engine;
a session asks its :class:`VadScorer` for one probability per window and nothing else:

- ``silero``: Silero in process, batched across streams (off the loop) by
  :class:`~service.endpointing.silero.VadBatcher`.
- ``webrtc``: WebRTC's VAD (``webrtcvad``), inline: microseconds per window. The probability is
  the fraction of the 10 ms frames in the window it judged speech; its aggressiveness
  (``webrtc_mode``) is per device, like the engine.
- ``webrtc+silero``: WebRTC as a gate in front of Silero. A window in which WebRTC hears no speech
  at all scores 0 without a Silero call; the others go to Silero.
- ``remote``: EchoKit's silero_vad_server over its realtime WebSocket: ``speech_start`` /
  ``speech_end`` events become 1.0 / 0.0 per window. Any failure falls back to local Silero for
  the rest of the session (EchoKit's rule: a VAD error never blocks a turn).

And EchoKit's legacy batch check (``asr.vad_url``): :class:`BatchVadCheck` asks silero_vad_server
whether a device-ended turn held any speech before the recogniser is called.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
import numpy as np
import structlog
import webrtcvad
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from firmware_protocol import SAMPLE_RATE, VadEngine
from service.config import AsrConfig
from service.endpointing.silero import _CONTEXT, SileroState, VadBatcher
from service.recognition import BackendError
from service.recognition.http import status_error, transport_error
from service.redact import Redactor, redact_url, url_secrets
from service.wav import wav_bytes

log = structlog.get_logger(__name__)

WEBRTC_FRAME = 160  # samples: 10 ms, one of the frame sizes WebRTC's VAD accepts at 16 kHz


@dataclass(slots=True)
class VadCounts:
    """What the engines did since start: plain ints the scorers bump on the event loop, read by metrics.

    A window counts once, under the engine that scored it: a ``remote`` session that fell back
    counts under ``silero`` from then on, and the Silero calls behind the WebRTC gate are not
    counted again (:attr:`VadBatcher.windows <service.endpointing.silero.VadBatcher.windows>` has every Silero window).
    """

    silero: int = 0
    webrtc: int = 0
    webrtc_silero: int = 0
    remote: int = 0
    gate_skipped: int = 0
    """``webrtc+silero`` windows WebRTC heard no speech in: scored 0 without a Silero call."""
    remote_fallbacks: int = 0
    """``remote`` sessions switched to local Silero (refused, an error message, a closed socket)."""

    def windows(self) -> dict[VadEngine, int]:
        return {
            VadEngine.SILERO: self.silero,
            VadEngine.WEBRTC: self.webrtc,
            VadEngine.WEBRTC_SILERO: self.webrtc_silero,
            VadEngine.REMOTE: self.remote,
        }


class VadScorer(Protocol):
    """One session's engine: a speech probability per 512-sample int16 window, in order."""

    async def score(self, window: np.ndarray) -> float: ...

    async def aclose(self) -> None: ...


class SileroScorer:
    """Silero through the shared batcher; this stream's recurrent state lives here.

    ``counts`` is ``None`` behind the WebRTC gate, which counts its windows itself.
    """

    def __init__(self, batcher: VadBatcher, counts: VadCounts | None = None) -> None:
        self._batcher = batcher
        self._counts = counts
        self.state = SileroState()

    async def score(self, window: np.ndarray) -> float:
        if self._counts is not None:
            self._counts.silero += 1
        return await self._batcher.score(self.state, window.astype(np.float32) / 32768.0)

    def restart(self, context: np.ndarray) -> None:
        """Fresh recurrent state, with ``context`` (the audio just before the next window) as the 64-sample context."""
        self.state = SileroState()
        self.state.context = context[-_CONTEXT:].astype(np.float32) / 32768.0

    async def aclose(self) -> None:
        return None


class WebrtcScorer:
    """Fraction of the 10 ms frames WebRTC's VAD judges speech; samples past the last whole frame carry over.

    Windows are counted by :meth:`score` only: as the gate, it is called through :meth:`score_now`.
    """

    def __init__(self, mode: int, counts: VadCounts | None = None) -> None:
        self.mode = mode
        self._vad = webrtcvad.Vad(mode)
        self._counts = counts
        self._carry = np.zeros(0, dtype=np.int16)

    def score_now(self, window: np.ndarray) -> float:
        audio = np.concatenate([self._carry, window]) if len(self._carry) else window
        frames = len(audio) // WEBRTC_FRAME
        data = audio[: frames * WEBRTC_FRAME].astype("<i2").tobytes()
        self._carry = audio[frames * WEBRTC_FRAME :].copy()
        if frames == 0:
            return 0.0
        step = WEBRTC_FRAME * 2
        voiced = sum(bool(self._vad.is_speech(data[i : i + step], SAMPLE_RATE)) for i in range(0, len(data), step))
        return voiced / frames

    async def score(self, window: np.ndarray) -> float:
        if self._counts is not None:
            self._counts.webrtc += 1
        return self.score_now(window)

    async def aclose(self) -> None:
        return None


class GatedScorer:
    """WebRTC gates Silero: a window with no WebRTC speech frame scores 0 and costs no Silero call.

    Silero's recurrent state is not advanced through gated windows, so when a gated run ends the
    state would describe audio from before the gap. It is reset instead (as at the start of a
    stream, which is what Silero is tuned for), with the last 64 samples of the gated audio as
    context so the next window continues the real signal.
    """

    def __init__(self, gate: WebrtcScorer, silero: SileroScorer, counts: VadCounts) -> None:
        self.gate = gate
        self._silero = silero
        self._counts = counts
        self._gated: np.ndarray | None = None

    async def score(self, window: np.ndarray) -> float:
        self._counts.webrtc_silero += 1
        if self.gate.score_now(window) == 0.0:
            self._gated = window
            self._counts.gate_skipped += 1
            return 0.0
        if self._gated is not None:
            self._silero.restart(self._gated)
            self._gated = None
        return await self._silero.score(window)

    async def aclose(self) -> None:
        return None


class RemoteScorer:
    """silero_vad_server's ``/v1/audio/realtime_vad``: one socket per session, events → probabilities.

    Windows go out as binary PCM s16le (512 samples = 1024 bytes, the least the server handles).
    Events come back asynchronously, so each window is scored with the latest state: 1.0 after
    ``speech_start``, 0.0 after ``speech_end`` (and before any event). A refused connection, an
    ``{"error": ...}`` message or a closed socket switches the session to local Silero, whose
    windows the fallback counts under ``silero``.
    """

    def __init__(
        self,
        url: str,
        fallback: SileroScorer,
        *,
        connect_timeout_s: float,
        counts: VadCounts,
        device: str = "",
    ) -> None:
        self._url = url
        self._fallback = fallback
        self._counts = counts
        self._connect_timeout_s = connect_timeout_s
        self._log = log.bind(device=device) if device else log
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._speaking = False
        self._closing = False
        self.failed: str | None = None
        """Why the session fell back to Silero, or ``None`` while the server serves it."""

    async def score(self, window: np.ndarray) -> float:
        if self.failed is None:
            try:
                if self._ws is None:
                    self._ws = await connect(
                        self._url, open_timeout=self._connect_timeout_s, compression=None, max_size=2**16
                    )
                    self._reader = asyncio.create_task(self._read(self._ws))
                await self._ws.send(window.astype("<i2").tobytes())
            except (OSError, TimeoutError, InvalidHandshake, InvalidURI, ConnectionClosed) as exc:
                self._fail(f"{type(exc).__name__}: {exc}")
        if self.failed is not None:
            return await self._fallback.score(window)
        self._counts.remote += 1
        return 1.0 if self._speaking else 0.0

    async def _read(self, ws: ClientConnection) -> None:
        try:
            async for message in ws:
                if isinstance(message, bytes):
                    continue
                try:
                    body: Any = json.loads(message)
                except ValueError:
                    continue
                if not isinstance(body, dict):
                    continue
                if "error" in body:
                    self._fail(f"{body.get('error')}: {body.get('message', '')}")
                    return
                event = body.get("event")
                if event == "speech_start":
                    self._speaking = True
                elif event == "speech_end":
                    self._speaking = False
        except ConnectionClosed as exc:
            if not self._closing:
                self._fail(f"connection closed: {exc}")
            return
        if not self._closing:
            self._fail("the server closed the connection")

    def _fail(self, reason: str) -> None:
        if self.failed is not None or self._closing:
            return
        reason = Redactor(*url_secrets(self._url))(reason, 200)  # e.g. InvalidURI quotes the whole URL
        self.failed = reason
        self._speaking = False
        self._counts.remote_fallbacks += 1
        self._log.warning("vad.remote_failed", url=redact_url(self._url), reason=reason, fallback="silero")

    async def aclose(self) -> None:
        self._closing = True
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._ws is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1):
                    await self._ws.close()


class BatchVadCheck:
    """EchoKit's legacy ``vad_url``: POST the turn's WAV (part ``audio``), empty ``timestamps`` = nobody spoke.

    Anything but a list of timestamps (an ``error`` body, a timeout, a dead server) counts as
    speech: the check can skip a recogniser call, never lose a turn. A failed request is still
    classified as the recognisers' are (:mod:`service.recognition.http`), so its log line says the same.
    """

    def __init__(self, url: str, *, timeout_s: float, connect_timeout_s: float) -> None:
        self._url = url
        self.url = redact_url(url)
        """For logs (the session's too): the URL with its secrets masked; requests use the real one."""
        self._timeout = httpx.Timeout(timeout_s, connect=connect_timeout_s)
        self._client: httpx.AsyncClient | None = None

    async def has_speech(self, pcm: np.ndarray) -> bool:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self._timeout)
        try:
            response = await self._client.post(self._url, files={"audio": ("audio.wav", wav_bytes(pcm))})
        except httpx.HTTPError as exc:
            self._failed(transport_error(exc, f"{type(exc).__name__}: {exc}"))
            return True
        if not response.is_success:
            self._failed(status_error(response.status_code, response.headers, f"HTTP {response.status_code}"))
            return True
        try:
            body: Any = response.json()
        except ValueError as exc:
            body = f"{type(exc).__name__}: {exc}"
        timestamps = body.get("timestamps") if isinstance(body, dict) else None
        if not isinstance(timestamps, list):
            log.warning("vad.batch_check_failed", url=self.url, reason=str(body)[:200])
            return True
        return bool(timestamps)

    def _failed(self, error: BackendError) -> None:
        log.warning(
            "vad.batch_check_failed",
            url=self.url,
            code=error.code.value,
            retryable=error.retryable,
            failover=error.failover,
            reason=Redactor(*url_secrets(self._url))(str(error), 200),
        )

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


class VadEngines:
    """Builds each session's scorer from its tuning; holds what the engines share (the Silero batcher, the counts)."""

    def __init__(
        self,
        batcher: VadBatcher,
        *,
        webrtc_mode: int = 3,
        realtime_url: str = "",
        batch_url: str = "",
        connect_timeout_s: float = 3.0,
        timeout_s: float = 10.0,
    ) -> None:
        self.batcher = batcher
        self.webrtc_mode = webrtc_mode
        """``asr.vad.webrtc_mode``: for scorers built without a session's tuning (benchmarks)."""
        self.counts = VadCounts()
        self.realtime_url = realtime_url
        self.connect_timeout_s = connect_timeout_s
        self.batch_check = (
            BatchVadCheck(batch_url, timeout_s=timeout_s, connect_timeout_s=connect_timeout_s) if batch_url else None
        )

    @classmethod
    def from_config(cls, batcher: VadBatcher, asr: AsrConfig) -> VadEngines:
        return cls(
            batcher,
            webrtc_mode=asr.vad.webrtc_mode,
            realtime_url=asr.vad_realtime_url,
            batch_url=asr.vad_url,
            connect_timeout_s=asr.backend.connect_timeout_s,
            timeout_s=asr.backend.timeout_s,
        )

    def scorer(self, engine: VadEngine, device: str = "", *, webrtc_mode: int | None = None) -> VadScorer:
        """A session's scorer; ``webrtc_mode`` is the session's (per-device tuning), else the config's."""
        counts = self.counts
        mode = self.webrtc_mode if webrtc_mode is None else webrtc_mode
        if engine is VadEngine.WEBRTC:
            return WebrtcScorer(mode, counts)
        if engine is VadEngine.WEBRTC_SILERO:
            return GatedScorer(WebrtcScorer(mode), SileroScorer(self.batcher), counts)
        if engine is VadEngine.REMOTE and self.realtime_url:
            return RemoteScorer(
                self.realtime_url,
                SileroScorer(self.batcher, counts),
                connect_timeout_s=self.connect_timeout_s,
                device=device,
                counts=counts,
            )
        return SileroScorer(self.batcher, counts)

    async def aclose(self) -> None:
        if self.batch_check is not None:
            await self.batch_check.aclose()
