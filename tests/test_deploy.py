"""deploy/ as users run it: the shipped Mosquitto config, ACL and add-device.sh on a real broker.

No Docker engine is needed. The broker runs the SHIPPED deploy/mosquitto/mosquitto.conf with only
the listener ports and the file paths rewritten (checked line by line), the shipped ACL, and a
password file made by deploy/add-device.sh. On it: what each device may publish and read, what a
refusal looks like, and the real bridge (deploy/bridge.toml, the bridge user's credentials)
serving a device that uses its own credentials. docker-compose.yml and the Dockerfile are checked
against each other and against the files they mount; the image's command line runs here as it
would in the container.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from firmware_protocol import Listening
from service.tools.devbroker import find_mosquitto, free_port
from service.tools.device_sim import send_utterance
from service.wav import read_wav_16k_mono

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
SHIPPED_CONF = DEPLOY / "mosquitto" / "mosquitto.conf"
SHIPPED_ACL = DEPLOY / "mosquitto" / "acl"
ADD_DEVICE = DEPLOY / "add-device.sh"
BRIDGE_TOML = DEPLOY / "bridge.toml"
COMPOSE = DEPLOY / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
ENV_EXAMPLE = DEPLOY / ".env.example"
ECHOKIT_BRIDGE = Path(sys.executable).parent / "echokit-bridge"
WHAT_TIME = REPO / "tests" / "fixtures" / "what_time.wav"

PREFIX = "echokit"
BRIDGE_USER = "bridge"
BRIDGE_PASSWORD = "bridge-" + uuid.uuid4().hex
DEV_A = "a1b2c3d4e5f6"
DEV_B = "0a0b0c0d0e0f"
PASSWORDS = {DEV_A: "pw-a-" + uuid.uuid4().hex[:12], DEV_B: "pw-b-" + uuid.uuid4().hex[:12]}

CONTAINER_CONFIG_DIR = "/mosquitto/config/"
CONTAINER_CERTS_DIR = "/mosquitto/certs/"
TLS_BLOCK = ("#listener 8883", "#tls_version tlsv1.2")
"""First and last line of the commented TLS listener example (mutual TLS lines excluded)."""

pytestmark = pytest.mark.skipif(find_mosquitto() is None, reason="no mosquitto binary")


# ---- the shipped Mosquitto config, made runnable here ------------------------------------------


def active_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def directives(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in active_lines(text):
        name, _, value = line.partition(" ")
        found.setdefault(name, []).append(value.strip())
    return found


def runnable_config(workdir: Path, port: int, tls_port: int | None = None) -> str:
    """The shipped mosquitto.conf with only the listener ports and container paths rewritten.

    With ``tls_port`` the commented TLS listener example is uncommented first, as the README tells
    users to do. Every other line is copied verbatim; :func:`test_the_broker_runs_the_shipped_config`
    checks that.
    """
    lines = SHIPPED_CONF.read_text().splitlines()
    if tls_port is not None:
        first, last = lines.index(TLS_BLOCK[0]), lines.index(TLS_BLOCK[1])
        lines[first : last + 1] = [line.removeprefix("#") for line in lines[first : last + 1]]
    out = []
    for line in lines:
        stripped = line.strip()
        if stripped == "listener 1883":
            line = f"listener {port} 127.0.0.1"
        elif stripped == "listener 8883" and tls_port is not None:
            line = f"listener {tls_port} 127.0.0.1"
        elif not stripped.startswith("#"):
            line = line.replace(CONTAINER_CONFIG_DIR, f"{workdir}/").replace(CONTAINER_CERTS_DIR, f"{workdir}/certs/")
        out.append(line)
    return "\n".join(out) + "\n"


def add_device(*args: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(ADD_DEVICE), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        check=check,
        timeout=60,
    )


class DeployBroker:
    """A real Mosquitto on the shipped config; its directory is readable by the unprivileged user.

    Run as root, Mosquitto drops to the ``mosquitto`` user right after reading its config, before it
    opens the password file, the ACL and the certificates: as in the container (uid 1883), they must
    be readable by that user, so the directory is 0755 and not pytest's private tmp_path.
    """

    def __init__(self, tls: bool = False) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="echokit-deploy-"))
        self.dir.chmod(0o755)
        self.port = free_port()
        self.tls_port = free_port() if tls else None
        self.host = "127.0.0.1"
        self.passwd = self.dir / "passwd"
        self.log_path = self.dir / "mosquitto.log"
        self.config_path = self.dir / "mosquitto.conf"
        self.process: subprocess.Popen[bytes] | None = None
        self.outputs: dict[str, str] = {}

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def provision(self) -> dict[str, str]:
        """Credentials as a user makes them: add-device.sh for the bridge and two devices."""
        # As the README says: MQTT_PASSWORD in deploy/.env, which --bridge reads (quotes and all).
        env_file = self.dir / ".env"
        env_file.write_text(
            ENV_EXAMPLE.read_text().replace("MQTT_PASSWORD=change-me", f'MQTT_PASSWORD="{BRIDGE_PASSWORD}"')
        )
        bridge = add_device("-f", str(self.passwd), "--bridge", env={"ENV_FILE": str(env_file), "MQTT_PASSWORD": ""})
        self.outputs[BRIDGE_USER] = bridge.stdout
        for device, password in PASSWORDS.items():
            self.outputs[device] = add_device("-f", str(self.passwd), device, password).stdout
        shutil.copyfile(SHIPPED_ACL, self.dir / "acl")
        return self.outputs

    def start(self) -> DeployBroker:
        self.config_path.write_text(runnable_config(self.dir, self.port, self.tls_port))
        binary = find_mosquitto()
        assert binary is not None
        self.process = subprocess.Popen(
            [binary, "-c", str(self.config_path)], stdout=self.log_path.open("wb"), stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"mosquitto exited:\n{self.log()}"
            try:
                with socket.create_connection((self.host, self.tls_port or self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"mosquitto did not listen within 10 s:\n{self.log()}")

    def reload(self) -> None:
        """What ``docker compose kill -s SIGHUP mosquitto`` does: re-read passwords and ACL."""
        assert self.process is not None
        self.process.send_signal(signal.SIGHUP)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 10, times: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while self.log().count(text) < times:
            assert time.monotonic() < deadline, f"{text!r} not in the broker's log:\n{self.log()[-3000:]}"
            time.sleep(0.02)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def deploy_broker() -> Iterator[DeployBroker]:
    broker = DeployBroker()
    broker.provision()
    broker.start()
    yield broker
    broker.stop()


# ---- a client that shows what the broker answered -----------------------------------------------


@dataclass
class Message:
    topic: str
    payload: bytes
    retain: bool


@dataclass
class Client:
    """A paho client on its own thread that records CONNACK, SUBACK and PUBACK reason codes."""

    port: int
    username: str | None
    password: str | None
    v5: bool = True
    client_id: str = ""
    tls_ca: Path | None = None
    will: tuple[str, bytes] | None = None
    messages: list[Message] = field(default_factory=list)
    connack: ReasonCode | None = None
    disconnect: ReasonCode | None = None

    def __post_init__(self) -> None:
        self._cond = threading.Condition()
        self._subacks: dict[int, list[ReasonCode]] = {}
        self._pubacks: dict[int, ReasonCode] = {}
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id or f"test-{self.username}-{uuid.uuid4().hex[:6]}",
            protocol=paho.MQTTv5 if self.v5 else paho.MQTTv311,
            reconnect_on_failure=False,
        )
        if self.username is not None:
            self._client.username_pw_set(self.username, self.password)
        if self.tls_ca is not None:
            self._client.tls_set(ca_certs=str(self.tls_ca))
        if self.will is not None:
            self._client.will_set(self.will[0], self.will[1], qos=1, retain=True)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_publish = self._on_publish
        self._client.on_message = self._on_message

    def _notify(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        self.connack = reason
        self._notify()

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        self.disconnect = reason
        self._notify()

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, reasons: list[ReasonCode], _p: Any) -> None:
        self._subacks[mid] = reasons
        self._notify()

    def _on_publish(self, _c: Any, _u: Any, mid: int, reason: ReasonCode, _p: Any) -> None:
        self._pubacks[mid] = reason
        self._notify()

    def _on_message(self, _c: Any, _u: Any, message: paho.MQTTMessage) -> None:
        with self._cond:
            self.messages.append(Message(message.topic, bytes(message.payload), bool(message.retain)))
            self._cond.notify_all()

    def _wait(self, predicate: Any, timeout: float, what: str) -> None:
        with self._cond:
            assert self._cond.wait_for(predicate, timeout), f"{self.username}: timed out waiting for {what}"

    def connect(self, timeout: float = 10) -> ReasonCode:
        self._client.connect("127.0.0.1", self.port, keepalive=30)
        self._client.loop_start()
        self._wait(lambda: self.connack is not None or self.disconnect is not None, timeout, "CONNACK")
        assert self.connack is not None, f"no CONNACK, disconnected: {self.disconnect}"
        return self.connack

    def __enter__(self) -> Client:
        reason = self.connect()
        assert not reason.is_failure, f"{self.username} refused: {reason}"
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def drop(self) -> None:
        """Vanish without DISCONNECT, as a crashed process does: the broker sends the will."""
        sock = self._client.socket()
        if isinstance(sock, socket.socket):
            sock.shutdown(socket.SHUT_RDWR)
        self._client.loop_stop()

    def subscribe(self, topic: str, qos: int = 1) -> ReasonCode:
        _, mid = self._client.subscribe(topic, qos)
        assert mid is not None
        self._wait(lambda: mid in self._subacks, 10, f"SUBACK for {topic}")
        return self._subacks[mid][0]

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> ReasonCode:
        """QoS 1: the PUBACK's reason code. QoS 0: Success once written (nothing comes back)."""
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        self._wait(lambda: info.mid in self._pubacks or self.disconnect is not None, 10, f"PUBACK on {topic}")
        return self._pubacks.get(info.mid) or self.disconnect  # type: ignore[return-value]

    def wait_disconnected(self, timeout: float = 10) -> ReasonCode:
        self._wait(lambda: self.disconnect is not None, timeout, "the broker to disconnect")
        assert self.disconnect is not None
        return self.disconnect

    def wait_for(self, topic: str, payload: bytes | None = None, timeout: float = 10) -> Message:
        def found() -> Message | None:
            return next((m for m in self.messages if m.topic == topic and payload in (None, m.payload)), None)

        self._wait(lambda: found() is not None, timeout, f"a message on {topic}")
        message = found()
        assert message is not None
        return message

    def topics(self) -> list[str]:
        with self._cond:
            return [m.topic for m in self.messages]


