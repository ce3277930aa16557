"""The in-process baseline: the design worker-gateway replaces, and the bare relay ceiling.

``python -m bench.baseline_app --port 0 [--ws-ping-interval S --ws-ping-timeout S]`` serves, on one
uvicorn + starlette event loop (same uvicorn settings as the gateway: auto loop and HTTP, no
permessage-deflate):

- ``/ws``: a subset of the gateway's JSON-RPC (``gateway.ping``, ``session.create``, ``prompt.submit``,
  ``session.close``) whose turns run the very same ``load`` agent (``workers.agents.load.LoadAgent``, with
  the same ``TurnHandle``, so output is scrubbed and encoded exactly as in a worker) **on a thread of the
  server process**.  A ``gil=regex`` turn therefore holds the GIL of the process that owns the event loop:
  the stall worker-gateway exists to avoid.
- ``/bare``: the relay ceiling.  The client sends ``{"count": n, "chunk_kb": k, "turn_id": t}``; the server
  sends ``n`` copies of one pre-encoded ``tool.output`` event frame, byte for byte what the gateway relays
  for a ``load`` chunk of ``k`` KiB, then ``turn.complete``.  With ``"delta_bytes": b`` instead of
  ``chunk_kb``: ``n`` ``message.delta`` frames of ``b`` characters (what ``bench.agents:Deltas`` emits).  No pipes, no workers, no per-frame work:
  what uvicorn + starlette can push through one WebSocket.
- ``/healthz`` and ``/metrics``: the same loop-lag monitor and histogram as the gateway; with
  ``--lag-log PATH`` every sample is also appended to PATH (a stalled loop cannot answer ``/metrics``).

It prints ``BASELINE_READY port=N`` on stdout once it accepts connections.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import json
import os
import secrets
import socket
import sys
import threading
import time
from typing import Any

import uvicorn
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from gateway import rpc
from gateway.looplag import LoopLagMonitor
from gateway.metrics import LAG_BUCKETS
from workers.agents.base import TurnHandle
from workers.agents.load import LoadAgent, _chunk_text
from workers.channel import encode_json

READY_PREFIX = "BASELINE_READY"


class _Outbox:
    """Frames for one connection, in order, sent by one task (threads hand frames over thread-safely)."""

    def __init__(self, websocket: WebSocket) -> None:
        self.websocket = websocket
        self.loop = asyncio.get_running_loop()
        self._queue: collections.deque[str] = collections.deque()
        self._wakeup = asyncio.Event()
        self.open = True
        self._task = self.loop.create_task(self._run())

    def send(self, text: str) -> None:
        if self.open:
            self._queue.append(text)
            self._wakeup.set()

    def send_threadsafe(self, text: str) -> None:
        self.loop.call_soon_threadsafe(self.send, text)

    async def _run(self) -> None:
        try:
            while True:
                if not self._queue:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                await self.websocket.send_text(self._queue.popleft())
        except Exception:  # noqa: BLE001 - the socket went away
            self.open = False

    async def aclose(self) -> None:
        self.open = False
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


class _Session:
    """A ``load`` agent whose turns run on a thread of this process (the in-process pattern)."""

    def __init__(self, outbox: _Outbox) -> None:
        self.id = "s" + secrets.token_hex(8)
        self.outbox = outbox
        self.agent = LoadAgent({}, os.getcwd())
        self.seq = itertools.count(1)
        self._seq_lock = threading.Lock()
        self.cancel = threading.Event()
        self._turns = itertools.count(1)

    def emit(self, event_type: str, payload: dict[str, Any]) -> None:
        """Called on the turn's thread: encode there (as an in-process agent would), hand over to the loop."""
        with self._seq_lock:
            seq = next(self.seq)
        frame = rpc.wrap_event(event_type, encode_json(payload), self.id, seq).decode()
        self.outbox.send_threadsafe(frame)

    def submit(self, text: str) -> str:
        turn_id = f"{self.id}.t{next(self._turns)}"
        threading.Thread(target=self._run_turn, args=(turn_id, text), name=f"turn-{turn_id}", daemon=True).start()
        return turn_id

    def _run_turn(self, turn_id: str, text: str) -> None:
        handle = TurnHandle(turn_id, self.emit, self.cancel)
        self.emit("turn.start", {"turn_id": turn_id, "text": text})
        payload: dict[str, Any] = {"turn_id": turn_id, "status": "ok"}
        try:
            result = self.agent.run_turn(text, handle)
        except Exception as exc:  # noqa: BLE001
            payload.update(status="error", error=f"{type(exc).__name__}: {exc}")
        else:
            if result is not None:
                payload["status"] = result.status
                if result.error:
                    payload["error"] = result.error
            elif handle.cancelled:
                payload["status"] = "interrupted"
        self.emit("turn.complete", payload)


