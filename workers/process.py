"""The gateway's handle on a kept process: one way to ask it to stop, and one way to be sure it stopped.

Every process the gateway starts for a session (agent worker, slash worker, terminal) is a *keeper*
(``workers/keeper.py``): the leader of a new session, a child subreaper, and the parent of the real
program.  So ending one has the same shape everywhere, and lives here:

1. ``terminate()``: SIGTERM to the keeper's group; the keeper runs the graceful sequence over everything
   the session started (including processes that left the group or session) and exits with its child's
   status;
2. if it has not exited after ``grace`` seconds, SIGKILL to the group (the keeper is then gone too, so
   this is the fallback, not the plan);
3. the containment sweep: whatever still carries the session's id is SIGKILLed, in a thread (it scans the
   process table), until a scan finds nothing.

``aclose`` runs that sequence once, however many callers await it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Awaitable, Callable

from workers import contain, keeper

logger = logging.getLogger("worker_gateway.process")

#: Seconds to wait for a keeper to exit after SIGKILL (only a process in uninterruptible sleep takes long).
KILL_CONFIRM_S = 5.0
#: Bound of the final sweep of the session id.
SWEEP_S = 5.0


def signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to group ``pgid``; False when the group no longer exists."""
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def describe_exit(returncode: int | None) -> str:
    """A Popen-style return code (negative = killed by that signal) in words, for user-facing messages:
    the one exit description of agent workers, slash workers and terminals."""
    if returncode is None:
        return "exit status unknown"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


async def sweep_session(sid: int, timeout: float = SWEEP_S) -> bool:
    """SIGKILL whatever is left of session ``sid`` (off the loop); True when nothing is left."""
    left = await asyncio.to_thread(contain.kill_session, sid, timeout=timeout)
    if not left:
        logger.error("session %d still has live processes %.0f s after SIGKILL", sid, timeout)
    return left


class KeptProcess:
    """A kept process as the gateway sees it: ``pid`` (a process group leader: the keeper itself, or its
    child when that leads a group of its own), ``keeper_pid`` (also the session id), ``returncode`` (Popen
    style: negative = killed by that signal; the keeper exits with its child's status), ``wait()``,
    signals, and one idempotent ``aclose``.

    ``wait_exit`` resolves with the return code when the keeper exits (asyncio's ``Process.wait``, or the
    forkserver's status pipe for agent workers); ``returncode`` reads it without waiting."""

    def __init__(
        self,
        pid: int,
        wait_exit: Callable[[], Awaitable[int | None]],
        returncode: Callable[[], int | None],
        *,
        keeper_pid: int | None = None,
    ) -> None:
        self.pid = pid
        self.keeper_pid = pid if keeper_pid is None else keeper_pid
        self._wait_exit = wait_exit
        self._returncode = returncode
        self._closing: asyncio.Task[int | None] | None = None

    @property
    def returncode(self) -> int | None:
        return self._returncode()

    async def wait(self) -> int | None:
        return await self._wait_exit()

    def send_signal(self, sig: int) -> None:
        """Signal the keeper's group (a no-op once the keeper's exit is known: its ids may be reused)."""
        if self.returncode is not None:
            return
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            # Still bootstrapping: not a group leader yet (setsid comes first, before it can have
            # children).  Its exit is not reported yet, so the pid is still this process's.
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass
        except PermissionError:
            pass

    def terminate(self) -> None:
        """Ask for the graceful end of the whole session (the keeper signals everything in it)."""
        self._signal_keeper(signal.SIGTERM)

    def kill(self) -> None:
        """End the whole session now: the keeper SIGKILLs everything, then exits."""
        self._signal_keeper(keeper.END_NOW)

    def _signal_keeper(self, sig: int) -> None:
        if self.returncode is not None:
            return
        try:
            os.kill(self.keeper_pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    async def aclose(self, grace: float) -> int | None:
        """Terminate, SIGKILL after ``grace``, then sweep the session; the return code.  Idempotent, and
        cancelling a caller does not interrupt the teardown."""
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_task(self._close(grace), name=f"close-process-{self.pid}")
        return await asyncio.shield(self._closing)

    async def _close(self, grace: float) -> int | None:
        if self.returncode is None:
            self.terminate()
            try:
                await asyncio.wait_for(self.wait(), grace)
            except TimeoutError:  # the keeper is broken: kill the group and the keeper directly
                self.send_signal(signal.SIGKILL)
                self._signal_keeper(signal.SIGKILL)
                try:
                    await asyncio.wait_for(self.wait(), KILL_CONFIRM_S)
                except TimeoutError:
                    logger.error("process %d did not die %.0f s after SIGKILL", self.pid, KILL_CONFIRM_S)
        await sweep_session(self.keeper_pid)
        return self.returncode
