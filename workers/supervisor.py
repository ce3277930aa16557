"""Start, hand out, watch and stop agent workers: the seam between the gateway and its worker processes.

The gateway only sees a :class:`WorkerHandle`: a framed byte channel (``send`` / ``frames``) and a way to
end the worker (``stop`` / ``kill`` / ``wait``).  Where the worker runs is this module's business, so a
later backend can place workers elsewhere behind the same surface.

Locally: a warm pool of idle workers forked from a forkserver (``launch``) makes ``acquire`` cost a few
milliseconds.  Each worker is the child of its session's keeper (``workers/keeper.py``), a subreaper that
ends whatever a turn started, even what left the group or the session; stopping goes through the one
process handle (``workers/process.py``: SIGTERM, SIGKILL after ``kill_grace_s``, then a sweep).  Exit statuses come from the
forkserver's status pipe, watched with ``loop.add_reader``: nothing blocks the loop and no thread waits.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import sys
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from workers import launch
from workers.agents import registry
from workers.channel import (
    DEFAULT_MAX_QUEUED_BYTES,
    ChannelError,
    Frame,
    FrameReader,
    FrameWriter,
    Kind,
    control_frame,
    encode_frame,
    open_frame_reader,
    open_frame_writer,
)
from workers.cpu_cgroup import WorkerCgroup
from workers.group_nicer import GroupNicer
from workers.ops import Op
from workers.process import KeptProcess, describe_exit

logger = logging.getLogger("worker_gateway.supervisor")

#: Beyond ``kill_grace_s``: time for the keeper's SIGKILL sweep and exit before the gateway's own SIGKILL.
_KEEPER_MARGIN_S = 1.0
#: How long ``close`` waits for the forkserver to exit once its last worker is gone.
_FORKSERVER_EXIT_S = 5.0


@dataclass(frozen=True)
class ExitStatus:
    """How a worker ended: ``returncode`` when it exited, ``signal`` when a signal killed it; both None
    when the forkserver died before reporting it."""

    pid: int
    returncode: int | None
    signal: int | None

    @classmethod
    def from_code(cls, pid: int, code: int | None) -> ExitStatus:
        if code is not None and code < 0:
            return cls(pid, None, -code)
        return cls(pid, code, None)


class WorkerStartError(Exception):
    """A worker could not be made ready (JSON-RPC error 5001)."""

    code = 5001

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def as_body(self) -> dict[str, Any]:
        """As a worker's ``init_failed`` body says it (how a Ray host hands the error on)."""
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if isinstance(self, SavedStateError):
            body["bad_state"] = True
        return body

    @staticmethod
    def from_body(body: dict[str, Any]) -> WorkerStartError:
        """The error an ``init_failed`` body (or :meth:`as_body`) names."""
        message = str(body.get("message") or "the agent failed to start")
        if body.get("code") == UnknownAgentError.code:
            return UnknownAgentError(message)
        if body.get("bad_state") is True:
            return SavedStateError(message)
        return WorkerStartError(message)


class SavedStateError(WorkerStartError):
    """The new worker could not decode the session's saved state (5001): the state is unusable for good,
    so the caller drops it (only a broken or hostile earlier worker can have saved it)."""


class UnknownAgentError(WorkerStartError):
    """The requested agent does not exist (JSON-RPC error 4004)."""

    code = 4004


class WorkerState(enum.Enum):
    RUNNING = "running"
    STOPPING = "stopping"
    EXITED = "exited"


