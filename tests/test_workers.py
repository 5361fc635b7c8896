"""Decoder worker processes: they die with the bridge however it dies, a dead one is replaced,
and a few decoders are shared fairly between many devices.

Real processes throughout: a bridge subprocess on the test broker, its real workers, found and
signalled through /proc.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import random
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from firmware_protocol import Cancel, Endpointing, Error, ErrorCode, SpeechEnded, Start, Transcript
from service.recognition import _sphinx_worker
from service.recognition.workers import FairPool
from service.tools.device_sim import frames_of, send_utterance
from tests.conftest import REPO, BridgeProcess
from tests.device import RawDevice

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="walks /proc")

WORKER_MODULE = "service.recognition.workers"


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time) of a live process; ``None`` once it is gone (or a zombie)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return None if fields[0] in "ZX" else (fields[0], int(fields[1]), int(fields[19]))


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _descendants(root: int) -> dict[int, int]:
    """Every live process below ``root``: pid → start time (which tells a reused pid apart)."""
    parents: dict[int, list[tuple[int, int]]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            parents.setdefault(stat[1], []).append((int(entry.name), stat[2]))
    found: dict[int, int] = {}
    todo = [root]
    while todo:
        for pid, started in parents.get(todo.pop(), []):
            found[pid] = started
            todo.append(pid)
    return found


def _workers_of(bridge: BridgeProcess) -> list[int]:
    assert bridge.process is not None
    return [pid for pid in _descendants(bridge.process.pid) if WORKER_MODULE in _cmdline(pid)]


def _workers_of_pids(pids: dict[int, int]) -> list[int]:
    return [pid for pid in pids if WORKER_MODULE in _cmdline(pid)]


def _alive(processes: dict[int, int]) -> dict[int, int]:
    return {pid: started for pid, started in processes.items() if (s := _stat(pid)) is not None and s[2] == started}


def _until_gone(processes: dict[int, int], timeout: float = 15) -> dict[int, int]:
    deadline = time.monotonic() + timeout
    while (left := _alive(processes)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def _partial(message: object) -> bool:
    return isinstance(message, Transcript) and not message.final


def _final(message: object) -> bool:
    return isinstance(message, Transcript) and message.final


ONE_DECODER = """
[asr]
platform = "pocketsphinx"
decoders = 1
[session]
idle_timeout_s = 30
"""


async def test_kill_9_of_the_bridge_mid_decode_leaves_no_process(make_bridge: object, speech: dict) -> None:
    bridge: BridgeProcess = make_bridge('[asr]\nplatform = "pocketsphinx"\ndecoders = 2\n')  # type: ignore[operator]
    assert bridge.process is not None
    workers = _workers_of(bridge)
    assert len(workers) == 2
    session = random.randint(1, 0xFFFFFFFF)
    audio = np.concatenate([speech["what_time"]] * 4)
    async with RawDevice(bridge.broker.host, bridge.broker.port, bridge.prefix, "victim") as device:
        await device.control(Start(session=session, endpointing=Endpointing.PUSH_TO_TALK))
        sender = asyncio.create_task(device.stream(frames_of(audio, session, 20), frame_s=0.02))
        await device.wait_for(_partial, timeout=30)  # a decoder is at work on this utterance
        started = _descendants(bridge.process.pid)
        running = _workers_of_pids(started)
        bridge.process.kill()
        bridge.process.wait(timeout=10)
        sender.cancel()
    assert set(running) == set(workers), "the workers were running at the kill"
    left = await asyncio.to_thread(_until_gone, started)
    assert not left, {pid: _cmdline(pid) for pid in left}


async def test_a_worker_killed_mid_session_is_replaced_and_the_session_told(make_bridge: object, speech: dict) -> None:
    bridge: BridgeProcess = make_bridge(ONE_DECODER)  # type: ignore[operator]
    [worker] = _workers_of(bridge)
    frames = frames_of(speech["what_time"], session := random.randint(1, 0xFFFFFFFF), 20, last=True)
    async with RawDevice(bridge.broker.host, bridge.broker.port, bridge.prefix, "crash-victim") as device:
        await device.control(Start(session=session, endpointing=Endpointing.PUSH_TO_TALK))
        await device.stream(frames[:-1], frame_s=0.02)
        await device.wait_for(_partial, timeout=30)
        os.kill(worker, signal.SIGKILL)
        await device.send(frames[-1])
        error = await device.wait_for(lambda m: isinstance(m, Error) or _final(m), timeout=30)
        assert isinstance(error, Error), error
        assert error.code is ErrorCode.BACKEND_ERROR and error.retryable and error.session == session

        # The next session is served by the replacement.
        received = await send_utterance(
            bridge.broker.url, "crash-next", speech["what_time"], prefix=bridge.prefix, speed=0, push_to_talk=True
        )
        final = received[-1].message
        assert isinstance(final, Transcript) and final.final and final.text == "what time is it"
    [replacement] = _workers_of(bridge)
    assert replacement != worker
    assert '"worker.replaced"' in bridge.log_path.read_text(errors="replace")


def _worker_command(bridge_pid: int, watch_fd: int) -> list[str]:
    return [sys.executable, "-m", WORKER_MODULE, _sphinx_worker.__name__, str(bridge_pid), str(watch_fd)]


def _init(worker: subprocess.Popen[bytes]) -> object:
    """The first request of the worker protocol (service/recognition/workers.py): load the decoder."""
    assert worker.stdin is not None and worker.stdout is not None
    body = pickle.dumps(("init", (None,)))
    worker.stdin.write(struct.pack("!I", len(body)) + body)
    worker.stdin.flush()
    (size,) = struct.unpack("!I", worker.stdout.read(4))
    return pickle.loads(worker.stdout.read(size))


def test_a_worker_exits_when_its_lifeline_closes() -> None:
    """The portable guard: the write end of the watchdog pipe closes (as it does when the bridge dies)."""
    watch, lifeline = os.pipe()
    worker = subprocess.Popen(
        _worker_command(os.getpid(), watch), stdin=subprocess.PIPE, stdout=subprocess.PIPE, pass_fds=(watch,), cwd=REPO
    )
    os.close(watch)
    try:
        assert _init(worker) == (True, None)
        worker.send_signal(signal.SIGTERM)  # the bridge lives: SIGTERM is not the worker's to act on
        time.sleep(0.5)
        assert worker.poll() is None, "a worker whose bridge lives ignores SIGTERM"
        os.close(lifeline)
        assert worker.wait(15) == 1
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()


def test_a_worker_whose_bridge_died_before_it_started_exits() -> None:
    """The race before the death signal is armed: the parent it was told of is no longer its parent."""
    watch, lifeline = os.pipe()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    try:
        worker = subprocess.Popen(_worker_command(gone.pid, watch), stdin=subprocess.PIPE, pass_fds=(watch,), cwd=REPO)
        assert worker.wait(15) == 1
    finally:
        os.close(watch)
        os.close(lifeline)


ORPHAN = """
import os, sys, time
from service.recognition.workers import exit_on_sigterm_once_orphaned
exit_on_sigterm_once_orphaned(int(sys.argv[1]))
print(os.getpid(), flush=True)
time.sleep(60)
"""


def test_an_orphaned_worker_exits_on_sigterm(tmp_path: Path) -> None:
    """The last guard, for when the others cannot fire: SIGTERM ends a worker once its bridge is gone."""
    ready = tmp_path / "orphan.pid"
    # sh starts the orphan-to-be in the background, tells it sh's pid, and exits: its parent is gone for real.
    command = f'"{sys.executable}" -c "$0" $$ > "{ready}" &'
    subprocess.run(["sh", "-c", command, ORPHAN], cwd=REPO, timeout=30, check=True)
    deadline = time.monotonic() + 30
    while not (ready.exists() and ready.read_text().strip()):  # the background shell creates it
        assert time.monotonic() < deadline, "the orphan never started"
        time.sleep(0.05)
    orphan = int(ready.read_text())
    stat = _stat(orphan)
    assert stat is not None
    os.kill(orphan, signal.SIGTERM)
    assert not _until_gone({orphan: stat[2]}, timeout=10)


async def test_a_stray_frame_does_not_hold_the_only_decoder(make_bridge: object, speech: dict) -> None:
    bridge: BridgeProcess = make_bridge(ONE_DECODER)  # type: ignore[operator]
    stray_session = random.randint(1, 0xFFFFFFFF)
    async with RawDevice(bridge.broker.host, bridge.broker.port, bridge.prefix, "stray") as stray:
        await stray.send(frames_of(speech["what_time"][:320], stray_session, 20)[0])
        await asyncio.sleep(0.5)  # its session is open (until the 30 s idle timeout)
        received = await send_utterance(
            bridge.broker.url, "good", speech["what_time"], prefix=bridge.prefix, speed=0, push_to_talk=True
        )
        final = received[-1].message
        assert isinstance(final, Transcript) and final.final and final.text == "what time is it"
        assert not any(isinstance(m, SpeechEnded) for m in stray.messages(stray_session)), "the stray session ended"
        await stray.control(Cancel(session=stray_session))


async def test_a_trickling_device_gives_the_decoder_back_and_still_gets_its_final(
    make_bridge: object, speech: dict
) -> None:
    """A push-to-talk device that sends 1 s fast, then a frame every 0.3 s for 9 s: it takes the decoder,
    gives it back while the good device waits, and gets it again (decoding from the start) for its final."""
    bridge: BridgeProcess = make_bridge(ONE_DECODER)  # type: ignore[operator]
    slow_session = random.randint(1, 0xFFFFFFFF)
    frames = frames_of(speech["weather"], slow_session, 20, last=True)
    async with RawDevice(bridge.broker.host, bridge.broker.port, bridge.prefix, "slow") as slow:
        await slow.control(Start(session=slow_session, endpointing=Endpointing.PUSH_TO_TALK))
        await slow.stream(frames[:50])
        await slow.wait_for(_partial, timeout=30)  # it holds the decoder

        async def trickle() -> None:
            for frame in frames[50:80]:
                await slow.send(frame)
                await asyncio.sleep(0.3)

        trickling = asyncio.create_task(trickle())
        received = await send_utterance(
            bridge.broker.url, "good", speech["what_time"], prefix=bridge.prefix, speed=0, push_to_talk=True
        )
        final = received[-1].message
        assert isinstance(final, Transcript) and final.final and final.text == "what time is it"
        assert not trickling.done(), "the good device was served while the slow one still trickled"
        await trickling
        await slow.stream(frames[80:])
        slow_final = await slow.wait_for(_final, timeout=30)
        assert isinstance(slow_final, Transcript) and slow_final.text == "what is the weather today"


async def test_the_pool_serves_in_order_and_one_worker_per_device() -> None:
    pool = FairPool(["w1", "w2"])
    first = await pool.acquire("a")
    # a second session of device a (superseding the first) waits although a worker is free ...
    again = asyncio.create_task(pool.acquire("a"))
    await asyncio.sleep(0)
    assert not again.done()
    # ... and does not hold up another device, which takes the free worker.
    other = await pool.acquire("b")
    assert {first, other} == {"w1", "w2"}
    late, later = asyncio.create_task(pool.acquire("c")), asyncio.create_task(pool.acquire("d"))
    await asyncio.sleep(0)
    assert pool.wanted("b") and pool.wanted("a")
    pool.release(other, "b")  # the first eligible waiter in line gets it: c (a still holds one)
    assert await late == other and not later.done() and not again.done()
    pool.release(first, "a")  # now a's second session, first in line, is served before d
    assert await again == first and not later.done()
    later.cancel()
    await asyncio.gather(later, return_exceptions=True)
    assert pool.waiting == 0
    pool.release(first, "a")
    pool.release(other, "c")
    assert await pool.acquire("d") in ("w1", "w2")
