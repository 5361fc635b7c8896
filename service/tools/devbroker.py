"""A private Mosquitto on a free loopback port, for the demo, tests and benchmarks.

Never the system broker on 1883: each user gets its own process and config directory.
When no ``mosquitto`` binary exists the error says how to install it.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
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


class PrivateMosquitto:
    """``with PrivateMosquitto() as broker: broker.url`` → ``mqtt://127.0.0.1:<port>``."""

    def __init__(self, extra_config: str = "", *, port: int | None = None, anonymous: bool = True) -> None:
        binary = find_mosquitto()
        if binary is None:
            raise RuntimeError(f"no mosquitto binary found; {INSTALL_HINT}")
        self.binary = binary
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self._extra = extra_config
        self._anonymous = anonymous
        self._dir = tempfile.TemporaryDirectory(prefix="echokit-mosquitto-")
        self.config_path = Path(self._dir.name) / "mosquitto.conf"
        self.log_path = Path(self._dir.name) / "mosquitto.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self) -> PrivateMosquitto:
        lines = [
            f"listener {self.port} {self.host}",
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
