"""workers/backends/slash.py: which backend starts a session's slash worker (pure choice, no processes)."""

from __future__ import annotations

from gateway.config import Config
from workers.backends.slash import LocalSlashBackend, SlashWorker, slash_backend_for
from workers.supervisor import Supervisor


class _Placing:
    """A backend that places slash workers itself (the Ray backend's shape)."""

    async def start_slash(self, cwd: str, node: str | None = None) -> SlashWorker:
        raise OSError("not started in this test")


def test_a_backend_that_places_slash_workers_is_used_for_them() -> None:
    backend = _Placing()
    assert slash_backend_for(backend, Config()) is backend


def test_the_local_backend_starts_slash_workers_on_this_machine() -> None:
    config = Config(watchdog_poll_s=0.05, worker_nice=3, kill_grace_s=0.5)
    chosen = slash_backend_for(Supervisor.from_config(config), config)
    assert isinstance(chosen, LocalSlashBackend)
    assert (chosen._poll_s, chosen._nice, chosen._kill_grace_s) == (0.05, 3, 0.5)
