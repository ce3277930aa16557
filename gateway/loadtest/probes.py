"""What runs beside the sessions to measure and disturb them: the ping process, the ``/healthz`` sampler,
the chaos monkey and the ``/metrics`` reader."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import sys
import threading
import time
import urllib.error
from typing import TYPE_CHECKING

from gateway.client import GatewayClient, GatewayError, ReconnectPolicy
from gateway.client.spawn import child_env
from gateway.loadtest.target import http_get

if TYPE_CHECKING:
    from gateway.loadtest.run import RunState


async def pinger(state: RunState) -> None:
    """Measure app-level ping round trips from a separate process.

    The load test's own loop is busy decoding tens of MB/s of events; pinging from it would measure the
    load test as much as the gateway.  The child process does nothing but ping, so its numbers are the
    gateway's (plus the kernel's).  It prints ``<monotonic time> <ms>`` (or ``fail``) per ping and exits
    when its stdin closes.
    """
    env = child_env()
    if state.target.token:
        env[_PINGER_TOKEN_ENV] = state.target.token  # not on the command line, where ps would show it
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _PINGER_CODE,
        state.target.ws_url,
        repr(state.args.ping_interval),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None

    async def read() -> None:
        assert proc.stdout is not None
        async for line in proc.stdout:
            fields = line.decode(errors="replace").split()
            if len(fields) != 2:
                continue
            if fields[1] == "fail":
                state.ping_failures += 1
                continue
            with contextlib.suppress(ValueError):
                state.pings.append((float(fields[0]) - state.started, float(fields[1])))

    reader = asyncio.get_running_loop().create_task(read())
    try:
        await state.done.wait()
    finally:
        proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 10.0)
        except TimeoutError:
            proc.kill()
            await proc.wait()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(reader, 5.0)
        errors = (await proc.stderr.read()).decode(errors="replace").strip()
        if proc.returncode != 0:
            state.errors.append(f"pinger exited with status {proc.returncode}: {errors[-500:]}")


_PINGER_TOKEN_ENV = "WORKER_GATEWAY_LOADTEST_TOKEN"
_PINGER_CODE = "import sys; from gateway.loadtest.probes import pinger_child; sys.exit(pinger_child(sys.argv[1:]))"


def pinger_child(argv: list[str]) -> int:
    """Entry point of the ping process (see :func:`_pinger`): ``URL INTERVAL``; token from the environment."""
    url, interval = argv[0], float(argv[1])
    token = os.environ.get(_PINGER_TOKEN_ENV)
    try:
        asyncio.run(_ping_loop(url, token, interval))
    except (GatewayError, OSError) as exc:
        print(f"pinger: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


async def _ping_loop(url: str, token: str | None, interval: float) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    # stdin EOF (the parent closed it, or died) ends the loop.
    threading.Thread(target=lambda: (sys.stdin.buffer.read(), loop.call_soon_threadsafe(stop.set)), daemon=True).start()
    async with GatewayClient(url, token=token, reconnect=ReconnectPolicy(max_time=60.0, max_attempts=100)) as client:
        while not stop.is_set():
            sent = time.monotonic()
            try:
                await client.request("gateway.ping", timeout=10.0)
                line = f"{sent:.6f} {(time.monotonic() - sent) * 1000.0:.3f}"
            except GatewayError:
                line = f"{sent:.6f} fail"
            print(line, flush=True)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, interval - (time.monotonic() - sent)))


async def sampler(state: RunState) -> None:
    interval = state.args.sample_interval
    last_bytes, last_t = 0, state.elapsed()
    while not state.done.is_set():
        try:
            health = json.loads(await asyncio.to_thread(http_get, state.target, "/healthz"))
            health["t"] = state.elapsed()
            state.health.append(health)
        except (OSError, ValueError) as exc:
            if len(state.errors) < 50:
                state.errors.append(f"/healthz: {exc}")
        if state.target.pid is not None:
            count = await asyncio.to_thread(_count_descendants, state.target.pid)
            if count is not None:
                state.process_peak = max(state.process_peak or 0, count)
        now, total = state.elapsed(), state.bytes_received()
        if now > last_t:
            state.throughput.append((now, (total - last_bytes) / (now - last_t) / 1e6))
        last_bytes, last_t = total, now
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(state.done.wait(), interval)


def _count_descendants(pid: int) -> int | None:
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil is a dependency
        return None
    try:
        return len(psutil.Process(pid).children(recursive=True))
    except psutil.Error:
        return None


async def chaos(state: RunState, rng: random.Random) -> None:
    """Abort a random session connection that is mid-turn, at exponentially distributed intervals."""
    while not state.done.is_set():
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(state.done.wait(), rng.expovariate(1.0 / state.args.chaos_interval))
        if state.done.is_set():
            return
        candidates = [
            s.client for s in state.sessions if s.phase == "turn" and s.client is not None and s.client.connected
        ]
        if candidates:
            rng.choice(candidates).abort()


async def metrics_text(state: RunState) -> str | None:
    try:
        return await asyncio.to_thread(http_get, state.target, "/metrics", True)
    except (OSError, urllib.error.URLError) as exc:
        state.errors.append(f"/metrics: {exc}")
        return None
