"""Helpers shared by the benchmarks: servers as async context managers, loop-lag windows, timing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

import psutil

from bench.procs import ServerProcess, descendants
from bench.stats import Buckets, bucket_delta, histogram_max_bound, histogram_quantile

LAG_HISTOGRAM = "wg_loop_lag_seconds_bucket"


@contextlib.asynccontextmanager
async def running(server: ServerProcess) -> AsyncIterator[ServerProcess]:
    await asyncio.to_thread(server.start)
    try:
        yield server
    finally:
        await asyncio.to_thread(server.stop)


@contextlib.asynccontextmanager
async def running_gateway(*args: str, store: bool = True, ping: bool = True) -> AsyncIterator[ServerProcess]:
    """A gateway with its store on in a temporary state dir that is removed afterwards (a relay run
    writes gigabytes into it), or with ``--no-state``."""
    state_dir = tempfile.mkdtemp(prefix="bench-state-") if store else None
    flags = [f"--state-dir={state_dir}"] if state_dir else ["--no-state"]
    try:
        async with running(ServerProcess.gateway(*flags, *args, ping=ping)) as server:
            yield server
    finally:
        if state_dir:
            shutil.rmtree(state_dir, ignore_errors=True)


WRITER_MODULE = "gateway.store.writer_main"


def writer_pid(gateway_pid: int) -> int:
    """The store's writer process among the gateway's descendants (0 if none: ``--no-state``)."""
    for proc in descendants(gateway_pid):
        with contextlib.suppress(psutil.Error):
            if WRITER_MODULE in " ".join(proc.cmdline()):
                return proc.pid
    return 0


@dataclass(frozen=True)
class LagWindow:
    """Loop lag observed by the server's own monitor between two scrapes of its histogram."""

    p50: float
    p99: float
    max: float
    samples: int
    buckets: Buckets = field(default_factory=list)  # the histogram delta itself, to pool windows


async def lag_buckets(server: ServerProcess, timeout: float = 120.0) -> Buckets:
    return (await server.metrics(timeout))[LAG_HISTOGRAM]


async def lag_window(server: ServerProcess, before: Buckets, timeout: float = 120.0) -> LagWindow:
    """p50/p99 interpolated from the histogram delta (as Prometheus' histogram_quantile); max is the
    monitor's recent-window max (``/healthz``), capped by the highest non-empty bucket of the delta so that
    a spike from before the window cannot leak in."""
    after = await lag_buckets(server, timeout)
    delta = bucket_delta(after, before)
    health = json.loads(await server.aget("/healthz", timeout))
    recent_max = float(health.get("loop_lag_ms", math.nan)) / 1000.0
    bound = histogram_max_bound(delta)
    worst = min(recent_max, bound) if not math.isnan(recent_max) else bound
    return LagWindow(histogram_quantile(0.5, delta), histogram_quantile(0.99, delta), worst,
                     int(delta[-1][1]) if delta else 0, delta)


async def wait_until(predicate, timeout: float, interval: float = 0.05, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(interval)


async def pool_ready(server: ServerProcess) -> float:
    return (await server.metrics()).get("wg_warm_pool_ready", 0.0)
