"""3. Session start: ``session.create`` → ready, from the warm pool vs a cold start (``--pool-size 0``).

Two gateways run side by side; creates alternate between them (one each, order swapped every time).
Before a warm create the pool is given time to refill, so every warm sample really takes a pooled worker.
The cold gateway forks each worker from the forkserver on demand (no Python start-up either way: that is
the forkserver's job); a fresh interpreter that imports the worker code is shown for reference.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

from bench.common import pool_ready, running_gateway, wait_until
from bench.procs import ROOT, ServerProcess
from bench.report import Goal, Options, Section, ms, table
from bench.stats import percentile
from bench.wsclient import BenchClient
from gateway.config import Config

KEY = "start"
POOL = 2


async def _create(client: BenchClient) -> float:
    started = time.perf_counter()
    result = await client.call("session.create", agent="echo")
    elapsed = time.perf_counter() - started
    await client.call("session.close", session_id=result["session_id"])
    return elapsed


def _python_startup() -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import workers.worker_main, workers.agents.echo"], cwd=ROOT, check=True)
    return time.perf_counter() - started


async def run(opts: Options) -> Section:
    samples = 8 if opts.quick else 60
    started = time.perf_counter()
    warm: list[float] = []
    cold: list[float] = []
    warm_nostate: list[float] = []
    # Store on (as users run it) for the goal's two sides; a warm `--no-state` gateway shows what the store
    # adds to a create (the session's row is written at session.create).
    async with running_gateway("--pool-size", str(POOL), ping=False) as warm_gw, \
            running_gateway("--pool-size", "0", ping=False) as cold_gw, \
            running_gateway("--pool-size", str(POOL), store=False, ping=False) as nostate_gw:
        warm_client = await BenchClient.open(warm_gw.ws_url())
        cold_client = await BenchClient.open(cold_gw.ws_url())
        nostate_client = await BenchClient.open(nostate_gw.ws_url())
        try:
            for client in (warm_client, cold_client, nostate_client):
                await _create(client)  # first-use costs (imports, agent registry), not measured
            for i in range(samples):
                await wait_until(lambda: _full(warm_gw), 30, what="the warm pool to refill")
                await wait_until(lambda: _full(nostate_gw), 30, what="the warm pool to refill")
                sides = [(warm, warm_client), (cold, cold_client), (warm_nostate, nostate_client)]
                if i % 2:
                    sides.reverse()
                for into, client in sides:
                    into.append(await _create(client))
        finally:
            await warm_client.close()
            await cold_client.close()
            await nostate_client.close()
    interpreter = [await asyncio.to_thread(_python_startup) for _ in range(max(3, samples // 4))]
    ratio = percentile(warm, 0.5) / percentile(cold, 0.5)
    rows = [
        (f"warm pool (`--pool-size {POOL}`), store on", len(warm), ms(percentile(warm, 0.5)),
         ms(percentile(warm, 0.99)), ms(max(warm))),
        ("cold (`--pool-size 0`: fork from the forkserver), store on", len(cold), ms(percentile(cold, 0.5)),
         ms(percentile(cold, 0.99)), ms(max(cold))),
        (f"warm pool (`--pool-size {POOL}`), `--no-state`", len(warm_nostate), ms(percentile(warm_nostate, 0.5)),
         ms(percentile(warm_nostate, 0.99)), ms(max(warm_nostate))),
        ("reference: a fresh `python` importing the worker code", len(interpreter),
         ms(percentile(interpreter, 0.5)), ms(percentile(interpreter, 0.99)), ms(max(interpreter))),
    ]
    body = "\n\n".join([
        f"{samples} creates on each of three gateways, alternating; `echo` agent; time from sending `session.create` to "
        "its response (the worker has loaded the agent and is ready for a prompt); each session is closed "
        "before the next create.",
        table(("start", "samples", "p50 (ms)", "p99 (ms)", "max (ms)"), rows),
        f"Warm p50 ÷ cold p50 in this run (both with the store on): **{ratio:.2f}**; with the warm `--no-state` "
        f"gateway instead: {percentile(warm_nostate, 0.5) / percentile(cold, 0.5):.2f}.",
    ])
    note = ""
    if ratio > 0.25:
        note = (f"store on vs `--no-state`: {(percentile(warm, 0.5) - percentile(warm_nostate, 0.5)) * 1000:+.1f} ms on a "
                f"warm create's p50 (`--no-state` warm: {ms(percentile(warm_nostate, 0.5))} ms); a cold start is already cheap (a fork of the forkserver, {ms(percentile(cold, 0.5))} ms, vs "
                f"{ms(percentile(interpreter, 0.5))} ms for a fresh interpreter), so the pool saves only the fork; "
                f"both are dominated by scheduling the worker (nice {Config().worker_nice}) on a busy machine")
    goals = [Goal("warm start p50 vs cold start p50", "≤ 0.25×",
                  f"{ratio:.2f}× ({ms(percentile(warm, 0.5))} vs {ms(percentile(cold, 0.5))} ms)", ratio <= 0.25,
                  note)]
    return Section(KEY, "3. Session start", ".venv/bin/python -m bench --only start", body, goals,
                   time.perf_counter() - started)


async def _full(server: ServerProcess) -> bool:
    return await pool_ready(server) >= POOL
