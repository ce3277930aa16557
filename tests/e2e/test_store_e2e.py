"""Sessions that survive everything (issue 14, PROTOCOL section 8), against real gateways on a real state dir:
kill -9 of the gateway mid-stream and a restart, reopening closed sessions, listing, deleting, the lock and a
corrupt database."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from support import ROOT, TOKEN, GatewayProcess, RpcClient, async_wait_for, descendants, wait_for_gone


def start(state_dir: Path, *args: str) -> GatewayProcess:
    return GatewayProcess("--state-dir", str(state_dir), *args).start()


def kill9(gw: GatewayProcess) -> None:
    """kill -9 the gateway and wait until every process it started is gone (the workers' watchdogs and the
    store writer notice within the promised 2 s)."""
    started = descendants(gw.pid)
    os.kill(gw.pid, signal.SIGKILL)
    assert gw.proc is not None
    gw.proc.wait(10)
    leftover = wait_for_gone(started, 10)
    assert not leftover, [(p.pid, p.name()) for p in leftover]


async def all_events(client: RpcClient, sid: str) -> list[dict]:
    """``session.events.since`` from 0, page by page."""
    events: list[dict] = []
    after = 0
    for _ in range(10_000):
        page = await client.call("session.events.since", session_id=sid, after_seq=after)
        events += page["events"]
        if not page.get("more"):
            return events
        after = page["next_after_seq"]
    raise AssertionError("events.since never ended")


def gapless(events: list[dict]) -> list[int]:
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "gap or duplicate"
    return seqs


async def test_kill_9_mid_stream_then_restart_loses_nothing_any_client_saw(tmp_path: Path) -> None:
    gw = start(tmp_path)
    try:
        async with RpcClient.connect(gw.url()) as client:
            ready = [e for e in client.events if e["type"] == "gateway.ready"][0]["payload"]
            sid = (await client.call("session.create", agent="load", title="crash"))["session_id"]
            await client.call("prompt.submit", session_id=sid, text="output_mb=64 chunk_kb=1")
            await client.wait(lambda: len(client.session_events(sid)) >= 3000, 120)
            kill9(gw)
            seen = [e for e in client.session_events(sid) if e["seq"] is not None]
        gapless(seen)
        gw = start(tmp_path)
        async with RpcClient.connect(gw.url()) as client:
            again = [e for e in client.events if e["type"] == "gateway.ready"][0]["payload"]
            assert again["epoch"] != ready["epoch"]
            listed = {s["session_id"]: s for s in (await client.call("session.active_list"))["sessions"]}
            assert listed[sid]["attached"] is False and listed[sid]["title"] == "crash"
            # Every event any client had seen is stored, byte for byte (here: value for value), same seq.
            stored = await all_events(client, sid)
            assert stored[:len(seen)] == seen
            gapless(stored)
            # The client resumes from its last seen seq: the rest, with no gap and no duplicate, ending
            # with the crash's bookkeeping: worker.exited, then turn.complete "gateway restarted".
            resumed = await client.call("session.resume", session_id=sid, after_seq=seen[-1]["seq"])
            assert resumed["truncated"] is False and resumed["status"] == "idle"
            await client.wait(lambda: any(e["type"] == "turn.complete" for e in client.session_events(sid)), 60)
            union = seen + client.session_events(sid)
            gapless(union)
            tail = [e["type"] for e in union[-2:]]
            assert tail == ["worker.exited", "turn.complete"], tail
            assert union[-1]["payload"]["status"] == "error" and union[-1]["payload"]["error"] == "gateway restarted"
            assert union[-2]["payload"]["expected"] is False
            # The session goes on, on a fresh worker, with seq continuing.
            done = await client.run_turn(sid, "output_mb=0.01")  # the load agent's grammar
            assert done["status"] == "ok"
            gapless(union + [e for e in client.session_events(sid) if e["seq"] > union[-1]["seq"]])
    finally:
        gw.stop()


async def test_a_closed_session_is_listed_reopened_by_resume_and_deleted(tmp_path: Path) -> None:
    gw = start(tmp_path)
    try:
        async with RpcClient.connect(gw.url()) as client:
            sid = (await client.call("session.create", title="keep me"))["session_id"]
            assert (await client.run_turn(sid, "hello there"))["status"] == "ok"
            await client.call("session.close", session_id=sid)
            rows = {r["session_id"]: r for r in (await client.call("session.list"))["sessions"]}
            assert rows[sid]["status"] == "closed" and rows[sid]["closed_reason"] == "client"
            assert rows[sid]["title"] == "keep me" and rows[sid]["last_seq"] >= 4
            assert sid not in {r["session_id"] for r in
                               (await client.call("session.list", include_closed=False))["sessions"]}
        gw.stop()
        gw = start(tmp_path)  # survives a restart too
        async with RpcClient.connect(gw.url()) as client:
            resumed = await client.call("session.resume", session_id=sid, after_seq=0)
            assert resumed["status"] == "idle" and resumed["replayed"] == resumed["last_seq"]
            await client.wait(lambda: len(client.session_events(sid)) >= resumed["last_seq"], 10)
            gapless(client.session_events(sid))
            assert (await client.run_turn(sid, "reopened"))["status"] == "ok"
            assert sid in {s["session_id"] for s in (await client.call("session.active_list"))["sessions"]}
            assert (await client.call("session.delete", session_id=sid)) == {"deleted": True}
            assert sid not in {r["session_id"] for r in (await client.call("session.list"))["sessions"]}
            gone = await client.request("session.resume", {"session_id": sid})
            assert gone["error"]["code"] == 4001
            assert (await client.request("session.delete", {"session_id": sid}))["error"]["code"] == 4001
    finally:
        gw.stop()


def test_a_second_gateway_on_the_same_state_dir_exits_2_naming_the_holder(tmp_path: Path) -> None:
    gw = start(tmp_path)
    try:
        second = subprocess.run([sys.executable, "-m", "gateway", "serve", "--port", "0", "--token", TOKEN,
                                 "--state-dir", str(tmp_path)], cwd=ROOT, capture_output=True, timeout=60)
        assert second.returncode == 2
        err = second.stderr.decode()
        assert str(gw.pid) in err and "Traceback" not in err and b"WORKER_GATEWAY_READY" not in second.stdout
    finally:
        gw.stop()


def test_a_corrupt_database_is_refused_and_left_alone(tmp_path: Path) -> None:
    gw = start(tmp_path)
    gw.stop()
    db = next(p for p in tmp_path.iterdir() if p.suffix in (".db", ".sqlite", ".sqlite3"))
    for extra in tmp_path.glob(db.name + "-*"):
        extra.unlink()
    db.write_bytes(b"this is not an SQLite database" * 100)
    before = db.read_bytes()
    refused = subprocess.run([sys.executable, "-m", "gateway", "serve", "--port", "0", "--token", TOKEN,
                              "--state-dir", str(tmp_path)], cwd=ROOT, capture_output=True, timeout=60)
    assert refused.returncode == 2
    err = refused.stderr.decode()
    assert str(db) in err and "recover" in err and "Traceback" not in err
    assert db.read_bytes() == before  # never silently recreated


async def test_no_state_keeps_nothing_on_disk(tmp_path: Path) -> None:
    env_home = tmp_path / "home"
    gw = GatewayProcess("--no-state", env={"XDG_STATE_HOME": str(env_home), "HOME": str(env_home)}).start()
    try:
        async with RpcClient.connect(gw.url()) as client:
            sid = (await client.call("session.create"))["session_id"]
            assert (await client.run_turn(sid, "in memory"))["status"] == "ok"
        assert not env_home.exists() or not any(env_home.rglob("*.db"))
    finally:
        gw.stop()


async def test_a_detached_running_turn_runs_on_into_the_log(tmp_path: Path) -> None:
    """Nobody reads, yet the turn completes: its events go to disk, not to a blocked pipe."""
    gw = start(tmp_path)
    try:
        async with RpcClient.connect(gw.url()) as client:
            sid = (await client.call("session.create", agent="load"))["session_id"]
            await client.call("prompt.submit", session_id=sid, text="output_mb=24 chunk_kb=16")
            await client.wait(lambda: len(client.session_events(sid)) >= 10, 60)
        async with RpcClient.connect(gw.url()) as watcher:
            async def finished() -> bool:
                rows = (await watcher.call("session.active_list"))["sessions"]
                return any(r["session_id"] == sid and r["status"] == "idle" for r in rows)

            deadline = time.monotonic() + 120
            while not await finished():
                assert time.monotonic() < deadline, "the detached turn did not run to its end"
                await watcher.call("gateway.ping")
            resumed = await watcher.call("session.resume", session_id=sid, after_seq=0)
            assert resumed["truncated"] is False
            await watcher.wait(lambda: any(e["type"] == "turn.complete" for e in watcher.session_events(sid)), 120)
            events = watcher.session_events(sid)
            gapless(events)
            assert events[0]["seq"] == 1 and events[-1]["payload"]["status"] == "ok"
            assert sum(len(e["payload"].get("text", "")) for e in events if e["type"] == "tool.output") >= 24 * 1024 * 1024
    finally:
        gw.stop()


class _SmallDiskGateway(GatewayProcess):
    """A gateway whose files may not grow past ``fsize`` bytes (RLIMIT_FSIZE, inherited by its store
    writer): the database hits EFBIG the way a full disk gives ENOSPC."""

    def __init__(self, fsize: int, *args: str) -> None:
        super().__init__(*args)
        self.fsize = fsize

    def command(self) -> list[str]:
        return ["prlimit", f"--fsize={self.fsize}", *super().command()]


def _health(gw: GatewayProcess) -> dict:
    import urllib.request

    with urllib.request.urlopen(gw.http("/healthz"), timeout=5) as response:
        return json.loads(response.read())


async def test_a_full_disk_fails_closed_and_loud(tmp_path: Path) -> None:
    gw = _SmallDiskGateway(3 * 1024 * 1024, "--state-dir", str(tmp_path)).start()
    try:
        async with RpcClient.connect(gw.url()) as client:
            sid = (await client.call("session.create", agent="load"))["session_id"]
            await client.call("prompt.submit", session_id=sid, text="output_mb=16 chunk_kb=64")
            await async_wait_for(lambda: _health(gw)["status"] == "degraded", 120, interval=0.2,
                                 what="/healthz to report the store")
            health = _health(gw)
            assert health["reason"], health
            refused = await client.request("session.create")
            assert refused["error"]["code"] == 5003 and "store" in refused["error"]["message"]
            # What the client got is gapless and the gateway lives.  How much that is depends on how the
            # events fell into commits: the first commit alone may fail (then nothing was shown at all).
            seen = client.session_events(sid)
            gapless(seen)
            assert await client.call("gateway.ping") == {"ok": True}
            assert not seen or seen[-1]["seq"] < 16 * 16 + 10  # far from the whole turn: stopped at the disk
    finally:
        code = gw.stop(timeout=60)
    assert code == 0
    # Nothing was shown that is not on disk: every seq the client saw is in the database.
    with sqlite3.connect(f"file:{tmp_path / 'store.db'}?mode=ro", uri=True) as db:
        stored = {seq for (seq,) in db.execute("SELECT seq FROM events WHERE session_id = ?", (sid,))}
    assert {e["seq"] for e in seen} <= stored, (len(seen), len(stored))


def _count_of(client: RpcClient, sid: str) -> tuple[int, int]:
    """(turns counted, worker pid) from the TurnCounter's last reply."""
    text = [e for e in client.session_events(sid, "message.delta")][-1]["payload"]["text"]
    _, count, _, pid = text.split()
    return int(count), int(pid)


