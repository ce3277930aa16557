"""Starlette routes: ``/ws``, ``/pty/{id}``, ``/healthz``, ``/metrics`` and the dashboard.

This layer is thin on purpose: it checks handshakes, moves frames between sockets and the components that
own behaviour (``SessionRegistry``, ``TerminalRegistry``, ``Supervisor``), and turns exceptions into
JSON-RPC errors.  Nothing here can take long on the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import logging
import secrets
import time
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from gateway import PROTOCOL_VERSION, __version__, auth, keepalive, rpc
from gateway.config import Config
from gateway.connection import Connection
from gateway.looplag import LoopLagMonitor
from gateway.methods import HANDLERS, CallContext, Components, Frames
from gateway.metrics import Metrics
from gateway.ratelimit import TokenBucket
from gateway.ratelog import RateLimitedLog
from gateway.sessions import SessionRegistry
from gateway.slash import SlashRunner  # noqa: F401  (imported so a broken slash module fails at start-up)
from gateway.store import EventStore
from gateway.terminals import TerminalRegistry
from gateway.wire import Method
from workers.backends import WorkerBackend, create_backend

logger = logging.getLogger("worker_gateway.app")
_rejections = RateLimitedLog(logging.getLogger("worker_gateway.handshake"))
STATIC_DIR = Path(__file__).parent / "static"
#: Requests of one connection whose handlers may run at once (more wait unread in its socket).
_MAX_INFLIGHT_PER_CONNECTION = 64


@dataclass
class GatewayState:
    """Everything one gateway run owns.  Created by :func:`create_app`, started and stopped by its lifespan."""

    config: Config
    epoch: str = field(default_factory=lambda: secrets.token_hex(8))
    started_at: float = field(default_factory=time.monotonic)
    metrics: Metrics = field(default_factory=Metrics)
    connections: set[Connection] = field(default_factory=set)
    backend: WorkerBackend | None = None
    components: Components | None = None
    store: EventStore | None = None
    sessions: SessionRegistry | None = None
    terminals: TerminalRegistry | None = None
    lag: LoopLagMonitor | None = None
    shutting_down: bool = False

    async def open_store(self) -> None:
        """Open the session store (before the server accepts anything).  Raises :class:`StoreError`
        (locked by another gateway, corrupt, unwritable): the server then exits 2 with its message."""
        self.store = await EventStore.from_config(self.config, on_durable=self._on_durable)
        if self.store is not None:
            await self.store.claim(self.epoch)

    def _on_durable(self, durable: dict[str, int]) -> None:
        if self.sessions is not None:
            self.sessions.on_durable(durable)

    async def close_store(self) -> None:
        store, self.store = self.store, None
        if store is not None:
            await store.close()

    async def open_backend(self) -> None:
        """Create and start the worker backend.  Raises ``BackendUnavailable`` (missing extra, unreachable
        cluster): the server then exits 2 with its message."""
        self.backend = create_backend(self.config)
        await self.backend.start()

    async def start(self) -> None:
        self.lag = LoopLagMonitor(observer=self.metrics.loop_lag.observe)
        self.lag.start()
        if self.backend is None:
            await self.open_backend()
        assert self.backend is not None
        self.sessions = SessionRegistry(self.config, self.backend, self.metrics, self.store)
        await self.sessions.recover()
        self.terminals = TerminalRegistry(self.config, other_connections=lambda: len(self.connections))
        self.components = Components(self.config, self.sessions, self.terminals, self.backend)

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
        if self.backend is not None:
            await self.backend.close()
        await self.close_store()
        if self.lag is not None:
            await self.lag.stop()

    def health(self) -> dict[str, Any]:
        lag = self.lag.snapshot() if self.lag else {"max": 0.0, "p99": 0.0, "last": 0.0}
        degraded = self.sessions.store_health if self.sessions else None
        return {
            "status": "ok" if degraded is None else "degraded",
            **({"reason": degraded} if degraded is not None else {}),
            "sessions": self.sessions.live_count if self.sessions else 0,
            "workers": self.backend.live_workers if self.backend else 0,
            "connections": len(self.connections),
            "loop_lag_ms": lag["max"],
            "loop_lag_p99_ms": lag["p99"],
            "uptime_s": round(time.monotonic() - self.started_at, 3),
        }

    def ready_event(self, ping: keepalive.PingPolicy | None = None) -> str:
        """``gateway.ready`` for one connection: ``ping`` is that connection's own keepalive policy."""
        return rpc.encode_event(
            "gateway.ready",
            {
                "version": __version__,
                "protocol": PROTOCOL_VERSION,
                "epoch": self.epoch,
                "ping": (ping or self.bind_ping_policy()).as_wire(),
            },
        )

    def bind_ping_policy(self) -> keepalive.PingPolicy:
        """The policy when the ASGI server recorded none for a connection (not our protocol class)."""
        cfg = self.config
        reason = (
            keepalive.PingReason.EXPLICIT
            if cfg.ping_explicit
            else keepalive.PingReason.LOOPBACK_PEER
            if cfg.ws_ping_interval is None
            else keepalive.PingReason.PUBLIC_BIND
        )
        return keepalive.PingPolicy(cfg.ws_ping_interval, cfg.ws_ping_timeout, reason)


