"""Routes device messages: topic and device id checked, payload checked, frames to sessions, control acted on.

Everything here runs synchronously in the MQTT dispatch callback, so a device's frames
are handled in arrival order and no frame waits on another device's work. Bad input is
counted by code and answered with a rate-limited ``error``; it creates no device state.
"""

from __future__ import annotations

import time

import structlog

from firmware_protocol import (
    SAMPLE_RATE,
    AudioFrame,
    Cancel,
    Codec,
    Configure,
    EndReason,
    ErrorCode,
    ProtocolError,
    Start,
    TopicKind,
    Topics,
    decode_device_message,
    is_valid_device_id,
)
from service.config import Config
from service.endpointing.tuning import DeviceTuning, TuningRejected
from service.ingest.devices import DeviceRegistry, DeviceState, FleetStats
from service.ingest.launcher import SessionLauncher
from service.ingest.limits import ERROR_INTERVAL_S, ErrorCounts
from service.ingest.reassembly import Arrival, FrameStats, GapTooLarge
from service.session.services import SessionServices
from service.tasks import TaskSet

log = structlog.get_logger(__name__)

MAX_CONTROL_BYTES = 4096
ABORT_GRACE_S = 3.0
"""After the drain: how long the sessions it ended (their error already queued) have to release their backend."""


