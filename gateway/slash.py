"""A session's slash commands: the gateway-side handle of its slash worker process.

One ``SlashRunner`` per session, owned by the session (its teardown funnel calls :meth:`SlashRunner.close`).
The worker (``slash_worker.py``) starts on the first command, leads its own process group, and runs one
command at a time; this side only moves small frames over its pipes on the event loop.  A command that
outlives ``config.slash_timeout_s`` costs the worker: its group is killed and the next command starts a
fresh one, so a runaway ``/grep`` can never wedge the session's commands.

Where the worker runs is the backend's business (:mod:`workers.backends.slash`): a child of the gateway
locally; with the Ray backend, a child of the host actor on the session's node (its pipes relayed by
actor calls).  This side only sees bytes in and out, so both behave the same, failures included: a
transport that breaks (a dead node) answers the running command ``ok: false`` and the next command
starts a fresh worker wherever the backend can place it.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.config import Config
from workers.backends.slash import LocalSlashBackend, SlashBackend, SlashWorker
from workers.channel import ChannelError, FrameDecoder, Kind, control_frame
from workers.process import describe_exit

logger = logging.getLogger("worker_gateway.slash")


class SlashState(enum.Enum):
    IDLE = "idle"  # no worker: none started yet, or the last one was stopped
    READY = "ready"  # a worker is running
    CLOSED = "closed"  # the session is closing: no worker will start again


class _WorkerGone(Exception):
    """The worker's stdout reached EOF before it answered."""


@dataclass
class _Worker:
    proc: SlashWorker
    decoder: FrameDecoder = field(default_factory=FrameDecoder)
    stopping: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid


