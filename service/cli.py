"""``echokit-bridge``: run the bridge, check a configuration file, or watch what devices are told."""

from __future__ import annotations

import argparse
import asyncio
import sys

import structlog

from service import __version__
from service.config import ConfigError, load_config
from service.observability.logs import configure
from service.recognition import BackendError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="echokit-bridge", description="EchoKit MQTT speech-recognition bridge")
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="connect to the broker and serve devices")
    run.add_argument("--config", required=True, help="TOML configuration file")
    check = sub.add_parser("check-config", help="validate a configuration file and list every problem")
    check.add_argument("path")
    from service.tools import tail

    tail.add_arguments(sub.add_parser("tail", help="print every device's voice activity, transcripts and errors, live"))
    args = parser.parse_args(argv)
    if args.command == "tail":
        return tail.run(args)

    path = args.config if args.command == "run" else args.path
    try:
        config = load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print(f"{len(exc.problems)} problem(s) in {path}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        print(f"{path}: OK (asr.platform = {config.asr.platform})")
        return 0

    configure(config.log.level, config.log.format)
    from service.bridge import Bridge

    async def serve() -> None:
        bridge = Bridge(config)
        bridge.install_signal_handlers()
        await bridge.run()

    try:
        asyncio.run(serve())
    except BackendError as exc:  # its message is the backend's own, redacted where it was raised
        print(f"echokit-bridge: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    except Exception:  # a fault at startup: one JSON log line (the traceback in it), not a bare traceback
        structlog.get_logger(__name__).exception("bridge.failed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
