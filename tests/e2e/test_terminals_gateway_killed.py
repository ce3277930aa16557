"""kill -9 of a gateway process that owns a slash worker and terminals: every group they lead is gone
within 3 s (the slash worker's watchdog; the terminal warden plus the kernel's hang-up)."""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

import pty_bridge
from support import alive, pgid_members

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="process groups are POSIX only")

ROOT = Path(__file__).resolve().parents[2]
BASH = shutil.which("bash") or "/bin/sh"

# Plays the gateway: owns a SlashRunner with a started worker and two terminals, one of them running a
# program (and a background job) that ignores SIGHUP, so the kernel's hang-up alone would not end it.
GATEWAY_SCRIPT = r"""
import asyncio, json, sys
sys.path.insert(0, sys.argv[1])
from gateway.config import Config
from gateway.slash import SlashRunner
from gateway.terminals import TerminalRegistry

async def main() -> None:
    cwd, bash = sys.argv[2], sys.argv[3]
    config = Config(watchdog_poll_s=0.05, worker_nice=0)
    runner = SlashRunner(config, cwd)
    reply = await runner.exec("/help", {})
    registry = TerminalRegistry(config)
    stubborn = await registry.open({"argv": ["/bin/sh", "-c", "trap '' HUP; sleep 300 & wait"], "cwd": cwd})
    shell = await registry.open({"argv": [bash, "--norc", "--noprofile", "-i"], "cwd": cwd})
    print(json.dumps({"ok": reply["ok"], "slash": runner.pid, "terminals": [stubborn["pid"], shell["pid"]]}),
          flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def read_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    assert proc.stdout is not None
    buf = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while b"\n" not in buf:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no line within {timeout}s (got {buf!r})"
            if sel.select(remaining):
                chunk = os.read(proc.stdout.fileno(), 4096)
                assert chunk, f"the script exited: {buf!r}"
                buf += chunk
    return buf.decode().split("\n")[0]


def test_kill_9_of_the_gateway_ends_slash_worker_and_terminal_groups(tmp_path: Path) -> None:
    gateway = subprocess.Popen([sys.executable, "-c", GATEWAY_SCRIPT, str(ROOT), str(tmp_path), BASH],
                               stdout=subprocess.PIPE, start_new_session=True)
    leaders: list[int] = []
    try:
        info = json.loads(read_line(gateway, 30.0))
        assert info["ok"] is True
        leaders = [info["slash"], *info["terminals"]]
        deadline = time.monotonic() + 10.0
        while len(pty_bridge.session_processes(info["terminals"][0])) < 2:  # sh and its background sleep
            assert time.monotonic() < deadline, "the terminal's background job never started"
            time.sleep(0.02)
        assert all(pgid_members(pid) for pid in leaders)
        tracked = [p for sid in info["terminals"] for p in pty_bridge.session_processes(sid)]
        tracked += [psutil.Process(pid) for pid in pgid_members(info["slash"])]

        gateway.send_signal(signal.SIGKILL)
        gateway.wait(5)
        killed_at = time.monotonic()
        while True:
            left = [p.pid for p in alive(tracked)]
            left += [pid for leader in leaders for pid in pgid_members(leader)]
            if not left:
                break
            assert time.monotonic() - killed_at < 3.0, f"still alive 3 s after kill -9: {sorted(set(left))}"
            time.sleep(0.02)
    finally:
        if gateway.poll() is None:
            gateway.kill()
            gateway.wait()
        for leader in leaders:  # never leave strays behind for the next test
            for pid in pgid_members(leader) + [p.pid for p in pty_bridge.session_processes(leader)]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
