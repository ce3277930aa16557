"""5. Scale: 1, 8, 32, 64 concurrent sessions, each streaming output to its own client connection.

One gateway (defaults: warm pool of 2, up to 64 sessions).  For each level, N connections each create a
``load`` session; once idle, the workers' unique memory (USS) and the gateway's RSS are read; then every
session streams ``output_mb=<total/N> chunk_kb=64`` at once while a separate connection sends
``gateway.ping`` every 250 ms.  Aggregate MiB/s runs from the first submit to the last ``turn.complete``;
loop lag is the delta of the gateway's histogram over that window.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from bench.common import lag_buckets, lag_window, pool_ready, running, wait_until
from bench.procs import ServerProcess, groups, rss, uss
from bench.report import Goal, Options, Section, mib, ms, num, table
from bench.stats import median, percentile
from bench.wsclient import BenchClient

KEY = "scale"
LEVELS = (1, 8, 32, 64)


@dataclass
class Level:
    n: int
    mib_s: float
    seconds: float
    lag_p50: float
    lag_p99: float
    lag_max: float
    ping_p99: float
    gateway_rss_idle: int
    gateway_rss_peak: int
    worker_uss: list[int]
    session_uss: list[int]  # every process of the session's group: the worker and its watchdog


async def one_level(gateway: ServerProcess, n: int, total_mb: float) -> Level:
    clients = await asyncio.gather(*(BenchClient.open(gateway.ws_url()) for _ in range(n)))
    control = await BenchClient.open(gateway.ws_url())
    try:
        created = []
        for i in range(0, n, 8):  # a few at a time, as users arrive
            created += await asyncio.gather(*(c.call("session.create", agent="load") for c in clients[i:i + 8]))
        await wait_until(lambda: _pool_full(gateway), 60, what="the warm pool to refill")
        await asyncio.sleep(0.5)
        pids = [c["worker_pid"] for c in created]
        worker_uss = await asyncio.to_thread(uss, pids)
        members = await asyncio.to_thread(groups, pids)
        session_uss = [sum(await asyncio.to_thread(uss, members[pid])) for pid in pids]
        rss_idle = rss(gateway.pid)
        peak = [rss_idle]
        sampling = True

        async def sample_rss() -> None:
            while sampling:
                peak[0] = max(peak[0], rss(gateway.pid))
                await asyncio.sleep(0.1)

        sampler = asyncio.get_running_loop().create_task(sample_rss())
        per_session = max(total_mb / n, 0.25)
        before = await lag_buckets(gateway)
        control.start_pinging(0.25)
        for c in clients:
            c.reset_counters()
        started = time.perf_counter()
        turns = await asyncio.gather(*(c.submit(s["session_id"], f"output_mb={per_session:g} chunk_kb=64")
                                       for c, s in zip(clients, created)))
        results = await asyncio.wait_for(asyncio.gather(*turns), 900)
        seconds = time.perf_counter() - started
        assert all(r["status"] == "ok" for r in results), results
        lag = await lag_window(gateway, before)
        pings = await control.stop_pinging(grace_s=1.0)
        sampling = False
        await sampler
        total = sum(c.counters.event_bytes for c in clients)
        await asyncio.gather(*(c.call("session.close", session_id=s["session_id"]) for c, s in zip(clients, created)))
        return Level(n, total / seconds / 2**20, seconds, min(lag.p50, lag.max), min(lag.p99, lag.max), lag.max,
                     percentile(pings.rtts, 0.99), rss_idle, peak[0], worker_uss, session_uss)
    finally:
        await asyncio.gather(*(c.close() for c in [*clients, control]), return_exceptions=True)


async def _pool_full(gateway: ServerProcess) -> bool:
    return await pool_ready(gateway) >= 2


async def run(opts: Options) -> Section:
    rounds = opts.pick(3, 1)
    total_mb = 64 if opts.quick else 256
    started = time.perf_counter()
    runs: list[Level] = []
    for r in range(rounds):
        for n in LEVELS:
            # A fresh gateway per level: memory freed after a level stays in the process (Python keeps
            # it), which would otherwise show up as the next level's idle RSS.
            async with running(ServerProcess.gateway(ping=False)) as gateway:
                level = await one_level(gateway, n, total_mb)
                runs.append(level)
                print(f"  scale round {r + 1}/{rounds} N={n}: {level.mib_s:.1f} MiB/s, lag p99 "
                      f"{ms(level.lag_p99)} ms, ping p99 {ms(level.ping_p99)} ms", flush=True)
    rows = []
    all_uss: list[int] = []
    all_session_uss: list[int] = []
    for n in LEVELS:
        mine = [x for x in runs if x.n == n]
        uss_all = [u for x in mine for u in x.worker_uss]
        session_all = [u for x in mine for u in x.session_uss]
        all_uss += uss_all
        all_session_uss += session_all
        rows.append((n, num(median([x.mib_s for x in mine])), num(median([x.seconds for x in mine]), 2),
                     ms(median([x.lag_p50 for x in mine])), ms(median([x.lag_p99 for x in mine])),
                     ms(median([x.lag_max for x in mine])), ms(median([x.ping_p99 for x in mine])),
                     mib(median([x.gateway_rss_idle for x in mine])), mib(median([x.gateway_rss_peak for x in mine])),
                     mib(median(uss_all)) if uss_all else "–", mib(median(session_all)) if session_all else "–"))
    uss_median = median(all_uss)
    session_median = median(all_session_uss)
    lag64 = median([x.lag_p99 for x in runs if x.n == 64])
    body = "\n\n".join([
        f"{total_mb} MiB in total per level, split evenly between the sessions (each one its own connection); "
        f"a fresh gateway per level; {rounds} round(s), medians.",
        table(("sessions", "aggregate MiB/s", "seconds", "loop lag p50 (ms)", "loop lag p99 (ms)",
               "loop lag max (ms)", "ping RTT p99 (ms)", "gateway RSS idle (MiB)", "gateway RSS peak (MiB)",
               "USS per idle worker (MiB)", "USS per idle session, worker + watchdog (MiB)"), rows),
        "USS (unique set size) is the memory a process would give back by exiting: workers are forked from a "
        "forkserver that already imported their code, so most of their RSS is shared copy-on-write.  "
        "Measured with the `load` agent loaded, before its first turn.  The ping column is a separate "
        "connection's `gateway.ping` round trip during the transfer; loop lag is the delta of the gateway's "
        "`wg_loop_lag_seconds` histogram over the transfer.",
    ])
    goals = [
        Goal("USS per idle worker", "< 15 MB", f"{uss_median / 1e6:.1f} MB per worker, {session_median / 1e6:.1f} MB "
             f"with its watchdog (medians of {len(all_uss)} workers)", uss_median < 15e6),
        Goal("loop lag p99 with 64 sessions streaming (no goal set; for the record)", "–", f"{ms(lag64)} ms", None),
    ]
    return Section(KEY, "5. Scale", ".venv/bin/python -m bench --only scale", body, goals,
                   time.perf_counter() - started)
