"""Bounded per-session replay buffer of encoded events, indexed by ``seq``.

The session assigns ``seq`` (1, 2, 3, ... gapless) and appends every event here before delivering it, so
a resume or ``session.events.since`` is a slice of this buffer.

Only *settled* events can be evicted: those already handed to a client's socket.  An event queued for a
client that then drops is not settled, so the resume that follows finds it here.  The buffer keeps the
newest ``max_events`` / ``max_bytes`` of settled events, which covers what can still be in flight in the
kernel's and the client's socket buffers when a connection dies.  Unsettled events are bounded by the
session, which stops reading its worker's pipe while too many are pending.
"""

from __future__ import annotations

import collections
import itertools
from dataclasses import dataclass


@dataclass(frozen=True)
class Slice:
    frames: list[str]
    truncated: bool
    first_seq: int  # oldest seq still held (last_seq + 1 when empty)


class ReplayBuffer:
    def __init__(self, max_events: int, max_bytes: int) -> None:
        self.max_events = max_events
        self.max_bytes = max_bytes
        self._frames: collections.deque[str] = collections.deque()
        self._bytes = 0
        self._first_seq = 1  # seq of self._frames[0]
        self._settled_seq = 0  # events up to here reached a socket
        self._settled_bytes = 0  # bytes of the held events with seq <= _settled_seq

    @property
    def last_seq(self) -> int:
        return self._first_seq + len(self._frames) - 1

    @property
    def first_seq(self) -> int:
        return self._first_seq

    @property
    def settled_seq(self) -> int:
        return self._settled_seq

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

    def append(self, seq: int, frame: str) -> None:
        if seq != self.last_seq + 1:
            raise ValueError(f"seq {seq} does not follow {self.last_seq}")
        self._frames.append(frame)
        self._bytes += len(frame)

    def settle(self, through_seq: int) -> None:
        """Events up to ``through_seq`` reached a socket: keep only the newest bounded share of those."""
        through_seq = min(through_seq, self.last_seq)
        if through_seq <= self._settled_seq:
            return
        for seq in range(max(self._settled_seq + 1, self._first_seq), through_seq + 1):
            self._settled_bytes += len(self._frames[seq - self._first_seq])
        self._settled_seq = through_seq
        frames = self._frames
        while (self._settled_seq >= self._first_seq
               and (self._settled_seq - self._first_seq + 1 > self.max_events
                    or self._settled_bytes > self.max_bytes)):
            size = len(frames.popleft())
            self._bytes -= size
            self._settled_bytes -= size
            self._first_seq += 1

    def get(self, seq: int) -> str | None:
        index = seq - self._first_seq
        if 0 <= index < len(self._frames):
            return self._frames[index]
        return None

    def since(self, after_seq: int) -> Slice:
        """Every held event with seq > ``after_seq``; ``truncated`` when some of those were evicted."""
        after_seq = max(0, after_seq)
        truncated = after_seq + 1 < self._first_seq
        start = max(0, after_seq + 1 - self._first_seq)
        frames = list(itertools.islice(self._frames, start, None))
        return Slice(frames, truncated, self._first_seq)
