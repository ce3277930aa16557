"""The per-loop-iteration read budget and the queue of readers it turns away (pure)."""

from __future__ import annotations

import pytest

from workers.read_budget import DeferQueue, ReadBudget


def test_grant_gives_what_is_wanted_while_it_fits() -> None:
    budget = ReadBudget(100_000, min_read=10_000)
    assert budget.grant(60_000) == 60_000
    budget.charge(60_000)
    assert budget.remaining == 40_000 and not budget.exhausted


def test_grant_caps_at_what_is_left_and_refuses_below_the_minimum() -> None:
    budget = ReadBudget(100_000, min_read=10_000)
    budget.charge(95_000)
    assert budget.exhausted
    assert budget.grant(60_000) == 0  # 5,000 left: not worth a read
    assert budget.grant(4_000) == 4_000  # a small want that fits is still granted
    budget.reset()
    assert budget.grant(60_000) == 60_000
    budget.charge(70_000)
    assert budget.grant(60_000) == 30_000  # what is left, above the minimum


def test_charge_never_goes_negative_and_zero_wants_nothing() -> None:
    budget = ReadBudget(1000, min_read=100)
    budget.charge(5000)
    assert budget.remaining == 0 and budget.grant(0) == 0 and budget.grant(-1) == 0


def test_min_read_never_exceeds_the_budget_and_resize_keeps_it_consistent() -> None:
    budget = ReadBudget(1000, min_read=5000)
    assert budget.min_read == 1000 and budget.grant(999_999) == 1000
    budget.resize(500)
    assert budget.per_iteration == 500 and budget.remaining == 500 and budget.min_read == 500
    with pytest.raises(ValueError):
        budget.resize(0)
    with pytest.raises(ValueError):
        ReadBudget(0)


def test_defer_queue_is_fifo_without_duplicates_and_skips_discarded() -> None:
    queue: DeferQueue[str] = DeferQueue()
    for item in ("a", "b", "a", "c"):
        queue.add(item)
    assert len(queue) == 3 and "a" in queue
    queue.discard("b")
    assert "b" not in queue
    assert [queue.pop(), queue.pop(), queue.pop()] == ["a", "c", None]
    queue.add("b")  # back after being discarded: in the order of its new arrival
    assert queue.pop() == "b" and not queue
