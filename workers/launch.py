"""Creating worker processes through ``multiprocess``'s forkserver.

The forkserver is a small process, started once, that has already imported the worker code
(``_forkserver_preload``); each worker is a ``fork()`` of it, so a new worker costs a few milliseconds and
shares its memory copy-on-write.  Two adjustments to the stock machinery, both to keep that promise:

- the gateway's ``__main__`` is *not* re-run in each child (the stock start methods do, which for the
  ``worker-gateway`` console script would import the whole web stack into every worker);
- processes are not registered in ``multiprocess``'s child table: the supervisor alone reads each exit
  status from the forkserver's status pipe (the *sentinel*), so no other code can consume it first.

Everything here blocks briefly (a round-trip to the forkserver): call it from a thread, not the loop.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import io
import logging
import os
import signal
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any

import multiprocess
from multiprocess import forkserver, process, spawn, util
from multiprocess.context import reduction, set_spawning_popen
from multiprocess.popen_forkserver import Popen as _ForkServerPopen

from workers import contain, worker_main

logger = logging.getLogger("worker_gateway.launch")

PRELOAD = ["workers._forkserver_preload"]
_STATUS = struct.Struct("q")  # how the forkserver writes pids and exit codes to the sentinel
_ctx = multiprocess.get_context("forkserver")
_lock = threading.Lock()
_KEPT_CHILD_TIMEOUT_S = 10.0
_users = 0


class PassedFd:
    """A file descriptor to hand to a forkserver child: pickling it queues the fd for the forkserver's
    SCM_RIGHTS transfer, and it unpickles in the child as the child's own int fd."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> tuple[Any, ...]:
        return _received_fd, (reduction.DupFd(self.fd),)


def _received_fd(dup: Any) -> int:
    return dup.detach()


class _WorkerPopen(_ForkServerPopen):
    """The stock forkserver launch, minus the re-execution of ``__main__`` in the child."""

    def _launch(self, process_obj: Any) -> None:
        prep_data = spawn.get_preparation_data(process_obj._name)
        prep_data.pop("init_main_from_name", None)
        prep_data.pop("init_main_from_path", None)
        buf = io.BytesIO()
        set_spawning_popen(self)
        try:
            reduction.dump(prep_data, buf)
            reduction.dump(process_obj, buf)
        finally:
            set_spawning_popen(None)
        self.sentinel, w = forkserver.connect_to_new_process(self._fds)
        parent_w = os.dup(w)  # the child's "parent alive" sentinel, as in the stock implementation
        self.finalizer = util.Finalize(self, util.close_fds, (parent_w, self.sentinel))
        with open(w, "wb", closefd=True) as f:
            f.write(buf.getbuffer())
        self.pid = forkserver.read_signed(self.sentinel)


class _WorkerProcess(_ctx.Process):  # type: ignore[misc,name-defined]
    @staticmethod
    def _Popen(process_obj: Any) -> _WorkerPopen:
        return _WorkerPopen(process_obj)


@dataclass
class SpawnedWorker:
    """A started worker process and the gateway's ends of its two pipes (owned by the caller)."""

    pid: int  # the worker proper: leader of the process group that runs the agent
    keeper_pid: int  # its parent, the session's keeper (workers/keeper.py): session id, exit reported
    sentinel: int  # readable when the forkserver reports the exit status (or dies)
    read_fd: int  # frames from the worker
    write_fd: int  # control frames to the worker
    process: Any  # keeps the sentinel open; released by release_process()


def acquire_forkserver() -> None:
    """Count one more user of the forkserver and make sure it runs with the worker code preloaded."""
    global _users
    with _lock:
        forkserver.set_forkserver_preload(PRELOAD)
        forkserver.ensure_running()
        _users += 1


def forkserver_pid() -> int | None:
    """The running forkserver's pid (every worker is its child), if one runs."""
    server = forkserver._forkserver
    with server._lock:
        return server._forkserver_pid


