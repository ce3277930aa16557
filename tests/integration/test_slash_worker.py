"""slash_worker.py as a real process: its commands over channel frames, path confinement, plugins from the
``worker_gateway.slash`` entry-point group, and its parent-death watchdog."""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import psutil
import pytest

import slash_worker
from support import pgid_members, wait_for
from worker_helpers import cpu_seconds, kept_child
from workers.channel import FrameDecoder, Kind, control_frame

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="process groups are POSIX only")

FAKE_TOKEN = "ghp_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8"  # 36 alphanumerics after the prefix

PLUGIN_SOURCE = '''
import os, time
from slash_worker import Command

def nap(ctx, args):
    """sleep for N seconds (test plugin)"""
    time.sleep(float(args[0]))
    return "rested"

def crash(ctx, args):
    """exit the worker abruptly (test plugin)"""
    os._exit(3)

def escape(ctx, args):
    """leave a process behind in a session of its own (test plugin)"""
    import subprocess
    subprocess.Popen(["setsid", "sh", "-c", f"sleep {args[0]} & exit 0"], stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return "escaped"

shout = Command("shout", "/shout WORDS", "say it louder (test plugin)", lambda ctx, args: " ".join(args).upper())
'''


def install_test_plugin(root: Path) -> Path:
    """A plugin distribution found through ``importlib.metadata`` when ``root`` is on PYTHONPATH: the real
    entry-point mechanism, without installing anything into the venv."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "wg_test_plugin.py").write_text(PLUGIN_SOURCE)
    dist = root / "wg_test_plugin-0.1.dist-info"
    dist.mkdir(exist_ok=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: wg-test-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[worker_gateway.slash]\nnap = wg_test_plugin:nap\ncrash = wg_test_plugin:crash\n"
        "escape = wg_test_plugin:escape\n"
        "shout = wg_test_plugin:shout\nbroken = wg_test_plugin_missing:thing\nhelp = wg_test_plugin:nap\n")
    return root


class Worker:
    """A slash worker over real pipes, driven with blocking reads that always have a deadline."""

    def __init__(self, parent_pid: int, env: dict[str, str] | None = None, launcher: bool = False) -> None:
        cmd = [sys.executable, slash_worker.__file__, "--parent-pid", str(parent_pid), "--poll", "0.05"]
        full_env = {**os.environ, **(env or {})}
        if launcher:
            # An intermediate process starts the worker and exits: the worker is re-parented, its parent-pid
            # (this test) is alive, and its pipes are still ours.
            code = ("import subprocess, sys; p = subprocess.Popen(sys.argv[1:], start_new_session=True); "
                    "print(p.pid, flush=True)")
            starter = subprocess.Popen([sys.executable, "-c", code, *cmd], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, env=full_env)
            assert starter.stdout is not None and starter.stdin is not None
            self.pid = int(starter.stdout.readline())
            self.stdin, self.stdout = starter.stdin, starter.stdout
            starter.wait(10)
            self.proc: subprocess.Popen[bytes] | None = None
        else:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=full_env,
                                         start_new_session=True)
            assert self.proc.stdin is not None and self.proc.stdout is not None
            self.pid, self.stdin, self.stdout = self.proc.pid, self.proc.stdin, self.proc.stdout
        self._decoder = FrameDecoder()
        self._ids = iter(range(1, 1_000_000))

    def exec(self, command: str, cwd: Path, snapshot: dict[str, Any] | None = None,
             timeout: float = 15.0) -> dict[str, Any]:
        request_id = next(self._ids)
        self.stdin.write(control_frame("exec", {"id": request_id, "command": command, "cwd": str(cwd),
                                                "snapshot": snapshot or {}}))
        self.stdin.flush()
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(self.stdout, selectors.EVENT_READ)
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no answer to {command!r} within {timeout}s")
                if not sel.select(remaining):
                    continue
                data = os.read(self.stdout.fileno(), 65536)
                if not data:
                    raise AssertionError(f"worker closed its stdout while running {command!r}")
                for frame in self._decoder.feed(data):
                    assert frame.kind is Kind.CONTROL and frame.name in ("ready", "result")
                    if frame.name == "ready":  # sent once, when the worker is ready for commands
                        self.ready = frame.json()
                        continue
                    body = frame.json()
                    assert body["id"] == request_id
                    return body

    def stop(self) -> None:
        for pipe in (self.stdin, self.stdout):
            try:
                pipe.close()
            except OSError:
                pass
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.proc is not None:
            self.proc.wait(10)


@pytest.fixture
def worker() -> Iterator[Worker]:
    w = Worker(os.getpid())
    yield w
    w.stop()


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    (root / "src").mkdir(parents=True)
    (root / "src" / "app.py").write_text(f"import os\nTOKEN = '{FAKE_TOKEN}'  # needle\nprint('hi')\n")
    (root / "notes.txt").write_text("nothing to see\n")
    (root / "secret.env").write_text(f"GITHUB_TOKEN={FAKE_TOKEN}\n")
    (tmp_path / "outside.txt").write_text("outside the session directory\n")
    (root / "escape").symlink_to(tmp_path / "outside.txt")
    return root


# Commands ----------------------------------------------------------------------------------------------


def test_help_lists_every_builtin_with_one_line_each(worker: Worker, project: Path) -> None:
    reply = worker.exec("/help", project)
    assert reply["ok"] is True
    lines = reply["output"].splitlines()
    for name in ("/help", "/status", "/ls", "/cat", "/grep"):
        assert sum(line.startswith(name) for line in lines) == 1, reply["output"]


def test_grep_finds_the_line_and_redacts_the_secret_in_it(worker: Worker, project: Path) -> None:
    reply = worker.exec("/grep needle", project)
    assert reply["ok"] is True
    assert reply["output"].startswith("src/app.py:2:TOKEN = '[REDACTED]'  # needle")
    assert FAKE_TOKEN not in reply["output"] and "ghp_" not in reply["output"]


def test_grep_in_a_subpath_and_without_matches(worker: Worker, project: Path) -> None:
    assert worker.exec("/grep print src", project)["output"] == "src/app.py:3:print('hi')"
    reply = worker.exec("/grep zebra", project)
    assert reply["ok"] is True and "no matches" in reply["output"]


def test_grep_skips_a_fifo_instead_of_blocking_on_it(worker: Worker, project: Path) -> None:
    os.mkfifo(project / "src" / "pipe")  # nobody ever writes to it: opening it to read would block
    assert worker.exec("/grep print src", project, timeout=5.0)["output"] == "src/app.py:3:print('hi')"
    reply = worker.exec("/grep print src/pipe", project, timeout=5.0)
    assert reply["ok"] is True and "no matches" in reply["output"]


def test_grep_with_a_bad_regex_says_what_is_wrong(worker: Worker, project: Path) -> None:
    reply = worker.exec("/grep '(unclosed'", project)
    assert reply["ok"] is False
    assert "invalid regular expression '(unclosed'" in reply["output"]


def test_grep_does_not_follow_a_symlink_out_of_the_session_directory(worker: Worker, project: Path) -> None:
    reply = worker.exec("/grep outside", project)
    assert reply["ok"] is True and "no matches" in reply["output"]


def test_cat_scrubs_secrets(worker: Worker, project: Path) -> None:
    reply = worker.exec("/cat secret.env", project)
    assert reply == {"id": reply["id"], "ok": True, "output": "GITHUB_TOKEN=[REDACTED]\n"}


@pytest.mark.parametrize("path", ["../../etc/passwd", "/etc/passwd", "escape", "src/../../outside.txt"])
def test_cat_refuses_paths_outside_the_session_directory(worker: Worker, project: Path, path: str) -> None:
    reply = worker.exec(f"/cat {path}", project)
    assert reply["ok"] is False
    assert reply["output"].startswith(f"refused: {path} is outside the session directory")


def test_cat_caps_large_files(worker: Worker, project: Path) -> None:
    (project / "big.txt").write_text("x" * (slash_worker.OUTPUT_CAP + 10_000))
    output = worker.exec("/cat big.txt", project)["output"]
    assert output.startswith("x" * 1000) and "[truncated: showing the first 256 KiB" in output
    assert len(output) < slash_worker.OUTPUT_CAP + 200


def test_ls_lists_the_directory(worker: Worker, project: Path) -> None:
    output = worker.exec("/ls", project)["output"].splitlines()
    assert [line.split()[-1] for line in output] == ["escape@", "notes.txt", "secret.env", "src/"]
    assert worker.exec("/ls ..", project)["ok"] is False


def test_status_formats_the_snapshot(worker: Worker, project: Path) -> None:
    snapshot = {"agent": "echo", "worker_pid": 4242, "uptime_s": 3725.4, "turns": 3, "last_seq": 57}
    output = worker.exec("/status", project, snapshot)["output"]
    for line in ("agent: echo", "worker pid: 4242", "uptime: 1h 02m 05s", "turns: 3", "last seq: 57"):
        assert line in output.splitlines()


def test_unknown_command_names_it_and_suggests_help(worker: Worker, project: Path) -> None:
    reply = worker.exec("/frobnicate now", project)
    assert reply["ok"] is False
    assert "/frobnicate" in reply["output"] and "/help" in reply["output"]


def test_entry_point_commands_are_loaded_but_cannot_shadow_builtins(tmp_path: Path, project: Path) -> None:
    plugins = install_test_plugin(tmp_path / "plugins")
    w = Worker(os.getpid(), env={"PYTHONPATH": str(plugins)})
    try:
        help_text = w.exec("/help", project)["output"]
        assert "sleep for N seconds (test plugin)" in help_text
        assert "/shout WORDS" in help_text
        assert "/broken  unavailable: ModuleNotFoundError" in help_text
        assert w.exec("/shout hi there", project)["output"] == "HI THERE"
        broken = w.exec("/broken", project)
        assert broken["ok"] is False and "failed to load" in broken["output"]
    finally:
        w.stop()


# Parent death ----------------------------------------------------------------------------------------------


def test_eof_on_requests_ends_the_group(worker: Worker, project: Path) -> None:
    assert worker.exec("/help", project)["ok"]
    assert len(pgid_members(worker.pid)) == 2  # the worker and its watchdog
    worker.stdin.close()
    wait_for(lambda: not pgid_members(worker.pid), 3.0, what="the worker's group to end after EOF")


def test_parent_death_ends_the_group_even_while_a_command_holds_the_gil(project: Path) -> None:
    stand_in = subprocess.Popen(["sleep", "60"])  # plays the gateway, so its death can be staged
    w = Worker(stand_in.pid)
    try:
        (project / "evil.txt").write_text("a" * 40 + "b\n")
        assert w.exec("/help", project)["ok"] is True  # start-up is over
        worker = kept_child(w.pid)  # the keeper's child runs the commands
        idle_cpu = cpu_seconds(worker)
        w.stdin.write(control_frame("exec", {"id": 1, "command": "/grep '(a+)+$' evil.txt", "cwd": str(project),
                                             "snapshot": {}}))
        w.stdin.flush()
        wait_for(lambda: cpu_seconds(worker) - idle_cpu > 0.2, 10.0, what="the regex to be in flight")
        stand_in.kill()
        stand_in.wait()
        wait_for(lambda: not pgid_members(w.pid), 2.0, what="the worker's group to end after its parent died")
    finally:
        stand_in.kill()
        w.stop()


def test_being_reparented_is_not_mistaken_for_parent_death(project: Path) -> None:
    w = Worker(os.getpid(), launcher=True)
    try:
        assert psutil.Process(w.pid).ppid() != os.getpid()  # the launcher exited: re-parented
        wait_for(lambda: len(pgid_members(w.pid)) == 2, 10.0, what="the worker and its keeper to start")
        observe_until = time.monotonic() + 0.5  # ten watchdog periods
        while time.monotonic() < observe_until:
            assert len(pgid_members(w.pid)) == 2
            time.sleep(0.05)
        assert w.exec("/help", project)["ok"] is True
    finally:
        w.stop()
