"""The bounded in-memory event log: the only store with ``--no-state``, and the cache in front of the disk.

The session assigns ``seq`` (1, 2, 3, ... gapless) and appends every event here before delivering it, so
a resume or ``session.events.since`` is a slice of this buffer.

What may be evicted (PROTOCOL section 5: at least the last ``max_events`` or ``max_bytes``):
- never an event that has not reached the owner's socket (*unsettled*): the session stops reading its
  worker's pipe while too many are pending, which bounds them;
- an event that reached the socket but that the client has not acknowledged (*settled*): only by the byte
  bound.  The kernel's socket buffers can hold megabytes of small events when a connection dies, far more
  than ``max_events`` of them, and all of those must still be replayable;
- an acknowledged event (``session.ack``, or a resume's ``after_seq``): by either bound.
"""

from __future__ import annotations

import collections

from gateway.store.log import Slice, held_after

__all__ = ["MemoryEventLog", "ReplayBuffer", "Slice"]


class MemoryEventLog:
    #: Whether events it forgets are still on disk (then it is only a cache, see :mod:`gateway.store.durable`).
    persistent = False

    def __init__(self, max_events: int, max_bytes: int, first_seq: int = 1) -> None:
        self.max_events = max_events
        self.max_bytes = max_bytes
        self._frames: collections.deque[bytes] = collections.deque()
        self._bytes = 0
        self._first_seq = first_seq  # seq of self._frames[0]
        self._settled_seq = first_seq - 1  # events up to here reached a socket
        self._settled_bytes = 0  # bytes of the held events with seq <= _settled_seq
        self._acked_seq = first_seq - 1  # the client has these

    @property
    def last_seq(self) -> int:
        return self._first_seq + len(self._frames) - 1

    @property
    def durable_seq(self) -> int:
        return self.last_seq

    @property
    def first_seq(self) -> int:
        return self._first_seq

    @property
    def settled_seq(self) -> int:
        return self._settled_seq

    @property
    def acked_seq(self) -> int:
        return self._acked_seq

    @property
    def nbytes(self) -> int:
        return self._bytes

    @property
    def unsettled_count(self) -> int:
        return self.last_seq - self._settled_seq

    @property
    def unsettled_bytes(self) -> int:
        return self._bytes - self._settled_bytes

    def __len__(self) -> int:
        return len(self._frames)

    def append(self, seq: int, event_type: str, frame: bytes) -> None:
        if seq != self.last_seq + 1:
            raise ValueError(f"seq {seq} does not follow {self.last_seq}")
        self._frames.append(frame)
        self._bytes += len(frame)

    def settle(self, through_seq: int) -> None:
        through_seq = min(through_seq, self.last_seq)
        if through_seq <= self._settled_seq:
            return
        for seq in range(max(self._settled_seq + 1, self._first_seq), through_seq + 1):
            self._settled_bytes += len(self._frames[seq - self._first_seq])
        self._settled_seq = through_seq
        self._evict()

    def ack(self, through_seq: int) -> None:
        """The client has events up to ``through_seq``: they arrived, so they are settled too."""
        through_seq = min(through_seq, self.last_seq)
        if through_seq > self._settled_seq:
            self.settle(through_seq)
        if through_seq > self._acked_seq:
            self._acked_seq = through_seq
            self._evict()

    def _evict(self) -> None:
        """Drop the oldest settled events while over a bound: the count bound applies to acked ones only."""
        frames = self._frames
        while self._settled_seq >= self._first_seq:
            over_bytes = self._settled_bytes > self.max_bytes
            over_count = (
                self._acked_seq >= self._first_seq and self._settled_seq - self._first_seq + 1 > self.max_events
            )
            if not (over_bytes or over_count):
                return
            size = len(frames.popleft())
            self._bytes -= size
            self._settled_bytes -= size
            self._first_seq += 1

    def get(self, seq: int) -> bytes | None:
        index = seq - self._first_seq
        if 0 <= index < len(self._frames):
            return self._frames[index]
        return None

    def since(self, after_seq: int) -> Slice:
        """Every held event with seq > ``after_seq``; ``truncated`` when some of those were evicted."""
        return held_after(self._frames, self._first_seq, self.last_seq, after_seq)

    async def read(self, after_seq: int, max_events: int, max_bytes: int) -> Slice:
        return self.page(after_seq, max_events, max_bytes)

    def page(self, after_seq: int, max_events: int, max_bytes: int) -> Slice:
        """Like :meth:`since`, but at most ``max_events`` / ``max_bytes`` (always at least one event)."""
        return held_after(self._frames, self._first_seq, self.last_seq, after_seq, max_events, max_bytes)


#: The name the first version had; tests of the buffer's bounds use it.
ReplayBuffer = MemoryEventLog
