"""One client WebSocket on ``/ws``: its outbound FIFO, its sender task, and the flow control between them.

Everything sent to a client goes through :meth:`Connection.send`, so a response, the replay that follows
it, and live events keep the order in which they were enqueued.  Sessions only push live events while
:attr:`has_room` holds (the queue is under its byte budget); when the sender drains below half the budget
it calls the sessions' drain listeners, which push more.  A session that cannot push stops reading its
worker's pipe, so a slow client blocks the worker instead of growing the gateway's memory.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import itertools
import logging
from collections.abc import Callable

from starlette.websockets import WebSocket

logger = logging.getLogger("worker_gateway.connection")
_ids = itertools.count(1)
#: The sender yields to the loop after handing this many bytes to the socket in a row.
_YIELD_EVERY_BYTES = 64 * 1024


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
        self._queue: collections.deque[tuple[str, Callable[[], None] | None]] = collections.deque()
        self._buffered = 0
        self._wakeup = asyncio.Event()
        self._on_sent = on_sent
        self._sender: asyncio.Task[None] | None = None
        self._drain_listeners: dict[object, Callable[[], None]] = {}
        self._room = asyncio.Event()  # set while under the byte budget (or closed)
        self._room.set()
        #: Ids of the sessions this connection owns (maintained by the session registry).
        self.sessions: set[str] = set()
        # Half-open peers: a peer that stops reading while frames are pending leaves the server's transport
        # unable to flush, so even after the ping timeout fails the connection (uvicorn closes the transport,
        # which waits for the buffer to drain) the app never sees a disconnect.  With the ping on, one frame
        # that cannot be sent for ``stall_timeout`` (ping interval + timeout: the ping itself is stuck
        # behind it, so the keepalive has failed too) resolves :attr:`stalled`; the endpoint then treats
        # the peer as gone.
        self.stall_timeout = stall_timeout
        self.stalled: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sending_since: float | None = None
        self._stall_timer: asyncio.TimerHandle | None = None

    @property
    def is_open(self) -> bool:
        return self.state is ConnectionState.OPEN

    @property
    def has_room(self) -> bool:
        return self.state is ConnectionState.OPEN and self._buffered < self.max_buffered_bytes

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

    def send(self, text: str, on_sent: Callable[[], None] | None = None) -> None:
        """Enqueue one text frame.  Never waits: callers that relay bulk data check :attr:`has_room` first.
        ``on_sent`` runs once the frame has been handed to the socket (never if the connection drops first):
        sessions use it to know which events may leave the replay buffer."""
        if self.state is not ConnectionState.OPEN:
            return
        self._queue.append((text, on_sent))
        self._buffered += len(text)
        if self._buffered >= self.max_buffered_bytes:
            self._room.clear()
        self._wakeup.set()

    async def wait_for_room(self) -> None:
        """Until the queue is under its byte budget again (or the connection closed)."""
        await self._room.wait()

    def add_drain_listener(self, key: object, callback: Callable[[], None]) -> None:
        self._drain_listeners[key] = callback

    def remove_drain_listener(self, key: object) -> None:
        self._drain_listeners.pop(key, None)

    async def _send_loop(self) -> None:
        ws = self.websocket
        loop = asyncio.get_running_loop()
        low_water = self.max_buffered_bytes // 2
        since_yield = 0
        try:
            while True:
                if not self._queue:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    since_yield = 0
                    continue
                text, on_sent = self._queue.popleft()
                self._sending_since = loop.time()
                try:
                    await ws.send_text(text)
                except UnicodeEncodeError:
                    # An unpaired surrogate in a frame (a string from a peer that is not valid Unicode):
                    # cost that frame its bad characters, never the whole connection.
                    await ws.send_text(text.encode("utf-8", "replace").decode("utf-8"))
                self._sending_since = None
                was_full = self._buffered >= low_water
                self._buffered -= len(text)
                if self._buffered < self.max_buffered_bytes:
                    self._room.set()
                if self._on_sent is not None:
                    self._on_sent(len(text))
                if on_sent is not None:
                    on_sent()
                if was_full and self._buffered < low_water:
                    for callback in list(self._drain_listeners.values()):
                        callback()
                since_yield += len(text)
                if since_yield >= _YIELD_EVERY_BYTES:
                    # send_text returns without suspending while the socket takes data, so a long queue
                    # would be drained in one go; with many busy connections the loop's turn then took
                    # tens of milliseconds (pings and the lag monitor waiting behind megabytes).
                    since_yield = 0
                    await asyncio.sleep(0)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the socket went away while sending
            logger.debug("connection %s: send failed: %r", self.id, exc)
            self.mark_closed()

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
