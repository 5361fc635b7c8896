"""EchoKit's turn semantics on scripted probabilities, and Silero on real recordings."""

from __future__ import annotations

import asyncio

import numpy as np

from firmware_protocol import EndReason
from service.config import VadConfig
from service.endpointing.endpointer import WINDOW, Endpointer, SpeechPause, SpeechStart, TurnEnd
from service.endpointing.silero import SileroModel, SileroState, VadBatcher


def _run(probabilities: list[float], config: VadConfig | None = None, no_speech_ms: int = 3000) -> list[object]:
    endpointer = Endpointer(config or VadConfig(), no_speech_ms)
    events: list[object] = []
    for p in probabilities:
        events.extend(endpointer.update(p))
    return events


def test_speech_then_silence_commits_after_max_silence_plus_hangover() -> None:
    # 10 windows of silence, 20 of speech (640 ms), then silence.
    events = _run([0.0] * 10 + [0.9] * 20 + [0.0] * 40)
    start, pause, end = events
    assert start == SpeechStart(320)
    assert pause == SpeechPause(960)  # end of the last voiced window
    assert isinstance(end, TurnEnd) and end.reason is EndReason.SILENCE and end.offset_ms == 960
    # EchoKit: the 6th silent window (200 * 16 // 512) leaves speech and counts 32 ms of silence;
    # 15 more make it exceed 500 ms: the turn ends with the 21st silent window, 672 ms after the end.
    endpointer = Endpointer(VadConfig(), 3000)
    for i, p in enumerate([0.0] * 10 + [0.9] * 20 + [0.0] * 40):
        if any(isinstance(e, TurnEnd) for e in endpointer.update(p)):
            assert (i + 1) * 32 - 960 == 21 * 32
            break
    else:
        raise AssertionError("the turn never ended")


def test_short_blip_is_not_a_turn_and_no_speech_times_out() -> None:
    events = _run([0.9] * 5 + [0.0] * 200, no_speech_ms=1000)
    assert isinstance(events[0], SpeechStart)
    assert not any(isinstance(e, SpeechPause) for e in events)
    end = events[-1]
    assert isinstance(end, TurnEnd) and end.reason is EndReason.NO_SPEECH


def test_pause_shorter_than_hangover_does_not_end_the_turn() -> None:
    # Speech, a 400 ms pause (12 windows < 6 + 16), more speech, then silence.
    events = _run([0.9] * 20 + [0.0] * 12 + [0.9] * 20 + [0.0] * 40)
    ends = [e for e in events if isinstance(e, TurnEnd)]
    assert len(ends) == 1 and ends[0].offset_ms == (20 + 12 + 20) * 32


def test_probabilities_between_thresholds_keep_the_state() -> None:
    # 0.4 is between neg_threshold 0.35 and threshold 0.5: speech continues.
    events = _run([0.9] * 20 + [0.4] * 50 + [0.0] * 40)
    (end,) = [e for e in events if isinstance(e, TurnEnd)]
    assert end.offset_ms == 20 * 32


async def test_silero_batched_matches_single_stream_and_separates_speech_from_noise(
    speech: dict[str, np.ndarray],
) -> None:
    model = SileroModel()
    batcher = VadBatcher(model)
    runner = asyncio.create_task(batcher.run())
    names = ["what_time", "weather", "noise"]

    async def score_all(name: str) -> list[float]:
        audio = speech[name].astype(np.float32) / 32768
        stream = SileroState()
        return [await batcher.score(stream, audio[i : i + WINDOW]) for i in range(0, len(audio) - WINDOW + 1, WINDOW)]

    together = await asyncio.gather(*(score_all(n) for n in names))
    alone = [await score_all(n) for n in names]
    runner.cancel()
    for a, b in zip(together, alone, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)
    scores = dict(zip(names, together, strict=True))
    assert max(scores["what_time"]) > 0.9 and max(scores["weather"]) > 0.9
    assert max(scores["noise"]) < 0.5
    # what_time's speech runs 720–1440 ms: silent before, voiced inside.
    assert max(scores["what_time"][: 600 // 32]) < 0.35
    assert np.mean(np.array(scores["what_time"][800 // 32 : 1400 // 32]) > 0.5) > 0.8


async def _scored_with(batcher: VadBatcher, windows: int, stream: SileroState | None = None) -> list[float]:
    stream = stream or SileroState()
    silence = np.zeros(WINDOW, dtype=np.float32)
    return [await batcher.score(stream, silence) for _ in range(windows)]


async def test_batcher_does_not_hold_windows_of_a_lone_stream() -> None:
    # An hour's hold: were a lone stream's windows held, this would time out.
    batcher = VadBatcher(SileroModel(), hold_ms=3_600_000)
    runner = asyncio.create_task(batcher.run())
    async with asyncio.timeout(10):
        assert len(await _scored_with(batcher, 5)) == 5
    runner.cancel()
    assert (batcher.runs, batcher.windows) == (5, 5)


async def test_batcher_holds_windows_into_one_run_when_streams_arrive_fast() -> None:
    # min_expected=1 with a 1 s hold: from 1 window/s on, a window waits for others.
    batcher = VadBatcher(SileroModel(), hold_ms=1000, min_batch=64, min_expected=1)
    runner = asyncio.create_task(batcher.run())
    async with asyncio.timeout(20):
        await asyncio.gather(*(_scored_with(batcher, 1) for _ in range(3)))  # full rate measured from here
        await asyncio.sleep(0.06)
        runs = batcher.runs

        async def late_stream(delay: float) -> list[float]:
            await asyncio.sleep(delay)
            return await _scored_with(batcher, 1)

        await asyncio.gather(*(late_stream(0.02 * i) for i in range(4)))
    runner.cancel()
    assert batcher.runs - runs == 1, "four windows arriving 20 ms apart share one held run"


async def test_batcher_runs_at_once_when_a_batch_is_full() -> None:
    batcher = VadBatcher(SileroModel(), hold_ms=3_600_000, min_batch=8, min_expected=0)
    runner = asyncio.create_task(batcher.run())
    async with asyncio.timeout(10):
        await asyncio.gather(*(_scored_with(batcher, 2) for _ in range(8)))
    runner.cancel()
    assert (batcher.runs, batcher.windows) == (2, 16)
