"""``/metrics``, ``/healthz`` and ``/readyz`` of a real bridge process on a real Mosquitto.

The bridge listens on port 0 and logs the port it got (``metrics.listening``). Counters are
compared before and after what a device does; no timing is asserted anywhere.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from firmware_protocol import Endpointing, EndReason, Error, ErrorCode, SpeechEnded, Start, Transcript, VadEngine
from service.observability.health import HealthServer
from service.observability.metrics import BridgeMetrics
from service.recognition import BackendError, SessionOptions
from service.tools.devbroker import PrivateMosquitto
from service.tools.device_sim import frames_of, send_utterance
from tests.conftest import BridgeProcess, Broker
from tests.device import RawDevice
from tests.fakes.openai_server import FakeOpenAI, Fault
from tests.fakes.silero_vad_server import FakeSileroVadServer
from tests.test_failover import Listener, ScriptedBackend

POCKETSPHINX = """
[asr]
platform = "pocketsphinx"
decoders = 1
[metrics]
enabled = true
listen = "127.0.0.1:0"
"""

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def metrics_port(bridge: BridgeProcess, timeout: float = 10) -> int:
    """The port from the bridge's ``metrics.listening`` log event (the whole log, not its tail)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in Path(bridge.log_path).read_text(errors="replace").splitlines():
            if '"metrics.listening"' in line:
                return int(json.loads(line)["port"])
        time.sleep(0.1)
    raise AssertionError(f"no metrics.listening event in the bridge's log:\n{bridge.log()}")


