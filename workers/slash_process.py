"""The process side of a session's slash worker: start it, and end it with everything it started.

``gateway/slash.py`` keeps the request/response logic; where the worker runs and how it ends is the
workers layer's business, as for agent workers.  The worker (``slash_worker.py``) is a fresh interpreter
started by path in a new session; it splits into the session's keeper (``workers/keeper.py``) and the
worker proper, so a command's leftovers end with it whatever they did to their group or session.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from workers.process import KeptProcess

WORKER_SCRIPT = Path(__file__).resolve().parent.parent / "slash_worker.py"


class SlashProcess:
    """A started slash worker: its pipes (``stdin`` requests, ``stdout`` frames) and its one way to end.
    The local :class:`workers.backends.slash.SlashWorker`; the Ray host actor holds one per remote worker."""

    node: str | None = None  #: this machine

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self._proc = proc
        self._process = KeptProcess(proc.pid, proc.wait, lambda: proc.returncode)
        self.stdin = proc.stdin
        self.stdout = proc.stdout

    @property
    def pid(self) -> int:
        """The keeper's pid: the worker's process group and session id."""
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    async def wait(self) -> int:
        return await self._proc.wait()

    async def write(self, data: bytes) -> None:
        """Hand request frames to its stdin (raises ``ConnectionError`` when the pipe is broken)."""
        assert self.stdin is not None
        self.stdin.write(data)
        await self.stdin.drain()

    async def read(self, max_bytes: int = 65536) -> bytes:
        """The next bytes of its frame stream, ``b""`` at EOF."""
        assert self.stdout is not None
        return await self.stdout.read(max_bytes)

    def kill(self) -> None:
        """End the worker and everything it started, now (non-blocking)."""
        self._process.kill()

    async def aclose(self, grace_s: float) -> int | None:
        """EOF on its requests (the keeper then ends the session at once), SIGTERM, SIGKILL after
        ``grace_s``, and the sweep of its session id.  Idempotent."""
        if self.stdin is not None and not self.stdin.is_closing():
            self.stdin.close()
        return await self._process.aclose(max(grace_s, 0.05) + 1.0)


async def start_slash_worker(
    *, cwd: str, gateway_pid: int, poll_s: float, nice: int, kill_grace_s: float
) -> SlashProcess:
    """Start a slash worker in ``cwd`` (the gateway's if it is not a directory); raises ``OSError``."""
    env = {k: v for k, v in os.environ.items() if k != "WORKER_GATEWAY_TOKEN"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(WORKER_SCRIPT),
        "--parent-pid",
        str(gateway_pid),
        "--poll",
        str(poll_s),
        "--nice",
        str(nice),
        "--kill-grace",
        str(kill_grace_s),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        cwd=cwd if os.path.isdir(cwd) else None,
        env=env,
        start_new_session=True,
    )
    return SlashProcess(proc)
