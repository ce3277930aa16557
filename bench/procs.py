"""Servers under test as subprocesses (the gateway and the baseline app), and process measurements.

Each server is started the way a user starts it, reports its port on a ready line, and is stopped by its
pid (SIGTERM, then SIGKILL): a benchmark never signals anything it did not start.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psutil
from prometheus_client.parser import text_string_to_metric_families

from gateway.client.spawn import ReadyLineProcess, SpawnError, gateway_command
from gateway.wire import READY_LINE_PREFIX

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "bench-token"
PING = ("2", "2")  # protocol keepalive, seconds: interval and timeout, on both sides


class ServerProcess(ReadyLineProcess):
    """A server subprocess that prints ``<READY_PREFIX> port=N`` on stdout once it accepts connections
    (the shared spawn helper, ``gateway.client.spawn``), plus the benchmarks' HTTP helpers."""

    def __init__(self, argv: list[str], ready_prefix: str, name: str) -> None:
        super().__init__(argv, ready_prefix=ready_prefix, name=name, cwd=ROOT)
        self.port = 0

    @classmethod
    def gateway(cls, *extra: str, ping: bool = True) -> ServerProcess:
        argv = gateway_command("--log-level", "warning", *extra, token=TOKEN)
        if ping:
            argv += ["--ws-ping-interval", PING[0], "--ws-ping-timeout", PING[1]]
        return cls(argv, READY_LINE_PREFIX, "worker-gateway")

    @classmethod
    def baseline(cls, *extra: str) -> ServerProcess:
        argv = [sys.executable, "-m", "bench.baseline_app", "--port", "0",
                "--ws-ping-interval", PING[0], "--ws-ping-timeout", PING[1]]
        return cls(argv + list(extra), "BASELINE_READY", "in-process baseline")

    @classmethod
    def floor(cls) -> ServerProcess:
        """The pipe-hop floor (``bench.floor_app``): a relay with the worker's pipe hop and nothing else."""
        return cls([sys.executable, "-m", "bench.floor_app", "--port", "0"], "FLOOR_READY", "pipe-hop floor")

    def start(self, timeout: float = 60.0) -> ServerProcess:
        try:
            super().start(timeout)
        except SpawnError as exc:
            raise RuntimeError(f"{self.name} did not start: {exc}") from None
        return self

    def ws_url(self, path: str = "/ws") -> str:
        return f"ws://127.0.0.1:{self.port}{path}?token={TOKEN}"

    def http_url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self, timeout: float = 20.0) -> None:  # type: ignore[override]
        """SIGTERM (the gateway's graceful shutdown ends every worker group), SIGKILL if it hangs; then
        make sure no process it started outlives it."""
        if self.proc is None:
            return
        started = descendants(self.proc.pid)
        super().stop(grace=timeout)
        leftover = _wait_gone(started, 5.0)
        for p in leftover:  # only processes this server started
            with contextlib.suppress(psutil.Error):
                p.kill()
        if leftover:
            print(f"warning: {len(leftover)} process(es) outlived {self.name}", file=sys.stderr)

    def __enter__(self) -> ServerProcess:
        return self.start() if self.proc is None else self

    # HTTP ----------------------------------------------------------------------------------------------------
    def get(self, path: str, timeout: float = 60.0) -> str:
        request = urllib.request.Request(self.http_url(path), headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read().decode()

    async def aget(self, path: str, timeout: float = 60.0) -> str:
        return await asyncio.to_thread(self.get, path, timeout)

    async def metrics(self, timeout: float = 60.0) -> dict[str, Any]:
        """``/metrics`` as {sample name: value} for unlabelled samples, and histogram buckets as
        {"<hist>_bucket": [(le, cumulative count), ...]}."""
        text = await self.aget("/metrics", timeout)
        out: dict[str, Any] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name.endswith("_bucket"):
                    out.setdefault(s.name, []).append((float(s.labels["le"]), s.value))
                elif not s.labels:
                    out[s.name] = s.value
                else:
                    key = s.name + "{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) + "}"
                    out[key] = s.value
        return out


# Processes ----------------------------------------------------------------------------------------------------
def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
    return out


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while True:
        left = _alive(procs)
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.05)


def group_members(pgid: int) -> list[int]:
    """Pids of the live processes in process group ``pgid`` (a scan of /proc: call it once, not in a loop)."""
    members = []
    for pid in psutil.pids():
        with contextlib.suppress(OSError):
            if os.getpgid(pid) == pgid and not _dead(pid):
                members.append(pid)
    return members


def groups(pgids: list[int]) -> dict[int, list[int]]:
    """Live members of each of ``pgids``, from one scan of /proc."""
    wanted = set(pgids)
    out: dict[int, list[int]] = {pgid: [] for pgid in pgids}
    for pid in psutil.pids():
        with contextlib.suppress(OSError):
            pgid = os.getpgid(pid)
            if pgid in wanted and not _dead(pid):
                out[pgid].append(pid)
    return out


def all_dead(pids: list[int]) -> bool:
    """True once every one of ``pids`` has exited.  A zombie counts as exited: it runs nothing, and whether
    it is reaped at once depends on its parent (for a worker's watchdog, on whatever adopted it)."""
    return all(_dead(pid) for pid in pids)


def _dead(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return True
    state = stat[stat.rindex(b")") + 2:stat.rindex(b")") + 3]
    return state in (b"Z", b"X", b"x")


def rss(pid: int) -> int:
    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return 0


def uss(pids: list[int]) -> list[int]:
    """Unique set size of each process (memory freed if it exited): the honest per-worker cost."""
    out = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            out.append(psutil.Process(pid).memory_full_info().uss)
    return out


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
    return total


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except (urllib.error.URLError, OSError):
        return False


def cpu_snapshot(pids: list[int]) -> tuple[float, float]:
    """(on-CPU seconds from the threads' ``schedstat``, nanosecond resolution; the same from psutil
    ``cpu_times``, clock-tick resolution) of ``pids``, for ``cpu_delta``."""
    precise = 0.0
    for pid in pids:
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError, ValueError, IndexError):
                    with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                        precise += int(f.read().split()[0]) / 1e9
        except OSError:
            pass
    return precise, cpu_seconds(pids)


def cpu_delta(before: tuple[float, float], after: tuple[float, float]) -> float:
    """CPU seconds between two ``cpu_snapshot``s.  The 10 ms clock tick of ``cpu_times`` is too coarse for
    a transfer of a fraction of a second, so the per-thread figure is used, unless a thread exited in
    between (its time leaves the per-thread sum, not the process's ``cpu_times``): then ``cpu_times``."""
    precise, coarse = after[0] - before[0], after[1] - before[1]
    tick = 1.0 / os.sysconf("SC_CLK_TCK")
    return precise if precise > 0 and abs(precise - coarse) <= 2 * tick + 0.05 * coarse else coarse


def keeper_of(worker_pid: int) -> int:
    """The session keeper above a worker (``workers/keeper.py``: the worker's parent, a session leader, in a
    group of its own), or 0 when the worker has none (its watchdog, if any, is then in its group)."""
    try:
        parent = psutil.Process(worker_pid).ppid()
        return parent if parent > 1 and os.getsid(parent) == parent else 0
    except (psutil.Error, OSError):
        return 0


def session_processes(worker_pids: list[int]) -> dict[int, list[int]]:
    """For each worker: every process of its session at rest, its group's members and its keeper (one scan
    of /proc for all of them)."""
    members = groups(worker_pids)
    out = {}
    for pid in worker_pids:
        keeper = keeper_of(pid)
        out[pid] = members[pid] + ([keeper] if keeper and keeper not in members[pid] else [])
    return out
