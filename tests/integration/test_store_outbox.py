"""EventStore's outbox: frames queued in one loop iteration reach the writer as one write, in order."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gateway.store import EventStore
from gateway.store.client import OUTBOX_FLUSH_BYTES
from support import async_wait_for


#: The store's writer process (and anything else a test starts) must not outlive the test.
pytestmark = pytest.mark.usefixtures("no_process_outlives_the_test")


def frame(seq: int, size: int) -> bytes:
    return b'{"n":%d,"pad":"%s"}' % (seq, b"x" * size)


async def _open(state_dir: Path, durable: dict[str, int]) -> EventStore:
    return await EventStore.open(state_dir, on_durable=durable.update, retention_s=86400.0, max_bytes=1 << 40)


async def _read_all(store: EventStore, sid: str) -> list[tuple[int, bytes]]:
    rows: list[tuple[int, bytes]] = []
    while piece := await store.read_events(sid, rows[-1][0] if rows else 0, max_events=500, max_bytes=1 << 22):
        rows.extend(piece)
    return rows


async def test_a_read_right_after_appends_in_the_same_iteration_sees_them(tmp_path: Path) -> None:
    durable: dict[str, int] = {}
    store = await _open(tmp_path, durable)
    try:
        for seq in range(1, 201):  # no await in between: all of them sit in the outbox
            store.append("a", seq, "tool.output", frame(seq, 100))
        store.put_state("a", 200, b'{"k":1}')
        rows = await store.read_events("a", 0, max_events=1000, max_bytes=1 << 30)
        assert rows == [(seq, frame(seq, 100)) for seq in range(1, 201)]
        assert await store.get_state("a") == b'{"k":1}'
        await async_wait_for(lambda: durable.get("a") == 200, 20, what="all 200 durable")
        assert store.pending_bytes == 0
    finally:
        await store.close()


async def test_a_burst_past_the_flush_bound_is_written_whole_and_in_order(tmp_path: Path) -> None:
    durable: dict[str, int] = {}
    store = await _open(tmp_path, durable)
    size = 64 * 1024
    count = 3 * OUTBOX_FLUSH_BYTES // size + 7  # several flushes inside one iteration, then a partial one
    try:
        for seq in range(1, count + 1):
            store.append("big", seq, "tool.output", frame(seq, size))
        for seq in range(1, 11):  # a second session interleaved in the same burst
            store.append("small", seq, "message.delta", frame(seq, 10))
        await async_wait_for(lambda: durable.get("big") == count and durable.get("small") == 10, 60,
                             what="the whole burst durable")
        assert await _read_all(store, "big") == [(seq, frame(seq, size)) for seq in range(1, count + 1)]
        assert await _read_all(store, "small") == [(seq, frame(seq, 10)) for seq in range(1, 11)]
    finally:
        await store.close()


@pytest.mark.parametrize("ending", ["close", "abort"])
async def test_appends_still_in_the_outbox_reach_the_writer_however_the_store_ends(tmp_path: Path,
                                                                                 ending: str) -> None:
    """``close`` writes the outbox first; ``abort`` is the path a dying gateway takes (EOF on the pipe, no
    CLOSE): the writer commits what it was given.  No iteration runs between the appends and the end."""
    durable: dict[str, int] = {}
    store = await _open(tmp_path, durable)
    for seq in range(1, 51):
        store.append("a", seq, "tool.output", frame(seq, 10))
    await (store.close() if ending == "close" else store._abort())
    store = await _open(tmp_path, durable)
    try:
        assert [seq for seq, _ in await _read_all(store, "a")] == list(range(1, 51))
    finally:
        await store.close()


async def test_the_flush_runs_within_the_iteration_not_on_a_timer(tmp_path: Path) -> None:
    durable: dict[str, int] = {}
    store = await _open(tmp_path, durable)
    try:
        store.append("a", 1, "tool.output", frame(1, 10))
        await asyncio.sleep(0)  # one iteration: the scheduled flush has run
        assert store._outbox == []
        await async_wait_for(lambda: durable.get("a") == 1, 20, what="seq 1 durable")
    finally:
        await store.close()
