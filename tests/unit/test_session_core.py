"""The session core without I/O: every lifecycle rule of PROTOCOL section 5 as plain calls with a fake clock."""

from __future__ import annotations

import pytest

from gateway.sessions.reaping import ReapInputs, reap_decision
from gateway.sessions.stream import EventStream, Gap, InvalidEventType
from gateway.sessions.turns import QueueFull, SessionStatus, TurnQueue
from gateway.store.memory import MemoryEventLog
from gateway.wire import WORKER_EVENT_TYPES, CloseReason, EventType
from workers.agents.base import TurnHandle

GRACE, TTL, BLOCKED = 60.0, 6 * 3600.0, 300.0


def inputs(**kw: object) -> ReapInputs:
    base: dict[str, object] = dict(detached_at=1000.0, last_active=1000.0, busy=False, blocked_since=None,
                                   grace_s=GRACE, idle_ttl_s=TTL, blocked_s=BLOCKED)
    base.update(kw)
    return ReapInputs(**base)  # type: ignore[arg-type]


# Reaping ------------------------------------------------------------------------------------------------
def test_an_attached_session_is_never_reaped() -> None:
    decision = reap_decision(inputs(detached_at=None, busy=False), now=10**9)
    assert decision.close is None and decision.wake_at is None


def test_a_detached_idle_session_is_kept_for_the_grace_then_closed() -> None:
    during = reap_decision(inputs(), now=1000.0 + GRACE - 1)
    assert during.close is None and during.wake_at == 1000.0 + GRACE
    assert reap_decision(inputs(), now=1000.0 + GRACE).close is CloseReason.GRACE_EXPIRED


def test_a_running_session_outlives_its_grace_until_the_turn_ends() -> None:
    late = reap_decision(inputs(busy=True), now=1000.0 + GRACE + 500)
    assert late.close is None and late.wake_at == 1000.0 + TTL  # only the idle TTL is left to wait for
    assert reap_decision(inputs(busy=False), now=1000.0 + GRACE + 500).close is CloseReason.GRACE_EXPIRED


def test_the_idle_ttl_closes_any_detached_session() -> None:
    assert reap_decision(inputs(busy=True), now=1000.0 + TTL).close is CloseReason.IDLE_TIMEOUT
    assert reap_decision(inputs(grace_s=0), now=1000.0 + TTL - 1).close is None  # grace 0: until the TTL
    assert reap_decision(inputs(grace_s=0), now=1000.0 + TTL).close is CloseReason.IDLE_TIMEOUT


def test_activity_moves_the_idle_deadline() -> None:
    assert reap_decision(inputs(busy=True, last_active=5000.0), now=1000.0 + TTL).close is None


def test_a_detached_session_blocked_too_long_is_closed() -> None:
    blocked = inputs(busy=True, blocked_since=1100.0)
    assert reap_decision(blocked, now=1100.0 + BLOCKED - 1).close is None
    assert reap_decision(blocked, now=1100.0 + BLOCKED).close is CloseReason.BLOCKED
    # blocked before it was detached: the bound counts from the detach
    early = inputs(busy=True, blocked_since=10.0)
    assert reap_decision(early, now=1000.0 + BLOCKED - 1).close is None
    assert reap_decision(inputs(busy=True, blocked_since=10.0, blocked_s=None), now=1000.0 + 5000).close is None


# Turns -------------------------------------------------------------------------------------------------
def test_status_follows_the_worker_and_the_turns() -> None:
    turns = TurnQueue("s1", max_queued=2)
    assert turns.status is SessionStatus.STARTING
    first = turns.submit("a")
    assert turns.take_next(worker_ready=False) is None
    turns.worker_ready()
    assert turns.status is SessionStatus.IDLE
    assert turns.take_next(worker_ready=True) == first and turns.status is SessionStatus.RUNNING
    assert turns.current == first.turn_id and turns.busy
    assert turns.turn_finished() == first.turn_id and turns.status is SessionStatus.IDLE and not turns.busy


def test_prompts_queue_in_order_and_the_queue_is_bounded() -> None:
    turns = TurnQueue("s1", max_queued=2)
    turns.worker_ready()
    running = turns.submit("a")
    turns.take_next(True)
    queued = [turns.submit("b"), turns.submit("c")]
    with pytest.raises(QueueFull):
        turns.submit("d")
    assert turns.take_next(True) is None  # one turn at a time
    turns.turn_finished()
    assert turns.take_next(True) == queued[0] and queued[0].turn_id != running.turn_id


def test_a_lost_worker_leaves_the_session_usable() -> None:
    turns = TurnQueue("s1", max_queued=2)
    turns.worker_ready()
    turns.submit("a")
    turns.take_next(True)
    turns.turn_finished()  # the registry completes the turn (error) before reporting the loss
    turns.worker_lost()
    assert turns.status is SessionStatus.IDLE and turns.live


