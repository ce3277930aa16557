"""How many pipe bytes the gateway's loop may read in one iteration, across every session.

Without a cap, one turn of the event loop reads every ready pipe in full: with 64 streaming sessions that
is tens of MiB of frames relayed before the loop looks at a ping again (loop lag in the tens of ms).  The
readers of one loop share a :class:`ReadBudget`; it is reset once per loop iteration, and a reader the
budget turns away waits, in order, for the next iteration (:class:`DeferQueue`), so every session gets
its turn and no session is starved by the ones the selector happens to list first.

Pure: no I/O, no clock; the loop binding is :class:`workers.channel.LoopReads`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from typing import Generic, TypeVar

#: Default bytes all readers of one loop read per loop iteration (Config ``relay_read_budget_bytes``).
DEFAULT_READ_BUDGET_BYTES = 256 * 1024
#: A read smaller than this is not worth its syscall: below it, the reader waits for the next iteration.
MIN_READ_BYTES = 16 * 1024

T = TypeVar("T", bound=Hashable)


class ReadBudget:
    """Bytes left to read in the current loop iteration."""

    def __init__(self, per_iteration: int = DEFAULT_READ_BUDGET_BYTES, min_read: int = MIN_READ_BYTES) -> None:
        if per_iteration < 1 or min_read < 1:
            raise ValueError("the read budget and the minimum read must be positive")
        self.per_iteration = per_iteration
        self.min_read = min(min_read, per_iteration)
        self.remaining = per_iteration

    @property
    def exhausted(self) -> bool:
        return self.remaining < self.min_read

    def grant(self, want: int) -> int:
        """How many of ``want`` bytes may be read now: all of them or what is left, but 0 when what is left
        is below the minimum read (and below ``want``), so a reader never issues a uselessly small read."""
        if want <= 0:
            return 0
        if want <= self.remaining:
            return want
        return 0 if self.exhausted else self.remaining

    def charge(self, n: int) -> None:
        """Count ``n`` bytes read (may exceed the grant by nothing: reads are sized by :meth:`grant`)."""
        self.remaining = max(0, self.remaining - n)

    def reset(self) -> None:
        self.remaining = self.per_iteration

    def resize(self, per_iteration: int) -> None:
        if per_iteration < 1:
            raise ValueError("the read budget must be positive")
        self.per_iteration = per_iteration
        self.min_read = min(self.min_read, per_iteration)
        self.remaining = min(self.remaining, per_iteration)


class DeferQueue(Generic[T]):
    """Readers the budget turned away, first come first served, each at most once."""

    def __init__(self) -> None:
        self._order: deque[T] = deque()
        self._members: set[T] = set()

    def __len__(self) -> int:
        return len(self._members)

    def __contains__(self, item: T) -> bool:
        return item in self._members

    def add(self, item: T) -> None:
        if item not in self._members:
            self._members.add(item)
            self._order.append(item)

    def discard(self, item: T) -> None:
        """Forget ``item`` (closed); its slot in the order is skipped lazily."""
        self._members.discard(item)

    def pop(self) -> T | None:
        """The longest-waiting reader, or None."""
        while self._order:
            item = self._order.popleft()
            if item in self._members:
                self._members.discard(item)
                return item
        return None
