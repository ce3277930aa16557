"""Store: append throughput and acknowledgement latency of the session store's writer process.

The benchmark drives :class:`gateway.store.EventStore` directly (a temporary state dir, the real writer
process, WAL with ``synchronous=FULL``), from one event loop, the way the gateway does:

- *acknowledgement latency* at realistic rates: events are appended on a 5 ms tick at a fixed rate, and
  each event's time from ``append`` to its ``on_durable`` callback is recorded (this is the delivery
  latency the store adds, since an event is sent only once durable), together with the loop's lateness
  on a 5 ms ticker (what the store costs the relay);
- *saturated throughput*: events are appended as fast as the store acknowledges them, with at most
  8 MiB not yet durable (the gateway's backpressure), until a fixed volume is durable.

Run alone: ``.venv/bin/python -m bench.bench_store [--quick]``; ``make bench`` hooks ``run(opts)``.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

from bench.report import Goal, Options, Section, ms, num, run_alone, table
from bench.stats import percentile
from gateway.store import EventStore

KEY = "store"
TICK_S = 0.005
WINDOW_BYTES = 8 * 1024 * 1024
#: (label, events per second, bytes per event)
RATES = (
    ("2,000 small events/s (1 KiB)", 2000, 1024),
    ("20 MiB/s in 16 KiB chunks", 1280, 16 * 1024),
)
SIZES = (("1 KiB events", 1024), ("64 KiB events", 64 * 1024))


class _Probe:
    """Acknowledgement times per appended seq, for one session."""

    def __init__(self) -> None:
        self.sent: deque[tuple[int, float]] = deque()
        self.latencies: list[float] = []
        self.durable = 0

    def on_durable(self, seqs: dict[str, int]) -> None:
        now = time.perf_counter()
        seq = seqs.get("bench")
        if seq is None:
            return
        self.durable = seq
        while self.sent and self.sent[0][0] <= seq:
            self.latencies.append(now - self.sent.popleft()[1])


def _payload(size: int) -> bytes:
    head = b'{"type":"tool.output","text":"'
    return head + b"x" * max(0, size - len(head) - 2) + b'"}'


async def _with_store(probe: _Probe, state_dir: Path) -> EventStore:
    return await EventStore.open(state_dir, on_durable=probe.on_durable, retention_s=30 * 86400.0,
                                 max_bytes=1 << 40)


async def measure_rate(rate: int, size: int, seconds: float) -> tuple[list[float], list[float]]:
    """Acknowledgement latencies and loop lateness while appending ``rate`` events/s of ``size`` bytes."""
    probe = _Probe()
    data = _payload(size)
    lateness: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        store = await _with_store(probe, Path(tmp))
        try:
            loop = asyncio.get_running_loop()
            start = loop.time()
            seq = 0
            tick = 0
            while loop.time() - start < seconds:
                tick += 1
                due = start + tick * TICK_S
                await asyncio.sleep(max(0.0, due - loop.time()))
                lateness.append(max(0.0, loop.time() - due))
                target = int((loop.time() - start) * rate)
                while seq < target:
                    seq += 1
                    probe.sent.append((seq, time.perf_counter()))
                    store.append("bench", seq, "tool.output", data)
            deadline = loop.time() + 60
            while probe.durable < seq and loop.time() < deadline:
                await asyncio.sleep(0.001)
        finally:
            await store.close()
    return probe.latencies, lateness


async def measure_throughput(size: int, total_bytes: int) -> tuple[float, float]:
    """(events per second, MiB per second) appending as fast as acknowledgements allow."""
    probe = _Probe()
    data = _payload(size)
    count = max(1, total_bytes // size)
    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        store = await _with_store(probe, Path(tmp))
        try:
            started = time.perf_counter()
            seq = 0
            while seq < count:
                while store.pending_bytes < WINDOW_BYTES and seq < count:
                    seq += 1
                    store.append("bench", seq, "tool.output", data)
                await asyncio.sleep(0)
            while probe.durable < count:
                await asyncio.sleep(0.0005)
            elapsed = time.perf_counter() - started
        finally:
            await store.close()
    return count / elapsed, count * size / elapsed / (1024 * 1024)


async def run(opts: Options) -> Section:
    started = time.perf_counter()
    seconds = 3.0 if opts.quick else 10.0
    volume = (64 if opts.quick else 256) * 1024 * 1024
    latency_rows = []
    all_p50: list[float] = []
    for label, rate, size in RATES:
        latencies, lateness = await measure_rate(rate, size, seconds)
        p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
        all_p50.append(p50)
        latency_rows.append((label, len(latencies), ms(p50, 2), ms(p99, 2), ms(max(latencies, default=float("nan")), 1),
                             ms(percentile(lateness, 0.99), 2)))
        print(f"  store {label}: ack p50 {ms(p50, 2)} ms, p99 {ms(p99, 2)} ms", flush=True)
    throughput_rows = []
    for label, size in SIZES:
        per_s, mib_s = await measure_throughput(size, volume)
        throughput_rows.append((label, num(per_s, 0), num(mib_s, 1)))
        print(f"  store saturated {label}: {num(per_s, 0)} events/s, {num(mib_s, 1)} MiB/s", flush=True)
    body = "\n\n".join([
        "The session store's writer process alone (`gateway/store/`): WAL, `synchronous=FULL`, group "
        f"commit. Acknowledgement latency = `append` to its `on_durable` callback, at a fixed rate for "
        f"{seconds:g} s; loop lateness = how late a 5 ms ticker on the same loop fired.",
        table(("rate", "events", "ack p50 (ms)", "ack p99 (ms)", "ack max (ms)", "loop lateness p99 (ms)"),
              latency_rows),
        f"Saturated: {volume // (1024 * 1024)} MiB appended as fast as acknowledged, at most "
        f"{WINDOW_BYTES // (1024 * 1024)} MiB not yet durable.",
        table(("events", "events/s", "MiB/s"), throughput_rows),
    ])
    worst = max(all_p50)
    goals = [Goal("store acknowledgement p50 at realistic rates", "<= 2 ms", f"{ms(worst, 2)} ms (worst rate)",
                  worst <= 0.002, "" if worst <= 0.002 else "see the table: which rate was slow")]
    return Section(KEY, "7. The store's writer process alone", ".venv/bin/python -m bench --only store", body, goals, time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    return run_alone("python -m bench.bench_store", __doc__ or "", run, argv, "shorter windows, less volume")


if __name__ == "__main__":
    sys.exit(main())
