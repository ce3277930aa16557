"""Pure parts of the containment layer (``workers/contain.py``, ``workers/process.py``), and the keeper
seen from outside: its descendants, however they left the session, are found and ended."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import psutil

from support import wait_for
from workers import contain
from workers.process import describe_exit


def test_stat_line_with_spaces_and_parentheses_in_the_name() -> None:
    line = "4242 (my (odd) name) S 17 4242 4242 0 -1 4194560 90 0 0 0 1 2 0 0 20 0 1 0 123456 1000 100"
    info = contain.parse_stat(4242, line)
    assert info == contain.ProcInfo(pid=4242, ppid=17, sid=4242, state="S", start=123456)
    assert not info.gone and contain.ProcInfo(1, 0, 1, "Z", 0).gone


def test_malformed_stat_lines_are_none() -> None:
    assert contain.parse_stat(1, "garbage") is None
    assert contain.parse_stat(1, "1 (x) S 1 2") is None


def test_exit_descriptions() -> None:
    assert describe_exit(0) == "exit code 0"
    assert describe_exit(-signal.SIGKILL) == "killed by SIGKILL"
    assert describe_exit(None) == "exit status unknown"


def test_a_double_forked_setsid_process_is_found_below_the_keeper_and_killed() -> None:
    marker = f"6001.{os.getpid()}"
    script = textwrap.dedent(f"""
        import os, signal, subprocess, sys, time
        from workers import keeper
        os.setsid()
        keeper.fork_kept(gateway_pid={os.getpid()}, lifeline_fd=None, signals=(signal.SIGTERM, signal.SIGKILL),
                         step_s=0.5, graceful_on_child_exit=False, poll_s=0.1)
        subprocess.run(["setsid", "sh", "-c", "sleep {marker} & exit 0"])
        print(os.getpid(), flush=True)
        time.sleep(300)
    """)
    keeper_proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    try:
        int(keeper_proc.stdout.readline())
        sleeper = wait_for(lambda: [p for p in psutil.process_iter(["cmdline"])
                                    if marker in (p.info["cmdline"] or [])], 10, what="the escaped sleep")[0]
        assert os.getsid(sleeper.pid) != keeper_proc.pid  # it left the keeper's session...
        assert sleeper.pid in {p.pid for p in contain.descendants(keeper_proc.pid)}  # ...but not its tree
        keeper_proc.send_signal(signal.SIGTERM)
        assert keeper_proc.wait(10) == -signal.SIGTERM  # the keeper exits as its child ended
        wait_for(lambda: not sleeper.is_running() or sleeper.status() == psutil.STATUS_ZOMBIE, 5,
                 what="the escaped sleep to end")
    finally:
        if keeper_proc.poll() is None:
            keeper_proc.kill()
            keeper_proc.wait()
