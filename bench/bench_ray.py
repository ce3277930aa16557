"""Ray backend vs local backend, same run: session start, relay throughput, and gateway-death cleanup.

Two gateways on this machine: the default local forkserver pool, and ``--backend ray --ray-address local``
(a private one-node Ray cluster the gateway starts and ends; its worker host actor runs the same
supervisor).  For each: ``session.create`` latency (a warm pool of 2 on both sides, sessions closed one by
one), then one session streaming ``load output_mb=N`` in 64 KiB and 1 KiB events (MiB/s from submit to
``turn.complete``; gateway CPU per MiB from psutil on the gateway process, which for Ray includes the
driver's own threads).  Last, the Ray gateway is SIGKILLed with two turns running and the time until
every worker's process group is gone is measured (the promise is 2 s).

Run alone: ``.venv/bin/python -m bench.bench_ray [--quick]``; ``make bench`` can hook ``run(opts)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass

import psutil

from bench.procs import ServerProcess, cpu_seconds, descendants, group_members
from bench.report import Goal, Options, Section, ms, num, run_alone, table
from bench.stats import median, percentile
from bench.wsclient import BenchClient

KEY = "ray"
_BACKENDS = (("local", ()), ("ray", ("--backend", "ray", "--ray-address", "local")))


@dataclass
class Relay:
    mib_s: float
    gateway_cpu_per_mib: float  # CPU seconds of the gateway process per MiB relayed


def _gateway(extra: tuple[str, ...]) -> ServerProcess:
    return ServerProcess.gateway("--no-state", "--pool-size", "2", *extra, ping=False)


async def _starts(client: BenchClient, count: int) -> list[float]:
    samples = []
    for _ in range(count):
        began = time.perf_counter()
        created = await client.call("session.create", agent="echo")
        samples.append(time.perf_counter() - began)
        await client.call("session.close", session_id=created["session_id"])
    return samples


async def _relay(gateway: ServerProcess, client: BenchClient, sid: str, mb: float, kb: int) -> Relay:
    counters = client.reset_counters()
    cpu0 = cpu_seconds([gateway.pid])
    began = time.perf_counter()
    done = await client.submit(sid, f"output_mb={mb:g} chunk_kb={kb}")
    result = await asyncio.wait_for(done, 600)
    seconds = time.perf_counter() - began
    assert result["status"] == "ok", result
    mib = counters.event_bytes / 2**20
    return Relay(mib / seconds, (cpu_seconds([gateway.pid]) - cpu0) / mib)


async def _death_cleanup(gateway: ServerProcess) -> float:
    """SIGKILL the gateway with two running turns; seconds until every worker group is gone."""
    client = await BenchClient.open(gateway.ws_url())
    pids = []
    for _ in range(2):
        created = await client.call("session.create", agent="load")
        pids.append(created["worker_pid"])
        await client.submit(created["session_id"], "cpu_s=60")
    await asyncio.sleep(0)  # the prompts were accepted; the turns run on their own from here
    owned = descendants(gateway.pid)
    temp_dirs = _private_cluster_dirs(owned)
    os.kill(gateway.pid, signal.SIGKILL)
    began = time.perf_counter()
    deadline = began + 30.0
    while any(group_members(p) for p in pids) and time.perf_counter() < deadline:
        await asyncio.sleep(0.02)
    elapsed = time.perf_counter() - began
    with contextlib.suppress(Exception):
        await client.close()
    _, alive = psutil.wait_procs(owned, timeout=10.0)  # the private cluster ends with its driver
    if alive:
        print(f"  ray-bench: {len(alive)} process(es) of the dead gateway still ran 10 s later: killed "
              f"{[p.name() for p in alive if p.is_running()]}",
              file=sys.stderr, flush=True)
    for proc in alive:  # never leave this benchmark's processes behind
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=5.0)
    for path in temp_dirs:  # a killed gateway could not remove its private cluster's directory
        shutil.rmtree(path, ignore_errors=True)
    return elapsed


def _private_cluster_dirs(procs: list[psutil.Process]) -> set[str]:
    """The temporary directories (``/tmp/wg-ray-*``) of the private cluster these processes belong to."""
    found = set()
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            for arg in proc.cmdline():
                _, sep, rest = arg.partition("/tmp/wg-ray-")
                if sep:
                    found.add("/tmp/wg-ray-" + rest.split("/")[0])
    return found


async def run(opts: Options) -> Section:
    started = time.perf_counter()
    count = opts.pick(30, 8)
    big_mb, small_mb = (10, 2) if opts.quick else (50, 5)
    rounds = opts.pick(3, 1)
    starts: dict[str, list[float]] = {}
    relay: dict[tuple[str, int], list[Relay]] = {}
    boot: dict[str, float] = {}
    death = float("nan")
    for name, extra in _BACKENDS:
        gateway = _gateway(extra)
        began = time.perf_counter()
        await asyncio.to_thread(gateway.start, 180.0)
        boot[name] = time.perf_counter() - began
        killed = False
        try:
            client = await BenchClient.open(gateway.ws_url())
            try:
                await _starts(client, 2)  # warm-up
                starts[name] = await _starts(client, count)
                sid = (await client.call("session.create", agent="load"))["session_id"]
                await _relay(gateway, client, sid, 2, 64)  # warm-up
                for r in range(rounds):
                    for kb, mb in ((64, big_mb), (1, small_mb)):
                        m = await _relay(gateway, client, sid, mb, kb)
                        relay.setdefault((name, kb), []).append(m)
                        print(f"  ray-bench {name} round {r + 1}/{rounds} chunk_kb={kb}: {m.mib_s:.1f} MiB/s, "
                              f"gateway CPU {ms(m.gateway_cpu_per_mib)} ms/MiB", flush=True)
                await client.call("session.close", session_id=sid)
            finally:
                await client.close()
            if name == "ray":
                death = await _death_cleanup(gateway)
                killed = True
                print(f"  ray-bench gateway SIGKILLed: workers gone after {ms(death)} ms", flush=True)
        finally:
            if not killed:
                await asyncio.to_thread(gateway.stop)

    def med(key: tuple[str, int], attr: str) -> float:
        return median([getattr(m, attr) for m in relay[key]])

    start_rows = [(name, len(s), ms(percentile(s, 0.5), 1), ms(percentile(s, 0.99), 1), num(boot[name], 1))
                  for name, s in starts.items()]
    relay_rows = []
    for kb in (64, 1):
        local, on_ray = (med(("local", kb), "mib_s"), med(("ray", kb), "mib_s"))
        cpu_local, cpu_ray = med(("local", kb), "gateway_cpu_per_mib"), med(("ray", kb), "gateway_cpu_per_mib")
        relay_rows.append((f"{kb} KiB events", num(local, 1), num(on_ray, 1), f"{on_ray / local:.2f}x",
                           ms(cpu_local, 1), ms(cpu_ray, 1), f"{cpu_ray / cpu_local:.1f}x"))
    body = "\n\n".join([
        "Same run, same machine: the local backend vs `--backend ray --ray-address local` (a private "
        "one-node cluster; crossing machines adds the network on top).  Warm pool of 2 on both sides.",
        table(("backend", "creates", "session.create p50 (ms)", "p99 (ms)", "gateway start (s)"), start_rows),
        f"Relay: one session, `load output_mb={big_mb}` (64 KiB events) and `output_mb={small_mb}` (1 KiB), "
        f"median of {rounds}.",
        table(("events", "local MiB/s", "Ray MiB/s", "Ray/local", "local gateway CPU (ms/MiB)",
               "Ray gateway CPU (ms/MiB)", "Ray/local CPU"), relay_rows),
        f"Gateway SIGKILLed with two turns running on Ray: every worker group gone after {ms(death)} ms.",
    ])
    goals = [Goal("workers end after the gateway's death (Ray)", "<= 2 s", f"{ms(death)} ms",
                  death <= 2.0 if death == death else None)]
    return Section(KEY, "Ray backend", ".venv/bin/python -m bench.bench_ray", body, goals, time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    return run_alone("python -m bench.bench_ray", __doc__ or "", run, argv, "fewer sessions and rounds, less volume")


if __name__ == "__main__":
    sys.exit(main())