class SlashRunner:
    """Runs ``/commands`` for one session in its slash worker.  Commands are serialised."""

    def __init__(
        self,
        config: Config,
        cwd: str,
        backend: SlashBackend | None = None,
        node: Callable[[], str | None] = lambda: None,
    ) -> None:
        """``backend`` starts the worker (default: on this machine); ``node`` names the node the session's
        agent worker runs on now (asked at each start, so a restart follows the session)."""
        self._config = config
        self._cwd = cwd
        self._backend: SlashBackend = backend or LocalSlashBackend.from_config(config)
        self._node = node
        self._lock = asyncio.Lock()
        self._worker: _Worker | None = None
        self._state = SlashState.IDLE
        self._next_id = 0

    @property
    def pid(self) -> int | None:
        """The running worker's pid (also its process group id), or None."""
        return self._worker.pid if self._worker is not None else None

    @property
    def node(self) -> str | None:
        """Where the running worker is (the Ray node id), or None (this machine, or no worker)."""
        return self._worker.proc.node if self._worker is not None else None

    @property
    def state(self) -> SlashState:
        return self._state

    async def exec(self, command: str, snapshot: dict[str, Any]) -> dict[str, Any]:
        """Run one command line (e.g. ``"/grep TODO src"``) and return ``{"ok": bool, "output": str}``.

        User-visible failures (unknown command, bad regex, timeout, worker crash) are ``ok: false`` with a
        message, never an exception.  Cancelling the call kills the worker (its state is unknown then).
        """
        name = command.strip().split(" ", 1)[0][:64] or "(empty command)"
        async with self._lock:
            if self._state is SlashState.CLOSED:
                return _failure("the session is closing; slash commands are no longer available")
            try:
                worker = await self._ensure_worker()
            except OSError as exc:
                return _failure(f"could not start the slash worker: {exc}")
            self._next_id += 1
            request_id = self._next_id
            timeout = self._config.slash_timeout_s
            try:
                async with asyncio.timeout(timeout):
                    return await self._roundtrip(worker, request_id, command, snapshot)
            except TimeoutError:
                await self._stop(worker, grace_s=0.0)
                return _failure(
                    f"{name} timed out after {timeout:g} s; its slash worker was stopped "
                    "(the next command starts a fresh one)"
                )
            except (_WorkerGone, ChannelError, ConnectionError) as exc:
                await self._stop(worker, grace_s=0.0)
                if self._state is SlashState.CLOSED:
                    return _failure(f"the session closed while {name} was running")
                detail = describe_exit(worker.proc.returncode) if isinstance(exc, _WorkerGone) else str(exc)
                return _failure(
                    f"the slash worker died while running {name} ({detail}); the next command starts a fresh one"
                )
            except BaseException:
                worker.proc.kill()
                self._forget(worker)
                raise

    async def close(self) -> None:
        """End the worker's group (EOF, SIGTERM, then SIGKILL after ``kill_grace_s``) and reap it.
        Idempotent; does not wait for a running command (that command is answered ``ok: false``)."""
        self._state = SlashState.CLOSED
        worker = self._worker
        if worker is not None:
            await self._stop(worker, grace_s=self._config.kill_grace_s)

    # Internals -----------------------------------------------------------------------------------------

    async def _ensure_worker(self) -> _Worker:
        if self._worker is not None and self._worker.proc.returncode is None:
            return self._worker
        if self._worker is not None:  # died between commands: make sure nothing of its group is left
            await self._stop(self._worker, grace_s=0.0)
        proc = await self._backend.start_slash(self._cwd, self._node())
        worker = _Worker(proc)
        self._worker = worker
        try:
            async with asyncio.timeout(self._config.worker_start_timeout_s):  # keeps a cancel (wait_for may not)
                await self._await_ready(worker)
        except (TimeoutError, _WorkerGone, ChannelError, ConnectionError) as exc:
            await self._stop(worker, grace_s=0.0)
            raise OSError(f"the slash worker did not become ready ({type(exc).__name__})") from None
        if self._state is SlashState.CLOSED:  # close() ran while the worker was starting
            await self._stop(worker, grace_s=0.0)
            raise OSError("the session is closing")
        self._state = SlashState.READY
        return worker

    async def _await_ready(self, worker: _Worker) -> None:
        while True:
            data = await worker.proc.read()
            if not data:
                raise _WorkerGone()
            if any(f.kind is Kind.CONTROL and f.name == "ready" for f in worker.decoder.feed(data)):
                return

    async def _roundtrip(
        self, worker: _Worker, request_id: int, command: str, snapshot: dict[str, Any]
    ) -> dict[str, Any]:
        proc = worker.proc
        await proc.write(
            control_frame(
                "exec", {"id": request_id, "command": command, "cwd": self._cwd, "snapshot": _plain(snapshot)}
            )
        )
        while True:
            data = await proc.read()
            if not data:
                await proc.wait()
                raise _WorkerGone()
            for frame in worker.decoder.feed(data):
                if frame.kind is Kind.CONTROL and frame.name == "result":
                    body = frame.json()
                    if body.get("id") == request_id:
                        return {"ok": bool(body.get("ok")), "output": str(body.get("output", ""))}

    async def _stop(self, worker: _Worker, grace_s: float) -> None:
        """The one way a worker ends; concurrent callers share the same stop."""
        if worker.stopping is None:
            worker.stopping = asyncio.create_task(self._stop_worker(worker, grace_s))
        await asyncio.shield(worker.stopping)

    async def _stop_worker(self, worker: _Worker, grace_s: float) -> None:
        await worker.proc.aclose(grace_s)
        self._forget(worker)

    def _forget(self, worker: _Worker) -> None:
        if self._worker is worker:
            self._worker = None
            if self._state is SlashState.READY:
                self._state = SlashState.IDLE


def _failure(message: str) -> dict[str, Any]:
    return {"ok": False, "output": message}


def _plain(snapshot: dict[str, Any]) -> dict[str, Any]:
    """The snapshot as JSON-safe scalars (the gateway's own objects become their ``str``)."""
    return {str(k): v if isinstance(v, (str, int, float, bool, type(None))) else str(v) for k, v in snapshot.items()}
