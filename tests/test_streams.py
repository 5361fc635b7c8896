"""Reassembly under reordering, duplicates and loss (property tests on the pure logic)."""

from __future__ import annotations

import random
import tracemalloc
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware_protocol import AudioFrame, FrameFlags
from service.ingest.reassembly import Arrival, FrameStats, GapTooLarge, Reassembler, SessionTracker


def _frames(n: int, session: int = 1, size: int = 640, last: bool = True) -> list[AudioFrame]:
    frames = []
    for seq in range(n):
        flags = FrameFlags.FIRST if seq == 0 else FrameFlags.NONE
        if last and seq == n - 1:
            flags |= FrameFlags.LAST
        frames.append(AudioFrame(session, seq, seq.to_bytes(2, "little") * (size // 2), flags))
    return frames


def _shuffle_within(frames: list[AudioFrame], displacement: int, rng: random.Random) -> list[AudioFrame]:
    """Each frame moves at most ``displacement`` places from where it was sent."""
    keyed = sorted(frames, key=lambda f: f.seq + rng.uniform(0, displacement))
    return keyed


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 120), displacement=st.integers(0, 7), dup_rate=st.floats(0, 0.5), seed=st.integers())
def test_reordering_inside_the_window_and_duplicates_lose_nothing(
    n: int, displacement: int, dup_rate: float, seed: int
) -> None:
    rng = random.Random(seed)
    frames = _frames(n)
    wire = []
    for frame in _shuffle_within(frames, displacement, rng):
        wire.append(frame)
        if rng.random() < dup_rate:
            wire.insert(rng.randint(len(wire) - 1, len(wire)), frame)
    stats = FrameStats()
    reassembler = Reassembler(window=8, stats=stats)
    out = [chunk for frame in wire for chunk in reassembler.push(frame)]
    out += reassembler.flush()
    assert out == [f.payload for f in frames]
    assert reassembler.complete
    assert stats.lost == 0
    assert stats.duplicates == len(wire) - n


@settings(max_examples=200, deadline=None)
@given(n=st.integers(2, 120), data=st.data())
def test_lost_frames_become_silence_of_frame_length(n: int, data: st.DataObject) -> None:
    frames = _frames(n)
    lost = data.draw(st.sets(st.integers(1, n - 2), max_size=n // 3)) if n > 2 else set()
    stats = FrameStats()
    reassembler = Reassembler(window=8, stats=stats)
    out = [chunk for f in frames if f.seq not in lost for chunk in reassembler.push(f)]
    out += reassembler.flush()
    expected = [bytes(640) if f.seq in lost else f.payload for f in frames]
    assert out == expected
    assert stats.lost == len(lost)
    assert reassembler.complete


def test_a_late_frame_after_its_gap_was_declared_lost_is_counted_late() -> None:
    frames = _frames(20, last=False)
    stats = FrameStats()
    reassembler = Reassembler(window=4, stats=stats)
    for frame in frames[:2] + frames[3:8]:
        reassembler.push(frame)
    assert stats.lost == 1 and reassembler.expected == 8
    assert reassembler.push(frames[2]) == []
    assert stats.late == 1 and stats.duplicates == 0


def test_flush_declares_missing_tail_up_to_the_last_frame() -> None:
    frames = _frames(10)
    stats = FrameStats()
    reassembler = Reassembler(window=8, stats=stats)
    for frame in frames[:5] + frames[9:]:
        reassembler.push(frame)
    assert not reassembler.complete
    tail = reassembler.flush()
    assert len(tail) == 4 + 1 and reassembler.complete and stats.lost == 4


def test_session_tracker_sessions_new_restart_and_stale() -> None:
    stream = SessionTracker(window=8)
    first = _frames(5, session=1)
    assert stream.classify(first[0]) is Arrival.STARTS
    stream.begin(1)
    assert stream.reassembler is not None
    stream.reassembler.push(first[0])
    stream.reassembler.push(first[1])
    assert stream.classify(first[2]) is Arrival.CONTINUES
    # A repeated FIRST at seq 0 on the running session restarts it (device rebooted).
    assert stream.classify(first[0]) is Arrival.STARTS
    # A new id supersedes; the old id's stragglers are stale from then on.
    second = _frames(3, session=2)
    assert stream.classify(second[0]) is Arrival.STARTS
    stream.begin(2)
    assert stream.classify(first[3]) is Arrival.STALE
    assert stream.stats.stale == 1


# Bounded memory whatever seq says ------------------------------------------------------------


def _peak_bytes(action: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        action()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("jump", [4294967295 - 5, 1_000_000, 51])
def test_a_gap_longer_than_max_gap_is_refused_before_anything_is_allocated(jump: int) -> None:
    frames = _frames(5, last=False)  # 20 ms frames; the bound is 1000 ms = 50 frames
    reassembler = Reassembler(window=8, stats=FrameStats(), max_gap_bytes=32_000)
    for frame in frames:
        reassembler.push(frame)
    far = AudioFrame(1, 5 + jump, frames[1].payload)

    def push_far() -> None:
        with pytest.raises(GapTooLarge) as raised:
            reassembler.push(far)
        assert raised.value.gap_ms == jump * 20

    assert _peak_bytes(push_far) < 64_000


def test_a_gap_up_to_max_gap_is_concealed() -> None:
    frames = _frames(60, last=True)
    reassembler = Reassembler(window=8, stats=FrameStats(), max_gap_bytes=32_000)
    out = [chunk for f in frames[:5] + frames[55:] for chunk in reassembler.push(f)]  # 50 frames = 1000 ms
    assert out == [f.payload for f in frames[:5]] + [bytes(640)] * 50 + [f.payload for f in frames[55:]]


def test_flush_refuses_a_gap_over_max_gap_too() -> None:
    frames = _frames(3, last=False)
    reassembler = Reassembler(window=8, stats=FrameStats(), max_gap_bytes=2_000)  # 62 ms
    for frame in frames:
        reassembler.push(frame)
    reassembler.push(AudioFrame(1, 7, frames[1].payload, FrameFlags.LAST))  # 4 frames (80 ms) missing
    with pytest.raises(GapTooLarge):
        reassembler.flush()


def test_before_any_audio_a_missing_frame_counts_as_20_ms() -> None:
    reassembler = Reassembler(window=2, stats=FrameStats(), max_gap_bytes=32_000)
    reassembler.push(AudioFrame(1, 0, b"", FrameFlags.FIRST))
    with pytest.raises(GapTooLarge):
        for seq in (52, 53, 54):  # 51 empty frames missing: no audio to conceal, still over the bound
            reassembler.push(AudioFrame(1, seq, b""))


def test_lost_seqs_remembered_are_bounded_however_many_frames_are_lost() -> None:
    stats = FrameStats()
    reassembler = Reassembler(window=1, stats=stats, max_gap_bytes=10**15)
    reassembler.push(AudioFrame(1, 0, b"", FrameFlags.FIRST))

    def lose_four_billion() -> None:
        reassembler.push(AudioFrame(1, 4_000_000_000, b""))

    assert _peak_bytes(lose_four_billion) < 200_000
    assert stats.lost == 4_000_000_000 - 1


@settings(max_examples=200, deadline=None)
@given(seqs=st.lists(st.integers(0, 2**32 - 1) | st.integers(0, 200), min_size=1, max_size=60))
def test_concealment_never_exceeds_max_gap_per_gap(seqs: list[int]) -> None:
    reassembler = Reassembler(window=8, stats=FrameStats(), max_gap_bytes=32_000)
    received = concealed = 0
    for seq in seqs:
        frame = AudioFrame(1, seq, bytes(640))
        received += 1
        try:
            out = reassembler.push(frame)
        except GapTooLarge:
            return
        concealed += sum(len(chunk) for chunk in out)
    assert concealed <= received * (640 + 32_000)
