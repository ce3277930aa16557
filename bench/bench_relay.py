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

from bench.common import running, running_gateway, writer_pid
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
    writer_cpu: float = 0.0  # CPU seconds of the gateway's store writer process (store on only)

    @property
    def mib_s(self) -> float:
        return self.event_bytes / self.seconds / 2**20

    @property
    def events_s(self) -> float:
        return self.events / self.seconds


async def through_gateway(gateway: ServerProcess, client: BenchClient, session_id: str, worker_pid: int,
                          prompt: str) -> Measure:
    counters = client.reset_counters()
    writer = writer_pid(gateway.pid)
    cpu0, wcpu0, ccpu0 = cpu_seconds([gateway.pid]), cpu_seconds([worker_pid]), time.process_time()
    scpu0 = cpu_seconds([writer]) if writer else 0.0
    started = time.perf_counter()
    done = await client.submit(session_id, prompt)
    result = await asyncio.wait_for(done, 600)
    seconds = time.perf_counter() - started
    assert result["status"] == "ok", result
    return Measure(seconds, counters.event_bytes, counters.events, cpu_seconds([gateway.pid]) - cpu0,
                   cpu_seconds([worker_pid]) - wcpu0, time.process_time() - ccpu0,
                   (cpu_seconds([writer]) - scpu0) if writer else 0.0)


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
    # The gateway as users run it (the store on, here in a temporary state dir), and a second one with
    # ``--no-state`` for the relay-only 64 KiB row (issue 18: the same table with the store on and off).
    async with running_gateway(ping=False) as gateway, \
            running_gateway(store=False, ping=False) as nostate, \
            running(ServerProcess.baseline()) as bare:
        gw_client = await BenchClient.open(gateway.ws_url())
        ns_client = await BenchClient.open(nostate.ws_url())
        bare_client = await BenchClient.open(bare.ws_url("/bare"))
        try:
            sessions = {}
            for key, (agent, prompt) in _PRODUCERS.items():
                created = await gw_client.call("session.create", agent=agent)
                sessions[key] = (created["session_id"], created["worker_pid"], prompt)
            agent, relay_prompt = _PRODUCERS["relay"]
            created = await ns_client.call("session.create", agent=agent)
            ns_session = (created["session_id"], created["worker_pid"], relay_prompt)
            # Warm-up (calibrations, first-use allocations), not measured.
            for sid, wpid, prompt in sessions.values():
                await through_gateway(gateway, gw_client, sid, wpid, prompt.format(mb=2, kb=64))
            await through_gateway(nostate, ns_client, ns_session[0], ns_session[1], relay_prompt.format(mb=2, kb=64))
            await through_bare(bare, bare_client, 2, 64)
            for r in range(rounds):
                for kb, mb in ((64, big_mb), (1, small_mb)):
                    sides = [(key, through_gateway(gateway, gw_client, sid, wpid, prompt.format(mb=mb, kb=kb)))
                             for key, (sid, wpid, prompt) in sessions.items()]
                    if kb == 64:
                        sides.append(("relay-nostate", through_gateway(nostate, ns_client, ns_session[0],
                                                                       ns_session[1], relay_prompt.format(mb=mb, kb=kb))))
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
            await ns_client.call("session.close", session_id=ns_session[0])
        finally:
            await gw_client.close()
            await ns_client.close()
            await bare_client.close()

    def med(key: tuple[str, int], attr: str) -> float:
        return median([getattr(m, attr) for m in results[key]])

    def ratio(name: str, kb: int, attr: str) -> float:
        return median([getattr(g, attr) / getattr(b, attr) for g, b in zip(results[(name, kb)], results[("bare", kb)])])

    labels = {
        "load": ("worker-gateway (store on), `load` agent", "`load output_mb={mb} chunk_kb={kb}`"),
        "relay": ("worker-gateway (store on), relay-only agent", "`bench.agents:RelayOnly mb={mb} chunk_kb={kb}`"),
        "relay-nostate": ("worker-gateway `--no-state`, relay-only agent",
                          "`bench.agents:RelayOnly mb={mb} chunk_kb={kb}`"),
        "bare": ("bare uvicorn + starlette", "{n:,} pre-encoded {kb} KiB event frames"),
    }
    rows = []
    for kb, mb in ((64, big_mb), (1, small_mb)):
        for name in ("load", "relay", "relay-nostate", "bare"):
            key = (name, kb)
            if key not in results:
                continue
            seconds = med(key, "seconds")
            label, what = labels[name]
            gateway_cpu = med(key, "server_cpu")
            rows.append((label, what.format(mb=mb, kb=kb, n=mb * 1024 // kb), num(med(key, "mib_s")),
                         num(med(key, "events_s"), 0),
                         f"{ratio(name, kb, 'mib_s'):.2f}" if name != "bare" else "1",
                         num(seconds, 2), f"{gateway_cpu / seconds:.0%}",
                         num(med(key, "event_bytes") / 2**20 / gateway_cpu, 0) if gateway_cpu > 0 else "–",
                         f"{med(key, 'worker_cpu') / seconds:.0%}" if name != "bare" else "–",
                         f"{med(key, 'writer_cpu') / seconds:.0%}" if name in ("load", "relay") else "–",
                         f"{med(key, 'client_cpu') / seconds:.0%}",
                         f"{(gateway_cpu + med(key, 'worker_cpu') + med(key, 'writer_cpu') + med(key, 'client_cpu')) / seconds:.0%}"))
    ratio_load = ratio("load", 64, "mib_s")
    ratio_relay = ratio("relay", 64, "mib_s")
    body = "\n\n".join([
        f"{rounds} round(s); in each, the gateway producers and the bare endpoint take turns (order reversed "
        "every other round); medians, and ratios as the median of per-round ratios.  One warm-up transfer "
        "each first.  The gateway runs with its defaults, as users run it: **the session store on** (a "
        "temporary `--state-dir`: every event is written to SQLite by the writer process and sent once "
        "durable), protocol ping off on loopback, 4 MiB outbound queue per connection.  The `--no-state` "
        "row is a second gateway with the store off, for the relay-only 64 KiB case (section 6 compares the "
        "two in more detail).",
        table(("server", "what is sent", "MiB/s", "events/s", "× bare", "seconds", "server CPU",
               "MiB per server CPU-second", "worker CPU", "store writer CPU", "client CPU", "CPU, all"), rows),
        "Server CPU: CPU seconds of the gateway (or bare app) process during the transfer ÷ wall time "
        "(100% = one core); *MiB per server CPU-second* is what that process could move if it had a whole "
        f"core and its producer kept up.  Worker CPU: the session's worker process; store writer CPU: the "
        f"gateway's SQLite writer process; client CPU: the benchmark "
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
        busy = (med(load_key, "server_cpu") + med(load_key, "worker_cpu") + med(load_key, "writer_cpu")
                + med(load_key, "client_cpu")) / seconds
        bare_per_cpu = med(("bare", 64), "event_bytes") / med(("bare", 64), "server_cpu")
        relay_per_cpu = med(("relay", 64), "event_bytes") / med(("relay", 64), "server_cpu")
        note = (f"during the `load` transfer the gateway was busy {med(load_key, 'server_cpu') / seconds:.0%}, the "
                f"worker {med(load_key, 'worker_cpu') / seconds:.0%} (generating, scrubbing, JSON-encoding), the "
                f"store writer {med(load_key, 'writer_cpu') / seconds:.0%} and the client "
                f"{med(load_key, 'client_cpu') / seconds:.0%}, {busy:.0%} of {os.cpu_count() * 100}%: one stream is "
                "bounded by the hand-offs between the processes (and, with the store on, by the writer's commits), "
                f"while the bare ceiling has no producer, no pipe and no store.  The relay-only agent gets "
                f"{ratio_relay:.2f}× with the store on, {ratio('relay-nostate', 64, 'mib_s'):.2f}× with `--no-state`; "
                f"per byte the gateway process spends ~{bare_per_cpu / relay_per_cpu:.0f}× the bare sender's CPU")
    goals = [Goal("relay throughput vs bare uvicorn + starlette (64 KiB events)", "≥ 0.6×",
                  f"{ratio_load:.2f}× with `load` ({num(med(('load', 64), 'mib_s'))} vs "
                  f"{num(med(('bare', 64), 'mib_s'))} MiB/s); relay path alone {ratio_relay:.2f}× "
                  f"(`--no-state`: {ratio('relay-nostate', 64, 'mib_s'):.2f}×); store on",
                  ratio_load >= 0.6, note)]
    return Section(KEY, "2. Relay throughput", ".venv/bin/python -m bench --only relay", body, goals,
                   time.perf_counter() - started)


def _reading(med, ratio_relay: float) -> str:  # type: ignore[no-untyped-def]
    """What this run's CPU figures say about the bottleneck (computed, so it stays true to the numbers)."""
    key = ("relay", 64)
    seconds = med(key, "seconds")
    gateway, worker, writer, client = (med(key, k) / seconds
                                       for k in ("server_cpu", "worker_cpu", "writer_cpu", "client_cpu"))
    total = gateway + worker + writer + client
    cores = (os.cpu_count() or 1) * 100
    store = (f"  With `--no-state` the same transfer runs at {num(med(('relay-nostate', 64), 'mib_s'))} MiB/s "
             f"against {num(med(key, 'mib_s'))} MiB/s with the store on (section 6).")
    if total < 0.75 * (os.cpu_count() or 1):
        return (f"Reading: with the relay-only agent no process is saturated (gateway {gateway:.0%}, worker "
                f"{worker:.0%}, store writer {writer:.0%}, client {client:.0%}; {total:.0%} of {cores}%), so one "
                "stream is bounded by the hand-offs between the processes (every event wakes the gateway on the "
                "worker's pipe, then waits for the writer's commit and its fsync, then wakes the client on the "
                "socket) rather than by any one of them; several streams together go faster (section 5)." + store)
    return (f"Reading: the processes together use {total:.0%} of the {cores}% this machine has (gateway "
            f"{gateway:.0%}, worker {worker:.0%}, store writer {writer:.0%}, client {client:.0%}): the run is "
            "CPU-bound." + store)
