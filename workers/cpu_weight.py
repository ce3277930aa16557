"""Which nice each session's scheduling group should have, so that the sessions running a turn weigh
together about what the relay weighs, however many they are.  No I/O.

The scheduler divides a busy CPU between groups by weight (each nice level's weight is the kernel's
``sched_prio_to_weight``), and every local session is its own group (``workers/priority.py``).  One fixed
nice cannot suit every load: at nice 19, 64 busy sessions weigh about one nice-0 group, the relay's, and
its loop keeps its latency, but a session streaming alone gets 1/70 of a CPU the gateway and its client
also want, and it streams at two thirds of the speed it has at nice 5 (measured, docs/operations.md).  So
the nice follows the count: :func:`busy_nice` is the lowest nice at which ``busy`` groups weigh at most
``share`` nice-0 groups together (1 busy: 0, 8: 10, 64: 19 with ``share`` 1), and :class:`GroupNices`
plans the writes that bring every tracked group there: idle ones to the ceiling, changes that take weight
away first.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

#: The kernel's CPU weight of nice 0..19 (``sched_prio_to_weight`` in kernel/sched/core.c).
WEIGHTS = (1024, 820, 655, 526, 423, 335, 272, 215, 172, 137, 110, 87, 70, 56, 45, 36, 29, 23, 18, 15)
MAX_NICE = len(WEIGHTS) - 1

K = TypeVar("K", bound=Hashable)


def busy_nice(busy: int, share: float, ceiling: int) -> int:
    """The lowest nice, at most ``ceiling``, at which ``busy`` groups weigh together no more than ``share``
    nice-0 groups (``share`` 0: always ``ceiling``, a fixed nice)."""
    if not 0 <= ceiling <= MAX_NICE:
        raise ValueError(f"ceiling must be a nice from 0 to {MAX_NICE}, not {ceiling}")
    if busy <= 0 or share <= 0:
        return ceiling
    budget = share * WEIGHTS[0]
    for nice in range(ceiling):
        if busy * WEIGHTS[nice] <= budget:
            return nice
    return ceiling


class GroupNices(Generic[K]):
    """The nice each tracked group has and the one it should have.  The caller writes what :meth:`plan`
    lists and reports each write with :meth:`applied`; a group is tracked from :meth:`add` (its nice
    then is 0, a fresh session's) to :meth:`remove`."""

    def __init__(self, share: float, ceiling: int) -> None:
        busy_nice(0, share, ceiling)  # validates
        if share < 0:
            raise ValueError(f"share must be 0 or more, not {share}")
        self._share = share
        self._ceiling = ceiling
        self._applied: dict[K, int] = {}
        self._busy: set[K] = set()

    @property
    def busy(self) -> int:
        return len(self._busy)

    def add(self, key: K, nice: int = 0) -> None:
        self._applied[key] = nice

    def remove(self, key: K) -> None:
        self._applied.pop(key, None)
        self._busy.discard(key)

    def set_busy(self, key: K, busy: bool) -> None:
        if key not in self._applied:
            return
        if busy:
            self._busy.add(key)
        else:
            self._busy.discard(key)

    def applied(self, key: K, nice: int) -> None:
        if key in self._applied:
            self._applied[key] = nice

    def target(self, key: K) -> int:
        """Busy: the count's nice; idle: the ceiling (whatever it left running weighs little)."""
        if key in self._busy:
            return busy_nice(len(self._busy), self._share, self._ceiling)
        return self._ceiling

    def plan(self) -> list[tuple[K, int]]:
        """The writes still to do: those that take weight away first (they protect the relay), the largest
        step first, then those that give weight back."""
        writes = [(key, self.target(key)) for key in self._applied]
        writes = [(key, nice) for key, nice in writes if nice != self._applied[key]]
        writes.sort(key=lambda write: (write[1] < self._applied[write[0]], self._applied[write[0]] - write[1]))
        return writes
