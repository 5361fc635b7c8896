"""What the bridge keeps per device: its session, reassembly, options and start rate.

A device gets state with its first valid message (a frame the bridge can decode, a valid
control message): ids that only ever send garbage, or that ``devices.allow`` refuses, keep
none; the errors they are sent are limited by :class:`ErrorLimiter`, which forgets them
within a second. Devices are forgotten after a silence; their frame counters then go to
the fleet totals, so those never go down.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import structlog

from firmware_protocol import EndpointingOverrides, EndReason, Error, ErrorCode, Start
from service.config import Config
from service.ingest.limits import ErrorLimiter, StartBucket
from service.ingest.reassembly import BYTES_PER_MS, FrameStats, GapTooLarge, SessionTracker
from service.outputs.publisher import DevicePublisher
from service.session.turn import Session

log = structlog.get_logger(__name__)

QUIET_FLUSH_S = 0.15
"""A gap not filled this long after the last frame is declared lost."""
FORGET_IDLE_S = 600.0
"""A device with ``configure`` overrides, without a session and silent this long, is forgotten."""
FORGET_BARE_S = 30.0
"""A device with nothing to remember but closed session ids is forgotten sooner: stragglers come within seconds."""
FORGET_SWEEP_S = 5.0
"""How often idle devices are looked for (the quiet flush looks only at devices with a session)."""


@dataclass(slots=True)
class FleetStats:
    messages: int = 0
    sessions_started: int = 0
    sessions_refused: int = 0
    refused_by_reason: dict[str, int] = field(default_factory=dict)
    """Sessions refused, by reason: ``capacity`` (max_sessions), ``rate`` (max_starts_per_s), ``shutdown``."""
    sessions_gapped: int = 0
    """Sessions ended with ``audio_gap``."""
    rejected_by_code: dict[str, int] = field(default_factory=dict)
    """Device messages refused, by error code (bounded: the protocol's codes)."""
    retired_streams: FrameStats = field(default_factory=FrameStats)
    """Reassembly counters of devices already forgotten, so fleet totals never go down."""


@dataclass(slots=True)
class DeviceState:
    tracker: SessionTracker
    session: Session | None = None
    last_frame: float = 0.0
    last_seen: float = field(default_factory=time.monotonic)
    """Any valid message; idle devices are forgotten."""
    starts: StartBucket = field(default_factory=StartBucket)
    options: dict[int, Start] = field(default_factory=dict)
    last_start: Start | None = None
    """The options of the running session, reused when the device restarts it with the same id."""
    overrides: EndpointingOverrides | None = None
    """From the device's ``configure`` messages; over ``[devices.<id>]``, under a session's ``start``."""


class DeviceRegistry:
    """Every device the bridge keeps state for, the allow list, and the errors devices are sent."""

    def __init__(self, config: Config, publisher: DevicePublisher, stats: FleetStats) -> None:
        self.allow = frozenset(config.devices.allow)
        """Devices served; empty: every device."""
        self._window = config.session.reorder_window
        self._max_gap_bytes = int(min(config.session.max_gap_ms, config.session.max_utterance_s * 1000)) * BYTES_PER_MS
        self._idle_timeout_s = config.session.idle_timeout_s
        self._publisher = publisher
        self._stats = stats
        self._states: dict[str, DeviceState] = {}
        self.live: dict[str, DeviceState] = {}
        """Devices with a session (kept by the launcher): the quiet flush looks only at these."""
        self.errors = ErrorLimiter(config.session.max_errors_per_s)
        self._next_forget = 0.0

    def __len__(self) -> int:
        return len(self._states)

    def touch(self, device_id: str) -> DeviceState:
        """The device's state (created on its first message), marked as seen now."""
        device = self._states.get(device_id)
        if device is None:
            device = DeviceState(SessionTracker(self._window, max_gap_bytes=self._max_gap_bytes))
            self._states[device_id] = device
        device.last_seen = time.monotonic()
        return device

    def report(
        self,
        device_id: str,
        code: ErrorCode,
        message: str,
        session: int | None = None,
        *,
        retryable: bool = False,
        retry_after_ms: int | None = None,
    ) -> None:
        """Send the device an ``error``, unless :class:`ErrorLimiter` says it is one too many; keeps no device state."""
        if not self.errors.allow(device_id, code, time.monotonic()):
            return
        log.info("device.error", device=device_id, code=code.value, reason=message[:200])
        error = Error(code=code, message=message, retryable=retryable, session=session, retry_after_ms=retry_after_ms)
        self._publisher.post(device_id, error)  # the link queues it; nothing here waits

    def end_gapped(self, device_id: str, device: DeviceState, gap: GapTooLarge) -> None:
        """The session skipped too much audio to conceal: cancel it, close its id, tell the device (retryable)."""
        session_id = device.tracker.session_id
        if device.session is not None:
            device.session.cancel()
        if session_id is None:
            return
        device.tracker.close(session_id)
        self._stats.sessions_gapped += 1
        limit = self._max_gap_bytes // BYTES_PER_MS
        reason = f"seq: {gap.gap_ms} ms of audio missing, over the {limit} ms the bridge conceals; retry"
        self.report(device_id, ErrorCode.AUDIO_GAP, reason, session_id, retryable=True)

    # Read by metrics at scrape time -------------------------------------------------------------

    def frame_totals(self) -> FrameStats:
        """Reassembly counters summed over every device, forgotten ones included."""
        total = FrameStats()
        total.add(self._stats.retired_streams)
        for device in self._states.values():
            total.add(device.tracker.stats)
        return total

    def audio_queued(self) -> int:
        """Audio chunks waiting in the running sessions' queues."""
        return sum(device.session.queued for device in self._states.values() if device.session is not None)

    # Housekeeping ------------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            await asyncio.sleep(QUIET_FLUSH_S / 2)
            self.sweep(time.monotonic())

    def sweep(self, now: float) -> None:
        """Flush reorder windows of devices gone quiet, time out sessions of devices gone, forget idle devices."""
        self.errors.expire(now)
        for device_id, device in list(self.live.items()):
            reassembler, session = device.tracker.reassembler, device.session
            if reassembler is not None and session is not None and now - device.last_frame > QUIET_FLUSH_S:
                if reassembler.waiting or (reassembler.last_seq is not None and not reassembler.complete):
                    try:
                        for pcm in reassembler.flush():
                            session.push(pcm)
                    except GapTooLarge as gap:
                        self.end_gapped(device_id, device, gap)
                        continue
                    if reassembler.complete:
                        session.end(EndReason.DEVICE)
            if session is not None and now - device.last_frame > self._idle_timeout_s:
                session.end(EndReason.TIMEOUT)  # device gone, or its LAST frame lost
        if now >= self._next_forget:
            self._next_forget = now + FORGET_SWEEP_S
            self._forget_idle(now)

    def _forget_idle(self, now: float) -> None:
        for device_id, device in list(self._states.items()):
            quiet_for = FORGET_BARE_S if device.overrides is None else FORGET_IDLE_S
            if device.session is None and now - device.last_seen > quiet_for:
                self._stats.retired_streams.add(device.tracker.stats)
                del self._states[device_id]
