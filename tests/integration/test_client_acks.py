"""``session.ack`` on the client side: the pure tracker, and the client against peers with and without it.

The tracker (``gateway/client/acks.py``) is plain calls with a given clock.  The client is run against a
small real WebSocket peer that speaks just enough of the protocol (``gateway.ready``, ``session.create``,
events, ``session.resume``, and ``session.ack`` either answered or refused with -32601 as an older gateway
does), so the test controls exactly what the gateway side knows and records every request the client
sent.  The real gateway is covered by ``tests/test_resume_small_events.py``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import pytest
from websockets.asyncio.server import ServerConnection, serve

from support import TOKEN, GatewayProcess, async_wait_for
from gateway.client import AckPolicy, AckSupport, GatewayClient
from gateway.client.acks import AckTracker
from gateway.wire import ErrorCode, EventType, Method

# The tracker ----------------------------------------------------------------------------------------------
POLICY = AckPolicy(every_events=256, every_s=0.25, min_interval_s=0.05)


def test_an_ack_is_due_after_every_events_processed() -> None:
    tracker = AckTracker(POLICY)
    assert not any(tracker.processed("s", seq, 0.0) for seq in range(1, 256))
    assert tracker.processed("s", 256, 0.0)
    assert tracker.due(0.0) == [("s", 256)]


def test_a_few_events_are_acked_after_every_s() -> None:
    tracker = AckTracker(POLICY)
    tracker.processed("s", 10, 1.0)
    assert tracker.due(1.2) == []
    assert tracker.next_wakeup(1.2) == pytest.approx(0.05)
    assert tracker.due(1.25) == [("s", 10)]


def test_one_ack_in_flight_per_session_and_the_next_counts_from_the_answer() -> None:
    tracker = AckTracker(POLICY)
    tracker.processed("s", 300, 0.0)
    assert tracker.due(0.0) == [("s", 300)]
    tracker.processed("s", 700, 0.1)
    assert tracker.due(0.2) == []  # the first is still unanswered
    tracker.answered("s", 300, 0.3)
    assert tracker.support is AckSupport.SUPPORTED
    assert tracker.due(0.3) == [("s", 700)]


def test_rounds_are_spaced_by_min_interval() -> None:
    tracker = AckTracker(POLICY)
    tracker.processed("a", 256, 0.0)
    assert tracker.due(0.0) == [("a", 256)]
    tracker.processed("b", 256, 0.01)
    assert tracker.due(0.02) == []
    assert tracker.next_wakeup(0.02) == pytest.approx(0.03)
    assert tracker.due(0.05) == [("b", 256)]


def test_a_failed_ack_is_retried_later() -> None:
    tracker = AckTracker(POLICY)
    tracker.processed("s", 256, 0.0)
    assert tracker.due(0.0) == [("s", 256)]
    tracker.failed("s", 1.0)
    assert tracker.due(1.1) == [("s", 256)]  # still over every_events: due again once rounds allow


def test_method_not_found_stops_acking_for_good() -> None:
    tracker = AckTracker(POLICY)
    tracker.processed("s", 256, 0.0)
    assert tracker.due(0.0) == [("s", 256)]
    tracker.unsupported()
    assert not tracker.active and tracker.support is AckSupport.UNSUPPORTED
    assert tracker.processed("s", 10_000, 5.0) is False
    assert tracker.due(10.0) == [] and tracker.next_wakeup(10.0) is None


def test_a_resume_counts_as_an_ack() -> None:
    tracker = AckTracker(POLICY)
    tracker.processed("s", 100, 0.0)
    tracker.resumed("s", 100)
    assert tracker.due(5.0) == [] and tracker.next_wakeup(5.0) is None


def test_a_refused_session_is_never_acked_again_and_others_go_on() -> None:
    tracker = AckTracker(POLICY)
    tracker.processed("gone", 256, 0.0)
    tracker.processed("live", 256, 0.0)
    assert sorted(tracker.due(0.0)) == [("gone", 256), ("live", 256)]
    tracker.refuse("gone")
    tracker.answered("live", 256, 0.1)
    tracker.processed("gone", 600, 0.2)
    tracker.processed("live", 600, 0.2)
    assert tracker.due(0.2) == [("live", 600)]


def test_a_disabled_policy_never_acks() -> None:
    tracker = AckTracker(AckPolicy(enabled=False))
    assert tracker.processed("s", 1000, 0.0) is False and tracker.due(1.0) == []


# The client against a minimal peer ---------------------------------------------------------------------
@dataclass
class Peer:
    """A WebSocket peer that plays a gateway with one session of ``events`` events."""

    knows_ack: bool
    events: int = 1000
    port: int = 0
    requests: list[dict[str, Any]] = field(default_factory=list)

    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def calls(self, method: str) -> list[dict[str, Any]]:
        return [r.get("params", {}) for r in self.requests if r.get("method") == method]

    async def handle(self, ws: ServerConnection) -> None:
        await ws.send(event(EventType.GATEWAY_READY, None, None, {"protocol": 1}))
        async for raw in ws:
            request = json.loads(raw)
            self.requests.append(request)
            method, params, rid = request["method"], request.get("params", {}), request["id"]
            if method == Method.SESSION_CREATE:
                await ws.send(json.dumps({"jsonrpc": "2.0", "id": rid, "result": {"session_id": "s1"}}))
                await self.send_events(ws, 0)
            elif method == Method.SESSION_RESUME:
                after = params.get("after_seq", 0)
                await ws.send(json.dumps({"jsonrpc": "2.0", "id": rid, "result": {
                    "session_id": "s1", "status": "idle", "last_seq": self.events,
                    "replayed": self.events - after, "truncated": False}}))
                await self.send_events(ws, after)
            elif method == Method.SESSION_ACK and self.knows_ack:
                await ws.send(json.dumps({"jsonrpc": "2.0", "id": rid, "result": {"acked_seq": params["seq"]}}))
            else:
                await ws.send(json.dumps({"jsonrpc": "2.0", "id": rid, "error": {
                    "code": ErrorCode.METHOD_NOT_FOUND, "message": f"method not found: {method!r}"}}))

    async def send_events(self, ws: ServerConnection, after: int) -> None:
        for seq in range(after + 1, self.events + 1):
            await ws.send(event(EventType.MESSAGE_DELTA, "s1", seq, {"turn_id": "t1", "text": f"w{seq} "}))


def event(kind: str, session_id: str | None, seq: int | None, payload: dict[str, Any]) -> str:
    return json.dumps({"jsonrpc": "2.0", "method": "event",
                       "params": {"type": kind, "session_id": session_id, "seq": seq, "payload": payload}})


async def running(peer: Peer) -> AsyncIterator[Peer]:
    async with serve(peer.handle, "127.0.0.1", 0) as server:
        peer.port = server.sockets[0].getsockname()[1]
        yield peer


@pytest.fixture
async def old_peer() -> AsyncIterator[Peer]:
    async for peer in running(Peer(knows_ack=False)):
        yield peer


@pytest.fixture
async def new_peer() -> AsyncIterator[Peer]:
    async for peer in running(Peer(knows_ack=True)):
        yield peer


async def take(client: GatewayClient, count: int) -> list[int]:
    events = client.events("s1")
    return [(await events.next(timeout=10))["seq"] for _ in range(count)]


async def test_an_older_gateway_gets_one_ack_and_then_none(old_peer: Peer) -> None:
    async with GatewayClient(old_peer.url()) as client:
        await client.create_session()
        assert await take(client, 1000) == list(range(1, 1001))  # the stream is untouched by the refusal
        await async_wait_for(lambda: client.ack_support is AckSupport.UNSUPPORTED, 5, what="ack turned off")
        acks = old_peer.calls(Method.SESSION_ACK)
        assert len(acks) == 1 and 0 < acks[0]["seq"] <= 1000, acks  # one try, then silence
        assert client.stats.acks == 0


async def test_a_newer_gateway_is_acked_up_to_the_last_processed_event(new_peer: Peer) -> None:
    async with GatewayClient(new_peer.url()) as client:
        await client.create_session()
        assert await take(client, 1000) == list(range(1, 1001))
        await async_wait_for(lambda: any(p["seq"] == 1000 for p in new_peer.calls(Method.SESSION_ACK)), 5,
                             what="the tail acked by time")
        acked = [p["seq"] for p in new_peer.calls(Method.SESSION_ACK)]
        assert acked == sorted(set(acked)) and acked[-1] == 1000 and len(acked) <= 1000 // 256 + 2
        # The peer records a request before the client has read its answer: wait for the answers.
        await async_wait_for(lambda: client.stats.acks == len(acked), 5, what="every ack answered")
        assert client.ack_support is AckSupport.SUPPORTED


async def test_acks_never_exceed_what_the_caller_took(new_peer: Peer) -> None:
    async with GatewayClient(new_peer.url()) as client:
        await client.create_session()
        await take(client, 300)  # the other 700 are queued in the client, not processed
        await async_wait_for(lambda: any(p["seq"] == 300 for p in new_peer.calls(Method.SESSION_ACK)), 5,
                             what="ack of the 300 taken")
        assert client.last_seq("s1") > 300 and client.processed_seq("s1") == 300
        assert max(p["seq"] for p in new_peer.calls(Method.SESSION_ACK)) == 300


async def test_a_reconnect_resumes_after_the_last_processed_seq(new_peer: Peer) -> None:
    async with GatewayClient(new_peer.url(), acks=AckPolicy(enabled=False)) as client:
        await client.create_session()
        assert await take(client, 40) == list(range(1, 41))
        await async_wait_for(lambda: client.last_seq("s1") > 40, 5, what="more events queued than taken")
        client.abort()
        await async_wait_for(lambda: new_peer.calls(Method.SESSION_RESUME), 10, what="the resume")
        assert new_peer.calls(Method.SESSION_RESUME) == [{"session_id": "s1", "after_seq": 40}]
        # The replay overlaps what is queued: the iterator still sees each seq once, in order.
        assert await take(client, 960) == list(range(41, 1001))
        assert client.stats.duplicates > 0
        assert not new_peer.calls(Method.SESSION_ACK)


async def test_against_the_real_gateway_acking_settles_and_the_stream_is_intact(gateway: GatewayProcess) -> None:
    async with GatewayClient(gateway.url(token=False), token=TOKEN) as client:
        sid = (await client.create_session(agent="echo"))["session_id"]
        words = " ".join(f"w{i}" for i in range(600))
        await client.submit(sid, words)
        received = await client.events(sid).until(EventType.TURN_COMPLETE, timeout=30)
        assert [e["seq"] for e in received] == list(range(1, 603))
        # Today's gateway refuses the method (-32601), a newer one answers it: either way it settles.
        await async_wait_for(lambda: client.ack_support is not AckSupport.UNKNOWN, 5, what="an answer to the ack")
        await client.close(sid)
