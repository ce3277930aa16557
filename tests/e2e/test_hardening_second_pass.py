"""Issue 13, the defects without a home of their own: concurrent interrupts of a stuck turn, and a session
closed while its owner is behind."""

from __future__ import annotations

import asyncio
import json
import time

import websockets

from support import RpcClient


async def test_concurrent_interrupts_of_a_stuck_turn_all_answer_interrupted(gateway_factory) -> None:
    gw = gateway_factory("--interrupt-grace-s", "0.5")
    async with RpcClient.connect(gw.url()) as client:
        sid = (await client.call("session.create", agent="tests.agents_for_tests:TurnCounter"))["session_id"]
        await client.call("prompt.submit", session_id=sid, text="stick 60")
        await client.wait_event(sid, "message.delta")
        answers = await asyncio.gather(*(client.request("session.interrupt", {"session_id": sid}) for _ in range(3)))
        assert [a.get("result") for a in answers] == [{"status": "interrupted"}] * 3, answers
        assert (await client.run_turn(sid, "count"))["status"] == "ok"  # usable again, on a fresh worker
        completes = client.session_events(sid, "turn.complete")
        assert [c["payload"]["status"] for c in completes] == ["interrupted", "ok"]


async def test_a_session_closed_while_its_owner_is_behind_still_delivers_its_last_events(gateway_factory) -> None:
    gw = gateway_factory()
    async with websockets.connect(gw.url(), max_queue=4, max_size=None) as owner, \
            RpcClient.connect(gw.url()) as observer:
        assert json.loads(await owner.recv())["params"]["type"] == "gateway.ready"
        sids = []
        for i in (1, 2):
            await owner.send(json.dumps({"jsonrpc": "2.0", "id": i, "method": "session.create",
                                         "params": {"agent": "load"}}))
            while True:
                msg = json.loads(await owner.recv())
                if msg.get("id") == i:
                    sids.append(msg["result"]["session_id"])
                    break
        for i, sid in enumerate(sids, 10):  # two floods on one connection that stops reading
            await owner.send(json.dumps({"jsonrpc": "2.0", "id": i, "method": "prompt.submit",
                                         "params": {"session_id": sid, "text": "output_mb=40 chunk_kb=64"}}))

        async def flooding() -> bool:
            rows = {r["session_id"]: r for r in (await observer.call("session.active_list"))["sessions"]}
            return all(rows[s]["last_seq"] > 60 for s in sids)

        deadline = time.monotonic() + 60
        while not await flooding():
            assert time.monotonic() < deadline, "the sessions did not start streaming"
            await asyncio.sleep(0.1)
        closed = sids[0]
        assert await observer.call("session.close", session_id=closed) == {"closed": True}
        # The owner reads again: every event of the closed session arrives, gapless, ending with its close.
        seqs: list[int] = []
        types: list[str] = []
        deadline = time.monotonic() + 120
        while not types or types[-1] != "session.closed":
            assert time.monotonic() < deadline, f"no session.closed (last: {types[-3:]})"
            msg = json.loads(await asyncio.wait_for(owner.recv(), 30))
            params = msg.get("params") or {}
            if msg.get("method") == "event" and params.get("session_id") == closed:
                seqs.append(params["seq"])
                types.append(params["type"])
        assert seqs == list(range(1, len(seqs) + 1)), "a gap or a duplicate"
        assert types[-2:] == ["worker.exited", "session.closed"], types[-4:]


async def _closed_reason(observer: RpcClient, sid: str, timeout: float) -> str | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = {r["session_id"]: r for r in (await observer.call("session.list"))["sessions"]}
        if rows.get(sid, {}).get("status") == "closed":
            return rows[sid]["closed_reason"]
        await asyncio.sleep(0.2)
    return None


async def test_a_detached_session_blocked_too_long_is_closed_as_blocked(gateway_factory) -> None:
    """Issue 16 section 2: nobody reads, the worker waits on its pipe: not for 6 hours, for the bound."""
    gw = gateway_factory("--no-state", "--blocked-detached-s", "2", "--grace-s", "1")
    async with RpcClient.connect(gw.url()) as client:
        sid = (await client.call("session.create", agent="load"))["session_id"]
        await client.call("prompt.submit", session_id=sid, text="output_mb=200 chunk_kb=64")
        await client.wait_event(sid, "tool.output")
    async with RpcClient.connect(gw.url()) as observer:
        assert await _closed_reason(observer, sid, 60) == "blocked"


async def test_with_the_store_a_detached_turn_blocks_only_past_its_quota(gateway_factory) -> None:
    gw = gateway_factory("--detached-quota-bytes", "1048576", "--blocked-detached-s", "2", "--grace-s", "1")
    async with RpcClient.connect(gw.url()) as client:
        sid = (await client.call("session.create", agent="load"))["session_id"]
        await client.call("prompt.submit", session_id=sid, text="output_mb=200 chunk_kb=64")
        await client.wait_event(sid, "tool.output")
    async with RpcClient.connect(gw.url()) as observer:
        assert await _closed_reason(observer, sid, 60) == "blocked"
        stored = await observer.call("session.events.since", session_id=sid, after_seq=0)
        assert stored["events"][-1]["payload"] == {"reason": "blocked"}
