"""Sessions over the protocol against a real gateway with real workers (PROTOCOL sections 4 and 5)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time

import psutil
import pytest
import websockets

from support import ROOT, RpcClient, async_wait_for, pgid_members


def seqs(events: list[dict]) -> list[int]:
    return [e["seq"] for e in events]


def assert_gapless(events: list[dict]) -> None:
    numbers = seqs(events)
    assert numbers == list(range(1, len(numbers) + 1)), f"gap or duplicate near {_first_break(numbers)}"


def _first_break(numbers: list[int]) -> object:
    for i, n in enumerate(numbers, 1):
        if n != i:
            return (i, n)
    return None


def group_gone(pid: int) -> bool:
    return not pgid_members(pid)


async def test_echo_turn_streams_words_with_gapless_seq(rpc_connect) -> None:
    async with rpc_connect() as client:
        created = await client.call("session.create", title="t1")
        sid = created["session_id"]
        assert created["agent"] == "echo" and psutil.pid_exists(created["worker_pid"])
        assert os.getpgid(created["worker_pid"]) == created["worker_pid"] != os.getpgid(0)
        done = await client.run_turn(sid, "hello brave new world")
        assert done["status"] == "ok"
        events = client.session_events(sid)
        assert_gapless(events)
        types = [e["type"] for e in events]
        assert types == ["turn.start"] + ["message.delta"] * 4 + ["turn.complete"]
        assert "".join(e["payload"]["text"] for e in events if e["type"] == "message.delta").split() == \
            "hello brave new world".split()
        listed = await client.call("session.active_list")
        assert [s["session_id"] for s in listed["sessions"]] == [sid]
        entry = listed["sessions"][0]
        assert entry["attached"] is True and entry["title"] == "t1" and entry["last_seq"] == len(events)
        closed = await client.call("session.close", session_id=sid)
        assert closed == {"closed": True}
        assert group_gone(created["worker_pid"])
        assert (await client.call("session.active_list"))["sessions"] == []
        assert client.session_events(sid)[-1]["payload"] == {"reason": "client"}


async def test_keepalive_survives_a_gil_bound_turn(gateway_factory) -> None:
    gw = gateway_factory("--ws-ping-interval", "2", "--ws-ping-timeout", "2")
    async with RpcClient.connect(gw.url()) as client:
        sid = (await client.call("session.create", agent="load"))["session_id"]
        await client.call("prompt.submit", session_id=sid, text="cpu_s=20 gil=regex")
        rtts = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 120
        while not client.session_events(sid, "turn.complete"):
            assert loop.time() < deadline, "turn did not complete"
            start = loop.time()
            assert await client.call("gateway.ping", timeout=5) == {"ok": True}
            rtts.append(loop.time() - start)
            assert not client.closed.done()
            await asyncio.sleep(0.25)
        assert client.session_events(sid, "turn.complete")[0]["payload"]["status"] == "ok"
        assert len(rtts) >= 40 and max(rtts) < 1.0, max(rtts)
        assert not client.closed.done()


async def test_resume_after_disconnect_is_gapless(gateway) -> None:
    async with RpcClient.connect(gateway.url()) as first:
        sid = (await first.call("session.create", agent="load"))["session_id"]
        await first.call("prompt.submit", session_id=sid, text="output_mb=2 chunk_kb=1")
        await first.wait(lambda: len(first.session_events(sid)) >= 300, 60)
        before = list(first.session_events(sid))
    # The socket is closed here, mid-stream; the session is detached and keeps buffering.
    last = before[-1]["seq"]
    async with RpcClient.connect(gateway.url()) as second:
        resumed = await second.call("session.resume", session_id=sid, after_seq=last)
        assert resumed["session_id"] == sid and resumed["truncated"] is False
        await second.wait(lambda: any(e["type"] == "turn.complete" for e in second.session_events(sid)), 120)
        union = before + second.session_events(sid)
        assert_gapless(union)
        assert len(union) > 2000 and union[-1]["type"] == "turn.complete"
        assert union[-1]["payload"]["status"] == "ok"


async def test_resume_supersedes_previous_owner(rpc_connect) -> None:
    async with rpc_connect() as a, rpc_connect() as b:
        sid = (await a.call("session.create"))["session_id"]
        await a.run_turn(sid, "one two")
        resumed = await b.call("session.resume", session_id=sid, after_seq=0)
        assert resumed["replayed"] == 4 and resumed["last_seq"] == 4
        await b.wait(lambda: len(b.session_events(sid)) == 4, 5)
        assert seqs(b.session_events(sid)) == [1, 2, 3, 4]
        await a.wait(lambda: a.session_events(sid, "session.detached"), 5)
        assert a.session_events(sid, "session.detached")[0]["payload"] == {"reason": "superseded"}
        await b.run_turn(sid, "three")
        assert not any(e["seq"] and e["seq"] > 4 for e in a.session_events(sid))
        since = await a.call("session.events.since", session_id=sid, after_seq=2)
        assert [e["seq"] for e in since["events"]] == [3, 4, 5, 6, 7]
        assert since["last_seq"] == 7 and since["truncated"] is False
        assert since["events"][0]["type"] == "message.delta"


async def test_replay_truncation_is_reported(gateway_factory) -> None:
    """The count bound drops only acknowledged events (issue 13 section 2), so the owner acks first.
    In memory only: with the store, older events are read from disk instead."""
    gw = gateway_factory("--replay-max-events", "16", "--no-state")
    async with RpcClient.connect(gw.url()) as a:
        sid = (await a.call("session.create"))["session_id"]
        await a.run_turn(sid, " ".join(f"w{i}" for i in range(30)))
        last = a.session_events(sid)[-1]["seq"]
        assert (await a.call("session.ack", session_id=sid, seq=last))["acked_seq"] == last
        async with RpcClient.connect(gw.url()) as b:
            resumed = await b.call("session.resume", session_id=sid, after_seq=0)
            assert resumed["truncated"] is True and resumed["replayed"] == 16
            await b.wait(lambda: len(b.session_events(sid)) >= 17, 5)
            first = b.session_events(sid)[0]
            assert first["type"] == "replay.truncated" and first["payload"]["first_seq"] == 17


async def test_unacknowledged_events_outlive_the_count_bound(gateway_factory) -> None:
    """Events that reached the socket but were never acknowledged stay replayable (byte bound only)."""
    gw = gateway_factory("--replay-max-events", "16")
    async with RpcClient.connect(gw.url()) as a:
        sid = (await a.call("session.create"))["session_id"]
        await a.run_turn(sid, " ".join(f"w{i}" for i in range(30)))
        async with RpcClient.connect(gw.url()) as b:
            resumed = await b.call("session.resume", session_id=sid, after_seq=0)
            assert resumed["truncated"] is False and resumed["replayed"] == resumed["last_seq"]
            await b.wait(lambda: len(b.session_events(sid)) >= resumed["last_seq"], 5)
            assert [e["seq"] for e in b.session_events(sid)] == list(range(1, resumed["last_seq"] + 1))


async def test_prompt_queue_limit(rpc_connect) -> None:
    async with rpc_connect() as client:
        sid = (await client.call("session.create", agent="load"))["session_id"]
        statuses = [(await client.call("prompt.submit", session_id=sid, text="cpu_s=30"))["status"]]
        for _ in range(8):
            statuses.append((await client.call("prompt.submit", session_id=sid, text="cpu_s=0"))["status"])
        assert statuses == ["started"] + ["queued"] * 8
        over = await client.request("prompt.submit", {"session_id": sid, "text": "cpu_s=0"})
        assert over["error"]["code"] == 4009 and "max_queued_prompts" in over["error"]["message"]
        await client.call("session.close", session_id=sid)


async def test_unknown_agent_and_bad_cwd(rpc_connect) -> None:
    async with rpc_connect() as client:
        err = (await client.request("session.create", {"agent": "no-such-agent"}))["error"]
        assert err["code"] == 4004 and "no-such-agent" in err["message"]
        err = (await client.request("session.create", {"agent": "no_such_pkg.mod:Agent"}))["error"]
        assert err["code"] == 4004
        err = (await client.request("session.create", {"cwd": "/definitely/not/here"}))["error"]
        assert err["code"] == -32602
        assert (await client.call("session.active_list"))["sessions"] == []
        # A session that never started is not announced: its id was never given to the client.
        assert [e for e in client.events if e["session_id"] is not None] == []


async def test_interrupt_a_gil_bound_turn_leaves_the_session_usable(gateway_factory) -> None:
    gw = gateway_factory("--interrupt-grace-s", "1")
    async with RpcClient.connect(gw.url()) as client:
        created = await client.call("session.create", agent="load")
        sid, old_pid = created["session_id"], created["worker_pid"]
        await client.call("prompt.submit", session_id=sid, text="cpu_s=60 gil=regex")
        await client.wait_event(sid, "turn.start")
        start = time.monotonic()
        assert await client.call("session.interrupt", session_id=sid) == {"status": "interrupted"}
        done = await client.run_turn(sid, "cpu_s=0")
        assert time.monotonic() - start < 1 + 2
        assert done["status"] == "ok"
        assert client.session_events(sid, "turn.complete")[0]["payload"]["status"] == "interrupted"
        # Either the regex call in progress ended within the grace and the agent stopped by itself, or the
        # worker was replaced; in the second case its whole group is gone.
        for exited in client.session_events(sid, "worker.exited"):
            assert exited["payload"]["pid"] == old_pid and exited["payload"]["expected"] is True
            assert group_gone(old_pid)
        assert_gapless(client.session_events(sid))
        assert await client.call("session.interrupt", session_id=sid) == {"status": "not_running"}


async def test_interrupt_replaces_a_worker_that_ignores_it(gateway_factory) -> None:
    gw = gateway_factory("--interrupt-grace-s", "0.5", env={"PYTHONPATH": str(ROOT / "tests")})
    async with RpcClient.connect(gw.url()) as client:
        created = await client.call("session.create", agent="agents_for_tests:Stubborn")
        sid, old_pid = created["session_id"], created["worker_pid"]
        await client.call("prompt.submit", session_id=sid, text="60")
        await client.wait_event(sid, "message.delta")
        assert await client.call("session.interrupt", session_id=sid) == {"status": "interrupted"}
        types = [e["type"] for e in client.session_events(sid)]
        assert types[-2:] == ["worker.exited", "turn.complete"], types
        exited = client.session_events(sid, "worker.exited")[0]["payload"]
        assert exited["pid"] == old_pid and exited["expected"] is True
        # Killed: by SIGTERM or SIGKILL, or (rarely, on a loaded machine) the forkserver's report of the
        # status was lost and both are null; see workers/supervisor.py _on_sentinel.
        assert exited["signal"] in (9, 15) or (exited["signal"] is None and exited["returncode"] is None), exited
        assert client.session_events(sid, "turn.complete")[0]["payload"]["status"] == "interrupted"
        assert group_gone(old_pid)
        await client.call("prompt.submit", session_id=sid, text="0")
        await client.wait_event(sid, "turn.complete", count=2)
        assert client.session_events(sid, "turn.complete")[1]["payload"]["status"] == "ok"
        assert_gapless(client.session_events(sid))


async def test_cooperative_interrupt(rpc_connect) -> None:
    async with rpc_connect() as client:
        created = await client.call("session.create", agent="load")
        sid = created["session_id"]
        await client.call("prompt.submit", session_id=sid, text="cpu_s=60 gil=python")
        await client.wait_event(sid, "turn.start")
        assert await client.call("session.interrupt", session_id=sid) == {"status": "interrupted"}
        assert client.session_events(sid, "turn.complete")[0]["payload"]["status"] == "interrupted"
        assert not client.session_events(sid, "worker.exited")  # it stopped by itself: same worker
        assert (await client.run_turn(sid, "cpu_s=0"))["status"] == "ok"


async def test_worker_killed_mid_turn(rpc_connect) -> None:
    async with rpc_connect() as client:
        created = await client.call("session.create", agent="load")
        sid, pid = created["session_id"], created["worker_pid"]
        await client.call("prompt.submit", session_id=sid, text="cpu_s=60")
        await client.wait_event(sid, "turn.start")
        os.kill(pid, signal.SIGKILL)
        exited = (await client.wait_event(sid, "worker.exited", 10))[0]["payload"]
        assert exited == {"pid": pid, "returncode": -9, "signal": 9, "expected": False} or \
            (exited["pid"] == pid and exited["signal"] == 9 and exited["expected"] is False)
        complete = (await client.wait_event(sid, "turn.complete", 10))[0]["payload"]
        assert complete["status"] == "error" and "signal 9" in complete["error"]
        assert (await client.run_turn(sid, "cpu_s=0"))["status"] == "ok"
        assert_gapless(client.session_events(sid))


async def test_close_on_disconnect_ends_the_group_at_once(rpc_connect, gateway) -> None:
    async with rpc_connect() as client:
        created = await client.call("session.create", agent="shell", close_on_disconnect=True)
        await client.run_turn(created["session_id"], "sleep 300 & echo started")
        pid = created["worker_pid"]
        assert len(pgid_members(pid)) >= 2
    await async_wait_for(lambda: group_gone(pid), 5, what="worker group gone after disconnect")
    async with rpc_connect() as client:
        assert (await client.call("session.active_list"))["sessions"] == []


@pytest.mark.parametrize("store", [False, True], ids=["no-state", "store"])
async def test_detached_session_reaped_after_grace(gateway_factory, store: bool) -> None:
    gw = gateway_factory("--grace-s", "1", *(() if store else ("--no-state",)))
    async with RpcClient.connect(gw.url()) as client:
        created = await client.call("session.create")
        sid, pid = created["session_id"], created["worker_pid"]
    async with RpcClient.connect(gw.url()) as client:
        listed = (await client.call("session.active_list"))["sessions"]
        assert listed and listed[0]["attached"] is False
        await async_wait_for(lambda: group_gone(pid), 10, what="grace expiry")
        assert (await client.call("session.active_list"))["sessions"] == []
        if store:  # a closed session stays stored (PROTOCOL section 8): its history is still readable
            async def closed_in_list() -> list:
                listed = (await client.call("session.list"))["sessions"]
                return [(r["session_id"], r["status"], r["closed_reason"]) for r in listed]
            for _ in range(100):
                if await closed_in_list() == [(sid, "closed", "grace_expired")]:
                    break
                await asyncio.sleep(0.05)
            assert await closed_in_list() == [(sid, "closed", "grace_expired")]
            since = await client.call("session.events.since", session_id=sid, after_seq=0)
            assert since["events"][-1]["payload"] == {"reason": "grace_expired"}
        else:
            for _ in range(100):  # the teardown finishes just after the worker's group is gone
                since = await client.request("session.events.since", {"session_id": sid, "after_seq": 0})
                if "error" in since:
                    break
                await asyncio.sleep(0.05)
            assert since["error"]["code"] == 4001


async def test_running_session_outlives_grace_until_its_turn_ends(gateway_factory) -> None:
    gw = gateway_factory("--grace-s", "0.5")
    async with RpcClient.connect(gw.url()) as client:
        created = await client.call("session.create", agent="load")
        sid, pid = created["session_id"], created["worker_pid"]
        await client.call("prompt.submit", session_id=sid, text="cpu_s=4")
        await client.wait_event(sid, "turn.start")
    detached_at = time.monotonic()
    async with RpcClient.connect(gw.url()) as watcher:
        # Observe the session well past its grace while its turn still runs: it must stay.
        observed_running_after_grace = False
        for _ in range(200):
            listed = (await watcher.call("session.active_list"))["sessions"]
            if not listed:
                break
            if time.monotonic() - detached_at > 1.5 and listed[0]["status"] == "running":
                observed_running_after_grace = True
                break
            await asyncio.sleep(0.05)
        assert observed_running_after_grace, "a running session was reaped before its turn ended"
        await async_wait_for(lambda: group_gone(pid), 30, what="reap after the turn ended")
        assert (await watcher.call("session.active_list"))["sessions"] == []


async def test_idle_ttl(gateway_factory) -> None:
    gw = gateway_factory("--grace-s", "0", "--idle-ttl-s", "1")
    async with RpcClient.connect(gw.url()) as client:
        pid = (await client.call("session.create"))["worker_pid"]
    await async_wait_for(lambda: group_gone(pid), 10, what="idle TTL reap")


async def test_shutdown_closes_sessions_with_reason(gateway_factory) -> None:
    gw = gateway_factory()
    async with RpcClient.connect(gw.url()) as client:
        created = await client.call("session.create", agent="shell")
        sid, pid = created["session_id"], created["worker_pid"]
        await client.call("prompt.submit", session_id=sid, text="sleep 300")
        await client.wait_event(sid, "turn.start")
        gw.proc.send_signal(signal.SIGTERM)
        closed = await client.wait_event(sid, "session.closed", 20)
        assert closed[0]["payload"] == {"reason": "shutdown"}
    assert gw.proc.wait(20) == 0
    assert group_gone(pid)


async def test_slow_reader_bounds_gateway_memory(gateway) -> None:
    proc = psutil.Process(gateway.pid)
    async with websockets.connect(gateway.url(), max_size=None, max_queue=1) as ws:
        await ws.recv()
        await ws.send(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "session.create",
                                  "params": {"agent": "load"}}))
        sid = json.loads(await ws.recv())["result"]["session_id"]
        rss_before = proc.memory_info().rss
        await ws.send(json.dumps({"jsonrpc": "2.0", "id": 2, "method": "prompt.submit",
                                  "params": {"session_id": sid, "text": "output_mb=200 chunk_kb=64"}}))
        # Stop reading: the websockets client keeps at most ~1 message; the gateway must stop the worker.
        peak = rss_before
        for _ in range(30):
            peak = max(peak, proc.memory_info().rss)
            await asyncio.sleep(0.1)
        assert peak - rss_before < 100 * 1024 * 1024, (peak - rss_before) / 1e6
        seen: list[int] = []
        total = 0
        deadline = time.monotonic() + 180
        while True:
            assert time.monotonic() < deadline
            msg = json.loads(await asyncio.wait_for(ws.recv(), 60))
            peak = max(peak, proc.memory_info().rss) if len(seen) % 200 == 0 else peak
            params = msg.get("params") or {}
            if params.get("session_id") == sid and params.get("seq"):
                seen.append(params["seq"])
                if params["type"] == "tool.output":
                    total += len(params["payload"]["text"])
                if params["type"] == "turn.complete":
                    assert params["payload"]["status"] == "ok"
                    break
        assert seen == list(range(1, len(seen) + 1))
        assert total >= 200 * 1000 * 1000
        assert peak - rss_before < 100 * 1024 * 1024, (peak - rss_before) / 1e6


async def test_races_leave_nothing_behind(gateway, request) -> None:
    iterations = int(os.environ.get("WG_RACE_ITERATIONS", "200"))
    rng = random.Random(1234)
    worker_pids: set[int] = set()

    async def one_round(a: RpcClient, b: RpcClient, i: int) -> None:
        create = asyncio.ensure_future(a.request("session.create", {"close_on_disconnect": rng.random() < 0.3}))
        if rng.random() < 0.2:
            await asyncio.sleep(0)
        res = await create
        if "error" in res:
            return
        sid = res["result"]["session_id"]
        worker_pids.add(res["result"]["worker_pid"])
        ops = [
            lambda: a.request("prompt.submit", {"session_id": sid, "text": f"round {i}"}),
            lambda: b.request("session.interrupt", {"session_id": sid}),
            lambda: b.request("session.resume", {"session_id": sid, "after_seq": 0}),
            lambda: a.request("session.close", {"session_id": sid}),
            lambda: b.request("session.close", {"session_id": sid}),
        ]
        rng.shuffle(ops)
        results = await asyncio.gather(*(op() for op in ops[:rng.randint(1, len(ops))]))
        for r in results:
            assert "result" in r or r["error"]["code"] in (4001,), r

    url = gateway.url()
    done = 0
    while done < iterations:
        async with RpcClient.connect(url) as a, RpcClient.connect(url) as b:
            batch = min(iterations - done, rng.randint(5, 25))
            for j in range(batch):
                await one_round(a, b, done + j)
            done += batch
        # Leaving the block disconnects both clients mid-whatever: close_on_disconnect sessions close at once.
    async with RpcClient.connect(url) as c:
        for s in (await c.call("session.active_list"))["sessions"]:
            await c.call("session.close", session_id=s["session_id"])
        assert (await c.call("session.active_list"))["sessions"] == []
    await async_wait_for(lambda: all(group_gone(p) for p in worker_pids), 15, what="every session worker gone")
    assert len(worker_pids) >= iterations * 0.9
