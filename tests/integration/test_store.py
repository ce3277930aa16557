"""EventStore end to end: a real writer process on a temporary state dir, driven from the event loop."""

from __future__ import annotations

import asyncio
import os
import resource
import selectors
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from gateway.store import EventStore, StoreCorrupt, StoreError, StoreLocked
from gateway.store.sqlite_writer import database_path
from gateway.wire import ErrorCode
from support import ROOT, alive, async_wait_for, wait_for_gone

DAY = 86400.0


def frame(seq: int, size: int = 0) -> bytes:
    return b'{"n":%d,"pad":"%s"}' % (seq, b"x" * size)


class Acks:
    """Records ``on_durable`` calls and ``on_health`` changes, and checks they arrive on the loop."""

    def __init__(self) -> None:
        self.calls: list[dict[str, int]] = []
        self.health: list[str | None] = []
        self.loop = asyncio.get_running_loop()

    def durable(self, seqs: dict[str, int]) -> None:
        assert asyncio.get_running_loop() is self.loop
        self.calls.append(dict(seqs))

    def on_health(self, reason: str | None) -> None:
        self.health.append(reason)

    def highest(self, session_id: str) -> int:
        return max((c[session_id] for c in self.calls if session_id in c), default=0)


#: The store's writer process (and anything else a test starts) must not outlive the test.
pytestmark = pytest.mark.usefixtures("no_process_outlives_the_test")


@pytest.fixture
async def acks() -> Acks:
    return Acks()


async def open_store(state_dir: Path, acks: Acks, **kw: Any) -> EventStore:
    kw.setdefault("retention_s", 30 * DAY)
    kw.setdefault("max_bytes", 1 << 30)
    return await EventStore.open(state_dir, on_durable=acks.durable, on_health=acks.on_health, **kw)


@pytest.fixture
async def store(tmp_path: Path, acks: Acks) -> AsyncIterator[EventStore]:
    s = await open_store(tmp_path / "state", acks)
    try:
        yield s
    finally:
        await s.close()


async def read_everything(store: EventStore, session_id: str, *, piece_events: int = 1000,
                          piece_bytes: int = 1 << 20) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytes]] = []
    after = 0
    while True:
        piece = await store.read_events(session_id, after, max_events=piece_events, max_bytes=piece_bytes)
        if not piece:
            return out
        out.extend(piece)
        after = piece[-1][0]


async def test_appends_become_durable_in_seq_order(store: EventStore, acks: Acks) -> None:
    store.create_session({"session_id": "s1", "agent": "echo"})
    for seq in range(1, 501):
        store.append("s1", seq, "message.delta", frame(seq))
    assert store.pending_bytes > 0
    await async_wait_for(lambda: acks.highest("s1") == 500, 20, what="all 500 durable")
    seen = [c["s1"] for c in acks.calls if "s1" in c]
    assert seen == sorted(seen) and len(set(seen)) == len(seen)  # ascending, each commit reported once
    assert store.pending_bytes == 0
    assert await read_everything(store, "s1") == [(seq, frame(seq)) for seq in range(1, 501)]


async def test_queued_appends_are_committed_in_groups(store: EventStore, acks: Acks) -> None:
    for seq in range(1, 5001):
        store.append("s1", seq, "message.delta", frame(seq))
    await async_wait_for(lambda: acks.highest("s1") == 5000, 30, what="all 5000 durable")
    assert len(acks.calls) <= 500  # 5000 appends, far fewer commits


async def test_read_events_comes_in_bounded_pieces(store: EventStore, acks: Acks) -> None:
    for seq in range(1, 301):
        store.append("s1", seq, "tool.output", frame(seq, size=900))
    await async_wait_for(lambda: acks.highest("s1") == 300, 20)
    piece = await store.read_events("s1", 0, max_events=1000, max_bytes=10_000)
    assert 1 <= len(piece) <= 10 and sum(len(f) for _s, f in piece) <= 10_000
    assert [s for s, _f in piece] == list(range(1, len(piece) + 1))
    assert len(await store.read_events("s1", 295, max_events=1000, max_bytes=1 << 20)) == 5
    assert await store.read_events("s1", 300, max_events=10, max_bytes=10) == []
    rows = await read_everything(store, "s1", piece_events=7, piece_bytes=5000)
    assert rows == [(seq, frame(seq, size=900)) for seq in range(1, 301)]
    with pytest.raises(ValueError):
        await store.read_events("s1", 0, max_events=0, max_bytes=1)


