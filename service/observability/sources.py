"""The running service as the metrics collector sees it: only the counters and gauges it reads.

Structural types, so observability imports none of the stages it watches (no import cycle
through metrics): the link, the session router and the VAD engines match them as they are.
Every member is read-only here; the components own and bump their plain ints.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Protocol

from firmware_protocol import VadEngine


class FleetCounters(Protocol):
    """Device messages and sessions since start (``FleetStats``)."""

    @property
    def messages(self) -> int: ...
    @property
    def sessions_started(self) -> int: ...
    @property
    def sessions_refused(self) -> int: ...
    @property
    def refused_by_reason(self) -> Mapping[str, int]: ...
    @property
    def sessions_gapped(self) -> int: ...
    @property
    def rejected_by_code(self) -> Mapping[str, int]: ...


class DeviceErrorCounters(Protocol):
    """Errors about incoming messages, by what the rate limits made of them (``ErrorCounts``)."""

    @property
    def sent(self) -> int: ...
    @property
    def dropped_device(self) -> int: ...
    @property
    def dropped_fleet(self) -> int: ...


class FrameCounters(Protocol):
    """Reassembly counters summed over the fleet (``FrameStats``)."""

    @property
    def frames(self) -> int: ...
    @property
    def duplicates(self) -> int: ...
    @property
    def reordered(self) -> int: ...
    @property
    def lost(self) -> int: ...
    @property
    def late(self) -> int: ...
    @property
    def stale(self) -> int: ...


class WatchedSessions(Protocol):
    """The ingest stage (``MessageRouter``)."""

    @property
    def active_sessions(self) -> int: ...
    @property
    def devices(self) -> int: ...
    @property
    def stats(self) -> FleetCounters: ...
    def stream_totals(self) -> FrameCounters: ...
    def audio_queued(self) -> int: ...
    @property
    def device_errors(self) -> DeviceErrorCounters: ...
    @property
    def error_limiter_entries(self) -> int: ...


class LinkCounters(Protocol):
    """Broker connections and publishes since start (``LinkStats``)."""

    @property
    def connects(self) -> int: ...
    @property
    def published(self) -> int: ...
    @property
    def publish_dropped(self) -> int: ...
    @property
    def retained_ignored(self) -> int: ...
    @property
    def taken_over(self) -> int: ...
    @property
    def outgoing(self) -> OutgoingCounters: ...


class OutgoingCounters(Protocol):
    """The link's bounded publish queue (``QueueStats``)."""

    @property
    def dropped(self) -> Mapping[str, int]: ...
    @property
    def expired(self) -> int: ...
    @property
    def resent(self) -> int: ...


class WatchedLink(Protocol):
    """The broker link (``MqttLink``)."""

    @property
    def publish_queued(self) -> int: ...

    @property
    def connected(self) -> asyncio.Event: ...
    @property
    def stats(self) -> LinkCounters: ...


class SileroCounters(Protocol):
    """The batched Silero runs (``VadBatcher``)."""

    @property
    def pending(self) -> int: ...
    @property
    def windows(self) -> int: ...
    @property
    def runs(self) -> int: ...


class EngineCounters(Protocol):
    """What each VAD engine scored (``VadCounts``)."""

    @property
    def gate_skipped(self) -> int: ...
    @property
    def remote_fallbacks(self) -> int: ...
    def windows(self) -> Mapping[VadEngine, int]: ...


class WatchedVad(Protocol):
    """The VAD engines (``VadEngines``)."""

    @property
    def batcher(self) -> SileroCounters: ...
    @property
    def counts(self) -> EngineCounters: ...
