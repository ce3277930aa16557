"""2. Relay throughput: worker output through the gateway vs a bare uvicorn + starlette endpoint (issue 18).

Four workloads, each on three servers and with two clients, in one run:

- workloads: relay-only 64 KiB events (``bench.agents:RelayOnly``: the gateway's relay path), the ``load``
  agent's 64 KiB events (generated, scrubbed, encoded in the worker), relay-only 1 KiB events, and token
  deltas (``bench.agents:Deltas``: ~20-byte ``message.delta`` payloads);
- servers: the baseline app's ``/bare`` endpoint (the same number of pre-encoded frames of the same size
  through the same uvicorn + starlette stack, no worker, no pipe, no envelope), the gateway with its store
  on (a temporary ``--state-dir``), the gateway with ``--no-state``, and for 64 KiB events the pipe-hop
  floor (``bench.floor_app``: a producer process, a pipe and a relay that does nothing else: the most any
  design that keeps the worker's pipe hop can reach here);
- clients: the raw byte-counting client (``bench.rawclient``: frame headers only, so the servers' capacity
  shows) and the ``websockets`` client users run (``bench.wsclient``).

Time runs from the submit to the ``turn.complete``.  Ratios are events/s of the gateway ÷ the bare
endpoint's in the same round with the same client, then the median over rounds; in every round the sides
take turns, the order reversed every other round.  CPU µs per event: each process's CPU time over the
transfer (``bench.procs.cpu_snapshot``) ÷ the events received.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from bench.common import running, running_gateway, writer_pid
from bench.procs import ServerProcess, cpu_delta, cpu_snapshot
from bench.rawclient import RawClient
from bench.report import Goal, Options, Section, num, table
from bench.stats import median, ratios, spread
from bench.wsclient import BenchClient

KEY = "relay"
DELTA_BYTES = 20
#: The bare endpoint is several times faster: its transfers are this many times longer, so that they are not
#: dominated by the round trip that starts them (ratios are of events/s, so sizes need not match).
BARE_SCALE = 4
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

    def us_per_event(self, attr: str) -> float:
        return getattr(self, attr) / self.events * 1e6 if self.events else math.nan


@dataclass(frozen=True)
class Workload:
    key: str
    label: str
    agent: str
    prompt: str  # format fields: mb, kb, n
    bare: str  # which bare transfer it is compared with
    kb: int = 0  # event size for chunked workloads; 0 for token deltas


WORKLOADS = (
    Workload("relay64", "relay-only, 64 KiB events", "bench.agents:RelayOnly", "mb={mb:g} chunk_kb=64", "64k", 64),
    Workload("load64", "`load` agent, 64 KiB events", "load", "output_mb={mb:g} chunk_kb=64", "64k", 64),
    Workload("relay1", "relay-only, 1 KiB events", "bench.agents:RelayOnly", "mb={mb:g} chunk_kb=1", "1k", 1),
    Workload("tokens", f"token deltas ({DELTA_BYTES}-byte text)", "bench.agents:Deltas",
             "n={n} bytes=" + str(DELTA_BYTES), "tokens"),
)
BARE = {"64k": "bare, 64 KiB event frames", "1k": "bare, 1 KiB event frames",
        "tokens": f"bare, `message.delta` frames ({DELTA_BYTES}-byte text)"}
GATEWAYS = ("store", "nostate")
GATEWAY_LABEL = {"store": "gateway, store on", "nostate": "gateway `--no-state`", "bare": "bare uvicorn + starlette",
                 "floor": "pipe-hop floor"}
#: The bare kinds that also run through the pipe-hop floor (the big events: where the hop's copies show).
FLOOR = {"64k": "floor: producer → pipe → relay, 64 KiB event frames"}
CLIENTS = ("raw", "ws")
CLIENT_LABEL = {"raw": "raw", "ws": "`websockets`"}
Client = Any  # RawClient | BenchClient: the same interface for what is used here


@dataclass(frozen=True)
class Sizes:
    mb64: float
    mb1: float
    deltas: int

    def amount(self, bare: str) -> tuple[float, int]:
        """(MiB, events) of one transfer of this kind."""
        if bare == "64k":
            return self.mb64, int(self.mb64 * 16)
        if bare == "1k":
            return self.mb1, int(self.mb1 * 1024)
        return 0.0, self.deltas


async def through_gateway(gateway: ServerProcess, client: Client, session_id: str, worker_pid: int,
                          prompt: str) -> Measure:
    counters = client.reset_counters()
    writer = writer_pid(gateway.pid)
    watched = [[gateway.pid], [worker_pid], [writer] if writer else []]
    before, ccpu0 = [cpu_snapshot(p) for p in watched], time.process_time()
    started = time.perf_counter()
    done = await client.submit(session_id, prompt)
    result = await asyncio.wait_for(done, 600)
    seconds = time.perf_counter() - started
    client_cpu = time.process_time() - ccpu0
    server_cpu, worker_cpu, writer_cpu = (cpu_delta(b, cpu_snapshot(p)) for b, p in zip(before, watched))
    assert result["status"] == "ok", result
    return Measure(seconds, counters.event_bytes, counters.events, server_cpu, worker_cpu, client_cpu, writer_cpu)


async def through_bare(bare: ServerProcess, client: Client, kind: str, sizes: Sizes, scale: int = BARE_SCALE,
                       producer: int = 0) -> Measure:
    """``kind``: "64k", "1k" or "tokens" (``count`` frames of that kind, then ``turn.complete``); the same
    protocol drives the pipe-hop floor, whose ``producer`` process counts as its worker."""
    counters = client.reset_counters()
    turn_id = f"bare.{next(_turns)}"
    count = sizes.amount(kind)[1] * scale
    ask: dict[str, Any] = {"count": count, "turn_id": turn_id}
    if kind == "tokens":
        ask["delta_bytes"] = DELTA_BYTES
    else:
        ask["chunk_kb"] = 64 if kind == "64k" else 1
    done = client.expect_turn(turn_id)
    watched = [[bare.pid], [producer] if producer else []]
    before, ccpu0 = [cpu_snapshot(p) for p in watched], time.process_time()
    started = time.perf_counter()
    await client.send_text(json.dumps(ask))
    await asyncio.wait_for(done, 600)
    seconds = time.perf_counter() - started
    client_cpu = time.process_time() - ccpu0
    server_cpu, producer_cpu = (cpu_delta(b, cpu_snapshot(p)) for b, p in zip(before, watched))
    return Measure(seconds, counters.event_bytes, counters.events, server_cpu, producer_cpu, client_cpu)


def prompt_for(w: Workload, sizes: Sizes) -> str:
    mb, n = sizes.amount(w.bare)
    return w.prompt.format(mb=mb, n=n)


async def _open(kind: str, url: str) -> Client:
    return await (RawClient.open(url) if kind == "raw" else BenchClient.open(url))


Results = dict[tuple[str, str, str], list[Measure]]  # (workload key or bare kind, server, client) -> rounds


async def run(opts: Options) -> Section:
    rounds = opts.pick(5, 2)
    sizes = Sizes(24, 3, 6000) if opts.quick else Sizes(48, 6, 12000)
    warm = Sizes(2, 0.5, 1000)
    started = time.perf_counter()
    results: Results = {}
    async with running_gateway(ping=False) as store_gw, running_gateway(store=False, ping=False) as nostate_gw, \
            running(ServerProcess.baseline()) as bare, running(ServerProcess.floor()) as floor:
        servers = {"store": store_gw, "nostate": nostate_gw}
        clients: dict[tuple[str, str], Client] = {}
        sessions: dict[tuple[str, str, str], tuple[str, int]] = {}  # (server, client, agent) -> (sid, worker pid)
        try:
            producers: dict[str, int] = {}
            for ck in CLIENTS:
                clients[("bare", ck)] = await _open(ck, bare.ws_url("/bare"))
                clients[("floor", ck)] = await _open(ck, floor.ws_url("/"))
                producers[ck] = int(clients[("floor", ck)].ready.result()["producer_pid"])
                for sk in GATEWAYS:
                    client = clients[(sk, ck)] = await _open(ck, servers[sk].ws_url())
                    for agent in {w.agent for w in WORKLOADS}:
                        created = await client.call("session.create", agent=agent)
                        sessions[(sk, ck, agent)] = (created["session_id"], created["worker_pid"])

            def gateway_side(w: Workload, sk: str, ck: str, sz: Sizes) -> Callable[[], Awaitable[Measure]]:
                sid, wpid = sessions[(sk, ck, w.agent)]
                return lambda: through_gateway(servers[sk], clients[(sk, ck)], sid, wpid, prompt_for(w, sz))

            def bare_side(kind: str, ck: str, sz: Sizes) -> Callable[[], Awaitable[Measure]]:
                return lambda: through_bare(bare, clients[("bare", ck)], kind, sz)

            def floor_side(kind: str, ck: str, sz: Sizes) -> Callable[[], Awaitable[Measure]]:
                return lambda: through_bare(floor, clients[("floor", ck)], kind, sz, 1, producers[ck])

            # Warm-up (calibrations, first-use allocations), not measured.
            for ck in CLIENTS:
                for w in WORKLOADS:
                    for sk in GATEWAYS:
                        await gateway_side(w, sk, ck, warm)()
                for kind in BARE:
                    await bare_side(kind, ck, warm)()
                for kind in FLOOR:
                    await floor_side(kind, ck, warm)()
            for r in range(rounds):
                for ck in CLIENTS:
                    for kind in BARE:
                        sides = [((w.key, sk, ck), gateway_side(w, sk, ck, sizes))
                                 for w in WORKLOADS if w.bare == kind for sk in GATEWAYS]
                        if kind in FLOOR:
                            sides.append(((kind, "floor", ck), floor_side(kind, ck, sizes)))
                        sides.append(((kind, "bare", ck), bare_side(kind, ck, sizes)))
                        if r % 2:
                            sides.reverse()
                        for key, side in sides:
                            m = await side()
                            results.setdefault(key, []).append(m)
                            print(f"  relay round {r + 1}/{rounds} {key[0]} {key[1]} client={key[2]}: "
                                  f"{m.mib_s:.1f} MiB/s, {m.events_s:,.0f} events/s, "
                                  f"server {m.us_per_event('server_cpu'):.1f} µs/event", flush=True)
            for (sk, ck, _agent), (sid, _) in sessions.items():
                await clients[(sk, ck)].call("session.close", session_id=sid)
        finally:
            await asyncio.gather(*(c.close() for c in clients.values()), return_exceptions=True)
    body, goals = render(results, rounds, sizes)
    return Section(KEY, "2. Relay throughput", ".venv/bin/python -m bench --only relay", body, goals,
                   time.perf_counter() - started)


# Rendering (pure) ----------------------------------------------------------------------------------------------
def _range(values: list[float], digits: int = 1, suffix: str = "") -> str:
    mid, lo, hi = spread(values)
    if math.isnan(mid):
        return "–"
    if len(values) == 1:
        return f"{num(mid, digits)}{suffix}"
    return f"{num(mid, digits)}{suffix} ({num(lo, digits)}–{num(hi, digits)})"


def _rows_order() -> list[tuple[str, str, str]]:
    """(result key, server, label) in table order: each workload's gateways, then its bare ceiling."""
    order = []
    for kind in BARE:
        for w in WORKLOADS:
            if w.bare == kind:
                order += [(w.key, sk, w.label) for sk in GATEWAYS]
        if kind in FLOOR:
            order.append((kind, "floor", FLOOR[kind]))
        order.append((kind, "bare", BARE[kind]))
    return order


