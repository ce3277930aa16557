"""The supervisor's writer of group nices (workers/group_nicer.py) under the kernel's answers, given:
a refusal for the rate limit is retried in plan order, a group the kernel will not change is dropped."""

from __future__ import annotations

import asyncio
import os

import pytest

from workers import priority
from workers.group_nicer import GroupNicer

pytestmark = pytest.mark.skipif(not os.path.exists(priority.AUTOGROUP), reason="this kernel has no autogroups")


class Kernel:
    """Answers writes as scripted (then SET), and records the ones it took."""

    def __init__(self, *answers: priority.Outcome) -> None:
        self.answers = list(answers)
        self.taken: list[tuple[int, int]] = []
        self.changed = asyncio.Event()

    async def settled(self, count: int) -> None:
        """Until ``count`` writes were taken (the writer runs on the loop, soon after a change)."""
        for _ in range(100):
            if len(self.taken) >= count:
                return
            self.changed.clear()
            await asyncio.wait_for(self.changed.wait(), 5)
        raise AssertionError(self.taken)

    def write(self, fd: int, nice: int) -> priority.Outcome:
        outcome = self.answers.pop(0) if self.answers else priority.Outcome.SET
        if outcome is priority.Outcome.SET:
            self.taken.append((fd, nice))
            self.changed.set()
        return outcome


async def test_a_burst_of_turn_starts_is_one_pass_at_the_final_nice() -> None:
    kernel = Kernel()
    nicer = GroupNicer(1.0, 19, write=kernel.write)
    try:
        for key in range(8):
            assert nicer.add(key, os.getpid())
        await kernel.settled(8)
        kernel.taken.clear()
        for key in range(8):  # in one loop iteration, as the registry does for prompts submitted together
            nicer.set_busy(key, True)
        await kernel.settled(8)
        assert sorted(nice for _, nice in kernel.taken) == [10] * 8  # not 0, then 4, 5, 7...
    finally:
        nicer.close()


async def test_a_refusal_for_the_rate_limit_is_retried_weight_down_first() -> None:
    busy = priority.Outcome.BUSY
    kernel = Kernel()
    nicer = GroupNicer(1.0, 19, write=kernel.write, retry_s=(0.001, 0.002))
    try:
        assert nicer.add("a", os.getpid()) and nicer.add("b", os.getpid())
        fd_a, fd_b = nicer._fds["a"], nicer._fds["b"]
        await kernel.settled(2)
        assert kernel.taken == [(fd_a, 19), (fd_b, 19)]
        nicer.set_busy("a", True)
        await kernel.settled(3)
        assert kernel.taken[-1] == (fd_a, 0)
        kernel.answers = [busy, busy]
        kernel.taken.clear()
        nicer.set_busy("b", True)  # both to 4: "a" gives up weight first, after two refusals
        await kernel.settled(2)
        assert kernel.taken == [(fd_a, 4), (fd_b, 4)]
    finally:
        nicer.close()
    assert nicer._fds == {}


async def test_a_group_the_kernel_will_not_change_is_dropped() -> None:
    kernel = Kernel(priority.Outcome.REFUSED)
    nicer = GroupNicer(1.0, 19, write=kernel.write)
    try:
        assert nicer.add("gone", os.getpid())
        for _ in range(100):  # the refused write runs soon, on the loop
            if not nicer._fds:
                break
            await asyncio.sleep(0)
        assert kernel.taken == [] and nicer._fds == {}
        nicer.set_busy("gone", True)
        assert kernel.taken == [] and nicer.busy == 0
    finally:
        nicer.close()


async def test_a_ceiling_of_zero_writes_nothing() -> None:
    kernel = Kernel()
    nicer = GroupNicer(1.0, 0, write=kernel.write)
    assert not nicer.enabled and not nicer.add("a", os.getpid())
    assert kernel.taken == []
