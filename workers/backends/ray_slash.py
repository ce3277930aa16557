"""A session's slash worker on a Ray node: the gateway-side handle of one started by a host actor.

The worker is ``slash_worker.py`` under its keeper, a child of the host actor on the session's node
(:meth:`workers.backends.ray_host.WorkerHost.slash_start`); this handle relays its pipes by actor calls:
one call per request write, one per bounded read of its frames (``SLASH_READ_BYTES``), so nothing runs
ahead of what :class:`gateway.slash.SlashRunner` asked for.  A dead host actor or node is a
``ConnectionError`` here (the runner answers the command ``ok: false`` and starts the next one afresh);
the worker itself dies with the actor (its keeper watches the actor's pid).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from ray.exceptions import RayError

from workers.backends.ray_placement import HostState

if TYPE_CHECKING:
    from workers.backends.ray_backend import RayBackend, _Host

logger = logging.getLogger("worker_gateway.ray")

#: How long a control call (write, stop) may take beyond the work it asks for before the host is
#: considered unresponsive.
_CALL_TIMEOUT_S = 10.0
#: The host's stop: keeper grace plus its sweep (workers.process.SWEEP_S) and a margin.
_STOP_EXTRA_S = 5.0 + 1.0


class RaySlashWorker:
    """The :class:`workers.backends.slash.SlashWorker` surface over a host actor."""

    def __init__(self, backend: RayBackend, host: _Host, slash_id: str, pid: int) -> None:
        self._backend = backend
        self._host = host
        self.slash_id = slash_id
        self._pid = pid
        self._returncode: int | None = None
        self._closing: asyncio.Task[int | None] | None = None

    def __repr__(self) -> str:
        return f"<RaySlashWorker pid={self._pid} node={self.node[:12]}>"

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def node(self) -> str:
        return self._host.node_id

    @property
    def returncode(self) -> int | None:
        return self._returncode

    async def write(self, data: bytes) -> None:
        error = await self._call("slash_write", data, timeout=_CALL_TIMEOUT_S)
        if error is not None:
            raise ConnectionError(error)

    async def read(self) -> bytes:
        """Bounded by the caller (the runner's command and start timeouts), not here: a command may run."""
        data, returncode = await self._call("slash_read")
        if not data:
            self._returncode = returncode
        return bytes(data)

    async def wait(self) -> int | None:
        if self._closing is not None:
            await asyncio.shield(self._closing)
        return self._returncode

    def kill(self) -> None:
        if self._closing is None and self._host.state is not HostState.FAILED:
            self._host.actor.slash_kill.remote(self.slash_id)  # result unused: the host reaps it
        self._closing = self._closing or asyncio.get_running_loop().create_task(self._done())

    async def aclose(self, grace_s: float) -> int | None:
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_task(self._stop(grace_s))
        return await asyncio.shield(self._closing)

    # -- internals --------------------------------------------------------------------------------------

    async def _done(self) -> int | None:
        return self._returncode

    async def _stop(self, grace_s: float) -> int | None:
        if self._host.state is HostState.FAILED:
            return self._returncode  # the actor is gone, and with it the keeper's parent: it ended them
        try:
            result = await self._call("slash_stop", grace_s, timeout=grace_s + _STOP_EXTRA_S + _CALL_TIMEOUT_S)
        except ConnectionError:
            return self._returncode
        if result is not None:
            self._returncode = result
        return self._returncode

    async def _call(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        if self._host.state is HostState.FAILED:
            raise ConnectionError(f"the Ray node {self.node[:12]} of the slash worker is gone")
        ref = getattr(self._host.actor, method).remote(self.slash_id, *args)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(ref.future()), timeout)
        except TimeoutError:
            # One slash worker not taking its input must not end every session on the node: the host is
            # only suspect, and its ping (the heartbeat's test) decides whether it has stopped answering.
            self._backend._host_suspect(self._host)
            raise ConnectionError(
                f"the host actor on Ray node {self.node[:12]} did not answer within {timeout:g} s"
            ) from None
        except RayError as exc:
            self._backend._host_gone_or_suspect(self._host, exc)
            logger.warning(
                "slash worker %d on node %s: %s failed: %s", self._pid, self.node[:12], method, type(exc).__name__
            )
            raise ConnectionError(
                f"the host actor on Ray node {self.node[:12]} is gone ({type(exc).__name__})"
            ) from None
