"""All local agent workers in one CPU cgroup (workers/cpu_cgroup.py), for real: a worker is born there,
the cgroup has the share's weight, and it is gone once the supervisor closed.  Needs a cpu controller this
process may write to (root, or a delegated hierarchy); elsewhere the test says why it skipped."""

from __future__ import annotations

import os
import signal

import psutil
import pytest
from support import cpu_cgroup_of
from worker_helpers import wait_until

from workers import launch
from workers.cpu_cgroup import WorkerCgroup, weight_setting
from workers.supervisor import Supervisor

pytestmark = pytest.mark.timeout(90)


def writable_cpu_hierarchy() -> bool:
    """Whether this process may make a cpu cgroup (root on cgroup v1 or at v2's root): tried, then undone."""
    made = WorkerCgroup.create(0.25)
    if made is None:
        return False
    made.remove()
    return True


@pytest.mark.skipif(not writable_cpu_hierarchy(), reason="no cpu cgroup hierarchy this process may write to")
async def test_workers_are_born_in_one_cgroup_of_the_shares_weight_which_ends_with_the_supervisor() -> None:
    ours = cpu_cgroup_of(os.getpid())
    sup = Supervisor(pool_size=1, kill_grace_s=0.5, start_timeout_s=20, watchdog_poll_s=0.1, cpu_cgroup="auto",
                     cpu_share=0.25)
    await sup.start()
    try:
        cgroup = sup.cpu_cgroup
        assert isinstance(cgroup, WorkerCgroup) and cgroup.path.parent == ours
        name, value = weight_setting(2 if (cgroup.path / "cpu.weight").exists() else 1, 0.25)
        assert (cgroup.path / name).read_text().strip() == value
        forkserver = launch.forkserver_pid()
        assert forkserver is not None and cpu_cgroup_of(forkserver) == cgroup.path
        handles = [await sup.acquire("echo", {}, None, f"s{i}") for i in range(2)]  # pooled, then forked
        for handle in handles:
            assert cpu_cgroup_of(handle.pid) == cgroup.path  # the worker proper
            assert cpu_cgroup_of(os.getsid(handle.pid)) == cgroup.path  # its keeper, the session's leader
        assert cpu_cgroup_of(os.getpid()) == ours  # the gateway itself stays where it was
    finally:
        await sup.close()
    assert not cgroup.path.exists()


@pytest.mark.skipif(not writable_cpu_hierarchy(), reason="no cpu cgroup hierarchy this process may write to")
async def test_a_forkserver_started_again_is_moved_in_with_its_first_worker() -> None:
    sup = Supervisor(pool_size=0, kill_grace_s=0.5, start_timeout_s=20, watchdog_poll_s=0.1, cpu_cgroup="auto")
    await sup.start()
    try:
        assert sup.cpu_cgroup is not None
        first = launch.forkserver_pid()
        assert first is not None
        os.kill(first, signal.SIGKILL)  # our own child, by pid
        await wait_until(lambda: not psutil.pid_exists(first) or psutil.Process(first).status() == "zombie", 10,
                         "the forkserver gone")
        handle = await sup.acquire("echo", {}, None, "s1")  # multiprocess starts a new forkserver for it
        again = launch.forkserver_pid()
        assert again not in (None, first)
        assert cpu_cgroup_of(again) == sup.cpu_cgroup.path
        assert cpu_cgroup_of(handle.pid) == cpu_cgroup_of(os.getsid(handle.pid)) == sup.cpu_cgroup.path
    finally:
        await sup.close()


@pytest.mark.skipif(not writable_cpu_hierarchy(), reason="no cpu cgroup hierarchy this process may write to")
async def test_off_leaves_workers_in_the_gateways_cgroup() -> None:
    sup = Supervisor(pool_size=0, kill_grace_s=0.5, start_timeout_s=20, watchdog_poll_s=0.1, cpu_cgroup="off")
    await sup.start()
    try:
        handle = await sup.acquire("echo", {}, None, "s1")
        assert sup.cpu_cgroup is None and cpu_cgroup_of(handle.pid) == cpu_cgroup_of(os.getpid())
    finally:
        await sup.close()


def test_a_stale_cgroup_of_a_dead_gateway_is_removed() -> None:
    """What a killed gateway left (an empty cgroup named for its pid) goes at the next start; a live
    gateway's stays."""
    if not writable_cpu_hierarchy():
        pytest.skip("no cpu cgroup hierarchy this process may write to")
    parent = cpu_cgroup_of(os.getpid())
    assert parent is not None
    dead = 2**22 + 12345  # above pid_max's default: no process has it
    stale, live = parent / f"worker-gateway-{dead}.1", parent / f"worker-gateway-{os.getpid()}.999"
    stale.mkdir()
    live.mkdir()
    try:
        made = WorkerCgroup.create(0.25)
        assert made is not None
        made.remove()
        assert not stale.exists() and live.exists()
    finally:
        for path in (stale, live):
            if path.exists():
                path.rmdir()