def marker() -> bytes:
    return f"marker-{uuid.uuid4().hex}".encode()


def device(broker: DeployBroker, device_id: str, *, v5: bool = True) -> Client:
    return Client(broker.port, device_id, PASSWORDS[device_id], v5=v5)


def bridge_user(broker: DeployBroker) -> Client:
    return Client(broker.port, BRIDGE_USER, BRIDGE_PASSWORD)


# ---- the config that runs is the config that ships -------------------------------------------


def test_the_broker_runs_the_shipped_config(deploy_broker: DeployBroker) -> None:
    shipped, running = SHIPPED_CONF.read_text(), deploy_broker.config_path.read_text()
    changed = [(a, b) for a, b in zip(active_lines(shipped), active_lines(running), strict=True) if a != b]
    assert changed == [
        ("listener 1883", f"listener {deploy_broker.port} 127.0.0.1"),
        ("password_file /mosquitto/config/passwd", f"password_file {deploy_broker.dir}/passwd"),
        ("acl_file /mosquitto/config/acl", f"acl_file {deploy_broker.dir}/acl"),
    ]
    assert (deploy_broker.dir / "acl").read_bytes() == SHIPPED_ACL.read_bytes()
    # What the deployment promises, read from the shipped file itself.
    settings = directives(shipped)
    assert settings["allow_anonymous"] == ["false"]
    assert settings.get("per_listener_settings", ["false"]) == ["false"]  # auth and ACL apply to every listener
    assert settings["set_tcp_nodelay"] == ["true"]
    assert int(settings["max_inflight_messages"][0]) >= 1000
    assert int(settings["max_queued_messages"][0]) >= 100000
    assert int(settings["max_packet_size"][0]) > 16400 + 100  # the bridge's max_frame_bytes + topic, header
    assert settings["log_dest"] == ["stderr"]
    # The broker started cleanly; the only warning is the documented one about the status rule.
    startup = deploy_broker.log().partition(" running")[0]
    assert f"Opening ipv4 listen socket on port {deploy_broker.port}" in startup
    warnings = [line for line in startup.splitlines() if "Warning" in line or "Error" in line or "Note" in line]
    assert all("ACL pattern 'echokit/status'" in line for line in warnings), warnings


