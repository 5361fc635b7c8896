"""``echokit-device``: a simulated EchoKit device that streams a WAV file over MQTT.

It speaks MQTT 3.1.1, as ESP-MQTT does by default, and follows PROTOCOL.md exactly:
frames of ``--frame-ms`` at real-time pace (or ``--speed N``), a ``start`` control
message first, trailing microphone silence until the bridge says the speech ended
(server VAD) or a LAST frame (push-to-talk).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiomqtt
import numpy as np

from firmware_protocol import (
    SAMPLE_RATE,
    SAMPLES_PER_MS,
    AudioFrame,
    BridgeMessage,
    Endpointing,
    Error,
    FrameFlags,
    ProtocolError,
    SpeechEnded,
    Start,
    TopicKind,
    Topics,
    Transcript,
    decode_bridge_message,
    encode_message,
    ends_session,
)
from service.link.client import BrokerAddress, mqtt_client
from service.redact import redact_url
from service.tools.describe import describe
from service.wav import UnsupportedAudio, read_wav_16k_mono


@dataclass(frozen=True, slots=True)
class Received:
    at: float  # seconds since the first frame was sent
    message: BridgeMessage


def frames_of(
    pcm: np.ndarray, session_id: int, frame_ms: int = 20, *, last: bool = False, start_seq: int = 0
) -> list[AudioFrame]:
    """Cut int16 samples into protocol frames; FIRST on seq 0, LAST on the final one if asked."""
    step = SAMPLES_PER_MS * frame_ms
    chunks = [pcm[i : i + step] for i in range(0, len(pcm), step)] or [pcm[:0]]
    frames = []
    for i, chunk in enumerate(chunks):
        seq = start_seq + i
        flags = FrameFlags.FIRST if seq == 0 else FrameFlags.NONE
        if last and i == len(chunks) - 1:
            flags |= FrameFlags.LAST
        frames.append(AudioFrame(session_id=session_id, seq=seq, payload=chunk.astype("<i2").tobytes(), flags=flags))
    return frames


def utterance_frames(
    pcm: np.ndarray, session_id: int, frame_ms: int, *, push_to_talk: bool, trailing_silence_s: float
) -> list[AudioFrame]:
    """The speech, then a LAST flag (push-to-talk) or trailing microphone silence (server VAD)."""
    frames = frames_of(pcm, session_id, frame_ms, last=push_to_talk)
    if not push_to_talk:
        silence = np.zeros(int(SAMPLE_RATE * trailing_silence_s), dtype=np.int16)
        frames += frames_of(silence, session_id, frame_ms, start_seq=len(frames))
    return frames


class Turn:
    """What the bridge says about one session, kept until the turn is over."""

    def __init__(self, session_id: int, on_message: Callable[[Received], None] | None) -> None:
        self.session_id = session_id
        self.received: list[Received] = []
        self.speech_ended = asyncio.Event()
        """Set on ``speech_ended``: a real device stops sending then."""
        self._on_message = on_message

    def take(self, payload: bytes, at: float) -> bool:
        """Record one message for this session; ``True`` once it ended the turn (a final or a fatal error)."""
        try:
            decoded = decode_bridge_message(payload)
        except ProtocolError:
            return False
        if getattr(decoded, "session", None) not in (self.session_id, None):
            return False
        item = Received(at, decoded)
        self.received.append(item)
        if self._on_message:
            self._on_message(item)
        if isinstance(decoded, SpeechEnded):
            self.speech_ended.set()
        if isinstance(decoded, Transcript):
            return decoded.final
        return isinstance(decoded, Error) and decoded.session == self.session_id and ends_session(decoded.code)


async def _send_paced(
    client: aiomqtt.Client, topic: str, frames: list[AudioFrame], frame_s: float, stop: asyncio.Event
) -> None:
    """Frames at ``frame_s`` each against absolute deadlines (0: as fast as possible), until ``stop``."""
    t0 = time.monotonic()
    for i, frame in enumerate(frames):
        if stop.is_set():
            return
        await client.publish(topic, frame.encode(), qos=0)
        if frame_s > 0:
            delay = t0 + (i + 1) * frame_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)


async def send_utterance(
    broker: str,
    device_id: str,
    pcm: np.ndarray,
    *,
    prefix: str = "echokit",
    session_id: int | None = None,
    frame_ms: int = 20,
    speed: float = 1.0,
    push_to_talk: bool = False,
    language: str | None = None,
    username: str | None = None,
    password: str | None = None,
    ca_file: str | None = None,
    trailing_silence_s: float = 5.0,
    timeout_s: float = 60.0,
    on_message: Callable[[Received], None] | None = None,
) -> list[Received]:
    """Stream one utterance and return every message the bridge sent until the final."""
    topics = Topics(prefix)
    turn = Turn(session_id or random.randint(1, 0xFFFFFFFF), on_message)
    frames = utterance_frames(
        pcm, turn.session_id, frame_ms, push_to_talk=push_to_talk, trailing_silence_s=trailing_silence_s
    )
    start = Start(
        session=turn.session_id, language=language, endpointing=Endpointing.PUSH_TO_TALK if push_to_talk else None
    )
    client = mqtt_client(broker, identifier=f"sim-{device_id}", username=username, password=password, ca_file=ca_file)
    async with client:
        await client.subscribe(f"{prefix}/{device_id}/out/#", qos=1)
        await client.publish(topics.device(device_id, TopicKind.CONTROL), encode_message(start), qos=1)
        t0 = time.monotonic()
        frame_s = frame_ms / 1000 / speed if speed > 0 else 0.0
        audio_topic = topics.device(device_id, TopicKind.AUDIO)
        async with asyncio.timeout(timeout_s):
            sender = asyncio.create_task(_send_paced(client, audio_topic, frames, frame_s, turn.speech_ended))
            try:
                async for message in client.messages:
                    if turn.take(bytes(message.payload), time.monotonic() - t0):
                        break
            finally:
                sender.cancel()
    return turn.received


def _describe(item: Received) -> str:
    return f"[{item.at:6.2f}s] {describe(item.message)}"


@dataclass(frozen=True, slots=True)
class BrokerSettings:
    """Where and as whom to connect: ``--config``'s ``[mqtt]`` table, overridden by the flags."""

    url: str = "mqtt://127.0.0.1:1883"
    prefix: str = "echokit"
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> BrokerSettings:
        """Raises ``ConfigError`` for a bad ``--config``, ``ValueError`` for a URL that is not ``mqtt(s)://``."""
        settings = cls()
        if args.config:
            from service.config import load_config

            mqtt = load_config(args.config).mqtt
            settings = cls(
                mqtt.url, mqtt.topic_prefix, mqtt.username or None, mqtt.password or None, mqtt.ca_file or None
            )
        settings = cls(
            args.broker or settings.url,
            args.prefix or settings.prefix,
            settings.username,
            settings.password,
            args.ca_file or settings.ca_file,
        )
        BrokerAddress.parse(settings.url)
        return settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="echokit-device", description="Simulated EchoKit MQTT device")
    sub = parser.add_subparsers(dest="command", required=True)
    send = sub.add_parser("send", help="stream a WAV file as one utterance and print what comes back")
    send.add_argument("wav")
    send.add_argument("--device", required=True, help="device id (EchoKit: lower-case MAC hex)")
    send.add_argument(
        "--broker", default=None, help="mqtt://HOST[:PORT] or mqtts://HOST[:PORT] (default: from --config)"
    )
    send.add_argument("--config", help="bridge config to take broker URL, prefix, credentials and CA file from")
    send.add_argument("--ca-file", help="CA certificate(s) to verify an mqtts:// broker (default: the system's)")
    send.add_argument("--prefix", default=None)
    send.add_argument("--speed", type=float, default=1.0, help="N times real time; 0 = as fast as possible")
    send.add_argument("--frame-ms", type=int, default=20)
    send.add_argument("--push-to-talk", action="store_true", help="end the turn with a LAST frame")
    send.add_argument("--language")
    send.add_argument("--timeout", type=float, default=60.0)
    send.add_argument("--json", action="store_true", help="one JSON object per message; the final is last")
    return parser