def release_forkserver() -> int | None:
    """Count one user less; when none is left, ask the forkserver to exit and return its pid so the caller
    can await and reap it (it exits once its last worker is gone)."""
    global _users
    with _lock:
        _users = max(0, _users - 1)
        if _users:
            return None
        server = forkserver._forkserver
        with server._lock:
            pid, alive_fd, address = (server._forkserver_pid, server._forkserver_alive_fd, server._forkserver_address)
            if pid is None:
                return None
            server._forkserver_pid = server._forkserver_alive_fd = server._forkserver_address = None
        os.close(alive_fd)  # EOF on its "alive" pipe is the forkserver's signal to exit
        if address and not util.is_abstract_socket_namespace(address):
            try:
                os.unlink(address)
            except OSError:
                pass
        return pid


# -- the worker -> gateway pipe's size ----------------------------------------------------------------------
#: Default size of the pipe a worker's frames arrive on (Config ``worker_pipe_bytes``): a whole 65.6 KB
#: frame (a 64 KiB chunk in its envelope) fits, so the worker does not block in the middle of each one.
DEFAULT_PIPE_BYTES = 256 * 1024
_PAGE = 4096
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)
_pipe_size_refused = False  # logged once


def pipe_size_for(requested: int, *, sessions: int, soft_limit_pages: int | None, max_size: int | None) -> int:
    """The pipe size to ask for: ``requested``, but no more than the kernel's ``pipe-max-size`` and no
    more than leaves ``sessions`` such pipes within half of the per-user soft limit (the other half is for
    the control pipes, the store's and everything else the user runs); a power of two of pages at least
    one page (the kernel rounds up to one anyway).  0 when ``requested`` is 0 (keep the default)."""
    if requested <= 0:
        return 0
    size = requested
    if max_size:
        size = min(size, max_size)
    if soft_limit_pages:
        size = min(size, soft_limit_pages * _PAGE // (2 * max(1, sessions)))
    pages = max(1, size // _PAGE)
    return _PAGE * (1 << (pages.bit_length() - 1))


def _read_proc_int(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def worker_pipe_size(requested: int, sessions: int) -> int:
    """:func:`pipe_size_for` with this machine's limits (read from ``/proc/sys/fs``)."""
    return pipe_size_for(
        requested,
        sessions=sessions,
        soft_limit_pages=_read_proc_int("/proc/sys/fs/pipe-user-pages-soft"),
        max_size=_read_proc_int("/proc/sys/fs/pipe-max-size"),
    )


def widen_pipe(fd: int, size: int) -> int | None:
    """Set the pipe's buffer to ``size`` bytes (Linux ``F_SETPIPE_SZ``); its size afterwards, or None when
    the kernel refused (over the user's pipe quota: EPERM; a pipe already holding more: EBUSY; not Linux).
    A refusal only costs throughput, so it is logged once, at debug."""
    global _pipe_size_refused
    if size <= 0:
        return None
    try:
        return int(fcntl.fcntl(fd, _F_SETPIPE_SZ, size))
    except OSError as exc:
        if not _pipe_size_refused:
            _pipe_size_refused = True
            logger.debug(
                "cannot set a worker pipe to %d bytes (%s); keeping the default size",
                size,
                errno.errorcode.get(exc.errno or 0, exc),
            )
        return None


def pipe_size(fd: int) -> int:
    """The pipe's current buffer size (``F_GETPIPE_SZ``)."""
    return int(fcntl.fcntl(fd, _F_GETPIPE_SZ))


def spawn_worker(
    *,
    gateway_pid: int,
    nice: int,
    watchdog_poll_s: float,
    kill_grace_s: float,
    pipe_bytes: int = 0,
    sched: str = "normal",
    group_nice: bool = True,
) -> SpawnedWorker:
    """Start one idle worker (blocking, a few ms).  ``pipe_bytes``: the size to give the pipe its frames
    come on (0: the kernel's default; see :func:`worker_pipe_size`); ``sched``: its CPU scheduling policy
    (``worker_main.SCHED_POLICIES``); ``group_nice``: whether the worker gives its session's scheduling
    group the nice too (False: the caller does, ``workers/group_nicer.py``)."""
    to_worker_r, to_worker_w = os.pipe()
    from_worker_r, from_worker_w = os.pipe()
    widen_pipe(from_worker_r, pipe_bytes)
    try:
        proc = _WorkerProcess(
            target=worker_main.main,
            args=(
                PassedFd(to_worker_r),
                PassedFd(from_worker_w),
                gateway_pid,
                nice,
                watchdog_poll_s,
                kill_grace_s,
                sched,
                group_nice,
            ),
            name="agent-worker",
        )
        with _lock:
            forkserver.ensure_running()
            proc.start()
            process._children.discard(proc)  # we read its exit status ourselves (see module docstring)
    except BaseException:
        for fd in (to_worker_r, to_worker_w, from_worker_r, from_worker_w):
            os.close(fd)
        raise
    # The child has its own copies now; closing ours is what lets each side see EOF when the other dies.
    os.close(to_worker_r)
    os.close(from_worker_w)
    worker_pid = _kept_child(proc.pid)
    return SpawnedWorker(
        pid=worker_pid,
        keeper_pid=proc.pid,
        sentinel=proc.sentinel,
        read_fd=from_worker_r,
        write_fd=to_worker_w,
        process=proc,
    )


def _kept_child(keeper_pid: int, timeout: float = _KEPT_CHILD_TIMEOUT_S) -> int:
    """The pid of the worker the keeper forks (its first child), read from ``/proc`` (no scan); the
    keeper's own pid if it died or never forked (then signals and exits are the keeper's)."""
    deadline = time.monotonic() + timeout
    while True:
        children = contain.children(keeper_pid)
        if children:
            return min(children)
        if contain.read_info(keeper_pid) is None or time.monotonic() >= deadline:
            return keeper_pid
        time.sleep(0.001)


def read_exit_code(sentinel: int) -> int | None:
    """The exit code the forkserver wrote (negative: killed by that signal), or None if the forkserver
    closed the pipe without one (it died).  Call when the sentinel is readable."""
    data = b""
    while len(data) < _STATUS.size:
        chunk = os.read(sentinel, _STATUS.size - len(data))
        if not chunk:
            return None
        data += chunk
    return _STATUS.unpack(data)[0]


def release_process(spawned: SpawnedWorker, returncode: int | None) -> None:
    """Close the sentinel and the process record once the exit is known."""
    popen = spawned.process._popen
    if popen is not None and popen.returncode is None:
        popen.returncode = 255 if returncode is None else returncode
    spawned.process.close()


def abandon(spawned: SpawnedWorker, closed: tuple[int, ...] = ()) -> None:
    """Kill a worker nobody will own (its starter was cancelled) and close the gateway's pipe ends, except
    those in ``closed`` (already closed by a reader or writer that owned them: closing a number twice could
    close another thread's new pipe)."""
    for pgid in (spawned.pid, spawned.keeper_pid):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except OSError:
            pass
    for fd in (spawned.read_fd, spawned.write_fd):
        if fd in closed:
            continue
        try:
            os.close(fd)
        except OSError:
            pass


async def await_exit(pid: int, timeout: float) -> bool:
    """Wait (without blocking the loop) for our child ``pid`` to exit, then reap it.  False on timeout."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        pidfd = None
    except (AttributeError, OSError):
        pidfd = -1
    if pidfd is not None and pidfd >= 0:
        exited: asyncio.Future[None] = loop.create_future()
        loop.add_reader(pidfd, _resolve, exited)
        try:
            await asyncio.wait_for(exited, timeout)
        except TimeoutError:
            return False
        finally:
            loop.remove_reader(pidfd)
            os.close(pidfd)
    while True:  # no pidfd: poll (rare platforms only), bounded by the deadline
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)  # noqa: ASYNC222 - WNOHANG never blocks
        except ChildProcessError:
            return True
        if done:
            return True
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(0.02)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
