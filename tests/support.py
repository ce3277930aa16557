"""Helpers shared by the tests: a real gateway process, a raw JSON-RPC client, process checks, waits.

Test modules import these from here (``from support import ...``); ``conftest.py`` holds only the pytest
fixtures built on them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import selectors
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import psutil
import websockets

from gateway.client.spawn import DEFAULT_GATEWAY_ARGS, SpawnedGateway

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "test-token-123"


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.02, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns a truthy value or ``timeout`` passes (then fail)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


async def async_wait_for(
    predicate: Callable[[], Any], timeout: float, interval: float = 0.02, what: str = "condition"
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


def descendants(pid: int) -> list[psutil.Process]:
    """Every live process started by ``pid``, including workers that re-parented to the forkserver."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def autogroup_nice(pid: int) -> int | None:
    """The nice of ``pid``'s scheduling group, its autogroup (None once it is gone): ``/autogroup-N nice K``."""
    try:
        return int(Path(f"/proc/{pid}/autogroup").read_text().split()[-1])
    except (FileNotFoundError, ProcessLookupError):
        return None


def cpu_cgroup_of(pid: int) -> Path | None:
    """``pid``'s directory in the cpu cgroup hierarchy (None once it is gone, or without one)."""
    from workers.cpu_cgroup import find_cpu_hierarchy

    try:
        found = find_cpu_hierarchy(Path(f"/proc/{pid}/cgroup").read_text(), Path("/proc/self/mountinfo").read_text())
    except (FileNotFoundError, ProcessLookupError):
        return None
    return found.path if found is not None else None


def pgid_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is ``pgid``: the one group check of the tests."""
    members = []
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                members.append(p.pid)
        except (OSError, psutil.Error):
            pass
    return members


class GatewayProcess(SpawnedGateway):
    """A gateway started as a subprocess (the shared ``gateway.client.spawn`` helper) with the tests'
    token; ``start`` returns once its ready line was read, ``stop`` also proves nothing it started survives."""

    def __init__(
        self,
        *args: str,
        token: str | None = TOKEN,
        env: dict[str, str] | None = None,
        defaults: Sequence[str] = DEFAULT_GATEWAY_ARGS,
    ) -> None:
        super().__init__(*args, token=token, env=env, cwd=ROOT, name="the test gateway", defaults=defaults)
        self.env = env or {}

    def start(self, timeout: float = 30.0) -> GatewayProcess:
        super().start(timeout)
        return self

    def stop(self, timeout: float = 20.0) -> int | None:  # type: ignore[override]
        """SIGTERM, then assert a clean exit and that nothing the gateway started survives it."""
        if self.proc is None or self.proc.poll() is not None:
            super().stop()
            return self.proc.returncode if self.proc else None
        started = descendants(self.proc.pid)
        code = super().stop(grace=timeout)
        if code == -signal.SIGKILL:
            raise AssertionError(f"gateway did not exit within {timeout}s of SIGTERM\n{self.stderr()[-3000:]}")
        leftover = wait_for_gone(started, 5.0)
        for p in leftover:  # never leave strays behind for the next test, but fail this one
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        assert not leftover, f"processes outlived the gateway: {[(p.pid, p.name()) for p in leftover]}"
        return code


def wait_for_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while True:
        left = alive(procs)
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.05)


def read_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    """Read one stdout line with a deadline (never block forever on a gateway that failed to start)."""
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    buf = b""
    deadline = time.monotonic() + timeout
    fd = proc.stdout.fileno()
    while b"\n" not in buf:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"no line on stdout within {timeout}s (got {buf!r})")
        if not sel.select(remaining):
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
    sel.close()
    return buf.decode().split("\n")[0]


class RpcClient:
    """A raw JSON-RPC client over a real ``websockets`` connection, for testing the wire contract."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self._ids = itertools.count(1)
        self.responses: dict[Any, dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []
        self._waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []
        self._reader = asyncio.get_running_loop().create_task(self._read())
        self.closed: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, url: str, **kwargs: Any) -> AsyncIterator[RpcClient]:
        async with websockets.connect(url, max_size=None, **kwargs) as ws:
            client = cls(ws)
            try:
                await client.wait(lambda: any(e["type"] == "gateway.ready" for e in client.events), 10)
                yield client
            finally:
                client._reader.cancel()

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                msg = json.loads(raw)
                if "id" in msg and ("result" in msg or "error" in msg):
                    self.responses[msg["id"]] = msg
                else:
                    self.events.append(msg["params"])
                self._wake()
        except websockets.ConnectionClosed as exc:
            if not self.closed.done():
                self.closed.set_result(exc)
        finally:
            if not self.closed.done():
                self.closed.set_result(None)
            self._wake()

    def _wake(self) -> None:
        for predicate, fut in list(self._waiters):
            if not fut.done() and (predicate() or self.closed.done()):
                fut.set_result(None)

    async def wait(self, predicate: Callable[[], Any], timeout: float) -> None:
        if predicate():
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (predicate, fut)
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(fut, timeout)
        finally:
            self._waiters.remove(entry)
        if not predicate():
            raise AssertionError(
                f"connection closed while waiting: {self.closed.result() if self.closed.done() else ''}"
            )

    async def send_raw(self, data: str | bytes) -> None:
        await self.ws.send(data)

    async def request(
        self, method: str, params: dict[str, Any] | None = None, timeout: float = 30.0, request_id: Any = None
    ) -> dict[str, Any]:
        """Send a request and return the whole response (result or error)."""
        rid = next(self._ids) if request_id is None else request_id
        msg: dict[str, Any] = {"jsonrpc": "2.0", "id": rid, "method": method}
        if params is not None:
            msg["params"] = params
        await self.ws.send(json.dumps(msg))
        await self.wait(lambda: rid in self.responses, timeout)
        return self.responses.pop(rid)

    async def call(self, method: str, timeout: float = 30.0, **params: Any) -> dict[str, Any]:
        response = await self.request(method, params, timeout)
        assert "result" in response, response
        return response["result"]

    def session_events(self, session_id: str, type_: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("session_id") == session_id and (type_ is None or e["type"] == type_)]

    async def wait_event(self, session_id: str, type_: str, timeout: float = 30.0, count: int = 1) -> list[dict]:
        await self.wait(lambda: len(self.session_events(session_id, type_)) >= count, timeout)
        return self.session_events(session_id, type_)

    async def run_turn(self, session_id: str, text: str, timeout: float = 60.0) -> dict[str, Any]:
        """Submit a prompt and return its turn.complete payload."""
        result = await self.call("prompt.submit", session_id=session_id, text=text)
        turn_id = result["turn_id"]

        def done() -> bool:
            return any(
                e["type"] == "turn.complete" and e["payload"]["turn_id"] == turn_id
                for e in self.session_events(session_id)
            )

        await self.wait(done, timeout)
        return next(
            e["payload"] for e in self.session_events(session_id, "turn.complete") if e["payload"]["turn_id"] == turn_id
        )
