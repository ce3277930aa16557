"""A lean JSON-RPC client for benchmarks: one ``websockets`` connection, raw frames, no reconnect.

The client must not be the bottleneck it measures: frames arrive as bytes (``recv(decode=False)``), bulk
events are only counted, and only small frames (responses, ``turn.complete`` and other control events) are
parsed.  Event frames are recognised by the envelope prefix that the gateway (and the baseline app) write
byte for byte, so the event type is read without decoding the payload.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from dataclasses import dataclass, field
from typing import Any

import websockets

EVENT_PREFIX = b'{"jsonrpc":"2.0","method":"event","params":{"type":"'
#: Event types the client parses (all small); every other event is only counted.
_PARSED = frozenset({b"turn.complete", b"session.closed", b"worker.exited", b"gateway.ready"})


def _fail(future: asyncio.Future[Any], exc: BaseException) -> None:
    """Fail ``future`` without an "exception was never retrieved" warning when nobody awaits it (a turn
    whose completion a benchmark does not wait for); an awaiting caller still gets ``exc``."""
    if not future.done():
        future.set_exception(exc)
        future.exception()


class RpcFailure(Exception):
    def __init__(self, method: str, error: dict[str, Any]) -> None:
        super().__init__(f"{method}: {error.get('code')} {error.get('message')}")
        self.error = error


@dataclass
class Counters:
    frames: int = 0
    bytes: int = 0
    events: int = 0
    event_bytes: int = 0
    first_event_at: float | None = None
    last_event_at: float | None = None


@dataclass
class PingStats:
    rtts: list[float] = field(default_factory=list)
    sent: int = 0
    #: For each ping never answered (lost with its connection, or still waiting when stopped): how long it
    #: had waited.  Its round trip is at least that.
    unanswered: list[float] = field(default_factory=list)

    def lower_bounds(self) -> list[float]:
        """Round trips, with each unanswered ping counted as the time it waited (a lower bound)."""
        return self.rtts + self.unanswered


class RpcSide:
    """The JSON-RPC bookkeeping both benchmark clients share (this one and ``bench/rawclient.py``): request
    ids and their pending answers, ``gateway.ready``, and the ``turn.complete`` of each submitted turn.
    A subclass reads its transport, resolves ``_pending`` answers, hands events to :meth:`_on_event`, and
    provides :meth:`send_text`."""

    def __init__(self) -> None:
        self.counters = Counters()
        self.closed_at: float | None = None
        self.close_reason = ""
        self.ready: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._turns: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._turn_done: dict[str, dict[str, Any]] = {}

    async def send_text(self, text: str) -> None:
        raise NotImplementedError

    def _on_event(self, params: dict[str, Any]) -> None:
        kind = params["type"]
        if kind == "gateway.ready":
            if not self.ready.done():
                self.ready.set_result(params["payload"])
        elif kind == "turn.complete":
            payload = params["payload"]
            turn_id = payload["turn_id"]
            self._turn_done[turn_id] = payload
            future = self._turns.pop(turn_id, None)
            if future is not None and not future.done():
                future.set_result(payload)

    async def request(self, method: str, params: dict[str, Any] | None = None,
                      timeout: float = 60.0) -> dict[str, Any]:
        request_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": method}
        if params is not None:
            message["params"] = params
        try:
            await self.send_text(json.dumps(message))
            return await asyncio.wait_for(future, timeout)
        finally:
            self._pending.pop(request_id, None)

    async def call(self, method: str, timeout: float = 60.0, **params: Any) -> dict[str, Any]:
        response = await self.request(method, params or None, timeout)
        if "error" in response:
            raise RpcFailure(method, response["error"])
        return response["result"]

    async def submit(self, session_id: str, text: str) -> asyncio.Future[dict[str, Any]]:
        """Submit a prompt; returns a future resolved with its ``turn.complete`` payload."""
        result = await self.call("prompt.submit", session_id=session_id, text=text)
        return self.expect_turn(result["turn_id"])

    def expect_turn(self, turn_id: str) -> asyncio.Future[dict[str, Any]]:
        """A future for the ``turn.complete`` of ``turn_id`` (also for servers that start turns otherwise)."""
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        if turn_id in self._turn_done:
            future.set_result(self._turn_done.pop(turn_id))
        else:
            self._turns[turn_id] = future
        return future

    def reset_counters(self) -> Counters:
        self.counters = Counters()
        return self.counters


class BenchClient(RpcSide):
    """One connection.  ``open`` with ``ping=(interval, timeout)`` to turn on the protocol keepalive."""

    def __init__(self, ws: Any) -> None:
        super().__init__()
        self.ws = ws
        self.pings = PingStats()
        self._reader = asyncio.get_running_loop().create_task(self._read())
        self._pinger: asyncio.Task[None] | None = None
        self._ping_tasks: set[asyncio.Task[None]] = set()

    @classmethod
    async def open(cls, url: str, *, ping: tuple[float, float] | None = None, timeout: float = 30.0) -> BenchClient:
        interval, ping_timeout = ping if ping is not None else (None, None)
        ws = await websockets.connect(url, max_size=None, compression=None, proxy=None, open_timeout=timeout,
                                      ping_interval=interval, ping_timeout=ping_timeout, close_timeout=2,
                                      max_queue=64)
        client = cls(ws)
        await asyncio.wait_for(asyncio.shield(client.ready), timeout)
        return client

    @property
    def closed(self) -> bool:
        return self.closed_at is not None

    async def _read(self) -> None:
        ws = self.ws
        prefix_len = len(EVENT_PREFIX)
        try:
            while True:
                data = await ws.recv(decode=False)
                now = time.perf_counter()
                size = len(data)
                c = self.counters
                c.frames += 1
                c.bytes += size
                if data.startswith(EVENT_PREFIX):
                    end = data.index(b'"', prefix_len)
                    kind = data[prefix_len:end]
                    c.events += 1
                    c.event_bytes += size
                    if c.first_event_at is None:
                        c.first_event_at = now
                    c.last_event_at = now
                    if kind in _PARSED:
                        self._on_event(json.loads(data)["params"])
                else:
                    message = json.loads(data)
                    future = self._pending.pop(message.get("id"), None)
                    if future is not None and not future.done():
                        future.set_result(message)
        except websockets.ConnectionClosed as exc:
            self.close_reason = f"{exc.rcvd.code if exc.rcvd else (exc.sent.code if exc.sent else 1006)}"
        except Exception as exc:  # noqa: BLE001 - a benchmark records, it does not crash
            self.close_reason = repr(exc)
        finally:
            self.closed_at = time.perf_counter()
            failure = ConnectionError(f"connection closed ({self.close_reason})")
            for future in [*self._pending.values(), *self._turns.values(), self.ready]:
                _fail(future, failure)

    async def send_text(self, text: str) -> None:
        await self.ws.send(text)

    # App-level ping ---------------------------------------------------------------------------------------
    def start_pinging(self, every_s: float) -> None:
        """Send ``gateway.ping`` every ``every_s`` seconds (not waiting for answers) and record round trips."""
        self.pings = PingStats()
        self._pinger = asyncio.get_running_loop().create_task(self._ping_loop(every_s))

    async def stop_pinging_sends(self) -> None:
        """Stop sending pings; those in flight keep waiting for their answers."""
        if self._pinger is not None:
            self._pinger.cancel()
            await asyncio.gather(self._pinger, return_exceptions=True)
            self._pinger = None

    async def stop_pinging(self, grace_s: float = 0.0) -> PingStats:
        """Stop sending; answers still arriving within ``grace_s`` are counted.  Returns the stats."""
        await self.stop_pinging_sends()
        if grace_s > 0 and self._ping_tasks:
            await asyncio.wait(self._ping_tasks, timeout=grace_s)
        for task in self._ping_tasks:
            task.cancel()
        await asyncio.gather(*self._ping_tasks, return_exceptions=True)
        return self.pings

    async def _ping_loop(self, every_s: float) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while not self.closed:
            task = loop.create_task(self._one_ping())
            self._ping_tasks.add(task)
            task.add_done_callback(self._ping_tasks.discard)
            next_at += every_s
            await asyncio.sleep(max(0.0, next_at - loop.time()))

    async def _one_ping(self) -> None:
        stats = self.pings
        stats.sent += 1
        started = time.perf_counter()
        try:
            await self.request("gateway.ping", timeout=3600)
        except (ConnectionError, websockets.ConnectionClosed, asyncio.CancelledError):
            stats.unanswered.append(time.perf_counter() - started)
            return
        stats.rtts.append(time.perf_counter() - started)

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self.ws.close(), 5)
        except (asyncio.TimeoutError, Exception):  # noqa: BLE001
            pass
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)
        if self._pinger is not None:
            self._pinger.cancel()
