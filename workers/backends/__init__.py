"""The worker backend seam: where a session's agent worker runs is this package's business.

The gateway holds a :class:`WorkerBackend` and the :class:`Worker` handles it hands out; it never learns
whether a worker is a local child process or runs on another machine.  ``local`` (the forkserver pool of
:mod:`workers.supervisor`) is the default implementation.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from workers.channel import Frame
from workers.supervisor import ExitStatus, SavedStateError, UnknownAgentError, WorkerStartError

__all__ = [
    "ExitStatus",
    "SavedStateError",
    "UnknownAgentError",
    "Worker",
    "WorkerBackend",
    "WorkerStartError",
    "create_backend",
]


class Worker(Protocol):
    """One worker life, as the gateway sees it."""

    @property
    def pid(self) -> int:
        """The worker's pid on its host (shown to clients; not a handle: the gateway never signals it)."""
        ...

    @property
    def node(self) -> str | None:
        """Where it runs, when the backend has more than one place (the Ray node id); else None."""
        ...

    def send(self, op: str, body: dict[str, Any] | None = None) -> None:
        """Queue a control frame without blocking."""
        ...

    def turn_running(self, running: bool) -> None:
        """The gateway's word that a turn started (True) or ended (False) in this worker's session: the
        local backend gives a busy session's scheduling group its CPU share by it (``workers/cpu_weight.py``)."""
        ...

    def frames(self) -> AsyncIterator[Frame]:
        """The worker's frames in order, until EOF; not pulling is backpressure."""
        ...

    def frame_batches(self) -> AsyncIterator[list[Frame]]:
        """The same frames in order, as non-empty lists of every frame already received (one pipe read
        brings many), until EOF; raises :class:`~workers.channel.ChannelError` after the last good batch
        on a corrupt stream.  Both views read the same stream: one consumer at a time (the supervisor
        takes the ``ready`` frame with ``frames``, the session the rest with ``frame_batches``)."""
        ...

    async def stop(self) -> ExitStatus:
        """End the worker and everything it started; idempotent; reports how it ended."""
        ...

    async def wait(self) -> ExitStatus: ...


class WorkerBackend(Protocol):
    @property
    def live_workers(self) -> int: ...

    @property
    def pool_ready(self) -> int: ...

    def known_agents(self) -> list[str]: ...

    async def start(self) -> None: ...

    async def acquire(
        self,
        agent: str,
        options: dict[str, Any],
        cwd: str | None,
        session_id: str | None = None,
        state: bytes | None = None,
    ) -> Worker:
        """A worker ready to take a prompt, with the agent's saved ``state`` restored when given.
        Raises :class:`UnknownAgentError` (4004) or :class:`WorkerStartError` (5001)."""
        ...

    async def close(self) -> None: ...


def create_backend(config: Any) -> WorkerBackend:
    """The backend ``config.backend`` names (default: the local forkserver pool).  Ray is imported only
    here, only for ``ray``; a missing extra raises
    :class:`~workers.backends.ray_errors.BackendUnavailable` (the gateway exits 2 with its message), as
    does the Ray backend's ``start()`` when the cluster cannot be reached."""
    name = getattr(config, "backend", "local")
    if name == "local":
        from workers.supervisor import Supervisor

        return Supervisor.from_config(config)
    if name == "ray":
        from workers.backends.ray_env import prepare_ray_environment
        from workers.backends.ray_errors import BackendUnavailable

        prepare_ray_environment(getattr(config, "ray_address", None))  # read by Ray at import
        try:
            from workers.backends.ray_backend import RayBackend
        except ImportError as exc:
            raise BackendUnavailable(
                f"--backend ray needs the ray extra: pip install 'worker-gateway[ray]' ({exc})"
            ) from None
        return RayBackend.from_config(config)
    raise ValueError(f"unknown worker backend {name!r}")
