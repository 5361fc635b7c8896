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
from urllib.parse import urlsplit

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
    trailing_silence_s: float = 5.0,
    timeout_s: float = 60.0,
    on_message: Callable[[Received], None] | None = None,
) -> list[Received]:
    """Stream one utterance and return every message the bridge sent until the final."""
    url = urlsplit(broker)
    topics = Topics(prefix)
    session_id = session_id or random.randint(1, 0xFFFFFFFF)
    received: list[Received] = []
    speech_ended = asyncio.Event()
    async with aiomqtt.Client(
        url.hostname or "localhost",
        url.port or 1883,
        username=username,
        password=password,
        identifier=f"sim-{device_id}",
        protocol=aiomqtt.ProtocolVersion.V311,
    ) as client:
        await client.subscribe(f"{prefix}/{device_id}/out/#", qos=1)
        start = Start(
            session=session_id,
            language=language,
            endpointing=Endpointing.PUSH_TO_TALK if push_to_talk else None,
        )
        await client.publish(topics.device(device_id, TopicKind.CONTROL), encode_message(start), qos=1)
        t0 = time.monotonic()

        async def send() -> None:
            audio_topic = topics.device(device_id, TopicKind.AUDIO)
            frames = frames_of(pcm, session_id, frame_ms, last=push_to_talk)
            if not push_to_talk:
                silence = np.zeros(int(SAMPLE_RATE * trailing_silence_s), dtype=np.int16)
                frames += frames_of(silence, session_id, frame_ms, start_seq=len(frames))
            for i, frame in enumerate(frames):
                if speech_ended.is_set():
                    return
                await client.publish(audio_topic, frame.encode(), qos=0)
                if speed > 0:
                    delay = t0 + (i + 1) * frame_ms / 1000 / speed - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)

        async def receive() -> None:
            async for message in client.messages:
                try:
                    decoded = decode_bridge_message(bytes(message.payload))
                except ProtocolError:
                    continue
                if getattr(decoded, "session", None) not in (session_id, None):
                    continue
                item = Received(time.monotonic() - t0, decoded)
                received.append(item)
                if on_message:
                    on_message(item)
                if isinstance(decoded, SpeechEnded):
                    speech_ended.set()
                if isinstance(decoded, Transcript) and decoded.final:
                    return
                if isinstance(decoded, Error) and decoded.session == session_id and ends_session(decoded.code):
                    return

        async with asyncio.timeout(timeout_s):
            sender = asyncio.create_task(send())
            try:
                await receive()
            finally:
                sender.cancel()
    return received


def _describe(item: Received) -> str:
    return f"[{item.at:6.2f}s] {describe(item.message)}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="echokit-device", description="Simulated EchoKit MQTT device")
    sub = parser.add_subparsers(dest="command", required=True)
    send = sub.add_parser("send", help="stream a WAV file as one utterance and print what comes back")
    send.add_argument("wav")
    send.add_argument("--device", required=True, help="device id (EchoKit: lower-case MAC hex)")
    send.add_argument("--broker", default=None, help="mqtt://HOST:PORT (default: from --config, else localhost)")
    send.add_argument("--config", help="bridge config to take broker URL, prefix and credentials from")
    send.add_argument("--prefix", default=None)
    send.add_argument("--speed", type=float, default=1.0, help="N times real time; 0 = as fast as possible")
    send.add_argument("--frame-ms", type=int, default=20)
    send.add_argument("--push-to-talk", action="store_true", help="end the turn with a LAST frame")
    send.add_argument("--language")
    send.add_argument("--timeout", type=float, default=60.0)
    send.add_argument("--json", action="store_true", help="one JSON object per message; the final is last")
    args = parser.parse_args(argv)

    broker, prefix, username, password = "mqtt://127.0.0.1:1883", "echokit", None, None
    if args.config:
        from service.config import ConfigError, load_config

        try:
            config = load_config(args.config)
        except ConfigError as exc:
            print(exc, file=sys.stderr)
            return 2
        broker, prefix = config.mqtt.url, config.mqtt.topic_prefix
        username, password = config.mqtt.username or None, config.mqtt.password or None
    broker = args.broker or broker
    prefix = args.prefix or prefix
    try:
        pcm = read_wav_16k_mono(args.wav)
    except (UnsupportedAudio, OSError) as exc:
        print(f"echokit-device: {exc}", file=sys.stderr)
        return 2

    def show(item: Received) -> None:
        if args.json:
            print(encode_message(item.message).decode(), flush=True)
        else:
            print(_describe(item), flush=True)

    try:
        received = asyncio.run(
            send_utterance(
                broker,
                args.device,
                pcm,
                prefix=prefix,
                frame_ms=args.frame_ms,
                speed=args.speed,
                push_to_talk=args.push_to_talk,
                language=args.language,
                username=username,
                password=password,
                timeout_s=args.timeout,
                on_message=show,
            )
        )
    except TimeoutError:
        print(f"echokit-device: no final transcript within {args.timeout:g} s", file=sys.stderr)
        return 1
    except aiomqtt.MqttError as exc:
        print(f"echokit-device: broker {broker}: {exc}", file=sys.stderr)
        return 1
    final = received[-1].message if received else None
    return 0 if isinstance(final, Transcript) and final.final else 1


if __name__ == "__main__":
    sys.exit(main())
