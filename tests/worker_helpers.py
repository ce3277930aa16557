"""Shared helpers for the worker tests: a supervisor fixture, turn runners and process inspection.

Everything polls with a deadline; nothing sleeps for a fixed time except to prove that something does
*not* happen.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import psutil
import pytest_asyncio

from workers.channel import Frame
from workers.supervisor import Supervisor, WorkerHandle

GRACE_S = 0.5


@pytest_asyncio.fixture
async def supervisor() -> AsyncIterator[Supervisor]:
    sup = Supervisor(pool_size=1, kill_grace_s=GRACE_S, start_timeout_s=20, watchdog_poll_s=0.1)
    await sup.start()
    try:
        yield sup
    finally:
        await sup.close()


async def run_turn(handle: WorkerHandle, text: str, turn_id: str = "t1", timeout: float = 30,
                   on_frame: Callable[[Frame], None] | None = None) -> list[tuple[str, Any]]:
    """Send a prompt and collect ``(event type, payload)`` up to and including its ``turn.complete``."""
    handle.send("prompt", {"turn_id": turn_id, "text": text})
    events: list[tuple[str, Any]] = []

    async def collect() -> None:
        async for frame in handle.frames():
            if on_frame is not None:
                on_frame(frame)
            events.append((frame.name, json.loads(frame.body)))
            if frame.name == "turn.complete":
                return
        raise AssertionError(f"worker stream ended before turn.complete: {events[-3:]}")

    await asyncio.wait_for(collect(), timeout)
    return events


def complete_of(events: list[tuple[str, Any]]) -> dict[str, Any]:
    kinds = [name for name, _ in events]
    assert kinds.count("turn.complete") == 1 and kinds[-1] == "turn.complete", kinds
    return events[-1][1]


def is_live(pid: int) -> bool:
    """Running and not a zombie (this sandbox's init does not always reap orphans promptly)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``predicate`` until true; return the seconds it took.  Fails with ``what`` on timeout."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)
    return time.monotonic() - start


class LagMonitor:
    """Measures how late a 10 ms ticker on the test's own event loop wakes up."""

    def __init__(self) -> None:
        self.max_lag = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(0.01)
            self.max_lag = max(self.max_lag, loop.time() - before - 0.01)

    def __enter__(self) -> LagMonitor:
        self._task = asyncio.get_running_loop().create_task(self._tick())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


def kept_child(keeper_pid: int, timeout: float = 10.0) -> psutil.Process:
    """The process a session keeper (``workers/keeper.py``) keeps: its one child, once forked."""
    deadline = time.monotonic() + timeout
    while True:
        children = psutil.Process(keeper_pid).children()
        if children:
            return min(children, key=lambda p: p.pid)
        if time.monotonic() >= deadline:
            raise AssertionError(f"keeper {keeper_pid} has no child after {timeout} s")
        time.sleep(0.01)


def cpu_seconds(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return times.user + times.system