def _bare_kind(key: str) -> str:
    return key if key in BARE else next(w.bare for w in WORKLOADS if w.key == key)


def event_ratios(results: Results, key: str, server: str, client: str, attr: str = "events_s",
                 versus: str = "bare") -> list[float]:
    """Per-round gateway (or floor) ÷ bare (or ``versus`` another server of that bare kind) of ``attr``
    (events/s, or a CPU figure), same client, same round."""
    mine, theirs = results.get((key, server, client), []), results.get((_bare_kind(key), versus, client), [])
    return ratios([getattr(m, attr) for m in mine], [getattr(b, attr) for b in theirs])


def cpu_ratios(results: Results, key: str, server: str, client: str) -> list[float]:
    """Per-round gateway (or floor) server CPU per event ÷ the bare server's."""
    mine, bare = results.get((key, server, client), []), results.get((_bare_kind(key), "bare", client), [])
    return ratios([m.us_per_event("server_cpu") for m in mine], [b.us_per_event("server_cpu") for b in bare])


def render(results: Results, rounds: int, sizes: Sizes) -> tuple[str, list[Goal]]:
    thr_rows, cpu_rows = [], []
    for ck in CLIENTS:
        for key, server, label in _rows_order():
            ms = results.get((key, server, ck))
            if not ms:
                continue
            mb, n = sizes.amount(_bare_kind(key))
            if server == "bare":
                mb, n = mb * BARE_SCALE, n * BARE_SCALE
            what = f"{n:,} events" + (f", {mb:g} MiB" if mb else "")
            bare_row = server == "bare"
            thr_rows.append((label, GATEWAY_LABEL[server], CLIENT_LABEL[ck], what,
                             _range([m.mib_s for m in ms]), _range([m.events_s for m in ms], 0),
                             "1" if bare_row else _range(event_ratios(results, key, server, ck), 2),
                             _range([m.seconds for m in ms], 2)))
            cpu_rows.append((label, GATEWAY_LABEL[server], CLIENT_LABEL[ck],
                             _range([m.us_per_event("server_cpu") for m in ms]),
                             "1" if bare_row else _range(cpu_ratios(results, key, server, ck), 2),
                             "–" if server != "store" else _range([m.us_per_event("writer_cpu") for m in ms]),
                             "–" if bare_row else _range([m.us_per_event("worker_cpu") for m in ms]),
                             _range([m.us_per_event("client_cpu") for m in ms]),
                             _range([(m.server_cpu + m.worker_cpu + m.writer_cpu + m.client_cpu) / m.seconds * 100
                                     for m in ms], 0, "%")))
    cores = (os.cpu_count() or 1) * 100
    body = "\n\n".join([
        f"{rounds} round(s) after one warm-up transfer of each; in each round and for each client, every "
        "workload's gateway sides and its bare endpoint take turns (order reversed every other round).  "
        "Medians, ranges over rounds in brackets; *× bare* is the gateway's events/s ÷ the bare endpoint's "
        f"in the same round with the same client (then the median; the bare transfers are {BARE_SCALE}× longer, "
        "as its rate is several times higher).  The gateways run as users run them "
        "(store on in a temporary `--state-dir`, or `--no-state`), protocol ping off on loopback.  The "
        "*raw* client (`bench/rawclient.py`) does the WebSocket handshake by hand and reads only frame "
        "headers (small frames whole, a prefix of big ones): it shows what the servers can push.  The "
        "`websockets` client decodes every frame in Python, as a user's client would: for small events "
        "it is the bottleneck on both sides.",
        table(("workload", "server", "client", "per transfer", "MiB/s", "events/s", "× bare", "seconds"),
              thr_rows),
        "**CPU per event.** µs of CPU per event received: each process's CPU time over the transfer ÷ "
        "events (summed over its threads from `/proc/<pid>/task/*/schedstat`, nanosecond resolution; psutil "
        "`cpu_times`, whose 10 ms tick is too coarse for a transfer this short, when a thread exited "
        "meanwhile; the client's from `time.process_time`): *server* is the gateway process (or the bare app), *writer* the gateway's SQLite store "
        "writer process, *worker* the session's worker, *client* the benchmark process.  *Server ÷ bare* "
        "compares the gateway's own cost per event with the bare server's (same round, same client).  "
        "For the pipe-hop floor, *server* is its relay and *worker* its producer.  "
        f"*CPU, all*: the four processes together ÷ wall time, out of {cores}% on this machine.",
        table(("workload", "server", "client", "server µs/event", "server ÷ bare", "writer µs/event",
               "worker µs/event", "client µs/event", "CPU, all"), cpu_rows),
        "The relay-only agent (`bench/agents.py`) emits a constant unscrubbed chunk, so its rows show the "
        "gateway's relay path itself; the `load` agent generates, scrubs and JSON-encodes every chunk in its "
        "worker (the realistic producer); `bench.agents:Deltas` emits `message.delta` events as a model "
        "streaming tokens would.  The bare endpoint sends one pre-encoded frame over and over: the ceiling "
        "of uvicorn + starlette on this machine.  The pipe-hop floor (`bench/floor_app.py`) is the ceiling "
        "of the gateway's shape: a producer process writes the same pre-encoded frames into a pipe, one "
        "`write` each, and a uvloop server reads them 1 MiB at a time, copies each out once and writes "
        "each read's frames in one `writelines` (no envelope, seq, UTF-8 check, replay buffer, store or "
        "JSON-RPC; the gateway does all of those on top).  The bytes cross a pipe and one more process, "
        "which on two cores the bare endpoint never pays for.",
    ])
    return body, goals(results)


