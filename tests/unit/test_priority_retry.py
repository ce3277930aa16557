"""The retry of a session's autogroup nice (workers/priority.py): pure logic, the kernel's answers given."""

from __future__ import annotations

from workers.priority import Outcome, nice_autogroup


class Answers:
    """What the kernel answers, attempt after attempt (the last answer repeats)."""

    def __init__(self, *outcomes: Outcome) -> None:
        self.outcomes = list(outcomes)
        self.asked: list[int] = []

    def __call__(self, nice: int) -> Outcome:
        self.asked.append(nice)
        return self.outcomes[min(len(self.asked), len(self.outcomes)) - 1]


def test_a_change_taken_at_once_needs_no_thread() -> None:
    kernel = Answers(Outcome.SET)
    assert nice_autogroup(7, attempt=kernel) is None
    assert kernel.asked == [7]


def test_no_nice_asks_nothing() -> None:
    kernel = Answers(Outcome.SET)
    assert nice_autogroup(0, attempt=kernel) is None
    assert kernel.asked == []


def test_a_kernel_without_autogroups_or_a_refusal_is_not_retried() -> None:
    for outcome in (Outcome.UNSUPPORTED, Outcome.REFUSED):
        kernel = Answers(outcome)
        assert nice_autogroup(19, attempt=kernel) is None
        assert kernel.asked == [19]


def test_a_busy_kernel_is_asked_again_until_it_takes_the_change() -> None:
    kernel = Answers(Outcome.BUSY, Outcome.BUSY, Outcome.BUSY, Outcome.SET)
    thread = nice_autogroup(19, attempt=kernel, retry_s=(0.001, 0.002), attempts=50)
    assert thread is not None and thread.daemon
    thread.join(10)
    assert not thread.is_alive()
    assert kernel.asked == [19] * 4  # and not once more after it was taken


def test_the_retries_are_bounded() -> None:
    kernel = Answers(Outcome.BUSY)
    thread = nice_autogroup(19, attempt=kernel, retry_s=(0.0, 0.001), attempts=6)
    assert thread is not None
    thread.join(10)
    assert not thread.is_alive()
    assert len(kernel.asked) == 6  # the first attempt and five retries
