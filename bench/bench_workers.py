"""Benchmark the worker layer: warm-pool hand-out vs a cold Python start, idle memory, scrub throughput.

Run: ``.venv/bin/python bench/bench_workers.py [--rounds N] [--json]``.  Not a test: it prints numbers
(for docs/BENCHMARKS.md) and asserts nothing.  Everything runs locally; no network.

- warm hand-out: ``Supervisor.acquire("echo")`` with a ready pool (init sent, ``ready`` received);
- cold supervisor: the same with ``pool_size=0`` (a fork from the forkserver per session);
- cold Popen: ``subprocess.Popen([sys.executable, ...])`` importing the same worker code and answering
  one line: what a process-per-session design without a forkserver pays;
- USS of an idle pooled worker and of its watchdog or session keeper (``psutil.memory_full_info().uss``);
- scrub throughput on ordinary text and on text dense with secrets.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.procs import keeper_of  # noqa: E402
from workers.agents.load import fake_secrets  # noqa: E402
from workers.scrub import scrub  # noqa: E402
from workers.supervisor import Supervisor  # noqa: E402

_COLD_CHILD = ("import sys, workers.worker_main, workers.agents.echo; "
               "print('ready', flush=True); sys.stdin.read()")


def _percentiles(samples_s: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in samples_s)
    p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
    return {"p50_ms": round(statistics.median(ms), 2), "p99_ms": round(p99, 2), "n": len(ms)}


async def _wait_pool(sup: Supervisor, size: int) -> None:
    deadline = time.monotonic() + 30
    while sup.pool_ready < size:
        if time.monotonic() > deadline:
            raise RuntimeError("pool did not fill within 30 s")
        await asyncio.sleep(0.005)


async def bench_hand_out(rounds: int, pool_size: int) -> dict[str, float]:
    sup = Supervisor(pool_size=pool_size)
    await sup.start()
    samples = []
    try:
        for i in range(rounds):
            if pool_size:
                await _wait_pool(sup, pool_size)
            start = time.perf_counter()
            handle = await sup.acquire("echo", {}, None, f"bench-{i}")
            samples.append(time.perf_counter() - start)
            await handle.stop()
    finally:
        await sup.close()
    return _percentiles(samples)


def bench_cold_popen(rounds: int) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        child = subprocess.Popen([sys.executable, "-c", _COLD_CHILD], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, env=env, cwd=REPO)
        assert child.stdout is not None and child.stdin is not None
        line = child.stdout.readline()
        samples.append(time.perf_counter() - start)
        assert line.strip() == b"ready", line
        child.stdin.close()
        child.wait()
    return _percentiles(samples)


async def bench_idle_memory(count: int = 4) -> dict[str, float]:
    sup = Supervisor(pool_size=count)
    await sup.start()
    try:
        await _wait_pool(sup, count)
        await asyncio.sleep(0.5)  # let them settle into their idle read
        workers, watchdogs = [], []
        for handle in list(sup._pool):
            proc = psutil.Process(handle.pid)
            workers.append(proc.memory_full_info().uss)
            helpers = proc.children() or ([psutil.Process(k)] if (k := keeper_of(handle.pid)) else [])
            watchdogs.extend(helper.memory_full_info().uss for helper in helpers)
    finally:
        await sup.close()
    mib = 2 ** 20
    result: dict[str, Any] = {"worker_uss_mib": round(statistics.mean(workers) / mib, 2),
                              "worker_rss_shared_note": "USS = pages unique to the process; the rest is shared "
                                                        "copy-on-write"}
    if watchdogs:  # the worker's watchdog child (older layout) or its session keeper (its parent)
        result["watchdog_uss_mib"] = round(statistics.mean(watchdogs) / mib, 2)
    return result


def bench_scrub(megabytes: int = 20) -> dict[str, float]:
    line = "2024-05-01T12:00:00Z INFO worker=7 request_id=ab12cd34 path=/api/v1/items status=200 ms=12\n"
    ordinary = line * (megabytes * 2 ** 20 // len(line))
    secrets = "\n".join(s.text for s in fake_secrets(9))
    dense = (line * 50 + secrets + "\n") * (megabytes * 2 ** 20 // (len(line) * 50 + len(secrets)))
    result = {}
    for name, text in (("ordinary", ordinary), ("one_secret_per_5kb", dense)):
        start = time.perf_counter()
        _, count = scrub(text)
        elapsed = time.perf_counter() - start
        result[f"{name}_mb_per_s"] = round(len(text) / 1e6 / elapsed, 1)
        result[f"{name}_redactions"] = count
    return result


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=100, help="samples per latency measurement")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args()

    results = {
        "cpu_count": os.cpu_count(),
        "warm_hand_out": await bench_hand_out(args.rounds, pool_size=2),
        "cold_supervisor_fork": await bench_hand_out(max(10, args.rounds // 2), pool_size=0),
        "cold_popen_python": bench_cold_popen(max(10, args.rounds // 5)),
        "idle_memory": await bench_idle_memory(),
        "scrub": bench_scrub(),
    }
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"worker benchmarks ({results['cpu_count']} CPUs, python {sys.version.split()[0]})")
    for key in ("warm_hand_out", "cold_supervisor_fork", "cold_popen_python"):
        r = results[key]
        print(f"  {key:22s} p50 {r['p50_ms']:8.2f} ms   p99 {r['p99_ms']:8.2f} ms   (n={r['n']})")
    mem = results["idle_memory"]
    print(f"  idle worker USS        {mem['worker_uss_mib']:.2f} MiB (+ keeper {mem.get('watchdog_uss_mib', 0):.2f} MiB)")
    sc = results["scrub"]
    print(f"  scrub ordinary text    {sc['ordinary_mb_per_s']:.0f} MB/s")
    print(f"  scrub secret-dense     {sc['one_secret_per_5kb_mb_per_s']:.0f} MB/s "
          f"({sc['one_secret_per_5kb_redactions']} redactions)")


if __name__ == "__main__":
    asyncio.run(main())
