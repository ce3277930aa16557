"""One session's event stream on the client side: its bounded queue and the iterator the caller reads."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.client.errors import GatewayError, ReplayTruncated

END = object()  # queued after a session's last event


@dataclass
class SessionStream:
    """One session's event queue, the last seq queued into it and the last seq its caller took."""

    session_id: str
    queue: asyncio.Queue[Any]  # unbounded itself; the reader enforces max_queued_events with ``room``
    last_seq: int = 0  #: last seq queued (the deduplication threshold)
    processed_seq: int = 0  #: last seq handed to the caller: what a resume asks after, what an ack confirms
    owned: bool = True
    ended: bool = False  # END was queued: nothing more will be put
    room: asyncio.Event = field(default_factory=asyncio.Event)


class SessionEvents:
    """Async iterator over one session's events; see :meth:`GatewayClient.events`."""

    def __init__(self, stream: SessionStream, on_processed: Callable[[SessionStream, int], None]) -> None:
        self._stream = stream
        self._on_processed = on_processed
        self._done = False

    def __aiter__(self) -> SessionEvents:
        return self

    async def __anext__(self) -> dict[str, Any]:
        stream = self._stream
        if self._done or (stream.ended and stream.queue.empty()):  # the end marker was taken by another iterator
            raise StopAsyncIteration
        item = await stream.queue.get()
        if item is END:
            self._done = True
            raise StopAsyncIteration
        stream.room.set()
        if isinstance(item, ReplayTruncated):
            self._on_processed(stream, item.first_seq - 1)  # nothing before first_seq can come any more
        if isinstance(item, BaseException):
            raise item  # a terminal error is followed by the end marker, which ends the next __anext__
        event: dict[str, Any] = item
        seq = event.get("seq")
        if isinstance(seq, int):
            self._on_processed(stream, seq)
        return event

    async def next(self, timeout: float | None = None) -> dict[str, Any]:
        """The next event, waiting at most ``timeout`` seconds (``asyncio.TimeoutError`` otherwise)."""
        return await asyncio.wait_for(self.__anext__(), timeout)

    async def until(self, event_type: str, timeout: float | None = None, **payload: Any) -> list[dict[str, Any]]:
        """Collect events up to and including the first of ``event_type`` whose payload matches ``payload``."""
        collected: list[dict[str, Any]] = []

        async def run() -> list[dict[str, Any]]:
            async for event in self:
                collected.append(event)
                body = event.get("payload") or {}
                if event.get("type") == event_type and all(body.get(k) == v for k, v in payload.items()):
                    return collected
            raise GatewayError(
                None, f"session {self._stream.session_id}: its event stream ended before a {event_type} event"
            )

        return await asyncio.wait_for(run(), timeout)

    @property
    def last_seq(self) -> int:
        return self._stream.last_seq

    @property
    def processed_seq(self) -> int:
        """The seq of the last event this session's iterators handed out."""
        return self._stream.processed_seq
