"""Connection storms: many connect / create / disconnect cycles leave no orphan and no memory behind.

CI runs 500 cycles; ``WG_STORM_CYCLES=5000`` (and ``WG_STORM_CONCURRENCY``) for the long version.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import time
import urllib.request

import psutil

from support import RpcClient, alive, async_wait_for, descendants, pgid_members

CYCLES = int(os.environ.get("WG_STORM_CYCLES", "500"))
CONCURRENCY = int(os.environ.get("WG_STORM_CONCURRENCY", "8"))
WARMUP = 40
RSS_BUDGET = 30 * 1024 * 1024


def healthz(gw) -> dict:
    with urllib.request.urlopen(gw.http("/healthz"), timeout=5) as resp:
        return json.loads(resp.read())


def tree(gw) -> list[psutil.Process]:
    return alive(descendants(gw.pid))  # tolerant of a process that exits while it is looked at


async def one_cycle(url: str, i: int, worker_pids: set[int]) -> str:
    """One client's life, in one of four shapes; returns the shape."""
    shape = ("close_on_disconnect", "explicit_close", "detached", "disconnect_mid_turn")[i % 4]
    async with RpcClient.connect(url) as client:
        created = await client.call("session.create", close_on_disconnect=shape in ("close_on_disconnect",
                                                                                     "disconnect_mid_turn"))
        worker_pids.add(created["worker_pid"])
        sid = created["session_id"]
        if shape == "explicit_close":
            assert await client.call("session.close", session_id=sid) == {"closed": True}
        elif shape == "disconnect_mid_turn":
            await client.call("prompt.submit", session_id=sid, text="storm " * 50)
    return shape


async def storm(url: str, cycles: int, worker_pids: set[int]) -> None:
    counter = iter(range(cycles))

    async def lane() -> None:
        for i in counter:
            await one_cycle(url, i, worker_pids)

    await asyncio.gather(*(lane() for _ in range(CONCURRENCY)))


async def stable_tree_size(gw, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    last, same = -1, 0
    while time.monotonic() < deadline:
        size = len(tree(gw))
        same = same + 1 if size == last else 0
        last = size
        if same >= 10 and size >= 5:
            return size
        await asyncio.sleep(0.1)
    raise AssertionError(f"the process tree never held still (last size {last})")


async def settled(gw, observer: RpcClient, pool_tree_size: int, timeout: float) -> None:
    """No live session, and the process tree is back to the forkserver plus a full warm pool."""

    async def no_sessions() -> bool:
        return (await observer.call("session.active_list"))["sessions"] == []

    deadline = time.monotonic() + timeout
    while not await no_sessions():
        assert time.monotonic() < deadline, "sessions still live after the storm"
        await asyncio.sleep(0.1)
    try:
        await async_wait_for(lambda: len(tree(gw)) == pool_tree_size, max(1.0, deadline - time.monotonic()),
                             what=f"the process tree back to {pool_tree_size} processes")
    except AssertionError as exc:
        described = []
        for p in tree(gw):
            try:
                described.append((p.pid, p.ppid(), os.getpgid(p.pid), p.status(), " ".join(p.cmdline())[:80]))
            except (psutil.Error, OSError):
                pass
        raise AssertionError(f"{exc}; tree now: {described}; health: {healthz(gw)}") from None


async def test_connect_create_disconnect_storm_leaves_no_orphans_and_no_growth(gateway_factory) -> None:
    gw = gateway_factory("--grace-s", "0.3", "--max-sessions", "128", "--pool-size", "2")
    url = gw.url()
    proc = psutil.Process(gw.pid)
    worker_pids: set[int] = set()
    async with RpcClient.connect(url) as observer:
        # The forkserver, the store writer, and each pooled worker with its keeper; the pool fills in the
        # background, so take the size once it has held still for a second.
        pool_tree_size = await stable_tree_size(gw, 20)
        # Warm-up: first-use allocations (imports, caches, metric label sets) are not growth.
        await storm(url, WARMUP, worker_pids)
        await settled(gw, observer, pool_tree_size, 30)
        gc.collect()
        rss_before = proc.memory_info().rss
        started = time.monotonic()
        await storm(url, CYCLES, worker_pids)
        storm_s = time.monotonic() - started
        await settled(gw, observer, pool_tree_size, 30)
        rss_after = proc.memory_info().rss
        health = healthz(gw)
    assert len(worker_pids) == WARMUP + CYCLES, "every cycle had its own worker"
    orphans = [pid for pid in worker_pids if pgid_members(pid)]
    assert not orphans, f"{len(orphans)} worker groups outlived their sessions: {orphans[:10]}"
    assert health["sessions"] == 0 and health["connections"] <= 1, health
    growth = rss_after - rss_before
    assert growth < RSS_BUDGET, f"gateway RSS grew by {growth / 1e6:.1f} MB over {CYCLES} cycles"
    print(f"storm: {CYCLES} cycles in {storm_s:.1f}s ({CYCLES / storm_s:.0f}/s), "
          f"RSS {rss_before / 1e6:.1f} -> {rss_after / 1e6:.1f} MB")
