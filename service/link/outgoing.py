"""Everything the bridge publishes waits here: one bounded queue, what a device is owed before what is optional.

A publish no longer waits for its PUBACK in a queue nobody bounds (paho's), where a flood of
errors to flooding devices once made a good device's final time out. Instead each message gets a
:class:`Priority`; the link sends the most important first, keeps a bounded window in flight, and
holds what it owes across a broker outage (up to ``max_age_s``). When the queue is full the least
important, oldest message goes; errors and then finals go last, and never without a log line.

Per-device order holds whatever the priorities: a message is filed under its device ``key``, and
a more important one for the same key takes that key's earlier, less important messages along
into its own lane (invariant: a key's entries in a lane were all emitted before its entries in
any less important lane), so draining the lanes in priority order never reorders one device.
What is dropped is chosen by each message's own priority, wherever it was taken along to.
Removal from the middle is lazy (a ``live`` flag); a lane or drop list holding more dead entries
than live ones is compacted, so memory stays proportional to ``capacity``.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import IntEnum

import structlog

log = structlog.get_logger(__name__)

DROP_LOG_INTERVAL_S = 1.0
"""At most one ``mqtt.publish_dropped`` line per second (with the counts since the last)."""


class Priority(IntEnum):
    """Lower is more important: sent first, dropped last."""

    FINAL = 0
    """The answer a session owes its device: its final transcript."""
    ERROR = 1
    """Errors: they end or refuse a session too, but a flood of them (to flooding devices) must not cost a final."""
    OWED = 2
    """What a device acts on: ``listening``, ``speech_ended``, ``configured``; Home Assistant discovery."""
    OPTIONAL = 3
    """What only informs: partial transcripts, ``speech_started``."""


@dataclass(slots=True)
class Outgoing:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    priority: Priority
    key: str
    """Whose order to keep (the device id); messages with different keys may overtake each other."""
    queued_at: float
    lane: int = 0
    live: bool = True


@dataclass(slots=True)
class QueueStats:
    queued: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: {p.name.lower(): 0 for p in Priority})
    """Dropped because the queue was full or the message outlived ``max_age_s``, by priority."""
    expired: int = 0
    """Of those, the ones that outlived ``max_age_s`` (e.g. across a long broker outage)."""
    resent: int = 0
    """Messages a lost connection left unfinished (QoS 1 unacknowledged, QoS 0 unwritten), sent again after it."""


class OutgoingQueue:
    def __init__(self, capacity: int, max_age_s: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._capacity = capacity
        self._max_age_s = max_age_s
        self._clock = clock
        self._lanes: tuple[deque[Outgoing], ...] = tuple(deque() for _ in Priority)
        """Send order: the most important lane first."""
        self._keys: tuple[dict[str, int], ...] = tuple({} for _ in Priority)
        """Per lane: live entries by key (to find what a more important message takes along)."""
        self._by_priority: tuple[deque[Outgoing], ...] = tuple(deque() for _ in Priority)
        """Drop order: by each message's own priority, oldest first."""
        self._live = [0] * len(Priority)
        """Live entries by own priority."""
        self._lane_live = [0] * len(Priority)
        self._size = 0
        self._ready = asyncio.Event()
        self._unlogged: dict[str, int] = {}
        self._logged_at = -DROP_LOG_INTERVAL_S
        self.stats = QueueStats()

    def __len__(self) -> int:
        return self._size

    def put(self, topic: str, payload: bytes, qos: int, retain: bool, priority: Priority, key: str) -> None:
        lane = int(priority)
        for lower in range(lane + 1, len(self._lanes)):
            if self._keys[lower].get(key):
                self._promote(key, lower, lane)
        item = Outgoing(topic, payload, qos, retain, priority, key, self._clock(), lane)
        self._lanes[lane].append(item)
        self._by_priority[lane].append(item)
        self._count(item, +1)
        self.stats.queued += 1
        self._trim()

    def requeue(self, unacknowledged: Iterable[Outgoing]) -> None:
        """Messages a lost connection left unfinished go out first, in order (QoS 1: at least once).

        They were emitted before anything still queued, so they lead the most important lane.
        """
        items = list(unacknowledged)
        for item in reversed(items):
            item.lane, item.live = 0, True
            self._lanes[0].appendleft(item)
            self._by_priority[item.priority].appendleft(item)
            self._count(item, +1)
        self.stats.resent += len(items)
        self._trim()

    async def get(self) -> Outgoing:
        """The next message to send: the most important lane first; expired ones are dropped on the way."""
        while True:
            while not self._size:
                self._ready.clear()
                await self._ready.wait()
            lane = next(i for i, keys in enumerate(self._keys) if keys)
            item = self._remove_head(self._lanes[lane])
            if self._clock() - item.queued_at <= self._max_age_s:
                return item
            self.stats.expired += 1
            self._note_drop(item, "expired")

    # Internals -----------------------------------------------------------------------------------

    def _count(self, item: Outgoing, delta: int) -> None:
        keys = self._keys[item.lane]
        left = keys.get(item.key, 0) + delta
        if left:
            keys[item.key] = left
        else:
            del keys[item.key]
        self._live[item.priority] += delta
        self._lane_live[item.lane] += delta
        self._size += delta
        if delta > 0:
            self._ready.set()

    def _promote(self, key: str, source: int, target: int) -> None:
        lane = self._lanes[source]
        moved = [item for item in lane if item.live and item.key == key]
        kept = [item for item in lane if item.live and item.key != key]
        lane.clear()
        lane.extend(kept)
        for item in moved:
            self._count(item, -1)
            item.lane = target
            self._count(item, +1)
        self._lanes[target].extend(moved)

    def _remove_head(self, queue: deque[Outgoing]) -> Outgoing:
        """Pop the first live entry of ``queue`` (one is there), discarding dead ones before it."""
        while not (item := queue.popleft()).live:
            pass
        item.live = False
        self._count(item, -1)
        self._compact(self._by_priority[item.priority], self._live[item.priority])
        return item

    def _trim(self) -> None:
        while self._size > self._capacity:
            least = max(p for p in range(len(Priority)) if self._live[p])
            item = self._remove_head(self._by_priority[least])
            self._compact(self._lanes[item.lane], self._lane_live[item.lane])
            self._note_drop(item, "queue_full")

    @staticmethod
    def _compact(queue: deque[Outgoing], live: int) -> None:
        if len(queue) > 2 * live + 64:
            kept = [item for item in queue if item.live]
            queue.clear()
            queue.extend(kept)

    def _note_drop(self, item: Outgoing, why: str) -> None:
        item.payload = b""  # a dead entry may wait for compaction: it keeps no payload meanwhile
        name = item.priority.name.lower()
        self.stats.dropped[name] += 1
        self._unlogged[name] = self._unlogged.get(name, 0) + 1
        now = self._clock()
        if item.priority < Priority.OPTIONAL and now - self._logged_at >= DROP_LOG_INTERVAL_S:
            # Owed messages are never dropped silently; one line a second says how many, and the latest.
            log.warning("mqtt.publish_dropped", reason=why, topic=item.topic, dropped=dict(self._unlogged))
            self._unlogged.clear()
            self._logged_at = now
