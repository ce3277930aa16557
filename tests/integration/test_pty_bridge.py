"""pty_bridge: query stripping and size clamping (pure), spawn/terminate and the warden (real processes)."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from hypothesis import given
from hypothesis import strategies as st

import pty_bridge
from gateway.terminals.queries import strip_terminal_queries
from pty_bridge import PtyProcess, clamp_size, default_argv, terminal_env

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="pseudo-terminals are POSIX only")

BASH = shutil.which("bash")
QUERIES = [
    b"\x1b[5n", b"\x1b[6n", b"\x1b[?6n", b"\x1b[?996n", b"\x1b[c", b"\x1b[0c", b"\x1b[>c", b"\x1b[>0c",
    b"\x1b[=c", b"\x1b[>q", b"\x1b[?2026$p", b"\x1b[4$p", b"\x1b[18t", b"\x1b[14;2t", b"\x1b[?u", b"\x05",
    b"\x1b]10;?\x07", b"\x1b]11;?\x1b\\", b"\x1b]4;1;?\x07", b"\x1b]52;c;?\x07", b"\x1bP$qm\x1b\\",
    b"\x1bP+q544e\x1b\\",
]
KEPT = [b"\x1b[31m", b"\x1b[2J", b"\x1b[H", b"\x1b[?2004h", b"\x1b[8;24;80t", b"\x1b]0;title\x07", b"\x1b[1;1H"]


# Pure helpers ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("query", QUERIES)
def test_each_terminal_query_is_stripped(query: bytes) -> None:
    assert strip_terminal_queries(b"before" + query + b"after") == b"beforeafter"


@pytest.mark.parametrize("sequence", KEPT)
def test_ordinary_control_sequences_are_kept(sequence: bytes) -> None:
    data = b"x" + sequence + b"y"
    assert strip_terminal_queries(data) == data


def test_incomplete_query_at_the_end_is_kept_because_its_tail_is_still_live() -> None:
    assert strip_terminal_queries(b"prompt\x1b[") == b"prompt\x1b["


@given(st.lists(st.one_of(st.binary(max_size=20).map(
    lambda b: b.replace(b"\x1b", b"").replace(b"\x05", b"").replace(b"\x9b", b"")),
                          st.sampled_from(QUERIES)), max_size=30))
def test_stripping_removes_every_query_and_keeps_all_text(parts: list[bytes]) -> None:
    text = b"".join(p for p in parts if p not in QUERIES)
    assert strip_terminal_queries(b"".join(parts)) == text


def test_clamp_size_bounds() -> None:
    assert clamp_size(0, 0) == (1, 1)
    assert clamp_size(5000, 5000) == (2000, 1000)
    assert clamp_size(120, 40) == (120, 40)


def test_default_argv_prefers_shell_then_falls_back() -> None:
    assert default_argv({"SHELL": "/bin/sh"}) == ["/bin/sh"]
    assert default_argv({"SHELL": "/nonexistent/shell"}) == ["/bin/sh"]


def test_terminal_env_sets_term_and_hides_the_token() -> None:
    env = terminal_env({"WORKER_GATEWAY_TOKEN": "secret", "PATH": "/bin"})
    assert env["TERM"] == "xterm-256color" and "WORKER_GATEWAY_TOKEN" not in env
    assert terminal_env({"TERM": "screen"})["TERM"] == "screen"


# Real processes ----------------------------------------------------------------------------------------


class Screen:
    """Reads a PTY master on the loop, as the gateway does, and waits for patterns with a deadline."""

    def __init__(self, pty: PtyProcess) -> None:
        self.pty = pty
        self.data = bytearray()
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(pty.master_fd, self._read)

    def _read(self) -> None:
        try:
            chunk = os.read(self.pty.master_fd, 65536)
        except OSError:
            chunk = b""
        if not chunk:
            self._loop.remove_reader(self.pty.master_fd)
        self.data += chunk

    def type(self, text: str) -> None:
        os.write(self.pty.master_fd, text.encode())

    async def expect(self, pattern: bytes, timeout: float = 10.0) -> re.Match[bytes]:
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, bytes(self.data))
            if match:
                return match
            if time.monotonic() > deadline:
                raise AssertionError(f"{pattern!r} not seen within {timeout}s; got {bytes(self.data[-400:])!r}")
            await asyncio.sleep(0.02)

    def close(self) -> None:
        self._loop.remove_reader(self.pty.master_fd)
        self.pty.close_master()


def live(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


async def test_the_program_starts_with_no_signal_ignored(tmp_path: Path) -> None:
    """Its keeper ignores terminal signals (and Python ignores SIGPIPE); none of that reaches the program."""
    pty = await PtyProcess.spawn(["/bin/sh", "-c", "grep SigIgn /proc/self/status; sleep 60"], cwd=str(tmp_path))
    screen = Screen(pty)
    try:
        match = await screen.expect(rb"SigIgn:\s*([0-9a-f]+)")
        # Signals 32 and 33 are glibc's own (thread cancellation, setxid): no program sets them, and
        # Python cannot reset them; a C extension loaded in this test process may have ignored them.
        glibc_reserved = (1 << 31) | (1 << 32)
        assert int(match.group(1), 16) & ~glibc_reserved == 0, match.group(0)
        assert psutil.Process(pty.program_pid).ppid() == pty.pid  # the program is the keeper's child
    finally:
        await pty.terminate()
        screen.close()


@pytest.mark.skipif(BASH is None, reason="needs bash for job control")
async def test_terminate_ends_background_jobs_in_their_own_process_groups(tmp_path: Path) -> None:
    pty = await PtyProcess.spawn([BASH, "--norc", "--noprofile", "-i"], cwd=str(tmp_path), cols=90, rows=20)
    screen = Screen(pty)
    try:
        # The second job leaves the session (setsid) but stays a descendant: teardown tracks it too.
        screen.type("stty size; sleep 300 & echo BG=$!; sh -c 'setsid sleep 301 & echo ESC=$!; wait' &\n")
        await screen.expect(rb"[\r\n]20 90\r\n")
        bg = int((await screen.expect(rb"BG=(\d+)")).group(1))
        escaped = int((await screen.expect(rb"ESC=(\d+)")).group(1))
        deadline = time.monotonic() + 5.0
        while os.getsid(escaped) != escaped:  # $! is printed before the child has run setsid
            assert time.monotonic() < deadline, "the escaping job never left the session"
            await asyncio.sleep(0.01)
        assert os.getpgid(bg) != pty.pid, "job control should give the job its own process group"
        assert os.getsid(bg) == pty.pid
        started = time.monotonic()
        await pty.terminate()
        assert time.monotonic() - started < 3.0
        assert live([pty.pid, bg, escaped]) == []
        assert pty_bridge.session_processes(pty.pid) == []
    finally:
        screen.close()
        await pty.terminate()


async def test_terminate_escalates_to_sigkill_for_a_program_ignoring_hup_and_term(tmp_path: Path) -> None:
    script = "trap '' HUP TERM; echo READY; while :; do sleep 1; done"
    pty = await PtyProcess.spawn(["/bin/sh", "-c", script], cwd=str(tmp_path))
    screen = Screen(pty)
    try:
        await screen.expect(b"READY")
        started = time.monotonic()
        code = await pty.terminate(step_s=0.2)
        assert code == -signal.SIGKILL
        assert 0.3 < time.monotonic() - started < 3.0
        assert pty_bridge.session_processes(pty.pid) == []
    finally:
        screen.close()


async def test_spawn_of_a_missing_program_raises_and_leaks_no_fd(tmp_path: Path) -> None:
    before = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    with pytest.raises(FileNotFoundError):
        await PtyProcess.spawn(["/nonexistent/program"], cwd=str(tmp_path))
    if before is not None:
        assert len(os.listdir("/proc/self/fd")) == before


async def test_warden_ends_watched_sessions_when_its_parent_dies(tmp_path: Path) -> None:
    """The warden's parent here is a stand-in process, so its death can be staged without killing the test."""
    stand_in = subprocess.Popen(["sleep", "60"])
    warden = subprocess.Popen([sys.executable, pty_bridge.__file__, "--warden", "--parent-pid", str(stand_in.pid),
                               "--poll", "0.05"], stdin=subprocess.PIPE, start_new_session=True)
    pty = await PtyProcess.spawn(["/bin/sh", "-c", "trap '' HUP; sleep 300 & echo READY; wait"], cwd=str(tmp_path))
    screen = Screen(pty)
    try:
        await screen.expect(b"READY")
        assert warden.stdin is not None
        warden.stdin.write(f"+{pty.pid}\n".encode())
        warden.stdin.flush()
        assert len(pty_bridge.session_processes(pty.pid)) == 3  # keeper, sh, sleep
        stand_in.kill()
        stand_in.wait()
        await asyncio.wait_for(pty.wait(), 5.0)
        deadline = time.monotonic() + 5.0
        while pty_bridge.session_processes(pty.pid) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert pty_bridge.session_processes(pty.pid) == []
        assert warden.wait(5) == 0
    finally:
        screen.close()
        await pty.terminate()
        if warden.poll() is None:
            warden.kill()
            warden.wait()


async def test_warden_exits_on_eof_and_leaves_forgotten_sessions_alone(tmp_path: Path) -> None:
    warden = subprocess.Popen([sys.executable, pty_bridge.__file__, "--warden", "--parent-pid", str(os.getpid())],
                              stdin=subprocess.PIPE, start_new_session=True)
    pty = await PtyProcess.spawn(["/bin/sh", "-c", "echo READY; sleep 300"], cwd=str(tmp_path))
    screen = Screen(pty)
    try:
        await screen.expect(b"READY")
        assert warden.stdin is not None
        warden.stdin.write(f"+{pty.pid}\n-{pty.pid}\n".encode())
        warden.stdin.close()
        assert warden.wait(5) == 0
        assert live([pty.pid]) == [pty.pid]
    finally:
        screen.close()
        await pty.terminate()
