"""The event log seam: what a session needs from wherever its history lives.

A session appends every encoded event under its ``seq`` and delivers events to its owner only up to
:attr:`EventLog.durable_seq`.  The in-memory log (:mod:`gateway.store.memory`) is durable at once; the
SQLite log reports durability when its writer has committed.  Reading a range the memory cache no longer
holds may need the disk, so :meth:`EventLog.read` is asynchronous; everything else never blocks.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Slice:
    """Held events with seq > some ``after_seq``, oldest first (frames as UTF-8 bytes, ready to send)."""

    frames: list[bytes]
    truncated: bool  # some events after ``after_seq`` are no longer held anywhere
    first_seq: int  # seq of frames[0] (last_seq + 1 when empty)


def held_after(
    frames: Iterable[bytes],
    first_seq: int,
    last_seq: int,
    after_seq: int,
    max_events: int | None = None,
    max_bytes: int | None = None,
) -> Slice:
    """The frames of a cache holding ``first_seq``..``last_seq`` with seq > ``after_seq``, at most
    ``max_events`` / ``max_bytes`` of them (always at least one); ``truncated`` when the cache starts later."""
    after_seq = max(0, after_seq)
    start = max(0, after_seq + 1 - first_seq)
    taken: list[bytes] = []
    size = 0
    for frame in itertools.islice(frames, start, None):
        if taken and (
            (max_events is not None and len(taken) >= max_events)
            or (max_bytes is not None and size + len(frame) > max_bytes)
        ):
            break
        taken.append(frame)
        size += len(frame)
    return Slice(taken, after_seq + 1 < first_seq, first_seq + start if taken else last_seq + 1)


class EventLog(Protocol):
    """One session's events.  Single-threaded: called on the event loop only."""

    #: True when what the memory cache forgets is still on disk (then :meth:`read` fetches it).
    persistent: bool

    @property
    def last_seq(self) -> int: ...

    @property
    def durable_seq(self) -> int:
        """Events up to this seq may be shown to a client."""
        ...

    @property
    def unsettled_count(self) -> int:
        """Events appended but not yet handed to the owner's socket."""
        ...

    @property
    def unsettled_bytes(self) -> int: ...

    def append(self, seq: int, event_type: str, frame: bytes) -> None:
        """Add the next event (its frame as valid UTF-8 bytes); ``seq`` must follow :attr:`last_seq`."""
        ...

    def get(self, seq: int) -> bytes | None:
        """The frame of ``seq`` if the memory cache holds it."""
        ...

    def settle(self, through_seq: int) -> None:
        """Events up to ``through_seq`` reached the owner's socket (they may be in the kernel's buffers)."""
        ...

    def ack(self, through_seq: int) -> None:
        """The client proved it has events up to ``through_seq`` (``session.ack`` or a resume's after_seq)."""
        ...

    def page(self, after_seq: int, max_events: int, max_bytes: int) -> Slice:
        """Like :meth:`since`, bounded (always at least one event when any is held)."""
        ...

    def since(self, after_seq: int) -> Slice:
        """What the memory cache holds after ``after_seq`` (no I/O)."""
        ...

    async def read(self, after_seq: int, max_events: int, max_bytes: int) -> Slice:
        """A bounded piece of the events after ``after_seq``, from memory or from disk."""
        ...