async def test_agent_state_is_saved_and_survives_a_reopen(tmp_path: Path, acks: Acks) -> None:
    s = await open_store(tmp_path, acks)
    assert await s.get_state("s1") is None
    s.put_state("s1", 4, b'{"turns":1}')
    s.put_state("s1", 9, b'{"turns":2}')
    assert await s.get_state("s1") == b'{"turns":2}'
    await s.close()
    s = await open_store(tmp_path, acks)
    try:
        assert await s.get_state("s1") == b'{"turns":2}'
    finally:
        await s.close()


async def test_list_recover_and_delete(tmp_path: Path, acks: Acks) -> None:
    s = await open_store(tmp_path, acks)
    now = time.time()
    for n, sid in enumerate(("a", "b", "c")):
        s.create_session({"session_id": sid, "agent": "echo", "title": f"t{n}", "last_active": now + n})
    s.append("b", 1, "turn.start", frame(1))
    s.append("b", 2, "message.delta", frame(2))
    s.update_session("c", status="closed", closed_reason="client")
    listed = await s.list_sessions(limit=10, include_closed=True)
    assert [x["session_id"] for x in listed] == ["c", "b", "a"]
    closed = await s.get_session("c")
    assert closed is not None and closed["status"] == "closed" and closed["title"] == "t2"
    assert await s.get_session("nope") is None
    assert [x["session_id"] for x in await s.list_sessions(limit=10, include_closed=False)] == ["b", "a"]
    await s.close()

    s = await open_store(tmp_path, acks)  # a restart: what was live comes back, with its open turn
    try:
        live = {x["session_id"]: x for x in await s.recover()}
        assert set(live) == {"a", "b"}
        assert live["b"]["last_seq"] == 2 and live["b"]["turn_running"] is True
        assert live["a"]["turn_running"] is False and live["a"]["title"] == "t0"
        assert await s.delete_session("b") is True
        assert await s.read_events("b", 0, max_events=10, max_bytes=1000) == []
        assert "b" not in {x["session_id"] for x in await s.list_sessions(limit=10, include_closed=True)}
        assert await s.delete_session("b") is False
    finally:
        await s.close()


async def test_closed_sessions_older_than_retention_are_removed(tmp_path: Path, acks: Acks) -> None:
    s = await open_store(tmp_path, acks, retention_s=DAY, maintenance_every_s=0.05)
    try:
        for sid in ("expired", "recent", "live"):
            s.create_session({"session_id": sid})
            s.append(sid, 1, "message.delta", frame(1))
        s.update_session("expired", status="closed", closed_at=time.time() - 2 * DAY)
        s.update_session("recent", status="closed")

        async def listed() -> set[str]:
            return {x["session_id"] for x in await s.list_sessions(limit=10, include_closed=True)}

        deadline = time.monotonic() + 20
        while "expired" in await listed():
            assert time.monotonic() < deadline, "retention never removed the expired session"
            await asyncio.sleep(0.05)
        assert await listed() == {"recent", "live"}
        assert await s.read_events("expired", 0, max_events=9, max_bytes=999) == []
    finally:
        await s.close()


async def test_size_cap_evicts_the_oldest_closed_session(tmp_path: Path, acks: Acks) -> None:
    s = await open_store(tmp_path, acks, max_bytes=300_000, maintenance_every_s=0.05)
    try:
        for n, sid in enumerate(("oldest", "older", "live")):
            s.create_session({"session_id": sid})
            for seq in range(1, 101):
                s.append(sid, seq, "tool.output", frame(seq, size=1200))  # ~120 kB a session
            if sid != "live":
                s.update_session(sid, status="closed", closed_at=time.time() - 100 + n)
        await async_wait_for(lambda: acks.highest("live") == 100, 20)
        deadline = time.monotonic() + 20
        while len(await s.list_sessions(limit=10, include_closed=True)) == 3:
            assert time.monotonic() < deadline, "the size cap never evicted anything"
            await asyncio.sleep(0.05)
        assert {x["session_id"] for x in await s.list_sessions(limit=10, include_closed=True)} == {"older", "live"}
        assert len(await read_everything(s, "live")) == 100
    finally:
        await s.close()


async def test_second_opener_is_refused_with_the_holders_pid(tmp_path: Path, acks: Acks) -> None:
    s = await open_store(tmp_path, acks)
    try:
        with pytest.raises(StoreLocked) as err:
            await open_store(tmp_path, acks)
        assert err.value.holder_pid == os.getpid() and f"pid {os.getpid()}" in err.value.message
        assert err.value.code == ErrorCode.STORE_UNAVAILABLE
    finally:
        await s.close()
    again = await open_store(tmp_path, acks)  # released by close
    await again.close()


