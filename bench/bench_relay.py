"""2. Relay throughput: worker output through the gateway vs a bare uvicorn + starlette endpoint.

One ``websockets`` client, one session: ``load output_mb=200 chunk_kb=64`` is generated, scrubbed and
encoded by the worker, framed over the pipe, wrapped in the envelope by the gateway and sent.  The ceiling
is the baseline app's ``/bare`` endpoint sending the same number of pre-encoded event frames of the same
size through the same uvicorn + starlette stack to the same client.  Small events (``chunk_kb=1``) show the
per-event cost.  Time runs from the submit to the ``turn.complete``; MiB/s counts every byte of the event
frames received.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import time
from dataclasses import dataclass

from bench.common import running
from bench.procs import ServerProcess, cpu_seconds
from bench.report import Goal, Options, Section, num, table
from bench.stats import median
from bench.wsclient import BenchClient

KEY = "relay"
_turns = itertools.count(1)


@dataclass
class Measure:
    seconds: float
    event_bytes: int
    events: int
    server_cpu: float  # CPU seconds of the server process (the gateway / the bare app) during the transfer
    worker_cpu: float  # CPU seconds of the session's worker (gateway only)
    client_cpu: float  # CPU seconds of this process (the receiving client)

    @property
    def mib_s(self) -> float:
        return self.event_bytes / self.seconds / 2**20

    @property
    def events_s(self) -> float:
        return self.events / self.seconds


async def through_gateway(gateway: ServerProcess, client: BenchClient, session_id: str, worker_pid: int,
                          prompt: str) -> Measure:
    counters = client.reset_counters()
    cpu0, wcpu0, ccpu0 = cpu_seconds([gateway.pid]), cpu_seconds([worker_pid]), time.process_time()
    started = time.perf_counter()
    done = await client.submit(session_id, prompt)
    result = await asyncio.wait_for(done, 600)
    seconds = time.perf_counter() - started
    assert result["status"] == "ok", result
    return Measure(seconds, counters.event_bytes, counters.events, cpu_seconds([gateway.pid]) - cpu0,
                   cpu_seconds([worker_pid]) - wcpu0, time.process_time() - ccpu0)


async def through_bare(bare: ServerProcess, client: BenchClient, output_mb: float, chunk_kb: int) -> Measure:
    counters = client.reset_counters()
    turn_id = f"bare.{next(_turns)}"
    count = int(output_mb * 1024 / chunk_kb)
    done = client.expect_turn(turn_id)
    cpu0, ccpu0 = cpu_seconds([bare.pid]), time.process_time()
    started = time.perf_counter()
    await client.ws.send(json.dumps({"count": count, "chunk_kb": chunk_kb, "turn_id": turn_id}))
    await asyncio.wait_for(done, 600)
    seconds = time.perf_counter() - started
    return Measure(seconds, counters.event_bytes, counters.events, cpu_seconds([bare.pid]) - cpu0, 0.0,
                   time.process_time() - ccpu0)


_PRODUCERS = {
    # key: (agent, prompt format)
    "load": ("load", "output_mb={mb:g} chunk_kb={kb}"),
    "relay": ("bench.agents:RelayOnly", "mb={mb:g} chunk_kb={kb}"),
}


async def run(opts: Options) -> Section:
    rounds = opts.pick(5, 1)
    big_mb, small_mb = (50, 5) if opts.quick else (200, 20)
    started = time.perf_counter()
    results: dict[tuple[str, int], list[Measure]] = {}
    async with running(ServerProcess.gateway(ping=False)) as gateway, \
            running(ServerProcess.baseline()) as bare:
        gw_client = await BenchClient.open(gateway.ws_url())
        bare_client = await BenchClient.open(bare.ws_url("/bare"))
        try:
            sessions = {}
            for key, (agent, prompt) in _PRODUCERS.items():
                created = await gw_client.call("session.create", agent=agent)
                sessions[key] = (created["session_id"], created["worker_pid"], prompt)
            # Warm-up (calibrations, first-use allocations), not measured.
            for sid, wpid, prompt in sessions.values():
                await through_gateway(gateway, gw_client, sid, wpid, prompt.format(mb=2, kb=64))
            await through_bare(bare, bare_client, 2, 64)
            for r in range(rounds):
                for kb, mb in ((64, big_mb), (1, small_mb)):
                    sides = [(key, through_gateway(gateway, gw_client, sid, wpid, prompt.format(mb=mb, kb=kb)))
                             for key, (sid, wpid, prompt) in sessions.items()]
                    sides.append(("bare", through_bare(bare, bare_client, mb, kb)))
                    if r % 2:
                        sides.reverse()
                    for name, coro in sides:
                        m = await coro
                        results.setdefault((name, kb), []).append(m)
                        print(f"  relay round {r + 1}/{rounds} {name} chunk_kb={kb}: {m.mib_s:.1f} MiB/s, "
                              f"{m.events_s:,.0f} events/s, server CPU {m.server_cpu / m.seconds:.0%}", flush=True)
            for sid, _, _ in sessions.values():
                await gw_client.call("session.close", session_id=sid)
        finally:
            await gw_client.close()
            await bare_client.close()

    def med(key: tuple[str, int], attr: str) -> float:
        return median([getattr(m, attr) for m in results[key]])

    def ratio(name: str, kb: int, attr: str) -> float:
        return median([getattr(g, attr) / getattr(b, attr) for g, b in zip(results[(name, kb)], results[("bare", kb)])])

    labels = {
        "load": ("worker-gateway, `load` agent", "`load output_mb={mb} chunk_kb={kb}`"),
        "relay": ("worker-gateway, relay-only agent", "`bench.agents:RelayOnly mb={mb} chunk_kb={kb}`"),
        "bare": ("bare uvicorn + starlette", "{n:,} pre-encoded {kb} KiB event frames"),
    }
    rows = []
    for kb, mb in ((64, big_mb), (1, small_mb)):
        for name in ("load", "relay", "bare"):
            key = (name, kb)
            seconds = med(key, "seconds")
            label, what = labels[name]
            gateway_cpu = med(key, "server_cpu")
            rows.append((label, what.format(mb=mb, kb=kb, n=mb * 1024 // kb), num(med(key, "mib_s")),
                         num(med(key, "events_s"), 0),
                         f"{ratio(name, kb, 'mib_s'):.2f}" if name != "bare" else "1",
                         num(seconds, 2), f"{gateway_cpu / seconds:.0%}",
                         num(med(key, "event_bytes") / 2**20 / gateway_cpu, 0) if gateway_cpu > 0 else "–",
                         f"{med(key, 'worker_cpu') / seconds:.0%}" if name != "bare" else "–",
                         f"{med(key, 'client_cpu') / seconds:.0%}",
                         f"{(gateway_cpu + med(key, 'worker_cpu') + med(key, 'client_cpu')) / seconds:.0%}"))
    ratio_load = ratio("load", 64, "mib_s")
    ratio_relay = ratio("relay", 64, "mib_s")
    body = "\n\n".join([
        f"{rounds} round(s); in each, the gateway producers and the bare endpoint take turns (order reversed "
        "every other round); medians, and ratios as the median of per-round ratios.  One warm-up transfer "
        "each first.  The gateway runs with its defaults (protocol ping off on loopback, 4 MiB outbound "
        "queue per connection).",
        table(("server", "what is sent", "MiB/s", "events/s", "× bare", "seconds", "server CPU",
               "MiB per server CPU-second", "worker CPU", "client CPU", "CPU, all three"), rows),
        "Server CPU: CPU seconds of the gateway (or bare app) process during the transfer ÷ wall time "
        "(100% = one core); *MiB per server CPU-second* is what that process could move if it had a whole "
        f"core and its producer kept up.  Worker CPU: the session's worker process; client CPU: the benchmark "
        f"process receiving the frames; the last column is their sum, out of {os.cpu_count() * 100}% on this "
        "machine.  The `load` agent "
        "generates, scrubs and JSON-encodes every chunk in its worker (the realistic producer); the "
        "relay-only agent (`bench/agents.py`) emits a constant unscrubbed chunk, so its row shows the gateway's "
        "relay path itself.  The bare endpoint sends one pre-encoded frame over and over: no worker, no "
        "pipe, no envelope: the ceiling of uvicorn + starlette and of this client.",
        _reading(med, ratio_relay),
    ])
    note = ""
    if ratio_load < 0.6:
        load_key = ("load", 64)
        seconds = med(load_key, "seconds")
        busy = (med(load_key, "server_cpu") + med(load_key, "worker_cpu") + med(load_key, "client_cpu")) / seconds
        bare_per_cpu = med(("bare", 64), "event_bytes") / med(("bare", 64), "server_cpu")
        relay_per_cpu = med(("relay", 64), "event_bytes") / med(("relay", 64), "server_cpu")
        note = (f"not the loop's CPU: during the `load` transfer the gateway was busy "
                f"{med(load_key, 'server_cpu') / seconds:.0%}, the worker {med(load_key, 'worker_cpu') / seconds:.0%} "
                f"(generating, scrubbing, JSON-encoding) and the client {med(load_key, 'client_cpu') / seconds:.0%}, "
                f"{busy:.0%} of {os.cpu_count() * 100}%: one stream is bounded by the hand-offs between three "
                f"processes, while the bare ceiling has no producer and no pipe.  Even the relay-only agent gets "
                f"{ratio_relay:.2f}×; per byte the gateway spends ~{bare_per_cpu / relay_per_cpu:.0f}× the bare "
                "sender's CPU, ~60% of it in the pipe read and socket write syscalls (native profile)")
    goals = [Goal("relay throughput vs bare uvicorn + starlette (64 KiB events)", "≥ 0.6×",
                  f"{ratio_load:.2f}× with `load` ({num(med(('load', 64), 'mib_s'))} vs "
                  f"{num(med(('bare', 64), 'mib_s'))} MiB/s); relay path alone {ratio_relay:.2f}×",
                  ratio_load >= 0.6, note)]
    return Section(KEY, "2. Relay throughput", ".venv/bin/python -m bench --only relay", body, goals,
                   time.perf_counter() - started)


def _reading(med, ratio_relay: float) -> str:  # type: ignore[no-untyped-def]
    """What this run's CPU figures say about the bottleneck (computed, so it stays true to the numbers)."""
    key = ("relay", 64)
    seconds = med(key, "seconds")
    gateway, worker, client = (med(key, k) / seconds for k in ("server_cpu", "worker_cpu", "client_cpu"))
    total = gateway + worker + client
    if total < 0.75 * (os.cpu_count() or 1):
        return (f"Reading: with the relay-only agent no process is saturated (gateway {gateway:.0%}, worker "
                f"{worker:.0%}, client {client:.0%}; {total:.0%} of {(os.cpu_count() or 1) * 100}%), so one stream "
                "is bounded by the hand-offs between three processes (every event wakes the gateway on the "
                "worker's pipe, then the client on the socket) rather than by any one of them; several streams "
                "together go faster (section 5).")
    return (f"Reading: the three processes together use {total:.0%} of the {(os.cpu_count() or 1) * 100}% this "
            f"machine has (gateway {gateway:.0%}, worker {worker:.0%}, client {client:.0%}): the run is CPU-bound.")
