"""gateway/slash.py: SlashRunner drives a real slash worker from the test's event loop."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path
from typing import AsyncIterator

import psutil
import pytest

from gateway.config import Config
from gateway.slash import SlashRunner, SlashState
from support import async_wait_for, pgid_members
from worker_helpers import cpu_seconds, kept_child
from test_slash_worker import FAKE_TOKEN, install_test_plugin

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="process groups are POSIX only")

SNAPSHOT = {"agent": "echo", "worker_pid": 1234, "uptime_s": 12.0, "turns": 1, "last_seq": 7}


class LagProbe:
    """Measures the longest stall of the event loop while it runs (the loop must only relay)."""

    def __init__(self, period: float = 0.01) -> None:
        self.period = period
        self.worst = 0.0
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            start = time.monotonic()
            await asyncio.sleep(self.period)
            self.worst = max(self.worst, time.monotonic() - start - self.period)

    async def stop(self) -> float:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        return self.worst


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    root.mkdir()
    (root / "config.py").write_text(f"API = 'https://api.example'\nKEY = '{FAKE_TOKEN}'\n")
    (root / "evil.txt").write_text("a" * 40 + "b\n")  # catastrophic for (a+)+$
    return root


@pytest.fixture
async def runner_factory(project: Path) -> AsyncIterator:  # type: ignore[type-arg]
    made: list[SlashRunner] = []

    def make(**overrides: float) -> SlashRunner:
        runner = SlashRunner(Config(watchdog_poll_s=0.05, kill_grace_s=0.5, worker_nice=0, **overrides),
                             str(project))
        made.append(runner)
        return runner

    yield make
    for runner in made:
        await runner.close()


async def test_help_starts_one_worker_in_its_own_process_group(runner_factory) -> None:  # type: ignore[no-untyped-def]
    runner = runner_factory()
    assert runner.pid is None and runner.state is SlashState.IDLE
    reply = await runner.exec("/help", SNAPSHOT)
    assert reply["ok"] is True and "/grep PATTERN [PATH]" in reply["output"]
    pid = runner.pid
    assert pid is not None and os.getpgid(pid) == pid and os.getsid(pid) == pid
    assert (await runner.exec("/status", SNAPSHOT))["output"].startswith("agent: echo\nworker pid: 1234")
    assert runner.pid == pid  # persistent: one worker per session


async def test_grep_redacts_and_cat_outside_is_refused(runner_factory) -> None:  # type: ignore[no-untyped-def]
    runner = runner_factory()
    grep = await runner.exec("/grep KEY", SNAPSHOT)
    assert grep == {"ok": True, "output": "config.py:2:KEY = '[REDACTED]'"}
    cat = await runner.exec("/cat ../../etc/passwd", SNAPSHOT)
    assert cat["ok"] is False and "outside the session directory" in cat["output"]


async def test_timeout_kills_the_group_and_the_next_command_gets_a_fresh_worker(
        runner_factory) -> None:  # type: ignore[no-untyped-def]
    runner = runner_factory(slash_timeout_s=1.0)
    assert (await runner.exec("/help", SNAPSHOT))["ok"]
    first_pid = runner.pid
    assert first_pid is not None
    probe = LagProbe()
    started = time.monotonic()
    reply = await runner.exec("/grep '(a+)+$' evil.txt", SNAPSHOT)  # holds the worker's GIL for minutes
    elapsed = time.monotonic() - started
    assert await probe.stop() < 0.25, "the gateway's loop stalled while a slash command ran"
    assert reply["ok"] is False
    assert reply["output"] == ("/grep timed out after 1 s; its slash worker was stopped "
                               "(the next command starts a fresh one)")
    assert 1.0 <= elapsed < 3.0
    assert pgid_members(first_pid) == []
    again = await runner.exec("/help", SNAPSHOT)
    assert again["ok"] is True
    assert runner.pid not in (None, first_pid)


async def test_a_plugin_command_that_sleeps_past_the_timeout(runner_factory, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("PYTHONPATH", str(install_test_plugin(tmp_path / "plugins")))
    runner = runner_factory(slash_timeout_s=0.5)
    started = time.monotonic()
    reply = await runner.exec("/nap 30", SNAPSHOT)
    assert time.monotonic() - started < 0.5 + 2.0
    assert reply["ok"] is False and "/nap timed out after 0.5 s" in reply["output"]
    assert (await runner.exec("/nap 0", SNAPSHOT)) == {"ok": True, "output": "rested"}


async def test_a_crashing_worker_is_reported_and_replaced(runner_factory, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("PYTHONPATH", str(install_test_plugin(tmp_path / "plugins")))
    runner = runner_factory()
    reply = await runner.exec("/crash", SNAPSHOT)
    assert reply["ok"] is False and "exit code 3" in reply["output"]
    assert runner.pid is None
    assert (await runner.exec("/help", SNAPSHOT))["ok"] is True


async def test_a_process_a_command_left_in_its_own_session_ends_with_close(
        runner_factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("PYTHONPATH", str(install_test_plugin(tmp_path / "plugins")))
    marker = f"6001.{os.getpid()}{int(time.monotonic() * 1000) % 100000}"
    runner = runner_factory()
    assert (await runner.exec(f"/escape {marker}", SNAPSHOT)) == {"ok": True, "output": "escaped"}

    def escaped() -> list[psutil.Process]:
        return [p for p in psutil.process_iter(["cmdline", "status"])
                if p.info["status"] != psutil.STATUS_ZOMBIE and marker in (p.info["cmdline"] or [])]

    await async_wait_for(escaped, 10.0, what="the escaped sleep")
    assert all(os.getsid(p.pid) != runner.pid for p in escaped())  # it left the worker's session
    await runner.close()
    await async_wait_for(lambda: not escaped(), 10.0, what="the escaped sleep to end with the worker")


async def test_close_ends_the_group_is_idempotent_and_refuses_later_commands(
        runner_factory) -> None:  # type: ignore[no-untyped-def]
    runner = runner_factory()
    await runner.exec("/help", SNAPSHOT)
    pid = runner.pid
    assert pid is not None and len(pgid_members(pid)) == 2  # worker + watchdog
    await runner.close()
    assert pgid_members(pid) == [] and runner.pid is None and runner.state is SlashState.CLOSED
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    await runner.close()
    reply = await runner.exec("/help", SNAPSHOT)
    assert reply["ok"] is False and "closing" in reply["output"]


async def test_close_during_a_running_command_answers_it_at_once(runner_factory) -> None:  # type: ignore[no-untyped-def]
    runner = runner_factory(slash_timeout_s=30.0)
    await runner.exec("/help", SNAPSHOT)
    pid = runner.pid
    assert pid is not None
    worker = kept_child(pid)  # the keeper's child runs the commands
    idle_cpu = cpu_seconds(worker)  # start-up and /help are done: only the regex can add to this
    running = asyncio.create_task(runner.exec("/grep '(a+)+$' evil.txt", SNAPSHOT))
    await async_wait_for(lambda: cpu_seconds(worker) - idle_cpu > 0.2, 10.0, what="the regex to be in flight")
    started = time.monotonic()
    await runner.close()
    reply = await asyncio.wait_for(running, 5.0)
    assert time.monotonic() - started < 3.0
    assert reply == {"ok": False, "output": "the session closed while /grep was running"}
    assert pgid_members(pid) == []
