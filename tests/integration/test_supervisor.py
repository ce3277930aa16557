"""Supervisor and WorkerHandle against real worker processes: start, hand-out, failure, teardown."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from pathlib import Path

import psutil
import pytest

from support import pgid_members
from worker_helpers import (  # noqa: F401  (supervisor is a fixture)
    GRACE_S, LagMonitor, complete_of, is_live, run_turn, supervisor, wait_until)
from workers.supervisor import ExitStatus, Supervisor, UnknownAgentError, WorkerStartError

pytestmark = pytest.mark.timeout(60)


def ignored_signals(pid: int) -> set[int]:
    """The signals ``pid`` ignores (its ``SigIgn`` mask in /proc)."""
    status = Path(f"/proc/{pid}/status").read_text()
    mask = int(re.search(r"SigIgn:\s*([0-9a-f]+)", status).group(1), 16)  # type: ignore[union-attr]
    return {sig for sig in range(1, 65) if mask & (1 << (sig - 1))}


async def test_warm_worker_is_its_own_process_group_leader(supervisor: Supervisor) -> None:
    await wait_until(lambda: supervisor.pool_ready == 1, 10, "a warm worker")
    handle = await supervisor.acquire("echo", {}, None, "s1")
    assert handle.alive and handle.agent == "echo"
    assert os.getpgid(handle.pid) == handle.pid != os.getpgrp()
    keeper = psutil.Process(handle.pid).ppid()  # the session's keeper: session leader and subreaper
    assert os.getsid(handle.pid) == keeper == os.getpgid(keeper) != handle.pid
    ignored, ours = ignored_signals(handle.pid), ignored_signals(os.getpid())
    assert signal.SIGPIPE in ignored  # Python's own default, kept...
    for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGHUP):
        # ...and none of what the keeper ignores, unless the supervisor's process was started ignoring it
        # too (a shell script's background job ignores SIGINT and SIGQUIT; then so does every child)
        assert (sig in ignored) == (sig in ours), sig
    assert psutil.Process(handle.pid).nice() > psutil.Process().nice()
    assert complete_of(await run_turn(handle, "hi there"))["status"] == "ok"


async def test_warm_hand_out_takes_milliseconds(supervisor: Supervisor) -> None:
    await wait_until(lambda: supervisor.pool_ready == 1, 10, "a warm worker")
    start = time.perf_counter()
    handle = await supervisor.acquire("echo", {}, None, "s1")
    assert time.perf_counter() - start < 0.5  # typically ~3 ms; the bound only guards against a cold start
    await wait_until(lambda: supervisor.pool_ready == 1, 10, "the pool to refill")
    assert supervisor.live_workers == 2
    await handle.stop()


async def test_cold_start_without_a_pool() -> None:
    sup = Supervisor(pool_size=0, kill_grace_s=GRACE_S)
    await sup.start()
    try:
        handle = await sup.acquire("agents_for_tests:options_echo", {"k": 1}, "/tmp", "s1")
        events = await run_turn(handle, "x")
        assert ("message.delta", {"turn_id": "t1", "text": "[('k', 1)] /tmp"}) in events
        assert sup.pool_ready == 0 and sup.live_workers == 1
    finally:
        await sup.close()
    assert sup.live_workers == 0


@pytest.mark.parametrize("agent", ["no-such-agent", "no_such_module:Agent", "agents_for_tests:Missing"])
async def test_unknown_agent_raises_4004_and_leaks_no_worker(supervisor: Supervisor, agent: str) -> None:
    await wait_until(lambda: supervisor.pool_ready == 1, 10, "a warm worker")
    with pytest.raises(UnknownAgentError) as info:
        await supervisor.acquire(agent, {}, None, "s1")
    assert info.value.code == 4004 and agent in info.value.message
    await wait_until(lambda: supervisor.live_workers == supervisor.pool_ready == 1, 5, "only the pool left")


async def test_agent_failing_to_start_raises_5001(supervisor: Supervisor) -> None:
    with pytest.raises(WorkerStartError) as info:
        await supervisor.acquire("agents_for_tests:FailStart", {}, None, "s1")
    assert type(info.value) is WorkerStartError and info.value.code == 5001
    assert "database unreachable" in info.value.message


async def test_bad_cwd_raises_5001(supervisor: Supervisor) -> None:
    with pytest.raises(WorkerStartError, match="cannot use cwd"):
        await supervisor.acquire("echo", {}, "/nonexistent/dir", "s1")


async def test_agent_slower_than_the_start_timeout_is_stopped() -> None:
    sup = Supervisor(pool_size=0, kill_grace_s=GRACE_S, start_timeout_s=1.0)
    await sup.start()
    try:
        with pytest.raises(WorkerStartError, match="within 1 s"):
            await sup.acquire("agents_for_tests:SlowStart", {"seconds": 30}, None, "s1")
        assert sup.live_workers == 0
    finally:
        await sup.close()


async def test_cancelled_acquire_stops_its_worker(supervisor: Supervisor) -> None:
    task = asyncio.create_task(supervisor.acquire("agents_for_tests:SlowStart", {"seconds": 30}, None, "s1"))
    await wait_until(lambda: supervisor.live_workers == 2 and supervisor.pool_ready == 1, 10,
                     "the slow worker to be handed out and the pool refilled")
    busy = [w.pid for w in supervisor._workers if w not in supervisor._pool]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_until(lambda: not any(is_live(pid) for pid in busy), GRACE_S + 2, "the worker to die")


async def test_stop_ends_background_processes_of_the_group(supervisor: Supervisor) -> None:
    handle = await supervisor.acquire("shell", {}, None, "s1")
    done = complete_of(await run_turn(handle, "sleep 300 & echo started"))
    assert done["status"] == "ok" and done["exit_code"] == 0
    members = pgid_members(handle.pid)
    sleepers = [pid for pid in members if psutil.Process(pid).name() == "sleep"]
    assert sleepers, members
    status = await handle.stop()
    assert status.signal == signal.SIGTERM
    # Bounded by the grace plus a margin for a loaded machine (the SIGKILL confirmation alone is 5 s).
    await wait_until(lambda: not pgid_members(handle.pid), GRACE_S + 3, "the group to be empty")


async def test_worker_ignoring_sigterm_is_killed_after_the_grace(supervisor: Supervisor) -> None:
    handle = await supervisor.acquire("agents_for_tests:IgnoreTerm", {}, None, "s1")
    with LagMonitor() as lag:
        start = time.monotonic()
        status = await handle.stop()
        elapsed = time.monotonic() - start
    assert status == ExitStatus(handle.pid, None, signal.SIGKILL)
    assert GRACE_S <= elapsed < GRACE_S + 3  # killed after the grace, not after the 5 s SIGKILL confirmation
    assert lag.max_lag < GRACE_S * 0.8  # the stop was awaited, not blocked on (that would stall the grace)
    await wait_until(lambda: not pgid_members(handle.pid), 1, "the group to end")


async def test_stop_is_idempotent_and_concurrency_safe(supervisor: Supervisor) -> None:
    handle = await supervisor.acquire("echo", {}, None, "s1")
    statuses = await asyncio.gather(handle.stop(), handle.stop(), handle.stop())
    assert len(set(statuses)) == 1 and statuses[0].signal == signal.SIGTERM
    assert await handle.stop() == statuses[0] == handle.exit_status == await handle.wait()
    assert not handle.alive
    handle.kill()  # no-op now: the group is gone and its id may be recycled
    handle.send("prompt", {"turn_id": "t1", "text": "x"})  # no-op too
    assert [f async for f in handle.frames()] == []


async def test_worker_killed_from_outside_is_reported_and_supervisor_carries_on(
        supervisor: Supervisor) -> None:
    handle = await supervisor.acquire("echo", {}, None, "s1")
    os.kill(handle.pid, signal.SIGKILL)
    status = await asyncio.wait_for(handle.wait(), 5)
    assert status == ExitStatus(handle.pid, None, signal.SIGKILL)
    assert handle.exit_status == status and not handle.alive
    assert [f async for f in handle.frames()] == []
    again = await supervisor.acquire("echo", {}, None, "s2")
    assert complete_of(await run_turn(again, "still working"))["status"] == "ok"


async def test_worker_exit_code_is_reported(supervisor: Supervisor) -> None:
    handle = await supervisor.acquire("agents_for_tests:Flaky", {}, None, "s1")
    handle.send("prompt", {"turn_id": "t1", "text": "die"})
    status = await asyncio.wait_for(handle.wait(), 5)
    assert status == ExitStatus(handle.pid, 3, None)


async def test_idle_pool_worker_that_dies_is_replaced(supervisor: Supervisor) -> None:
    await wait_until(lambda: supervisor.pool_ready == 1, 10, "a warm worker")
    (victim,) = list(supervisor._pool)
    os.kill(victim.pid, signal.SIGKILL)
    await wait_until(lambda: supervisor.pool_ready == 1 and victim not in supervisor._pool, 10, "a new one")
    handle = await supervisor.acquire("echo", {}, None, "s1")
    assert handle is not victim


async def test_close_stops_every_worker_and_the_forkserver() -> None:
    sup = Supervisor(pool_size=2, kill_grace_s=GRACE_S)
    await sup.start()
    handles = [await sup.acquire("shell", {}, None, f"s{i}") for i in range(2)]
    for handle in handles:
        complete_of(await run_turn(handle, "sleep 300 &"))
    await wait_until(lambda: sup.pool_ready == 2, 10, "the pool to refill")
    pids = [w.pid for w in sup._workers]
    forkservers = [p.pid for p in psutil.Process().children() if "forkserver" in " ".join(p.cmdline())]
    await sup.close()
    await sup.close()
    assert sup.live_workers == 0 and len(pids) == 4
    await wait_until(lambda: not any(pgid_members(pid) for pid in pids), 2, "every group to be empty")
    assert not any(is_live(pid) for pid in forkservers)
    with pytest.raises(WorkerStartError):
        await sup.acquire("echo", {}, None, "late")


async def test_known_agents_lists_builtins_without_importing_them() -> None:
    sup = Supervisor(pool_size=0)
    assert sup.known_agents()[:3] == ["echo", "shell", "load"]


async def test_idle_worker_memory_is_small(supervisor: Supervisor) -> None:
    await wait_until(lambda: supervisor.pool_ready == 1, 10, "a warm worker")
    (idle,) = list(supervisor._pool)
    uss = psutil.Process(idle.pid).memory_full_info().uss
    keeper_uss = psutil.Process(idle.pid).parent().memory_full_info().uss
    assert uss < 15 * 2 ** 20, uss
    assert uss + keeper_uss < 15 * 2 ** 20, (uss, keeper_uss)
