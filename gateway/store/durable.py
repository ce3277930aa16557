"""One session's event log on the session store: a memory cache in front of the writer process.

Every event is appended to the cache and queued to the store at once; it becomes *durable* (deliverable,
PROTOCOL section 8) when the writer reports its commit.  The cache may then forget it whatever the client
did with it, since the disk has it: :meth:`DurableEventLog.read` fetches older ranges from the writer in
bounded pieces, off the loop.  Only events that are not durable yet are never evicted.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING

from gateway import rpc
from gateway.store.log import Slice, held_after

if TYPE_CHECKING:
    from gateway.store.client import EventStore


class DurableEventLog:
    persistent = True

    def __init__(
        self, session_id: str, store: EventStore, *, max_events: int, max_bytes: int, last_seq: int = 0
    ) -> None:
        self.session_id = session_id
        self._store = store
        self.max_events = max_events
        self.max_bytes = max_bytes
        self._frames: collections.deque[bytes] = collections.deque()
        self._bytes = 0
        self._first_seq = last_seq + 1  # seq of _frames[0]
        self._durable = last_seq
        self._settled = last_seq
        self._settled_bytes = 0  # bytes of cached events with seq <= _settled
        #: While an owner is attached, events its socket has not taken stay cached (its backpressure
        #: counts them); a detached session's turn runs on into the log and the cache keeps only the newest.
        self.keep_unsettled = True

    @property
    def first_seq(self) -> int:
        """Oldest seq the cache holds (older ones are on disk)."""
        return self._first_seq

    @property
    def last_seq(self) -> int:
        return self._first_seq + len(self._frames) - 1

    @property
    def durable_seq(self) -> int:
        return self._durable

    @property
    def unsettled_count(self) -> int:
        return self.last_seq - max(self._settled, self._first_seq - 1)

    @property
    def unsettled_bytes(self) -> int:
        return self._bytes - self._settled_bytes

    @property
    def undurable_count(self) -> int:
        return self.last_seq - self._durable

    def append(self, seq: int, event_type: str, frame: bytes) -> None:
        if seq != self.last_seq + 1:
            raise ValueError(f"seq {seq} does not follow {self.last_seq}")
        self._store.append(self.session_id, seq, event_type, frame)  # the same bytes: no copy
        self._frames.append(frame)
        self._bytes += len(frame)
        self._evict()

    def mark_durable(self, seq: int) -> None:
        """The writer committed every event up to ``seq``."""
        if seq > self._durable:
            self._durable = min(seq, self.last_seq)
            self._evict()

    def settle(self, through_seq: int) -> None:
        through_seq = min(through_seq, self.last_seq)
        if through_seq <= self._settled:
            return
        for seq in range(max(self._settled + 1, self._first_seq), through_seq + 1):
            self._settled_bytes += len(self._frames[seq - self._first_seq])
        self._settled = through_seq
        self._evict()

    def ack(self, through_seq: int) -> None:
        self.settle(through_seq)

    def _evict(self) -> None:
        """Forget the oldest durable events while the cache is over a bound."""
        frames = self._frames
        while (
            frames
            and self._first_seq <= self._durable
            and (not self.keep_unsettled or self._first_seq <= self._settled)
            and (len(frames) > self.max_events or self._bytes > self.max_bytes)
        ):
            size = len(frames.popleft())
            self._bytes -= size
            if self._first_seq <= self._settled:
                self._settled_bytes -= size
            self._first_seq += 1

    def get(self, seq: int) -> bytes | None:
        index = seq - self._first_seq
        if 0 <= index < len(self._frames):
            return self._frames[index]
        return None

    def since(self, after_seq: int) -> Slice:
        """What the cache holds after ``after_seq``; ``truncated`` here means "the rest is on disk"."""
        return held_after(self._frames, self._first_seq, self.last_seq, after_seq)

    def page(self, after_seq: int, max_events: int, max_bytes: int) -> Slice:
        piece = held_after(self._frames, self._first_seq, self.last_seq, after_seq, max_events, max_bytes)
        return Slice(piece.frames, False, piece.first_seq)  # what the cache does not hold is on disk

    async def read(self, after_seq: int, max_events: int, max_bytes: int) -> Slice:
        """Up to ``max_events`` / ``max_bytes`` of the events after ``after_seq``, from the cache when it
        holds them, else from disk; ``truncated`` when retention already deleted some of them."""
        after_seq = max(0, after_seq)
        if after_seq + 1 >= self._first_seq:
            return self.page(after_seq, max_events, max_bytes)
        rows = await self._store.read_events(self.session_id, after_seq, max_events=max_events, max_bytes=max_bytes)
        if not rows:  # nothing on disk after it: the cache's oldest event is next
            return self.page(self._first_seq - 1, max_events, max_bytes)
        # The cache may have moved on while we waited: rows beyond what it holds still came from disk.
        # Rows are the bytes appended (valid UTF-8); older databases may hold a gateway-made frame with an
        # unpaired surrogate (written with "surrogatepass"): checked, since a text frame must be valid UTF-8.
        frames = [rpc.valid_utf8(frame) for _, frame in rows]
        return Slice(frames, rows[0][0] > after_seq + 1, rows[0][0])
