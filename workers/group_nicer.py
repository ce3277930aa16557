"""The local supervisor's writer of its sessions' scheduling-group nices, on the gateway's loop; what to
write is :class:`~workers.cpu_weight.GroupNices`' plan.

A write is one write(2) to the session keeper's ``/proc/<pid>/autogroup``, through an fd opened when the
worker was spawned: it stays bound to that process, so a write after its exit fails instead of reaching
whichever process reuses the pid.  Without ``CAP_SYS_ADMIN`` the kernel takes one change per 100 ms,
machine-wide, and answers ``EAGAIN`` to the rest: the writer then waits (jittered, as the workers'
own retries in ``workers/priority.py``) and goes on in the plan's order, where a change that takes weight
away comes first.  A group the kernel will not change (its process is gone, or not ours) is dropped.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections.abc import Callable, Hashable

from workers import priority
from workers.cpu_weight import GroupNices

logger = logging.getLogger("worker_gateway.workers")


class GroupNicer:
    """Tracks the groups of the workers it is given (:meth:`add`), keyed by their handles."""

    def __init__(
        self,
        share: float,
        ceiling: int,
        *,
        write: Callable[[int, int], priority.Outcome] = priority.write_autogroup_nice,
        retry_s: tuple[float, float] = priority.RETRY_S,
    ) -> None:
        self._nices: GroupNices[Hashable] = GroupNices(share, ceiling)
        self._fds: dict[Hashable, int] = {}
        self._write = write
        self._retry_s = retry_s
        #: The next pass over the plan: soon after a change (one pass for a burst of turn starts, which
        #: come in one loop iteration), or after a rate-limit refusal.
        self._due: asyncio.Handle | None = None
        #: Without autogroups (not Linux, or a kernel without them) there is nothing to write.
        self.enabled = ceiling > 0 and os.path.exists(priority.AUTOGROUP)

    @property
    def busy(self) -> int:
        return self._nices.busy

    def add(self, key: Hashable, keeper_pid: int) -> bool:
        """Start tracking the group that ``keeper_pid`` leads (a fresh session: nice 0); False when it
        cannot be (disabled, or the process is gone)."""
        if not self.enabled:
            return False
        if key in self._fds:
            return True
        try:
            self._fds[key] = priority.open_autogroup(f"/proc/{keeper_pid}/autogroup")
        except OSError:
            return False
        self._nices.add(key)
        self._wanted()
        return True

    def remove(self, key: Hashable) -> None:
        self._nices.remove(key)
        fd = self._fds.pop(key, None)
        if fd is not None:
            os.close(fd)

    def set_busy(self, key: Hashable, busy: bool) -> None:
        """A turn started (True) or ended (False) in ``key``'s session."""
        if key in self._fds:
            self._nices.set_busy(key, busy)
            self._wanted()

    def close(self) -> None:
        if self._due is not None:
            self._due.cancel()
            self._due = None
        for key in list(self._fds):
            self.remove(key)

    def _wanted(self) -> None:
        if self._due is None:  # else a pass is due: it writes the plan as it is then
            self._due = asyncio.get_running_loop().call_soon(self._apply)

    def _apply(self) -> None:
        self._due = None
        for key, nice in self._nices.plan():
            outcome = self._write(self._fds[key], nice)
            if outcome is priority.Outcome.SET:
                self._nices.applied(key, nice)
            elif outcome is priority.Outcome.BUSY:
                self._due = asyncio.get_running_loop().call_later(random.uniform(*self._retry_s), self._apply)
                return
            else:
                logger.debug("scheduling group of %r not changed (%s): no longer tracked", key, outcome.value)
                self.remove(key)