class WorkerHandle:
    """One worker process, as the gateway sees it.  Create through :meth:`Supervisor.acquire`."""

    #: Local workers run on this machine: no node to name (the Ray backend's handles have one).
    node: str | None = None

    def __init__(
        self,
        spawned: launch.SpawnedWorker,
        reader: FrameReader,
        writer: FrameWriter,
        *,
        kill_grace_s: float,
        on_exit: Callable[[WorkerHandle], None],
        on_turn: Callable[[WorkerHandle, bool], None] | None = None,
    ) -> None:
        self.pid = spawned.pid  # the worker proper, also its process group id
        self.agent = ""
        self._spawned = spawned
        self._reader = reader
        self._writer = writer
        self._kill_grace_s = kill_grace_s
        self._on_exit = on_exit
        self._on_turn = on_turn
        self._loop = asyncio.get_running_loop()
        self._exited: asyncio.Future[ExitStatus] = self._loop.create_future()
        self._stopping: asyncio.Task[ExitStatus] | None = None
        self._process = KeptProcess(self.pid, self._exit_code, self._known_code, keeper_pid=spawned.keeper_pid)
        self._pidfd: int | None = None
        self._loop.add_reader(spawned.sentinel, self._on_sentinel)

    def __repr__(self) -> str:
        return f"<WorkerHandle pid={self.pid} agent={self.agent!r} {self.state.value}>"

    @property
    def state(self) -> WorkerState:
        if self._exited.done():
            return WorkerState.EXITED
        return WorkerState.STOPPING if self._stopping is not None else WorkerState.RUNNING

    @property
    def alive(self) -> bool:
        return not self._exited.done()

    @property
    def exit_status(self) -> ExitStatus | None:
        return self._exited.result() if self._exited.done() else None

    def send(self, op: str, body: dict[str, Any] | None = None) -> None:
        """Queue a CONTROL frame to the worker without blocking.  A no-op once the worker is gone (its end
        is reported through :meth:`wait` and the end of :meth:`frames`).  Raises :class:`ChannelError` if
        the worker has stopped reading control frames altogether (it is broken: stop it)."""
        self._write(control_frame(op, body))

    def send_encoded(self, op: str, body: bytes) -> None:
        """:meth:`send` with a body that is already encoded (sent as it is)."""
        self._write(encode_frame(Kind.CONTROL, op, body))

    def turn_running(self, running: bool) -> None:
        """The gateway's word that a turn started (True) or ended (False): the supervisor weighs the
        session's CPU share by it (``workers/cpu_weight.py``)."""
        if self._on_turn is not None:
            self._on_turn(self, running)

    def _write(self, frame: bytes) -> None:
        if not self._exited.done() and not self._writer.closed:
            self._writer.write(frame)

    def frames(self) -> AsyncIterator[Frame]:
        """Frames from the worker, in order; ends at EOF (the worker and everything holding its pipe are
        gone, or :meth:`stop` finished).  Single consumer.  A slow consumer pauses the worker."""
        return self._reader

    def frame_batches(self) -> AsyncIterator[list[Frame]]:
        """The same frames, every one already read handed over at once (a pipe read brings many): fewer
        wake-ups of the consumer.  A batch counts against the reader's bounds until the next is pulled."""
        return self._reader.batches()

    async def wait(self) -> ExitStatus:
        """Resolve when the worker process exits, for whatever reason."""
        return await asyncio.shield(self._exited)

    def kill(self) -> None:
        """End the whole session now (non-blocking; :meth:`wait` reports the exit): the worker's keeper
        SIGKILLs everything the worker started, wherever it went, then exits."""
        self._process.kill()

    async def stop(self) -> ExitStatus:
        """End the worker and everything it started (``workers/process.py``): SIGTERM, SIGKILL after
        ``kill_grace_s``, then the containment sweep.  Idempotent and safe to call concurrently;
        cancelling a caller does not interrupt the teardown."""
        if self._stopping is None:
            self._stopping = self._loop.create_task(self._terminate(), name=f"stop-worker-{self.pid}")
        return await asyncio.shield(self._stopping)

    async def _terminate(self) -> ExitStatus:
        await self._process.aclose(self._kill_grace_s + _KEEPER_MARGIN_S)
        self._writer.close()
        self._reader.close()
        return self._exited.result() if self._exited.done() else ExitStatus(self.pid, None, None)

    async def _exit_code(self) -> int | None:
        status = await asyncio.shield(self._exited)
        return -status.signal if status.signal is not None else status.returncode

    def _known_code(self) -> int | None:
        """The exit as a Popen-style code once known (255 stands for "exited, status lost")."""
        if not self._exited.done():
            return None
        status = self._exited.result()
        if status.signal is not None:
            return -status.signal
        return 255 if status.returncode is None else status.returncode

    # -- exit detection ---------------------------------------------------------------------------------

    def _on_sentinel(self) -> None:
        self._loop.remove_reader(self._spawned.sentinel)
        try:
            code = launch.read_exit_code(self._spawned.sentinel)
        except OSError:
            code = None
        if code is not None:
            self._set_exited(code, known=True)
            return
        # The forkserver died without reporting: the worker may well still run (reparented), so watch the
        # process itself from now on; its exit code is lost.
        logger.warning("forkserver gone; watching worker %d directly", self.pid)
        try:
            self._pidfd = os.pidfd_open(self._spawned.keeper_pid)
        except ProcessLookupError:
            self._set_exited(None, known=False)
        except (AttributeError, OSError):
            self._poll_alive()
        else:
            self._loop.add_reader(self._pidfd, self._set_exited, None, False)

    def _poll_alive(self) -> None:
        if self._exited.done():
            return
        try:
            os.kill(self._spawned.keeper_pid, 0)
        except ProcessLookupError:
            self._set_exited(None, known=False)
            return
        except PermissionError:
            pass
        self._loop.call_later(0.2, self._poll_alive)

    def _set_exited(self, code: int | None, known: bool) -> None:
        if self._exited.done():
            return
        if self._pidfd is not None:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        status = ExitStatus.from_code(self.pid, code) if known else ExitStatus(self.pid, None, None)
        launch.release_process(self._spawned, code)
        self._writer.close()
        self._exited.set_result(status)
        self._on_exit(self)


