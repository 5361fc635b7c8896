"""What the bridge keeps per device: its session, reassembly, options and error rate limit.

Devices appear on their first message and are forgotten after a long silence; their frame
counters then go to the fleet totals, so those never go down.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import structlog

from firmware_protocol import EndpointingOverrides, EndReason, Error, ErrorCode, Start
from service.config import Config
from service.ingest.reassembly import FrameStats, SessionTracker
from service.outputs.publisher import DevicePublisher
from service.session.turn import Session
from service.tasks import TaskSet

log = structlog.get_logger(__name__)

ERROR_INTERVAL_S = 1.0
"""At most one error per device and code per second: a broken device cannot flood the bus."""
QUIET_FLUSH_S = 0.15
"""A gap not filled this long after the last frame is declared lost."""
FORGET_IDLE_S = 600.0
"""A device without a session and silent this long is forgotten."""


@dataclass(slots=True)
class FleetStats:
    messages: int = 0
    sessions_started: int = 0
    sessions_refused: int = 0
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
    """Any message; idle devices are forgotten, which must not reset their error rate limit early."""
    options: dict[int, Start] = field(default_factory=dict)
    last_start: Start | None = None
    """The options of the running session, reused when the device restarts it with the same id."""
    last_error: dict[ErrorCode, float] = field(default_factory=dict)
    overrides: EndpointingOverrides | None = None
    """From the device's ``configure`` messages; over ``[devices.<id>]``, under a session's ``start``."""


class DeviceRegistry:
    """Every device the bridge keeps state for, the allow list, and the errors devices are sent."""

    def __init__(self, config: Config, publisher: DevicePublisher, stats: FleetStats, tasks: TaskSet) -> None:
        self.allow = frozenset(config.devices.allow)
        """Devices served; empty: every device."""
        self._window = config.session.reorder_window
        self._idle_timeout_s = config.session.idle_timeout_s
        self._publisher = publisher
        self._stats = stats
        self._tasks = tasks
        self._states: dict[str, DeviceState] = {}

    def __len__(self) -> int:
        return len(self._states)

    def touch(self, device_id: str) -> DeviceState:
        """The device's state (created on its first message), marked as seen now."""
        device = self._states.get(device_id)
        if device is None:
            device = DeviceState(SessionTracker(self._window))
            self._states[device_id] = device
        device.last_seen = time.monotonic()
        return device

    def report(
        self, device_id: str, code: ErrorCode, message: str, session: int | None = None, *, retryable: bool = False
    ) -> None:
        """Send the device an ``error``, unless it got one with this code in the last second."""
        device = self.touch(device_id)
        now = time.monotonic()
        if now - device.last_error.get(code, -ERROR_INTERVAL_S) < ERROR_INTERVAL_S:
            return
        device.last_error[code] = now
        log.info("device.error", device=device_id, code=code.value, reason=message[:200])
        error = Error(code=code, message=message, retryable=retryable, session=session)
        self._tasks.spawn(self._publisher.send(device_id, error))

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
        for device_id, device in list(self._states.items()):
            reassembler, session = device.tracker.reassembler, device.session
            if reassembler is not None and session is not None and now - device.last_frame > QUIET_FLUSH_S:
                if reassembler.waiting or (reassembler.last_seq is not None and not reassembler.complete):
                    for pcm in reassembler.flush():
                        session.push(pcm)
                    if reassembler.complete:
                        session.end(EndReason.DEVICE)
            if session is not None and now - device.last_frame > self._idle_timeout_s:
                session.end(EndReason.TIMEOUT)  # device gone, or its LAST frame lost
            if session is None and now - device.last_seen > FORGET_IDLE_S:
                self._stats.retired_streams.add(device.tracker.stats)
                del self._states[device_id]
