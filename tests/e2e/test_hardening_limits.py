"""Every limit is configurable and answered with 4029 and a message naming it (docs/protocol.md section 8).

Small limits are set with CLI flags so that each test reaches its limit in a few requests.  The prompt-queue
limit (4009) is covered by test_sessions_e2e.py.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import websockets

from support import RpcClient, async_wait_for, pgid_members


async def open_terminal(client: RpcClient, **params) -> dict:
    response = await client.request("terminal.open", params)
    assert "result" in response, response
    return response["result"]


async def group_gone(pid: int) -> None:
    await async_wait_for(lambda: not pgid_members(pid), 5, what=f"process group {pid} gone")


def assert_limit_error(response: dict, knob: str) -> None:
    assert "error" in response, response
    error = response["error"]
    assert error["code"] == 4029, error
    assert knob in error["message"], error
    assert error["data"]["limit"] == knob, error


async def test_total_session_limit_is_4029_naming_max_sessions(gateway_factory) -> None:
    gw = gateway_factory("--max-sessions", "3", "--pool-size", "1")
    async with RpcClient.connect(gw.url()) as a, RpcClient.connect(gw.url()) as b:
        first = [await a.call("session.create") for _ in range(2)]
        first.append(await b.call("session.create"))
        refused = await b.request("session.create")
        assert_limit_error(refused, "max_sessions")
        assert_limit_error(await a.request("session.create"), "max_sessions")
        # The refusal started no worker and left the existing sessions usable.
        assert len((await a.call("session.active_list"))["sessions"]) == 3
        assert (await b.run_turn(first[2]["session_id"], "still here"))["status"] == "ok"
        # Closing one frees its slot.
        await a.call("session.close", session_id=first[0]["session_id"])
        await group_gone(first[0]["worker_pid"])
        again = await b.call("session.create")
        assert (await b.run_turn(again["session_id"], "fits again"))["status"] == "ok"


async def test_per_connection_session_limit_is_4029_and_other_connections_still_create(gateway_factory) -> None:
    gw = gateway_factory("--max-sessions-per-connection", "2", "--pool-size", "1")
    async with RpcClient.connect(gw.url()) as a, RpcClient.connect(gw.url()) as b:
        mine = [(await a.call("session.create"))["session_id"] for _ in range(2)]
        assert_limit_error(await a.request("session.create"), "max_sessions_per_connection")
        other = await b.call("session.create")
        assert (await b.run_turn(other["session_id"], "unaffected"))["status"] == "ok"
        # A session that closed no longer counts against its owner.
        await a.call("session.close", session_id=mine[0])
        assert "result" in await a.request("session.create")


async def test_terminal_limit_is_4029_naming_max_terminals(gateway_factory) -> None:
    gw = gateway_factory("--max-terminals", "2")
    async with RpcClient.connect(gw.url()) as client:
        opened = [await open_terminal(client, argv=["sleep", "300"]) for _ in range(2)]
        refused = await client.request("terminal.open", {"argv": ["sleep", "300"]})
        assert refused["error"]["code"] == 4029, refused
        assert "max_terminals" in refused["error"]["message"], refused
        await client.call("terminal.close", terminal_id=opened[0]["terminal_id"])
        await group_gone(opened[0]["pid"])
        third = await client.call("terminal.open", argv=["sleep", "300"])
        await client.call("terminal.close", terminal_id=third["terminal_id"])
        await client.call("terminal.close", terminal_id=opened[1]["terminal_id"])


async def test_terminal_limit_error_data_names_the_knob(gateway_factory) -> None:
    gw = gateway_factory("--max-terminals", "1")
    async with RpcClient.connect(gw.url()) as client:
        opened = await open_terminal(client, argv=["sleep", "300"])
        try:
            refused = await client.request("terminal.open", {"argv": ["sleep", "300"]})
            assert_limit_error(refused, "max_terminals")
        finally:
            await client.call("terminal.close", terminal_id=opened["terminal_id"])


async def test_connection_limit_sends_4029_then_closes_1013(gateway_factory) -> None:
    gw = gateway_factory("--max-connections", "2")
    async with RpcClient.connect(gw.url()) as a, RpcClient.connect(gw.url()) as b:
        async with websockets.connect(gw.url()) as third:
            frame = json.loads(await asyncio.wait_for(third.recv(), 10))
            assert frame["id"] is None
            assert_limit_error(frame, "max_connections")
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(third.recv(), 10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013
        # The two admitted connections were not disturbed.
        assert await a.call("gateway.ping") == {"ok": True}
        assert await b.call("gateway.ping") == {"ok": True}
    # Once one leaves, a new connection is admitted (the server sees the disconnect asynchronously).
    deadline = time.monotonic() + 10
    while True:
        async with websockets.connect(gw.url()) as ws:
            first = json.loads(await asyncio.wait_for(ws.recv(), 10))
            if first.get("method") == "event":
                assert first["params"]["type"] == "gateway.ready"
                break
        assert time.monotonic() < deadline, "no connection admitted after the others left"
        await asyncio.sleep(0.05)


async def test_acks_are_not_rate_limited(gateway_factory) -> None:
    gw = gateway_factory("--rate-per-s", "1", "--rate-burst", "2")
    async with RpcClient.connect(gw.url()) as client:
        sid = (await client.call("session.create"))["session_id"]
        answers = [await client.request("session.ack", {"session_id": sid, "seq": 0}) for _ in range(20)]
        assert all("result" in a for a in answers), answers
        others = [await client.request("gateway.info") for _ in range(4)]  # the rest still is
        assert any(a.get("error", {}).get("code") == 4029 for a in others), others


async def test_rate_limit_answers_excess_with_4029_and_keeps_the_connection(gateway_factory) -> None:
    rate, burst = 5, 10
    gw = gateway_factory("--rate-per-s", str(rate), "--rate-burst", str(burst))
    async with RpcClient.connect(gw.url()) as client, RpcClient.connect(gw.url()) as neighbour:
        ids = list(range(1000, 1040))
        started = time.monotonic()
        for rid in ids:  # one burst, far faster than 5/s
            await client.send_raw(json.dumps({"jsonrpc": "2.0", "id": rid, "method": "gateway.ping"}))
        await client.wait(lambda: all(rid in client.responses for rid in ids), 10)
        elapsed = time.monotonic() - started
        answers = [client.responses.pop(rid) for rid in ids]
        ok = [a for a in answers if "result" in a]
        limited = [a for a in answers if "error" in a]
        # The burst passes, plus what the bucket refilled while the frames were in flight; the rest is refused.
        assert burst <= len(ok) <= burst + int(rate * elapsed) + 1, (len(ok), elapsed)
        assert len(ok) + len(limited) == len(ids)
        for answer in limited:
            assert_limit_error(answer, "rate_per_s")
            assert answer["id"] in ids  # the error carries the request's id
        # The connection stays open and usable once the bucket refills; another connection has its own.
        assert not client.closed.done()
        assert await neighbour.call("gateway.ping") == {"ok": True}

        async def ping_passes() -> bool:
            return "result" in await client.request("gateway.ping")

        deadline = time.monotonic() + 5
        while not await ping_passes():
            assert time.monotonic() < deadline, "the bucket never refilled"
            await asyncio.sleep(1 / rate)


async def test_limits_are_reported_by_gateway_info(gateway_factory) -> None:
    gw = gateway_factory("--max-sessions", "7", "--max-sessions-per-connection", "3", "--max-terminals", "4",
                         "--max-connections", "9", "--rate-per-s", "11", "--rate-burst", "13",
                         "--max-json-depth", "6")
    async with RpcClient.connect(gw.url()) as client:
        limits = (await client.call("gateway.info"))["limits"]
        assert {k: limits[k] for k in ("max_sessions", "max_sessions_per_connection", "max_terminals",
                                        "max_connections", "rate_per_s", "rate_burst")} == {
            "max_sessions": 7, "max_sessions_per_connection": 3, "max_terminals": 4, "max_connections": 9,
            "rate_per_s": 11, "rate_burst": 13}
        too_deep = {"jsonrpc": "2.0", "id": 1, "method": "gateway.ping", "params": {"a": [[[[[1]]]]]}}
        await client.send_raw(json.dumps(too_deep))
        await client.wait(lambda: 1 in client.responses, 10)
        assert client.responses.pop(1)["error"]["code"] == -32600
