"""One load-test run: a client and a task per session, turns bounded by ``--concurrency``, every event
recorded by seq, and the probes beside them (``probes.py``); ``run_load`` returns the report."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gateway.client import ConnectionLost, GatewayClient, GatewayError, ReconnectPolicy, ReplayTruncated
from gateway.loadtest.probes import chaos, metrics_text, pinger, sampler
from gateway.loadtest.report import build_report
from gateway.loadtest.target import Target, check_target

if TYPE_CHECKING:
    from gateway.loadtest.progress import Progress


# What each turn asks -----------------------------------------------------------------------------------
def turns_per_session(args: argparse.Namespace) -> int:
    """Turns each session runs; 0 means until ``--duration`` is over."""
    if args.turns is not None:
        return args.turns
    return 0 if args.duration else 2


def load_prompt(args: argparse.Namespace) -> str:
    """The ``load`` agent's prompt (PROTOCOL section 7) for one turn."""
    parts = [f"cpu_s={args.cpu_s:g}", f"gil={args.gil}", f"output_mb={args.output_mb:g}"]
    if args.chunk_kb is not None:
        parts.append(f"chunk_kb={args.chunk_kb}")
    if args.subagents:
        parts.append(f"subagents={args.subagents}")
    return " ".join(parts)


# Results and state --------------------------------------------------------------------------------------------
@dataclass
class SessionResult:
    index: int
    session_id: str | None = None
    turns_ok: int = 0
    turns_failed: int = 0
    latencies: list[float] = field(default_factory=list)
    seqs: set[int] = field(default_factory=set)
    duplicates: int = 0
    out_of_order: int = 0
    truncated_missing: int = 0
    final_seq: int | None = None
    output_bytes: int = 0
    events: int = 0
    errors: list[str] = field(default_factory=list)
    phase: str = "starting"  # starting, turn, between, closing, done
    client: GatewayClient | None = None

    @property
    def last_seq(self) -> int:
        return self.final_seq if self.final_seq is not None else max(self.seqs, default=0)

    @property
    def lost(self) -> int:
        """Seqs in 1..last_seq never received (gaps the gateway reported as truncated included)."""
        return max(0, self.last_seq - len(self.seqs))


@dataclass
class RunState:
    args: argparse.Namespace
    target: Target
    prompt: str
    started: float = field(default_factory=time.monotonic)
    sessions: list[SessionResult] = field(default_factory=list)
    pings: list[tuple[float, float]] = field(default_factory=list)  # (t, ms)
    ping_failures: int = 0
    health: list[dict[str, Any]] = field(default_factory=list)  # samples with "t"
    process_peak: int | None = None
    throughput: list[tuple[float, float]] = field(default_factory=list)  # (t, MB/s)
    turns_running: int = 0
    errors: list[str] = field(default_factory=list)
    load_started: float | None = None
    load_ended: float | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    gateway_info: dict[str, Any] = field(default_factory=dict)  # gateway.info, read before the load

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @property
    def turns_target(self) -> int | None:
        per_session = turns_per_session(self.args)
        return per_session * self.args.sessions if per_session else None

    @property
    def clients(self) -> list[GatewayClient]:
        return [s.client for s in self.sessions if s.client is not None]

    def bytes_received(self) -> int:
        return sum(c.stats.bytes_received for c in self.clients)


async def _run_session(state: RunState, result: SessionResult, turn_slots: asyncio.Semaphore) -> None:
    args = state.args
    policy = ReconnectPolicy(max_time=60.0, max_attempts=50)
    client = GatewayClient(
        state.target.ws_url,
        token=state.target.token,
        reconnect=policy,
        seed=None if args.seed is None else args.seed + result.index,
    )
    result.client = client
    try:
        await client.connect()
        created = await client.create_session(agent="load", title=f"loadtest-{result.index}")
        result.session_id = sid = created["session_id"]
        events = client.events(sid)
        completions: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        consumer = asyncio.get_running_loop().create_task(_consume(state, result, events, completions))
        try:
            await _run_turns(state, result, client, sid, completions, turn_slots)
            result.phase = "closing"
            await _close_session(client, sid)
            await asyncio.wait_for(asyncio.shield(consumer), 30.0)
        finally:
            if not consumer.done():
                consumer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await consumer
    except (TimeoutError, GatewayError, OSError) as exc:
        result.errors.append(f"{type(exc).__name__}: {exc}")
        if result.session_id is None:  # nothing ran: count the turns it owed as failed
            result.turns_failed += turns_per_session(args) or 1
    finally:
        result.phase = "done"
        await client.aclose()