def test_add_device_prints_the_firmware_settings(deploy_broker: DeployBroker) -> None:
    printed = deploy_broker.outputs[DEV_A]
    for expected in (
        f"client id    {DEV_A}",
        f"username     {DEV_A}",
        f"password     {PASSWORDS[DEV_A]}",
        f"{PREFIX}/{DEV_A}/in/audio",
        f"{PREFIX}/{DEV_A}/in/control",
        f"{PREFIX}/{DEV_A}/out/#",
        f"{PREFIX}/status",
        "mqtt://<broker-host>:1883",
        "kill -s SIGHUP mosquitto",
    ):
        assert expected in printed
    users = [line.split(":", 1)[0] for line in deploy_broker.passwd.read_text().splitlines()]
    assert users == [BRIDGE_USER, DEV_A, DEV_B]
    assert all(":$7$" in line for line in deploy_broker.passwd.read_text().splitlines())  # hashed, not plain
    assert deploy_broker.passwd.stat().st_mode & 0o044  # readable by the broker's unprivileged user


@pytest.mark.parametrize(
    "device_id",
    ["", "aa:bb:cc:dd:ee:ff", "a.b", "a/b", "a b", "x" * 65, "+", "#", "bridge", "caf\u00e9", "a\nb", "-f"],
)
def test_add_device_refuses_invalid_ids(tmp_path: Path, device_id: str) -> None:
    passwd = tmp_path / "passwd"
    result = add_device("-f", str(passwd), "--", device_id, "pw", check=False)
    if device_id == "-f":  # a valid id ([A-Za-z0-9_-]) that looks like an option: taken after --
        assert result.returncode == 0, result.stderr
        return
    assert result.returncode == 2, result.stdout
    assert "invalid device id" in result.stderr or "bridge's user name" in result.stderr
    assert not passwd.exists()


def test_add_device_limits_and_updates(tmp_path: Path) -> None:
    passwd = tmp_path / "passwd"
    add_device("-f", str(passwd), "x" * 64, "first")
    before = passwd.read_text()
    add_device("-f", str(passwd), "x" * 64, "second")  # update, not a second line
    assert passwd.read_text().count("x" * 64) == 1 and passwd.read_text() != before
    generated = add_device("-f", str(passwd), "--prefix", "home/voice", "kitchen").stdout
    assert "home/voice/kitchen/in/audio" in generated and "generated" in generated
    add_device("-f", str(passwd), "--remove", "kitchen")
    assert "kitchen:" not in passwd.read_text()
    env_file = tmp_path / "env"
    env_file.write_text('OTHER=1\nMQTT_PASSWORD="from env file"\n')
    environment = {"ENV_FILE": str(env_file)}
    result = add_device("-f", str(passwd), "--bridge", env={**environment, "MQTT_PASSWORD": ""})
    assert "Bridge user 'bridge'" in result.stdout and "Generated" not in result.stdout
    env_file.write_text(ENV_EXAMPLE.read_text())  # copied but not edited
    result = add_device("-f", str(passwd), "--bridge", env={**environment, "MQTT_PASSWORD": ""}, check=False)
    assert result.returncode == 2 and "change-me" in result.stderr


# ---- what the ACL lets through -------------------------------------------------------------------


def test_device_reaches_the_bridge_only_on_its_own_topics(deploy_broker: DeployBroker) -> None:
    with bridge_user(deploy_broker) as bridge, device(deploy_broker, DEV_A) as a:
        assert bridge.subscribe(f"{PREFIX}/+/in/audio").getName() == "Granted QoS 1"
        assert bridge.subscribe(f"{PREFIX}/+/in/control").getName() == "Granted QoS 1"
        own = marker()
        assert a.publish(f"{PREFIX}/{DEV_A}/in/audio", own, qos=0).getName() == "Success"
        bridge.wait_for(f"{PREFIX}/{DEV_A}/in/audio", own)
        assert a.publish(f"{PREFIX}/{DEV_A}/in/control", b'{"type":"start","session":1}', qos=1).getName() == "Success"
        bridge.wait_for(f"{PREFIX}/{DEV_A}/in/control")

        # QoS 0 as device B: dropped without a word. QoS 1 over MQTT 5: PUBACK 0x87 Not authorized.
        forged = marker()
        assert a.publish(f"{PREFIX}/{DEV_B}/in/audio", forged, qos=0).getName() == "Success"
        refused = a.publish(f"{PREFIX}/{DEV_B}/in/audio", forged, qos=1)
        assert refused.getName() == "Not authorized" and refused.value == 0x87
        assert a.publish(f"{PREFIX}/{DEV_B}/in/control", b'{"type":"cancel","session":1}', qos=1).value == 0x87
        # Messages from one client keep their order: once this arrives, the forged ones would have.
        after = marker()
        a.publish(f"{PREFIX}/{DEV_A}/in/audio", after, qos=1)
        bridge.wait_for(f"{PREFIX}/{DEV_A}/in/audio", after)
        assert f"{PREFIX}/{DEV_B}/in/audio" not in bridge.topics()
        assert f"{PREFIX}/{DEV_B}/in/control" not in bridge.topics()


