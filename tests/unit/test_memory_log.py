"""MemoryEventLog: bounded by events and bytes, gapless slices, truncation reported, nothing evicted that
a client may still need."""

from __future__ import annotations

import pytest

from gateway.store.memory import ReplayBuffer


def filled(n: int, max_events: int = 100, max_bytes: int = 10**9) -> ReplayBuffer:
    buf = ReplayBuffer(max_events, max_bytes)
    for seq in range(1, n + 1):
        buf.append(seq, "t", f"e{seq}")
    buf.settle(n)
    buf.ack(n)
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
        buf.append(seq, "t", "x" * 10)
        buf.settle(seq)
    assert buf.nbytes <= 100 and buf.last_seq == 50 and buf.first_seq == 41


def test_unsettled_events_are_never_evicted() -> None:
    buf = ReplayBuffer(10, 10**9)
    for seq in range(1, 51):
        buf.append(seq, "t", f"e{seq}")
    assert len(buf) == 50 and buf.first_seq == 1 and buf.unsettled_count == 50
    buf.ack(30)  # 30 reached the client: keep the newest 10 of those, and every unsettled one
    assert buf.first_seq == 21 and buf.last_seq == 50 and buf.unsettled_count == 20
    assert buf.unsettled_bytes == sum(len(f"e{s}") for s in range(31, 51))
    buf.settle(25)  # settling is monotonic
    assert buf.settled_seq == 30
    buf.ack(50)
    assert buf.first_seq == 41 and buf.unsettled_count == 0 and buf.unsettled_bytes == 0


def test_gaps_are_refused() -> None:
    buf = filled(3)
    with pytest.raises(ValueError):
        buf.append(5, "t", "e5")


def test_get_by_seq() -> None:
    buf = filled(150, max_events=100)
    assert buf.get(51) == "e51" and buf.get(150) == "e150" and buf.get(50) is None and buf.get(151) is None


def test_settled_but_unacknowledged_events_are_evicted_by_bytes_only() -> None:
    """A dropped connection's kernel buffers can hold far more than max_events small events."""
    buf = ReplayBuffer(10, 1000)
    for seq in range(1, 101):
        buf.append(seq, "t", "x" * 5)
    buf.settle(100)
    assert buf.first_seq == 1 and len(buf) == 100  # 500 bytes: under the byte bound, kept
    buf.ack(60)  # the client has 1..60: now the count bound may drop those
    assert buf.first_seq == 61 and buf.last_seq == 100
    for seq in range(101, 301):
        buf.append(seq, "t", "x" * 5)
    buf.settle(300)
    assert buf.nbytes <= 1000 and buf.last_seq == 300 and buf.first_seq == 101


def test_an_acknowledged_event_is_settled() -> None:
    buf = ReplayBuffer(2, 10**9)
    for seq in range(1, 11):
        buf.append(seq, "t", f"e{seq}")
    buf.ack(12)
    assert buf.acked_seq == 10 and buf.unsettled_count == 0 and len(buf) == 2


def test_page_is_bounded_and_at_least_one_event() -> None:
    buf = filled(100)
    piece = buf.page(0, max_events=10, max_bytes=10**9)
    assert piece.frames == [f"e{s}" for s in range(1, 11)] and piece.first_seq == 1
    assert buf.page(50, max_events=1000, max_bytes=1).frames == ["e51"]