# (workload, target ratio of events/s vs bare) and (workload, target ratio of server CPU per event vs bare)
THROUGHPUT_GOALS = (("relay64", 0.6), ("load64", 0.4), ("relay1", 1.0), ("tokens", 1.0))
CPU_GOALS = (("relay64", 2.0, "64 KiB event"), ("tokens", 1.5, "token event"))


def goals(results: Results) -> list[Goal]:
    out = []
    labels = {w.key: w.label for w in WORKLOADS}
    for sk in GATEWAYS:
        mode = "store on" if sk == "store" else "`--no-state`"
        for key, target in THROUGHPUT_GOALS:
            raw = spread(event_ratios(results, key, sk, "raw"))
            ws = spread(event_ratios(results, key, sk, "ws"))
            measured = (f"{raw[0]:.2f}× ({raw[1]:.2f}–{raw[2]:.2f}) with the raw client; `websockets` client "
                        f"{ws[0]:.2f}× ({ws[1]:.2f}–{ws[2]:.2f})")
            met = None if math.isnan(raw[0]) else raw[0] >= target
            out.append(Goal(f"relay throughput vs bare, {labels[key]} ({mode})", f"≥ {target:g}×", measured, met,
                            "" if met else _floor_note(results, key, sk)))
        for key, target, what in CPU_GOALS:
            r = spread(cpu_ratios(results, key, sk, "raw"))
            mine = median([m.us_per_event("server_cpu") for m in results.get((key, sk, "raw"), [])])
            theirs = median([m.us_per_event("server_cpu") for m in results.get((_bare_kind(key), "bare", "raw"), [])])
            met = None if math.isnan(r[0]) else r[0] <= target
            out.append(Goal(f"gateway server CPU per {what} vs the bare server's ({mode})", f"≤ {target:g}×",
                            f"{r[0]:.2f}× ({r[1]:.2f}–{r[2]:.2f}): {num(mine)} vs {num(theirs)} µs (raw client)",
                            met, "" if met else _floor_cpu_note(results, key)))
    return out


