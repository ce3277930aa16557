"""One client WebSocket on ``/ws``: its outbound FIFO, its sender task, and the flow control between them.

Everything sent to a client goes through :meth:`Connection.send`, so a response, the replay that follows
it, and live events keep the order in which they were enqueued.  Frames are queued as UTF-8 bytes (events
as the log holds them; responses encoded once here).  Sessions only push live events while
:attr:`has_room` holds (the queue plus the transport's write buffer is under its byte budget); when that
drains below half the budget the sender calls the sessions' drain listeners, which push more.  A session
that cannot push stops reading its worker's pipe, so a slow client blocks the worker instead of growing
the gateway's memory.

The sender writes every queued frame in one batch (bounded per loop turn) through the protocol's
:class:`gateway.wsframes.FrameSink` when it offers one: one ``writelines`` of ready-made frames, then one
settle call per session and batch.  Without a sink (another uvicorn protocol class) it falls back to one
``send_text`` per frame.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import itertools
import logging
from collections.abc import Callable, Sequence

from starlette.websockets import WebSocket

from gateway import rpc, wsframes

logger = logging.getLogger("worker_gateway.connection")
_ids = itertools.count(1)
#: The sender yields to the loop after handing this many bytes to the socket in a row.
_YIELD_EVERY_BYTES = 64 * 1024
#: One batch (one ``writelines``) holds at most this many payload bytes / frames, so a loop turn stays short.
_BATCH_MAX_BYTES = 256 * 1024
_BATCH_MAX_FRAMES = 1024

#: Called with the seq of the last event of a batch that reached the socket (one session's settler).
Settler = Callable[[int], None]


class ConnectionState(enum.Enum):
    OPEN = "open"
    CLOSED = "closed"


class Connection:
    def __init__(
        self,
        websocket: WebSocket,
        max_buffered_bytes: int,
        on_sent: Callable[[int], None] | None = None,
        stall_timeout: float | None = None,
    ) -> None:
        self.id = next(_ids)
        self.websocket = websocket
        self.state = ConnectionState.OPEN
        self.max_buffered_bytes = max_buffered_bytes
        self._low_water = max_buffered_bytes // 2
        #: (frame, settler, seq): the settler is told ``seq`` once the frame reached the socket.
        self._queue: collections.deque[tuple[bytes, Settler | None, int]] = collections.deque()
        self._buffered = 0
        self._wakeup = asyncio.Event()
        self._on_sent = on_sent
        self._sender: asyncio.Task[None] | None = None
        self._drain_listeners: dict[object, Callable[[], None]] = {}
        self._room = asyncio.Event()  # set while under the byte budget (or closed)
        self._room.set()
        self._drain_owed = False  # went over half the budget: tell the drain listeners once it is under
        #: The protocol's coalesced write path (None with another uvicorn protocol: one send_text per frame).
        self._sink: wsframes.FrameSink | None = websocket.scope.get("extensions", {}).get(wsframes.SCOPE_EXTENSION)
        if self._sink is not None:
            # Below the high-water mark the transport never says when it drained, so the budget can only
            # count its buffer if the mark is under the low water (then an unpaused transport has room).
            self._sink.limit_buffer(max(1, self._low_water - 1))
        #: Ids of the sessions this connection owns (maintained by the session registry).
        self.sessions: set[str] = set()
        # Half-open peers: a peer that stops reading while frames are pending leaves the server's transport
        # unable to flush, so even after the ping timeout fails the connection (uvicorn closes the transport,
        # which waits for the buffer to drain) the app never sees a disconnect.  With the ping on, frames
        # that cannot be sent for ``stall_timeout`` (ping interval + timeout: the ping itself is stuck
        # behind them, so the keepalive has failed too) resolve :attr:`stalled`; the endpoint then treats
        # the peer as gone.  "Cannot be sent": the transport has paused writing (its buffer is full) while
        # frames wait, or (fallback path) one ``send_text`` has not returned.
        self.stall_timeout = stall_timeout
        self.stalled: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sending_since: float | None = None
        self._stall_timer: asyncio.TimerHandle | None = None

    @property
    def is_open(self) -> bool:
        return self.state is ConnectionState.OPEN

    @property
    def fast_path(self) -> bool:
        """Whether frames go out coalesced through the protocol's sink (else one ``send_text`` each)."""
        return self._sink is not None

    @property
    def outbound_bytes(self) -> int:
        """Bytes queued here plus those the transport holds: what the budget bounds."""
        sink = self._sink
        return self._buffered + (sink.buffered() if sink is not None else 0)

    @property
    def has_room(self) -> bool:
        return self.state is ConnectionState.OPEN and self.outbound_bytes < self.max_buffered_bytes

    @property
    def room_bytes(self) -> int:
        """Bytes that may still be queued before the budget is reached (0 when closed)."""
        if self.state is not ConnectionState.OPEN:
            return 0
        return max(0, self.max_buffered_bytes - self.outbound_bytes)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._sender = loop.create_task(self._send_loop(), name=f"ws-sender-{self.id}")
        if self.stall_timeout is not None:
            self._stall_timer = loop.call_later(self._stall_tick, self._check_stall)

    @property
    def _stall_tick(self) -> float:
        assert self.stall_timeout is not None
        return min(1.0, max(0.05, self.stall_timeout / 8))

    def _check_stall(self) -> None:
        self._stall_timer = None
        if self.state is not ConnectionState.OPEN or self.stall_timeout is None:
            return
        loop = asyncio.get_running_loop()
        since = self._sending_since
        if since is not None and loop.time() - since >= self.stall_timeout:
            logger.info(
                "connection %s: no frame could be sent for %.1f s (peer not reading): dropping it",
                self.id,
                loop.time() - since,
            )
            if self._sender is not None:
                self._sender.cancel()  # blocked waiting for the transport to drain: nothing half-written
            self.mark_closed()
            if not self.stalled.done():
                self.stalled.set_result(None)
            return
        self._stall_timer = loop.call_later(self._stall_tick, self._check_stall)

    def send(self, frame: str | bytes, on_sent: Settler | None = None, seq: int = 0) -> None:
        """Enqueue one text frame (``str`` is encoded here, once).  Never waits: callers that relay bulk data
        check :attr:`has_room` first.  ``on_sent(seq)`` runs once the frame has been handed to the socket
        (never if the connection drops first); frames with equal settlers (one session's) are settled with
        one call per batch, for the batch's last seq: sessions use it to know which events may leave the
        replay buffer.  Seqs must ascend per settler."""
        if self.state is not ConnectionState.OPEN:
            return
        data = frame if isinstance(frame, bytes) else rpc.text_bytes(frame)
        sink = self._sink
        if on_sent is None and not self._queue and sink is not None and not sink.paused and sink.open:
            # Nothing waits ahead of it (the sender writes whatever it takes off the queue at once): a
            # response goes to the socket now, not a turn of the loop later when the sender task runs.
            sink.write_text([data])
            if self._on_sent is not None:
                self._on_sent(len(data))
        else:
            self._queue.append((data, on_sent, seq))
            self._buffered += len(data)
        self._enqueued()

    def send_events(self, items: Sequence[tuple[bytes, Settler | None, int]], nbytes: int) -> None:
        """:meth:`send` for several ready frames at once (``nbytes``: their total length), in order."""
        if self.state is not ConnectionState.OPEN:
            return
        self._queue.extend(items)
        self._buffered += nbytes
        self._enqueued()

    def _enqueued(self) -> None:
        outbound = self.outbound_bytes
        if outbound >= self._low_water:
            self._drain_owed = True
            if outbound >= self.max_buffered_bytes:
                self._room.clear()
        self._wakeup.set()

    async def wait_for_room(self) -> None:
        """Until the queue is under its byte budget again (or the connection closed)."""
        await self._room.wait()

    def add_drain_listener(self, key: object, callback: Callable[[], None]) -> None:
        self._drain_listeners[key] = callback

    def remove_drain_listener(self, key: object) -> None:
        self._drain_listeners.pop(key, None)

    def _progress(self) -> None:
        """After frames left the queue or the transport drained: reopen the budget, call drain listeners."""
        outbound = self.outbound_bytes
        if outbound < self.max_buffered_bytes:
            self._room.set()
        if self._drain_owed and outbound < self._low_water:
            self._drain_owed = False
            for callback in list(self._drain_listeners.values()):
                callback()

    @staticmethod
    def _settle(items: list[tuple[bytes, Settler | None, int]]) -> None:
        """One call per settler (session) with its last seq in the batch, however the sessions interleave."""
        last: dict[Settler, int] = {}
        pending: Settler | None = None
        pending_seq = 0
        for _, settler, seq in items:
            if settler is None:
                continue
            if settler is not pending:  # a run of one session's events costs one dict update, not one each
                if pending is not None:
                    last[pending] = pending_seq
                pending = settler
            pending_seq = seq
        if pending is not None:
            last[pending] = pending_seq
        for settler, seq in last.items():
            settler(seq)

    async def _send_loop(self) -> None:
        try:
            if self._sink is not None:
                await self._send_batches(self._sink)
            else:
                await self._send_each()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the socket went away while sending
            logger.debug("connection %s: send failed: %r", self.id, exc)
            self.mark_closed()

    async def _send_batches(self, sink: wsframes.FrameSink) -> None:
        """The coalesced path: every queued frame (up to a batch bound) in one write, settled per batch."""
        loop = asyncio.get_running_loop()
        queue = self._queue
        since_yield = 0
        while True:
            # A paused transport is waited on even with nothing queued when someone waits on its draining
            # (the budget is closed, or drain listeners are owed): a write larger than the budget leaves the
            # queue empty and the transport full, and only this wait sees the kernel take the rest.
            if sink.paused and (queue or self._drain_owed or not self._room.is_set()):
                self._sending_since = loop.time()
                await sink.wait_writable()
                self._sending_since = None
                self._progress()
                continue
            if not queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                since_yield = 0
                continue
            if not sink.open:
                self.mark_closed()
                return
            batch: list[tuple[bytes, Settler | None, int]] = []
            payloads: list[bytes] = []
            size = 0
            while queue and size < _BATCH_MAX_BYTES and len(payloads) < _BATCH_MAX_FRAMES:
                item = queue.popleft()
                batch.append(item)
                payloads.append(item[0])
                size += len(item[0])
            sink.write_text(payloads)
            self._buffered -= size
            if self._on_sent is not None:
                self._on_sent(size)
            self._settle(batch)
            self._progress()
            since_yield += size
            if since_yield >= _YIELD_EVERY_BYTES:
                # Writing never suspends while the transport takes data, so a long queue would be drained
                # in one go; with many busy connections the loop's turn then took tens of milliseconds
                # (pings and the lag monitor waiting behind megabytes).
                since_yield = 0
                await asyncio.sleep(0)

    async def _send_each(self) -> None:
        """The fallback path: one ASGI ``send_text`` per frame (a protocol class without a frame sink)."""
        ws = self.websocket
        loop = asyncio.get_running_loop()
        queue = self._queue
        since_yield = 0
        while True:
            if not queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                since_yield = 0
                continue
            data, settler, seq = queue.popleft()
            self._sending_since = loop.time()
            await ws.send_text(data.decode("utf-8"))  # valid UTF-8 by construction (rpc.text_bytes/valid_utf8)
            self._sending_since = None
            self._buffered -= len(data)
            if self._on_sent is not None:
                self._on_sent(len(data))
            if settler is not None:
                settler(seq)
            self._progress()
            since_yield += len(data)
            if since_yield >= _YIELD_EVERY_BYTES:
                since_yield = 0  # send_text returns without suspending while the socket takes data
                await asyncio.sleep(0)

    def mark_closed(self) -> None:
        if self.state is ConnectionState.CLOSED:
            return
        self.state = ConnectionState.CLOSED
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        self._queue.clear()
        self._buffered = 0
        self._room.set()
        self._drain_listeners.clear()

    async def aclose(self) -> None:
        """Stop the sender.  Called once the receive side has seen the disconnect."""
        self.mark_closed()
        sender, self._sender = self._sender, None
        if sender is not None:
            sender.cancel()
            try:
                await sender
            except (asyncio.CancelledError, Exception):
                pass

    async def flush(self, timeout: float) -> None:
        """Wait (bounded) until everything queued has been handed to the socket, e.g. before a shutdown."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.state is ConnectionState.OPEN and self._queue and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)  # shutdown only: a bounded poll is simpler than a drained event