def test_mqtt311_device_gets_no_sign_of_a_refused_publish(deploy_broker: DeployBroker) -> None:
    """As ESP-MQTT sees it: a 3.1.1 PUBACK has no reason code, so a refused QoS 1 looks delivered."""
    with bridge_user(deploy_broker) as bridge, device(deploy_broker, DEV_A, v5=False) as a:
        bridge.subscribe(f"{PREFIX}/+/in/#")
        assert not a.publish(f"{PREFIX}/{DEV_B}/in/audio", marker(), qos=1).is_failure
        after = marker()
        a.publish(f"{PREFIX}/{DEV_A}/in/audio", after, qos=1)
        bridge.wait_for(f"{PREFIX}/{DEV_A}/in/audio", after)
        assert bridge.topics() == [f"{PREFIX}/{DEV_A}/in/audio"]


def test_device_cannot_pose_as_the_bridge(deploy_broker: DeployBroker) -> None:
    with bridge_user(deploy_broker) as bridge, device(deploy_broker, DEV_A) as a, device(deploy_broker, DEV_B) as b:
        b.subscribe(f"{PREFIX}/{DEV_B}/out/#")
        b.subscribe(f"{PREFIX}/status")
        assert a.publish(f"{PREFIX}/{DEV_B}/out/transcript", b"forged", qos=1).value == 0x87
        assert a.publish(f"{PREFIX}/{DEV_A}/out/transcript", b"forged", qos=1).value == 0x87  # not even its own
        assert a.publish(f"{PREFIX}/status", b'{"state":"offline"}', qos=1, retain=True).value == 0x87
        after = marker()
        bridge.publish(f"{PREFIX}/{DEV_B}/out/vad", after, qos=1)
        b.wait_for(f"{PREFIX}/{DEV_B}/out/vad", after)
        assert [m.payload for m in b.messages if m.payload in (b"forged", b'{"state":"offline"}')] == []


def test_device_reads_only_its_own_replies_and_the_status(deploy_broker: DeployBroker) -> None:
    with bridge_user(deploy_broker) as bridge, device(deploy_broker, DEV_A) as a, device(deploy_broker, DEV_B) as b:
        # Mosquitto 2.0 grants every SUBSCRIBE (an MQTT 5 SUBACK could say 0x87; 2.0.11 does not)
        # and applies the ACL to each message it would deliver.
        for topic in (f"{PREFIX}/{DEV_B}/out/#", f"{PREFIX}/+/out/#", f"{PREFIX}/{DEV_B}/in/#", f"{PREFIX}/#"):
            assert a.subscribe(topic).getName() in ("Granted QoS 1", "Not authorized")
        assert a.subscribe(f"{PREFIX}/{DEV_A}/out/#").getName() == "Granted QoS 1"
        assert a.subscribe(f"{PREFIX}/status").getName() == "Granted QoS 1"

        secret = marker()
        assert bridge.publish(f"{PREFIX}/{DEV_B}/out/transcript", secret, qos=1).getName() == "Success"
        assert b.publish(f"{PREFIX}/{DEV_B}/in/audio", secret, qos=1).getName() == "Success"  # B's microphone
        status = b'{"type":"status","state":"online"}'
        assert bridge.publish(f"{PREFIX}/status", status, qos=1, retain=True).getName() == "Success"
        own = marker()
        bridge.publish(f"{PREFIX}/{DEV_A}/out/transcript", own, qos=1)
        a.wait_for(f"{PREFIX}/{DEV_A}/out/transcript", own)
        a.wait_for(f"{PREFIX}/status", status)
        assert not any(m.payload == secret for m in a.messages)
        assert not any(DEV_B in m.topic for m in a.messages)
    with device(deploy_broker, DEV_B) as late:
        late.subscribe(f"{PREFIX}/status")
        assert late.wait_for(f"{PREFIX}/status", status).retain  # retained for devices that come later
    with bridge_user(deploy_broker) as bridge:
        bridge.publish(f"{PREFIX}/status", b"", qos=1, retain=True)  # clear it for the next tests


def test_the_bridge_users_last_will_reaches_devices_and_a_devices_does_not(deploy_broker: DeployBroker) -> None:
    offline = b'{"type":"status","state":"offline","instance":"' + uuid.uuid4().hex[:8].encode() + b'"}'
    with device(deploy_broker, DEV_A) as a:
        a.subscribe(f"{PREFIX}/status")
        spoofer = Client(
            deploy_broker.port, DEV_B, PASSWORDS[DEV_B], client_id="spoofer-" + uuid.uuid4().hex[:6],
            will=(f"{PREFIX}/status", b"spoofed"),
        )  # fmt: skip
        # use_username_as_clientid: the broker names the connection after its user, not the id sent.
        closed = f"Client {DEV_B} closed its connection"
        before = deploy_broker.log().count(closed)
        spoofer.connect()
        spoofer.drop()
        # Mosquitto handles (and here drops) a will as it notices the connection is gone.
        deploy_broker.wait_for_log(closed, times=before + 1)
        crashed = Client(deploy_broker.port, BRIDGE_USER, BRIDGE_PASSWORD, will=(f"{PREFIX}/status", offline))
        crashed.connect()
        crashed.drop()
        assert a.wait_for(f"{PREFIX}/status", offline).payload == offline
        assert not any(m.payload == b"spoofed" for m in a.messages)
    with bridge_user(deploy_broker) as bridge:
        bridge.publish(f"{PREFIX}/status", b"", qos=1, retain=True)


