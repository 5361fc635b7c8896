"""Prometheus metrics: every metric the bridge exports is defined here and nowhere else.

Each :class:`Bridge` owns a :class:`BridgeMetrics` with a private registry, so several bridges
(tests) can run in one process. Two kinds of metric:

* **Read at scrape time** (:class:`_BridgeCollector`): counters the components already keep as
  plain ints (``FleetStats``, per-device ``FrameStats``, ``LinkStats``, ``FailoverBackend``,
  ``VadBatcher``, the VAD engines' ``VadCounts``) and gauges of state (active sessions, queue
  depths, broker connection), through the structural types of :mod:`service.observability.sources`.
  The audio path pays nothing for them: no metric object is touched per frame.
* **Observed where they happen**: histograms of latencies, once per utterance or backend
  request (never per frame), and the event-loop lag sampled by :meth:`BridgeMetrics.monitor_loop_lag`.

No label ever holds a device or session id: labels are backend names and error codes, both
bounded by the configuration and the protocol.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from firmware_protocol import ErrorCode
from service.observability.sources import WatchedLink, WatchedSessions, WatchedVad
from service.recognition.base import TranscriptionBackend
from service.recognition.instrumented import InstrumentedBackend

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

PREFIX = "echokit_bridge"

FINAL_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.175, 0.25, 0.35, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0)
"""End of speech → final: 5 ms (an in-process engine) to 10 s (a cloud engine retrying)."""
PARTIAL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
BACKEND_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
LOOP_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
LOOP_LAG_INTERVAL_S = 0.1

REJECTION_CODES = (
    "bad_topic",
    "invalid_device_id",
    ErrorCode.UNKNOWN_DEVICE.value,
    ErrorCode.PAYLOAD_TOO_LARGE.value,
    ErrorCode.MALFORMED_FRAME.value,
    ErrorCode.UNSUPPORTED_VERSION.value,
    ErrorCode.UNSUPPORTED_CODEC.value,
    ErrorCode.UNSUPPORTED_FORMAT.value,
    ErrorCode.BAD_CONTROL.value,
)
"""Reasons a device message is refused; exported at 0 from the start so ``rate()`` sees the first one."""

REFUSAL_REASONS = ("capacity", "rate", "shutdown")
"""Why a session is refused (``FleetStats.refused_by_reason``); exported at 0 from the start."""

FRAME_COUNTERS = (
    ("frames", "frames_received", "Audio frames taken into a session's reassembly."),
    ("lost", "frames_lost", "Audio frames never received; replaced by silence of the same length."),
    ("duplicates", "frames_duplicated", "Audio frames received twice (or beyond the announced LAST); dropped."),
    ("reordered", "frames_reordered", "Audio frames that arrived ahead of a missing one and were reordered."),
    ("late", "frames_late", "Audio frames that arrived after being declared lost; dropped."),
    ("stale", "frames_stale", "Audio frames of an already closed session; dropped."),
)
"""``FrameStats`` field → metric name (``echokit_bridge_<name>_total``) and help."""


@dataclass(frozen=True, slots=True)
class SessionMetrics:
    """What a :class:`~service.session.turn.Session` observes, at most twice per utterance."""

    final_latency: Histogram
    first_partial: Histogram


class BridgeMetrics:
    def __init__(self, *, version: str) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # process-wide: no ``*_created`` series
        self.registry = CollectorRegistry()
        registry = self.registry
        self.final_latency = Histogram(
            f"{PREFIX}_final_latency_seconds",
            "End of the turn (VAD silence, the device's LAST frame, ...) to the final transcript sent.",
            buckets=FINAL_LATENCY_BUCKETS,
            registry=registry,
        )
        self.first_partial = Histogram(
            f"{PREFIX}_time_to_first_partial_seconds",
            "Speech start (VAD, or the first audio with push-to-talk) to the utterance's first partial transcript.",
            buckets=PARTIAL_BUCKETS,
            registry=registry,
        )
        self.backend_latency = Histogram(
            f"{PREFIX}_backend_request_duration_seconds",
            "Speech backend requests (a final or a speculation), from request to answer or error.",
            ["backend"],
            buckets=BACKEND_BUCKETS,
            registry=registry,
        )
        self.backend_errors = Counter(
            f"{PREFIX}_backend_errors_total",
            "Failed speech backend requests, by backend and the error code a device would get.",
            ["backend", "code"],
            registry=registry,
        )
        self.loop_lag = Histogram(
            f"{PREFIX}_event_loop_lag_seconds",
            f"How late the event loop wakes a timer, sampled every {LOOP_LAG_INTERVAL_S * 1000:g} ms.",
            buckets=LOOP_LAG_BUCKETS,
            registry=registry,
        )
        Gauge(f"{PREFIX}_build_info", "Always 1; the bridge's version.", ["version"], registry=registry).labels(
            version
        ).set(1)
        ProcessCollector(registry=registry)  # process_cpu_seconds_total, process_resident_memory_bytes, ...
        GCCollector(registry=registry)  # python_gc_*: collector pauses are a cost worth watching
        self.scrape_duration = Gauge(
            f"{PREFIX}_scrape_duration_seconds",
            "How long the previous /metrics scrape took to collect, on the bridge's event loop.",
            registry=registry,
        )
        self.session = SessionMetrics(self.final_latency, self.first_partial)
        self._backend_labels: set[str] = set()

    def instrument(self, backend: TranscriptionBackend) -> TranscriptionBackend:
        """``backend`` with its requests timed and its errors counted, under a label of its own."""
        label, n = backend.name, 1
        while label in self._backend_labels:  # e.g. two ``openai`` backends (Groq, then OpenAI)
            n += 1
            label = f"{backend.name}#{n}"
        self._backend_labels.add(label)
        errors = self.backend_errors

        def count_error(code: ErrorCode) -> None:
            errors.labels(label, code.value).inc()

        # The latency child is bound once: no label lookup per request.
        return InstrumentedBackend(
            backend, observe_latency=self.backend_latency.labels(label).observe, count_error=count_error
        )

    def watch(
        self,
        *,
        sessions: WatchedSessions,
        link: WatchedLink,
        vad: WatchedVad,
        failovers: Callable[[], int],
        max_sessions: int,
    ) -> None:
        """Export what these components count themselves, read at scrape time, and the admission limit."""
        self.registry.register(_BridgeCollector(sessions, link, vad, failovers))
        Gauge(
            f"{PREFIX}_sessions_max",
            "session.max_sessions: sessions_active / sessions_max is how full the bridge is.",
            registry=self.registry,
        ).set(max_sessions)

    def exposition(self) -> bytes:
        """The Prometheus text format of everything in the registry; how long that took shows in the next one."""
        started = time.perf_counter()
        body = generate_latest(self.registry)
        self.scrape_duration.set(time.perf_counter() - started)
        return body

    async def monitor_loop_lag(self, interval_s: float = LOOP_LAG_INTERVAL_S) -> None:
        """Sleep ``interval_s`` over and over; how late each wake-up comes is the loop's lag."""
        loop = asyncio.get_running_loop()
        observe = self.loop_lag.observe
        while True:
            due = loop.time() + interval_s
            await asyncio.sleep(interval_s)
            observe(max(0.0, loop.time() - due))


