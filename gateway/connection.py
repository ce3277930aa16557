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
from typing import Callable

from starlette.websockets import WebSocket

logger = logging.getLogger("worker_gateway.connection")
_ids = itertools.count(1)


class ConnectionState(enum.Enum):
    OPEN = "open"
    CLOSED = "closed"


class Connection:
    def __init__(self, websocket: WebSocket, max_buffered_bytes: int,
                 on_sent: Callable[[int], None] | None = None) -> None:
        self.id = next(_ids)
        self.websocket = websocket
        self.state = ConnectionState.OPEN
        self.max_buffered_bytes = max_buffered_bytes
        self._queue: collections.deque[str] = collections.deque()
        self._buffered = 0
        self._wakeup = asyncio.Event()
        self._on_sent = on_sent
        self._sender: asyncio.Task[None] | None = None
        self._drain_listeners: dict[object, Callable[[], None]] = {}
        #: Ids of the sessions this connection owns (maintained by the session registry).
        self.sessions: set[str] = set()

    @property
    def is_open(self) -> bool:
        return self.state is ConnectionState.OPEN

    @property
    def has_room(self) -> bool:
        return self.state is ConnectionState.OPEN and self._buffered < self.max_buffered_bytes

    @property
    def buffered_bytes(self) -> int:
        return self._buffered

    def start(self) -> None:
        self._sender = asyncio.get_running_loop().create_task(self._send_loop(), name=f"ws-sender-{self.id}")

    def send(self, text: str) -> None:
        """Enqueue one text frame.  Never waits: callers that relay bulk data check :attr:`has_room` first."""
        if self.state is not ConnectionState.OPEN:
            return
        self._queue.append(text)
        self._buffered += len(text)
        self._wakeup.set()

    def add_drain_listener(self, key: object, callback: Callable[[], None]) -> None:
        self._drain_listeners[key] = callback

    def remove_drain_listener(self, key: object) -> None:
        self._drain_listeners.pop(key, None)

    async def _send_loop(self) -> None:
        ws = self.websocket
        low_water = self.max_buffered_bytes // 2
        try:
            while True:
                if not self._queue:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                text = self._queue.popleft()
                await ws.send_text(text)
                was_full = self._buffered >= low_water
                self._buffered -= len(text)
                if self._on_sent is not None:
                    self._on_sent(len(text))
                if was_full and self._buffered < low_water:
                    for callback in list(self._drain_listeners.values()):
                        callback()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the socket went away while sending
            logger.debug("connection %s: send failed: %r", self.id, exc)
            self.mark_closed()

    def mark_closed(self) -> None:
        if self.state is ConnectionState.CLOSED:
            return
        self.state = ConnectionState.CLOSED
        self._queue.clear()
        self._buffered = 0
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
        while self.state is ConnectionState.OPEN and self._queue and loop.time() < deadline:
            await asyncio.sleep(0.01)
