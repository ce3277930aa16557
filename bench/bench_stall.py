"""1. Stall survival: turns that hold the GIL for seconds, in worker processes vs on a server thread.

Both servers run with a 2 s / 2 s WebSocket protocol ping on loopback (the clients too: ``websockets``
closes a connection whose pong is 2 s late).  N clients each own one session and submit
``cpu_s=20 gil=regex`` (single ``re`` calls that hold the GIL ~1.5 s each); every client also sends an
application-level ``gateway.ping`` every 250 ms.  Over a fixed observation window we count closed
connections, read the server's own loop-lag histogram, and time the pings.  A fresh server per run.
"""

from __future__ import annotations

import asyncio
import math
import os
import tempfile
import time
from dataclasses import dataclass

from bench.common import LagWindow, lag_buckets, lag_window
from bench.procs import PING, ServerProcess
from bench.report import Goal, Options, Section, ms, table
from bench.stats import median, percentile
from bench.wsclient import BenchClient
from gateway.config import Config

KEY = "stall"
PROMPT = "cpu_s=20 gil=regex"
PING_EVERY_S = 0.25
PING_GRACE_S = 2.0  # answers to pings still in flight at the end of the window are awaited this long
LOOP_LAG_INTERVAL_S = 0.1  # the monitor's sleep (gateway/looplag.py)
SIDES = ("worker-gateway", "in-process baseline")


@dataclass
class Run:
    side: str
    n: int
    closed: int
    lag_p50: float
    lag_p99: float
    lag_max: float
    lag_samples: int
    rtts: list[float]  # answered pings, and unanswered ones as the time they waited (lower bounds)
    pings_sent: int
    pings_answered: int


def _server(side: str, lag_log: str) -> ServerProcess:
    return ServerProcess.gateway() if side == SIDES[0] else ServerProcess.baseline("--lag-log", lag_log)


async def one_run(side: str, n: int, window_s: float) -> Run:
    with tempfile.TemporaryDirectory(prefix="wg-bench-") as tmp:
        lag_log = os.path.join(tmp, "lag.log")
        server = _server(side, lag_log)
        await asyncio.to_thread(server.start)
        clients: list[BenchClient] = []
        try:
            ping = (float(PING[0]), float(PING[1]))
            clients = [await BenchClient.open(server.ws_url(), ping=ping) for _ in range(n)]
            sessions = [(await c.call("session.create", agent="load", close_on_disconnect=True))["session_id"]
                        for c in clients]
            await asyncio.sleep(1.0)
            before = await lag_buckets(server)
            for c in clients:
                c.start_pinging(PING_EVERY_S)
            started = time.time()
            # All at once; a submit lost with its connection (the baseline can stall before answering) is
            # fine: the closed connection is what this benchmark counts.
            await asyncio.gather(*(c.submit(sid, PROMPT) for c, sid in zip(clients, sessions)),
                                 return_exceptions=True)
            await asyncio.sleep(window_s)
            for c in clients:
                await c.stop_pinging_sends()
            stats = [await c.stop_pinging(grace_s=PING_GRACE_S) for c in clients]
            closed = sum(1 for c in clients if c.closed)
            if side == SIDES[0]:
                lag = await lag_window(server, before)
            else:
                # Its loop may not answer /metrics for minutes: end it (ours) and read its sample log.
                await asyncio.to_thread(server.kill)
                lag = _lag_from_log(lag_log, since=started, until=time.time())
            rtts = [r for s in stats for r in s.lower_bounds()]
            return Run(side, n, closed, min(lag.p50, lag.max), min(lag.p99, lag.max), lag.max, lag.samples, rtts,
                       sum(s.sent for s in stats), sum(len(s.rtts) for s in stats))
        finally:
            if side != SIDES[0]:
                await asyncio.to_thread(server.kill)  # threads holding the GIL cannot be stopped otherwise
            await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
            await asyncio.to_thread(server.stop)


def _lag_from_log(path: str, since: float, until: float) -> LagWindow:
    """Exact percentiles of the baseline's lag samples after ``since``.  The stall in progress when the
    process was ended counts as one more sample (what the monitor would have recorded had it woken then)."""
    samples: list[tuple[float, float]] = []
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 2:
                samples.append((float(parts[0]), float(parts[1])))
    last = samples[-1][0] if samples else since
    lags = [lag for t, lag in samples if t >= since]
    pending = until - max(last, since) - LOOP_LAG_INTERVAL_S
    if pending > 0:
        lags.append(pending)
    return LagWindow(percentile(lags, 0.5), percentile(lags, 0.99), max(lags) if lags else math.nan, len(lags))


