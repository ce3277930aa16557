"""Finding and ending every process of a session, whatever it did to its group or session.

A session's processes are (a) the descendants of its *keeper*, a child subreaper (``prctl
PR_SET_CHILD_SUBREAPER``) that is an ancestor of everything the session starts, so orphans (``setsid cmd
&``, double forks) are reparented to it instead of to init, and (b) every process whose session id is the
session's (what is left once the keeper itself is gone).  Both are read from ``/proc`` with the standard
library only (this module also runs in the keeper of a terminal, a small process that must start fast).

Signals go through a pidfd opened *after* the process was found and checked again by its start time, so a
pid that was recycled between the scan and the signal is never hit.

Every function here blocks (it reads ``/proc``): run it in a worker-side process or in a thread, never on
the gateway's event loop.
"""

from __future__ import annotations

import ctypes
import os
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
_PROC = "/proc"
_SWEEP_POLL_S = 0.005


@dataclass(frozen=True)
class ProcInfo:
    """What ``/proc/<pid>/stat`` says about one process (``start`` tells a recycled pid apart)."""

    pid: int
    ppid: int
    sid: int
    state: str
    start: int

    @property
    def gone(self) -> bool:
        """Zombies and dead tasks hold nothing but a table slot: they count as ended."""
        return self.state in ("Z", "X", "x")


def parse_stat(pid: int, text: str) -> ProcInfo | None:
    """Parse one ``/proc/<pid>/stat`` line (the command name may hold spaces and parentheses)."""
    close = text.rfind(")")
    if close < 0:
        return None
    fields = text[close + 2 :].split()
    if len(fields) < 20:
        return None
    try:
        return ProcInfo(pid=pid, ppid=int(fields[1]), sid=int(fields[3]), state=fields[0], start=int(fields[19]))
    except ValueError:
        return None


def read_info(pid: int) -> ProcInfo | None:
    """The process ``pid`` as ``/proc`` shows it now, or None if it does not exist."""
    try:
        with open(f"{_PROC}/{pid}/stat", "rb") as f:
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    return parse_stat(pid, text)


def _all_pids() -> list[int]:
    try:
        return [int(name) for name in os.listdir(_PROC) if name.isdigit()]
    except OSError:
        return []


def session_members(sid: int) -> list[ProcInfo]:
    """Every live (non-zombie) process whose session id is ``sid`` (a scan of the whole process table)."""
    found = []
    for pid in _all_pids():
        info = read_info(pid)
        if info is not None and info.sid == sid and not info.gone:
            found.append(info)
    return found


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` from ``/proc/<pid>/task/*/children`` (cheap: no scan of the table)."""
    kids: list[int] = []
    try:
        tids = os.listdir(f"{_PROC}/{pid}/task")
    except OSError:
        return kids
    for tid in tids:
        try:
            with open(f"{_PROC}/{pid}/task/{tid}/children", "rb") as f:
                kids.extend(int(x) for x in f.read().split())
        except (OSError, ValueError):
            continue
    return kids


def descendants(root: int) -> list[ProcInfo]:
    """Every live process below ``root`` in the process tree."""
    found: list[ProcInfo] = []
    seen = {root}
    todo = [root]
    while todo:
        for child in children(todo.pop()):
            if child in seen:
                continue
            seen.add(child)
            todo.append(child)
            info = read_info(child)
            if info is not None and not info.gone:
                found.append(info)
    return found


def session_targets(sid: int, *, root: int | None = None, exclude: Iterable[int] = ()) -> list[ProcInfo]:
    """What a teardown of session ``sid`` must end: its members plus ``root``'s descendants (the keeper's:
    they may have left the session with ``setsid``), minus ``exclude`` (the caller itself)."""
    skip = set(exclude)
    targets = {p.pid: p for p in session_members(sid) if p.pid not in skip}
    if root is not None:
        for p in descendants(root):
            if p.pid not in skip:
                targets.setdefault(p.pid, p)
    return list(targets.values())


def send(info: ProcInfo, sig: int) -> bool:
    """Signal the process ``info`` describes, only if that very process still exists; True if sent."""
    try:
        fd = os.pidfd_open(info.pid)
    except ProcessLookupError:
        return False
    except (AttributeError, OSError):
        fd = -1
    try:
        now = read_info(info.pid)
        if now is None or now.start != info.start or now.gone:
            return False
        if fd >= 0:
            signal.pidfd_send_signal(fd, sig)
        else:
            os.kill(info.pid, sig)
        if sig not in (signal.SIGKILL, signal.SIGSTOP, signal.SIGCONT) and now.state == "T":
            os.kill(info.pid, signal.SIGCONT)  # a stopped job (^Z) only acts on HUP/TERM once continued
        return True
    except (ProcessLookupError, PermissionError):
        return False
    finally:
        if fd >= 0:
            os.close(fd)


def reap_children() -> dict[int, int]:
    """Collect every exited child of the calling process without blocking: ``{pid: wait status}``."""
    reaped: dict[int, int] = {}
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return reaped
        if pid == 0:
            return reaped
        reaped[pid] = status


def kill_session(
    sid: int, *, root: int | None = None, timeout: float = 5.0, reap: Callable[[], object] | None = None
) -> bool:
    """SIGKILL every target of session ``sid`` (see :func:`session_targets`) until a scan finds none; True
    if none was left before ``timeout``.  Processes forked meanwhile are found by the next scan (their
    parent is dead, so they are reparented to ``root`` when it is a subreaper).  ``reap``: called before each
    scan when the caller is that subreaper, to collect the zombies it inherits."""
    deadline = time.monotonic() + timeout
    me = os.getpid()
    while True:
        if reap is not None:
            reap()
        left = session_targets(sid, root=root, exclude=(me,))
        if not left:
            return True
        if time.monotonic() >= deadline:
            return False
        for info in left:
            send(info, signal.SIGKILL)
        time.sleep(_SWEEP_POLL_S)


# prctl ------------------------------------------------------------------------------------------------


def _prctl(option: int, arg: int) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def become_subreaper() -> bool:
    """Make orphaned descendants of the calling process reparent to it (Linux >= 3.4); False elsewhere."""
    return _prctl(PR_SET_CHILD_SUBREAPER, 1)


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Have the kernel send ``sig`` to the calling process when its parent thread dies."""
    return _prctl(PR_SET_PDEATHSIG, int(sig))
