"""The database's page size: new files get the large pages, existing files keep theirs and still work."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from gateway.store import pipe
from gateway.store.pipe import StoreOp
from gateway.store.sqlite_writer import (
    _SCHEMA, AUTOCHECKPOINT_BYTES, NEW_DB_PAGE_SIZE, SqliteWriter, database_path, open_database)
from workers.channel import FrameDecoder, Kind, control_frame


def _pragma(conn: sqlite3.Connection, name: str) -> int:
    return int(conn.execute(f"PRAGMA {name}").fetchone()[0])


def _append_and_read(conn: sqlite3.Connection, sid: str, seqs: range, size: int) -> list[tuple[int, bytes]]:
    """Append through the writer, commit, read everything back: the frames it returns, decoded."""
    writer = SqliteWriter(conn, retention_s=3600.0, max_bytes=1 << 40)
    decoder = FrameDecoder()
    data = b"".join(pipe.encode_append(sid, seq, "tool.output", b"%d:" % seq + b"x" * size) for seq in seqs)
    for frame in decoder.feed(data):
        writer.submit(frame)
    durable = [f.json() for f in decoder.feed(b"".join(writer.commit())) if f.name == StoreOp.DURABLE]
    assert durable == [{sid: seqs[-1]}]
    request = control_frame(StoreOp.READ_EVENTS, {"id": 1, "session_id": sid, "after_seq": 0,
                                                  "max_events": 10**6, "max_bytes": 1 << 40})
    for frame in decoder.feed(request):
        writer.submit(frame)
    out = decoder.feed(b"".join(writer.commit()))
    return [pipe.decode_row(f.body)[1:] for f in out if f.kind is Kind.EVENT and f.name == StoreOp.ROW]


def test_a_new_database_gets_the_large_page_size_and_a_wal_bound_in_bytes(tmp_path: Path) -> None:
    conn = open_database(database_path(tmp_path))
    assert _pragma(conn, "page_size") == NEW_DB_PAGE_SIZE == 65536
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert _pragma(conn, "wal_autocheckpoint") == AUTOCHECKPOINT_BYTES // NEW_DB_PAGE_SIZE
    rows = _append_and_read(conn, "a", range(1, 41), 64 * 1024)
    assert [seq for seq, _ in rows] == list(range(1, 41))
    assert all(frame == b"%d:" % seq + b"x" * 65536 for seq, frame in rows)
    conn.close()
    with sqlite3.connect(database_path(tmp_path)) as other:  # the page size is the file's, for good
        assert _pragma(other, "page_size") == NEW_DB_PAGE_SIZE


def test_an_existing_4096_page_database_keeps_its_pages_and_its_events(tmp_path: Path) -> None:
    path = database_path(tmp_path)
    old = sqlite3.connect(path, isolation_level=None)
    old.execute("PRAGMA page_size=4096")
    old.execute("PRAGMA journal_mode=WAL")
    old.executescript(_SCHEMA)  # the tables as an earlier version made them, on 4 KiB pages
    old.close()
    conn = open_database(path)  # made by an earlier version: schema and events on 4 KiB pages
    assert _pragma(conn, "page_size") == 4096
    _append_and_read(conn, "old", range(1, 21), 64 * 1024)
    conn.close()
    conn = open_database(path)  # reopened by this version: still 4096, old rows readable, new ones written
    assert _pragma(conn, "page_size") == 4096
    assert _pragma(conn, "wal_autocheckpoint") == AUTOCHECKPOINT_BYTES // 4096
    rows = _append_and_read(conn, "new", range(1, 11), 1024)
    assert [seq for seq, _ in rows] == list(range(1, 11))
    writer = SqliteWriter(conn, retention_s=3600.0, max_bytes=1 << 40)
    decoder = FrameDecoder()
    request = control_frame(StoreOp.READ_EVENTS, {"id": 2, "session_id": "old", "after_seq": 0,
                                                  "max_events": 10**6, "max_bytes": 1 << 40})
    for frame in decoder.feed(request):
        writer.submit(frame)
    old_rows = [pipe.decode_row(f.body)[1:] for f in decoder.feed(b"".join(writer.commit())) if f.name == StoreOp.ROW]
    assert [seq for seq, _ in old_rows] == list(range(1, 21))
    assert all(frame == b"%d:" % seq + b"x" * 65536 for seq, frame in old_rows)
    conn.close()


def test_the_writer_checkpoints_between_commits_once_the_wal_has_grown(tmp_path: Path) -> None:
    """Commits leave the WAL to grow (SQLite's own autocheckpoint is only a far safety net); the loop's
    checkpoint, run after the acknowledgements went out, copies it into the database file."""
    path = database_path(tmp_path)
    conn = open_database(path)
    writer = SqliteWriter(conn, retention_s=3600.0, max_bytes=1 << 40)
    decoder = FrameDecoder()
    size, seq = 64 * 1024, 0
    while not writer.checkpoint_due:
        data = b"".join(pipe.encode_append("a", seq + i, "tool.output", b"x" * size) for i in range(1, 17))
        seq += 16
        for frame in decoder.feed(data):
            writer.submit(frame)
        assert [f.json() for f in decoder.feed(b"".join(writer.commit()))] == [{"a": seq}]
    assert seq * size < AUTOCHECKPOINT_BYTES  # SQLite's own bound was not reached: nothing copied yet
    before = path.stat().st_size
    assert before < size * seq // 2
    writer.checkpoint()
    assert not writer.checkpoint_due
    assert path.stat().st_size >= size * seq  # the events are in the database file now
    busy, log_frames, checkpointed = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    assert busy == 0 and log_frames == checkpointed  # nothing left to copy: the WAL restarts
    conn.close()
