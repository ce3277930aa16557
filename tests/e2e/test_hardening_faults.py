"""Faults survived: a dead slash worker, a worker that corrupts its frame stream, the gateway killed with
SIGKILL or stopped with SIGTERM mid-work, and half-open clients on a public-style ping policy.

(A worker killed mid-turn and a worker flooding a slow reader are covered by test_sessions_e2e.py.)
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import urllib.request

import psutil
import pytest

from support import ROOT, TOKEN, RpcClient, async_wait_for, descendants, pgid_members, wait_for_gone
from hardening_agents import CORRUPTIONS
from hardening_wire import RawWebSocket

TEST_AGENTS_ENV = {"PYTHONPATH": str(ROOT / "tests")}


def slash_workers(gateway_pid: int) -> list[psutil.Process]:
    out = []
    for p in descendants(gateway_pid):
        try:
            if any(part.endswith("slash_worker.py") for part in p.cmdline()) and p.pid == os.getpgid(p.pid):
                out.append(p)
        except (psutil.NoSuchProcess, ProcessLookupError):
            pass
    return out


async def gone(pid: int, timeout: float = 5.0) -> None:
    await async_wait_for(lambda: not pgid_members(pid), timeout, what=f"process group {pid} gone")


async def test_slash_worker_killed_the_next_command_starts_a_fresh_one(gateway_factory) -> None:
    gw = gateway_factory()
    async with RpcClient.connect(gw.url()) as client:
        sid = (await client.call("session.create"))["session_id"]
        first = await client.call("slash.exec", session_id=sid, command="/help")
        assert first["ok"] is True and "/status" in first["output"]
        (victim,) = slash_workers(gw.pid)
        os.killpg(victim.pid, signal.SIGKILL)
        await gone(victim.pid)
        again = await client.call("slash.exec", session_id=sid, command="/status")
        assert again["ok"] is True and sid in again["output"], again
        (fresh,) = slash_workers(gw.pid)
        assert fresh.pid != victim.pid
        # The agent side of the session never noticed.
        assert (await client.run_turn(sid, "agent unaffected"))["status"] == "ok"
        assert not client.session_events(sid, "worker.exited")


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
async def test_corrupt_frame_from_a_worker_is_an_unexpected_exit_and_the_session_stays_usable(
        gateway_factory, corruption: str) -> None:
    gw = gateway_factory(env=TEST_AGENTS_ENV)
    async with RpcClient.connect(gw.url()) as client, RpcClient.connect(gw.url()) as neighbour:
        other = (await neighbour.call("session.create"))["session_id"]
        created = await client.call("session.create", agent="hardening_agents:CorruptFrame")
        sid, pid = created["session_id"], created["worker_pid"]
        done = await client.run_turn(sid, corruption, timeout=20)
        assert done["status"] == "error" and "worker died" in done["error"], done
        exited = client.session_events(sid, "worker.exited")
        assert len(exited) == 1 and exited[0]["payload"]["pid"] == pid and exited[0]["payload"]["expected"] is False
        await gone(pid)
        # The next prompt runs on a fresh worker; the stream stayed gapless; the neighbour saw nothing.
        assert (await client.run_turn(sid, "hello again"))["status"] == "ok"
        seqs = [e["seq"] for e in client.session_events(sid)]
        assert seqs == list(range(1, len(seqs) + 1))
        assert not [e for e in client.session_events(sid) if "injected" in e or '"' in e["type"]]
        assert not client.session_events(sid, "session.closed")  # nothing spoke for the gateway
        assert (await neighbour.run_turn(other, "unaffected"))["status"] == "ok"
        assert not neighbour.session_events(other, "worker.exited")
    assert f"corrupt frame from worker {pid}" in gw.stderr()


async def test_a_saved_state_that_is_not_json_fails_one_start_and_is_dropped(gateway_factory) -> None:
    """A worker saves a state that is not JSON, then dies: the next worker's start fails with 5001 and says
    why (it used to raise on the gateway's loop and leave the prompt waiting for a worker forever); the
    state is dropped, so the prompt after that runs on a worker without it."""
    gw = gateway_factory(env=TEST_AGENTS_ENV)
    async with RpcClient.connect(gw.url()) as client:
        created = await client.call("session.create", agent="hardening_agents:BadState")
        sid, pid = created["session_id"], created["worker_pid"]
        assert (await client.run_turn(sid, "save"))["status"] == "ok"
        done = await client.run_turn(sid, "die", timeout=20)
        assert done["status"] == "error", done
        await gone(pid)
        done = await client.run_turn(sid, "next", timeout=20)
        assert done["status"] == "error" and "saved state is not JSON" in done["error"], done
        assert "the state was dropped" in done["error"], done
        assert (await client.run_turn(sid, "after", timeout=20))["status"] == "ok"
        assert [e for e in client.session_events(sid, "message.delta")][-1]["payload"]["text"] == "after"
        await client.call("session.close", session_id=sid)
    assert "dropped its saved agent state" in gw.stderr()


async def test_gateway_killed_with_sigkill_takes_every_group_down_within_3s(gateway_factory) -> None:
    gw = gateway_factory()
    groups: list[int] = []
    async with RpcClient.connect(gw.url()) as client:
        for agent, prompt in [("shell", "sleep 300 & sleep 300"), ("load", "cpu_s=120 gil=regex"),
                              ("load", "cpu_s=120")]:
            created = await client.call("session.create", agent=agent)
            await client.call("prompt.submit", session_id=created["session_id"], text=prompt)
            await client.wait_event(created["session_id"], "turn.start")
            groups.append(created["worker_pid"])
        assert (await client.call("slash.exec", session_id=created["session_id"], command="/help"))["ok"]
        groups += [p.pid for p in slash_workers(gw.pid)]
        groups.append((await client.call("terminal.open", argv=["sleep", "300"]))["pid"])
        await async_wait_for(lambda: len(pgid_members(groups[0])) >= 3, 10, what="the shell's background job")
        everything = descendants(gw.pid)
        assert len(groups) >= 4 and all(pgid_members(g) for g in groups)
        gw.proc.kill()
        killed_at = time.monotonic()
        assert gw.proc.wait(5) == -signal.SIGKILL
        left = wait_for_gone(everything, 3.0)
        elapsed = time.monotonic() - killed_at
    assert not left, f"alive {elapsed:.1f}s after the gateway's SIGKILL: {[(p.pid, p.cmdline()) for p in left]}"
    assert all(not pgid_members(g) for g in groups)


async def test_sigterm_during_20_running_turns_exits_0_and_leaves_nothing(gateway_factory) -> None:
    gw = gateway_factory("--max-sessions", "40", "--kill-grace-s", "2")
    sessions: list[tuple[RpcClient, str]] = []
    async with RpcClient.connect(gw.url()) as c1, RpcClient.connect(gw.url()) as c2, \
            RpcClient.connect(gw.url()) as c3, RpcClient.connect(gw.url()) as c4:
        clients = [c1, c2, c3, c4]

        async def start(i: int) -> None:
            client = clients[i % 4]
            agent, prompt = ("shell", "sleep 300 & sleep 300") if i % 2 else ("load", "cpu_s=120")
            sid = (await client.call("session.create", agent=agent))["session_id"]
            await client.call("prompt.submit", session_id=sid, text=prompt)
            await client.wait_event(sid, "turn.start")
            sessions.append((client, sid))

        await asyncio.gather(*(start(i) for i in range(20)))
        listed = (await c1.call("session.active_list"))["sessions"]
        assert len(listed) == 20 and all(s["status"] == "running" for s in listed)
        everything = descendants(gw.pid)
        gw.proc.send_signal(signal.SIGTERM)
        for client, sid in sessions:
            closed = await client.wait_event(sid, "session.closed", 30)
            assert closed[0]["payload"] == {"reason": "shutdown"}
            complete = client.session_events(sid, "turn.complete")
            assert not complete or complete[0]["payload"]["status"] in ("error", "interrupted")
        code = await asyncio.to_thread(gw.proc.wait, 30)
    assert code == 0, gw.stderr()[-3000:]
    left = wait_for_gone(everything, 5.0)
    assert not left, [(p.pid, p.cmdline()) for p in left]


# Half-open connections --------------------------------------------------------------------------------------

PING = ("--ws-ping-interval", "1", "--ws-ping-timeout", "1")
DETECTION_S = 1 + 1 + 1  # interval + timeout + 1 s


async def attached(observer: RpcClient, sid: str) -> bool | None:
    """The session's ``attached`` flag as another connection sees it (None once it is gone)."""
    for s in (await observer.call("session.active_list"))["sessions"]:
        if s["session_id"] == sid:
            return s["attached"]
    return None


async def poll_until(observer: RpcClient, sid: str, wanted: object, timeout: float) -> float:
    started = time.monotonic()
    while (state := await attached(observer, sid)) is not wanted:
        assert time.monotonic() - started < timeout, f"session {sid}: still attached={state} after {timeout}s"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def test_silent_client_with_an_idle_session_is_detached_then_reaped(gateway_factory) -> None:
    gw = gateway_factory(*PING, "--grace-s", "1")
    raw = RawWebSocket(gw.port, TOKEN)
    try:
        assert raw.recv_json()["params"]["type"] == "gateway.ready"
        created = raw.call("session.create", {"title": "half-open"})["result"]
        silent_since = time.monotonic()  # from here on the raw client neither reads nor answers pings
        sid, pid = created["session_id"], created["worker_pid"]
        async with RpcClient.connect(gw.url()) as observer:
            await poll_until(observer, sid, False, DETECTION_S + 1)
            assert time.monotonic() - silent_since <= DETECTION_S, "detached too late"
            await poll_until(observer, sid, None, 1 + 2)  # grace (1 s) + margin
            await gone(pid)
            for _ in range(100):  # the teardown records the reason just after the worker is gone
                rows = {r["session_id"]: r for r in (await observer.call("session.list"))["sessions"]}
                if rows[sid]["status"] == "closed":
                    break
                await asyncio.sleep(0.05)
            assert (rows[sid]["status"], rows[sid]["closed_reason"]) == ("closed", "grace_expired")
    finally:
        raw.close()


async def test_client_that_stops_reading_a_streaming_session_is_detached_then_reaped(gateway_factory) -> None:
    """The hard case: output is pending, so the server cannot even flush its close frame; the keepalive
    alone never produces a disconnect.  The gateway must still detach the session in time, and memory stays
    bounded because the worker is blocked on its pipe; the session is then reaped by the idle TTL."""
    gw = gateway_factory(*PING, "--grace-s", "1", "--idle-ttl-s", "3")
    raw = RawWebSocket(gw.port, TOKEN)
    try:
        assert raw.recv_json()["params"]["type"] == "gateway.ready"
        created = raw.call("session.create", {"agent": "load"})["result"]
        sid, pid = created["session_id"], created["worker_pid"]
        assert raw.call("prompt.submit", {"session_id": sid, "text": "output_mb=100"}, request_id=2)["result"]
        silent_since = time.monotonic()
        async with RpcClient.connect(gw.url()) as observer:
            await poll_until(observer, sid, False, DETECTION_S + 1)
            assert time.monotonic() - silent_since <= DETECTION_S, "detached too late"
            status = next(s["status"] for s in (await observer.call("session.active_list"))["sessions"]
                          if s["session_id"] == sid)
            assert status == "running"  # the turn cannot finish: nobody reads its output
            assert psutil.Process(gw.pid).memory_info().rss < 400 * 1024 * 1024
            await poll_until(observer, sid, None, 3 + 3)  # idle TTL (3 s after the last event) + margin
            await gone(pid)
            health = await asyncio.to_thread(_healthz, gw)
            assert health["connections"] == 1 and health["sessions"] == 0
    finally:
        raw.close()


def _healthz(gw) -> dict:
    with urllib.request.urlopen(gw.http("/healthz"), timeout=5) as resp:
        return json.loads(resp.read())