def test_closing_is_final() -> None:
    turns = TurnQueue("s1", max_queued=2)
    turns.worker_ready()
    turns.submit("a")
    turns.closing()
    assert not turns.live and turns.take_next(True) is None
    turns.worker_ready()
    assert turns.status is SessionStatus.CLOSING
    turns.closed()
    assert turns.status is SessionStatus.CLOSED


# The event stream --------------------------------------------------------------------------------------
#: Room enough for every frame of these tests.
ROOM = 10**9


def stream(max_events: int = 100, max_bytes: int = 10**9) -> EventStream:
    return EventStream("s1", MemoryEventLog(max_events, max_bytes), reader_max_events=max_events // 2,
                       reader_max_bytes=max_bytes // 2)


def test_seq_is_gapless_and_every_event_is_delivered_in_order() -> None:
    s = stream()
    frames = [s.produce("message.delta", b'{"text":"%d"}' % i) for i in range(5)]
    assert b'"seq":1,' in frames[0] and b'"seq":5,' in frames[4]
    delivered = list(s.deliver(ROOM))
    assert [item[0] for item in delivered if not isinstance(item, Gap)] == [1, 2, 3, 4, 5]
    assert not s.pending and list(s.deliver(ROOM)) == []


@pytest.mark.parametrize("bad", ['x","injected":1,"y', "", "a b", "x" * 129, "caf\u00e9", "t\\"])
def test_an_event_type_that_is_not_a_token_is_refused_and_takes_no_seq(bad: str) -> None:
    s = stream()
    with pytest.raises(InvalidEventType):
        s.produce(bad, b"{}")
    assert s.seq == 0 and len(s.log) == 0  # type: ignore[arg-type]
    s.produce("subagent.progress", b"{}")
    assert s.seq == 1


def test_every_type_the_turn_handle_emits_is_one_a_worker_may_send() -> None:
    """The allow-list the gateway enforces on workers' frames keeps up with the agent API."""
    sent: list[str] = []
    turn = TurnHandle("t1", lambda event_type, payload: sent.append(event_type))
    turn.delta("d")
    turn.reasoning("r")
    turn.tool_call("c1", "grep", "{}")
    turn.tool_output("out", call_id="c1")
    sub = turn.subagent_start()
    turn.subagent_progress(sub, progress=0.5)
    turn.subagent_complete(sub, status="ok")
    assert len(set(sent)) == 7 and set(sent) < WORKER_EVENT_TYPES
    assert {EventType.TURN_START, EventType.TURN_COMPLETE} < WORKER_EVENT_TYPES  # sent by the worker itself
    gateway_own = {EventType.GATEWAY_READY, EventType.WORKER_EXITED, EventType.SESSION_DETACHED,
                   EventType.SESSION_CLOSED, EventType.REPLAY_TRUNCATED, EventType.SLASH_RESULT}
    assert not gateway_own & WORKER_EVENT_TYPES
    assert gateway_own | WORKER_EVENT_TYPES == set(EventType)


def test_delivery_stops_when_the_owner_has_no_room() -> None:
    s = stream()
    for _ in range(5):
        s.produce("message.delta", b"{}")
    size = len(s.log.get(1))  # type: ignore[arg-type]
    # Room is checked before each frame: the second one still goes while 1 byte is left, the third does not.
    assert [seq for seq, _ in s.deliver(size + 1)] == [1, 2]  # type: ignore[misc]
    assert s.pending and s.delivered == 2
    assert list(s.deliver(0)) == [] and s.delivered == 2


def test_the_reader_pauses_while_too_much_is_unsettled() -> None:
    s = stream(max_events=8)
    for _ in range(4):
        s.produce("message.delta", b"{}")
    assert not s.reader_has_room
    list(s.deliver(ROOM))
    s.settle(4)
    assert s.reader_has_room


def test_a_resume_rewinds_to_after_seq_and_acknowledges_it() -> None:
    s = stream()
    for _ in range(10):
        s.produce("message.delta", b"{}")
    list(s.deliver(ROOM))
    s.rewind(6)  # the new owner has 1..6
    assert [seq for seq, _ in s.deliver(ROOM)] == [7, 8, 9, 10]  # type: ignore[misc]
    assert s.log.acked_seq == 6  # type: ignore[attr-defined]


def test_an_evicted_range_is_reported_as_a_gap() -> None:
    s = stream(max_events=4)
    for _ in range(10):
        s.produce("message.delta", b"{}")
    list(s.deliver(ROOM))
    s.ack(10)
    s.rewind(0)
    items = list(s.deliver(ROOM))
    assert items[0] == Gap(7) and [i[0] for i in items[1:]] == [7, 8, 9, 10]  # type: ignore[index]


def test_an_ack_never_exceeds_what_was_delivered() -> None:
    s = stream()
    for _ in range(10):
        s.produce("message.delta", b"{}")
    size = len(s.log.get(1))  # type: ignore[arg-type]
    list(s.deliver(2 * size + 1))
    assert s.ack(10) == 3


def test_a_restored_session_numbers_its_turns_past_its_history() -> None:
    turns = TurnQueue("s1", max_queued=2, first_turn=41)
    assert turns.submit("a").turn_id == "s1.t41"