@pytest.mark.parametrize("v5", [True, False], ids=["mqtt5", "mqtt311"])
def test_wrong_password_unknown_user_and_anonymous_are_refused(deploy_broker: DeployBroker, v5: bool) -> None:
    attempts = {
        "wrong password": (DEV_A, "not-the-password"),
        "another device's password": (DEV_A, PASSWORDS[DEV_B]),
        "unknown user": ("ffffffffffff", "whatever"),
        "anonymous": (None, None),
        "no password": (DEV_A, None),
    }
    for what, (username, password) in attempts.items():
        client = Client(deploy_broker.port, username, password, v5=v5)
        try:
            reason = client.connect()
        finally:
            client.close()
        # MQTT 5: CONNACK 0x87 Not authorized; 3.1.1: return code 5, which paho names the same.
        assert reason.getName() == "Not authorized", (what, reason)
    assert "disconnected, not authorised" in deploy_broker.log()


def test_oversized_packet_disconnects_the_device(deploy_broker: DeployBroker) -> None:
    with bridge_user(deploy_broker) as bridge:
        bridge.subscribe(f"{PREFIX}/+/in/audio")
        with device(deploy_broker, DEV_A, v5=False) as a:
            largest = os.urandom(16400)  # the bridge's default session.max_frame_bytes
            a.publish(f"{PREFIX}/{DEV_A}/in/audio", largest, qos=1)
            bridge.wait_for(f"{PREFIX}/{DEV_A}/in/audio", largest)
        huge = Client(deploy_broker.port, DEV_A, PASSWORDS[DEV_A], v5=False)
        huge.connect()
        huge.publish(f"{PREFIX}/{DEV_A}/in/audio", bytes(70000), qos=0)
        huge.wait_disconnected()
        huge.close()
        with device(deploy_broker, DEV_A, v5=False) as a:
            after = marker()
            a.publish(f"{PREFIX}/{DEV_A}/in/audio", after, qos=1)
            bridge.wait_for(f"{PREFIX}/{DEV_A}/in/audio", after)
        assert all(len(m.payload) <= 16400 for m in bridge.messages)
    assert "disconnected due to oversize packet" in deploy_broker.log()


def test_a_device_added_while_running_gets_in_after_a_reload(deploy_broker: DeployBroker) -> None:
    newcomer, password = "newdevice01", "pw-" + uuid.uuid4().hex[:8]
    add_device("-f", str(deploy_broker.passwd), newcomer, password)
    deploy_broker.reload()
    deadline = time.monotonic() + 10
    while True:
        client = Client(deploy_broker.port, newcomer, password)
        try:
            reason = client.connect()
        finally:
            client.close()
        if not reason.is_failure or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert reason.getName() == "Success"
    with Client(deploy_broker.port, newcomer, password) as client:  # and the ACL's %u covers it at once
        # MQTT 5 says 0x10 "No matching subscribers" here (no bridge is listening): allowed all the same.
        assert not client.publish(f"{PREFIX}/{newcomer}/in/audio", b"x", qos=1).is_failure
        assert client.publish(f"{PREFIX}/{DEV_A}/in/audio", b"x", qos=1).value == 0x87


# ---- the real bridge through the ACL'd broker --------------------------------------------------


def test_real_bridge_serves_a_device_through_the_acl(deploy_broker: DeployBroker, tmp_path: Path) -> None:
    shipped = BRIDGE_TOML.read_text()
    assert 'url = "mqtt://mosquitto:1883"' in shipped
    config = tmp_path / "bridge.toml"
    config.write_text(shipped.replace("mqtt://mosquitto:1883", deploy_broker.url))
    log_path = tmp_path / "bridge.log"
    env = {**os.environ, "MQTT_PASSWORD": BRIDGE_PASSWORD, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [str(ECHOKIT_BRIDGE), "run", "--config", str(config)],
        stdout=log_path.open("wb"),
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
        env=env,
    )

    async def status(state: str) -> dict[str, Any]:
        # Read as device A: devices may read the bridge's status.
        async with (
            asyncio.timeout(60),
            aiomqtt.Client(deploy_broker.host, deploy_broker.port, username=DEV_A, password=PASSWORDS[DEV_A]) as c,
        ):
            await c.subscribe(f"{PREFIX}/status", qos=1)
            async for message in c.messages:
                status: dict[str, Any] = json.loads(bytes(message.payload)) if message.payload else {}
                if status.get("state") == state:
                    return status
        raise AssertionError("unreachable")

    try:
        online = asyncio.run(status("online"))
        pcm = read_wav_16k_mono(WHAT_TIME)
        received = asyncio.run(
            send_utterance(
                deploy_broker.url,
                DEV_A,
                pcm,
                prefix=PREFIX,
                username=DEV_A,
                password=PASSWORDS[DEV_A],
                speed=2,
                timeout_s=40,
            )
        )
        final = received[-1].message
        assert getattr(final, "final", False) and final.text == "what time is it", received  # type: ignore[union-attr]
        assert isinstance(received[0].message, Listening)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        offline = asyncio.run(status("offline"))  # retained: the bridge may write its status
        assert offline["instance"] == online["instance"]
    except BaseException:
        print(log_path.read_text(errors="replace")[-5000:])
        raise
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    with bridge_user(deploy_broker) as bridge:
        bridge.publish(f"{PREFIX}/status", b"", qos=1, retain=True)


