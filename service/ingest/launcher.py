"""Starts a device's sessions: admission, superseding, the session's tuning and options, its task.

A device speaks one utterance at a time, so a new session cancels the running one. At most
``session.max_sessions`` run at once, and a device starts at most ``session.max_starts_per_s``
(after a small burst); a refused device is told when to retry (``retry_after_ms``), before
anything is allocated for the session.
"""

from __future__ import annotations

import dataclasses
import random
import time

from firmware_protocol import ErrorCode, Start
from service.config import Config
from service.endpointing.tuning import DeviceTuning
from service.ingest.devices import DeviceRegistry, DeviceState, FleetStats
from service.recognition import SessionOptions
from service.session.services import SessionServices
from service.session.turn import Session
from service.tasks import TaskSet

SHUTDOWN_RETRY_MS = 5000
"""A bridge shutting down is usually back (or replaced) within seconds."""


class SessionLauncher:
    def __init__(
        self,
        config: Config,
        services: SessionServices,
        tuning: DeviceTuning,
        registry: DeviceRegistry,
        stats: FleetStats,
        tasks: TaskSet,
    ) -> None:
        self._max_sessions = config.session.max_sessions
        self._starts_per_s = config.session.max_starts_per_s
        self._asr = config.asr
        self._services = services
        self._tuning = tuning
        self._registry = registry
        self._stats = stats
        self._tasks = tasks
        self.running = 0
        """Sessions started and not yet finished (a superseded one counts until its replacement's end)."""
        self._accepting = True

    def stop(self) -> None:
        """Refuse every new session from now on: the bridge is shutting down."""
        self._accepting = False

    def start(self, device_id: str, device: DeviceState, session_id: int) -> bool:
        """Start ``session_id`` for the device, superseding its running session; ``False``: refused."""
        if not self._accepting:
            self._refuse(device_id, device, session_id, "shutdown", "the bridge is shutting down", SHUTDOWN_RETRY_MS)
            return False
        if device.session is None and self.running >= self._max_sessions:
            reason = f"{self._max_sessions} sessions are active; retry shortly"
            # Spread the retries of a refused crowd over a second, so they do not all come back at once.
            self._refuse(device_id, device, session_id, "capacity", reason, random.randint(1000, 2000))
            return False
        if wait_s := device.starts.take(self._starts_per_s, time.monotonic()):
            wait_ms = max(int(wait_s * 1000), 1)
            reason = f"more than {self._starts_per_s:g} sessions a second from this device"
            self._refuse(device_id, device, session_id, "rate", reason, wait_ms)
            return False
        restart = device.tracker.session_id == session_id
        if device.session is not None:
            device.session.cancel()  # superseded: a device speaks one utterance at a time
        device.tracker.begin(session_id)
        start = device.options.pop(session_id, None) or (device.last_start if restart else None)
        device.options.clear()
        device.last_start = start
        session = Session(
            device_id,
            session_id,
            self._services,
            tuning=self._tuning.effective(device_id, device.overrides, start),
            options=self._options(device_id, start),
        )
        if device.session is None:
            self.running += 1
        device.session = session
        self._registry.live[device_id] = device
        device.last_frame = time.monotonic()  # the idle clock starts with the session
        self._stats.sessions_started += 1
        task = self._tasks.spawn(session.run(), name=f"session-{device_id}-{session_id}")
        task.add_done_callback(lambda _: self._finished(device_id, device, session))
        return True

    def apply_start(self, device_id: str, device: DeviceState, message: Start) -> None:
        """A ``start`` message: options for the session's audio to come, or for the running one it overtook."""
        if device.tracker.is_closed(message.session):
            return
        if device.session is not None and device.session.session_id == message.session:
            # Audio overtook its start (they travel on different topics): apply what still can be.
            device.last_start = message
            endpointing = self._tuning.effective(device_id, device.overrides, message).endpointing
            device.session.configure(endpointing, self._options(device_id, message))
            return
        # Keep the options for the audio to come; a device has one session running at a time.
        device.options = {message.session: message}
        if device.tracker.session_id != message.session:
            self.start(device_id, device, message.session)

    def _refuse(
        self, device_id: str, device: DeviceState, session_id: int, why: str, reason: str, retry_after_ms: int
    ) -> None:
        """Refused (``why`` counts it by reason): the id is closed, and the device is told when to retry."""
        stats = self._stats
        stats.sessions_refused += 1
        stats.refused_by_reason[why] = stats.refused_by_reason.get(why, 0) + 1
        device.tracker.close(session_id)
        self._registry.report(
            device_id, ErrorCode.TOO_MANY_SESSIONS, reason, session_id, retryable=True, retry_after_ms=retry_after_ms
        )

    def _options(self, device_id: str, start: Start | None) -> SessionOptions:
        """The device's per-session options over the configured ``asr.lang`` / ``asr.prompt``."""
        return SessionOptions(
            language=(start.language if start else None) or self._asr.lang or None,
            prompt=(start.prompt if start else None) or self._asr.prompt or None,
            device_id=device_id,
        )

    def _finished(self, device_id: str, device: DeviceState, session: Session) -> None:
        if device.session is session:  # else a newer session already replaced it on the device
            device.tracker.close(session.session_id)
            device.session = None
            self._registry.live.pop(device_id, None)
            self.running -= 1
        session.log.debug("session.closed", **dataclasses.asdict(device.tracker.stats))
