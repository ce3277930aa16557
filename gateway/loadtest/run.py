"""``worker-gateway loadtest``: drive a gateway with ``load``-agent sessions and report whether anything was lost.

Each session gets its own :class:`~gateway.client.GatewayClient` connection and runs its turns one after the
other (``--concurrency`` bounds how many turns run at once across sessions).  A separate connection sends
app-level ``gateway.ping`` requests to measure how responsive the gateway's event loop stays; a sampler reads
``/healthz`` (and, with ``--spawn``, counts the gateway's child processes).  With ``--chaos`` random session
connections are aborted mid-turn, so the run also proves that reconnect + resume loses nothing.

The verdict is computed from what the load test itself saw, not from the client's counters: every session
ends with ``session.closed``, whose ``seq`` is the session's last, so ``lost = last seq - distinct seqs
received``.  Exit status: 0 when no event was lost and no turn failed, 1 otherwise, 2 for a usage or setup
error (bad flags, gateway not reachable, ``--plot`` without matplotlib).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import re
import secrets
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Sequence

from gateway.client import ConnectionLost, GatewayClient, GatewayError, ReconnectPolicy, ReplayTruncated

READY_PREFIX = "WORKER_GATEWAY_READY "


class SetupError(Exception):
    """Something the user has to fix before a run can happen (exit status 2)."""


# Command line ------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="worker-gateway loadtest",
        description="Drive a gateway with sessions of the built-in 'load' agent and report whether any event "
                    "was lost.  Exit 0 only when nothing was lost and no turn failed.")
    target = p.add_argument_group("target (one of)")
    target.add_argument("--url", help="gateway URL, e.g. http://127.0.0.1:8765 or ws://127.0.0.1:8765/ws")
    target.add_argument("--token", default=os.environ.get("WORKER_GATEWAY_TOKEN"),
                        help="auth token for --url (default: $WORKER_GATEWAY_TOKEN)")
    target.add_argument("--spawn", action="store_true",
                        help="start a private gateway (python -m gateway serve --port 0) and stop it at the end")
    target.add_argument("--gateway-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for the spawned gateway (repeatable), e.g. --gateway-arg=--agent=echo")
    target.add_argument("--spawn-timeout", type=float, default=30.0, metavar="S",
                        help="seconds to wait for the spawned gateway's ready line (default 30)")

    load = p.add_argument_group("load")
    load.add_argument("--sessions", type=_positive_int, default=4, help="sessions, one connection each (default 4)")
    load.add_argument("--turns", type=_non_negative_int, default=None,
                      help="turns per session (default 2, or unlimited with --duration; 0 = unlimited, "
                           "needs --duration)")
    load.add_argument("--duration", type=_positive_float, default=None, metavar="S",
                      help="stop starting new turns after S seconds")
    load.add_argument("--concurrency", type=_positive_int, default=None,
                      help="turns running at once across all sessions (default: --sessions)")
    load.add_argument("--cpu-s", type=_non_negative_float, default=1.0, help="CPU seconds per turn (default 1)")
    load.add_argument("--gil", choices=("python", "regex"), default="python",
                      help="how the CPU work holds the GIL (default python)")
    load.add_argument("--output-mb", type=_non_negative_float, default=1.0,
                      help="MB of tool output per turn (default 1)")
    load.add_argument("--chunk-kb", type=_chunk_kb, default=None, metavar="1..64",
                      help="size of each output chunk (agent default 64)")
    load.add_argument("--subagents", type=_non_negative_int, default=0, help="nested subagents per turn (default 0)")
    load.add_argument("--turn-timeout", type=_positive_float, default=300.0, metavar="S",
                      help="a turn not complete after S seconds counts as failed (default 300)")

    probe = p.add_argument_group("measurement and chaos")
    probe.add_argument("--ping-interval", type=_positive_float, default=0.1, metavar="S",
                       help="seconds between app-level gateway.ping requests on a separate connection (default 0.1)")
    probe.add_argument("--sample-interval", type=_positive_float, default=0.5, metavar="S",
                       help="seconds between /healthz samples (default 0.5)")
    probe.add_argument("--chaos", action="store_true",
                       help="abort random session connections mid-turn (the client must reconnect and resume)")
    probe.add_argument("--chaos-interval", type=_positive_float, default=0.5, metavar="S",
                       help="mean seconds between chaos drops (default 0.5)")
    probe.add_argument("--seed", type=int, default=None, help="random seed for chaos and backoff jitter")

    out = p.add_argument_group("output")
    out.add_argument("--json", metavar="FILE", help="write the full report as JSON")
    out.add_argument("--plot", metavar="FILE.png",
                     help="draw ping latency and throughput over time (needs matplotlib: pip install "
                          "'worker-gateway[plot]')")
    out.add_argument("--no-progress", action="store_true", help="no live progress display")
    return p


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _chunk_kb(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 64:
        raise argparse.ArgumentTypeError(f"must be 1..64, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


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


# Statistics --------------------------------------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def parse_histogram(text: str, name: str) -> dict[str, Any] | None:
    """The buckets, sum and count of one Prometheus histogram (no labels) from exposition text."""
    buckets: list[tuple[float, float]] = []
    total = count = None
    pattern = re.compile(rf'^{re.escape(name)}_(bucket|sum|count)(?:\{{([^}}]*)\}})?\s+([^\s]+)')
    for line in text.splitlines():
        m = pattern.match(line)
        if not m:
            continue
        kind, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
        if kind == "bucket":
            le = re.search(r'le="([^"]+)"', labels)
            if le:
                buckets.append((float(le.group(1)), value))  # float("+Inf") is inf
        elif kind == "sum":
            total = value
        else:
            count = value
    if count is None:
        return None
    return {"buckets": sorted(buckets), "sum": total or 0.0, "count": count}


def histogram_delta(before: dict[str, Any] | None, after: dict[str, Any] | None) -> dict[str, Any] | None:
    if after is None:
        return None
    if before is None:
        return after
    old = dict(before["buckets"])
    return {"buckets": [(le, value - old.get(le, 0.0)) for le, value in after["buckets"]],
            "sum": after["sum"] - before["sum"], "count": after["count"] - before["count"]}


def histogram_quantile(hist: dict[str, Any] | None, q: float) -> float | None:
    """Upper bound of the bucket holding the q-quantile (q in 0..1); None without samples."""
    if not hist or hist["count"] <= 0:
        return None
    target = q * hist["count"]
    for le, cumulative in hist["buckets"]:
        if cumulative >= target:
            return le
    return math.inf


# Gateway access ----------------------------------------------------------------------------------------
@dataclass
class Target:
    http_url: str  # http://host:port
    ws_url: str
    token: str | None
    pid: int | None = None  # the spawned gateway, for psutil


def resolve_target(url: str, token: str | None) -> Target:
    parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme not in ("http", "https", "ws", "wss"):
        raise SetupError(f"--url {url!r}: use http://HOST:PORT or ws://HOST:PORT/ws")
    query = urllib.parse.parse_qs(parts.query)
    if token is None and query.get("token"):
        token = query["token"][0]
    http_scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    ws_scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    path = parts.path if parts.path not in ("", "/") else "/ws"
    return Target(f"{http_scheme}://{parts.netloc}", f"{ws_scheme}://{parts.netloc}{path}", token)


def http_get(target: Target, path: str, auth: bool = False, timeout: float = 5.0) -> str:
    """A small blocking GET (run it with ``asyncio.to_thread``)."""
    request = urllib.request.Request(target.http_url + path)
    if auth and target.token:
        request.add_header("Authorization", f"Bearer {target.token}")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1 never via a proxy
    with opener.open(request, timeout=timeout) as response:
        return response.read().decode("utf-8", "replace")


class SpawnedGateway:
    """A private gateway subprocess: started with ``--port 0``, ready line read with a deadline, stopped with
    SIGTERM (then SIGKILL after a grace) on every path."""

    def __init__(self, extra_args: Sequence[str], timeout: float) -> None:
        self.token = secrets.token_urlsafe(18)
        self.extra_args = list(extra_args)
        self.timeout = timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.port: int | None = None
        self.exit_code: int | None = None
        self._stderr: IO[bytes] = tempfile.TemporaryFile()
        self._drain: threading.Thread | None = None

    def command(self) -> list[str]:
        # "--token=X", not "--token X": a token may start with "-" and would be read as a flag.
        return [sys.executable, "-m", "gateway", "serve", "--port", "0", f"--token={self.token}", *self.extra_args]

    def start(self) -> Target:
        env = _child_env()
        self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=self._stderr, env=env)
        line = self._read_ready_line()
        match = re.match(r"WORKER_GATEWAY_READY port=(\d+)", line)
        if not match:
            self.stop()
            raise SetupError(f"the spawned gateway printed {line!r} instead of its ready line\n{self.stderr_tail()}")
        self.port = int(match.group(1))
        # Keep draining stdout so that a chatty gateway can never block on a full pipe.
        self._drain = threading.Thread(target=self._drain_stdout, daemon=True, name="gateway-stdout")
        self._drain.start()
        return Target(f"http://127.0.0.1:{self.port}", f"ws://127.0.0.1:{self.port}/ws", self.token, self.proc.pid)

    def _read_ready_line(self) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + self.timeout
        buf = b""
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in buf:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self.stop()
                    raise SetupError(f"the spawned gateway printed no ready line within {self.timeout:g}s "
                                     f"(got {buf!r})\n{self.stderr_tail()}")
                if not sel.select(min(remaining, 0.5)):
                    continue
                chunk = os.read(fd, 4096)
                if not chunk:
                    code = self.proc.wait(5)
                    raise SetupError(f"the spawned gateway exited with status {code} before it was ready\n"
                                     f"{self.stderr_tail()}")
                buf += chunk
        return buf.split(b"\n", 1)[0].decode(errors="replace").strip()

    def _drain_stdout(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        with contextlib.suppress(OSError, ValueError):
            while self.proc.stdout.read(65536):
                pass

    def stderr_tail(self, limit: int = 3000) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")[-limit:]

    def stop(self, grace: float = 20.0) -> int | None:
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self.exit_code = proc.returncode
        if self._drain is not None:
            self._drain.join(2)
        if proc.stdout is not None:
            proc.stdout.close()
        return self.exit_code


# The run -----------------------------------------------------------------------------------------------
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
    client = GatewayClient(state.target.ws_url, token=state.target.token, reconnect=policy,
                           seed=None if args.seed is None else args.seed + result.index)
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
    except (GatewayError, OSError, asyncio.TimeoutError) as exc:
        result.errors.append(f"{type(exc).__name__}: {exc}")
        if result.session_id is None:  # nothing ran: count the turns it owed as failed
            result.turns_failed += turns_per_session(args) or 1
    finally:
        result.phase = "done"
        await client.aclose()


async def _consume(state: RunState, result: SessionResult, events: Any,
                   completions: asyncio.Queue[dict[str, Any]]) -> None:
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


async def _run_turns(state: RunState, result: SessionResult, client: GatewayClient, sid: str,
                     completions: asyncio.Queue[dict[str, Any]], turn_slots: asyncio.Semaphore) -> None:
    args = state.args
    per_session = turns_per_session(args)
    turn = 0
    while per_session == 0 or turn < per_session:
        if args.duration and state.load_started is not None and \
                time.monotonic() - state.load_started >= args.duration:
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


async def _one_turn(state: RunState, client: GatewayClient, sid: str,
                    completions: asyncio.Queue[dict[str, Any]]) -> tuple[bool, float, str | None]:
    args = state.args
    started = time.monotonic()
    deadline = started + args.turn_timeout
    try:
        await _submit(client, sid, state.prompt, deadline)
        payload = await asyncio.wait_for(completions.get(), max(0.0, deadline - time.monotonic()))
    except asyncio.TimeoutError:
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


async def _pinger(state: RunState) -> None:
    """Measure app-level ping round trips from a separate process.

    The load test's own loop is busy decoding tens of MB/s of events; pinging from it would measure the
    load test as much as the gateway.  The child process does nothing but ping, so its numbers are the
    gateway's (plus the kernel's).  It prints ``<monotonic time> <ms>`` (or ``fail``) per ping and exits
    when its stdin closes.
    """
    env = _child_env()
    if state.target.token:
        env[_PINGER_TOKEN_ENV] = state.target.token  # not on the command line, where ps would show it
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _PINGER_CODE, state.target.ws_url, repr(state.args.ping_interval),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None

    async def read() -> None:
        assert proc.stdout is not None
        async for line in proc.stdout:
            fields = line.decode(errors="replace").split()
            if len(fields) != 2:
                continue
            if fields[1] == "fail":
                state.ping_failures += 1
                continue
            with contextlib.suppress(ValueError):
                state.pings.append((float(fields[0]) - state.started, float(fields[1])))

    reader = asyncio.get_running_loop().create_task(read())
    try:
        await state.done.wait()
    finally:
        proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 10.0)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(reader, 5.0)
        errors = (await proc.stderr.read()).decode(errors="replace").strip()
        if proc.returncode != 0:
            state.errors.append(f"pinger exited with status {proc.returncode}: {errors[-500:]}")


_PINGER_TOKEN_ENV = "WORKER_GATEWAY_LOADTEST_TOKEN"
_PINGER_CODE = "import sys; from gateway.loadtest import pinger_child; sys.exit(pinger_child(sys.argv[1:]))"


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def pinger_child(argv: list[str]) -> int:
    """Entry point of the ping process (see :func:`_pinger`): ``URL INTERVAL``; token from the environment."""
    url, interval = argv[0], float(argv[1])
    token = os.environ.get(_PINGER_TOKEN_ENV)
    try:
        asyncio.run(_ping_loop(url, token, interval))
    except (GatewayError, OSError) as exc:
        print(f"pinger: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


async def _ping_loop(url: str, token: str | None, interval: float) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    # stdin EOF (the parent closed it, or died) ends the loop.
    threading.Thread(target=lambda: (sys.stdin.buffer.read(), loop.call_soon_threadsafe(stop.set)),
                     daemon=True).start()
    async with GatewayClient(url, token=token, reconnect=ReconnectPolicy(max_time=60.0, max_attempts=100)) as client:
        while not stop.is_set():
            sent = time.monotonic()
            try:
                await client.request("gateway.ping", timeout=10.0)
                line = f"{sent:.6f} {(time.monotonic() - sent) * 1000.0:.3f}"
            except GatewayError:
                line = f"{sent:.6f} fail"
            print(line, flush=True)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, interval - (time.monotonic() - sent)))


async def _sampler(state: RunState) -> None:
    interval = state.args.sample_interval
    last_bytes, last_t = 0, state.elapsed()
    while not state.done.is_set():
        try:
            health = json.loads(await asyncio.to_thread(http_get, state.target, "/healthz"))
            health["t"] = state.elapsed()
            state.health.append(health)
        except (OSError, ValueError) as exc:
            if len(state.errors) < 50:
                state.errors.append(f"/healthz: {exc}")
        if state.target.pid is not None:
            count = await asyncio.to_thread(_count_descendants, state.target.pid)
            if count is not None:
                state.process_peak = max(state.process_peak or 0, count)
        now, total = state.elapsed(), state.bytes_received()
        if now > last_t:
            state.throughput.append((now, (total - last_bytes) / (now - last_t) / 1e6))
        last_bytes, last_t = total, now
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(state.done.wait(), interval)


def _count_descendants(pid: int) -> int | None:
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil is a dependency
        return None
    try:
        return len(psutil.Process(pid).children(recursive=True))
    except psutil.Error:
        return None


async def _chaos(state: RunState, rng: random.Random) -> None:
    """Abort a random session connection that is mid-turn, at exponentially distributed intervals."""
    while not state.done.is_set():
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(state.done.wait(), rng.expovariate(1.0 / state.args.chaos_interval))
        if state.done.is_set():
            return
        candidates = [s.client for s in state.sessions
                      if s.phase == "turn" and s.client is not None and s.client.connected]
        if candidates:
            rng.choice(candidates).abort()


async def _metrics_text(state: RunState) -> str | None:
    try:
        return await asyncio.to_thread(http_get, state.target, "/metrics", True)
    except (OSError, urllib.error.URLError) as exc:
        state.errors.append(f"/metrics: {exc}")
        return None


async def run_load(args: argparse.Namespace, target: Target, progress: Progress) -> dict[str, Any]:
    state = RunState(args, target, load_prompt(args))
    rng = random.Random(args.seed)
    try:
        await asyncio.to_thread(http_get, target, "/healthz")
    except (OSError, urllib.error.URLError) as exc:
        raise SetupError(f"gateway not reachable at {target.http_url}/healthz: {exc}") from exc
    metrics_before = await _metrics_text(state)
    background = [asyncio.get_running_loop().create_task(coro) for coro in (_pinger(state), _sampler(state))]
    if args.chaos:
        background.append(asyncio.get_running_loop().create_task(_chaos(state, rng)))
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
    metrics_after = await _metrics_text(state)
    return build_report(state, metrics_before, metrics_after)


# Report ------------------------------------------------------------------------------------------------
def _r(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def build_report(state: RunState, metrics_before: str | None, metrics_after: str | None) -> dict[str, Any]:
    args = state.args
    sessions = state.sessions
    latencies = [lat for s in sessions for lat in s.latencies]
    ping_ms = [ms for _, ms in state.pings]
    load_s = ((state.load_ended or time.monotonic()) - (state.load_started or state.started)) or 1e-9
    wire_bytes = state.bytes_received()
    lag = histogram_delta(parse_histogram(metrics_before or "", "wg_loop_lag_seconds"),
                          parse_histogram(metrics_after or "", "wg_loop_lag_seconds"))
    lag_p50, lag_p99 = histogram_quantile(lag, 0.5), histogram_quantile(lag, 0.99)
    health_lag = [h.get("loop_lag_ms") for h in state.health if isinstance(h.get("loop_lag_ms"), (int, float))]
    health_workers = [h.get("workers") for h in state.health if isinstance(h.get("workers"), int)]
    drops = sum(c.stats.drops for c in state.clients)
    forced = sum(c.stats.forced_drops for c in state.clients)
    failed = sum(s.turns_failed for s in sessions)
    lost = sum(s.lost for s in sessions)
    # Losses can only be ruled out for a session whose stream reached session.closed (its last seq).
    unverified = sum(1 for s in sessions if s.final_seq is None)
    report = {
        "ok": lost == 0 and failed == 0 and unverified == 0,
        "config": {k: v for k, v in vars(args).items() if k not in ("token",)},
        "prompt": state.prompt,
        "gateway": {"url": state.target.http_url, "spawned": state.target.pid is not None},
        "duration_s": _r(load_s),
        "turns": {"completed": sum(s.turns_ok for s in sessions), "failed": failed},
        "connections": {"dropped_by_server": drops - forced, "dropped_by_chaos": forced,
                        "reconnects": sum(max(0, c.stats.connects - 1) for c in state.clients),
                        "resumes": sum(c.stats.resumes for c in state.clients),
                        "replayed_events": sum(c.stats.replayed for c in state.clients)},
        "events": {"received": sum(s.events for s in sessions), "lost": lost, "sessions_unverified": unverified,
                   "duplicates": sum(s.duplicates for s in sessions),
                   "out_of_order": sum(s.out_of_order for s in sessions),
                   "replay_overlap_filtered": sum(c.stats.duplicates for c in state.clients),
                   "truncated": sum(c.stats.truncations for c in state.clients)},
        "turn_latency_s": {"p50": _r(percentile(latencies, 50)), "p95": _r(percentile(latencies, 95)),
                           "p99": _r(percentile(latencies, 99)), "max": _r(max(latencies, default=None))},
        "ping_ms": {"count": len(ping_ms), "failed": state.ping_failures, "p50": _r(percentile(ping_ms, 50)),
                    "p99": _r(percentile(ping_ms, 99)), "max": _r(max(ping_ms, default=None))},
        "throughput": {"wire_bytes": wire_bytes, "mb_per_s": _r(wire_bytes / 1e6 / load_s),
                       "tool_output_bytes": sum(s.output_bytes for s in sessions)},
        "loop_lag_ms": {"samples": int(lag["count"]) if lag else 0,
                        "p50_le": _r(None if lag_p50 is None else lag_p50 * 1000.0),
                        "p99_le": _r(None if lag_p99 is None or math.isinf(lag_p99) else lag_p99 * 1000.0),
                        "mean": _r(lag["sum"] / lag["count"] * 1000.0) if lag and lag["count"] else None,
                        "healthz_max": _r(max(health_lag, default=None))},
        "workers": {"peak_healthz": max(health_workers, default=None), "peak_processes": state.process_peak},
        "sessions": [{"index": s.index, "session_id": s.session_id, "turns_ok": s.turns_ok,
                      "turns_failed": s.turns_failed, "events": s.events, "last_seq": s.last_seq,
                      "final_seq_seen": s.final_seq is not None, "lost": s.lost,
                      "reported_truncated": s.truncated_missing,
                      "duplicates": s.duplicates, "errors": s.errors[:20]} for s in sessions],
        "errors": state.errors[:50],
        "timeseries": {"ping_ms": [[_r(t), _r(ms)] for t, ms in state.pings],
                       "throughput_mb_s": [[_r(t), _r(v)] for t, v in state.throughput],
                       "workers": [[_r(h["t"]), h.get("workers")] for h in state.health]},
    }
    if lag_p99 is not None and math.isinf(lag_p99):
        report["loop_lag_ms"]["p99_le"] = "inf"
    return report


def _fmt(value: Any, unit: str = "", digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}{unit}"
    return f"{value}{unit}"


def report_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    t, c, e = report["turns"], report["connections"], report["events"]
    lat, ping, lag, w = report["turn_latency_s"], report["ping_ms"], report["loop_lag_ms"], report["workers"]
    return [
        ("turns completed / failed", f"{t['completed']} / {t['failed']}"),
        ("connections dropped by server", str(c["dropped_by_server"])),
        ("connections dropped by chaos",
         f"{c['dropped_by_chaos']} ({c['resumes']} resumes, {c['replayed_events']} events replayed)"),
        ("events received", str(e["received"])),
        ("events lost (seq gaps)", str(e["lost"]) + (f" ({e['sessions_unverified']} sessions not verifiable: "
                                                     "no session.closed seen)" if e["sessions_unverified"] else "")),
        ("duplicates", f"{e['duplicates']} (replay overlap filtered by client: {e['replay_overlap_filtered']})"),
        ("turn latency p50 / p95 / p99",
         f"{_fmt(lat['p50'], ' s', 2)} / {_fmt(lat['p95'], ' s', 2)} / {_fmt(lat['p99'], ' s', 2)}"),
        ("app ping p50 / p99 / max",
         f"{_fmt(ping['p50'], ' ms')} / {_fmt(ping['p99'], ' ms')} / {_fmt(ping['max'], ' ms')}"
         f" ({ping['count']} pings, {ping['failed']} failed)"),
        ("throughput", f"{_fmt(report['throughput']['mb_per_s'], ' MB/s', 2)}"
                       f" ({report['throughput']['wire_bytes'] / 1e6:.1f} MB in {report['duration_s']:.1f} s)"),
        ("gateway loop lag (/metrics)",
         f"p50 <= {_fmt(lag['p50_le'], ' ms')}, p99 <= {_fmt(lag['p99_le'], ' ms')}, "
         f"mean {_fmt(lag['mean'], ' ms', 2)} ({lag['samples']} samples)"),
        ("gateway loop lag max (/healthz)", _fmt(lag["healthz_max"], " ms")),
        ("peak worker processes", f"{_fmt(w['peak_healthz'])} (healthz), {_fmt(w['peak_processes'])} (processes)"),
        ("result", "OK: nothing lost, no turn failed" if report["ok"] else "FAILED: see the rows above"),
    ]


def print_report(report: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    table = Table(title=f"worker-gateway loadtest: {report['prompt']}", show_header=True, header_style="bold")
    table.add_column("metric")
    table.add_column("value")
    for name, value in report_rows(report):
        style = None
        if name == "result":
            style = "bold green" if report["ok"] else "bold red"
        elif name.startswith("events lost") and report["events"]["lost"]:
            style = "bold red"
        table.add_row(name, value, style=style)
    console.print(table)
    failed = [s for s in report["sessions"] if s["errors"]]
    for s in failed[:10]:
        console.print(f"session {s['index']} ({s['session_id']}): " + "; ".join(s["errors"][:5]), markup=False,
                      highlight=False, soft_wrap=True)
    for error in report["errors"][:10]:
        console.print(f"note: {error}", markup=False, highlight=False, soft_wrap=True)


def write_plot(report: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = report["timeseries"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    if series["ping_ms"]:
        xs, ys = zip(*series["ping_ms"])
        top.plot(xs, ys, linewidth=0.8)
    top.set_ylabel("app ping (ms)")
    top.set_title(f"worker-gateway loadtest: {report['prompt']}")
    if series["throughput_mb_s"]:
        xs, ys = zip(*series["throughput_mb_s"])
        bottom.plot(xs, ys, linewidth=0.8, color="tab:green")
    bottom.set_ylabel("received (MB/s)")
    bottom.set_xlabel("time (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# Progress ----------------------------------------------------------------------------------------------
class Progress:
    """A live ``rich`` view on a terminal; one plain line every few seconds otherwise (CI, pipes)."""

    def __init__(self, console: Any, enabled: bool, plain_every: float = 5.0) -> None:
        self.console = console
        self.enabled = enabled
        self.plain_every = plain_every
        self._task: asyncio.Task[None] | None = None
        self._live: Any = None

    def start(self, state: RunState) -> None:
        if not self.enabled:
            return
        if self.console.is_terminal:
            from rich.live import Live

            self._live = Live(self._render(state), console=self.console, refresh_per_second=4, transient=True)
            self._live.start()
        self._task = asyncio.get_running_loop().create_task(self._run(state))

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self._live is not None:
            self._live.stop()
            self._live = None

    async def _run(self, state: RunState) -> None:
        while True:
            if self._live is not None:
                self._live.update(self._render(state))
                await asyncio.sleep(0.25)
            else:
                await asyncio.sleep(self.plain_every)
                self.console.print(self._line(state), markup=False, highlight=False, soft_wrap=True)

    @staticmethod
    def _numbers(state: RunState) -> dict[str, Any]:
        done = sum(s.turns_ok + s.turns_failed for s in state.sessions)
        recent = [ms for _, ms in state.pings[-50:]]
        health = state.health[-1] if state.health else {}
        return {
            "elapsed": state.elapsed(),
            "done": done,
            "failed": sum(s.turns_failed for s in state.sessions),
            "target": state.turns_target,
            "running": state.turns_running,
            "events": sum(s.events for s in state.sessions),
            "lost": sum(s.lost for s in state.sessions),
            "mb": state.bytes_received() / 1e6,
            "drops": sum(c.stats.drops for c in state.clients),
            "ping_p99": percentile(recent, 99),
            "lag": health.get("loop_lag_ms"),
            "workers": health.get("workers"),
        }

    def _line(self, state: RunState) -> str:
        n = self._numbers(state)
        target = "?" if n["target"] is None else n["target"]
        return (f"[{n['elapsed']:6.1f}s] turns {n['done']}/{target} ({n['failed']} failed, {n['running']} running) "
                f"events {n['events']} lost {n['lost']} | {n['mb']:.1f} MB | drops {n['drops']} | "
                f"ping p99 {_fmt(n['ping_p99'], ' ms')} | loop lag {_fmt(n['lag'], ' ms')} | "
                f"workers {_fmt(n['workers'])}")

    def _render(self, state: RunState) -> Any:
        from rich.table import Table

        n = self._numbers(state)
        table = Table(title="worker-gateway loadtest", show_header=False, box=None)
        table.add_column(justify="right", style="bold")
        table.add_column()
        target = "?" if n["target"] is None else n["target"]
        table.add_row("elapsed", f"{n['elapsed']:.1f} s")
        table.add_row("turns", f"{n['done']}/{target} done, {n['failed']} failed, {n['running']} running")
        table.add_row("events", f"{n['events']} received, {n['lost']} lost")
        table.add_row("received", f"{n['mb']:.1f} MB")
        table.add_row("connection drops", str(n["drops"]))
        table.add_row("app ping p99 (last 50)", _fmt(n["ping_p99"], " ms"))
        table.add_row("gateway loop lag", _fmt(n["lag"], " ms"))
        table.add_row("worker processes", _fmt(n["workers"]))
        return table


# Entry point -------------------------------------------------------------------------------------------
def main(argv: list[str]) -> int:
    from rich.console import Console

    parser = build_parser()
    args = parser.parse_args(argv)
    # Off a terminal (CI logs, pipes) rich would wrap the table at 80 columns.
    console = Console() if sys.stdout.isatty() else Console(width=120)
    err = Console(stderr=True)
    if bool(args.url) == bool(args.spawn):
        parser.error("give exactly one of --url URL or --spawn")
    if args.turns == 0 and not args.duration:
        parser.error("--turns 0 (unlimited) needs --duration S")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            err.print("worker-gateway loadtest: --plot needs matplotlib, which is not installed; install it with "
                      "pip install 'worker-gateway[plot]' (or drop --plot)", markup=False, highlight=False)
            return 2
    spawned: SpawnedGateway | None = None
    try:
        if args.spawn:
            spawned = SpawnedGateway(args.gateway_arg, args.spawn_timeout)
            target = spawned.start()
        else:
            target = resolve_target(args.url, args.token)
        progress = Progress(console, enabled=not args.no_progress)
        report = asyncio.run(run_load(args, target, progress))
    except SetupError as exc:
        err.print(f"worker-gateway loadtest: {exc}", markup=False, highlight=False)
        return 2
    except KeyboardInterrupt:
        err.print("worker-gateway loadtest: interrupted", markup=False, highlight=False)
        return 130
    finally:
        if spawned is not None:
            code = spawned.stop()
            if code not in (0, None):
                err.print(f"worker-gateway loadtest: the spawned gateway exited with status {code}\n"
                          f"{spawned.stderr_tail()}", markup=False, highlight=False)
    if spawned is not None:
        report["gateway"]["exit_code"] = spawned.exit_code
    print_report(report, console)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        write_plot(report, args.plot)
        console.print(f"plot written to {args.plot}", markup=False, highlight=False)
    return 0 if report["ok"] else 1
