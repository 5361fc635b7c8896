"""A raw test device: publishes exactly the bytes a test chooses and collects replies."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import TracebackType

import aiomqtt

from firmware_protocol import (
    AudioFrame,
    BridgeMessage,
    DeviceMessage,
    TopicKind,
    Topics,
    decode_bridge_message,
    encode_message,
)


class RawDevice:
    def __init__(self, broker_host: str, broker_port: int, prefix: str, device_id: str) -> None:
        self.device_id = device_id
        self.topics = Topics(prefix)
        self._client = aiomqtt.Client(
            broker_host, broker_port, identifier=f"test-{device_id}", protocol=aiomqtt.ProtocolVersion.V311
        )
        self.received: list[tuple[str, BridgeMessage]] = []
        self._arrived = asyncio.Condition()
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> RawDevice:
        await self._client.__aenter__()
        await self._client.subscribe(f"{self.topics.prefix}/{self.device_id}/out/#", qos=1)
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._reader:
            self._reader.cancel()
        await self._client.__aexit__(exc_type, exc, tb)

    async def _read(self) -> None:
        async for message in self._client.messages:
            decoded = decode_bridge_message(bytes(message.payload))  # type: ignore[arg-type]
            async with self._arrived:
                self.received.append((message.topic.value, decoded))
                self._arrived.notify_all()

    async def send(self, frame: AudioFrame | bytes, qos: int = 0) -> None:
        payload = frame.encode() if isinstance(frame, AudioFrame) else frame
        await self._client.publish(self.topics.device(self.device_id, TopicKind.AUDIO), payload, qos=qos)

    async def control(self, message: DeviceMessage | bytes) -> None:
        payload = message if isinstance(message, bytes) else encode_message(message)
        await self._client.publish(self.topics.device(self.device_id, TopicKind.CONTROL), payload, qos=1)

    async def stream(self, frames: list[AudioFrame], frame_s: float = 0.0) -> None:
        for frame in frames:
            await self.send(frame)
            if frame_s:
                await asyncio.sleep(frame_s)

    async def wait_for(self, predicate: Callable[[BridgeMessage], bool], timeout: float = 20) -> BridgeMessage:
        async with asyncio.timeout(timeout), self._arrived:
            while True:
                for _, message in self.received:
                    if predicate(message):
                        return message
                await self._arrived.wait()

    def messages(self, session: int | None = None) -> list[BridgeMessage]:
        return [m for _, m in self.received if session is None or getattr(m, "session", None) == session]
