"""A session's messages to its device, published in the order they were emitted."""

from __future__ import annotations

import asyncio

from firmware_protocol import BridgeMessage
from service.outputs.publisher import DevicePublisher


class OrderedOutbox:
    """Queues each message on the link as it is emitted, so emission order is publish order.

    Everything a session tells its device goes through here, so partials the backend produces
    in the background can never overtake the final. Nothing waits for a PUBACK: the link's one
    outgoing queue keeps each device's order and sends what the device is owed first.
    """

    def __init__(self, publisher: DevicePublisher, device_id: str) -> None:
        self._publisher = publisher
        self._device_id = device_id
        self._closed = asyncio.Event()

    def put(self, message: BridgeMessage) -> None:
        self._publisher.post(self._device_id, message)

    def close(self) -> None:
        """Nothing follows; :meth:`run` returns."""
        self._closed.set()

    async def run(self) -> None:
        await self._closed.wait()
