"""Process groups: signal one, and wait until no live process is left in it.

A worker's group outlives the worker by a few milliseconds (its watchdog, the commands it started), and
``session.close`` promises that the group is gone when it answers, so teardown waits on the group, not
just on the leader.  Zombies count as gone: they hold no resources, and where init does not reap
orphans (some containers) they would otherwise be waited on forever.
"""

from __future__ import annotations

import asyncio
import os
import signal

import psutil

_POLL_S = 0.01


def signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to group ``pgid``; False when the group no longer exists."""
    try:
        if hasattr(os, "killpg"):
            os.killpg(pgid, sig)
        else:  # Windows has no process groups to signal
            os.kill(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _live_member(pgid: int) -> bool:
    """True while a non-zombie process is in group ``pgid`` (a scan of every process: run off the loop)."""
    if not hasattr(os, "getpgid"):
        return psutil.pid_exists(pgid)
    for pid in psutil.pids():
        try:
            if os.getpgid(pid) == pgid and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return True
        except (OSError, psutil.Error):
            continue
    return False


def group_exists(pgid: int) -> bool:
    """Cheap check: does any process (zombies included) still carry this pgid?"""
    return signal_group(pgid, 0)


async def wait_group_gone(pgid: int, timeout: float) -> bool:
    """Wait until group ``pgid`` has no live process; False if ``timeout`` passed first."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while group_exists(pgid) and await asyncio.to_thread(_live_member, pgid):
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(_POLL_S)
    return True



def describe_exit(returncode: int | None) -> str:
    """A Popen-style return code (negative = killed by that signal) in words, for user-facing messages."""
    if returncode is None:
        return "exit status unknown"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"
