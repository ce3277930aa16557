"""The local worker's read path against real workers: the widened pipe, the CPU policy, frame batches."""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

import psutil
import pytest
from worker_helpers import GRACE_S, wait_until

from workers import launch
from workers.channel import Frame, ReaderState
from workers.supervisor import Supervisor, WorkerHandle

pytestmark = pytest.mark.timeout(90)


async def _started(**options: Any) -> Supervisor:
    sup = Supervisor(pool_size=0, kill_grace_s=GRACE_S, start_timeout_s=30, watchdog_poll_s=0.1, **options)
    await sup.start()
    return sup


async def _turn_in_batches(handle: WorkerHandle, text: str, *, fill_first: bool = False) -> list[list[Frame]]:
    """Send a prompt and collect the batches up to the one holding its ``turn.complete``; ``fill_first``:
    let the reader fill up to its bound (and pause) before pulling anything."""
    handle.send("prompt", {"turn_id": "t1", "text": text})
    if fill_first:
        await wait_until(lambda: handle._reader.paused, 30, "the reader to fill up")
    batches: list[list[Frame]] = []

    async def collect() -> None:
        async for batch in handle.frame_batches():
            batches.append(batch)
            if any(f.name == "turn.complete" for f in batch):
                return
        raise AssertionError("the worker's frames ended before turn.complete")

    await asyncio.wait_for(collect(), 60)
    return batches


async def test_worker_pipe_is_widened_and_the_worker_runs_batch() -> None:
    sup = await _started(pipe_bytes=256 * 1024, sched="batch")
    try:
        handle = await sup.acquire("load", {}, None, "s1")
        assert launch.pipe_size(handle._reader._fd) == 256 * 1024
        assert os.sched_getscheduler(handle.pid) == os.SCHED_BATCH
        keeper = psutil.Process(handle.pid).ppid()
        assert os.sched_getscheduler(keeper) == os.SCHED_OTHER  # the keeper must stay prompt at killing
        assert psutil.Process(handle.pid).nice() > psutil.Process().nice()  # the nice is kept as well
        batches = await _turn_in_batches(handle, "output_mb=2 chunk_kb=64", fill_first=True)
        frames = [f for batch in batches for f in batch]
        assert frames[0].name == "turn.start" and frames[-1].name == "turn.complete"
        assert json.loads(frames[-1].body)["status"] == "ok"
        outputs = [f for f in frames if f.name == "tool.output"]
        assert sum(len(f.body) for f in outputs) >= 2 * 1024 * 1024
        assert len(batches[0]) >= 16  # everything queued (1 MiB: the bound) comes in one batch
        await handle.stop()
        assert handle._reader.state is ReaderState.DONE
    finally:
        await sup.close()


async def test_idle_policy() -> None:
    sup = await _started(sched="idle")
    try:
        handle = await sup.acquire("echo", {}, None, "s1")
        assert os.sched_getscheduler(handle.pid) == os.SCHED_IDLE
        batches = await _turn_in_batches(handle, "hi")
        assert json.loads(batches[-1][-1].body)["status"] == "ok"
    finally:
        await sup.close()


async def test_workers_still_serve_when_the_kernel_refuses_the_pipe_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """An fcntl the kernel rejects (EINVAL, as it answers EPERM over the user's pipe quota) leaves the
    default 64 KiB pipe: 64 KiB events then cross it in pieces, and nothing else changes."""
    monkeypatch.setattr(launch, "_F_SETPIPE_SZ", 0x7FFF_0000)  # no such fcntl command
    sup = await _started(pipe_bytes=256 * 1024)
    try:
        handle = await sup.acquire("load", {}, None, "s1")
        assert launch.pipe_size(handle._reader._fd) == 64 * 1024
        frames = [f for batch in await _turn_in_batches(handle, "output_mb=1 chunk_kb=64") for f in batch]
        assert json.loads(frames[-1].body)["status"] == "ok"
        assert sum(len(f.body) for f in frames if f.name == "tool.output") >= 1024 * 1024
    finally:
        await sup.close()
