"""Per-device reassembly: frames in any order in, one session's audio in order out.

Pure logic, no I/O and no clock, so property tests can drive it with any arrival order.
A frame of a new session id starts a new session (and supersedes the running one); a
FIRST frame repeated on the running session restarts it (the device rebooted and reused
its id); frames of recently closed sessions are stale and dropped, so a late straggler
cannot tear down the session that replaced it. Memory is bounded whatever ``seq`` says: a
gap longer than ``max_gap_bytes`` of audio raises :class:`GapTooLarge` instead of being
concealed.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

from firmware_protocol import SAMPLES_PER_MS, AudioFrame

BYTES_PER_MS = 2 * SAMPLES_PER_MS
"""16-bit mono PCM at the protocol's rate."""
ASSUMED_FRAME_BYTES = 20 * BYTES_PER_MS
"""How long a missing frame counts before the session's first non-empty frame: 20 ms."""
LOST_REMEMBERED = 512
"""Lost ``seq`` remembered per session, to tell a late frame from a duplicate."""


@dataclass(slots=True)
class FrameStats:
    """What reassembly did with a device's audio frames; metrics read these fields by name."""

    frames: int = 0
    duplicates: int = 0
    reordered: int = 0
    lost: int = 0
    late: int = 0
    stale: int = 0

    def add(self, other: FrameStats) -> None:
        """Count ``other``'s frames into these (fleet-wide totals for metrics)."""
        self.frames += other.frames
        self.duplicates += other.duplicates
        self.reordered += other.reordered
        self.lost += other.lost
        self.late += other.late
        self.stale += other.stale


class GapTooLarge(Exception):
    """Concealing the gap would take more silence than allowed: the session must end instead."""

    def __init__(self, missing: int, gap_ms: int) -> None:
        super().__init__(f"{missing} frames ({gap_ms} ms) missing")
        self.gap_ms = gap_ms


class Arrival(enum.Enum):
    CONTINUES = "continues"
    """The frame belongs to the running session."""
    STARTS = "starts"
    """The frame opens a new session (the previous one, if any, is superseded)."""
    STALE = "stale"
    """The frame belongs to a session already closed; dropped."""


@dataclass(slots=True)
class Reassembler:
    """Orders one session's frames inside a window of ``window`` frames.

    Frames are released as soon as they are next in sequence. A gap is declared lost
    once a frame ``window`` places beyond it has arrived (or on :meth:`flush`); a lost
    frame is replaced by silence of the previous frame's length, so audio offsets stay
    true to the device's clock. A gap of more than ``max_gap_bytes`` of audio is not
    concealed: :meth:`push` and :meth:`flush` raise :class:`GapTooLarge`, before any allocation.
    """

    window: int
    stats: FrameStats
    max_gap_bytes: int = 1000 * BYTES_PER_MS
    expected: int = 0
    last_seq: int | None = None
    _pending: dict[int, bytes] = field(default_factory=dict)
    _lost: set[int] = field(default_factory=set)
    _frame_bytes: int = 0

    @property
    def complete(self) -> bool:
        """The LAST frame and everything before it has been released (or declared lost)."""
        return self.last_seq is not None and self.expected > self.last_seq

    @property
    def waiting(self) -> bool:
        return bool(self._pending)

    def push(self, frame: AudioFrame) -> list[bytes]:
        self.stats.frames += 1
        seq = frame.seq
        if seq < self.expected or seq in self._pending:
            if seq in self._lost:
                self.stats.late += 1
            else:
                self.stats.duplicates += 1
            return []
        if frame.last:
            self.last_seq = seq if self.last_seq is None else min(self.last_seq, seq)
        if self.last_seq is not None and seq > self.last_seq:
            self.stats.duplicates += 1  # beyond the announced end: a confused device
            return []
        if seq != self.expected:
            self.stats.reordered += 1
        self._pending[seq] = frame.payload
        out = self._release()
        while self._pending and max(self._pending) - self.expected >= self.window:
            out.extend(self._skip_gap())
        return out

    def flush(self) -> list[bytes]:
        """Declare every gap lost and release what is held (called when the device goes quiet)."""
        out: list[bytes] = []
        while self._pending:
            out.extend(self._skip_gap())
        if self.last_seq is not None and self.expected <= self.last_seq:
            missing = self.last_seq + 1 - self.expected
            self._check_gap(missing)
            self._mark_lost(missing)
            out.extend(self._silence(missing))
            self.expected = self.last_seq + 1
        return out

    def _release(self) -> list[bytes]:
        out = []
        while self.expected in self._pending:
            payload = self._pending.pop(self.expected)
            if payload:
                self._frame_bytes = len(payload)
            out.append(payload)
            self.expected += 1
        return out

    def _skip_gap(self) -> list[bytes]:
        missing = min(self._pending) - self.expected
        self._check_gap(missing)
        self._mark_lost(missing)
        silence = self._silence(missing)
        self.expected += missing
        return silence + self._release()

    def _check_gap(self, missing: int) -> None:
        gap_bytes = missing * (self._frame_bytes or ASSUMED_FRAME_BYTES)
        if gap_bytes > self.max_gap_bytes:
            raise GapTooLarge(missing, gap_bytes // BYTES_PER_MS)

    def _mark_lost(self, count: int) -> None:
        self.stats.lost += count
        room = LOST_REMEMBERED - len(self._lost)
        if room > 0:
            self._lost.update(range(self.expected, self.expected + min(count, room)))

    def _silence(self, count: int) -> list[bytes]:
        return [bytes(self._frame_bytes)] * count if self._frame_bytes else []


class SessionTracker:
    """Tracks which session a device is in and reassembles that session's frames.

    ``stats`` count every frame of the device, over all its sessions.
    """

    def __init__(self, window: int, remember: int = 16, max_gap_bytes: int = 1000 * BYTES_PER_MS) -> None:
        self.stats = FrameStats()
        self._window = window
        self._max_gap_bytes = max_gap_bytes
        self.session_id: int | None = None
        self.reassembler: Reassembler | None = None
        self._closed: deque[int] = deque(maxlen=remember)

    def classify(self, frame: AudioFrame) -> Arrival:
        if frame.session_id == self.session_id:
            restarted = (
                frame.first and frame.seq == 0 and self.reassembler is not None and self.reassembler.expected > 0
            )
            return Arrival.STARTS if restarted else Arrival.CONTINUES
        if frame.session_id in self._closed:
            self.stats.stale += 1
            return Arrival.STALE
        return Arrival.STARTS

    def begin(self, session_id: int) -> Reassembler:
        """Make ``session_id`` the running session (closing the previous one)."""
        if self.session_id is not None:
            self.close(self.session_id)
        self.session_id = session_id
        self.reassembler = Reassembler(self._window, self.stats, self._max_gap_bytes)
        return self.reassembler

    def close(self, session_id: int) -> None:
        if session_id not in self._closed:
            self._closed.append(session_id)
        if self.session_id == session_id:
            self.session_id = None
            self.reassembler = None

    def is_closed(self, session_id: int) -> bool:
        return session_id in self._closed