class _BridgeCollector(Collector):
    """Reads the components' own counters when Prometheus scrapes; costs nothing in between."""

    def __init__(
        self, sessions: WatchedSessions, link: WatchedLink, vad: WatchedVad, failovers: Callable[[], int]
    ) -> None:
        self._sessions = sessions
        self._link = link
        self._vad = vad.batcher
        self._vad_counts = vad.counts
        self._failovers = failovers

    def collect(self) -> Iterator[Metric]:
        sessions, fleet, link = self._sessions, self._sessions.stats, self._link.stats
        yield GaugeMetricFamily(f"{PREFIX}_sessions_active", "Utterances in progress.", sessions.active_sessions)
        yield CounterMetricFamily(f"{PREFIX}_sessions_started_total", "Sessions started.", fleet.sessions_started)
        yield CounterMetricFamily(
            f"{PREFIX}_sessions_refused_total",
            "Sessions refused (max_sessions reached, or shutting down).",
            fleet.sessions_refused,
        )
        yield from self._admission()
        yield GaugeMetricFamily(f"{PREFIX}_devices", "Devices the bridge currently keeps state for.", sessions.devices)
        yield CounterMetricFamily(f"{PREFIX}_messages_received_total", "MQTT messages from devices.", fleet.messages)
        rejected = CounterMetricFamily(
            f"{PREFIX}_messages_rejected_total", "Device messages refused, by error code.", labels=["code"]
        )
        by_code = fleet.rejected_by_code
        for code in (*REJECTION_CODES, *sorted(by_code.keys() - set(REJECTION_CODES))):
            rejected.add_metric([code], by_code.get(code, 0))
        yield rejected
        totals = sessions.stream_totals()
        for field, name, documentation in FRAME_COUNTERS:
            yield CounterMetricFamily(f"{PREFIX}_{name}_total", documentation, getattr(totals, field))
        yield GaugeMetricFamily(
            f"{PREFIX}_audio_queue_frames",
            "Audio chunks (about one per frame) waiting in session queues, all sessions together.",
            sessions.audio_queued(),
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_vad_pending_windows", "VAD windows waiting for the next batched Silero run.", self._vad.pending
        )
        yield from self._vad_engines()
        yield GaugeMetricFamily(
            f"{PREFIX}_mqtt_connected", "1 while connected to the broker.", int(self._link.connected.is_set())
        )
        yield CounterMetricFamily(
            f"{PREFIX}_mqtt_reconnects_total", "Connections to the broker after the first.", max(0, link.connects - 1)
        )
        yield CounterMetricFamily(f"{PREFIX}_mqtt_published_total", "Messages published.", link.published)
        yield CounterMetricFamily(
            f"{PREFIX}_mqtt_publish_dropped_total",
            "Messages not published: the publish queue was full, or they outlived mqtt.publish_max_age_s.",
            link.publish_dropped,
        )
        yield from self._outgoing()
        yield CounterMetricFamily(
            f"{PREFIX}_backend_failovers_total", "Utterances handed to the next [[asr.fallback]].", self._failovers()
        )

    def _outgoing(self) -> Iterator[Metric]:
        """The link under overload: its publish queue, what it dropped by priority, stale and contested input."""
        link, outgoing = self._link.stats, self._link.stats.outgoing
        yield GaugeMetricFamily(
            f"{PREFIX}_mqtt_publish_queue", "Messages waiting to be published.", self._link.publish_queued
        )
        dropped = CounterMetricFamily(
            f"{PREFIX}_mqtt_publish_dropped_by_priority_total",
            "Messages dropped, by priority: final, error, owed (listening, speech_ended, configured), optional.",
            labels=["priority"],
        )
        for priority, count in outgoing.dropped.items():
            dropped.add_metric([priority], count)
        yield dropped
        yield CounterMetricFamily(
            f"{PREFIX}_mqtt_publish_expired_total", "Messages dropped after mqtt.publish_max_age_s.", outgoing.expired
        )
        yield CounterMetricFamily(
            f"{PREFIX}_mqtt_publish_resent_total",
            "QoS 1 messages sent again after a connection was lost before their PUBACK.",
            outgoing.resent,
        )
        yield CounterMetricFamily(
            f"{PREFIX}_mqtt_retained_ignored_total",
            "Retained messages on device topics (replayed by the broker), ignored.",
            link.retained_ignored,
        )
        yield CounterMetricFamily(
            f"{PREFIX}_mqtt_taken_over_total",
            "Connections lost to another client using the bridge's client id.",
            link.taken_over,
        )

    def _admission(self) -> Iterator[Metric]:
        """Overload as the ingest stage sees it: refusals by reason, errors the rate limits dropped."""
        sessions, fleet = self._sessions, self._sessions.stats
        refusals = CounterMetricFamily(
            f"{PREFIX}_session_refusals_total",
            "Sessions refused, by reason: capacity (max_sessions), rate (max_starts_per_s), shutdown.",
            labels=["reason"],
        )
        by_reason = fleet.refused_by_reason
        for reason in (*REFUSAL_REASONS, *sorted(by_reason.keys() - set(REFUSAL_REASONS))):
            refusals.add_metric([reason], by_reason.get(reason, 0))
        yield refusals
        yield CounterMetricFamily(
            f"{PREFIX}_sessions_gapped_total",
            "Sessions ended with audio_gap: more audio missing than session.max_gap_ms.",
            fleet.sessions_gapped,
        )
        errors = sessions.device_errors
        outcomes = CounterMetricFamily(
            f"{PREFIX}_device_errors_total",
            "Errors about incoming messages: sent, or dropped by the per-device or the fleet-wide rate limit.",
            labels=["outcome"],
        )
        outcomes.add_metric(["sent"], errors.sent)
        outcomes.add_metric(["dropped_device"], errors.dropped_device)
        outcomes.add_metric(["dropped_fleet"], errors.dropped_fleet)
        yield outcomes
        yield GaugeMetricFamily(
            f"{PREFIX}_error_limiter_entries",
            "Errors the rate limiter remembers (sent in the last second); bounded by 2 x session.max_errors_per_s.",
            sessions.error_limiter_entries,
        )

    def _vad_engines(self) -> Iterator[Metric]:
        counts = self._vad_counts
        windows = CounterMetricFamily(
            f"{PREFIX}_vad_windows_total",
            "32 ms windows scored for server-VAD endpointing, by the engine that scored them"
            " (a remote session that fell back to Silero counts under silero).",
            labels=["engine"],
        )
        for engine, count in counts.windows().items():  # every engine, at 0 until used
            windows.add_metric([engine.value], count)
        yield windows
        yield CounterMetricFamily(
            f"{PREFIX}_vad_gate_skipped_windows_total",
            "webrtc+silero windows in which WebRTC heard no speech: scored 0 without a Silero call.",
            counts.gate_skipped,
        )
        yield CounterMetricFamily(
            f"{PREFIX}_vad_remote_fallbacks_total",
            "Remote VAD sessions switched to local Silero (connection refused, an error, a closed socket).",
            counts.remote_fallbacks,
        )
        yield CounterMetricFamily(
            f"{PREFIX}_vad_silero_windows_total",
            "Windows Silero scored, all engines (per ONNX run: divide by vad_silero_runs_total).",
            self._vad.windows,
        )
        yield CounterMetricFamily(f"{PREFIX}_vad_silero_runs_total", "Batched Silero ONNX runs.", self._vad.runs)