async def test_state_dir_is_created_private(tmp_path: Path, acks: Acks) -> None:
    state_dir = tmp_path / "a" / "b"
    s = await open_store(state_dir, acks)
    await s.close()
    assert state_dir.stat().st_mode & 0o777 == 0o700
    assert database_path(state_dir).exists()


async def test_full_disk_fails_closed_and_acknowledges_only_what_was_written(tmp_path: Path, acks: Acks) -> None:
    s = await open_store(tmp_path, acks, _max_page_count=16)
    for seq in range(1, 2001):
        s.append("s1", seq, "tool.output", frame(seq, size=1000))  # ~2 MB into a 1 MiB "disk" (64 KiB pages)
    await async_wait_for(lambda: s.health is not None, 20, what="health degraded")
    assert "full" in s.health and acks.health[-1] == s.health
    acknowledged = acks.highest("s1")
    assert acknowledged < 2000 and s.pending_bytes > 0
    await asyncio.wait_for(s.close(), 30)  # the writer's last attempt fails too; it exits and says so
    # Nothing acknowledged was lost, nothing beyond what was acknowledged is claimed to be there.
    s = await open_store(tmp_path, acks)
    try:
        rows = await read_everything(s, "s1")
        assert [seq for seq, _f in rows] == list(range(1, len(rows) + 1))
        assert len(rows) >= acknowledged
        assert all(f == frame(seq, size=1000) for seq, f in rows)
    finally:
        await s.close()


async def test_corrupt_database_is_refused_with_its_path_and_the_recovery_command(tmp_path: Path,
                                                                                 acks: Acks) -> None:
    path = database_path(tmp_path)
    garbage = b"definitely not sqlite" * 1000
    path.write_bytes(garbage)
    with pytest.raises(StoreCorrupt) as err:
        await open_store(tmp_path, acks)
    assert err.value.path == str(path) and str(path) in err.value.message and ".recover" in err.value.message
    assert path.read_bytes() == garbage  # never recreated over the user's data
    path.unlink()
    s = await open_store(tmp_path, acks)  # the lock was released by the refusal
    await s.close()


async def test_writer_death_is_loud(store: EventStore, acks: Acks) -> None:
    os.kill(store.writer_pid, signal.SIGKILL)
    await async_wait_for(lambda: store.health is not None, 10, what="health reports the dead writer")
    assert "exited" in store.health and acks.health == [store.health]
    with pytest.raises(StoreError):
        store.append("s1", 1, "message.delta", frame(1))
    with pytest.raises(StoreError):
        await store.list_sessions(limit=1, include_closed=True)


async def test_close_commits_everything_queued(tmp_path: Path, acks: Acks) -> None:
    s = await open_store(tmp_path, acks)
    for seq in range(1, 3001):
        s.append("s1", seq, "message.delta", frame(seq))
    writer = psutil.Process(s.writer_pid)
    await s.close()  # no wait for the acknowledgements first
    assert not alive([writer])
    s = await open_store(tmp_path, acks)
    try:
        assert len(await read_everything(s, "s1")) == 3000
    finally:
        await s.close()


_OWNER = textwrap.dedent("""
    import asyncio, os, sys, time
    from pathlib import Path
    from gateway.store import EventStore

    acked = 0

    async def main():
        def durable(seqs):
            global acked
            if "s1" in seqs:
                acked = seqs["s1"]
                print("acked", acked, flush=True)
        store = await EventStore.open(Path(sys.argv[1]), on_durable=durable, retention_s=1e9, max_bytes=1 << 40)
        print("writer", store.writer_pid, flush=True)
        if sys.argv[2] == "fork":  # a child that inherits the pipe: the writer sees no EOF, only the pidfd
            holder = os.fork()
            if holder == 0:
                time.sleep(120)
                os._exit(0)
            print("holder", holder, flush=True)
        seq = 0
        while True:  # stream until killed, with the gateway's backpressure: a bounded window not yet durable
            if seq - acked < 2000:
                for _ in range(50):
                    seq += 1
                    store.append("s1", seq, "message.delta", b'{"n":%d}' % seq)
            await asyncio.sleep(0.002)

    asyncio.run(main())
""")


