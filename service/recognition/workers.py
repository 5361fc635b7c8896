"""Supervised worker processes: each dies with the bridge, however the bridge dies.

Engines that hold the GIL while they decode (pocketsphinx, later faster-whisper) run in worker
processes. A worker is ``python -m service.recognition.workers <module> <bridge pid> <fd>``: it
imports ``<module>`` and runs the functions the bridge names, one at a time, over its stdin and
stdout (length-prefixed pickles between two processes we own). Plain subprocesses rather than
``multiprocessing``: no resource tracker and no manager threads that could outlive the bridge.

A worker must not outlive the bridge (each holds a model, ~150 MB). Three guards, any one enough:

- Linux ``prctl(PR_SET_PDEATHSIG, SIGKILL)``: the kernel kills it when the *thread* that spawned it
  exits, so workers are spawned from the event-loop thread;
- a watchdog thread blocked on a pipe whose only write end the bridge holds: end of file means the
  bridge is gone, whatever killed it;
- SIGTERM: ignored while the bridge lives (the bridge decides when its workers stop; a service
  manager signals the whole process group during the drain), honoured once orphaned.

:class:`FairPool` shares a few workers between many sessions: first come, first served, at most one
worker per owner (a device).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import importlib
import os
import pickle
import signal
import struct
import sys
import threading
from collections.abc import Coroutine
from typing import IO, Any, Generic, TypeVar

import structlog

log = structlog.get_logger(__name__)
W = TypeVar("W")

_HEADER = struct.Struct("!I")
_PR_SET_PDEATHSIG = 1
_STOP_TIMEOUT_S = 5.0
_STDERR_LINE_CHARS = 300


class WorkerError(Exception):
    """A call that failed: the worker died (and is being replaced), timed out, or its function raised."""

    def __init__(self, message: str, *, died: bool) -> None:
        super().__init__(message)
        self.died = died


class WorkerProcess:
    """One supervised process running ``module``'s functions; a dead one is replaced.

    ``call`` survives the caller's cancellation: the request and its reply are one unit, so a
    cancelled session never leaves an unread reply for the next caller.
    """

    def __init__(self, module: str, init_args: tuple[Any, ...], *, name: str, call_timeout_s: float) -> None:
        self._module = module
        self._init_args = init_args
        self.name = name
        self._call_timeout_s = call_timeout_s
        self._lock = asyncio.Lock()
        self._child: _Child | None = None
        self._respawn: asyncio.Future[_Child] | None = None
        self._closed = False
        self.restarts = 0
        """Workers replaced after dying or hanging."""

    async def start(self) -> None:
        """Spawn the process and run ``module.init(*init_args)`` in it (raises :class:`WorkerError`)."""
        async with self._lock:
            self._child = await self._spawn()

    async def call(self, fn: str, *args: Any) -> Any:
        exchange = asyncio.ensure_future(self._exchange(fn, args))
        exchange.add_done_callback(_consume)
        return await asyncio.shield(exchange)

    async def _exchange(self, fn: str, args: tuple[Any, ...]) -> Any:
        async with self._lock:
            child = await self._running()
            try:
                async with asyncio.timeout(self._call_timeout_s):
                    return await child.request(fn, args)
            except (TimeoutError, OSError, asyncio.IncompleteReadError) as error:
                hung = isinstance(error, TimeoutError)
                await child.kill()
                self._child = None
                if self._closed:
                    raise WorkerError(f"the {self.name} worker was stopped", died=True) from None
                self.restarts += 1
                self._respawn = asyncio.ensure_future(self._spawn())
                self._respawn.add_done_callback(_consume)
                log.warning(
                    "worker.replaced", worker=self.name, hung=hung, returncode=child.returncode, restarts=self.restarts
                )
                what = "hung" if hung else "died"
                raise WorkerError(f"the {self.name} worker {what}; it was restarted", died=True) from None

    async def _running(self) -> _Child:
        if self._closed:
            raise WorkerError(f"the {self.name} worker was stopped", died=True)
        if self._child is None:
            respawn, self._respawn = self._respawn, None
            self._child = await (respawn or self._spawn())
        return self._child

    def _spawn(self) -> Coroutine[Any, Any, _Child]:
        return _Child.spawn(self._module, self._init_args, self.name, self._call_timeout_s)

    async def aclose(self) -> None:
        """Stop the process: end of its input and of the watchdog pipe, then SIGKILL if it lingers."""
        self._closed = True
        respawn, self._respawn = self._respawn, None
        if respawn is not None:
            with contextlib.suppress(Exception):
                self._child = await respawn
        child, self._child = self._child, None
        if child is not None:
            await child.stop()


def _consume(task: asyncio.Future[Any]) -> None:
    """Retrieve a shielded call's outcome when its caller was cancelled (no 'never retrieved' warning)."""
    if not task.cancelled():
        task.exception()