def main(argv: list[str] | None = None) -> int:
    from service.config import ConfigError

    args = _parser().parse_args(argv)
    try:
        broker = BrokerSettings.from_args(args)
        pcm = read_wav_16k_mono(args.wav)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    except (UnsupportedAudio, OSError, ValueError) as exc:
        print(f"echokit-device: {exc}", file=sys.stderr)
        return 2

    def show(item: Received) -> None:
        print(encode_message(item.message).decode() if args.json else _describe(item), flush=True)

    try:
        received = asyncio.run(
            send_utterance(
                broker.url,
                args.device,
                pcm,
                prefix=broker.prefix,
                frame_ms=args.frame_ms,
                speed=args.speed,
                push_to_talk=args.push_to_talk,
                language=args.language,
                username=broker.username,
                password=broker.password,
                ca_file=broker.ca_file,
                timeout_s=args.timeout,
                on_message=show,
            )
        )
    except TimeoutError:
        print(f"echokit-device: no final transcript within {args.timeout:g} s", file=sys.stderr)
        return 1
    except aiomqtt.MqttError as exc:
        print(f"echokit-device: broker {redact_url(broker.url)}: {exc}", file=sys.stderr)
        return 1
    final = received[-1].message if received else None
    return 0 if isinstance(final, Transcript) and final.final else 1


if __name__ == "__main__":
    sys.exit(main())
