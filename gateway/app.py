"""Starlette routes: ``/ws``, ``/pty/{id}``, ``/healthz``, ``/metrics`` and the dashboard.

This layer is thin on purpose: it checks handshakes, moves frames between sockets and the components that
own behaviour (``SessionRegistry``, ``TerminalRegistry``, ``Supervisor``), and turns exceptions into
JSON-RPC errors.  Nothing here can take long on the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from gateway import PROTOCOL_VERSION, __version__, auth, rpc
from gateway.config import Config
from gateway.connection import Connection
from gateway.looplag import LoopLagMonitor
from gateway.metrics import Metrics
from gateway.methods import HANDLERS, CallContext
from gateway.ratelimit import TokenBucket
from gateway.sessions import SessionRegistry
from gateway.slash import SlashRunner  # noqa: F401  (imported so a broken slash module fails at start-up)
from gateway.terminals import TerminalRegistry
from workers.supervisor import Supervisor

logger = logging.getLogger("worker_gateway.app")
STATIC_DIR = Path(__file__).parent / "static"


@dataclass
class GatewayState:
    """Everything one gateway run owns.  Created by :func:`create_app`, started and stopped by its lifespan."""

    config: Config
    epoch: str = field(default_factory=lambda: secrets.token_hex(8))
    started_at: float = field(default_factory=time.monotonic)
    metrics: Metrics = field(default_factory=Metrics)
    connections: set[Connection] = field(default_factory=set)
    supervisor: Supervisor | None = None
    sessions: SessionRegistry | None = None
    terminals: TerminalRegistry | None = None
    lag: LoopLagMonitor | None = None
    shutting_down: bool = False

    async def start(self) -> None:
        self.lag = LoopLagMonitor(observer=self.metrics.loop_lag.observe)
        self.lag.start()
        self.supervisor = Supervisor.from_config(self.config)
        await self.supervisor.start()
        self.sessions = SessionRegistry(self.config, self.supervisor, self.metrics)
        self.terminals = TerminalRegistry(self.config, other_connections=lambda: len(self.connections))

    async def shutdown(self) -> None:
        """Close every session through the teardown funnel, then terminals and workers.  Idempotent."""
        if self.shutting_down:
            return
        self.shutting_down = True
        if self.sessions is not None:
            await self.sessions.close_all("shutdown")
        # Let the session.closed events reach their clients before uvicorn closes the sockets.
        await asyncio.gather(*(c.flush(1.0) for c in list(self.connections)), return_exceptions=True)
        if self.terminals is not None:
            await self.terminals.close_all()
        if self.supervisor is not None:
            await self.supervisor.close()
        if self.lag is not None:
            await self.lag.stop()

    def health(self) -> dict[str, Any]:
        lag = self.lag.snapshot() if self.lag else {"max": 0.0, "p99": 0.0, "last": 0.0}
        return {
            "status": "ok",
            "sessions": self.sessions.live_count if self.sessions else 0,
            "workers": self.supervisor.live_workers if self.supervisor else 0,
            "connections": len(self.connections),
            "loop_lag_ms": lag["max"],
            "loop_lag_p99_ms": lag["p99"],
            "uptime_s": round(time.monotonic() - self.started_at, 3),
        }

    def ready_event(self) -> str:
        return rpc.encode_event("gateway.ready", {
            "version": __version__,
            "protocol": PROTOCOL_VERSION,
            "epoch": self.epoch,
            "ping": {"interval": self.config.ws_ping_interval, "timeout": self.config.ws_ping_timeout},
        })


def _header_map(scope_headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for raw_name, raw_value in scope_headers:
        name = raw_name.decode("latin-1").lower()
        value = raw_value.decode("latin-1")
        # Duplicated headers: keep the first (a second Host or Origin must not override the first one).
        headers.setdefault(name, value)
    return headers


def _check(state: GatewayState, conn_scope: WebSocket | Request, require_token: bool = True) -> auth.Verdict:
    raw_headers = conn_scope.scope["headers"]
    for singleton in (b"host", b"origin"):
        if sum(1 for name, _ in raw_headers if name.lower() == singleton) > 1:
            return auth.Verdict(singleton.decode())  # ambiguous: which one would a check trust?
    subprotocols = conn_scope.scope.get("subprotocols", []) if conn_scope.scope["type"] == "websocket" else []
    return auth.check_handshake(state.config, _header_map(conn_scope.scope["headers"]),
                                dict(conn_scope.query_params), subprotocols, require_token)


async def _reject(state: GatewayState, websocket: WebSocket, reason: str) -> None:
    state.metrics.handshake_rejections.labels(reason=reason).inc()
    # Closing before accept makes uvicorn answer the handshake with HTTP 403.
    await websocket.close()


async def _admit(websocket: WebSocket) -> auth.Verdict | None:
    """Run the handshake checks; a rejected handshake is answered 403 here and None returned."""
    state: GatewayState = websocket.app.state.gateway
    verdict = _check(state, websocket)
    if not verdict.accepted:
        await _reject(state, websocket, verdict.reason or "token")
        return None
    return verdict


async def ws_endpoint(websocket: WebSocket) -> None:
    state: GatewayState = websocket.app.state.gateway
    verdict = await _admit(websocket)
    if verdict is None:
        return
    if state.shutting_down:
        await _reject(state, websocket, "shutting_down")
        return
    await websocket.accept(subprotocol=verdict.subprotocol)
    pty_sockets = state.terminals.sockets if state.terminals is not None else 0  # they share the limit
    if len(state.connections) + pty_sockets >= state.config.max_connections:
        # Accepted only to say why in a typed error; 1013 = try again later.
        state.metrics.handshake_rejections.labels(reason="connection_limit").inc()
        await websocket.send_text(rpc.encode_error(None, rpc.RpcError(
            rpc.LIMIT_REACHED, f"connection limit reached: max_connections={state.config.max_connections}",
            {"limit": "max_connections"})))
        await websocket.close(code=1013, reason="connection limit reached")
        return
    metrics = state.metrics
    config = state.config
    stall_timeout = (config.ws_ping_interval + config.ws_ping_timeout
                     if config.ws_ping_interval is not None and config.ws_ping_timeout is not None else None)
    conn = Connection(websocket, config.outbound_max_bytes, on_sent=metrics.bytes_sent.inc,
                      stall_timeout=stall_timeout)
    state.connections.add(conn)
    metrics.ws_connections.inc()
    metrics.ws_connections_total.inc()
    conn.start()
    conn.send(state.ready_event())
    receiving = asyncio.get_running_loop().create_task(_receive_loop(state, websocket, conn),
                                                       name=f"ws-receiver-{conn.id}")
    try:
        # A peer that stopped reading never produces a disconnect (see Connection.stalled): stop waiting
        # for one then, so that its sessions are detached and reaped like any other disconnect.
        await asyncio.wait((receiving, conn.stalled), return_when=asyncio.FIRST_COMPLETED)
        if receiving.done():
            receiving.result()
    finally:
        receiving.cancel()
        if not conn.stalled.done():
            conn.stalled.cancel()
        await conn.aclose()
        state.connections.discard(conn)
        metrics.ws_connections.dec()
        if state.sessions is not None:
            await state.sessions.connection_lost(conn)


async def _receive_loop(state: GatewayState, websocket: WebSocket, conn: Connection) -> None:
    """Read client frames until the disconnect; answer or dispatch each one."""
    metrics = state.metrics
    bucket = TokenBucket(state.config.rate_per_s, state.config.rate_burst)
    tasks: set[asyncio.Task[None]] = set()
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                break
            data = message.get("text")
            if data is None:
                data = message.get("bytes")
                if data is not None:
                    conn.send(rpc.encode_error(None, rpc.RpcError(
                        rpc.INVALID_REQUEST, "binary frames are not accepted on /ws: send JSON-RPC as text frames")))
                    continue
                continue
            if not bucket.take():
                _answer_limit(conn, data, state.config)
                continue
            try:
                request = rpc.parse_request(data, max_depth=state.config.max_json_depth)
            except rpc.RequestError as exc:
                conn.send(rpc.encode_error(exc.request_id, exc.error))
                continue
            metrics.requests.labels(method=request.method).inc()
            if request.method == "gateway.ping":  # answered inline: never queued behind anything
                if not request.is_notification:
                    conn.send(rpc.encode_result(request.id, {"ok": True}))
                continue
            ctx = CallContext(state=state, conn=conn, request_id=request.id)
            task = asyncio.get_running_loop().create_task(_dispatch(ctx, request))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
    except WebSocketDisconnect:
        pass


def _answer_limit(conn: Connection, data: str, config: Config) -> None:
    try:
        request_id = rpc.parse_request(data, max_depth=config.max_json_depth).id
    except rpc.RequestError as exc:
        request_id = exc.request_id
    conn.send(rpc.encode_error(request_id, rpc.RpcError(
        rpc.LIMIT_REACHED,
        f"rate limit reached: rate_per_s={config.rate_per_s:g} requests/s per connection "
        f"(rate_burst={config.rate_burst}); slow down and retry",
        {"limit": "rate_per_s"})))


async def _dispatch(ctx: CallContext, request: rpc.Request) -> None:
    conn = ctx.conn
    try:
        result = await HANDLERS[request.method](ctx, request.params)
    except rpc.RpcError as err:
        if not request.is_notification:
            conn.send(rpc.encode_error(request.id, err))
        return
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        # Something the handler awaited was cancelled under it: still answer.
        if not request.is_notification:
            conn.send(rpc.encode_error(request.id, rpc.RpcError(
                rpc.INTERNAL_ERROR, f"{request.method} was cancelled before it completed; retry")))
        return
    except Exception as exc:  # a bug must cost one request, never the connection
        logger.exception("internal error in %s", request.method)
        if not request.is_notification:
            conn.send(rpc.encode_error(request.id, rpc.RpcError(
                rpc.INTERNAL_ERROR, f"internal error in {request.method}: {type(exc).__name__}")))
        return
    if request.is_notification:
        return
    if callable(result):  # a handler that must send frames right after its response (session.resume)
        result()
    else:
        conn.send(rpc.encode_result(request.id, result))


async def pty_endpoint(websocket: WebSocket) -> None:
    state: GatewayState = websocket.app.state.gateway
    if await _admit(websocket) is None:
        return
    assert state.terminals is not None
    await state.terminals.pty_endpoint(websocket)


async def healthz(request: Request) -> Response:
    return JSONResponse(request.app.state.gateway.health())


async def metrics_endpoint(request: Request) -> Response:
    state: GatewayState = request.app.state.gateway
    if not state.config.metrics_public:
        verdict = _check(state, request)
        if not verdict.accepted:
            state.metrics.handshake_rejections.labels(reason=verdict.reason or "token").inc()
            return PlainTextResponse("forbidden: /metrics needs the token (or --metrics-public)\n", status_code=403)
    body, content_type = state.metrics.render(state)
    return Response(body, media_type=content_type)


async def index(request: Request) -> Response:
    """The dashboard.  The token arrives once in the URL; the page is then served with an HttpOnly cookie."""
    state: GatewayState = request.app.state.gateway
    verdict = _check(state, request)
    if not verdict.accepted:
        return HTMLResponse(_LOGIN_HTML, status_code=403)
    page = STATIC_DIR / "index.html"
    response: Response
    if page.is_file():
        response = FileResponse(page, media_type="text/html")
    else:
        response = HTMLResponse("<!doctype html><title>worker-gateway</title><p>worker-gateway is running.</p>")
    if state.config.token and request.query_params.get("token"):
        response.set_cookie(auth.COOKIE_NAME, state.config.token, httponly=True, samesite="strict", path="/")
    response.headers["Cache-Control"] = "no-store"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


async def static_file(request: Request) -> Response:
    state: GatewayState = request.app.state.gateway
    verdict = _check(state, request)
    if not verdict.accepted:
        return PlainTextResponse("forbidden\n", status_code=403)
    rel = request.path_params["path"]
    base = STATIC_DIR.resolve()
    target = (base / rel).resolve()
    if base not in target.parents or not target.is_file():
        return PlainTextResponse("not found\n", status_code=404)
    return FileResponse(target)


_LOGIN_HTML = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>worker-gateway: sign in</title>
</head><body><main><h1>worker-gateway</h1><p>This page needs the access token. Open the URL that the gateway
printed when it started (it ends with <code>?token=...</code>).</p></main></body></html>"""


def create_app(config: Config) -> Starlette:
    """The ASGI app for ``config`` (which must already carry its token, see ``Config.with_token``)."""
    state = GatewayState(config=config)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await state.start()
        try:
            yield
        finally:
            await state.shutdown()

    app = Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/metrics", metrics_endpoint),
            Route("/", index),
            Route("/static/{path:path}", static_file),
            WebSocketRoute("/ws", ws_endpoint),
            WebSocketRoute("/pty/{terminal_id}", pty_endpoint),
        ],
        lifespan=lifespan,
    )
    app.state.gateway = state
    return app
