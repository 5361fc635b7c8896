"""The composition root: config → broker → sessions → VAD → backend → publisher.

Nothing else in the service knows about all of these; tests and benchmarks build a
:class:`Bridge` with another backend through the same constructor.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import uuid

import aiomqtt
import structlog

from firmware_protocol import Topics
from service import __version__
from service.config import PLATFORM_ALIASES, AsrConfig, Config
from service.endpointing.engines import VadEngines
from service.endpointing.silero import SileroModel, VadBatcher
from service.ingest.router import SessionManager
from service.link.connection import MqttLink
from service.observability.health import HealthServer
from service.observability.metrics import BridgeMetrics
from service.outputs.homeassistant import HomeAssistant
from service.outputs.publisher import DevicePublisher
from service.recognition import BackendError, TranscriptionBackend
from service.session.turn import SessionServices

log = structlog.get_logger(__name__)


def build_backends(asr: AsrConfig, metrics: BridgeMetrics | None = None) -> TranscriptionBackend:
    """The primary backend, wrapped with its ``[[asr.fallback]]`` list when there is one.

    With ``metrics``, each backend's requests are timed under its own name.
    """

    def build(table: AsrConfig) -> TranscriptionBackend:
        backend = build_backend(table)
        return metrics.instrument(backend) if metrics is not None else backend

    primary = build(asr)
    if not asr.fallback:
        return primary
    from service.recognition.failover import FailoverBackend

    return FailoverBackend([primary, *(build(fallback) for fallback in asr.fallback)])


def build_backend(asr: AsrConfig) -> TranscriptionBackend:
    """One backend from an ``[asr]`` table; modules load lazily so unused SDK-free code stays cold."""
    platform = PLATFORM_ALIASES.get(asr.platform)
    if platform == "pocketsphinx":
        from service.recognition.pocketsphinx import PocketsphinxBackend

        return PocketsphinxBackend(asr)
    if platform == "openai":
        from service.recognition.openai import OpenAIBackend

        return OpenAIBackend(asr)
    if platform == "paraformer_v2":
        from service.recognition.paraformer import ParaformerBackend

        return ParaformerBackend(asr)
    if platform == "elevenlabs":
        from service.recognition.elevenlabs import ElevenLabsBackend

        return ElevenLabsBackend(asr)
    raise BackendError(f"asr.platform {asr.platform!r} is not available", retryable=False)


def final_timeout(asr: AsrConfig) -> float:
    """How long a session waits for its final: every attempt of every backend, with backoff, and slack."""
    per_backend = [(b.timeout_s + 4.0) * (b.max_retries + 1) for b in (asr, *asr.fallback)]
    return max(30.0, sum(per_backend) + 5.0)


class Bridge:
    def __init__(self, config: Config, backend: TranscriptionBackend | None = None) -> None:
        self.config = config
        self.instance = uuid.uuid4().hex[:8]
        self.topics = Topics(config.mqtt.topic_prefix)
        self.metrics = BridgeMetrics(version=__version__) if config.metrics.enabled else None
        if backend is None:
            self.backend = build_backends(config.asr, self.metrics)
        else:  # from a test or a benchmark; a failover chain given whole is timed as one backend
            self.backend = self.metrics.instrument(backend) if self.metrics is not None else backend
        chain = backend or self.backend
        self.vad = VadBatcher(SileroModel())
        self.vad_engines = VadEngines.from_config(self.vad, config.asr)
        ha = config.homeassistant
        self._ha_status = f"{ha.discovery_prefix}/status"
        self.link = MqttLink(
            config.mqtt,
            self.topics,
            self._dispatch_with_homeassistant if ha.enabled else self._dispatch,
            instance=self.instance,
            version=__version__,
            extra_subscriptions=(self._ha_status,) if ha.enabled else (),
        )
        publisher = DevicePublisher(self.topics, self.link.publish, config.session.max_device_message_bytes)
        self.homeassistant: HomeAssistant | None = None
        if ha.enabled:
            self.homeassistant = HomeAssistant(ha, self.topics, self.link.publish, version=__version__)
            publisher.observers.append(self.homeassistant.observe)
        services = SessionServices(
            backend=self.backend,
            vad=self.vad,
            publisher=publisher,
            session=config.session,
            final_timeout_s=final_timeout(config.asr),
            metrics=self.metrics.session if self.metrics is not None else None,
            engines=self.vad_engines,
        )
        self.sessions = SessionManager(config, self.topics, services)
        self._stop = asyncio.Event()
        self._backend_started = False
        self.health: HealthServer | None = None
        """``/metrics``, ``/healthz``, ``/readyz``; its ``port`` is the bound one (``listen`` may ask for 0)."""
        if self.metrics is not None:
            self.metrics.watch(
                sessions=self.sessions,
                link=self.link,
                vad=self.vad_engines,
                failovers=lambda: int(getattr(chain, "failovers", 0)),  # a FailoverBackend counts them
            )
            host, port = config.metrics.address
            self.health = HealthServer(host, port, metrics=self.metrics.exposition, not_ready=self.not_ready)

    def _dispatch(self, message: object) -> None:
        try:
            self.sessions.handle(message)  # type: ignore[arg-type]
        except Exception:  # a bug on one message must not take the bridge down
            log.exception("dispatch.failed")

    def _dispatch_with_homeassistant(self, message: aiomqtt.Message) -> None:
        if self.homeassistant is not None and message.topic.value == self._ha_status:
            if isinstance(message.payload, bytes | bytearray):
                self.homeassistant.on_status(message.payload)
            return
        self._dispatch(message)

    def stop(self) -> None:
        self._stop.set()

    def not_ready(self) -> str | None:
        """Why the bridge cannot serve devices right now (``/readyz``), or ``None`` when it can."""
        if self._stop.is_set():
            return "shutting down"
        if not self._backend_started:
            return "speech backend not started"
        if not self.link.connected.is_set():
            return "not connected to the MQTT broker"
        return None

    async def run(self, *, drain_timeout: float = 10.0) -> None:
        """Run until :meth:`stop` (or SIGINT/SIGTERM when installed by the CLI)."""
        if self.health is not None:
            await self.health.start()  # first: /healthz answers, and /readyz says why, while the backend loads
        try:
            await self.backend.start()
        except BaseException:
            if self.health is not None:
                await self.health.close()
            raise
        self._backend_started = True
        # Models, pools and modules are loaded for good: move them out of the collector's sight,
        # so its full passes stay short (they cost 30-40 ms each otherwise, measured in bench/).
        gc.collect()
        gc.freeze()
        asr = self.config.asr
        if asr.vad_url or asr.vad_realtime_url:
            log.info("vad.remote", vad_url=asr.vad_url or None, vad_realtime_url=asr.vad_realtime_url or None)
        log.info("bridge.starting", instance=self.instance, backend=self.backend.name, prefix=self.topics.prefix)
        try:
            async with asyncio.TaskGroup() as tg:
                link = tg.create_task(self.link.run())
                vad = tg.create_task(self.vad.run())
                housekeeping = tg.create_task(self.sessions.run())
                observability = []
                if self.health is not None:
                    observability.append(tg.create_task(self.health.serve()))
                if self.metrics is not None:
                    observability.append(tg.create_task(self.metrics.monitor_loop_lag()))
                await self._stop.wait()
                log.info("bridge.stopping", active_sessions=self.sessions.active_sessions)
                await self.sessions.drain(drain_timeout)
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(2):
                        await self.link.say_offline()
                for task in (link, vad, housekeeping, *observability):
                    task.cancel()
        finally:
            self._backend_started = False
            await self.backend.aclose()
            await self.vad_engines.aclose()
            if self.health is not None:
                await self.health.close()
            log.info("bridge.stopped")

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop)
