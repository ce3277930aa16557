"""6. The store in the gateway: the same gateway with its store on (a temporary state dir) and with
``--no-state``, side by side in one run, rounds alternated (issue 14's store section).

Three measurements, each on both gateways in turn (order reversed every other round):

- *latency*: short ``echo`` turns one after another on an otherwise idle gateway; the time from sending
  ``prompt.submit`` to receiving its ``turn.complete``.  With the store on every event of the turn is
  sent only once the writer process reports it durable, so the difference is the delivery latency the
  store adds.
- *load*: ``SESSIONS`` sessions, each on its own connection, run ``echo`` turns of ``WORDS`` words, one
  turn every ``PACE_S`` per session (back to back if a turn takes longer), for a few seconds; the loop
  lag is the delta of the gateway's own ``wg_loop_lag_seconds`` histogram over the window (the monitor
  that bench_stall and bench_scale read too).  CPU per process over the window: gateway, writer, workers.
- *saturated relay*: the relay-only agent (``bench.agents:RelayOnly``) as fast as it goes, 64 KiB and
  1 KiB events, as in section 2; CPU per process including the writer.

Each gateway is spawned by ``bench.procs`` exactly as users start it; the store side gets its own
temporary ``--state-dir``, removed afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from bench.common import lag_buckets, lag_window, running_gateway, writer_pid
from bench.procs import ServerProcess, cpu_seconds
from bench.report import Goal, Options, Section, ms, num, table
from bench.stats import Buckets, bucket_delta, histogram_quantile, median, percentile
from bench.wsclient import BenchClient

KEY = "store_gateway"
STORE, NO_STATE = "store on", "--no-state"
SIDES = (STORE, NO_STATE)
SESSIONS = 6
WORDS = 40
PACE_S = 0.05
LATENCY_PROMPT = "latency probe one two"


@dataclass
class Side:
    """Everything measured on one gateway, one list entry per round."""

    latency_p50: list[float] = field(default_factory=list)
    latency_p99: list[float] = field(default_factory=list)
    lag_p50: list[float] = field(default_factory=list)
    lag_p99: list[float] = field(default_factory=list)
    lag_max: list[float] = field(default_factory=list)
    load_events_s: list[float] = field(default_factory=list)
    load_turn_p50: list[float] = field(default_factory=list)
    load_turn_p99: list[float] = field(default_factory=list)
    load_cpu: list[dict[str, float]] = field(default_factory=list)  # process -> share of one core
    lag_pooled: Buckets = field(default_factory=list)  # the lag histogram summed over every round's window
    relay: dict[int, list[Transfer]] = field(default_factory=dict)  # chunk KiB -> transfers


@dataclass
class Transfer:
    seconds: float
    event_bytes: int
    events: int
    cpu: dict[str, float]  # process -> CPU seconds during the transfer

    @property
    def mib_s(self) -> float:
        return self.event_bytes / self.seconds / 2**20

    def share(self, process: str) -> float:
        return self.cpu.get(process, 0.0) / self.seconds


class Gateway:
    """A spawned gateway with the sessions the measurements use."""

    def __init__(self, server: ServerProcess, state_dir: str | None) -> None:
        self.server = server
        self.state_dir = state_dir
        self.store = state_dir is not None
        self.control: BenchClient | None = None
        self.load_clients: list[BenchClient] = []
        self.latency_session = ""
        self.load_sessions: list[str] = []
        self.load_workers: list[int] = []
        self.relay_session = ""
        self.relay_worker = 0
        self.writer = 0

    async def open(self) -> None:
        self.control = await BenchClient.open(self.server.ws_url())
        self.latency_session = (await self.control.call("session.create", agent="echo"))["session_id"]
        created = await self.control.call("session.create", agent="bench.agents:RelayOnly")
        self.relay_session, self.relay_worker = created["session_id"], created["worker_pid"]
        self.load_clients = list(await asyncio.gather(*(BenchClient.open(self.server.ws_url())
                                                        for _ in range(SESSIONS))))
        for client in self.load_clients:
            made = await client.call("session.create", agent="echo")
            self.load_sessions.append(made["session_id"])
            self.load_workers.append(made["worker_pid"])
        self.writer = writer_pid(self.server.pid) if self.store else 0
        if self.store and not self.writer:
            raise RuntimeError("the store-on gateway has no writer process (is the store off?)")

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in [*self.load_clients, *([self.control] if self.control else [])]),
                             return_exceptions=True)

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far of the gateway, its writer and the load sessions' workers."""
        out = {"gateway": cpu_seconds([self.server.pid]), "workers": cpu_seconds(self.load_workers),
               "relay worker": cpu_seconds([self.relay_worker])}
        if self.writer:
            out["writer"] = cpu_seconds([self.writer])
        out["client"] = time.process_time()
        return out


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after}


