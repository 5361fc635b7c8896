"""A session's messages to its device, published in the order they were emitted."""

from __future__ import annotations

import asyncio

from firmware_protocol import BridgeMessage
from service.outputs.publisher import DevicePublisher
from service.tasks import TaskSet


class OrderedOutbox:
    """Publishes in order without waiting for each PUBACK: the broker keeps a client's order.

    Everything a session tells its device goes through here, so partials the backend produces
    in the background can never overtake the final.
    """

    def __init__(self, publisher: DevicePublisher, device_id: str) -> None:
        self._publisher = publisher
        self._device_id = device_id
        self._queue: asyncio.Queue[BridgeMessage | None] = asyncio.Queue()

    def put(self, message: BridgeMessage) -> None:
        self._queue.put_nowait(message)

    def close(self) -> None:
        """Nothing follows; :meth:`run` returns once everything before is published."""
        self._queue.put_nowait(None)

    async def run(self) -> None:
        sending = TaskSet(f"outbox-{self._device_id}")
        while (message := await self._queue.get()) is not None:
            sending.spawn(self._publisher.send(self._device_id, message))
        await sending.wait()
