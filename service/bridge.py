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

import structlog

from firmware_protocol import Topics
from service import __version__
from service.config import Config
from service.endpointing.engines import VadEngines
from service.endpointing.silero import SileroModel, VadBatcher
from service.ingest.router import MessageRouter
from service.link.connection import MqttLink
from service.observability.health import HealthServer
from service.observability.metrics import BridgeMetrics
from service.outputs.homeassistant import HomeAssistant
from service.outputs.publisher import DevicePublisher
from service.recognition import TranscriptionBackend
from service.recognition.registry import build_backends, final_timeout
from service.redact import redact_url
from service.session.services import SessionServices

log = structlog.get_logger(__name__)


class Bridge:
    def __init__(self, config: Config, backend: TranscriptionBackend | None = None) -> None:
        self.config = config
        self.instance = uuid.uuid4().hex[:8]
        self.topics = Topics(config.mqtt.topic_prefix)
        self.metrics = BridgeMetrics(version=__version__) if config.metrics.enabled else None
        if backend is None:
            self.backend = build_backends(config.asr, self.metrics.instrument if self.metrics is not None else None)
        else:  # from a test or a benchmark; a failover chain given whole is timed as one backend
            self.backend = self.metrics.instrument(backend) if self.metrics is not None else backend
        chain = backend or self.backend
        self.vad = VadBatcher(SileroModel())
        self.vad_engines = VadEngines.from_config(self.vad, config.asr)
        ha = config.homeassistant
        self._ha_status = f"{ha.discovery_prefix}/status"
        """Home Assistant's birth (``online``) and will (``offline``): discovery is sent again on ``online``."""
        self.link = MqttLink(
            config.mqtt,
            self.topics,
            self._dispatch_with_homeassistant if ha.enabled else self._dispatch,
            instance=self.instance,
            version=__version__,
            extra_subscriptions=(self._ha_status,) if ha.enabled else (),
        )
        publisher = DevicePublisher(self.topics, self.link.post, config.session.max_device_message_bytes)
        self.homeassistant: HomeAssistant | None = None
        if ha.enabled:
            self.homeassistant = HomeAssistant(ha, self.topics, self.link.post, version=__version__)
            publisher.observers.append(self.homeassistant.observe)
        services = SessionServices(
            backend=self.backend,
            engines=self.vad_engines,
            publisher=publisher,
            final_timeout_s=final_timeout(config.asr),
            idle_timeout_s=config.session.idle_timeout_s,
            metrics=self.metrics.session if self.metrics is not None else None,
        )
        self.sessions = MessageRouter(config, self.topics, services)
        self._stop = asyncio.Event()
        self._backend_started = False
        self.health: HealthServer | None = None
        """``/metrics``, ``/healthz``, ``/readyz``; its ``port`` is the bound one (``listen`` may ask for 0)."""
        if self.metrics is not None:
            self.metrics.watch(
                sessions=self.sessions,
                link=self.link,
                vad=self.vad_engines,
                failovers=lambda: chain.failovers,  # the unwrapped backend: a FailoverBackend counts them
                max_sessions=config.session.max_sessions,
            )
            host, port = config.metrics.address
            self.health = HealthServer(host, port, metrics=self.metrics.exposition, not_ready=self.not_ready)

    def _dispatch(self, topic: str, payload: bytes) -> None:
        try:
            self.sessions.handle(topic, payload)
        except Exception:  # a bug on one message must not take the bridge down
            log.exception("dispatch.failed")

    def _dispatch_with_homeassistant(self, topic: str, payload: bytes) -> None:
        if self.homeassistant is not None and topic == self._ha_status:
            self.homeassistant.on_status(payload)
            return
        self._dispatch(topic, payload)

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
        # so its full passes stay short (bench/README.md has what they cost otherwise).
        gc.collect()
        gc.freeze()
        asr = self.config.asr
        if asr.vad_url or asr.vad_realtime_url:
            log.info(
                "vad.remote",
                vad_url=redact_url(asr.vad_url) if asr.vad_url else None,
                vad_realtime_url=redact_url(asr.vad_realtime_url) if asr.vad_realtime_url else None,
            )
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