async def get(port: int, path: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as client:
        return await client.get(f"http://127.0.0.1:{port}{path}")


async def scrape(port: int) -> Samples:
    response = await get(port, "/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_an_utterance_and_a_bad_frame_move_the_counters(make_bridge: object, speech: dict) -> None:
    bridge: BridgeProcess = make_bridge(POCKETSPHINX)  # type: ignore[operator]
    port = metrics_port(bridge)
    before = await scrape(port)
    assert value(before, "echokit_bridge_sessions_started_total") == 0
    assert value(before, "echokit_bridge_mqtt_connected") == 1
    assert value(before, "echokit_bridge_build_info", version="0.1.0") == 1
    for engine in VadEngine:  # every engine exported from the start, so rate() sees its first window
        assert ("echokit_bridge_vad_windows_total", frozenset({("engine", engine.value)})) in before

    audio: np.ndarray = speech["what_time"]
    received = await send_utterance(
        bridge.broker.url, "metrics01", audio, prefix=bridge.prefix, speed=0, push_to_talk=True, timeout_s=40
    )
    final = received[-1].message
    assert isinstance(final, Transcript) and final.final
    frames_sent = len(frames_of(audio, 1, last=True))

    after = await scrape(port)
    assert value(after, "echokit_bridge_sessions_started_total") == 1
    assert value(after, "echokit_bridge_sessions_refused_total") == 0
    assert value(after, "echokit_bridge_frames_received_total") == frames_sent
    for name in ("lost", "duplicated", "late", "stale"):
        assert value(after, f"echokit_bridge_frames_{name}_total") == 0, name
    assert value(after, "echokit_bridge_messages_received_total") == frames_sent + 1  # and the `start`
    assert value(after, "echokit_bridge_final_latency_seconds_count") == 1
    assert value(after, "echokit_bridge_final_latency_seconds_bucket", le="+Inf") == 1
    assert value(after, "echokit_bridge_backend_request_duration_seconds_count", backend="pocketsphinx") >= 1
    assert value(after, "echokit_bridge_backend_errors_total", backend="pocketsphinx", code="backend_error") == 0
    assert value(after, "echokit_bridge_mqtt_published_total") >= len(received)
    assert value(after, "echokit_bridge_mqtt_publish_dropped_total") == 0
    assert value(after, "echokit_bridge_event_loop_lag_seconds_count") > 0
    assert value(after, "process_cpu_seconds_total") > 0
    assert value(after, "echokit_bridge_vad_silero_windows_total") == 0  # push-to-talk: no VAD

    # The session ends just after its final is sent; then nothing is active or queued.
    deadline = time.monotonic() + 10
    while value(after, "echokit_bridge_sessions_active") and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        after = await scrape(port)
    assert value(after, "echokit_bridge_sessions_active") == 0
    assert value(after, "echokit_bridge_audio_queue_frames") == 0

    async with RawDevice(bridge.broker.host, bridge.broker.port, bridge.prefix, "metrics02") as device:
        await device.send(b"\x01\x02\x03")
        error = await device.wait_for(lambda m: isinstance(m, Error))
    assert isinstance(error, Error)
    rejected = await scrape(port)
    code = error.code.value
    assert value(rejected, "echokit_bridge_messages_rejected_total", code=code) == (
        value(after, "echokit_bridge_messages_rejected_total", code=code) + 1
    )
    assert sum(v for (name, _), v in rejected.items() if name == "echokit_bridge_messages_rejected_total") == 1
    no_device_label = [key for key in rejected if any(label in ("device", "session") for label, _ in key[1])]
    assert not no_device_label


async def test_vad_engine_counters_after_server_vad_sessions(make_bridge: object, speech: dict) -> None:
    """Three devices, three engines: Silero, WebRTC gating Silero, and a remote server that refuses."""
    async with FakeSileroVadServer() as refusing:
        refusing.refuse = True
        bridge: BridgeProcess = make_bridge(  # type: ignore[operator]
            f"""
            [asr]
            platform = "pocketsphinx"
            decoders = 1
            vad_realtime_url = "{refusing.realtime_url}"
            [metrics]
            listen = "127.0.0.1:0"
            [devices.gated]
            vad_engine = "webrtc+silero"
            [devices.far]
            vad_engine = "remote"
            """
        )
        port = metrics_port(bridge)
        before = await scrape(port)
        for name in ("silero_windows", "silero_runs", "gate_skipped_windows", "remote_fallbacks"):
            assert (f"echokit_bridge_vad_{name}_total", frozenset()) in before, name
        for device in ("plain", "gated", "far"):
            received = await send_utterance(
                bridge.broker.url, device, speech["what_time"], prefix=bridge.prefix, speed=0, timeout_s=40
            )
            assert any(isinstance(r.message, SpeechEnded) and r.message.reason is EndReason.SILENCE for r in received)
    after = await scrape(port)

    def windows(engine: VadEngine) -> float:
        return value(after, "echokit_bridge_vad_windows_total", engine=engine.value)

    # Each turn ends after some 70 windows: what_time.wav's speech, then the silence that ends it.
    silero, gated = windows(VadEngine.SILERO), windows(VadEngine.WEBRTC_SILERO)
    assert silero >= 2 * 60 and gated >= 60  # "plain", and "far" after its fallback; "gated"
    assert (windows(VadEngine.WEBRTC), windows(VadEngine.REMOTE)) == (0, 0)  # refused: nothing scored remotely
    skipped = value(after, "echokit_bridge_vad_gate_skipped_windows_total")
    assert 0 < skipped < gated
    assert value(after, "echokit_bridge_vad_remote_fallbacks_total") == 1
    silero_windows = value(after, "echokit_bridge_vad_silero_windows_total")
    assert silero_windows == silero + gated - skipped  # every window not gated went to Silero, once
    assert 1 <= value(after, "echokit_bridge_vad_silero_runs_total") <= silero_windows
    assert "vad.remote_failed" in bridge.log()


async def test_a_failover_is_counted_with_the_error_that_caused_it(make_bridge: object, speech: dict) -> None:
    async with FakeOpenAI(api_key="sk-test", default=Fault.server_error(500)) as failing:
        bridge: BridgeProcess = make_bridge(  # type: ignore[operator]
            f"""
            [asr]
            platform = "openai"
            url = "{failing.url}"
            api_key = "sk-test"
            model = "whisper-1"
            max_retries = 0
            [[asr.fallback]]
            platform = "pocketsphinx"
            decoders = 1
            [metrics]
            listen = "127.0.0.1:0"
            """
        )
        port = metrics_port(bridge)
        assert value(await scrape(port), "echokit_bridge_backend_failovers_total") == 0
        received = await send_utterance(
            bridge.broker.url, "metrics03", speech["what_time"], prefix=bridge.prefix, speed=0, push_to_talk=True
        )
    final = received[-1].message
    assert isinstance(final, Transcript) and final.backend == "pocketsphinx"
    after = await scrape(port)
    assert value(after, "echokit_bridge_backend_failovers_total") == 1
    openai_errors = [
        v
        for (name, labels), v in after.items()
        if name == "echokit_bridge_backend_errors_total" and ("backend", "openai") in labels
    ]
    assert sum(openai_errors) == 1  # under the code the HTTP policy gives a 500
    assert value(after, "echokit_bridge_backend_request_duration_seconds_count", backend="pocketsphinx") == 1


async def test_health_endpoints_and_unknown_paths(make_bridge: object) -> None:
    bridge: BridgeProcess = make_bridge(POCKETSPHINX)  # type: ignore[operator]
    port = metrics_port(bridge)
    health = await get(port, "/healthz")
    assert (health.status_code, health.text) == (200, "ok\n")
    ready = await get(port, "/readyz")
    assert (ready.status_code, ready.text) == (200, "ready\n")
    assert (await get(port, "/readyz?verbose=1")).status_code == 200
    for path in ("/", "/metrics/", "/favicon.ico", "/../etc/passwd"):
        assert (await get(port, path)).status_code == 404, path
    async with httpx.AsyncClient(timeout=10) as client:
        assert (await client.post(f"http://127.0.0.1:{port}/metrics", content=b"x")).status_code == 405
        head = await client.head(f"http://127.0.0.1:{port}/healthz")
        assert head.status_code == 200 and head.content == b""


async def test_a_full_bridge_shows_in_the_metrics(make_bridge: object, speech: dict) -> None:
    """At max_sessions: the gauges say full, the refusal is counted by reason and so is the error sent."""
    bridge: BridgeProcess = make_bridge(POCKETSPHINX + "[session]\nmax_sessions = 1\n")  # type: ignore[operator]
    port = metrics_port(bridge)
    before = await scrape(port)
    assert value(before, "echokit_bridge_sessions_max") == 1
    for reason in ("capacity", "rate", "shutdown"):  # exported at 0 from the start
        assert ("echokit_bridge_session_refusals_total", frozenset({("reason", reason)})) in before
    audio: np.ndarray = speech["what_time"]
    async with (
        RawDevice(bridge.broker.host, bridge.broker.port, bridge.prefix, "busy01") as busy,
        RawDevice(bridge.broker.host, bridge.broker.port, bridge.prefix, "refused01") as refused,
    ):
        await busy.control(Start(session=11, endpointing=Endpointing.PUSH_TO_TALK))
        await busy.stream(frames_of(audio, 11)[:5])  # no LAST: the session stays open
        deadline = time.monotonic() + 20
        while value(full := await scrape(port), "echokit_bridge_sessions_active") < 1:
            assert time.monotonic() < deadline, "the busy device's session never started"
            await asyncio.sleep(0.1)
        await refused.send(frames_of(audio, 22)[0])
        error = await refused.wait_for(lambda m: isinstance(m, Error))
        during = await scrape(port)
    assert isinstance(error, Error) and error.code is ErrorCode.TOO_MANY_SESSIONS and error.retryable
    assert value(full, "echokit_bridge_sessions_active") == value(full, "echokit_bridge_sessions_max") == 1
    capacity = "echokit_bridge_session_refusals_total"
    assert value(during, capacity, reason="capacity") == value(before, capacity, reason="capacity") + 1
    assert value(during, "echokit_bridge_sessions_refused_total") == 1
    sent = "echokit_bridge_device_errors_total"
    assert value(during, sent, outcome="sent") >= value(before, sent, outcome="sent") + 1
    assert value(during, "echokit_bridge_devices") >= 1
    assert value(during, "echokit_bridge_scrape_duration_seconds") > 0  # the previous scrape's


async def test_a_request_head_too_large_or_too_slow_is_refused(make_bridge: object) -> None:
    bridge: BridgeProcess = make_bridge(POCKETSPHINX)  # type: ignore[operator]
    port = metrics_port(bridge)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.1\r\nX-Padding: " + b"a" * 20000 + b"\r\n\r\n")
    await writer.drain()
    async with asyncio.timeout(10):
        answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 431 ")
    # A client that never finishes its request is answered and dropped (after the read timeout).
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.1\r\n")
    await writer.drain()
    async with asyncio.timeout(20):
        answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert (await get(port, "/healthz")).status_code == 200


async def test_a_taken_port_is_logged_not_raised() -> None:
    """Devices matter more than metrics: the bridge runs on without its health server."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = HealthServer("127.0.0.1", port, metrics=lambda: b"", not_ready=lambda: None)
        with capture_logs() as logs:
            assert await server.start() is False
        await server.serve()  # returns at once: nothing to serve
        await server.close()
    assert server.port is None
    assert [event["event"] for event in logs] == ["metrics.listen_failed"]
    assert f"127.0.0.1:{port}" in logs[0]["listen"]


async def test_readyz_fails_when_the_broker_is_gone(tmp_path: Path) -> None:
    with PrivateMosquitto() as private:
        bridge = BridgeProcess(Broker(private.host, private.port), tmp_path, POCKETSPHINX).start()
        try:
            port = metrics_port(bridge)
            assert (await get(port, "/readyz")).status_code == 200
            private.stop()
            deadline = time.monotonic() + 30
            while (ready := await get(port, "/readyz")).status_code == 200:
                assert time.monotonic() < deadline, "/readyz still 200 after the broker stopped"
                await asyncio.sleep(0.2)
            assert ready.status_code == 503
            assert "broker" in ready.text
            assert (await get(port, "/healthz")).status_code == 200  # alive, just not ready
            samples = await scrape(port)
            assert value(samples, "echokit_bridge_mqtt_connected") == 0
        finally:
            bridge.stop()


def test_metrics_can_be_disabled(make_bridge: object) -> None:
    bridge: BridgeProcess = make_bridge(POCKETSPHINX.replace("enabled = true", "enabled = false"))  # type: ignore[operator]
    assert "metrics.listening" not in Path(bridge.log_path).read_text(errors="replace")


@pytest.mark.parametrize("listen", ["9464", "localhost", "127.0.0.1:65536", ":9464", "127.0.0.1:http"])
def test_a_bad_listen_address_is_a_config_error(listen: str) -> None:
    from service.config import ConfigError, parse_config

    with pytest.raises(ConfigError) as caught:
        parse_config(f'[metrics]\nlisten = "{listen}"\n')
    assert [p.field for p in caught.value.problems] == ["metrics.listen"]
    assert "host:port" in str(caught.value)


async def test_each_backend_is_timed_and_its_errors_counted_under_a_label_of_its_own() -> None:
    """Two backends of one name (Groq, then OpenAI) get two labels; any exception is ``internal``."""
    metrics = BridgeMetrics(version="0.1.0")
    failing = ScriptedBackend("openai", [BackendError("slow down", code=ErrorCode.BACKEND_RATE_LIMITED)])
    first, second = metrics.instrument(ScriptedBackend("openai")), metrics.instrument(failing)
    assert (first.name, second.name) == ("openai", "openai")
    failing.errors.append(RuntimeError("a bug"))  # type: ignore[arg-type]  # not a BackendError
    for backend in (first, second, second, second):
        stream = backend.open(SessionOptions(device_id="d"), Listener())
        stream.feed(np.zeros(160, dtype=np.int16))
        try:
            await stream.finish()
        except (BackendError, RuntimeError):
            pass
    samples = {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(metrics.exposition().decode())
        for sample in family.samples
    }
    duration = "echokit_bridge_backend_request_duration_seconds_count"
    assert (value(samples, duration, backend="openai"), value(samples, duration, backend="openai#2")) == (1, 3)
    errors = "echokit_bridge_backend_errors_total"
    assert value(samples, errors, backend="openai#2", code="backend_rate_limited") == 1
    assert value(samples, errors, backend="openai#2", code="internal") == 1
    assert sum(v for (name, _), v in samples.items() if name == errors) == 2