# ---- client-id takeover -------------------------------------------------------------------------


def test_a_client_id_takes_over_nobody_but_its_own_user(deploy_broker: DeployBroker) -> None:
    """use_username_as_clientid: whatever id a device sends, it can only knock off its own user's connection."""
    with bridge_user(deploy_broker) as bridge, device(deploy_broker, DEV_B) as b:
        b.subscribe(f"{PREFIX}/{DEV_B}/out/#")
        for stolen in (DEV_B, BRIDGE_USER, "echokit-bridge-0123abcd-00000000"):
            with Client(deploy_broker.port, DEV_A, PASSWORDS[DEV_A], client_id=stolen) as attacker:
                assert attacker.connack is not None and not attacker.connack.is_failure
        after = marker()
        assert bridge.publish(f"{PREFIX}/{DEV_B}/out/vad", after, qos=1).getName() == "Success"
        b.wait_for(f"{PREFIX}/{DEV_B}/out/vad", after)
        assert b.disconnect is None and bridge.disconnect is None
        # The same user twice is still one connection: the newer takes over. (MQTT 5 has reason 0x8E
        # for it; Mosquitto 2.0.11 just closes the socket, which paho reports as 0x80.)
        with device(deploy_broker, DEV_B):
            assert b.wait_disconnected().value in (0x8E, 0x80)


def _start_shipped_bridge(deploy_broker: DeployBroker, tmp_path: Path) -> tuple[subprocess.Popen[bytes], Path]:
    config = tmp_path / "bridge.toml"
    shipped = BRIDGE_TOML.read_text().replace("mqtt://mosquitto:1883", deploy_broker.url)
    config.write_text(shipped + '\n[metrics]\nlisten = "127.0.0.1:0"\n')  # beside other bridges on this machine
    log_path = tmp_path / "bridge.log"
    process = subprocess.Popen(
        [str(ECHOKIT_BRIDGE), "run", "--config", str(config)],
        stdout=log_path.open("wb"),
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
        env={**os.environ, "MQTT_PASSWORD": BRIDGE_PASSWORD, "PYTHONUNBUFFERED": "1"},
    )
    return process, log_path


