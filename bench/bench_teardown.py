"""4. Teardown: the owner of a ``close_on_disconnect`` session disconnects → its process group is gone.

Each sample: a new connection creates the session, the members of the worker's process group are listed
(the worker, its watchdog, whatever the turn started), then the client closes its WebSocket and the
benchmark polls (every 0.5 ms) until every one of those processes has exited.  Three situations: an idle
session, a turn holding the GIL in a ``re`` call, and a ``shell`` turn with a child process.  Then a
burst: 64 ``shell`` sessions, each with a background ``sleep``, closed at once (``session.close``), with
the gateway's own loop lag over it: many teardowns at once must not take the loop's CPU.
"""

from __future__ import annotations

import asyncio
import time

from bench.common import lag_buckets, lag_window, running
from bench.procs import ServerProcess, all_dead, group_members
from bench.rawclient import RawClient
from bench.report import Goal, Options, Section, ms, table
from bench.stats import percentile
from bench.wsclient import BenchClient

KEY = "teardown"
_VARIANTS = (
    # label, agent, prompt (None: idle)
    ("idle session (`echo`)", "echo", None),
    ("turn holding the GIL (`load cpu_s=60 gil=regex`)", "load", "cpu_s=60 gil=regex"),
    ("`shell` turn running `sleep 60` (a child in the group)", "shell", "sleep 60"),
)


async def until_gone(pids: list[int], deadline: float, poll_s: float, what: str) -> None:
    """Poll until every one of ``pids`` has exited; TimeoutError at ``deadline`` (``perf_counter``)."""
    while not all_dead(pids):
        if time.perf_counter() > deadline:
            raise TimeoutError(f"{what}: still alive at the deadline: {pids}")
        await asyncio.sleep(poll_s)


async def one_sample(gateway: ServerProcess, agent: str, prompt: str | None) -> tuple[float, int]:
    client = await BenchClient.open(gateway.ws_url())
    created = await client.call("session.create", agent=agent, close_on_disconnect=True)
    pgid = created["worker_pid"]
    if prompt is not None:
        await client.submit(created["session_id"], prompt)
        await asyncio.sleep(0.5)  # the turn is under way (the regex call or the child is running)
    members = await asyncio.to_thread(group_members, pgid)
    started = time.perf_counter()
    await client.ws.close()
    await until_gone(members, started + 30, 0.0005, f"process group {pgid} after the disconnect")
    elapsed = time.perf_counter() - started
    await client.close()
    return elapsed, len(members)


BURST = 64


async def burst_sample(gateway: ServerProcess, n: int) -> tuple[float, float, float]:
    """``n`` sessions closed at once: (seconds until every close was answered, until every process of
    every group was gone, the loop lag max meanwhile)."""
    clients = await asyncio.gather(*(RawClient.open(gateway.ws_url()) for _ in range(n)))
    try:
        created = []
        for i in range(0, n, 8):  # a few at a time, as users arrive
            created += await asyncio.gather(*(c.call("session.create", agent="shell") for c in clients[i:i + 8]))
        turns = [await c.submit(s["session_id"], "sleep 60 &") for c, s in zip(clients, created)]
        await asyncio.gather(*turns)
        members = [pid for s in created for pid in await asyncio.to_thread(group_members, s["worker_pid"])]
        before = await lag_buckets(gateway)
        started = time.perf_counter()
        await asyncio.gather(*(c.call("session.close", session_id=s["session_id"]) for c, s in zip(clients, created)))
        answered = time.perf_counter() - started
        await until_gone(members, started + 60, 0.005, f"the processes of {n} sessions closed at once")
        gone = time.perf_counter() - started
        lag = await lag_window(gateway, before)
        return answered, gone, lag.max
    finally:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


async def run(opts: Options) -> Section:
    counts = (6, 2, 2) if opts.quick else (20, 8, 8)
    started = time.perf_counter()
    results: dict[str, list[float]] = {}
    members: dict[str, list[int]] = {}
    async with running(ServerProcess.gateway(ping=False)) as gateway:
        for (label, agent, prompt), count in zip(_VARIANTS, counts):
            for _ in range(count):
                elapsed, n = await one_sample(gateway, agent, prompt)
                results.setdefault(label, []).append(elapsed)
                members.setdefault(label, []).append(n)
            print(f"  teardown {label}: p50 {ms(percentile(results[label], 0.5))} ms, "
                  f"max {ms(max(results[label]))} ms", flush=True)
        bursts = []
        for _ in range(1 if opts.quick else 3):
            bursts.append(await burst_sample(gateway, BURST))
            print(f"  teardown burst of {BURST}: answered {bursts[-1][0]:.2f} s, gone {bursts[-1][1]:.2f} s, "
                  f"loop lag max {ms(bursts[-1][2])} ms", flush=True)
    rows = [(label, len(v), f"{min(members[label])}–{max(members[label])}", ms(percentile(v, 0.5)),
             ms(percentile(v, 0.99)), ms(max(v))) for label, v in results.items()]
    every = [x for v in results.values() for x in v]
    idle = results[_VARIANTS[0][0]]
    body = "\n\n".join([
        "Time from the client's close to the last process of the session's group exiting (gateway "
        "defaults: SIGTERM to the group, SIGKILL after `--kill-grace-s` 2 s if anything is left).",
        table(("session", "samples", "processes in the group", "p50 (ms)", "p99 (ms)", "max (ms)"), rows),
        f"A burst: {BURST} `shell` sessions, each with a background `sleep 60`, closed at once with "
        "`session.close` (one connection each); per run, the time until every close was answered, until "
        "every process of every group was gone, and the gateway's loop lag max meanwhile (its own monitor, "
        "capped by the histogram delta of the window).",
        table(("run", "closes answered (s)", "every process gone (s)", "loop lag max (ms)"),
              [(str(i + 1), f"{a:.2f}", f"{g:.2f}", ms(lag)) for i, (a, g, lag) in enumerate(bursts)]),
    ])
    goals = [Goal("teardown p99 (disconnect → process group gone)", "< 500 ms",
                  f"{ms(percentile(idle, 0.99))} ms idle; {ms(percentile(every, 0.99))} ms over all three kinds",
                  percentile(every, 0.99) < 0.5,
                  "" if percentile(every, 0.99) < 0.5 else "see the table: which kind of session was slow")]
    return Section(KEY, "4. Teardown", ".venv/bin/python -m bench --only teardown", body, goals,
                   time.perf_counter() - started)
