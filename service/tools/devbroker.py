"""A private Mosquitto on a free loopback port, for the demo, tests and benchmarks.

Never the system broker on 1883: each user gets its own process and config directory.
When no ``mosquitto`` binary exists the error says how to install it. With ``tls`` the
listener speaks only TLS (``mqtts://``), for tests of the clients' certificate handling.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

INSTALL_HINT = "install it: sudo apt-get install -y mosquitto  (macOS: brew install mosquitto)"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def find_mosquitto() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()), None
    )


@dataclass(frozen=True, slots=True)
class ServerCertificate:
    """PEM files for a TLS listener: the certificate chain (leaf first) and its private key."""

    certfile: Path
    keyfile: Path


class PrivateMosquitto:
    """``with PrivateMosquitto() as broker: broker.url`` → ``mqtt://127.0.0.1:<port>`` (``mqtts://`` with ``tls``)."""

    def __init__(
        self,
        extra_config: str = "",
        *,
        port: int | None = None,
        anonymous: bool = True,
        tls: ServerCertificate | None = None,
    ) -> None:
        binary = find_mosquitto()
        if binary is None:
            raise RuntimeError(f"no mosquitto binary found; {INSTALL_HINT}")
        self.binary = binary
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self._extra = extra_config
        self._anonymous = anonymous
        self._tls = tls
        self._dir = tempfile.TemporaryDirectory(prefix="echokit-mosquitto-")
        self.config_path = Path(self._dir.name) / "mosquitto.conf"
        self.log_path = Path(self._dir.name) / "mosquitto.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'mqtts' if self._tls else 'mqtt'}://{self.host}:{self.port}"

    def start(self) -> PrivateMosquitto:
        lines = [
            f"listener {self.port} {self.host}",
            *(self._tls_lines() if self._tls else []),
            f"allow_anonymous {'true' if self._anonymous else 'false'}",
            "persistence false",
            "set_tcp_nodelay true",
            "max_queued_messages 100000",
            "max_inflight_messages 1000",
            self._extra,
        ]
        self.config_path.write_text("\n".join(lines) + "\n")
        self._process = subprocess.Popen(
            [self.binary, "-c", str(self.config_path)], stdout=self.log_path.open("wb"), stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.log_path.read_text(errors='replace')[-2000:]}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start listening within 10 s")

    def _tls_lines(self) -> list[str]:
        assert self._tls is not None
        lines = [f"certfile {self._tls.certfile}", f"keyfile {self._tls.keyfile}"]
        if os.geteuid() == 0:  # started as root, mosquitto would drop to its own user and lose the key file
            lines.append("user root")
        return lines

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
        self._process = None
        self._dir.cleanup()

    def __enter__(self) -> PrivateMosquitto:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
