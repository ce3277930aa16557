"""After a checkpoint the database file's pages leave the page cache; the events stay readable."""

from __future__ import annotations

import ctypes
import sqlite3
import mmap
import os
from pathlib import Path

from gateway.store import pipe
from gateway.store.pipe import StoreOp
from gateway.store.sqlite_writer import (
    CHECKPOINT_BYTES, SqliteWriter, _open_for_advice, database_path, open_database)
from workers.channel import FrameDecoder, Kind, control_frame

_libc = ctypes.CDLL(None, use_errno=True)


def resident_bytes(path: Path) -> int:
    """Bytes of ``path`` in the page cache (``mincore`` of a private mapping that touches nothing)."""
    size = path.stat().st_size
    page = mmap.PAGESIZE
    vec = (ctypes.c_ubyte * ((size + page - 1) // page))()
    with path.open("rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as m:
        anchor = ctypes.c_char.from_buffer(m)
        try:
            rc = _libc.mincore(ctypes.c_void_p(ctypes.addressof(anchor)), ctypes.c_size_t(size), vec)
        finally:
            del anchor
    assert rc == 0, os.strerror(ctypes.get_errno())
    return sum(b & 1 for b in vec) * page


def test_checkpoints_drop_the_database_pages_and_reads_still_work(tmp_path: Path) -> None:
    conn = open_database(database_path(tmp_path))
    writer = SqliteWriter(conn, retention_s=3600.0, max_bytes=1 << 40)
    decoder = FrameDecoder()
    body = b"y" * 65536
    seq = checkpoints = 0
    for _ in range(12):  # 48 MiB in commits of 4 MiB: three checkpoints' worth
        data = b"".join(pipe.encode_append("s", seq + i + 1, "tool.output", b"%08d" % (seq + i + 1) + body)
                        for i in range(64))
        seq += 64
        for frame in decoder.feed(data):
            writer.submit(frame)
        writer.commit()
        if writer.checkpoint_due:
            writer.checkpoint()
            checkpoints += 1
    assert checkpoints >= 2
    db = database_path(tmp_path)
    size = db.stat().st_size
    assert size > 32 * 2**20
    # what the last checkpoint copied in was dropped with the rest: at most the b-tree pages read since
    assert resident_bytes(db) < CHECKPOINT_BYTES // 4, (resident_bytes(db), size)
    request = control_frame(StoreOp.READ_EVENTS, {"id": 1, "session_id": "s", "after_seq": 0,
                                                  "max_events": 10**6, "max_bytes": 1 << 40})
    for frame in decoder.feed(request):
        writer.submit(frame)
    rows = [pipe.decode_row(f.body)[1:] for f in decoder.feed(b"".join(writer.commit()))
            if f.kind is Kind.EVENT and f.name == StoreOp.ROW]
    assert [s for s, _ in rows] == list(range(1, seq + 1))
    assert all(frame == b"%08d" % s + body for s, frame in rows)
    writer.close()


def test_an_in_memory_database_has_no_file_to_advise() -> None:
    conn = sqlite3.connect(":memory:")
    assert _open_for_advice(conn) is None
    conn.close()