def _floor_note(results: Results, key: str, server: str) -> str:
    """Where the pipe-hop floor was, in the same rounds, for a throughput goal the gateway missed."""
    kind = _bare_kind(key)
    floor = spread(event_ratios(results, kind, "floor", "raw"))
    if kind not in FLOOR or math.isnan(floor[0]):
        return ""
    of_floor = spread(event_ratios(results, key, server, "raw", versus="floor"))
    return (f"the pipe-hop floor (a relay with the worker's pipe hop and nothing else) reached "
            f"{floor[0]:.2f}× ({floor[1]:.2f}–{floor[2]:.2f}) of bare in the same rounds (raw client); "
            f"the gateway {of_floor[0]:.2f}× ({of_floor[1]:.2f}–{of_floor[2]:.2f}) of the floor")


def _floor_cpu_note(results: Results, key: str) -> str:
    kind = _bare_kind(key)
    floor = spread(cpu_ratios(results, kind, "floor", "raw"))
    if kind not in FLOOR or math.isnan(floor[0]):
        return ""
    us = median([m.us_per_event("server_cpu") for m in results.get((kind, "floor", "raw"), [])])
    return (f"the pipe-hop floor's relay alone used {num(us)} µs per event, {floor[0]:.2f}× "
            f"({floor[1]:.2f}–{floor[2]:.2f}) the bare server's (it reads every byte from a pipe first)")
