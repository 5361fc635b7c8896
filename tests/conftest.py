"""Shared fixtures: a real Mosquitto for the whole run, and bridge processes on it.

The broker comes from testcontainers when a Docker engine answers, otherwise from the
local ``mosquitto`` binary on a free port; never from the system broker on 1883.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from service.link.client import mqtt_client
from service.tools.devbroker import PrivateMosquitto
from service.wav import read_wav_16k_mono

FIXTURES = Path(__file__).parent / "fixtures"
REPO = Path(__file__).parent.parent


@dataclass(frozen=True)
class Broker:
    host: str
    port: int
    ca_file: str | None = None
    """Set for a TLS listener: the CA that signed its certificate (then ``url`` is ``mqtts://``)."""

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.ca_file else 'mqtt'}://{self.host}:{self.port}"


def _docker_engine() -> bool:
    try:
        import docker

        docker.from_env(timeout=2).ping()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def broker() -> Iterator[Broker]:
    if _docker_engine():
        from testcontainers.mqtt import MosquittoContainer

        with MosquittoContainer("eclipse-mosquitto:2") as container:
            yield Broker(container.get_container_host_ip(), int(container.get_exposed_port(1883)))
    else:
        with PrivateMosquitto() as local:
            yield Broker(local.host, local.port)


@pytest.fixture(scope="session")
def speech() -> dict[str, np.ndarray]:
    return {path.stem: read_wav_16k_mono(path) for path in FIXTURES.glob("*.wav")}


class BridgeProcess:
    """``echokit-bridge run`` as a subprocess, with its own topic prefix on the shared broker."""

    def __init__(self, broker: Broker, tmp: Path, extra_toml: str = "", mqtt_extra: str = "") -> None:
        self.prefix = f"t{uuid.uuid4().hex[:10]}"
        self.broker = broker
        self.config_path = tmp / f"{self.prefix}.toml"
        self.log_path = tmp / f"{self.prefix}.log"
        self.config_path.write_text(
            textwrap.dedent(
                f"""
                [mqtt]
                url = "{broker.url}"
                ca_file = "{broker.ca_file or ""}"
                topic_prefix = "{self.prefix}"
                {mqtt_extra}
                [log]
                format = "json"
                level = "debug"
                """
            )
            + textwrap.dedent(extra_toml)
            # Metrics on a free port: bridges run side by side (tests/test_metrics.py reads it from the log).
            + ("" if "[metrics]" in extra_toml else '\n[metrics]\nlisten = "127.0.0.1:0"\n')
        )
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> BridgeProcess:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "run", "--config", str(self.config_path)],
            stdout=self.log_path.open("wb"),
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=env,
        )
        # A thread of its own: this runs from sync and async tests alike.
        with ThreadPoolExecutor(1) as pool:
            status = pool.submit(asyncio.run, wait_for_status(self.broker, self.prefix, "online", timeout=60)).result()
        assert status is not None, f"bridge did not come online:\n{self.log()}"
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise


async def wait_for_status(broker: Broker, prefix: str, state: str, timeout: float) -> dict[str, object] | None:
    import json

    client = mqtt_client(broker.url, identifier=f"wait-{uuid.uuid4().hex[:8]}", ca_file=broker.ca_file)
    async with asyncio.timeout(timeout), client:
        await client.subscribe(f"{prefix}/status", qos=1)
        async for message in client.messages:
            status = json.loads(bytes(message.payload))  # type: ignore[arg-type]
            if status.get("state") == state:
                return status  # type: ignore[no-any-return]
    return None


@pytest.fixture(scope="session")
def bridge(broker: Broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BridgeProcess]:
    """The default bridge: pocketsphinx open vocabulary, server VAD, small limits for tests."""
    process = BridgeProcess(
        broker,
        tmp_path_factory.mktemp("bridge"),
        """
        [asr]
        platform = "pocketsphinx"
        decoders = 2
        [session]
        max_utterance_s = 8
        max_frame_bytes = 4096
        idle_timeout_s = 3
        """,
    ).start()
    yield process
    process.stop()


@pytest.fixture
def make_bridge(broker: Broker, tmp_path: Path) -> Iterator[object]:
    started: list[BridgeProcess] = []

    def factory(extra_toml: str, mqtt_extra: str = "") -> BridgeProcess:
        process = BridgeProcess(broker, tmp_path, extra_toml, mqtt_extra).start()
        started.append(process)
        return process

    yield factory
    for process in started:
        if process.process is not None and process.process.poll() is None:
            process.stop(signal.SIGKILL)
