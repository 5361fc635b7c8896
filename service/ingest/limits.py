"""What the bridge sends devices is bounded: errors per device and code, errors fleet-wide, starts per device.

These limits hold whatever devices send, so their state is bounded by configuration too:
the error limiter remembers only errors it let through in the last ``ERROR_INTERVAL_S``,
and a device id that only ever sent garbage leaves nothing else behind.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

ERROR_INTERVAL_S = 1.0
"""At most one error per device and code per second (PROTOCOL.md §7): a broken device cannot flood the bus."""
START_BURST = 5
"""Session starts a device may make at once before ``session.max_starts_per_s`` paces it."""


@dataclass(slots=True)
class ErrorCounts:
    """Errors to devices since start, by what became of them; metrics read these fields by name."""

    sent: int = 0
    dropped_device: int = 0
    """Not sent: the device got one with the same code less than ``ERROR_INTERVAL_S`` ago."""
    dropped_fleet: int = 0
    """Not sent: the fleet-wide budget (``session.max_errors_per_s``) was spent."""


class ErrorLimiter:
    """One error per device and code per ``ERROR_INTERVAL_S``, and at most ``per_s`` a second in all.

    Only errors let through are remembered, oldest first, and forgotten once older than the
    interval; the fleet budget caps how many can be remembered at once (``max_entries``).
    """

    def __init__(self, per_s: int, interval_s: float = ERROR_INTERVAL_S) -> None:
        self._interval_s = interval_s
        self._per_s = float(per_s)
        self.max_entries = 2 * per_s
        """A bucket of ``per_s`` tokens refilled at ``per_s``/s lets at most this many through in one interval."""
        self._tokens = self._per_s
        self._refilled = 0.0
        self._sent: OrderedDict[tuple[str, str], float] = OrderedDict()
        self.counts = ErrorCounts()

    def __len__(self) -> int:
        return len(self._sent)

    def allow(self, device_id: str, code: str, now: float) -> bool:
        """Whether an error ``code`` may go to ``device_id`` now; counted either way."""
        self.expire(now)
        key = (device_id, code)
        if key in self._sent:
            self.counts.dropped_device += 1
            return False
        self._tokens = min(self._per_s, self._tokens + (now - self._refilled) * self._per_s)
        self._refilled = now
        if self._tokens < 1.0 or len(self._sent) >= self.max_entries:
            self.counts.dropped_fleet += 1
            return False
        self._tokens -= 1.0
        self._sent[key] = now
        self.counts.sent += 1
        return True

    def expire(self, now: float) -> None:
        """Forget errors sent more than the interval ago (also called by the housekeeping sweep)."""
        sent = self._sent
        while sent:
            key, at = next(iter(sent.items()))
            if now - at < self._interval_s:
                return
            del sent[key]


@dataclass(slots=True)
class StartBucket:
    """A device's session starts: ``START_BURST`` at once, then ``per_s`` a second (a token bucket)."""

    tokens: float = START_BURST
    refilled: float = 0.0

    def take(self, per_s: float, now: float) -> float:
        """Take a start; ``0.0`` if allowed, else the seconds until one would be."""
        self.tokens = min(float(START_BURST), self.tokens + (now - self.refilled) * per_s)
        self.refilled = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / per_s
