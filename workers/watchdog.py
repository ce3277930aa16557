"""Parent-death watchdog: ends a worker's process group when the gateway or the worker itself is gone.

Why a separate process: the worker's main thread may hold the GIL for seconds (a regex, a C extension),
and then no Python thread of the worker can run to notice anything.  The watchdog is a tiny forked child
in the worker's process group that blocks in ``poll()`` on:

- a pidfd of the gateway (not the worker's parent: with the forkserver design the parent is the
  forkserver, so "reparented" must not mean "orphaned"),
- a pidfd of the worker,
- the worker's control pipe from the gateway, watched for hang-up only (no data is read): EOF there
  means every gateway copy of the write end is closed, which also catches a gateway pid that was
  recycled before the pidfd could be opened.

When any fires it sends SIGKILL to the whole group, itself included.  Without ``pidfd_open`` (old kernels,
non-Linux) it falls back to checking the pids every ``poll_s`` seconds.
"""

from __future__ import annotations

import os
import select
import signal

_MIN_POLL_S = 0.05


def start_watchdog(*, gateway_pid: int, lifeline_fd: int, poll_s: float) -> int:
    """Fork the watchdog of the current process group (call right after ``os.setsid()``, before any thread
    starts).  Returns its pid.  If the gateway is already gone, the group is killed at once."""
    worker_pid = os.getpid()
    gateway_fd = _pidfd(gateway_pid)
    worker_fd = _pidfd(worker_pid)
    if gateway_fd == -1:
        os.killpg(0, signal.SIGKILL)
    pid = os.fork()
    if pid == 0:  # the watchdog
        try:
            _watch(gateway_pid, gateway_fd, worker_pid, worker_fd, lifeline_fd, max(poll_s, _MIN_POLL_S))
        finally:
            os.killpg(0, signal.SIGKILL)
            os._exit(0)
    for fd in (gateway_fd, worker_fd):
        if fd is not None and fd >= 0:
            os.close(fd)
    return pid


def _pidfd(pid: int) -> int | None:
    """A pidfd for ``pid``; -1 if the process does not exist; None if pidfds are unavailable."""
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return -1
    except (AttributeError, OSError):
        return None


def _watch(gateway_pid: int, gateway_fd: int | None, worker_pid: int, worker_fd: int | None,
           lifeline_fd: int, poll_s: float) -> None:
    """Return when the gateway or the worker is gone (or the lifeline hangs up)."""
    # Only SIGKILL (from the group teardown) ends the watchdog early: it must outlive a worker that is
    # merely being asked to stop, so that the group dies with the worker.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    watched = [fd for fd in (gateway_fd, worker_fd) if fd is not None]
    _close_all_but({lifeline_fd, 2, *watched})
    poller = select.poll()
    poller.register(lifeline_fd, 0)  # POLLHUP / POLLERR are always reported; data is never read
    for fd in watched:
        poller.register(fd, select.POLLIN)
    timeout_ms = None if len(watched) == 2 else int(poll_s * 1000)
    while True:
        if poller.poll(timeout_ms):
            return
        if gateway_fd is None and not _exists(gateway_pid):
            return
        if worker_fd is None and os.getppid() != worker_pid:
            return


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _close_all_but(keep: set[int]) -> None:
    """Drop every inherited descriptor (pipe ends, the forkserver's sockets) except ``keep``, so that the
    watchdog never delays an EOF that someone else is waiting for."""
    low = 0
    for fd in sorted(keep):
        if fd > low:
            os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, _max_fd())


def _max_fd() -> int:
    try:
        return os.sysconf("SC_OPEN_MAX")
    except (OSError, ValueError):
        return 65536
