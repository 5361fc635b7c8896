"""Routes MQTT messages to devices and sessions; enforces limits; reports bad input.

Everything here runs synchronously in the MQTT dispatch callback, so a device's frames
are handled in arrival order and no frame waits on another device's work.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TypeVar

import aiomqtt
import msgspec
import structlog

from firmware_protocol import (
    SAMPLE_RATE,
    AudioFrame,
    Cancel,
    Codec,
    Configure,
    Configured,
    EndpointingOverrides,
    EndReason,
    Error,
    ErrorCode,
    ProtocolError,
    Start,
    TopicKind,
    Topics,
    decode_device_message,
    is_valid_device_id,
)
from service.config import Config, overrides_problem
from service.ingest.reassembly import Arrival, DeviceStream, StreamStats
from service.recognition import SessionOptions
from service.session.turn import Session, SessionServices

log = structlog.get_logger(__name__)

MAX_CONTROL_BYTES = 4096
ERROR_INTERVAL_S = 1.0
"""At most one error per device and code per second: a broken device cannot flood the bus."""
QUIET_FLUSH_S = 0.15
"""A gap not filled this long after the last frame is declared lost."""


@dataclass(slots=True)
class FleetStats:
    messages: int = 0
    rejected: int = 0
    sessions_started: int = 0
    sessions_refused: int = 0
    rejected_by_code: dict[str, int] = field(default_factory=dict)
    """``rejected`` by error code (bounded: the protocol's codes), for metrics."""
    retired_streams: StreamStats = field(default_factory=StreamStats)
    """Reassembly counters of devices already forgotten, so fleet totals never go down."""


@dataclass(slots=True)
class _Device:
    stream: DeviceStream
    session: Session | None = None
    last_frame: float = 0.0
    last_seen: float = field(default_factory=time.monotonic)
    """Any message; idle devices are forgotten, which must not reset their error rate limit early."""
    options: dict[int, Start] = field(default_factory=dict)
    last_start: Start | None = None
    """The options of the running session, reused when the device restarts it with the same id."""
    last_error: dict[ErrorCode, float] = field(default_factory=dict)
    overrides: EndpointingOverrides | None = None
    """From the device's ``configure`` messages; over ``[devices.<id>]``, under a session's ``start``."""


class SessionManager:
    def __init__(self, config: Config, topics: Topics, services: SessionServices) -> None:
        self._config = config
        self._topics = topics
        self._services = services
        self._allow = frozenset(config.devices.allow)
        self._devices: dict[str, _Device] = {}
        self._active = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._accepting = True
        self.stats = FleetStats()

    @property
    def active_sessions(self) -> int:
        return self._active

    # Read by metrics at scrape time -------------------------------------------------------------

    @property
    def devices(self) -> int:
        return len(self._devices)

    def stream_totals(self) -> StreamStats:
        """Reassembly counters summed over every device, forgotten ones included."""
        total = StreamStats()
        total.add(self.stats.retired_streams)
        for device in self._devices.values():
            total.add(device.stream.stats)
        return total

    def audio_queued(self) -> int:
        """Audio chunks waiting in the running sessions' queues."""
        return sum(device.session.queued for device in self._devices.values() if device.session is not None)

    # Dispatch ----------------------------------------------------------------------------------

    def handle(self, message: aiomqtt.Message) -> None:
        self.stats.messages += 1
        parsed = self._topics.parse(message.topic.value)
        payload = message.payload
        if parsed is None or not isinstance(payload, bytes | bytearray):
            self._reject("bad_topic")
            return
        device_id, kind = parsed
        if not is_valid_device_id(device_id):
            self._reject("invalid_device_id")
            log.warning("device.invalid_id", topic=message.topic.value[:200])
            return
        if self._allow and device_id not in self._allow:
            self._reject(ErrorCode.UNKNOWN_DEVICE)
            self._error(device_id, ErrorCode.UNKNOWN_DEVICE, "this device is not in the bridge's devices.allow list")
            return
        if kind is TopicKind.AUDIO:
            self._on_audio(device_id, bytes(payload))
        elif kind is TopicKind.CONTROL:
            self._on_control(device_id, bytes(payload))

    def _device(self, device_id: str) -> _Device:
        device = self._devices.get(device_id)
        if device is None:
            device = _Device(DeviceStream(device_id, self._config.session.reorder_window))
            self._devices[device_id] = device
        device.last_seen = time.monotonic()
        return device

    def _on_audio(self, device_id: str, payload: bytes) -> None:
        limit = self._config.session.max_frame_bytes
        if len(payload) > limit:
            self._reject(ErrorCode.PAYLOAD_TOO_LARGE)
            self._error(device_id, ErrorCode.PAYLOAD_TOO_LARGE, f"audio frame of {len(payload)} bytes exceeds {limit}")
            return
        try:
            frame = AudioFrame.decode(payload)
        except ProtocolError as exc:
            self._reject(exc.code)
            self._error(device_id, exc.code, str(exc))
            return
        if frame.codec != Codec.PCM_S16LE:
            self._reject(ErrorCode.UNSUPPORTED_CODEC)
            self._error(
                device_id,
                ErrorCode.UNSUPPORTED_CODEC,
                f"codec: {int(frame.codec)} is not supported (0 = PCM s16le)",
                frame.session_id,
            )
            return
        if frame.sample_rate != SAMPLE_RATE or frame.channels != 1:
            self._reject(ErrorCode.UNSUPPORTED_FORMAT)
            self._error(
                device_id,
                ErrorCode.UNSUPPORTED_FORMAT,
                f"sample_rate/channels: {frame.sample_rate} Hz x {frame.channels} is not supported"
                f" ({SAMPLE_RATE} Hz mono)",
                frame.session_id,
            )
            return
        device = self._device(device_id)
        device.last_frame = time.monotonic()
        arrival = device.stream.classify(frame)
        if arrival is Arrival.STALE:
            return
        if arrival is Arrival.STARTS and not self._start(device_id, device, frame.session_id):
            return
        session, reassembler = device.session, device.stream.reassembler
        if session is None or reassembler is None:
            return
        for pcm in reassembler.push(frame):
            session.push(pcm)
        if reassembler.complete:
            session.end(EndReason.DEVICE)

    def _on_control(self, device_id: str, payload: bytes) -> None:
        if len(payload) > MAX_CONTROL_BYTES:
            self._reject(ErrorCode.PAYLOAD_TOO_LARGE)
            self._error(device_id, ErrorCode.PAYLOAD_TOO_LARGE, f"control message over {MAX_CONTROL_BYTES} bytes")
            return
        try:
            message = decode_device_message(payload)
        except ProtocolError as exc:
            self._reject(ErrorCode.BAD_CONTROL)
            self._error(device_id, ErrorCode.BAD_CONTROL, str(exc))
            return
        device = self._device(device_id)
        if isinstance(message, Configure):
            self._configure(device_id, device, message)
        elif isinstance(message, Cancel):
            if device.session is not None and device.session.session_id == message.session:
                device.session.cancel()
            device.stream.close(message.session)
        elif isinstance(message, Start):
            if device.stream.is_closed(message.session):
                return
            if device.session is not None and device.session.session_id == message.session:
                # Audio overtook its start (they travel on different topics): apply what still can be.
                device.last_start = message
                endpointing = self._tuning(device_id, device, message).endpointing
                device.session.configure(endpointing, self._options(device_id, message))
                return
            # Keep the options for the audio to come; a device has one session running at a time.
            device.options = {message.session: message}
            if device.stream.session_id != message.session:
                self._start(device_id, device, message.session)

    # Sessions ----------------------------------------------------------------------------------

    def _start(self, device_id: str, device: _Device, session_id: int) -> bool:
        if not self._accepting or (device.session is None and self._active >= self._config.session.max_sessions):
            self.stats.sessions_refused += 1
            device.stream.close(session_id)
            reason = (
                "the bridge is shutting down"
                if not self._accepting
                else (f"{self._config.session.max_sessions} sessions are active; retry shortly")
            )
            self._error(device_id, ErrorCode.TOO_MANY_SESSIONS, reason, session_id, retryable=True)
            return False
        restart = device.stream.session_id == session_id
        if device.session is not None:
            device.session.cancel()  # superseded: a device speaks one utterance at a time
        device.stream.begin(session_id)
        start = device.options.pop(session_id, None) or (device.last_start if restart else None)
        device.options.clear()
        device.last_start = start
        session = Session(
            device_id,
            session_id,
            self._services,
            tuning=self._tuning(device_id, device, start),
            options=self._options(device_id, start),
        )
        if device.session is None:
            self._active += 1
        device.session = session
        device.last_frame = time.monotonic()  # the idle clock starts with the session
        self.stats.sessions_started += 1
        task = asyncio.create_task(session.run(), name=f"session-{device_id}-{session_id}")
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._finished(device, session, t))
        return True

    def _configure(self, device_id: str, device: _Device, message: Configure) -> None:
        """Runtime tuning for the device's next sessions; validated as a whole, answered with ``configured``."""
        base = EndpointingOverrides() if message.reset or device.overrides is None else device.overrides
        changes = {f: v for f in EndpointingOverrides.__struct_fields__ if (v := getattr(message, f)) is not None}
        overrides = msgspec.structs.replace(base, **changes)
        layered = _layer(self._config.devices.tuning.get(device_id), overrides)
        if problem := overrides_problem(self._config, layered):
            self._error(device_id, ErrorCode.BAD_CONTROL, f"$.{problem[0]}: {problem[1]}")
            return
        device.overrides = overrides
        effective = self._tuning(device_id, device, None)
        task = asyncio.create_task(self._services.publisher.send(device_id, effective))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _tuning(self, device_id: str, device: _Device, start: Start | None) -> Configured:
        """Config, then ``[devices.<id>]``, then the device's ``configure``, then the session's ``start``."""
        layered = _layer(self._config.devices.tuning.get(device_id), device.overrides)
        return effective_tuning(self._config, layered, start)

    def _options(self, device_id: str, start: Start | None) -> SessionOptions:
        """The device's per-session options over the configured ``asr.lang`` / ``asr.prompt``."""
        asr = self._config.asr
        return SessionOptions(
            language=(start.language if start else None) or asr.lang or None,
            prompt=(start.prompt if start else None) or asr.prompt or None,
            device_id=device_id,
        )

    def _finished(self, device: _Device, session: Session, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            session.log.error("session.crashed", error=repr(task.exception()))
        if device.session is session:  # else a newer session already replaced it in the stream
            device.stream.close(session.session_id)
            device.session = None
            self._active -= 1
        session.log.debug("session.closed", **_asdict(device.stream.stats))

    def _reject(self, code: ErrorCode | str) -> None:
        self.stats.rejected += 1
        key = str(code)
        self.stats.rejected_by_code[key] = self.stats.rejected_by_code.get(key, 0) + 1

    def _error(
        self, device_id: str, code: ErrorCode, message: str, session: int | None = None, *, retryable: bool = False
    ) -> None:
        device = self._device(device_id)
        now = time.monotonic()
        if now - device.last_error.get(code, -ERROR_INTERVAL_S) < ERROR_INTERVAL_S:
            return
        device.last_error[code] = now
        log.info("device.error", device=device_id, code=code.value, reason=message[:200])
        error = Error(code=code, message=message, retryable=retryable, session=session)
        task = asyncio.create_task(self._services.publisher.send(device_id, error))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # Housekeeping ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Flush reorder windows of streams that went quiet; forget idle devices."""
        while True:
            await asyncio.sleep(QUIET_FLUSH_S / 2)
            now = time.monotonic()
            for device_id, device in list(self._devices.items()):
                reassembler, session = device.stream.reassembler, device.session
                if reassembler is not None and session is not None and now - device.last_frame > QUIET_FLUSH_S:
                    if reassembler.waiting or (reassembler.last_seq is not None and not reassembler.complete):
                        for pcm in reassembler.flush():
                            session.push(pcm)
                        if reassembler.complete:
                            session.end(EndReason.DEVICE)
                if session is not None and now - device.last_frame > self._config.session.idle_timeout_s:
                    session.end(EndReason.TIMEOUT)  # device gone, or its LAST frame lost
                if session is None and now - device.last_seen > 600:
                    self.stats.retired_streams.add(device.stream.stats)
                    del self._devices[device_id]

    async def drain(self, timeout: float) -> None:
        """Stop taking sessions; give running ones ``timeout`` seconds to finish."""
        self._accepting = False
        pending = [t for t in self._tasks if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=timeout)
        for task in self._tasks:
            task.cancel()


def effective_tuning(
    config: Config, layered: EndpointingOverrides | None = None, start: Start | None = None
) -> Configured:
    """The endpointing a session runs with: ``config`` under per-device ``layered`` overrides and ``start``."""
    vad = config.asr.vad
    layered = layered or EndpointingOverrides()
    threshold = _pick(layered.threshold, vad.threshold)
    negative = layered.neg_threshold
    if negative is None:
        negative = vad.neg_threshold if layered.threshold is None and vad.neg_threshold is not None else None
    return Configured(
        endpointing=(start.endpointing if start and start.endpointing else None)
        or _pick(layered.endpointing, config.session.endpointing),
        threshold=threshold,
        neg_threshold=negative if negative is not None else max(min(threshold, 0.95) - 0.15, 0.05),
        min_speech_duration_ms=_pick(layered.min_speech_duration_ms, vad.min_speech_duration_ms),
        max_silence_duration_ms=_pick(layered.max_silence_duration_ms, vad.max_silence_duration_ms),
        hangover_ms=_pick(layered.hangover_ms, vad.hangover_ms),
        no_speech_timeout_ms=_pick(layered.no_speech_timeout_ms, config.session.no_speech_timeout_ms),
        max_utterance_s=_pick(layered.max_utterance_s, config.session.max_utterance_s),
        vad_engine=_pick(layered.vad_engine, vad.engine),
        webrtc_mode=_pick(layered.webrtc_mode, vad.webrtc_mode),
    )


T = TypeVar("T")


def _pick(value: T | None, default: T) -> T:
    return default if value is None else value


def _layer(*layers: EndpointingOverrides | None) -> EndpointingOverrides:
    """Later layers win field by field; ``None`` fields and layers are transparent."""
    merged = EndpointingOverrides()
    for layer in layers:
        if layer is not None:
            changes = {f: v for f in EndpointingOverrides.__struct_fields__ if (v := getattr(layer, f)) is not None}
            merged = msgspec.structs.replace(merged, **changes)
    return merged


def _asdict(stats: object) -> dict[str, int]:
    return {name: getattr(stats, name) for name in getattr(stats, "__slots__", ())}
