"""The final of one turn: speculation during the hangover, the batch VAD check, the backend's answer.

Everything from the end of the turn to the final (decoder wait, batch VAD check, speculation,
backend, retries) runs under one deadline, ``final_timeout_s``, and is raced against the session's
cancel: a cancelled turn publishes nothing and a hung backend cannot hold the device past it.
The device is told what failed in plain words; the backend's detail (its address, request id,
server text) stays in the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable
from typing import Any

import numpy as np
from structlog.typing import FilteringBoundLogger

from firmware_protocol import SAMPLES_PER_MS, EndReason, Error, ErrorCode, Transcript
from service.endpointing.endpointer import TurnEnd
from service.recognition import BackendError, Recognition, RecognitionStream
from service.session.services import SessionServices

DEVICE_MESSAGES = {
    ErrorCode.BACKEND_UNAVAILABLE: "the speech backend is unavailable",
    ErrorCode.BACKEND_TIMEOUT: "the speech backend did not answer in time",
    ErrorCode.BACKEND_RATE_LIMITED: "the speech backend is rate-limiting the bridge",
    ErrorCode.BACKEND_AUTH: "the speech backend refused the bridge's credentials",
    ErrorCode.BACKEND_REJECTED: "the speech backend refused this audio",
    ErrorCode.BACKEND_ERROR: "the speech backend failed",
}
"""What a device is told of a failed recognition, by code: no backend address, request id or server text."""


RELEASE_S = 2.0
"""How long cancelling a recognition (or closing a VAD scorer) may take before the session moves on without it."""


async def release(closing: Awaitable[None]) -> None:
    """Cancel a stream (or close a scorer), bounded: a backend that hangs on cancel cannot keep a session alive."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(RELEASE_S):
            await closing


class FinalRecogniser:
    """Turns a session's recognition stream into the turn's final (or an error, or nothing when cancelled)."""

    def __init__(
        self, services: SessionServices, session_id: int, cancelled: asyncio.Event, log: FilteringBoundLogger
    ) -> None:
        self._services = services
        self._session_id = session_id
        self._cancelled = cancelled
        self._log = log
        self._speculation: asyncio.Task[Recognition] | None = None

    # Speculation: recognise what was said so far while the hangover runs -----------------------

    def speculate(self, stream: RecognitionStream) -> None:
        """Speech paused: start recognising the audio up to here."""
        self.drop_speculation()
        self._speculation = stream.speculate()

    def drop_speculation(self) -> str:
        """Speech resumed: the speculation is stale; the text it already has (else ``""``) is a partial."""
        speculation, self._speculation = self._speculation, None
        if speculation is None:
            return ""
        if speculation.done() and not speculation.cancelled() and speculation.exception() is None:
            return speculation.result().text
        speculation.cancel()
        return ""

    def cancel(self) -> None:
        if self._speculation is not None:
            self._speculation.cancel()

    # The final ------------------------------------------------------------------------------

    async def conclude(
        self, stream: RecognitionStream | None, end: TurnEnd, started_ms: int | None, heard: list[np.ndarray]
    ) -> Transcript | Error | None:
        """The backend's final, an empty one when nobody spoke, its error, or ``None`` when cancelled meanwhile.

        ``heard`` is the turn's audio for the legacy ``vad_url`` check (empty when it does not apply).
        """
        ended_at = time.monotonic()
        timeout_s = self._services.final_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                result = await self._recognise(stream, end, started_ms, heard, ended_at)
        except TimeoutError:
            self._log.warning("session.final_deadline", deadline_s=timeout_s)
            return self.error(ErrorCode.BACKEND_UNAVAILABLE, f"no final within {timeout_s:g} s of the end of the turn")
        except BackendError as exc:
            self._log.warning("session.backend_failed", code=exc.code.value, retryable=exc.retryable, error=str(exc))
            return self.error(exc.code, DEVICE_MESSAGES.get(exc.code, DEVICE_MESSAGES[ErrorCode.BACKEND_ERROR]), exc)
        if result is None:
            return None
        latency_ms = round((time.monotonic() - ended_at) * 1000)
        self._log.info("session.final", chars=len(result.text), latency_ms=latency_ms, reason=end.reason.value)
        return Transcript(
            session=self._session_id,
            final=True,
            text=result.text,
            backend=result.backend or self._services.backend.name,
            start_ms=started_ms or 0,
            end_ms=end.offset_ms,
            language=result.language,
            latency_ms=latency_ms,
            reason=result.reason,
        )

    def error(self, code: ErrorCode, message: str, cause: BackendError | None = None) -> Error:
        """The error the device gets for this session: retryable unless the backend said otherwise."""
        retryable = True if cause is None else cause.retryable
        return Error(code=code, message=message, retryable=retryable, session=self._session_id)

    async def _recognise(
        self,
        stream: RecognitionStream | None,
        end: TurnEnd,
        started_ms: int | None,
        heard: list[np.ndarray],
        ended_at: float,
    ) -> Recognition | None:
        if stream is None or end.reason is EndReason.NO_SPEECH or started_ms is None:
            if stream is not None:
                await release(stream.cancel())
            return Recognition("", reason=EndReason.NO_SPEECH)
        if not await self._batch_check_hears_speech(end, heard):
            await release(stream.cancel())
            return Recognition("", reason=EndReason.NO_SPEECH)
        result = await self._final(stream, end)
        if result is not None and self._services.metrics is not None:  # a backend's answer, not "nobody spoke"
            self._services.metrics.final_latency.observe(time.monotonic() - ended_at)
        return result

    async def _batch_check_hears_speech(self, end: TurnEnd, heard: list[np.ndarray]) -> bool:
        """EchoKit's legacy ``vad_url`` check of a turn the device ended; only silence it is sure of skips the ASR."""
        check = self._services.engines.batch_check
        if check is None or end.reason is EndReason.BACKEND or not heard:
            return True
        audio = np.concatenate(heard)
        heard.clear()
        speech = await check.has_speech(audio)
        if not speech:
            self._log.info("session.batch_vad_no_speech", url=check.url, ms=len(audio) // SAMPLES_PER_MS)
        return speech

    async def _final(self, stream: RecognitionStream, end: TurnEnd) -> Recognition | None:
        """The committed speculation if there is one (falling back to ``finish``), else ``finish``."""
        speculation, self._speculation = self._speculation, None
        if speculation is not None and end.reason is EndReason.SILENCE:
            try:
                return await self._race(speculation, stream)
            except BackendError as exc:
                if not exc.retryable and not exc.failover:
                    raise  # the same request again would be refused the same way
                self._log.info("session.speculation_failed", code=exc.code.value)
        elif speculation is not None:
            speculation.cancel()
        return await self._race(asyncio.ensure_future(stream.finish()), stream)

    async def _race(self, work: asyncio.Future[Recognition], stream: RecognitionStream) -> Recognition | None:
        """``work``'s result, unless the session is cancelled meanwhile (then ``None``); the caller bounds it."""
        cancelled: asyncio.Future[Any] = asyncio.ensure_future(self._cancelled.wait())
        try:
            done, _ = await asyncio.wait({work, cancelled}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            cancelled.cancel()
            if not work.done():
                work.cancel()
                work.add_done_callback(_retrieved)
                await asyncio.wait({work}, timeout=RELEASE_S)  # a request that ignores cancel is left behind
                await release(stream.cancel())
        if work not in done:
            return None
        return work.result()


def _retrieved(work: asyncio.Future[Recognition]) -> None:
    """An abandoned request's outcome is read, so asyncio does not print "exception was never retrieved"."""
    if not work.cancelled():
        work.exception()