async def run(opts: Options) -> Section:
    rounds = opts.pick(3, 1)
    window_s = 6.0 if opts.quick else 12.0
    counts = (1, 8)
    runs: list[Run] = []
    started = time.perf_counter()
    for r in range(rounds):
        for n in counts:
            order = SIDES if r % 2 == 0 else tuple(reversed(SIDES))
            for side in order:
                result = await one_run(side, n, window_s)
                runs.append(result)
                print(f"  stall round {r + 1}/{rounds} {side} N={n}: closed {result.closed}, lag p99 "
                      f"{ms(result.lag_p99)} ms, max {ms(result.lag_max)} ms, ping p99 "
                      f"{ms(percentile(result.rtts, 0.99))} ms", flush=True)
    rows = []
    summary: dict[tuple[str, int], dict[str, float]] = {}
    for n in counts:
        for side in SIDES:
            mine = [x for x in runs if x.side == side and x.n == n]
            closed = sum(x.closed for x in mine)
            total = sum(x.n for x in mine)
            answered = sum(x.pings_answered for x in mine)
            sent = sum(x.pings_sent for x in mine)
            bound = "≥ " if answered < sent else ""
            s = {
                "closed": closed,
                "lag_p50": median([x.lag_p50 for x in mine]),
                "lag_p99": median([x.lag_p99 for x in mine]),
                "lag_max": median([x.lag_max for x in mine]),
                "ping_p50": median([percentile(x.rtts, 0.5) for x in mine]),
                "ping_p99": median([percentile(x.rtts, 0.99) for x in mine]),
                "bound": bound,
            }
            summary[(side, n)] = s
            rows.append((side, n, f"{closed} of {total}", ms(s["lag_p50"]), ms(s["lag_p99"]), ms(s["lag_max"]),
                         bound + ms(s["ping_p50"]), bound + ms(s["ping_p99"]), f"{answered} / {sent}"))
    ratio_rows = []
    for n in counts:
        gw, base = summary[(SIDES[0], n)], summary[(SIDES[1], n)]
        ratio_rows.append((n, _ratio(base["lag_p99"], gw["lag_p99"]),
                           base["bound"] + _ratio(base["ping_p99"], gw["ping_p99"])))
    body = "\n\n".join([
        f"`{PROMPT}` in every session, {window_s:g} s observation window per run, protocol ping "
        f"{PING[0]} s / {PING[1]} s on both ends, `gateway.ping` every {PING_EVERY_S * 1000:.0f} ms on every "
        f"connection; {rounds} round(s), sides alternating, a fresh server per run; medians over rounds "
        "(connections closed: total).",
        table(("server", "N sessions", "connections closed", "loop lag p50 (ms)", "loop lag p99 (ms)",
               "loop lag max (ms)", "ping RTT p50 (ms)", "ping RTT p99 (ms)", "pings answered / sent"), rows),
        "How much worse the in-process baseline is, same run (baseline ÷ gateway, medians):",
        table(("N sessions", "loop lag p99", "ping RTT p99"), ratio_rows),
        "Loop lag comes from each server's own monitor (`gateway/looplag.py`: a task that sleeps 100 ms and "
        "records how late it wakes).  Gateway: p50/p99 interpolated (as Prometheus' `histogram_quantile`) "
        "from the delta of `wg_loop_lag_seconds` over the window, max from `/healthz` capped by the highest "
        "non-empty bucket of that delta.  Baseline: its stalled loop cannot answer `/metrics` for minutes, so "
        "it logs every sample to a file and the percentiles are exact; the stall still in progress when the "
        "window ends counts as one more sample.  A ping still unanswered "
        f"{PING_GRACE_S:g} s after the window, or lost with its connection, counts as the time it had "
        "waited, a lower bound of its round trip: those percentiles are marked ≥.",
    ])
    gw8 = summary[(SIDES[0], 8)]
    gw_closed = sum(summary[(SIDES[0], n)]["closed"] for n in counts)
    base_closed = sum(summary[(SIDES[1], n)]["closed"] for n in counts)
    lag_note = ""
    if not gw8["lag_p99"] < 0.020:
        lag_note = (f"the loop only answers pings here, so the lag is time spent waiting for a CPU: 8 workers "
                    f"(nice {Config().worker_nice}) burning {os.cpu_count()} cores, plus whatever else ran (load average "
                    f"{os.getloadavg()[0]:.1f} at the end of this benchmark)")
    goals = [
        Goal("loop lag p99, 8 sessions burning the GIL", "< 20 ms", f"{ms(gw8['lag_p99'])} ms "
             f"(max {ms(gw8['lag_max'])} ms; baseline {ms(summary[(SIDES[1], 8)]['lag_p99'])} ms)",
             gw8["lag_p99"] < 0.020, lag_note),
        Goal("connections closed under GIL-holding turns", "0 (baseline expected to lose some)",
             f"gateway {gw_closed}, baseline {base_closed} (of {sum(x.n for x in runs) // 2} each)", gw_closed == 0),
    ]
    return Section(KEY, "1. Stall survival vs the in-process baseline",
                   ".venv/bin/python -m bench --only stall", body, goals, time.perf_counter() - started)


def _ratio(a: float, b: float) -> str:
    if not b or a != a or b != b:
        return "–"
    return f"{a / b:,.0f}×"
