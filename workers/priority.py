"""A session's CPU priority below the gateway's, across sessions too: its nice and its autogroup's.

Every session the gateway starts leads a new Linux session (``setsid``: its id is what the teardown
sweeps).  With autogroup scheduling (``CONFIG_SCHED_AUTOGROUP``, on in most distributions' kernels and
used for every process outside a CPU cgroup) each session is also a scheduling group of its own, of nice-0
weight, and a process's nice only ranks it *inside* its group.  So ``nice`` alone left 64 busy sessions
weighing 64 times the gateway: the loop, once it had used its share, waited 40 to 100 ms for the CPU
(measured with ``perf sched`` at 64 streaming sessions).  The session's autogroup therefore gets the same
nice (``/proc/self/autogroup``).

The kernel takes one autogroup change per 100 ms, machine-wide, from a process without ``CAP_SYS_ADMIN``
(``EAGAIN`` otherwise), so a burst of session starts is refused at first: a refused change is retried from
a daemon thread, with jitter, for a bounded time.  :func:`lower` does both, the process's nice and its
group's, for a slash worker proper; a terminal's preexec can start no thread and makes one
:func:`set_autogroup_nice` attempt.  A local agent worker's group is the supervisor's to set instead
(``workers/group_nicer.py``): its nice follows how many sessions run a turn (``workers/cpu_weight.py``).

The keeper shares the group, at task nice 0, so inside the group it outweighs its worker.  It does not
set the group back to nice 0 to end the session: 64 sessions closed at once then took 4-8 s instead of
1.5-1.7 s, and stalled the loop for 300-770 ms instead of 30-75 ms (the groups, at full weight, took the
CPU from the gateway while their keepers scanned ``/proc``).

This is a tuning, not a guarantee: an agent may write 0 back, and a process that calls ``setsid`` gets a
new group of nice 0.
"""

from __future__ import annotations

import errno
import os
import random
import threading
import time
from collections.abc import Callable
from enum import Enum

AUTOGROUP = "/proc/self/autogroup"
#: The kernel's rate limit is 100 ms machine-wide: retry a little later than that, jittered, so that
#: sessions started together take turns; about 60 s in all, enough for a few hundred sessions started at once.
RETRY_S = (0.1, 0.2)
RETRY_ATTEMPTS = 400


class Outcome(Enum):
    SET = "set"
    BUSY = "busy"  # the machine-wide rate limit: try again later
    UNSUPPORTED = "unsupported"  # no autogroups here (not Linux, or a kernel without them)
    REFUSED = "refused"  # not allowed (e.g. a negative nice without the right)


def set_autogroup_nice(nice: int, path: str = AUTOGROUP) -> Outcome:
    """One attempt to give the autogroup at ``path`` the nice ``nice``."""
    try:
        fd = open_autogroup(path)
    except FileNotFoundError:
        return Outcome.UNSUPPORTED
    except OSError:
        return Outcome.REFUSED
    try:
        return write_autogroup_nice(fd, nice)
    finally:
        os.close(fd)


def open_autogroup(path: str) -> int:
    """An fd for :func:`write_autogroup_nice`.  One of ``/proc/<pid>/autogroup`` stays bound to that
    process: once it has exited, writes fail (``ESRCH``), whichever process reuses its pid."""
    return os.open(path, os.O_WRONLY | os.O_CLOEXEC)


def write_autogroup_nice(fd: int, nice: int) -> Outcome:
    """One attempt, one write(2), unbuffered, so that its errno is the kernel's answer."""
    try:
        os.write(fd, b"%d" % nice)
    except OSError as exc:
        return Outcome.BUSY if exc.errno in (errno.EAGAIN, errno.EBUSY) else Outcome.REFUSED
    return Outcome.SET


def lower(nice: int, *, group: bool = True) -> threading.Thread | None:
    """This process's nice up by ``nice`` and, with ``group``, its session's autogroup to ``nice`` (0 or
    less: neither); returns :func:`nice_autogroup`'s retry thread, if one was needed.  ``group=False`` is
    for a worker whose supervisor sets its group's nice (``workers/group_nicer.py``)."""
    if nice <= 0:
        return None
    try:
        os.nice(nice)
    except OSError:
        pass
    return nice_autogroup(nice) if group else None


def nice_autogroup(
    nice: int,
    *,
    attempt: Callable[[int], Outcome] = set_autogroup_nice,
    retry_s: tuple[float, float] = RETRY_S,
    attempts: int = RETRY_ATTEMPTS,
) -> threading.Thread | None:
    """Give this process's session (its autogroup) the nice ``nice``; 0 or less leaves it alone.  Returns
    the daemon thread that retries a change the kernel refused for its rate limit, if one was needed."""
    if nice <= 0:
        return None
    if attempt(nice) is not Outcome.BUSY:
        return None
    thread = threading.Thread(
        target=_retry, args=(nice, attempt, retry_s, attempts - 1), name="autogroup-nice", daemon=True
    )
    thread.start()
    return thread


def _retry(nice: int, attempt: Callable[[int], Outcome], retry_s: tuple[float, float], attempts: int) -> None:
    for _ in range(attempts):
        time.sleep(random.uniform(*retry_s))
        if attempt(nice) is not Outcome.BUSY:
            return
