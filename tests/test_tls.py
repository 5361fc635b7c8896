"""Every MQTT client over TLS: the bridge (``mqtts://`` + ``ca_file``), ``echokit-device`` and ``tail``.

The broker is a private Mosquitto with a TLS-only listener and a certificate made for this run
by a throwaway CA (``trustme``), so verification is real: without the CA file it fails.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import aiomqtt
import numpy as np
import pytest
import trustme

from firmware_protocol import Transcript
from service.tools.devbroker import PrivateMosquitto, ServerCertificate
from service.tools.device_sim import main as device_main
from service.tools.device_sim import send_utterance
from tests.conftest import FIXTURES, BridgeProcess, Broker
from tests.test_tail import Tail


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    certs = tmp_path_factory.mktemp("tls")
    certfile, keyfile, ca_file = certs / "server.pem", certs / "server.key", certs / "ca.pem"
    for i, blob in enumerate(server.cert_chain_pems):
        blob.write_to_path(str(certfile), append=i > 0)
    server.private_key_pem.write_to_path(str(keyfile))
    ca.cert_pem.write_to_path(str(ca_file))
    with PrivateMosquitto(tls=ServerCertificate(certfile, keyfile)) as broker:
        assert broker.url.startswith("mqtts://")
        yield Broker(broker.host, broker.port, ca_file=str(ca_file))


@pytest.fixture(scope="module")
def tls_bridge(tls_broker: Broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BridgeProcess]:
    """Comes online only if its link verified the broker with ``[mqtt] ca_file``."""
    bridge = BridgeProcess(
        tls_broker, tmp_path_factory.mktemp("tls-bridge"), '[asr]\nplatform = "pocketsphinx"\ndecoders = 1\n'
    ).start()
    yield bridge
    bridge.stop()


async def test_device_and_tail_over_tls(tls_bridge: BridgeProcess, speech: dict[str, np.ndarray]) -> None:
    broker = tls_bridge.broker
    assert broker.ca_file is not None
    args = ("--broker", broker.url, "--ca-file", broker.ca_file, "--prefix", tls_bridge.prefix)
    tail = await Tail(*args).start()
    try:
        await tail.wait_for("bridge online")
        received = await send_utterance(
            broker.url,
            f"tls-{uuid.uuid4().hex[:6]}",
            speech["what_time"],
            prefix=tls_bridge.prefix,
            speed=0,
            push_to_talk=True,
            ca_file=broker.ca_file,
        )
        final = received[-1].message
        assert isinstance(final, Transcript) and final.text == "what time is it"
        await tail.wait_for("final: what time is it")
    finally:
        assert await tail.stop() == 0


def test_device_command_over_tls(tls_bridge: BridgeProcess) -> None:
    broker = tls_bridge.broker
    assert broker.ca_file is not None
    argv = ["send", str(FIXTURES / "what_time.wav"), "--device", "tls-cli", "--broker", broker.url]
    argv += ["--ca-file", broker.ca_file, "--prefix", tls_bridge.prefix, "--speed", "0", "--push-to-talk"]
    assert device_main(argv) == 0


async def test_an_unknown_certificate_authority_is_refused(tls_broker: Broker, speech: dict[str, np.ndarray]) -> None:
    with pytest.raises(aiomqtt.MqttError, match="CERTIFICATE_VERIFY_FAILED"):
        await send_utterance(tls_broker.url, "no-ca", speech["what_time"], speed=0, push_to_talk=True, timeout_s=10)
    tail = await Tail("--broker", tls_broker.url).start()
    assert tail.process is not None
    assert await asyncio.wait_for(tail.process.wait(), 30) == 1
    assert "echokit-bridge tail: broker" in await tail._stderr()


def test_a_broker_url_must_be_mqtt() -> None:
    wav = FIXTURES / "what_time.wav"
    assert device_main(["send", str(wav), "--device", "x", "--broker", "http://127.0.0.1:1883"]) == 2
