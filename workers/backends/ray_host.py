"""The host actor: one per Ray node, running the local :class:`~workers.supervisor.Supervisor` inside it.

The agent never runs in this actor's process: each worker is a child of the actor's forkserver, the leader
of its own process group, with its watchdog watching *this* process (so the actor's death, e.g. a removed
node or ``ray.kill``, ends every worker it started).  The actor only moves bytes: one streaming generator
per worker life yields the worker's frames re-encoded and coalesced into batches; control frames arrive
as method calls; interrupts and stops kill the worker's group here, on its own node.

It also runs the sessions' slash workers on this node (``slash_worker.py`` started exactly as the local
backend starts it, under its keeper, watching *this* process), and relays their pipes: a call per request
write, a call per bounded read of the frames.  The slash worker never runs in the actor's process either.

It also watches its driver (the gateway): when the driver's process is gone (same node) or its heartbeat
stops (any node), the actor ends its workers and exits, so a dead gateway leaves nothing running.

The class is plain Python; :mod:`workers.backends.ray_backend` wraps it with ``ray.remote``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, cast

import psutil

from workers.channel import ChannelError, FrameReader, encode_frame
from workers.slash_process import SlashProcess, start_slash_worker
from workers.supervisor import Supervisor, WorkerHandle, WorkerStartError

logger = logging.getLogger("worker_gateway.ray_host")

#: Largest batch of frames one generator item carries (a few hundred KiB: fewer, larger Ray objects).
BATCH_BYTES = 256 * 1024
#: Largest read of a slash worker's frames one call returns.
SLASH_READ_BYTES = 64 * 1024
#: How long a slash read that met EOF waits for the keeper's exit status.
_SLASH_EXIT_WAIT_S = 5.0
#: How often the driver watch runs.
_WATCH_PERIOD_S = 0.2


class WorkerHost:
    """Hands out workers on this node; every call names a worker by its id, never by a pid."""

    def __init__(
        self, supervisor_options: dict[str, Any], driver_pid: int, driver_pid_space: str, orphan_timeout_s: float
    ) -> None:
        self._supervisor = Supervisor(**supervisor_options)
        self._driver_pid = driver_pid
        self._driver_pid_space = driver_pid_space
        self._orphan_timeout_s = orphan_timeout_s
        self._workers: dict[str, WorkerHandle] = {}
        self._slash: dict[str, SlashProcess] = {}
        self._slash_closing: set[asyncio.Task[Any]] = set()
        self._last_ping = time.monotonic()
        self._watch: asyncio.Task[None] | None = None
        self._node_id = ""

    async def start(self) -> dict[str, Any]:
        """Start the supervisor (forkserver and warm pool) and the driver watch; report where we run."""
        import ray

        self._node_id = ray.get_runtime_context().get_node_id()
        await self._supervisor.start()
        self._last_ping = time.monotonic()
        self._watch = asyncio.get_running_loop().create_task(self._watch_driver(), name="driver-watch")
        return {"node_id": self._node_id, "pid": os.getpid()}

    async def ping(self) -> dict[str, int]:
        """The gateway's heartbeat; answers with this host's counts."""
        self._last_ping = time.monotonic()
        return {"workers": len(self._workers), "pool_ready": self._supervisor.pool_ready}

    async def acquire(
        self, agent: str, options: dict[str, Any], cwd: str | None, session_id: str | None, state: bytes | None
    ) -> dict[str, Any]:
        """A ready worker, as ``{"ok": True, "worker_id", "pid"}``, or ``{"ok": False, "code", "message", "bad_state"?}``
        (errors travel as values: Ray's wrapped exceptions would lose the type the gateway maps to a code)."""
        try:
            handle = await self._supervisor.acquire(agent, options, cwd, session_id, state=state)
        except WorkerStartError as exc:
            return {"ok": False, **exc.as_body()}
        worker_id = uuid.uuid4().hex
        self._workers[worker_id] = handle
        return {"ok": True, "worker_id": worker_id, "pid": handle.pid}

    async def send(self, worker_id: str, op: str, body: dict[str, Any] | None) -> bool:
        handle = self._workers.get(worker_id)
        if handle is None:
            return False
        try:
            handle.send(op, body)
        except ChannelError:
            await self.stop_worker(worker_id)  # it stopped reading control frames: broken
            return False
        return True

    async def stream(self, worker_id: str) -> AsyncIterator[bytes | str]:
        """The worker's frames as raw bytes, batched up to :data:`BATCH_BYTES`, until EOF.  A ``str``
        item (always the last) reports a corrupt stream.  The caller sets generator backpressure, so a
        slow gateway stops this loop, which stops reading the pipe, which blocks the worker."""
        handle = self._workers.get(worker_id)
        if handle is None:
            return
        reader = cast("FrameReader", handle.frames())  # the local handle's reader: it knows what it holds
        try:
            async for frame in reader:
                batch = bytearray(encode_frame(frame.kind, frame.name, frame.body))
                while reader.queued_bytes and len(batch) < BATCH_BYTES:  # already decoded: no wait
                    frame = await anext(reader)
                    batch += encode_frame(frame.kind, frame.name, frame.body)
                yield bytes(batch)
        except ChannelError as exc:
            yield str(exc)

    async def stop_worker(self, worker_id: str) -> tuple[int, int | None, int | None] | None:
        """Kill the worker's group (SIGTERM, then SIGKILL) and report ``(pid, returncode, signal)``."""
        handle = self._workers.pop(worker_id, None)
        if handle is None:
            return None
        status = await handle.stop()
        return status.pid, status.returncode, status.signal

    # -- slash workers -----------------------------------------------------------------------------------

    async def slash_start(self, cwd: str, poll_s: float, nice: int, kill_grace_s: float) -> dict[str, Any]:
        """Start a session's slash worker here, as ``{"ok": True, "slash_id", "pid", "node_id"}`` or
        ``{"ok": False, "message"}``.  Its keeper watches this actor's pid: the actor's death ends it."""
        try:
            proc = await start_slash_worker(
                cwd=cwd, gateway_pid=os.getpid(), poll_s=poll_s, nice=nice, kill_grace_s=kill_grace_s
            )
        except OSError as exc:
            return {"ok": False, "message": f"{type(exc).__name__}: {exc}"}
        slash_id = uuid.uuid4().hex
        self._slash[slash_id] = proc
        return {"ok": True, "slash_id": slash_id, "pid": proc.pid, "node_id": self._node_id}

    async def slash_write(self, slash_id: str, data: bytes) -> str | None:
        """Hand request frames to the worker's stdin; None, or why it could not be done."""
        proc = self._slash.get(slash_id)
        if proc is None:
            return "the slash worker is gone"
        try:
            await proc.write(data)
        except (ConnectionError, RuntimeError) as exc:
            return f"the slash worker's request pipe broke ({type(exc).__name__})"
        return None

    async def slash_read(self, slash_id: str) -> tuple[bytes, int | None]:
        """The next bytes of the worker's frames (at most :data:`SLASH_READ_BYTES`), and at EOF (``b""``)
        its exit status when it has one."""
        proc = self._slash.get(slash_id)
        if proc is None:
            return b"", None
        data = await proc.read(SLASH_READ_BYTES)
        if data:
            return data, None
        try:
            return b"", await asyncio.wait_for(proc.wait(), _SLASH_EXIT_WAIT_S)
        except TimeoutError:
            return b"", None

    async def slash_stop(self, slash_id: str, grace_s: float) -> int | None:
        """End the slash worker and everything it started (keeper sequence and session sweep)."""
        proc = self._slash.pop(slash_id, None)
        if proc is None:
            return None
        return await proc.aclose(grace_s)

    async def slash_kill(self, slash_id: str) -> None:
        """End it now (the caller does not wait); reaped and swept in the background."""
        proc = self._slash.pop(slash_id, None)
        if proc is None:
            return
        proc.kill()
        task = asyncio.get_running_loop().create_task(proc.aclose(0.0))
        self._slash_closing.add(task)
        task.add_done_callback(self._slash_closing.discard)

    async def close(self) -> None:
        """Stop every worker, slash worker and the forkserver (the gateway's shutdown)."""
        self._workers.clear()
        slash, self._slash = list(self._slash.values()), {}
        await asyncio.gather(*(p.aclose(0.0) for p in slash), *self._slash_closing, return_exceptions=True)
        await self._supervisor.close()

    async def _watch_driver(self) -> None:
        same_pids = bool(self._driver_pid_space) and self._driver_pid_space == pid_space()
        created = _start_time(self._driver_pid) if same_pids else None
        while True:
            await asyncio.sleep(_WATCH_PERIOD_S)
            gone = same_pids and not _alive(self._driver_pid, created)
            silent = time.monotonic() - self._last_ping > self._orphan_timeout_s
            if gone or silent:
                # No graceful stop: nobody is left to read what a worker would still say.  SIGKILL every
                # handed-out group now; pooled workers and the forkserver see this process exit.
                logger.warning(
                    "gateway %s: killing this host's workers",
                    "process is gone" if gone else f"silent for {self._orphan_timeout_s:g} s",
                )
                for handle in list(self._workers.values()):
                    handle.kill()
                for proc in list(self._slash.values()):
                    proc.kill()
                os._exit(0)


def pid_space() -> str:
    """Names this process's pid namespace on this boot ("" if unknown): a driver pid means the same
    process here only when both match (two Ray nodes on one machine do; pods on one host may not)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot}:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return ""


def _alive(pid: int, created: float | None) -> bool:
    """The driver still runs: same pid, same start time (not a recycled pid), not a zombie (a killed
    gateway whose parent has not reaped it yet is gone for our purpose)."""
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and (created is None or proc.create_time() == created)
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True


def _start_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None