async def _consume(
    state: RunState, result: SessionResult, events: Any, completions: asyncio.Queue[dict[str, Any]]
) -> None:
    """Record every event of the session: seqs (for losses and duplicates), output bytes, completions."""
    last = 0
    while True:
        try:
            event = await events.__anext__()
        except StopAsyncIteration:
            return
        except ReplayTruncated as exc:
            result.truncated_missing += exc.missing
            result.errors.append(str(exc))
            continue
        except GatewayError as exc:
            result.errors.append(f"event stream: {type(exc).__name__}: {exc}")
            completions.put_nowait({"status": "error", "error": str(exc), "stream_failed": True})
            return
        seq = event.get("seq")
        result.events += 1
        if isinstance(seq, int):
            if seq in result.seqs:
                result.duplicates += 1
            elif seq < last:
                result.out_of_order += 1
            result.seqs.add(seq)
            last = max(last, seq)
        kind = event.get("type")
        payload = event.get("payload") or {}
        if kind == "tool.output":
            result.output_bytes += len(payload.get("text", ""))
        elif kind == "turn.complete":
            completions.put_nowait(payload)
        elif kind == "session.closed":
            result.final_seq = seq if isinstance(seq, int) else None


async def _run_turns(
    state: RunState,
    result: SessionResult,
    client: GatewayClient,
    sid: str,
    completions: asyncio.Queue[dict[str, Any]],
    turn_slots: asyncio.Semaphore,
) -> None:
    args = state.args
    per_session = turns_per_session(args)
    turn = 0
    while per_session == 0 or turn < per_session:
        if args.duration and state.load_started is not None and time.monotonic() - state.load_started >= args.duration:
            break
        turn += 1
        async with turn_slots:
            state.turns_running += 1
            result.phase = "turn"
            try:
                ok, latency, error = await _one_turn(state, client, sid, completions)
            finally:
                result.phase = "between"
                state.turns_running -= 1
        if ok:
            result.turns_ok += 1
            result.latencies.append(latency)
        else:
            result.turns_failed += 1
            result.errors.append(f"turn {turn}: {error}")
            if error and ("event stream" in error or "no turn.complete" in error):
                break  # the stream is gone or out of step: later completions could not be matched to turns


async def _one_turn(
    state: RunState, client: GatewayClient, sid: str, completions: asyncio.Queue[dict[str, Any]]
) -> tuple[bool, float, str | None]:
    args = state.args
    started = time.monotonic()
    deadline = started + args.turn_timeout
    try:
        await _submit(client, sid, state.prompt, deadline)
        payload = await asyncio.wait_for(completions.get(), max(0.0, deadline - time.monotonic()))
    except TimeoutError:
        return False, 0.0, f"no turn.complete within {args.turn_timeout:g}s"
    except GatewayError as exc:
        return False, 0.0, f"{type(exc).__name__}: {exc}"
    latency = time.monotonic() - started
    if payload.get("stream_failed"):
        return False, latency, f"event stream: {payload.get('error')}"
    if payload.get("status") != "ok":
        return False, latency, f"turn.complete status {payload.get('status')!r}: {payload.get('error', '')}"
    return True, latency, None


async def _submit(client: GatewayClient, sid: str, prompt: str, deadline: float) -> None:
    """Submit once.  When the connection drops with the submit in flight, ask the gateway (after the client
    has reconnected and resumed) whether it took the prompt, and send it again only if it did not: a
    ``prompt.submit`` is never blindly retried."""
    while True:
        before = client.last_seq(sid)
        try:
            await client.submit(sid, prompt)
            return
        except ConnectionLost:
            await client.wait_connected(max(0.1, deadline - time.monotonic()))
            listed = await client.call("session.active_list")
            mine = next((s for s in listed.get("sessions", []) if s.get("session_id") == sid), None)
            if mine is None:
                raise
            if mine.get("status") != "idle" or int(mine.get("last_seq", 0)) > before:
                return  # it was taken: its events are on their way through the resumed stream


async def _close_session(client: GatewayClient, sid: str) -> None:
    for _ in range(5):
        try:
            await client.close(sid)
            return
        except ConnectionLost:
            await client.wait_connected(30.0)


# The run ---------------------------------------------------------------------------------------------
async def run_load(args: argparse.Namespace, target: Target, progress: Progress) -> dict[str, Any]:
    state = RunState(args, target, load_prompt(args))
    rng = random.Random(args.seed)
    state.gateway_info = await check_target(target)
    metrics_before = await metrics_text(state)
    background = [asyncio.get_running_loop().create_task(coro) for coro in (pinger(state), sampler(state))]
    if args.chaos:
        background.append(asyncio.get_running_loop().create_task(chaos(state, rng)))
    progress.start(state)
    try:
        state.sessions = [SessionResult(i) for i in range(args.sessions)]
        turn_slots = asyncio.Semaphore(args.concurrency or args.sessions)
        state.load_started = time.monotonic()
        await asyncio.gather(*(_run_session(state, result, turn_slots) for result in state.sessions))
        state.load_ended = time.monotonic()
    finally:
        state.done.set()
        await asyncio.gather(*background, return_exceptions=True)
        progress.stop()
    metrics_after = await metrics_text(state)
    return build_report(state, metrics_before, metrics_after)
