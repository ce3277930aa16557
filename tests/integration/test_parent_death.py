"""Workers end their whole process group when the gateway dies or hangs up, even while their main thread
holds the GIL, and do not when they are merely reparented."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

from support import pgid_members
from worker_helpers import (  # noqa: F401  (supervisor is a fixture)
    complete_of, is_live, run_turn, supervisor, wait_until)
from workers.supervisor import ExitStatus, Supervisor

pytestmark = pytest.mark.timeout(60)
REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(TESTS), env.get("PYTHONPATH", "")])
    return env


async def test_sigkill_of_the_owning_process_ends_all_its_workers() -> None:
    owner = await asyncio.create_subprocess_exec(
        sys.executable, str(TESTS / "supervisor_owner.py"), cwd=REPO, env=_env(),
        stdout=asyncio.subprocess.PIPE)
    try:
        line = await asyncio.wait_for(owner.stdout.readline(), 30)
        pids = json.loads(line)
        regex = psutil.Process(pids["regex"])
        await wait_until(lambda: sum(regex.cpu_times()[:2]) > 0.3, 10, "the regex to hold the GIL")
        everything = set(p.pid for p in psutil.Process(owner.pid).children(recursive=True))
        for leader in (pids["shell"], pids["regex"], *pids["pool"]):
            everything.update(pgid_members(leader))
        assert len(pgid_members(pids["shell"])) >= 3  # worker, sh, two sleeps (the keeper is outside)
        owner.kill()
        await owner.wait()
        await wait_until(lambda: not any(is_live(pid) for pid in everything), 3,
                         "every worker, child and the forkserver to end")
    finally:
        if owner.returncode is None:
            owner.kill()
            await owner.wait()


async def test_worker_ends_its_group_when_the_control_pipe_closes(supervisor: Supervisor) -> None:
    handle = await supervisor.acquire("shell", {}, None, "s1")
    complete_of(await run_turn(handle, "sleep 300 &"))
    assert len(pgid_members(handle.pid)) >= 2  # the worker and the sleep (its keeper is outside the group)
    handle._writer.close()  # what the kernel does to every pipe when the gateway dies
    await wait_until(lambda: not pgid_members(handle.pid), 2, "the group to end")
    assert (await asyncio.wait_for(handle.wait(), 2)).signal == signal.SIGKILL


async def test_control_pipe_hangup_is_noticed_while_the_gil_is_held(supervisor: Supervisor) -> None:
    handle = await supervisor.acquire("load", {}, None, "s1")
    handle.send("prompt", {"turn_id": "t1", "text": "gil=regex cpu_s=30"})
    worker = psutil.Process(handle.pid)
    await wait_until(lambda: sum(worker.cpu_times()[:2]) > 0.3, 10, "the regex to be running")
    handle._writer.close()
    await wait_until(lambda: not pgid_members(handle.pid), 2, "the keeper to end the group")


async def test_worker_death_takes_its_group_along(supervisor: Supervisor) -> None:
    handle = await supervisor.acquire("shell", {}, None, "s1")
    complete_of(await run_turn(handle, "sleep 300 &"))
    os.kill(handle.pid, signal.SIGKILL)  # not stop(): nobody signals the group but the keeper
    await wait_until(lambda: not pgid_members(handle.pid), 2, "the group to end")


async def test_reparented_workers_keep_serving_when_the_forkserver_dies(supervisor: Supervisor) -> None:
    handle = await supervisor.acquire("echo", {}, None, "s1")
    (forkserver,) = [p for p in psutil.Process().children() if "forkserver" in " ".join(p.cmdline())]
    forkserver.kill()
    await wait_until(lambda: not is_live(forkserver.pid), 5, "the forkserver to die")
    await asyncio.sleep(0.5)  # proving a negative: 5x the watchdog period, and the worker is still there
    assert is_live(handle.pid) and handle.alive
    assert complete_of(await run_turn(handle, "still here"))["status"] == "ok"
    assert await handle.stop() == ExitStatus(handle.pid, None, None)  # the exit code died with the forkserver
    await wait_until(lambda: not pgid_members(handle.pid), 1, "the group to end")
    again = await supervisor.acquire("echo", {}, None, "s2")  # a new forkserver is started on demand
    assert complete_of(await run_turn(again, "new"))["status"] == "ok"


def test_keeper_without_pidfds_polls_the_gateway_pid() -> None:
    """Old kernels / other platforms: the keeper polls the gateway's pid instead of waiting on a pidfd."""
    fake_gateway = subprocess.Popen(["sleep", "300"])
    script = textwrap.dedent(f"""
        import os, signal, sys, time
        del os.pidfd_open
        from workers import keeper
        os.setsid()
        r, w = os.pipe()  # this process holds the write end itself: the lifeline never hangs up
        keeper.fork_kept(gateway_pid={fake_gateway.pid}, lifeline_fd=r, signals=(signal.SIGTERM, signal.SIGKILL),
                         step_s=1.0, graceful_on_child_exit=False, poll_s=0.1)
        print(os.getpid(), flush=True)
        time.sleep(300)
    """)
    worker = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=_env(), stdout=subprocess.PIPE)
    try:
        child = int(worker.stdout.readline())
        assert psutil.Process(child).ppid() == worker.pid and len(pgid_members(worker.pid)) == 2
        fake_gateway.kill()
        fake_gateway.wait()
        assert worker.wait(timeout=2) == -signal.SIGKILL  # the keeper exits as its child was ended
        assert not is_live(child)
    finally:
        for proc in (fake_gateway, worker):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