#: Config ``worker_cpu_cgroup``: "auto" puts the workers in one CPU cgroup where the gateway may make one.
CPU_CGROUP_MODES = ("auto", "off")


class _State(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    CLOSED = "closed"


class Supervisor:
    """Owns every worker it starts: a warm pool, the handed-out workers, and the forkserver."""

    def __init__(
        self,
        *,
        pool_size: int = 2,
        kill_grace_s: float = 2.0,
        nice: int = 19,
        start_timeout_s: float = 30.0,
        watchdog_poll_s: float = 0.5,
        max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES,
        scrub_secrets: Sequence[str] = (),
        pipe_bytes: int = launch.DEFAULT_PIPE_BYTES,
        max_sessions: int = 64,
        sched: str = "normal",
        read_budget_bytes: int | None = None,
        cpu_share: float = 0.25,
        cpu_cgroup: str = "off",
    ) -> None:
        if pool_size < 0 or kill_grace_s <= 0 or start_timeout_s <= 0 or watchdog_poll_s <= 0:
            raise ValueError("pool_size must be >= 0 and the durations positive")
        if cpu_cgroup not in CPU_CGROUP_MODES:
            raise ValueError(f"cpu_cgroup must be one of {', '.join(CPU_CGROUP_MODES)}, not {cpu_cgroup!r}")
        self._pool_size = pool_size
        self._kill_grace_s = kill_grace_s
        self._nice = nice
        self._start_timeout_s = start_timeout_s
        self._watchdog_poll_s = watchdog_poll_s
        self._max_queued_bytes = max_queued_bytes
        #: The worker -> gateway pipe's size, clamped so every session's pipe fits the user's pipe quota
        #: (sessions plus the warm pool).
        self._pipe_bytes = launch.worker_pipe_size(pipe_bytes, max_sessions + pool_size)
        self._sched = sched
        self._read_budget_bytes = read_budget_bytes
        #: All workers in one CPU cgroup of ``cpu_share`` times the gateway's weight (``workers/cpu_cgroup.py``)
        #: when ``cpu_cgroup`` is "auto" and one can be made; else each session's scheduling-group nice, set
        #: from here, follows how many run a turn.
        self._cpu_share = cpu_share
        self._cpu_cgroup_mode = cpu_cgroup
        self.cpu_cgroup: WorkerCgroup | None = None
        self._cgroup_forkserver: int | None = None  # the forkserver moved into it
        self._group_nicer = GroupNicer(cpu_share, nice)
        #: Literal secrets every worker's scrubber redacts (the gateway's token): sent over the init pipe,
        #: never through the environment or argv, where other processes could read them.
        self._scrub_secrets = list(scrub_secrets)
        self._gateway_pid = 0  # set by start(): the process whose death the workers watch
        self._state = _State.NEW
        self._pool: deque[WorkerHandle] = deque()
        self._workers: set[WorkerHandle] = set()
        self._spawning: set[asyncio.Future[launch.SpawnedWorker]] = set()
        self._entry_points: list[str] | None = None
        self._refill_wanted: asyncio.Event | None = None
        self._refill_task: asyncio.Task[None] | None = None
        self._failures = 0  # consecutive pool workers that died idle or failed to spawn
        self._closing: asyncio.Task[None] | None = None
        self._holds_forkserver = False

    @classmethod
    def from_config(cls, config: Any) -> Supervisor:
        return cls(
            pool_size=config.pool_size,
            kill_grace_s=config.kill_grace_s,
            nice=config.worker_nice,
            start_timeout_s=config.worker_start_timeout_s,
            watchdog_poll_s=config.watchdog_poll_s,
            scrub_secrets=[config.token] if getattr(config, "token", None) else [],
            pipe_bytes=getattr(config, "worker_pipe_bytes", launch.DEFAULT_PIPE_BYTES),
            max_sessions=getattr(config, "max_sessions", 64),
            sched=getattr(config, "worker_sched", "normal"),
            read_budget_bytes=getattr(config, "relay_read_budget_bytes", None),
            cpu_share=getattr(config, "worker_cpu_share", 0.25),
            cpu_cgroup=getattr(config, "worker_cpu_cgroup", "off"),
        )

    @property
    def live_workers(self) -> int:
        """Workers started and not yet exited: pooled and handed out."""
        return sum(1 for w in self._workers if w.alive)

    @property
    def pool_ready(self) -> int:
        return sum(1 for w in self._pool if w.alive)

    def known_agents(self) -> list[str]:
        """Built-in agent names, then installed entry points (read from metadata, nothing imported)."""
        if self._entry_points is None:
            self._entry_points = registry.entry_point_names()
        names = list(registry.BUILTIN_AGENTS)
        return names + [n for n in self._entry_points if n not in registry.BUILTIN_AGENTS]

    async def start(self) -> None:
        """Start the forkserver and begin filling the pool in the background."""
        if self._state is not _State.NEW:
            return
        self._gateway_pid = os.getpid()
        await asyncio.to_thread(launch.acquire_forkserver)
        self._holds_forkserver = True
        if self._cpu_cgroup_mode == "auto":
            try:
                self.cpu_cgroup = await asyncio.to_thread(self._enter_cpu_cgroup)
            except Exception:  # a tuning: never a reason not to start
                logger.exception("could not put the workers in a cpu cgroup")
            if self.cpu_cgroup is not None:
                self._group_nicer.enabled = False  # autogroups do not apply inside a cgroup
        self._state = _State.RUNNING
        self._entry_points = await asyncio.to_thread(registry.entry_point_names)
        self._refill_wanted = asyncio.Event()
        self._refill_wanted.set()
        self._refill_task = asyncio.get_running_loop().create_task(self._refill(), name="worker-pool-refill")

    async def acquire(
        self,
        agent: str,
        options: dict[str, Any],
        cwd: str | None,
        session_id: str | None = None,
        state: bytes | None = None,
    ) -> WorkerHandle:
        """A worker that has loaded ``agent`` and is ready for its first prompt.

        Raises :class:`UnknownAgentError` (4004) or :class:`WorkerStartError` (5001); the worker is then
        already stopped.  If the caller is cancelled, the worker is stopped too."""
        if self._state is not _State.RUNNING:
            raise WorkerStartError("the worker supervisor is not running")
        await self._check_agent(agent)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._start_timeout_s
        handle = self._take_pooled()
        if self._refill_wanted is not None:
            self._refill_wanted.set()
        if handle is None:
            try:
                # asyncio.timeout, not wait_for: on 3.11, wait_for returns the result of an inner that finished
                # just as the caller was cancelled, losing the cancel (the test of a cancelled acquire hit it).
                async with asyncio.timeout(self._start_timeout_s):
                    handle = await self._spawn()
            except TimeoutError:
                raise WorkerStartError(f"no worker could be started within {self._start_timeout_s:g} s") from None
            except (OSError, ValueError, RuntimeError, EOFError) as exc:
                raise WorkerStartError(f"could not start a worker: {exc}") from exc
        handle.agent = agent
        try:
            init: dict[str, Any] = {
                "agent": agent,
                "options": options,
                "cwd": cwd,
                "session_id": session_id,
                "sys_path": _import_path(),
                "scrub_secrets": self._scrub_secrets,
            }
            if state is not None:  # the agent's last snapshot, restored before start() (docs/agents.md)
                init["state_frame"] = True
            handle.send(Op.INIT, init)
            if state is not None:
                # As kept, in a frame of its own: the worker decodes it, never the loop (a state is up to a
                # few MiB), and bytes that are not one JSON value cannot become keys of the init.
                handle.send_encoded(Op.STATE, state)
            async with asyncio.timeout_at(deadline):
                first = await self._first_frame(handle)
        except TimeoutError:
            await handle.stop()
            raise WorkerStartError(
                f"worker {handle.pid} did not load agent {agent!r} within {self._start_timeout_s:g} s"
            ) from None
        except BaseException:
            await asyncio.shield(handle.stop())
            raise
        if first.kind is Kind.CONTROL and first.name == "ready":
            self._failures = 0
            if self.cpu_cgroup is None:  # a keeper slow to fork was not tracked at spawn: it has forked now
                self._group_nicer.add(handle, handle._spawned.keeper_pid)
            return handle
        await handle.stop()
        if first.kind is Kind.CONTROL and first.name == "init_failed":
            raise WorkerStartError.from_body(first.json())
        raise WorkerStartError(f"worker {handle.pid} answered init with {first.name!r}")

    async def close(self) -> None:
        """Stop every worker (pooled and handed out) and the forkserver.  Idempotent."""
        if self._state is _State.NEW:
            self._state = _State.CLOSED
            return
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_task(self._close(), name="supervisor-close")
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        self._state = _State.CLOSED
        if self._refill_task is not None:
            self._refill_task.cancel()
            await asyncio.gather(self._refill_task, return_exceptions=True)
        # Spawns still in flight land in _workers (or are abandoned) before we stop everyone.
        await asyncio.gather(*self._spawning, return_exceptions=True)
        self._pool.clear()
        await asyncio.gather(*(w.stop() for w in list(self._workers)), return_exceptions=True)
        self._group_nicer.close()
        if not self._holds_forkserver:
            return
        self._holds_forkserver = False
        pid = await asyncio.to_thread(launch.release_forkserver)
        if pid is not None and not await launch.await_exit(pid, _FORKSERVER_EXIT_S):
            logger.warning("forkserver %d still running %.0f s after close (other users?)", pid, _FORKSERVER_EXIT_S)
        if self.cpu_cgroup is not None:
            self.cpu_cgroup.remove()

    # -- internals --------------------------------------------------------------------------------------

    def _enter_cpu_cgroup(self) -> WorkerCgroup | None:
        """The workers' cgroup, with the forkserver in it (so every worker is born there), or None."""
        cgroup = WorkerCgroup.create(self._cpu_share)
        pid = launch.forkserver_pid()
        if cgroup is not None and (pid is None or not cgroup.enter(pid)):
            cgroup.remove()
            return None
        self._cgroup_forkserver = pid
        return cgroup

    def _spawn_worker(self, **options: Any) -> launch.SpawnedWorker:
        """:func:`launch.spawn_worker` (blocking: in a thread), then the cgroup kept (a move can take ms)."""
        spawned = launch.spawn_worker(**options)
        if self.cpu_cgroup is not None:
            self._keep_in_cpu_cgroup(spawned)
        return spawned

    def _keep_in_cpu_cgroup(self, spawned: launch.SpawnedWorker) -> None:
        """A forkserver that died was started again, outside the cgroup: move it in, and the worker it
        just forked (keeper and worker proper; an idle worker has started nothing else yet)."""
        assert self.cpu_cgroup is not None
        pid = launch.forkserver_pid()
        if pid == self._cgroup_forkserver:
            return
        logger.warning("the forkserver was restarted (pid %s): moving it into %s", pid, self.cpu_cgroup.path)
        if pid is not None and self.cpu_cgroup.enter(pid):
            self._cgroup_forkserver = pid
        for member in {spawned.keeper_pid, spawned.pid}:
            self.cpu_cgroup.enter(member)

    async def _check_agent(self, agent: str) -> None:
        try:
            registry.check_name(agent, self._entry_points or [])
            return
        except registry.UnknownAgent:
            pass
        self._entry_points = await asyncio.to_thread(registry.entry_point_names)  # installed since start?
        try:
            registry.check_name(agent, self._entry_points)
        except registry.UnknownAgent as exc:
            raise UnknownAgentError(str(exc)) from None

    def _take_pooled(self) -> WorkerHandle | None:
        while self._pool:
            handle = self._pool.popleft()
            if handle.alive:
                return handle
        return None

    async def _first_frame(self, handle: WorkerHandle) -> Frame:
        try:
            return await anext(handle.frames())
        except StopAsyncIteration:
            status = await handle.wait()
            raise WorkerStartError(f"worker {handle.pid} exited before it was ready ({_describe(status)})") from None
        except ChannelError as exc:
            raise WorkerStartError(f"worker {handle.pid} sent a corrupt frame: {exc}") from None

    async def _spawn(self) -> WorkerHandle:
        """Start a worker and register it (so ``close`` can always reach it).  The blocking part runs in a
        thread whose result is never lost: if our caller is cancelled meanwhile, the worker is killed."""
        future = asyncio.ensure_future(
            asyncio.to_thread(
                self._spawn_worker,
                gateway_pid=self._gateway_pid,
                nice=self._nice,
                watchdog_poll_s=self._watchdog_poll_s,
                kill_grace_s=self._kill_grace_s,
                pipe_bytes=self._pipe_bytes,
                sched=self._sched,
                group_nice=self.cpu_cgroup is None and not self._group_nicer.enabled,
            )
        )
        self._spawning.add(future)
        future.add_done_callback(self._spawning.discard)
        try:
            spawned = await asyncio.shield(future)
        except asyncio.CancelledError:
            future.add_done_callback(_abandon_result)
            raise
        try:
            reader = await open_frame_reader(
                spawned.read_fd, max_queued_bytes=self._max_queued_bytes, read_budget_bytes=self._read_budget_bytes
            )
        except BaseException:
            launch.abandon(spawned, closed=(spawned.read_fd,))  # open_frame_reader owns (and closed) it
            raise
        try:
            writer = await open_frame_writer(spawned.write_fd)
        except BaseException:
            reader.close()
            launch.abandon(spawned, closed=(spawned.read_fd, spawned.write_fd))
            raise
        handle = WorkerHandle(
            spawned,
            reader,
            writer,
            kill_grace_s=self._kill_grace_s,
            on_exit=self._on_exit,
            on_turn=self._group_nicer.set_busy,
        )
        self._workers.add(handle)
        if spawned.pid != spawned.keeper_pid:  # else the keeper never forked: it may not lead a session yet
            self._group_nicer.add(handle, spawned.keeper_pid)
        if self._state is _State.CLOSED:
            await asyncio.shield(handle.stop())
            raise WorkerStartError("the worker supervisor was closed")
        return handle

    async def _refill(self) -> None:
        assert self._refill_wanted is not None
        while self._state is _State.RUNNING:
            await self._refill_wanted.wait()
            self._refill_wanted.clear()
            while self._state is _State.RUNNING and self.pool_ready < self._pool_size:
                if self._failures:
                    await asyncio.sleep(min(30.0, 0.05 * 2 ** min(self._failures, 10)))
                try:
                    handle = await self._spawn()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    self._failures += 1
                    logger.exception("could not start a pool worker (attempt %d)", self._failures)
                    continue
                self._pool.append(handle)

    def _on_exit(self, handle: WorkerHandle) -> None:
        self._workers.discard(handle)
        self._group_nicer.remove(handle)
        if handle in self._pool:
            self._pool.remove(handle)
            if handle._stopping is None and self._state is _State.RUNNING:
                self._failures += 1
                logger.warning("idle pool worker %d exited (%s)", handle.pid, _describe(handle.exit_status))
        if self._refill_wanted is not None:
            self._refill_wanted.set()


def _import_path() -> list[str]:
    """The gateway's ``sys.path`` for the worker to resolve ``module:attr`` agents as the gateway would;
    "" (the current directory) is pinned to the gateway's, never the session's cwd, so a project directory
    cannot shadow agent modules."""
    here = os.getcwd()
    return [entry or here for entry in sys.path]


def _abandon_result(future: asyncio.Future[launch.SpawnedWorker]) -> None:
    if not future.cancelled() and future.exception() is None:
        launch.abandon(future.result())


def _describe(status: ExitStatus | None) -> str:
    if status is None:
        return "still running"
    return describe_exit(-status.signal if status.signal is not None else status.returncode)