@contextlib.asynccontextmanager
async def spawned(store: bool) -> AsyncIterator[Gateway]:
    """A gateway with the store on (its own temporary state dir, removed afterwards) or ``--no-state``."""
    async with running_gateway(store=store, ping=False) as server:
        # The last --state-dir is the one in force (the spawn helper may put a default one first).
        dirs = [a.split("=", 1)[1] for a in server.argv if a.startswith("--state-dir=")]
        state_dir = dirs[-1] if store and dirs else None
        gateway = Gateway(server, state_dir)
        try:
            await gateway.open()
            yield gateway
        finally:
            await gateway.close()


# Measurements ---------------------------------------------------------------------------------------------
async def measure_latency(gw: Gateway, turns: int) -> tuple[float, float]:
    """p50, p99 of submit → turn.complete of a short echo turn, one at a time."""
    assert gw.control is not None
    samples = []
    for _ in range(turns + 2):
        started = time.perf_counter()
        done = await gw.control.submit(gw.latency_session, LATENCY_PROMPT)
        result = await asyncio.wait_for(done, 60)
        samples.append(time.perf_counter() - started)
        assert result["status"] == "ok", result
    samples = samples[2:]  # the first turns warm the path
    return percentile(samples, 0.5), percentile(samples, 0.99)


async def _paced_turns(client: BenchClient, session_id: str, until: float, prompt: str) -> list[float]:
    loop = asyncio.get_running_loop()
    latencies = []
    next_at = loop.time()
    while loop.time() < until:
        started = time.perf_counter()
        done = await client.submit(session_id, prompt)
        result = await asyncio.wait_for(done, 120)
        latencies.append(time.perf_counter() - started)
        assert result["status"] == "ok", result
        next_at += PACE_S
        await asyncio.sleep(max(0.0, next_at - loop.time()))
    return latencies


async def measure_load(gw: Gateway, seconds: float, side: Side) -> None:
    prompt = " ".join(f"word{i}" for i in range(WORDS))
    before = await lag_buckets(gw.server)
    for c in gw.load_clients:
        c.reset_counters()
    cpu0 = gw.cpu()
    started = time.perf_counter()
    until = asyncio.get_running_loop().time() + seconds
    per_session = await asyncio.gather(*(_paced_turns(c, s, until, prompt)
                                         for c, s in zip(gw.load_clients, gw.load_sessions)))
    elapsed = time.perf_counter() - started
    cpu = _delta(gw.cpu(), cpu0)
    after = await lag_buckets(gw.server)
    lag = await lag_window(gw.server, before)
    window = bucket_delta(after, before)
    side.lag_pooled = [(le, c + dict(side.lag_pooled).get(le, 0.0)) for le, c in window]
    latencies = [x for one in per_session for x in one]
    side.lag_p50.append(min(lag.p50, lag.max))
    side.lag_p99.append(min(lag.p99, lag.max))
    side.lag_max.append(lag.max)
    side.load_events_s.append(sum(c.counters.events for c in gw.load_clients) / elapsed)
    side.load_turn_p50.append(percentile(latencies, 0.5))
    side.load_turn_p99.append(percentile(latencies, 0.99))
    side.load_cpu.append({k: v / elapsed for k, v in cpu.items() if k != "relay worker"})


