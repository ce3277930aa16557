"""The slash side of the worker seam: where a session's slash worker runs is the backend's business too.

``gateway/slash.py`` keeps the request/response logic (one command at a time, timeouts, restarts); it
starts its worker through a :class:`SlashBackend` and talks to it through the :class:`SlashWorker`
surface: request bytes in, frame bytes out, a pid, and one way to end it.  The local implementation is
today's child process (:class:`workers.slash_process.SlashProcess`); the Ray backend starts the worker on
the session's node, under the same keeper, and relays its pipes through that node's host actor.

Separate from the ``Worker`` protocol in :mod:`workers.backends` (agent workers), which another part of
the gateway owns; importing this module imports nothing of Ray.
"""

from __future__ import annotations

import os
from typing import Any, Protocol, runtime_checkable

from workers.slash_process import start_slash_worker

__all__ = ["LocalSlashBackend", "SlashBackend", "SlashWorker", "slash_backend_for"]

#: Largest read of a slash worker's frames at once (locally one pipe read; on Ray one actor call).
READ_CHUNK = 65536


class SlashWorker(Protocol):
    """One running slash worker, as :class:`gateway.slash.SlashRunner` drives it.

    Transport failures (the pipe broke, the host actor died) raise ``ConnectionError``; EOF on the frame
    stream is ``b""`` from :meth:`read`."""

    @property
    def pid(self) -> int:
        """The keeper's pid on its host (its process group and session id); for display and tests."""
        ...

    @property
    def node(self) -> str | None:
        """Where it runs when the backend has more than one place (the Ray node id); else None."""
        ...

    @property
    def returncode(self) -> int | None:
        """Popen-style exit status once known (None while running, or while unknown)."""
        ...

    async def write(self, data: bytes) -> None:
        """Send request frames (already encoded) and wait until they are handed over."""
        ...

    async def read(self) -> bytes:
        """The next bytes of its frame stream (at most :data:`READ_CHUNK`), ``b""`` at EOF."""
        ...

    async def wait(self) -> int | None: ...

    def kill(self) -> None:
        """End it and everything it started, now, without waiting (non-blocking)."""
        ...

    async def aclose(self, grace_s: float) -> int | None:
        """EOF on its requests, SIGTERM, SIGKILL after ``grace_s``, the sweep of its session.  Idempotent."""
        ...


@runtime_checkable
class SlashBackend(Protocol):
    async def start_slash(self, cwd: str, node: str | None = None) -> SlashWorker:
        """Start a session's slash worker in ``cwd``, on ``node`` (the session's agent worker's node) when
        the backend has nodes and that one is alive, else where the backend would place the session.
        Raises ``OSError`` with a message the user can read."""
        ...


class LocalSlashBackend:
    """Slash workers on this machine, children of the gateway (watched by its pid)."""

    def __init__(self, *, poll_s: float, nice: int, kill_grace_s: float) -> None:
        self._poll_s = poll_s
        self._nice = nice
        self._kill_grace_s = kill_grace_s

    @classmethod
    def from_config(cls, config: Any) -> LocalSlashBackend:
        return cls(poll_s=config.watchdog_poll_s, nice=config.worker_nice, kill_grace_s=config.kill_grace_s)

    async def start_slash(self, cwd: str, node: str | None = None) -> SlashWorker:
        return await start_slash_worker(
            cwd=cwd, gateway_pid=os.getpid(), poll_s=self._poll_s, nice=self._nice, kill_grace_s=self._kill_grace_s
        )


def slash_backend_for(backend: object, config: Any) -> SlashBackend:
    """The worker backend itself when it places slash workers (Ray), else slash workers on this machine."""
    if isinstance(backend, SlashBackend):
        return backend
    return LocalSlashBackend.from_config(config)
