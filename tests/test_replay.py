"""ReplayBuffer: bounded by events and bytes, gapless slices, truncation reported."""

from __future__ import annotations

import pytest

from gateway.replay import ReplayBuffer


def filled(n: int, max_events: int = 100, max_bytes: int = 10**9) -> ReplayBuffer:
    buf = ReplayBuffer(max_events, max_bytes)
    for seq in range(1, n + 1):
        buf.append(seq, f"e{seq}")
    buf.settle(n)
    return buf


def test_since_returns_everything_after() -> None:
    buf = filled(10)
    held = buf.since(7)
    assert held.frames == ["e8", "e9", "e10"] and not held.truncated
    assert buf.since(10).frames == [] and buf.since(0).frames[0] == "e1"


def test_event_bound_evicts_oldest_and_reports_truncation() -> None:
    buf = filled(150, max_events=100)
    assert len(buf) == 100 and buf.first_seq == 51 and buf.last_seq == 150
    assert buf.since(50).truncated is False
    held = buf.since(10)
    assert held.truncated and held.frames[0] == "e51" and held.first_seq == 51


def test_byte_bound() -> None:
    buf = ReplayBuffer(1000, 100)
    for seq in range(1, 51):
        buf.append(seq, "x" * 10)
        buf.settle(seq)
    assert buf.nbytes <= 100 and buf.last_seq == 50 and buf.first_seq == 41


def test_unsettled_events_are_never_evicted() -> None:
    buf = ReplayBuffer(10, 10**9)
    for seq in range(1, 51):
        buf.append(seq, f"e{seq}")
    assert len(buf) == 50 and buf.first_seq == 1 and buf.unsettled_count == 50
    buf.settle(30)  # 30 reached a socket: keep the newest 10 of those, and every unsettled one
    assert buf.first_seq == 21 and buf.last_seq == 50 and buf.unsettled_count == 20
    assert buf.unsettled_bytes == sum(len(f"e{s}") for s in range(31, 51))
    buf.settle(25)  # settling is monotonic
    assert buf.settled_seq == 30
    buf.settle(50)
    assert buf.first_seq == 41 and buf.unsettled_count == 0 and buf.unsettled_bytes == 0


def test_gaps_are_refused() -> None:
    buf = filled(3)
    with pytest.raises(ValueError):
        buf.append(5, "e5")


def test_get_by_seq() -> None:
    buf = filled(150, max_events=100)
    assert buf.get(51) == "e51" and buf.get(150) == "e150" and buf.get(50) is None and buf.get(151) is None
