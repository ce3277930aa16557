"""Every session the gateway starts gets its nice on its autogroup too (workers/priority.py), for real:
an agent worker, a slash worker, a terminal, and sessions of an unprivileged user under the kernel's
rate limit; and an agent session's group weighs by how many run a turn (workers/cpu_weight.py), set by
the supervisor, under that rate limit too."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from support import ROOT, autogroup_nice
from worker_helpers import supervisor, wait_until  # noqa: F401  (supervisor is a fixture)

from pty_bridge import PtyProcess
from workers import priority
from workers.slash_process import start_slash_worker
from workers.supervisor import Supervisor

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.skipif(not os.path.exists(priority.AUTOGROUP), reason="this kernel has no autogroups"),
]


async def test_an_agent_workers_session_gets_the_workers_nice(supervisor: Supervisor) -> None:  # noqa: F811
    ours = Path("/proc/self/autogroup").read_text()
    handle = await supervisor.acquire("echo", {}, None, "s1")
    try:
        await wait_until(lambda: autogroup_nice(handle.pid) == 19, 20, "the worker's autogroup at nice 19")
        assert Path("/proc/self/autogroup").read_text() == ours  # the gateway's own group is left alone
    finally:
        await handle.stop()


async def test_a_session_running_a_turn_alone_gets_its_full_weight_back(supervisor: Supervisor) -> None:  # noqa: F811
    """One busy session weighs a quarter of a nice-0 group (the gateway's), nice 7 (215 <= 256), and goes back
    to 19 when its turn ends."""
    handle = await supervisor.acquire("echo", {}, None, "s1")
    try:
        await wait_until(lambda: autogroup_nice(handle.pid) == 19, 20, "the idle worker's autogroup at 19")
        handle.turn_running(True)
        await wait_until(lambda: autogroup_nice(handle.pid) == 7, 20, "the busy worker's autogroup at 7")
        assert os.getpriority(os.PRIO_PROCESS, handle.pid) == 19  # the worker proper's own nice is kept
        handle.turn_running(False)
        await wait_until(lambda: autogroup_nice(handle.pid) == 19, 20, "the idle worker's autogroup at 19 again")
    finally:
        await handle.stop()


async def test_busy_sessions_share_one_weight_whatever_their_number() -> None:
    """8 busy sessions at nice 16 (8 x 29 <= 256), then the 2 still busy at 10, the idle ones at 19."""
    sup = Supervisor(pool_size=0, kill_grace_s=0.5, start_timeout_s=20, watchdog_poll_s=0.1)
    await sup.start()
    try:
        handles = [await sup.acquire("echo", {}, None, f"s{i}") for i in range(8)]
        nices = lambda: [autogroup_nice(h.pid) for h in handles]  # noqa: E731
        for handle in handles:
            handle.turn_running(True)
        await wait_until(lambda: nices() == [16] * 8, 20, "8 busy autogroups at nice 16")
        for handle in handles[2:]:
            handle.turn_running(False)
        await wait_until(lambda: nices() == [10] * 2 + [19] * 6, 20, "2 busy at 10, 6 idle at 19")
    finally:
        await sup.close()


async def test_a_slash_workers_session_gets_its_nice(tmp_path: Path) -> None:
    worker = await start_slash_worker(cwd=str(tmp_path), gateway_pid=os.getpid(), poll_s=0.05, nice=3,
                                      kill_grace_s=0.5)
    try:
        await wait_until(lambda: autogroup_nice(worker.pid) == 3, 20, "the slash worker's autogroup at nice 3")
    finally:
        await worker.aclose(0.5)


@pytest.mark.skipif(os.geteuid() != 0, reason="a terminal tries once; only root is never rate-limited")
async def test_a_terminals_session_gets_its_nice(tmp_path: Path) -> None:
    pty = await PtyProcess.spawn(["/bin/sh", "-c", "sleep 60"], cwd=str(tmp_path), nice=4)
    try:
        assert autogroup_nice(pty.program_pid) == 4
    finally:
        await pty.terminate()
        pty.close_master()


SYSTEM_PYTHON = "/usr/bin/python3"
SETPRIV = shutil.which("setpriv")
UNPRIVILEGED_SESSION = """
import os, sys
sys.path.insert(0, sys.argv[1])
import priority
os.setsid()
sys.stdin.read()  # the barrier: every session starts its change at once, when the test closes our stdin
thread = priority.nice_autogroup(19)
if thread is not None:
    thread.join()
print(open("/proc/self/autogroup").read().split()[-1], "retried" if thread else "first-try", flush=True)
"""


@pytest.mark.skipif(os.geteuid() != 0 or SETPRIV is None or not os.access(SYSTEM_PYTHON, os.X_OK),
                    reason="needs root, setpriv and a system python to run sessions as an unprivileged user")
def test_sessions_started_together_by_an_unprivileged_user_all_get_their_nice() -> None:
    """Without CAP_SYS_ADMIN the kernel takes one autogroup change per 100 ms machine-wide and refuses
    the rest (EAGAIN): sessions that ask together must each still end up at their nice."""
    here = tempfile.mkdtemp(prefix="wg-priority-")  # readable by nobody, unlike pytest's tmp_path
    procs: list[subprocess.Popen[str]] = []
    try:
        os.chmod(here, 0o755)
        copy = shutil.copy(priority.__file__, os.path.join(here, "priority.py"))
        os.chmod(copy, 0o644)
        argv = [SETPRIV, "--reuid=65534", "--regid=65534", "--clear-groups", SYSTEM_PYTHON, "-c",
                UNPRIVILEGED_SESSION, here]
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
        for _ in range(4):
            procs.append(subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True, cwd=here, env=env))
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.close()
            proc.stdin = None  # so that communicate() does not flush it
        deadline = time.monotonic() + 60  # four changes need about 0.4 s; the retries run out after ~60 s
        outs = []
        for proc in procs:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            assert proc.returncode == 0, err
            outs.append(tuple(out.split()))
        assert [nice for nice, _ in outs] == ["19"] * 4, outs
        assert sum(how == "retried" for _, how in outs) >= 1, outs  # the rate limit was met, and outlasted
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
        shutil.rmtree(here, ignore_errors=True)


RATE_LIMITED_SUPERVISOR = """
import asyncio, sys
from pathlib import Path
from workers import priority
from workers.supervisor import Supervisor

def nice(pid):
    return int(Path(f"/proc/{pid}/autogroup").read_text().split()[-1])

async def main():
    sup = Supervisor(pool_size=0, kill_grace_s=0.5, start_timeout_s=20, watchdog_poll_s=0.1)
    nicer = sup._group_nicer
    refused = []
    def write(fd, value, real=nicer._write):
        outcome = real(fd, value)
        if outcome is priority.Outcome.BUSY:
            refused.append(value)
        return outcome
    nicer._write = write
    await sup.start()
    try:
        handles = [await sup.acquire("echo", {}, None, f"s{i}") for i in range(6)]
        for handle in handles:
            handle.turn_running(True)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30  # about 12 changes at one per 100 ms, with jittered retries
        while [nice(h.pid) for h in handles] != [15] * 6 and loop.time() < deadline:
            await asyncio.sleep(0.05)
        print(*[nice(h.pid) for h in handles], len(refused), flush=True)
    finally:
        await sup.close()

asyncio.run(main())
"""


@pytest.mark.skipif(os.geteuid() != 0 or SETPRIV is None, reason="needs root and setpriv to drop CAP_SYS_ADMIN")
def test_the_supervisor_sets_every_busy_group_under_the_kernels_rate_limit() -> None:
    """Without CAP_SYS_ADMIN (dropped from the bounding set) the supervisor's own writes meet the rate
    limit: 6 sessions started and made busy at once still all end at their nice, 15 (6 x 36 <= 256)."""
    argv = [SETPRIV, "--bounding-set=-sys_admin", "--inh-caps=-sys_admin", "--", sys.executable, "-c",
            RATE_LIMITED_SUPERVISOR]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    *nices, refused = proc.stdout.split()
    assert nices == ["15"] * 6, proc.stdout
    assert int(refused) >= 1, proc.stdout  # the limit was met, and outlasted