async def measure_relay(gw: Gateway, mb: float, kb: int) -> Transfer:
    assert gw.control is not None
    counters = gw.control.reset_counters()
    cpu0 = gw.cpu()
    started = time.perf_counter()
    done = await gw.control.submit(gw.relay_session, f"mb={mb:g} chunk_kb={kb}")
    result = await asyncio.wait_for(done, 600)
    seconds = time.perf_counter() - started
    assert result["status"] == "ok", result
    cpu = _delta(gw.cpu(), cpu0)
    cpu.pop("workers", None)
    return Transfer(seconds, counters.event_bytes, counters.events, cpu)


def measure_fsync(directory: str, count: int = 50) -> tuple[float, float]:
    """p50, p99 seconds of a 4 KiB write + fsync in ``directory``: the floor under every commit."""
    samples = []
    fd, path = tempfile.mkstemp(prefix="fsync-", dir=directory)
    try:
        block = b"x" * 4096
        for _ in range(count):
            started = time.perf_counter()
            os.write(fd, block)
            os.fsync(fd)
            samples.append(time.perf_counter() - started)
    finally:
        os.close(fd)
        os.unlink(path)
    return percentile(samples, 0.5), percentile(samples, 0.99)


# Report ---------------------------------------------------------------------------------------------------
def _range(values: list[float], fmt) -> str:  # type: ignore[no-untyped-def]
    """Median, and the range over rounds when there is more than one."""
    clean = [v for v in values if v == v]
    if not clean:
        return "–"
    if len(clean) == 1:
        return fmt(clean[0])
    return f"{fmt(median(clean))} ({fmt(min(clean))}–{fmt(max(clean))})"


def _ms(digits: int = 1):  # type: ignore[no-untyped-def]
    return lambda s: ms(s, digits)


def _pct(share: float) -> str:
    return f"{share:.0%}"


async def run(opts: Options) -> Section:
    rounds = opts.pick(5, 1)
    latency_turns = 20 if opts.quick else 60
    load_s = 3.0 if opts.quick else 6.0
    big_mb, small_mb = (50, 5) if opts.quick else (200, 20)
    started = time.perf_counter()
    sides = {name: Side() for name in SIDES}
    async with spawned(store=True) as with_store, spawned(store=False) as without:
        gateways = {STORE: with_store, NO_STATE: without}
        fsync_s = await asyncio.to_thread(measure_fsync, str(with_store.state_dir))
        for gw in gateways.values():  # warm-up, not measured
            await measure_latency(gw, 3)
            await measure_relay(gw, 2, 64)
        for r in range(rounds):
            order = list(SIDES) if r % 2 == 0 else list(reversed(SIDES))
            for name in order:
                p50, p99 = await measure_latency(gateways[name], latency_turns)
                sides[name].latency_p50.append(p50)
                sides[name].latency_p99.append(p99)
            for name in order:
                await measure_load(gateways[name], load_s, sides[name])
            for kb, mb in ((64, big_mb), (1, small_mb)):
                for name in order:
                    t = await measure_relay(gateways[name], mb, kb)
                    sides[name].relay.setdefault(kb, []).append(t)
            s, n = sides[STORE], sides[NO_STATE]
            print(f"  store_gateway round {r + 1}/{rounds}: latency p50 {ms(s.latency_p50[-1], 2)} vs "
                  f"{ms(n.latency_p50[-1], 2)} ms; lag p99 {ms(s.lag_p99[-1])} vs {ms(n.lag_p99[-1])} ms; "
                  f"64 KiB {s.relay[64][-1].mib_s:.0f} vs {n.relay[64][-1].mib_s:.0f} MiB/s; "
                  f"1 KiB {s.relay[1][-1].mib_s:.1f} vs {n.relay[1][-1].mib_s:.1f} MiB/s", flush=True)
    return _section(sides, rounds, latency_turns, load_s, big_mb, small_mb, fsync_s, time.perf_counter() - started)


