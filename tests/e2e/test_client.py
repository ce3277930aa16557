"""The Python client (gateway/client.py) against a real gateway: typed errors, reconnect + resume, truncation."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from support import TOKEN, GatewayProcess, async_wait_for
from gateway.client import (
    CallTimeout,
    ClientState,
    ConnectionLost,
    GatewayClient,
    GatewayError,
    HandshakeRejected,
    InvalidParams,
    ReconnectPolicy,
    ReplayTruncated,
    SessionNotFound,
    UnknownAgent,
    error_from_response,
    normalize_url,
)


def ws_url(gateway: GatewayProcess) -> str:
    return gateway.url(token=False)


async def drain_until(events, event_type: str, timeout: float = 30.0) -> list[dict]:
    """Events up to and including the first of ``event_type``."""
    return await events.until(event_type, timeout=timeout)


async def test_stream_is_gapless_across_five_forced_disconnects_in_one_turn(gateway: GatewayProcess) -> None:
    # A small client queue makes the client read only as fast as it consumes, so the gateway is still
    # streaming this turn at every drop and has to replay what died with each socket.
    async with GatewayClient(ws_url(gateway), token=TOKEN, max_queued_events=16) as client:
        sid = (await client.create_session(agent="load"))["session_id"]
        await client.submit(sid, "output_mb=2 chunk_kb=1")
        received: list[dict] = []
        deadline = time.monotonic() + 45
        async for event in client.events(sid):
            received.append(event)
            if len(received) % 300 == 0 and client.stats.forced_drops < 5:
                await client.wait_connected(10)
                connects = client.stats.connects
                client.abort()
                # Keep consuming: the reader only notices the drop once it gets room in the queue.
                assert client.stats.connects == connects
            if event["type"] == "turn.complete":
                break
            assert time.monotonic() < deadline, "turn did not complete in time"
        seqs = [e["seq"] for e in received]
        assert seqs == list(range(1, len(seqs) + 1))
        assert len(seqs) > 2000
        assert received[-1]["payload"]["status"] == "ok"
        tool_bytes = sum(len(e["payload"]["text"]) for e in received if e["type"] == "tool.output")
        assert tool_bytes >= 2 * 1000 * 1000
        await client.wait_connected(10)
        assert client.stats.forced_drops == 5 and client.stats.drops == 5
        assert client.stats.resumes == 5 and client.stats.connects == 6
        assert client.stats.replayed > 0, "no drop happened while events were in flight"
        assert client.stats.truncations == 0
        await client.close(sid)
        tail = [e async for e in client.events(sid)]
        assert [e["type"] for e in tail][-1] == "session.closed"
        assert [e["seq"] for e in tail] == list(range(seqs[-1] + 1, seqs[-1] + 1 + len(tail)))


async def test_unknown_session_raises_session_not_found_with_code_4001(gateway: GatewayProcess) -> None:
    async with GatewayClient(ws_url(gateway), token=TOKEN) as client:
        with pytest.raises(SessionNotFound) as info:
            await client.submit("s-does-not-exist", "hi")
        assert info.value.code == 4001 and isinstance(info.value, GatewayError)
        with pytest.raises(SessionNotFound):
            await client.call("session.close", session_id="s-does-not-exist")
        assert (await client.ping()) == {"ok": True}  # the connection survives an error answer


async def test_bad_params_raise_invalid_params_with_code_and_data(gateway: GatewayProcess) -> None:
    async with GatewayClient(ws_url(gateway), token=TOKEN) as client:
        with pytest.raises(InvalidParams) as info:
            await client.call("session.close", session_id=42)
        assert info.value.code == -32602 and "session_id" in info.value.message
        with pytest.raises(InvalidParams) as info:
            await client.call("gateway.ping", surprise=True)
        assert info.value.data == {"param": "surprise"}
        with pytest.raises(UnknownAgent) as agent_info:
            await client.create_session(agent="no-such-agent")
        assert agent_info.value.code == 4004


def test_error_codes_map_to_their_types() -> None:
    assert isinstance(error_from_response({"code": 4009, "message": "busy"}), GatewayError)
    for code, name in ((4009, "Busy"), (4029, "LimitReached"), (5001, "WorkerStartFailed"),
                       (5002, "WorkerDied"), (-32601, "MethodNotFound")):
        error = error_from_response({"code": code, "message": "m", "data": {"k": 1}})
        assert type(error).__name__ == name and error.code == code and error.data == {"k": 1}
    unknown = error_from_response({"code": 7777, "message": "new"})
    assert type(unknown) is GatewayError and unknown.code == 7777


def test_urls_are_normalized_to_the_ws_endpoint() -> None:
    assert normalize_url("http://127.0.0.1:9/") == "ws://127.0.0.1:9/ws"
    assert normalize_url("https://h.example") == "wss://h.example/ws"
    assert normalize_url("ws://127.0.0.1:9/ws?token=x") == "ws://127.0.0.1:9/ws?token=x"
    with pytest.raises(ValueError):
        normalize_url("ftp://127.0.0.1/")


async def test_token_in_query_works_and_a_wrong_token_is_rejected_without_retry(gateway: GatewayProcess) -> None:
    async with GatewayClient(gateway.url()) as client:  # ?token=... in the URL
        assert (await client.ping()) == {"ok": True}
        assert client.server_info.get("protocol") == 1
    with pytest.raises(HandshakeRejected) as info:
        async with GatewayClient(ws_url(gateway), token="wrong-token"):
            pass
    assert info.value.data == {"status": 403}


async def test_call_in_flight_at_a_drop_fails_with_connection_lost_and_is_not_resent(
        gateway_factory) -> None:
    gateway = gateway_factory("--interrupt-grace-s", "1.0")
    async with GatewayClient(ws_url(gateway), token=TOKEN) as client:
        sid = (await client.create_session(agent="load"))["session_id"]
        events = client.events(sid)
        await client.submit(sid, "cpu_s=3 gil=regex")
        await drain_until(events, "turn.start")
        interrupt = asyncio.ensure_future(client.interrupt(sid))
        # Abort as soon as the request is written: its answer cannot have been read yet.
        for _ in range(1000):
            await asyncio.sleep(0)
            if client.pending_calls:
                break
        assert client.pending_calls == 1
        client.abort()
        with pytest.raises(ConnectionLost) as info:
            await interrupt
        assert "session.interrupt" in str(info.value)
        await client.wait_connected(10)
        # The gateway did process it: the turn completes as interrupted, exactly once, on the resumed stream.
        done = (await drain_until(events, "turn.complete"))[-1]
        assert done["payload"]["status"] == "interrupted"
        assert (await client.interrupt(sid)) == {"status": "not_running"}


async def test_replay_truncated_is_raised_from_the_iterator_not_skipped(gateway_factory) -> None:
    # In memory only (with the store, old events come from disk), and acknowledged: the count bound
    # drops only events the client confirmed.
    gateway = gateway_factory("--replay-max-events", "16", "--no-state")
    async with GatewayClient(ws_url(gateway), token=TOKEN) as first:
        sid = (await first.create_session(agent="load"))["session_id"]
        await first.submit(sid, "output_mb=0.1 chunk_kb=1")
        produced = await drain_until(first.events(sid), "turn.complete")
        last = produced[-1]["seq"]
        assert last > 16
        assert (await first.call("session.ack", session_id=sid, seq=last))["acked_seq"] == last
        async with GatewayClient(ws_url(gateway), token=TOKEN) as second:
            resumed = await second.resume(sid, after_seq=0)
            assert resumed["truncated"] is True
            events = second.events(sid)
            with pytest.raises(ReplayTruncated) as info:
                await events.next(timeout=10)
            assert info.value.after_seq == 0 and info.value.first_seq == last - 15
            assert info.value.missing == info.value.first_seq - 1
            # Iteration goes on after the gap was reported: the rest arrives in order.
            rest = [await events.next(timeout=10) for _ in range(16)]
            assert [e["seq"] for e in rest] == list(range(last - 15, last + 1))
            assert second.stats.truncations == 1
            # The first client was superseded: its iterator ends after session.detached.
            tail = [e async for e in first.events(sid)]
            assert [e["type"] for e in tail] == ["session.detached"]
            await second.close(sid)


async def test_reconnect_gives_up_within_its_bounds_and_ends_iterators(gateway_factory) -> None:
    gateway = gateway_factory()
    policy = ReconnectPolicy(initial_delay=0.05, max_delay=0.2, max_attempts=4, max_time=3.0)
    client = GatewayClient(ws_url(gateway), token=TOKEN, reconnect=policy)
    async with client:
        sid = (await client.create_session(agent="echo"))["session_id"]
        events = client.events(sid)
        await asyncio.to_thread(gateway.stop)
        # The shutdown closes the session on the normal path; the iterator ends with session.closed.
        tail = [e async for e in events]
        assert tail[-1]["type"] == "session.closed" and tail[-1]["payload"]["reason"] == "shutdown"
        started = time.monotonic()
        with pytest.raises(ConnectionLost):
            await client.request("gateway.ping", timeout=10)
        assert time.monotonic() - started < 6
        await async_wait_for(lambda: client.state is ClientState.CLOSED, 6, what="client gave up")
        assert client.stats.drops == 1


async def test_call_timeout_is_a_typed_timeout_and_the_connection_stays_usable(gateway: GatewayProcess) -> None:
    async with GatewayClient(ws_url(gateway), token=TOKEN) as client:
        os.kill(gateway.pid, signal.SIGSTOP)  # a gateway that cannot answer, deterministically
        try:
            with pytest.raises(CallTimeout) as info:
                await client.request("gateway.ping", timeout=0.3)
        finally:
            os.kill(gateway.pid, signal.SIGCONT)
        assert isinstance(info.value, TimeoutError) and info.value.code is None
        assert (await client.ping()) == {"ok": True}  # the late answer to the first ping is ignored
        assert client.stats.drops == 0