class _State:
    def __init__(self, lag_log: str | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.loop_lag = Histogram("wg_loop_lag_seconds", "How late the event loop woke up", buckets=LAG_BUCKETS,
                                  registry=self.registry)
        self.lag = LoopLagMonitor(observer=self._observe)
        self.sessions: dict[str, _Session] = {}
        # A stalled loop cannot answer /metrics in time: the bench reads its samples from this file instead.
        self._lag_fd = os.open(lag_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600) if lag_log else None

    def _observe(self, lag_s: float) -> None:
        self.loop_lag.observe(lag_s)
        if self._lag_fd is not None:
            os.write(self._lag_fd, f"{time.time():.6f} {lag_s:.6f}\n".encode())


async def ws_endpoint(websocket: WebSocket) -> None:
    state: _State = websocket.app.state.baseline
    await websocket.accept()
    outbox = _Outbox(websocket)
    outbox.send(rpc.encode_event("gateway.ready", {"version": "baseline", "protocol": 1, "epoch": "baseline",
                                                   "ping": None}))
    owned: list[_Session] = []
    try:
        while True:
            message = json.loads(await websocket.receive_text())
            method, params, request_id = message["method"], message.get("params") or {}, message.get("id")
            if method == "gateway.ping":
                result: Any = {"ok": True}
            elif method == "session.create":
                session = _Session(outbox)
                state.sessions[session.id] = session
                owned.append(session)
                result = {"session_id": session.id, "agent": "load", "worker_pid": os.getpid(), "created_at": 0}
            elif method == "prompt.submit":
                turn_id = state.sessions[params["session_id"]].submit(params["text"])
                result = {"status": "started", "turn_id": turn_id}
            elif method == "session.close":
                closing = state.sessions.pop(params["session_id"], None)
                if closing is not None:
                    closing.cancel.set()
                result = {"closed": True}
            else:
                outbox.send(rpc.encode_error(request_id, rpc.RpcError(rpc.METHOD_NOT_FOUND, method)))
                continue
            outbox.send(rpc.encode_result(request_id, result))
    except WebSocketDisconnect:
        pass
    finally:
        for session in owned:
            session.cancel.set()
            state.sessions.pop(session.id, None)
        await outbox.aclose()


async def bare_endpoint(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.send_text(rpc.encode_event("gateway.ready", {"version": "bare"}))
    try:
        while True:
            ask = json.loads(await websocket.receive_text())
            turn_id = str(ask["turn_id"])
            if "delta_bytes" in ask:  # token streaming: what bench.agents:Deltas emits
                frame = rpc.wrap_event("message.delta", encode_json(
                    {"turn_id": turn_id, "text": "x" * int(ask["delta_bytes"])}), "sbare", 1).decode()
            else:
                size = int(ask["chunk_kb"]) * 1024
                payload = {"turn_id": turn_id, "text": _chunk_text("bare", size, []), "redactions": 0}
                frame = rpc.wrap_event("tool.output", encode_json(payload), "sbare", 1).decode()
            for _ in range(int(ask["count"])):
                await websocket.send_text(frame)
            await websocket.send_text(rpc.wrap_event("turn.complete", encode_json(
                {"turn_id": turn_id, "status": "ok"}), "sbare", 2).decode())
    except WebSocketDisconnect:
        pass


async def healthz(request: Request) -> Response:
    lag = request.app.state.baseline.lag.snapshot()
    return JSONResponse({"status": "ok", "loop_lag_ms": lag["max"], "loop_lag_p99_ms": lag["p99"]})


async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.baseline.registry), media_type=CONTENT_TYPE_LATEST)


def create_app(lag_log: str | None = None) -> Starlette:
    state = _State(lag_log)

    async def lifespan(app: Starlette):  # type: ignore[no-untyped-def]
        state.lag.start()
        yield
        for session in list(state.sessions.values()):
            session.cancel.set()
        await state.lag.stop()

    app = Starlette(routes=[Route("/healthz", healthz), Route("/metrics", metrics),
                            WebSocketRoute("/ws", ws_endpoint), WebSocketRoute("/bare", bare_endpoint)],
                    lifespan=lifespan)
    app.state.baseline = state
    return app


class _Server(uvicorn.Server):
    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and sockets:
            print(f"{READY_PREFIX} port={sockets[0].getsockname()[1]}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.baseline_app", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ws-ping-interval", type=float, default=None)
    parser.add_argument("--ws-ping-timeout", type=float, default=None)
    parser.add_argument("--lag-log", default=None, help="append '<unix time> <lag s>' per loop-lag sample here")
    args = parser.parse_args(argv)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(2048)
    config = uvicorn.Config(create_app(args.lag_log), lifespan="on", ws_ping_interval=args.ws_ping_interval,
                            ws_ping_timeout=args.ws_ping_timeout, ws_max_size=1024 * 1024,
                            ws_per_message_deflate=False, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=2, server_header=False)
    _Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