class Lines:
    """Line reader over a child's stdout with a deadline per line."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self._fd = proc.stdout.fileno()
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._fd, selectors.EVENT_READ)
        self._buf = b""

    def next(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no line within {timeout}s (have {self._buf!r})"
            if self._sel.select(remaining):
                chunk = os.read(self._fd, 65536)
                assert chunk, "the owner exited"
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()


@pytest.mark.parametrize("pipe_held", [False, True], ids=["pipe-eof", "pipe-held-by-a-fork"])
def test_writer_outlives_a_killed_gateway_only_to_commit_what_it_had(tmp_path: Path, pipe_held: bool) -> None:
    owner = subprocess.Popen([sys.executable, "-c", _OWNER, str(tmp_path), "fork" if pipe_held else "-"],
                             stdout=subprocess.PIPE, cwd=ROOT)
    holder: psutil.Process | None = None
    try:
        lines = Lines(owner)
        kind, pid = lines.next(30).split()
        assert kind == "writer"
        writer = psutil.Process(int(pid))
        if pipe_held:
            kind, pid = lines.next(30).split()
            assert kind == "holder"
            holder = psutil.Process(int(pid))
        acked = 0
        while acked < 3000:
            kind, value = lines.next(30).split()
            acked = int(value)
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait(10)
        # The writer sees the pipe's EOF (and the owner's pidfd), commits what the pipe held, and exits:
        # the 2 s rule of ARCHITECTURE for everything a gateway started.
        assert not wait_for_gone([writer], timeout=2.0), "the store writer outlived its gateway by > 2 s"
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait(10)
        assert owner.stdout is not None
        owner.stdout.close()
        if holder is not None:  # started by our owner: ours to end (it also holds the state-dir lock)
            holder.kill()
            assert not wait_for_gone([holder], timeout=10.0)

    async def check() -> None:
        acks = Acks()
        s = await open_store(tmp_path, acks)  # the lock went with the owner and its writer
        try:
            rows = await read_everything(s, "s1", piece_events=5000, piece_bytes=4 << 20)
        finally:
            await s.close()
        assert [seq for seq, _f in rows] == list(range(1, len(rows) + 1))  # no gap, no duplicate
        assert len(rows) >= acked  # everything the owner was told is durable is there
        assert all(f == b'{"n":%d}' % seq for seq, f in rows)

    asyncio.run(check())


async def test_bad_session_fields_are_refused_at_the_call(store: EventStore, acks: Acks) -> None:
    with pytest.raises(ValueError):
        store.create_session({"agent": "echo"})
    with pytest.raises(ValueError):
        store.update_session("s1", title=["no"])
    store.append("s1", 1, "message.delta", frame(1))
    await async_wait_for(lambda: acks.highest("s1") == 1, 20)


async def test_a_failing_callback_does_not_stop_the_store(tmp_path: Path) -> None:
    seen: list[dict[str, int]] = []

    def durable(seqs: dict[str, int]) -> None:
        seen.append(seqs)
        raise RuntimeError("a bug in the caller")

    s = await EventStore.open(tmp_path, on_durable=durable, retention_s=DAY, max_bytes=1 << 30)
    try:
        s.append("s1", 1, "message.delta", frame(1))
        await async_wait_for(lambda: seen, 20)
        s.append("s1", 2, "message.delta", frame(2))
        await async_wait_for(lambda: seen[-1].get("s1") == 2, 20)
        assert s.health is None
    finally:
        await s.close()


async def test_a_size_limited_file_fails_closed_then_recovers_in_order(tmp_path: Path, acks: Acks) -> None:
    """RLIMIT_FSIZE on the writer is a real size limit (writes past it fail with EFBIG), and raising it
    again is "space returns": the held writes then commit, in order, and are acknowledged."""
    s = await open_store(tmp_path, acks)
    try:
        writer = psutil.Process(s.writer_pid)
        writer.rlimit(psutil.RLIMIT_FSIZE, (512 * 1024, resource.RLIM_INFINITY))
        for seq in range(1, 3001):
            s.append("s1", seq, "tool.output", frame(seq, size=1000))  # ~3 MB
        await async_wait_for(lambda: s.health is not None, 20, what="health degraded")
        stuck = acks.highest("s1")
        assert stuck < 3000 and s.pending_bytes > 0
        writer.rlimit(psutil.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        await async_wait_for(lambda: acks.highest("s1") == 3000, 30, what="the held writes committed")
        assert s.health is None and acks.health[-1] is None and s.pending_bytes == 0
        rows = await read_everything(s, "s1")
        assert rows == [(seq, frame(seq, size=1000)) for seq in range(1, 3001)]
    finally:
        await s.close()
