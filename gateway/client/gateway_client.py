"""The asyncio client of the ``/ws`` channel: calls, per-session event streams, reconnect + resume, acks.

The package docstring (``gateway/client/__init__.py``) and ``docs/client.md`` hold the contract.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import socket
import time
import urllib.parse
from dataclasses import dataclass
from types import EllipsisType
from typing import Any

import websockets
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from gateway.client import _json
from gateway.client.acks import AckPolicy, AckSupport, AckTracker
from gateway.client.errors import (
    CallTimeout,
    ConnectionLost,
    GatewayError,
    HandshakeRejected,
    LimitReached,
    MethodNotFound,
    ReplayTruncated,
    error_from_response,
)
from gateway.client.policy import ClientState, ClientStats, ReconnectPolicy
from gateway.client.streams import END, SessionEvents, SessionStream
from gateway.client.urls import is_loopback, normalize_url, without_token
from gateway.wire import JSONRPC_VERSION, EventType, Method

logger = logging.getLogger("gateway.client")


@dataclass
class _Pending:
    method: str
    future: asyncio.Future[dict[str, Any]]
    ws: ClientConnection


# The client --------------------------------------------------------------------------------------------
class GatewayClient:
    """An asyncio client of the ``/ws`` JSON-RPC channel; use it as ``async with GatewayClient(...)``.

    :param url: ``ws://host:port/ws`` (``http://host:port`` is accepted and mapped to it).
    :param token: the gateway's auth token, sent as ``Authorization: Bearer``; it may instead be in the URL
        as ``?token=``.
    :param reconnect: a :class:`ReconnectPolicy`; ``ReconnectPolicy(enabled=False)`` makes a drop final.
    :param call_timeout: default seconds to wait for an answer (``request(..., timeout=)`` overrides it).
    :param open_timeout: seconds for the TCP + WebSocket handshake and the ``gateway.ready`` event.
    :param max_queued_events: bound of each session's event queue.  When a queue is full the client stops
        reading the socket (the gateway then pauses that worker): consume the events of every session you
        own, or calls on this client stall.  ``None`` removes the bound.
    :param ping_interval, ping_timeout: WebSocket keepalive of the client side; by default (``...``)
        disabled on loopback URLs and 20 s / 20 s elsewhere (the gateway's own policy); ``None`` disables.
    :param max_message_size: largest frame accepted from the gateway (default 64 MiB).
    :param receive_buffer: ``SO_RCVBUF`` of the client's socket (default 1 MiB; ``None``: the OS default,
        which autotunes up to ``net.ipv4.tcp_rmem`` max, 32 MiB on many Linux systems).  Whatever sits in
        this buffer when a connection drops is lost with it and must be replayed by the gateway, whose
        replay buffer is bounded (8 MiB by default): a small buffer keeps a resume within what it holds.
    :param seed: seed of the backoff jitter (reproducible runs).
    :param acks: an :class:`AckPolicy`: how often the client sends ``session.ack`` for what its callers
        have taken from the event iterators; ``AckPolicy(enabled=False)`` never acks.  A gateway without
        the method (-32601) silently turns acking off.
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        reconnect: ReconnectPolicy | None = None,
        call_timeout: float = 30.0,
        open_timeout: float = 10.0,
        max_queued_events: int | None = 10_000,
        ping_interval: float | EllipsisType | None = ...,
        ping_timeout: float | EllipsisType | None = ...,
        max_message_size: int | None = 64 * 1024 * 1024,
        receive_buffer: int | None = 1024 * 1024,
        seed: int | None = None,
        acks: AckPolicy | None = None,
    ) -> None:
        self.url = normalize_url(url)
        self._token = token
        self.policy = reconnect or ReconnectPolicy()
        self.call_timeout = call_timeout
        self.open_timeout = open_timeout
        self.max_queued_events = max_queued_events
        loopback = is_loopback(urllib.parse.urlsplit(self.url).hostname)
        self._ping_interval = (None if loopback else 20.0) if ping_interval is ... else ping_interval
        self._ping_timeout = (None if loopback else 20.0) if ping_timeout is ... else ping_timeout
        self._max_size = max_message_size
        self._receive_buffer = receive_buffer
        self._rng = random.Random(seed)

        self.state = ClientState.CONNECTING
        self.stats = ClientStats()
        self.server_info: dict[str, Any] = {}  # payload of the last gateway.ready
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._reconnector: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._streams: dict[str, SessionStream] = {}
        self._aborting: ClientConnection | None = None
        self._failure: ConnectionLost | None = None
        self._acks = AckTracker(acks)
        self._ack_wakeup = asyncio.Event()
        self._acker: asyncio.Task[None] | None = None
        self._ack_timeout = 10.0

    # Lifecycle -----------------------------------------------------------------------------------------
    async def __aenter__(self) -> GatewayClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.aclose()

    async def connect(self) -> None:
        """Open the first connection (``async with`` does this).  Failing here is final: no retry."""
        if self.state is not ClientState.CONNECTING or self._ws is not None:
            raise RuntimeError("GatewayClient.connect() may be called once")
        await self._open()
        if self.state is ClientState.CONNECTING:  # not already reconnecting after an immediate drop
            self.state = ClientState.CONNECTED
            self._connected.set()
        if self._acks.active:
            self._acker = asyncio.get_running_loop().create_task(self._ack_loop(), name="gateway-client-acks")

    async def aclose(self) -> None:
        """End the client: close the socket, fail pending calls, end every event iterator.

        Sessions are not closed: the gateway keeps them detached for its grace period, so another client
        can resume them.  Call :meth:`close` first for the ones that should end.
        """
        if self.state is ClientState.CLOSED:
            return
        self.state = ClientState.CLOSED
        self._connected.set()  # wake waiters so they see CLOSED
        for task in (self._reconnector, self._acker):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._reconnector = self._acker = None
        ws, self._ws = self._ws, None
        if ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 5.0)
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
        self._fail_pending(None, "the client was closed")
        for stream in self._streams.values():
            self._end_stream(stream, None)

    def abort(self) -> None:
        """Drop the current connection abruptly (TCP abort, no close handshake) without ending the client.

        The client then behaves exactly as after a network failure: pending calls fail with
        :class:`ConnectionLost`, it reconnects and resumes its sessions.  Meant for tests and chaos runs.
        """
        ws = self._ws
        if ws is None or self.state is not ClientState.CONNECTED:
            return
        self._aborting = ws
        ws.transport.abort()

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait until the client is connected (after a reconnect, once its sessions are resumed)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        await self._await_connected(deadline)

    @property
    def connected(self) -> bool:
        return self.state is ClientState.CONNECTED

    @property
    def pending_calls(self) -> int:
        """Requests sent and not answered yet."""
        return len(self._pending)

    # Calls ---------------------------------------------------------------------------------------------
    async def call(self, method: str, /, **params: Any) -> dict[str, Any]:
        """Send one request and return its ``result``; raise the typed :class:`GatewayError` on an error."""
        return await self.request(method, params)

    async def request(
        self, method: str, params: dict[str, Any] | None = None, *, timeout: float | None = None
    ) -> dict[str, Any]:
        """Like :meth:`call`, with the params as a dict and an explicit timeout (seconds)."""
        timeout = self.call_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        await self._await_connected(deadline)
        ws = self._ws
        assert ws is not None
        params = dict(params or {})
        new_stream = None
        if method == Method.SESSION_RESUME and isinstance(params.get("session_id"), str):
            new_stream = self._prepare_resume(params)
        try:
            result = await self._request_on(ws, method, params, max(0.0, deadline - time.monotonic()))
        except BaseException:
            if new_stream is not None:
                self._streams.pop(new_stream.session_id, None)
            raise
        self._after_result(method, params, result)
        return result

    async def _request_on(
        self, ws: ClientConnection, method: str, params: dict[str, Any], timeout: float
    ) -> dict[str, Any]:
        request_id = next(self._ids)
        message: dict[str, Any] = {"jsonrpc": JSONRPC_VERSION, "id": request_id, "method": method}
        if params:
            message["params"] = params
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = _Pending(method, future, ws)
        try:
            try:
                await ws.send(_json.encode(message))
            except websockets.ConnectionClosed as exc:
                raise ConnectionLost(None, f"connection lost while sending {method}: {exc}") from exc
            try:
                response = await asyncio.wait_for(asyncio.shield(future), timeout)
            except TimeoutError:
                raise CallTimeout(None, f"no answer to {method} within {timeout:.1f}s") from None
        finally:
            self._pending.pop(request_id, None)
        if "error" in response:
            raise error_from_response(response["error"])
        result = response.get("result")
        return result if isinstance(result, dict) else {"result": result}

    # Session helpers -----------------------------------------------------------------------------------
    async def create_session(self, **params: Any) -> dict[str, Any]:
        """``session.create``; the new session is owned by this client (its events queue up for events())."""
        return await self.request(Method.SESSION_CREATE, params)

    async def submit(self, session_id: str, text: str) -> dict[str, Any]:
        """``prompt.submit``: ``{"status": "started" | "queued", "turn_id"}``.  Never re-sent on a drop."""
        return await self.request(Method.PROMPT_SUBMIT, {"session_id": session_id, "text": text})

    async def interrupt(self, session_id: str) -> dict[str, Any]:
        return await self.request(Method.SESSION_INTERRUPT, {"session_id": session_id})

    async def close(self, session_id: str) -> dict[str, Any]:
        """``session.close``: ends the session's workers; its event iterator ends after ``session.closed``."""
        return await self.request(Method.SESSION_CLOSE, {"session_id": session_id})

    async def resume(self, session_id: str, after_seq: int | None = None) -> dict[str, Any]:
        """``session.resume``: take ownership of a session (e.g. one created by another client).

        ``after_seq`` defaults to the last seq this client saw of that session (0 for a new one); the
        replayed events then arrive through :meth:`events`.
        """
        params: dict[str, Any] = {"session_id": session_id}
        if after_seq is not None:
            params["after_seq"] = after_seq
        return await self.request(Method.SESSION_RESUME, params)

    async def ping(self) -> dict[str, Any]:
        return await self.request(Method.PING)

    def events(self, session_id: str) -> SessionEvents:
        """An async iterator of the session's events (the ``params`` of each event notification).

        In ``seq`` order, each seq once, across reconnects; it ends after ``session.closed`` (or
        ``session.detached`` when another connection took the session over, or when the client is closed);
        it raises :class:`ReplayTruncated` for a gap the gateway could not fill, :class:`SessionNotFound`
        when the session was gone at a reconnect, :class:`ConnectionLost` when reconnecting gave up.
        """
        return SessionEvents(self._stream(session_id), self._processed)

    def last_seq(self, session_id: str) -> int:
        """The last seq queued for the caller of that session (0 if none)."""
        stream = self._streams.get(session_id)
        return stream.last_seq if stream else 0

    def processed_seq(self, session_id: str) -> int:
        """The last seq the session's iterators handed to the caller (0 if none): what acks confirm."""
        stream = self._streams.get(session_id)
        return stream.processed_seq if stream else 0

    @property
    def ack_support(self) -> AckSupport:
        """Whether the gateway takes ``session.ack`` (``UNKNOWN`` until its first answer)."""
        return self._acks.support

    @property
    def owned_sessions(self) -> list[str]:
        return [s.session_id for s in self._streams.values() if s.owned and not s.ended]

    def _stream(self, session_id: str) -> SessionStream:
        stream = self._streams.get(session_id)
        if stream is None:
            stream = SessionStream(session_id, asyncio.Queue(), owned=False)
            self._streams[session_id] = stream
        return stream

    def _prepare_resume(self, params: dict[str, Any]) -> SessionStream | None:
        """Before sending session.resume: make sure its replay lands in a stream with the right last_seq.

        Done before the request leaves, because the replayed events follow the answer immediately and the
        reader may queue them before the caller's coroutine runs again.
        """
        session_id = params["session_id"]
        existing = self._streams.get(session_id)
        if existing is not None and not existing.ended:
            # An explicit lower after_seq is allowed: events already queued are filtered as duplicates.  A
            # higher one skips events on purpose: that is the caller's choice, not a gap to report.
            after = params.setdefault("after_seq", existing.processed_seq)
            if isinstance(after, int) and not isinstance(after, bool) and after > existing.last_seq:
                existing.last_seq = existing.processed_seq = after
            return None
        if existing is not None:
            self._streams.pop(session_id)
        stream = self._stream(session_id)
        after = params.get("after_seq", 0)
        stream.last_seq = after if isinstance(after, int) and not isinstance(after, bool) and after > 0 else 0
        stream.processed_seq = stream.last_seq  # what the caller skipped counts as taken
        return stream

    def _after_result(self, method: str, params: dict[str, Any], result: dict[str, Any]) -> None:
        if method == Method.SESSION_CREATE and isinstance(result.get("session_id"), str):
            stream = self._streams.get(result["session_id"])
            if stream is None or stream.ended:
                self._streams.pop(result["session_id"], None)
                stream = self._stream(result["session_id"])
            stream.owned = True
        elif method == Method.SESSION_RESUME:
            stream = self._streams.get(params["session_id"])
            if stream is not None:
                stream.owned = True
                after = params.get("after_seq")
                if isinstance(after, int) and not isinstance(after, bool):
                    self._acks.resumed(stream.session_id, after)
        elif method == Method.SESSION_CLOSE:
            stream = self._streams.get(params["session_id"])
            if stream is not None:
                stream.owned = False  # do not resume it; session.closed (already queued) ends the iterator
                self._acks.forget(stream.session_id)

    # Acknowledgements ----------------------------------------------------------------------------------
    def _processed(self, stream: SessionStream, seq: int) -> None:
        """An iterator handed ``seq`` to the caller (called by :class:`SessionEvents`)."""
        if seq <= stream.processed_seq:
            return
        stream.processed_seq = seq
        if stream.owned and not stream.ended and self._acks.processed(stream.session_id, seq, time.monotonic()):
            self._ack_wakeup.set()

    async def _ack_loop(self) -> None:
        """Send the acks the tracker says are due, on the live connection only; never blocks a caller."""
        tracker = self._acks
        while tracker.active and self.state is not ClientState.CLOSED:
            ws = self._ws
            if ws is None or self.state is not ClientState.CONNECTED:
                await asyncio.sleep(tracker.policy.every_s)  # a resume acknowledges for us meanwhile
                continue
            wait = tracker.next_wakeup(time.monotonic())
            self._ack_wakeup.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._ack_wakeup.wait(), tracker.policy.every_s if wait is None else wait)
            if ws is not self._ws or self.state is not ClientState.CONNECTED:
                continue
            due = tracker.due(time.monotonic())
            if due:
                await asyncio.gather(*(self._send_ack(ws, session_id, seq) for session_id, seq in due))

    async def _send_ack(self, ws: ClientConnection, session_id: str, seq: int) -> None:
        tracker = self._acks
        try:
            await self._request_on(ws, Method.SESSION_ACK, {"session_id": session_id, "seq": seq}, self._ack_timeout)
        except MethodNotFound:
            logger.debug("gateway client: the gateway has no session.ack; not acknowledging")
            tracker.unsupported()
        except (ConnectionLost, CallTimeout, LimitReached):
            tracker.failed(session_id, time.monotonic())
        except GatewayError as exc:  # e.g. 4001: the session is gone; a retry cannot help
            logger.debug("gateway client: session.ack for %s refused: %s", session_id, exc)
            tracker.refuse(session_id)
        except Exception:  # a bug must not end acknowledging for every session
            logger.exception("gateway client: session.ack failed")
            tracker.failed(session_id, time.monotonic())
        else:
            self.stats.acks += 1
            tracker.answered(session_id, seq, time.monotonic())

    # Connection management -----------------------------------------------------------------------------
    async def _await_connected(self, deadline: float | None) -> None:
        while self.state is not ClientState.CONNECTED:
            if self.state is ClientState.CLOSED:
                failure = self._failure
                raise ConnectionLost(
                    None, failure.message if failure else "the client is closed", failure.data if failure else None
                )
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise ConnectionLost(None, f"not connected to {self._safe_url()} (state {self.state.value})")
            self._connected.clear()
            try:
                await asyncio.wait_for(self._connected.wait(), remaining)
            except TimeoutError:
                pass

    def _safe_url(self) -> str:
        return without_token(self.url)

    async def _open(self) -> None:
        """Handshake, read ``gateway.ready``, start the reader."""
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else None
        try:
            ws = await connect(
                self.url,
                additional_headers=headers,
                compression=None,
                proxy=None,
                open_timeout=self.open_timeout,
                ping_interval=self._ping_interval,
                ping_timeout=self._ping_timeout,
                max_size=self._max_size,
                close_timeout=2.0,
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            raise HandshakeRejected(
                None,
                f"the gateway at {self._safe_url()} refused the WebSocket handshake with "
                f"HTTP {status}: check the token (token= or ?token=) and, from a browser-like "
                "client, the Origin",
                {"status": status},
            ) from None
        try:
            first = await asyncio.wait_for(ws.recv(), self.open_timeout)
        except BaseException:
            ws.transport.abort()
            raise
        self._limit_receive_buffer(ws)
        self.stats.connects += 1
        self._ws = ws
        await self._handle_frame(first)  # gateway.ready: server_info is set when connect() returns
        self._reader = asyncio.get_running_loop().create_task(self._read(ws), name="gateway-client-reader")

    def _limit_receive_buffer(self, ws: ClientConnection) -> None:
        """Cap SO_RCVBUF right after the handshake, before bulk data can make the kernel grow it."""
        if self._receive_buffer is None:
            return
        sock = ws.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._receive_buffer)

    async def _read(self, ws: ClientConnection) -> None:
        error: BaseException | None = None
        try:
            async for raw in ws:
                await self._handle_frame(raw)
        except websockets.ConnectionClosed as exc:
            error = exc
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug in a frame handler must not leave calls hanging
            logger.exception("gateway client reader failed")
            error = exc
            ws.transport.abort()
        finally:
            if self._reader is asyncio.current_task():
                self._reader = None
        self._connection_lost(ws, error)

    async def _handle_frame(self, raw: str | bytes) -> None:
        self.stats.bytes_received += len(raw)
        message = _json.decode_object(raw)
        if message is None:
            logger.warning("ignoring a frame that is not a JSON object: %.80r", raw)
            return
        if "id" in message and ("result" in message or "error" in message):
            pending = self._pending.get(message["id"])
            if pending is not None and not pending.future.done():
                pending.future.set_result(message)
            return
        if message.get("method") == "event" and isinstance(message.get("params"), dict):
            await self._handle_event(message["params"])

    async def _handle_event(self, event: dict[str, Any]) -> None:
        session_id = event.get("session_id")
        kind = event.get("type")
        if session_id is None:
            if kind == EventType.GATEWAY_READY:
                self.server_info = dict(event.get("payload") or {})
            return
        stream = self._stream(session_id)
        if stream.ended:
            return
        seq = event.get("seq")
        if kind == EventType.REPLAY_TRUNCATED:
            first_seq = int((event.get("payload") or {}).get("first_seq", 0))
            if first_seq - 1 > stream.last_seq:
                await self._put_truncated(stream, first_seq)
            return
        if not isinstance(seq, int):
            await self._put(stream, event)
            if kind == EventType.SESSION_DETACHED:
                stream.owned = False
                self._end_stream(stream, None)
            return
        if seq <= stream.last_seq:
            self.stats.duplicates += 1
            return
        if seq > stream.last_seq + 1:  # never expected from a conforming gateway: still, no silent gap
            await self._put_truncated(stream, seq)
        stream.last_seq = seq
        self.stats.events += 1
        await self._put(stream, event)
        if kind == EventType.SESSION_CLOSED:
            stream.owned = False
            self._end_stream(stream, None)

    async def _put(self, stream: SessionStream, item: Any) -> None:
        """Queue an item, waiting while the stream holds ``max_queued_events`` (the socket is not read)."""
        limit = self.max_queued_events
        while limit and stream.queue.qsize() >= limit and not stream.ended:
            stream.room.clear()
            await stream.room.wait()
        stream.queue.put_nowait(item)

    async def _put_truncated(self, stream: SessionStream, first_seq: int) -> None:
        error = ReplayTruncated(stream.session_id, stream.last_seq, first_seq)
        self.stats.truncations += 1
        self.stats.missing_events += error.missing
        stream.last_seq = first_seq - 1
        await self._put(stream, error)

    def _end_stream(self, stream: SessionStream, error: BaseException | None) -> None:
        """Queue the end marker (and an error before it); never blocks, even on a full queue."""
        if stream.ended:
            return
        stream.ended = True
        self._acks.forget(stream.session_id)
        if error is not None:
            stream.queue.put_nowait(error)
        stream.queue.put_nowait(END)

    def _fail_pending(self, ws: ClientConnection | None, why: str) -> None:
        for request_id, pending in list(self._pending.items()):
            if ws is not None and pending.ws is not ws:
                continue
            if not pending.future.done():
                pending.future.set_exception(
                    ConnectionLost(
                        None,
                        f"{why} before the answer to {pending.method} (id {request_id}) arrived; "
                        "it may or may not have been processed by the gateway",
                    )
                )
                pending.future.exception()  # mark retrieved: the caller may have timed out already

    def _connection_lost(self, ws: ClientConnection, error: BaseException | None) -> None:
        if ws is not self._ws:
            return
        self._ws = None
        forced = self._aborting is ws
        self._aborting = None
        if self.state is ClientState.CLOSED:
            self._fail_pending(ws, "the client was closed")
            return
        self.stats.drops += 1
        if forced:
            self.stats.forced_drops += 1
        why = "the connection was aborted" if forced else f"the connection dropped ({error or 'closed by the gateway'})"
        logger.info("gateway client: %s", why)
        self._fail_pending(ws, why)
        if self._reconnector is not None and not self._reconnector.done():
            return  # a reconnect in progress sees its own failure and retries
        if not self.policy.enabled:
            self._give_up(ConnectionLost(None, f"{why}; reconnecting is disabled"))
            return
        self.state = ClientState.RECONNECTING
        self._connected.clear()
        self._reconnector = asyncio.get_running_loop().create_task(self._reconnect(), name="gateway-client-reconnect")

    def _give_up(self, error: ConnectionLost) -> None:
        self.state = ClientState.CLOSED
        self._failure = error
        self._connected.set()
        self._fail_pending(None, str(error))
        for stream in self._streams.values():
            if stream.owned:
                self._end_stream(stream, error)
            else:
                self._end_stream(stream, None)

    async def _reconnect(self) -> None:
        started = time.monotonic()
        deadline = started + self.policy.max_time
        last_error: BaseException | None = None
        attempt = 0
        while self.state is ClientState.RECONNECTING:
            now = time.monotonic()
            if attempt >= self.policy.max_attempts or now >= deadline:
                self._give_up(
                    ConnectionLost(
                        None,
                        f"could not reconnect to {self._safe_url()} after {attempt} "
                        f"attempts in {now - started:.1f}s: {last_error}",
                    )
                )
                return
            await asyncio.sleep(min(self.policy.delay(attempt, self._rng), max(0.0, deadline - now)))
            attempt += 1
            try:
                if self._ws is None:
                    await self._open()
                await self._resume_owned(deadline)
            except HandshakeRejected as exc:
                if 400 <= (exc.data or {}).get("status", 0) < 500:  # token or origin refused: retrying cannot help
                    self._give_up(ConnectionLost(None, f"reconnect failed: {exc}", exc.data))
                    return
                last_error = exc
            except (
                TimeoutError,
                OSError,
                websockets.WebSocketException,
                ConnectionLost,
                CallTimeout,
                LimitReached,
            ) as exc:
                last_error = exc
                logger.info("gateway client: reconnect attempt %d failed: %r", attempt, exc)
                ws = self._ws
                if ws is not None and isinstance(exc, CallTimeout):
                    # An unresponsive connection: start over on a fresh one.
                    self._ws = None
                    self._fail_pending(ws, "the connection did not answer during the reconnect")
                    ws.transport.abort()
            except Exception as exc:  # a bug must not leave the client reconnecting forever
                logger.exception("gateway client: reconnect failed")
                self._give_up(ConnectionLost(None, f"reconnect failed: {type(exc).__name__}: {exc}"))
                return
            else:
                if self.state is ClientState.RECONNECTING:
                    self.state = ClientState.CONNECTED
                    self._connected.set()
                return

    async def _resume_owned(self, deadline: float) -> None:
        ws = self._ws
        if ws is None:
            raise ConnectionLost(None, "connection lost during reconnect")
        streams = [s for s in self._streams.values() if s.owned and not s.ended]
        # After the last *processed* seq: the gateway then keeps (and may replay) what still sits in our
        # queues, and the resume acknowledges exactly what the caller has taken.  Replayed events that are
        # already queued are dropped as duplicates.
        after_seqs = [s.processed_seq for s in streams]
        timeout = max(0.1, min(self.call_timeout, deadline - time.monotonic()))
        results = await asyncio.gather(
            *(
                self._request_on(ws, Method.SESSION_RESUME, {"session_id": s.session_id, "after_seq": after}, timeout)
                for s, after in zip(streams, after_seqs, strict=True)
            ),
            return_exceptions=True,
        )
        retry: BaseException | None = None
        for stream, after, result in zip(streams, after_seqs, results, strict=True):
            if isinstance(result, (ConnectionLost, CallTimeout, LimitReached)):  # LimitReached: the rate limit
                retry = result
            elif isinstance(result, GatewayError):
                # The session is gone (closed during the drop, or the gateway restarted): say so, once.
                stream.owned = False
                self._end_stream(stream, result)
            elif isinstance(result, BaseException):
                raise result
            else:
                self.stats.resumes += 1
                self.stats.replayed += int(result.get("replayed", 0) or 0)
                self._acks.resumed(stream.session_id, after)
        if retry is not None:
            raise retry
