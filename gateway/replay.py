"""Bounded per-session replay buffer of encoded events, indexed by ``seq``.

The session assigns ``seq`` (1, 2, 3, ... gapless) and appends every event here before delivering it, so
a resume or ``session.events.since`` is a slice of this buffer.  Old events are evicted when either bound
is exceeded; the session never lets an event that was not yet delivered be evicted (it pauses the worker's
pipe first), so eviction only costs clients that ask for history they already had.
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

    @property
    def last_seq(self) -> int:
        return self._first_seq + len(self._frames) - 1

    @property
    def first_seq(self) -> int:
        return self._first_seq

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._frames)

    def append(self, seq: int, frame: str) -> None:
        if seq != self.last_seq + 1:
            raise ValueError(f"seq {seq} does not follow {self.last_seq}")
        self._frames.append(frame)
        self._bytes += len(frame)
        while len(self._frames) > 1 and (len(self._frames) > self.max_events or self._bytes > self.max_bytes):
            self._bytes -= len(self._frames.popleft())
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