def test_the_bridge_notices_being_taken_over_and_backs_off(deploy_broker: DeployBroker, tmp_path: Path) -> None:
    process, log_path = _start_shipped_bridge(deploy_broker, tmp_path)

    def connections() -> int:
        return log_path.read_text(errors="replace").count('"mqtt.connected"')

    def wait_for_connections(count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while connections() < count:
            assert process.poll() is None and time.monotonic() < deadline, log_path.read_text(errors="replace")
            time.sleep(0.05)

    try:
        wait_for_connections(1, 60)
        for attack in range(1, 7):  # the bridge user's password, leaked: each connection knocks the bridge off
            with Client(deploy_broker.port, BRIDGE_USER, BRIDGE_PASSWORD):
                time.sleep(0.2)
            if '"mqtt.taken_over"' in log_path.read_text(errors="replace"):
                break
            wait_for_connections(attack + 1, 30)
        log = [json.loads(line) for line in log_path.read_text().splitlines()]
        taken = [entry for entry in log if entry["event"] == "mqtt.taken_over"]
        assert taken and "own client id and broker user" in taken[0]["hint"], log
        retries = [entry["retry_in_s"] for entry in log if entry["event"] == "mqtt.disconnected"]
        assert retries == sorted(retries) and retries[-1] > retries[0]  # backing off, not flapping at once
        wait_for_connections(connections() + 1, 40)  # left alone, it comes back
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    except BaseException:
        print(log_path.read_text(errors="replace")[-5000:])
        raise
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    with bridge_user(deploy_broker) as bridge:
        bridge.publish(f"{PREFIX}/status", b"", qos=1, retain=True)


# ---- the optional TLS listener, uncommented as the README says -------------------------------


def _make_certificates(certs: Path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl binary to make test certificates")
    certs.mkdir()
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, cwd=certs, timeout=60)

    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=echokit test CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    run("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    (certs / "server.ext").write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
    )
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.crt", "-days", "2", "-extfile", "server.ext")  # fmt: skip
    for path in certs.iterdir():
        path.chmod(0o644)  # the broker's unprivileged user reads them (the image: uid 1883)


def test_the_commented_tls_listener_works_when_uncommented() -> None:
    broker = DeployBroker(tls=True)
    try:
        broker.provision()
        _make_certificates(broker.dir / "certs")
        broker.start()
        assert broker.tls_port is not None
        running = active_lines(broker.config_path.read_text())
        assert f"listener {broker.tls_port} 127.0.0.1" in running
        assert f"certfile {broker.dir}/certs/server.crt" in running
        ca = broker.dir / "certs" / "ca.crt"
        with bridge_user(broker) as bridge:  # the bridge stays on the plain listener
            bridge.subscribe(f"{PREFIX}/+/in/audio")
            for v5 in (False, True):
                with Client(broker.tls_port, DEV_A, PASSWORDS[DEV_A], v5=v5, tls_ca=ca) as a:
                    payload = marker()
                    a.publish(f"{PREFIX}/{DEV_A}/in/audio", payload, qos=1)
                    bridge.wait_for(f"{PREFIX}/{DEV_A}/in/audio", payload)
                    if v5:  # the ACL applies on this listener too
                        assert a.publish(f"{PREFIX}/{DEV_B}/in/audio", payload, qos=1).value == 0x87
        # Passwords are global too: the TLS listener refuses the anonymous and wrong passwords.
        for username, password in ((None, None), (DEV_A, "wrong")):
            client = Client(broker.tls_port, username, password, tls_ca=ca)
            try:
                assert client.connect().getName() == "Not authorized"
            finally:
                client.close()
    finally:
        broker.stop()


# ---- compose, Dockerfile, bridge.toml and .env.example agree -----------------------------------


def _volumes(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """target → (source, read_only), for short and long volume syntax."""
    found = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target, *options = volume.split(":")
            found[target] = (source, "ro" in (options[0].split(",") if options else []))
        else:
            found[volume["target"]] = (volume["source"], bool(volume.get("read_only", False)))
    return found


def _env_names(text: str) -> set[str]:
    return {line.split("=", 1)[0].strip() for line in active_lines(text) if "=" in line}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(loaded, dict)
    return loaded


def test_compose_mosquitto_mounts_the_shipped_files(compose: dict[str, Any]) -> None:
    mosquitto = compose["services"]["mosquitto"]
    assert mosquitto["image"].startswith("eclipse-mosquitto:2")
    assert mosquitto["restart"] == "unless-stopped"
    assert "1883:1883" in [str(p) for p in mosquitto["ports"]]
    assert re.search(r'^\s*#\s*- "8883:8883"', COMPOSE.read_text(), re.M)  # the TLS port, documented
    assert "#listener 8883" in SHIPPED_CONF.read_text().splitlines()
    volumes = _volumes(mosquitto)
    conf = directives(SHIPPED_CONF.read_text())
    assert volumes["/mosquitto/config/mosquitto.conf"] == ("./mosquitto/mosquitto.conf", True)
    assert volumes[conf["acl_file"][0]] == ("./mosquitto/acl", True)
    assert volumes[conf["password_file"][0]][0] == "./mosquitto/passwd"  # writable: add-device.sh --compose
    passwd_mount = next(v for v in mosquitto["volumes"] if isinstance(v, dict) and v["source"] == "./mosquitto/passwd")
    assert passwd_mount["bind"]["create_host_path"] is False  # else Docker makes a directory of it
    for source, _ in volumes.values():
        if not source.endswith("passwd"):
            assert (DEPLOY / source).is_file(), source
    assert "mosquitto/passwd" in (DEPLOY / ".gitignore").read_text().splitlines()


def test_compose_bridge_uses_the_image_config_path_and_env_file(compose: dict[str, Any]) -> None:
    bridge = compose["services"]["bridge"]
    assert (DEPLOY / bridge["build"]["context"]).resolve() == REPO
    assert (REPO / bridge["build"]["dockerfile"]).resolve() == DOCKERFILE
    assert bridge["restart"] == "unless-stopped"
    depends = bridge["depends_on"]
    assert "mosquitto" in (depends if isinstance(depends, list) else list(depends))
    env_files = bridge["env_file"] if isinstance(bridge["env_file"], list) else [bridge["env_file"]]
    assert ".env" in [e if isinstance(e, str) else e["path"] for e in env_files]
    assert ".env" in (DEPLOY / ".gitignore").read_text().splitlines()
    config_path = _dockerfile_command()[-1]
    assert _volumes(bridge)[config_path] == ("./bridge.toml", True)
    assert (DEPLOY / "bridge.toml").is_file()
    grace = str(bridge.get("stop_grace_period", "10s"))
    assert grace.endswith("s") and int(grace[:-1]) > 10  # the bridge drains sessions for up to 10 s
    # bridge.toml talks to that broker, as the ACL's bridge user, with the password from .env.
    mqtt = tomllib.loads(BRIDGE_TOML.read_text())["mqtt"]
    assert mqtt["url"] == "mqtt://mosquitto:1883" and "mosquitto" in compose["services"]
    assert mqtt["username"] == BRIDGE_USER
    assert f"user {BRIDGE_USER}" in active_lines(SHIPPED_ACL.read_text())
    assert mqtt["password"] == "${MQTT_PASSWORD}"
    rules = [line.split() for line in active_lines(SHIPPED_ACL.read_text()) if line.startswith(("topic ", "pattern "))]
    # Every rule is under the bridge's prefix, except Home Assistant's discovery topics.
    assert rules and all(rule[-1].startswith((f"{mqtt['topic_prefix']}/", "homeassistant/")) for rule in rules)


def test_env_example_defines_what_bridge_toml_reads() -> None:
    wanted = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", "\n".join(active_lines(BRIDGE_TOML.read_text()))))
    assert wanted == {"MQTT_PASSWORD"}
    example = ENV_EXAMPLE.read_text()
    assert wanted <= _env_names(example)
    commented = {line.lstrip("# ").split("=", 1)[0] for line in example.splitlines() if re.match(r"#\s*[A-Z_]+=", line)}
    assert {"OPENAI_API_KEY", "DASHSCOPE_API_KEY", "ELEVENLABS_API_KEY"} <= commented


def test_acl_confines_devices_by_username() -> None:
    acl = active_lines(SHIPPED_ACL.read_text())
    assert f"pattern write {PREFIX}/%u/in/#" in acl
    assert f"pattern read {PREFIX}/%u/out/#" in acl
    assert f"pattern read {PREFIX}/status" in acl
    assert not any("%c" in line for line in acl)  # the client id is the device's to choose
    bridge = acl[acl.index(f"user {BRIDGE_USER}") + 1 :]
    bridge = bridge[: next((i for i, line in enumerate(bridge) if not line.startswith("topic ")), len(bridge))]
    assert set(bridge) == {
        f"topic read {PREFIX}/+/in/#",
        f"topic write {PREFIX}/+/out/#",
        f"topic readwrite {PREFIX}/status",
        # Home Assistant discovery ([homeassistant] enabled): entity state and configs, HA's birth message.
        f"topic write {PREFIX}/+/ha/#",
        "topic write homeassistant/device/#",
        "topic read homeassistant/status",
    }


# ---- the Dockerfile --------------------------------------------------------------------------


def _dockerfile() -> list[tuple[int, str, str]]:
    """(stage, INSTRUCTION, arguments) with continuations joined and comments dropped."""
    instructions, stage, pending = [], -1, ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        name, _, args = line.partition(" ")
        if name.upper() == "FROM":
            stage += 1
        instructions.append((stage, name.upper(), args.strip()))
    return instructions


def _final_stage() -> list[tuple[str, str]]:
    parsed = _dockerfile()
    last = max(stage for stage, _, _ in parsed)
    return [(name, args) for stage, name, args in parsed if stage == last]


def _dockerfile_command() -> list[str]:
    final = dict(_final_stage())  # the last ENTRYPOINT and CMD win
    return [*json.loads(final["ENTRYPOINT"]), *json.loads(final["CMD"])]


def _healthcheck_command() -> list[str]:
    args = dict(_final_stage())["HEALTHCHECK"]
    command: list[str] = json.loads(args[args.index("CMD") + 3 :].strip())
    return command


def test_dockerfile_runs_the_bridge_on_the_mounted_config() -> None:
    assert _dockerfile_command() == ["echokit-bridge", "run", "--config", "/config/bridge.toml"]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["echokit-bridge"] == "service.cli:main"


def test_dockerfile_is_multi_stage_slim_and_non_root() -> None:
    parsed = _dockerfile()
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for _, name, a in parsed if name == "ARG" and "=" in a}
    froms = [a for _, name, a in parsed if name == "FROM"]
    assert len(froms) >= 2 and " AS builder" in froms[0]
    runtime = froms[-1].split()[0].replace("${PYTHON_IMAGE}", args.get("PYTHON_IMAGE", ""))
    assert runtime == "python:3.11-slim"
    final = _final_stage()
    assert any(name == "COPY" and a.startswith("--from=builder") for name, a in final)
    user = [a for name, a in final if name == "USER"][-1]
    assert user.split(":")[0] not in ("root", "0")
    assert not any(name == "RUN" and "apt-get install" in a for name, a in final)
    runs = " ".join(a for _, name, a in parsed if name == "RUN")
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert not re.search(r"\.\[|\[(test|dev)\]", runs)  # no extras installed
    for requirement in extras["test"] + extras["dev"]:
        name = re.split(r"[<>=\[]", requirement)[0]
        assert not re.search(rf"\b{re.escape(name)}\b", runs), requirement
    assert "/healthz" in DOCKERFILE.read_text()  # noted: the health check changes with the metrics work
    assert _healthcheck_command()[:2] == ["echokit-bridge", "check-config"]
    assert _healthcheck_command()[-1] == _dockerfile_command()[-1]


def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    """Docker's pattern syntax: ``*`` and ``?`` stay within one path level, ``**`` spans levels."""
    regex, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            regex, i = regex + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            regex, i = regex + ".*", i + 2
        elif pattern[i] == "*":
            regex, i = regex + "[^/]*", i + 1
        elif pattern[i] == "?":
            regex, i = regex + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            regex, i = regex + pattern[i : end + 1], end + 1
        else:
            regex, i = regex + re.escape(pattern[i]), i + 1
    return re.compile(regex)


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _dockerignore_regex(pattern.removeprefix("!").strip("/"))
        if any(regex.fullmatch(candidate) for candidate in candidates):
            ignored = not negate
    return ignored


def test_dockerignore_sends_what_the_build_copies_and_no_secrets() -> None:
    patterns = active_lines((REPO / ".dockerignore").read_text())
    copied = []
    for _stage, name, args in _dockerfile():
        if name == "COPY" and not args.startswith("--from"):
            copied += args.split()[:-1]
    assert {"pyproject.toml", "README.md", "firmware_protocol/", "service/"} <= set(copied)
    for source in copied:
        assert (REPO / source).exists(), source
        assert not _dockerignored(source.rstrip("/"), patterns), source
    assert not _dockerignored("service/cli.py", patterns)
    assert not _dockerignored("firmware_protocol/vectors/frame_first.bin", patterns)
    for secret_or_junk in (
        "deploy/.env",
        "deploy/mosquitto/passwd",
        ".venv/bin/python",
        ".git/config",
        "tests/test_deploy.py",
        "service/__pycache__/cli.cpython-311.pyc",
    ):
        assert _dockerignored(secret_or_junk, patterns), secret_or_junk


def test_image_health_check_runs_here_with_and_without_the_secret() -> None:
    """The HEALTHCHECK's command line, on the shipped bridge.toml: exit 0 with MQTT_PASSWORD, 2 without."""
    command = _healthcheck_command()
    argv = [str(ECHOKIT_BRIDGE), *command[1:-1], str(BRIDGE_TOML)]
    assert ECHOKIT_BRIDGE.exists()
    env = {k: v for k, v in os.environ.items() if k != "MQTT_PASSWORD"}
    ok = subprocess.run(argv, env={**env, "MQTT_PASSWORD": "secret"}, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert "OK (asr.platform = pocketsphinx)" in ok.stdout
    missing = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2
    assert "mqtt.password: environment variable MQTT_PASSWORD is not set" in missing.stderr


def test_bridge_toml_is_the_config_the_readme_talks_about() -> None:
    config = tomllib.loads(BRIDGE_TOML.read_text())
    assert config["asr"]["platform"] == "pocketsphinx"
    assert config["mqtt"]["topic_prefix"] == PREFIX