class _Child:
    """The process itself, its pipes and the write end of its watchdog pipe."""

    def __init__(self, process: asyncio.subprocess.Process, lifeline: int, name: str) -> None:
        self._process = process
        self._lifeline = lifeline
        self._stderr = asyncio.ensure_future(_log_stderr(process, name))

    @property
    def returncode(self) -> int | None:
        return self._process.returncode

    @classmethod
    async def spawn(cls, module: str, init_args: tuple[Any, ...], name: str, timeout_s: float) -> _Child:
        watch, lifeline = os.pipe()  # both close-on-exec: only this worker gets ``watch``
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                __name__,
                module,
                str(os.getpid()),
                str(watch),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                pass_fds=(watch,),
            )
        except BaseException:
            os.close(lifeline)
            raise
        finally:
            os.close(watch)
        child = cls(process, lifeline, name)
        try:
            async with asyncio.timeout(timeout_s):
                await child.request("init", init_args)
        except (TimeoutError, OSError, asyncio.IncompleteReadError):
            await child.kill()
            raise WorkerError(f"the {name} worker failed to start", died=True) from None
        except BaseException:  # init raised (WorkerError), or the caller was cancelled
            await child.kill()
            raise
        return child

    async def request(self, fn: str, args: tuple[Any, ...]) -> Any:
        assert self._process.stdin is not None and self._process.stdout is not None
        body = pickle.dumps((fn, args), protocol=pickle.HIGHEST_PROTOCOL)
        self._process.stdin.write(_HEADER.pack(len(body)) + body)
        await self._process.stdin.drain()
        (size,) = _HEADER.unpack(await self._process.stdout.readexactly(_HEADER.size))
        ok, value = pickle.loads(await self._process.stdout.readexactly(size))
        if not ok:
            raise WorkerError(value, died=False)
        return value

    async def stop(self) -> None:
        assert self._process.stdin is not None
        self._process.stdin.close()
        self._close_lifeline()
        try:
            await asyncio.wait_for(self._process.wait(), _STOP_TIMEOUT_S)
        except TimeoutError:
            await self.kill()
        await self._stderr

    async def kill(self) -> None:
        if self._process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._process.kill()
            await self._process.wait()
        self._close_lifeline()
        await self._stderr

    def _close_lifeline(self) -> None:
        if self._lifeline >= 0:
            os.close(self._lifeline)
            self._lifeline = -1


async def _log_stderr(process: asyncio.subprocess.Process, name: str) -> None:
    """A worker's stderr (a crash's traceback, a library's warning) as JSON log lines, not raw text."""
    assert process.stderr is not None
    with contextlib.suppress(ValueError, OSError):  # ValueError: a line beyond the reader's limit
        async for line in process.stderr:
            if text := line.decode(errors="replace").rstrip():
                log.warning("worker.stderr", worker=name, line=text[:_STDERR_LINE_CHARS])


class FairPool(Generic[W]):
    """A few workers shared by many sessions: FIFO, and never more than one per owner."""

    def __init__(self, workers: list[W]) -> None:
        self._idle = collections.deque(workers)
        self._waiters: collections.deque[tuple[str, asyncio.Future[W]]] = collections.deque()
        self._holders: set[str] = set()

    @property
    def waiting(self) -> int:
        return sum(1 for _, future in self._waiters if not future.done())

    def wanted(self, owner: str) -> bool:
        """Whether someone waits who would get the worker ``owner`` holds, were it given back."""
        return any(not f.done() and (o == owner or o not in self._holders) for o, f in self._waiters)

    async def acquire(self, owner: str) -> W:
        future: asyncio.Future[W] = asyncio.get_running_loop().create_future()
        self._waiters.append((owner, future))
        self._grant()
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(future.result(), owner)
            raise
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove((owner, future))

    def release(self, worker: W, owner: str) -> None:
        self._holders.discard(owner)
        self._idle.append(worker)
        self._grant()

    def _grant(self) -> None:
        for entry in list(self._waiters):
            if not self._idle:
                return
            owner, future = entry
            if future.done():
                self._waiters.remove(entry)
            elif owner not in self._holders:
                self._waiters.remove(entry)
                self._holders.add(owner)
                future.set_result(self._idle.popleft())


# ---- inside the worker process -------------------------------------------------------------------


def exit_on_sigterm_once_orphaned(bridge_pid: int) -> None:
    """SIGTERM is the bridge's to act on while it lives (it stops its workers after draining);
    a worker whose bridge is gone takes it as the order to exit."""

    def on_sigterm(signum: int, frame: object) -> None:
        if os.getppid() != bridge_pid:
            os._exit(128 + signum)

    signal.signal(signal.SIGTERM, on_sigterm)


def _guard(bridge_pid: int, watch_fd: int) -> None:
    """Tie this process's life to the bridge's (see the module docstring)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    exit_on_sigterm_once_orphaned(bridge_pid)
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != bridge_pid:  # the bridge died before the death signal was armed
        os._exit(1)

    def watchdog() -> None:
        with contextlib.suppress(OSError):
            while os.read(watch_fd, 1):
                pass
        os._exit(1)

    threading.Thread(target=watchdog, name="bridge-watchdog", daemon=True).start()


def _read_exactly(stream: IO[bytes], size: int) -> bytes | None:
    data = stream.read(size)
    return data if len(data) == size else None


def _serve(module_name: str, requests: IO[bytes], replies: IO[bytes]) -> None:
    module = importlib.import_module(module_name)
    while (header := _read_exactly(requests, _HEADER.size)) is not None:
        body = _read_exactly(requests, _HEADER.unpack(header)[0])
        if body is None:
            return
        fn, args = pickle.loads(body)
        try:
            reply = (True, getattr(module, fn)(*args))
        except Exception as error:
            reply = (False, f"{type(error).__name__}: {error}")
        data = pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)
        replies.write(_HEADER.pack(len(data)) + data)
        replies.flush()


def main(argv: list[str]) -> None:
    module_name, bridge_pid, watch_fd = argv[0], int(argv[1]), int(argv[2])
    _guard(bridge_pid, watch_fd)
    # The protocol keeps its own copies of stdin and stdout; whatever a library prints goes to stderr.
    requests = os.fdopen(os.dup(0), "rb")
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.dup2(2, 1)
    _serve(module_name, requests, replies)


if __name__ == "__main__":
    main(sys.argv[1:])