def _section(sides: dict[str, Side], rounds: int, latency_turns: int, load_s: float, big_mb: float,
             small_mb: float, fsync_s: tuple[float, float], seconds: float) -> Section:
    s, n = sides[STORE], sides[NO_STATE]
    added_p50 = [a - b for a, b in zip(s.latency_p50, n.latency_p50)]
    added_p99 = [a - b for a, b in zip(s.latency_p99, n.latency_p99)]
    lag_diff = [a - b for a, b in zip(s.lag_p99, n.lag_p99)]
    ratios = {kb: [a.mib_s / b.mib_s for a, b in zip(s.relay[kb], n.relay[kb])] for kb in (64, 1)}

    def signed(values: list[float]) -> str:
        return _range(values, lambda v: f"{v * 1000:+.2f}")

    latency_rows = [(name, _range(side.latency_p50, _ms(2)), _range(side.latency_p99, _ms(2)))
                    for name, side in sides.items()]
    latency_rows.append(("added by the store (per-round difference)", signed(added_p50), signed(added_p99)))

    def cpu_cell(side: Side, process: str) -> str:
        values = [c[process] for c in side.load_cpu if process in c]
        return _range(values, _pct) if values else "–"

    load_rows = [(name, _range(side.load_events_s, lambda v: num(v, 0)), _range(side.lag_p50, _ms()),
                  _range(side.lag_p99, _ms()), _range(side.lag_max, _ms()), _range(side.load_turn_p50, _ms()),
                  _range(side.load_turn_p99, _ms()), cpu_cell(side, "gateway"), cpu_cell(side, "writer"),
                  cpu_cell(side, "workers"), cpu_cell(side, "client"))
                 for name, side in sides.items()]
    load_rows.append(("store minus --no-state (per round)", "", "", signed(lag_diff), "", "", "", "", "", "", ""))

    relay_rows = []
    for kb, mb in ((64, big_mb), (1, small_mb)):
        for name, side in sides.items():
            ts = side.relay[kb]

            def share(process: str, ts: list[Transfer] = ts) -> str:
                values = [t.share(process) for t in ts if process in t.cpu]
                return _range(values, _pct) if values else "–"

            relay_rows.append((f"{name}, {kb} KiB", f"`bench.agents:RelayOnly mb={mb:g} chunk_kb={kb}`",
                               _range([t.mib_s for t in ts], lambda v: num(v)),
                               _range([t.events / t.seconds for t in ts], lambda v: num(v, 0)),
                               _range(ratios[kb], lambda v: f"{v:.2f}") if name == STORE else "1",
                               share("gateway"), share("writer"), share("relay worker"), share("client"),
                               _range([sum(t.cpu.values()) / t.seconds for t in ts], _pct)))

    body = "\n\n".join([
        f"Two gateways side by side in one run: the store on (a temporary `--state-dir`: the writer process, "
        f"WAL, `synchronous=FULL`, an event sent only once durable) and `--no-state`; {rounds} round(s), the "
        "two sides taking turns in each measurement (order reversed every other round); medians, ranges over "
        "rounds in brackets; differences and ratios are per round, then the median.",
        f"**Delivery latency.** {latency_turns} `echo` turns of four words, one after another, on an otherwise "
        "idle gateway: the time from sending `prompt.submit` to receiving its `turn.complete`.  For scale: one "
        f"4 KiB write + `fsync` in the state dir's filesystem takes {ms(fsync_s[0], 2)} ms (p50; p99 "
        f"{ms(fsync_s[1], 2)} ms, 50 samples), and every commit of the writer ends in one.",
        table(("gateway", "submit → turn.complete p50 (ms)", "p99 (ms)"), latency_rows),
        f"**Loop lag at a realistic rate.** {SESSIONS} sessions, each on its own connection, run `echo` turns "
        f"of {WORDS} words ({WORDS} `message.delta` events and the turn's own events), one turn every "
        f"{PACE_S * 1000:.0f} ms per session (back to back when a turn takes longer), for {load_s:g} s.  "
        "Loop lag: the delta of the gateway's `wg_loop_lag_seconds` histogram over the window (a sample "
        "every 100 ms).  CPU: share of one core over the window; *workers* is the sum of the six sessions' "
        "workers, *client* the benchmark process driving all connections.",
        table(("gateway", "events/s delivered", "loop lag p50 (ms)", "loop lag p99 (ms)", "loop lag max (ms)",
               "turn p50 (ms)", "turn p99 (ms)", "gateway CPU", "writer CPU", "workers CPU", "client CPU"),
              load_rows),
        "**Saturated relay.** The relay-only agent (constant unscrubbed chunks, section 2) on one session as "
        "fast as the path goes; the store side writes every event to SQLite and sends it once durable.",
        table(("gateway", "what is sent", "MiB/s", "events/s", "× --no-state", "gateway CPU", "writer CPU",
               "worker CPU", "client CPU", "CPU, all"), relay_rows),
    ])
    pooled = {name: histogram_quantile(0.99, side.lag_pooled) for name, side in sides.items()}
    lag_d = pooled[STORE] - pooled[NO_STATE]
    lat_d = median(added_p50)
    samples = int(s.lag_pooled[-1][1]) if s.lag_pooled else 0
    latency_note = ""
    if lat_d > 0.002:
        latency_note = (f"fsync: one 4 KiB write + `fsync` in the state dir's filesystem takes {ms(fsync_s[0], 2)} ms "
                        f"(p50; p99 {ms(fsync_s[1], 2)} ms) on this machine, and a turn's last event is sent only "
                        "after the commit that holds it (each commit ends in an fsync of the WAL, "
                        "`synchronous=FULL`)")
    goals = [
        Goal("store: loop lag p99 at a realistic rate, store on vs `--no-state`", "within 2 ms",
             f"{ms(pooled[STORE])} vs {ms(pooled[NO_STATE])} ms ({lag_d * 1000:+.1f} ms; p99 of the {samples} "
             f"samples of all rounds; per-round difference median {median(lag_diff) * 1000:+.1f} ms, range "
             f"{min(lag_diff) * 1000:+.1f} to {max(lag_diff) * 1000:+.1f})", lag_d <= 0.002),
        Goal("store: delivery latency added (short `echo` turn, submit → turn.complete p50)", "≤ 2 ms",
             f"{lat_d * 1000:+.2f} ms ({ms(median(s.latency_p50), 2)} vs {ms(median(n.latency_p50), 2)} ms; "
             f"p99 {median(added_p99) * 1000:+.1f} ms)", lat_d <= 0.002, latency_note),
    ]
    for kb in (64, 1):
        r = median(ratios[kb])
        note = ""
        if r < 0.7:
            st = s.relay[kb]
            note = (f"with the store on the writer process used {median([t.share('writer') for t in st]):.0%} of a "
                    f"core and the gateway {median([t.share('gateway') for t in st]):.0%}; all processes together "
                    f"{median([sum(t.cpu.values()) / t.seconds for t in st]):.0%} of {(os.cpu_count() or 1) * 100}%, so the "
                    "stream is not CPU-bound: the writer commits one batch after another, each written into the "
                    "WAL and ended by an fsync, and an event is sent only once its commit is acknowledged (the "
                    "writer's saturated rate alone is in the store section; docs/store.md)")
        goals.append(Goal(f"store: saturated relay throughput, relay-only {kb} KiB events", "≥ 0.7× `--no-state`",
                          f"{r:.2f}× ({num(median([t.mib_s for t in s.relay[kb]]))} vs "
                          f"{num(median([t.mib_s for t in n.relay[kb]]))} MiB/s; per-round "
                          f"{min(ratios[kb]):.2f}–{max(ratios[kb]):.2f})", r >= 0.7, note))
    return Section(KEY, "6. The store in the gateway: store on vs `--no-state`",
                   ".venv/bin/python -m bench --only store_gateway", body, goals, seconds)
