"""``echokit-bridge tail`` as users run it: a subprocess watching a real bridge while devices speak."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
import uuid
from datetime import UTC, datetime

from firmware_protocol import SpeechStarted, Transcript, encode_message
from service.tools.device_sim import send_utterance
from service.tools.tail import Formatter
from tests.conftest import REPO, BridgeProcess


class Tail:
    """``python -m service.cli tail ...`` with its stdout read line by line."""

    def __init__(self, *args: str) -> None:
        self.args = args
        self.lines: list[str] = []
        self.process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> Tail:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "service.cli", "tail", *self.args,
            cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        self._reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        async for raw in self.process.stdout:
            self.lines.append(raw.decode().rstrip("\n"))

    async def wait_for(self, text: str, timeout: float = 30) -> None:
        async with asyncio.timeout(timeout):
            while not any(text in line for line in self.lines):
                assert self.process is not None and self.process.returncode is None, await self._stderr()
                await asyncio.sleep(0.05)

    async def stop(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(self.process.wait(), 10)
        if self._reader:
            await self._reader
        return code

    async def _stderr(self) -> str:
        assert self.process is not None and self.process.stderr is not None
        return (await self.process.stderr.read()).decode()


async def test_tail_shows_every_device_live(bridge: BridgeProcess, speech: dict) -> None:
    url, prefix = bridge.broker.url, bridge.prefix
    talker, noisy = f"tail-{uuid.uuid4().hex[:6]}", f"noisy-{uuid.uuid4().hex[:6]}"
    as_json = await Tail("--broker", url, "--prefix", prefix, "--json").start()
    readable = await Tail("--broker", url, "--prefix", prefix, "--device", talker).start()
    try:
        # The retained status arrives once both subscriptions are in place.
        await as_json.wait_for('"type":"status"')
        await readable.wait_for("bridge online")
        spoken, _ = await asyncio.gather(
            send_utterance(url, talker, speech["what_time"], prefix=prefix, speed=2),
            send_utterance(url, noisy, speech["noise"], prefix=prefix, speed=4),
        )
        final = spoken[-1].message
        assert isinstance(final, Transcript) and final.final
        await as_json.wait_for('"final":true,"text":"what time is it"')
        await as_json.wait_for(f'"device":"{noisy}","topic":"{prefix}/{noisy}/out/transcript"')
        await readable.wait_for("final: what time is it")
    finally:
        assert await as_json.stop() == 0
        assert await readable.stop() == 0

    records = [json.loads(line) for line in as_json.lines]
    status = records[0]
    assert status["type"] == "status" and status["state"] == "online" and status["device"] is None
    assert status["topic"] == f"{prefix}/status"
    datetime.fromisoformat(status["time"])
    mine = [r for r in records if r["device"] == talker]
    assert {r["device"] for r in records[1:]} == {talker, noisy}
    for r in mine:
        assert (
            r["topic"]
            == f"{prefix}/{talker}/out/"
            + {
                "listening": "session",
                "speech_started": "vad",
                "speech_ended": "vad",
                "transcript": "transcript",
            }[r["type"]]
        )
        assert r["session"] == final.session
    # The same messages, in the same order, as the device itself received (partials are QoS 0, left out).
    device_saw = [json.loads(encode_message(r.message)) for r in spoken]
    watched = [{k: v for k, v in r.items() if k not in ("time", "device", "topic")} for r in mine]
    assert [m for m in watched if m.get("final") is not False] == [m for m in device_saw if m.get("final") is not False]
    kinds = [r["type"] for r in mine if r.get("final") is not False]
    assert kinds == ["listening", "speech_started", "speech_ended", "transcript"]
    ended = next(r for r in mine if r["type"] == "speech_ended")
    assert ended["reason"] == "silence"

    # Readable: one line per message, only the chosen device, with its session in hex.
    text = readable.lines
    assert "bridge online (version" in text[0]
    assert all(noisy not in line for line in text)
    session = f"{final.session:08x}"
    started = next(m for m in (r.message for r in spoken) if isinstance(m, SpeechStarted))
    expected = [
        "listening (server_vad, 16000 Hz)",
        f"speech started at {started.offset_ms} ms",
        f"speech ended at {ended['offset_ms']} ms (silence)",
        f"final: what time is it  (backend pocketsphinx, {final.latency_ms} ms after end of speech)",
    ]
    shown = [line for line in text[1:] if "partial:" not in line]
    assert len(shown) == len(expected)
    for line, what in zip(shown, expected, strict=True):
        assert line.split()[1:3] == [talker, session], line
        assert line.endswith(what), line
        datetime.strptime(line.split()[0], "%H:%M:%S.%f")


def test_readable_lines_for_errors_status_changes_and_foreign_payloads() -> None:
    now = datetime(2025, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    f = Formatter("echokit", as_json=False)
    online = b'{"type":"status","state":"online","version":"0.1.0","instance":"3f9a1c2e","protocol":1}'
    assert f.line("echokit/status", online, now).endswith(  # type: ignore[union-attr]
        "bridge        -         bridge online (version 0.1.0, instance 3f9a1c2e, protocol 1)"
    )
    assert f.line("echokit/status", online, now) is None, "the same status again (a reconnect) is not news"
    assert f.line("echokit/status", b"", now) is None
    error = b'{"type":"error","code":"too_many_sessions","message":"busy","retryable":true,"session":3}'
    line = f.line("echokit/kitchen/out/error", error, now)
    assert line is not None and line.endswith("kitchen       00000003  error too_many_sessions (retryable): busy")
    assert "undecodable" in (f.line("echokit/kitchen/out/error", b"\xff", now) or "")
    assert f.line("echokit/kitchen/in/audio", b"EK", now) is None
    j = Formatter("echokit", as_json=True)
    record = json.loads(j.line("echokit/kitchen/out/vad", b'{"type":"future","x":1}', now) or "")
    assert record == {
        "time": "2025-01-02T03:04:05.678+00:00",
        "device": "kitchen",
        "topic": "echokit/kitchen/out/vad",
        "type": "future",
        "x": 1,
    }


async def test_tail_reports_an_unreachable_broker() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again before tail connects
    tail = await Tail("--broker", f"mqtt://127.0.0.1:{port}").start()
    assert tail.process is not None
    assert await asyncio.wait_for(tail.process.wait(), 30) == 1
    assert "echokit-bridge tail: broker" in await tail._stderr()