async def test_agent_state_survives_a_crash_and_an_interrupt_that_kills_the_worker(tmp_path: Path) -> None:
    gw = start(tmp_path, "--interrupt-grace-s", "0.5")
    try:
        async with RpcClient.connect(gw.url()) as client:
            sid = (await client.call("session.create", agent="tests.agents_for_tests:TurnCounter"))["session_id"]
            for _ in range(3):
                assert (await client.run_turn(sid, "count"))["status"] == "ok"
            assert _count_of(client, sid)[0] == 3
            first_pid = _count_of(client, sid)[1]
            # A turn stuck holding the CPU: the interrupt has to kill the worker and start a fresh one.
            await client.call("prompt.submit", session_id=sid, text="stick 60")
            await client.wait_event(sid, "message.delta", count=4)
            assert (await client.call("session.interrupt", session_id=sid))["status"] == "interrupted"
            assert (await client.run_turn(sid, "count"))["status"] == "ok"
            count, pid = _count_of(client, sid)
            assert count == 4 and pid != first_pid  # a new worker, the saved state restored
            kill9(gw)
        gw = start(tmp_path)
        async with RpcClient.connect(gw.url()) as client:
            await client.call("session.resume", session_id=sid, after_seq=0)
            assert (await client.run_turn(sid, "count"))["status"] == "ok"
            assert _count_of(client, sid)[0] == 5  # after a kill -9 and a restart: still counting
    finally:
        gw.stop()