class MessageRouter:
    """The ingest stage as the bridge sees it: ``handle`` each message, ``run`` the housekeeping, ``drain``."""

    def __init__(self, config: Config, topics: Topics, services: SessionServices) -> None:
        self._topics = topics
        self._publisher = services.publisher
        self._max_frame_bytes = config.session.max_frame_bytes
        self.stats = FleetStats()
        self._tasks = TaskSet("ingest")
        """The sessions' tasks, drained together (errors and ``configured`` go straight to the link's queue)."""
        self._running = services.running
        self._tuning = DeviceTuning(config)
        self._registry = DeviceRegistry(config, services.publisher, self.stats)
        self._launcher = SessionLauncher(config, services, self._tuning, self._registry, self.stats, self._tasks)
        self._allow = self._registry.allow
        self._touch = self._registry.touch
        self._report = self._registry.report
        self._invalid_logged = 0.0
        self._invalid_unlogged = 0
        """Invalid device ids since the last ``device.invalid_id`` line (logged at most once per second)."""

    # Read by metrics at scrape time -------------------------------------------------------------

    @property
    def active_sessions(self) -> int:
        return self._launcher.running

    @property
    def devices(self) -> int:
        return len(self._registry)

    def stream_totals(self) -> FrameStats:
        """Reassembly counters summed over every device, forgotten ones included."""
        return self._registry.frame_totals()

    def audio_queued(self) -> int:
        """Audio chunks waiting in the running sessions' queues."""
        return self._registry.audio_queued()

    @property
    def device_errors(self) -> ErrorCounts:
        return self._registry.errors.counts

    @property
    def error_limiter_entries(self) -> int:
        return len(self._registry.errors)

    # Dispatch ----------------------------------------------------------------------------------

    def handle(self, topic: str, payload: bytes) -> None:
        """One received PUBLISH (the link's message handler)."""
        self.stats.messages += 1
        parsed = self._topics.parse(topic)
        if parsed is None:
            self._reject("bad_topic")
            return
        device_id, kind = parsed
        if not is_valid_device_id(device_id):
            self._reject("invalid_device_id")
            self._log_invalid_id(topic)
            return
        if self._allow and device_id not in self._allow:
            self._refuse(device_id, ErrorCode.UNKNOWN_DEVICE, "this device is not in the bridge's devices.allow list")
            return
        if kind is TopicKind.AUDIO:
            self._on_audio(device_id, payload)
        elif kind is TopicKind.CONTROL:
            self._on_control(device_id, payload)

    def _on_audio(self, device_id: str, payload: bytes) -> None:
        if len(payload) > self._max_frame_bytes:
            self._refuse(
                device_id,
                ErrorCode.PAYLOAD_TOO_LARGE,
                f"audio frame of {len(payload)} bytes exceeds {self._max_frame_bytes}",
            )
            return
        try:
            frame = AudioFrame.decode(payload)
        except ProtocolError as exc:
            self._refuse(device_id, exc.code, str(exc))
            return
        if frame.codec != Codec.PCM_S16LE or frame.sample_rate != SAMPLE_RATE or frame.channels != 1:
            self._refuse_format(device_id, frame)
            return
        device = self._touch(device_id)
        device.last_frame = device.last_seen
        arrival = device.tracker.classify(frame)
        if arrival is Arrival.STALE:
            return
        if arrival is Arrival.STARTS and not self._launcher.start(device_id, device, frame.session_id):
            return
        session, reassembler = device.session, device.tracker.reassembler
        if session is None or reassembler is None:
            return
        try:
            for pcm in reassembler.push(frame):
                session.push(pcm)
        except GapTooLarge as gap:
            self._registry.end_gapped(device_id, device, gap)
            return
        if reassembler.complete:
            session.end(EndReason.DEVICE)

    def _refuse_format(self, device_id: str, frame: AudioFrame) -> None:
        if frame.codec != Codec.PCM_S16LE:
            code = ErrorCode.UNSUPPORTED_CODEC
            reason = f"codec: {int(frame.codec)} is not supported (0 = PCM s16le)"
        else:
            code = ErrorCode.UNSUPPORTED_FORMAT
            reason = (
                f"sample_rate/channels: {frame.sample_rate} Hz x {frame.channels} is not supported"
                f" ({SAMPLE_RATE} Hz mono)"
            )
        self._refuse(device_id, code, reason, frame.session_id)

    def _on_control(self, device_id: str, payload: bytes) -> None:
        if len(payload) > MAX_CONTROL_BYTES:
            self._refuse(device_id, ErrorCode.PAYLOAD_TOO_LARGE, f"control message over {MAX_CONTROL_BYTES} bytes")
            return
        try:
            message = decode_device_message(payload)
        except ProtocolError as exc:
            self._refuse(device_id, ErrorCode.BAD_CONTROL, str(exc))
            return
        device = self._touch(device_id)
        if isinstance(message, Configure):
            self._configure(device_id, device, message)
        elif isinstance(message, Cancel):
            if device.session is not None and device.session.session_id == message.session:
                device.session.cancel()
            device.tracker.close(message.session)  # a session not started yet: its frames will be dropped
        elif isinstance(message, Start):
            self._launcher.apply_start(device_id, device, message)

    def _configure(self, device_id: str, device: DeviceState, message: Configure) -> None:
        """Runtime tuning for the device's next sessions; validated as a whole, answered with ``configured``."""
        try:
            device.overrides = self._tuning.reconfigure(device_id, device.overrides, message)
        except TuningRejected as exc:
            self._report(device_id, ErrorCode.BAD_CONTROL, str(exc))
            return
        effective = self._tuning.effective(device_id, device.overrides, None)
        self._publisher.post(device_id, effective)

    def _refuse(self, device_id: str, code: ErrorCode, reason: str, session: int | None = None) -> None:
        """A message refused: counted under ``code``, and the device told why."""
        self._reject(code)
        self._report(device_id, code, reason, session)

    def _reject(self, code: ErrorCode | str) -> None:
        key = str(code)
        self.stats.rejected_by_code[key] = self.stats.rejected_by_code.get(key, 0) + 1

    def _log_invalid_id(self, topic: str) -> None:
        """One line per second at most, however many invalid ids arrive: the log stays readable and cheap."""
        now = time.monotonic()
        if now - self._invalid_logged < ERROR_INTERVAL_S:
            self._invalid_unlogged += 1
            return
        log.warning("device.invalid_id", topic=topic[:200], suppressed=self._invalid_unlogged)
        self._invalid_logged, self._invalid_unlogged = now, 0

    # Housekeeping ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Flush reorder windows of devices gone quiet; forget idle devices."""
        await self._registry.run()

    async def drain(self, timeout: float) -> None:
        """Stop taking sessions; give running ones (and errors on their way out) ``timeout`` seconds to finish.

        A session still running then ends with a retryable error, published before the bridge goes.
        """
        self._launcher.stop()
        await self._tasks.wait(timeout)
        if self._running.abort_all("the bridge is shutting down"):
            await self._tasks.wait(ABORT_GRACE_S)
        self._tasks.cancel()