def _header_map(scope_headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for raw_name, raw_value in scope_headers:
        name = raw_name.decode("latin-1").lower()
        value = raw_value.decode("latin-1")
        # Duplicated headers: keep the first (a second Host or Origin must not override the first one).
        headers.setdefault(name, value)
    return headers


def _server_port(scope: Any) -> int | None:
    server = scope.get("server")
    return server[1] if server else None


def _check(state: GatewayState, conn_scope: WebSocket | Request, require_token: bool = True) -> auth.Verdict:
    scope = conn_scope.scope
    raw_headers = scope["headers"]
    for singleton in (b"host", b"origin"):
        if sum(1 for name, _ in raw_headers if name.lower() == singleton) > 1:
            # Ambiguous: which one would a check trust?
            return auth.Verdict(singleton.decode(), detail=f"the request has more than one {singleton.decode()} header")
    subprotocols = scope.get("subprotocols", []) if scope["type"] == "websocket" else []
    return auth.check_handshake(
        state.config,
        _header_map(raw_headers),
        dict(conn_scope.query_params),
        subprotocols,
        require_token,
        scheme=scope.get("scheme"),
        server_port=_server_port(scope),
    )


def _log_rejection(conn_scope: WebSocket | Request, verdict: auth.Verdict) -> None:
    """One line naming the failed check; the client is the real one when a trusted proxy said so."""
    client = conn_scope.scope.get("client")
    peer = f"{client[0]}:{client[1]}" if client else "?"
    _rejections.log(
        logging.WARNING,
        "handshake rejected: %s %s from %s: %s check failed: %s",
        conn_scope.scope["type"],
        conn_scope.url.path,
        peer,
        verdict.reason,
        verdict.detail,
    )


async def _reject(state: GatewayState, websocket: WebSocket, verdict: auth.Verdict) -> None:
    """HTTP 403 before ``accept`` (no frame exchanged), saying in the body which check failed and why."""
    reason = verdict.reason or "token"
    state.metrics.handshake_rejections.labels(reason=reason).inc()
    _log_rejection(websocket, verdict)
    body = f"forbidden: {reason} check failed: {verdict.detail}\n"
    await websocket.send_denial_response(PlainTextResponse(body, status_code=403))


async def _admit(websocket: WebSocket) -> auth.Verdict | None:
    """Run the handshake checks; a rejected handshake is answered 403 here and None returned."""
    state: GatewayState = websocket.app.state.gateway
    verdict = _check(state, websocket)
    if not verdict.accepted:
        await _reject(state, websocket, verdict)
        return None
    return verdict


async def ws_endpoint(websocket: WebSocket) -> None:
    state: GatewayState = websocket.app.state.gateway
    verdict = await _admit(websocket)
    if verdict is None:
        return
    if state.shutting_down:
        await _reject(state, websocket, auth.Verdict("shutting_down", detail="the gateway is shutting down"))
        return
    await websocket.accept(subprotocol=verdict.subprotocol)
    pty_sockets = state.terminals.sockets if state.terminals is not None else 0  # they share the limit
    if len(state.connections) + pty_sockets >= state.config.max_connections:
        # Accepted only to say why in a typed error; 1013 = try again later.
        state.metrics.handshake_rejections.labels(reason="connection_limit").inc()
        await websocket.send_text(
            rpc.encode_error(
                None,
                rpc.RpcError(
                    rpc.LIMIT_REACHED,
                    f"connection limit reached: max_connections={state.config.max_connections}",
                    {"limit": "max_connections"},
                ),
            )
        )
        await websocket.close(code=1013, reason="connection limit reached")
        return
    metrics = state.metrics
    config = state.config
    ping = keepalive.from_scope(websocket.scope, state.bind_ping_policy())
    conn = Connection(
        websocket, config.outbound_max_bytes, on_sent=metrics.bytes_sent.inc, stall_timeout=ping.stall_timeout
    )
    state.connections.add(conn)
    metrics.ws_connections.inc()
    metrics.ws_connections_total.inc()
    conn.start()
    conn.send(state.ready_event(ping))
    receiving = asyncio.get_running_loop().create_task(
        _receive_loop(state, websocket, conn), name=f"ws-receiver-{conn.id}"
    )
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
            if not conn.has_room and conn.is_open:
                # Over its outbound budget (it does not read what it asked for): stop reading its
                # requests until the queue drains, so their answers cannot pile up in our memory.
                await conn.wait_for_room()
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                break
            data = message.get("text")
            if data is None:
                data = message.get("bytes")
                if data is not None:
                    conn.send(
                        rpc.encode_error(
                            None,
                            rpc.RpcError(
                                rpc.INVALID_REQUEST,
                                "binary frames are not accepted on /ws: send JSON-RPC as text frames",
                            ),
                        )
                    )
                    continue
                continue
            try:
                request = rpc.parse_request(data, max_depth=state.config.max_json_depth)
            except rpc.RequestError as exc:
                if not bucket.take():
                    _answer_limit(conn, exc.request_id, state.config)
                elif not exc.notification:
                    conn.send(rpc.encode_error(exc.request_id, exc.error))
                continue
            # Acknowledgements are O(1) bookkeeping that a client sends per batch of events it processed:
            # they never count against its request rate (32 sessions acking would exhaust it).
            if request.method != Method.SESSION_ACK and not bucket.take():
                _answer_limit(conn, request.id, state.config)
                continue
            metrics.requests.labels(method=request.method).inc()
            if request.method == "gateway.ping":  # answered inline: never queued behind anything
                if not request.is_notification:
                    conn.send(rpc.encode_result(request.id, {"ok": True}))
                continue
            assert state.components is not None
            ctx = CallContext(components=state.components, conn=conn, request_id=request.id)
            task = asyncio.get_running_loop().create_task(_dispatch(ctx, request))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            # Let the handler run before the next read, so that its answer counts against the budget
            # checked above; and bound the handlers in flight per connection.
            await asyncio.sleep(0)
            if len(tasks) >= _MAX_INFLIGHT_PER_CONNECTION:
                await asyncio.wait(set(tasks), return_when=asyncio.FIRST_COMPLETED)
    except WebSocketDisconnect:
        pass


def _answer_limit(conn: Connection, request_id: int | str | None, config: Config) -> None:
    conn.send(
        rpc.encode_error(
            request_id,
            rpc.RpcError(
                rpc.LIMIT_REACHED,
                f"rate limit reached: rate_per_s={config.rate_per_s:g} requests/s per connection "
                f"(rate_burst={config.rate_burst}); slow down and retry",
                {"limit": "rate_per_s"},
            ),
        )
    )


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
            conn.send(
                rpc.encode_error(
                    request.id,
                    rpc.RpcError(rpc.INTERNAL_ERROR, f"{request.method} was cancelled before it completed; retry"),
                )
            )
        return
    except Exception as exc:  # a bug must cost one request, never the connection
        logger.exception("internal error in %s", request.method)
        if not request.is_notification:
            conn.send(
                rpc.encode_error(
                    request.id,
                    rpc.RpcError(rpc.INTERNAL_ERROR, f"internal error in {request.method}: {type(exc).__name__}"),
                )
            )
        return
    if request.is_notification:
        return
    if isinstance(result, Frames):  # pre-encoded: queued in one step, then its continuation
        for frame in result.frames:
            conn.send(frame)
        if result.then is not None:
            result.then()
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
            _log_rejection(request, verdict)
            return PlainTextResponse(
                f"forbidden: /metrics needs the token (or --metrics-public): {verdict.reason} "
                f"check failed: {verdict.detail}\n",
                status_code=403,
            )
    body, content_type = state.metrics.render(state)
    return Response(body, media_type=content_type)


async def index(request: Request) -> Response:
    """The dashboard.  The token arrives once (in the URL, or posted by the sign-in form, which keeps it out of
    URLs that proxies log); the page is then served with an HttpOnly cookie."""
    state: GatewayState = request.app.state.gateway
    posted = await _posted_token(request) if request.method == "POST" else None
    if posted is not None and not _check(state, request, require_token=False).accepted:
        return HTMLResponse(_login_html("This sign-in came from another site or host name."), status_code=403)
    if posted is not None and state.config.token and not auth.tokens_match(posted, state.config.token):
        return HTMLResponse(_login_html("That is not this gateway's token."), status_code=403)
    if posted is not None:  # signed in: set the cookie and load the page with GET (no re-post on reload)
        response: Response = Response(status_code=303, headers={"Location": "./"})
        if state.config.token:
            _set_token_cookie(request, response, state.config.token)
        return response
    verdict = _check(state, request)
    if not verdict.accepted:
        return HTMLResponse(_login_html(""), status_code=403, headers={"Cache-Control": "no-store"})
    page = STATIC_DIR / "index.html"
    if page.is_file():
        response = FileResponse(page, media_type="text/html")
    else:
        response = HTMLResponse("<!doctype html><title>worker-gateway</title><p>worker-gateway is running.</p>")
    if state.config.token and request.query_params.get("token"):
        _set_token_cookie(request, response, state.config.token)
    response.headers["Cache-Control"] = "no-store"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


def _set_token_cookie(request: Request, response: Response, token: str) -> None:
    """Never the token itself: an opaque value under a per-port name (see gateway/auth.py), limited to the
    gateway's path prefix behind a proxy, and Secure (``__Host-``/``__Secure-``) over https."""
    root = request.scope.get("root_path", "").rstrip("/")
    secure = request.url.scheme == "https"
    response.set_cookie(
        auth.cookie_name(_server_port(request.scope), secure, root),
        auth.cookie_value(token),
        httponly=True,
        samesite="strict",
        path=root + "/",
        secure=secure,
    )


async def _posted_token(request: Request) -> str:
    """The ``token`` field of the sign-in form (urlencoded, at most 4 KiB: anything else is no token)."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > 4096:
            return ""
    return urllib.parse.parse_qs(body.decode("utf-8", "replace")).get("token", [""])[0]


async def static_file(request: Request) -> Response:
    state: GatewayState = request.app.state.gateway
    verdict = _check(state, request)
    if not verdict.accepted:
        return PlainTextResponse(f"forbidden: {verdict.reason} check failed: {verdict.detail}\n", status_code=403)
    rel = request.path_params["path"]
    base = STATIC_DIR.resolve()
    try:
        target = (base / rel).resolve()
        found = base in target.parents and target.is_file()
    except (ValueError, OSError):  # a NUL byte (``/static/%00``), a name too long: no such file
        found = False
    if not found:
        return PlainTextResponse("not found\n", status_code=404)
    return FileResponse(target)


def _login_html(error: str) -> str:
    """The sign-in page: a plain form (no script: /static/ needs the token too) that posts the token."""
    message = f'<p class="error" role="alert">{html.escape(error)}</p>' if error else ""
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>worker-gateway: sign in</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><meta name="referrer" content="no-referrer">
<style>body{{font:15px/1.5 system-ui,sans-serif;max-width:36rem;margin:3rem auto;padding:0 1rem}}
input{{font:inherit;width:100%;padding:4px}}button{{font:inherit;margin-top:8px}}.error{{color:#b42318}}</style>
</head><body><main><h1>worker-gateway</h1><p>This page needs the access token. Open the URL that the gateway
printed when it started (it ends with <code>?token=...</code>), or paste the token here:</p>{message}
<form method="post"><label for="token">Access token</label>
<input id="token" name="token" type="password" autocomplete="current-password" required autofocus>
<button type="submit">Sign in</button></form></main></body></html>"""


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
            Route("/", index, methods=["GET", "HEAD", "POST"]),
            Route("/static/{path:path}", static_file),
            WebSocketRoute("/ws", ws_endpoint),
            WebSocketRoute("/pty/{terminal_id}", pty_endpoint),
        ],
        lifespan=lifespan,
    )
    app.state.gateway = state
    return app
