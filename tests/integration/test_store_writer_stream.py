"""The store writer process's read loop on a real pipe: frames split across reads, frames larger than one
read, and a corrupt stream (what came before the corruption is committed, then the writer exits)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.store import pipe
from gateway.store.pipe import StoreOp
from gateway.store.sqlite_writer import database_path
from support import ROOT
from workers.channel import control_frame

TIMEOUT_S = 60
#: The writer process must not outlive its test.
pytestmark = pytest.mark.usefixtures("no_process_outlives_the_test")
CREATE = control_frame(StoreOp.CREATE_SESSION, {"meta": {"session_id": "s1", "created_at": 1.0, "last_active": 1.0}})


def run_writer(tmp_path: Path, data: bytes) -> tuple[int, str, list[tuple[int, bytes]]]:
    """Run the writer process on ``data`` then EOF: its exit status, its stderr, the stored events."""
    to_writer_r, to_writer_w = os.pipe()
    from_writer_r, from_writer_w = os.pipe()
    lock_r, lock_w = os.pipe()
    db = database_path(tmp_path)
    argv = [
        sys.executable, "-m", "gateway.store.writer_main", "--db", str(db),
        "--read-fd", str(to_writer_r), "--write-fd", str(from_writer_w), "--lock-fd", str(lock_r),
        "--parent-pid", str(os.getpid()), "--retention-s", "86400", "--max-bytes", str(1 << 30),
    ]  # fmt: skip
    proc = subprocess.Popen(
        argv, cwd=ROOT, pass_fds=(to_writer_r, from_writer_w, lock_r), stderr=subprocess.PIPE, text=True
    )
    for fd in (to_writer_r, from_writer_w, lock_r, lock_w):
        os.close(fd)
    try:
        with os.fdopen(to_writer_w, "wb") as feed:
            feed.write(data)  # blocks while the pipe is full: the writer reads as it commits
        with os.fdopen(from_writer_r, "rb") as answers:
            answers.read()  # until the writer exits: it holds the only write end
        _, err = proc.communicate(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT seq, frame FROM events WHERE session_id='s1' ORDER BY seq").fetchall()
    return proc.returncode, err, rows


def events(sizes: list[int]) -> tuple[bytes, list[bytes]]:
    """The append frames of events with these payload sizes (seq 1, 2, ...), and the events."""
    bodies = [b'{"n":%d,"pad":"%s"}' % (seq, b"x" * size) for seq, size in enumerate(sizes, 1)]
    return b"".join(pipe.encode_append("s1", seq, "tool.output", b) for seq, b in enumerate(bodies, 1)), bodies


def test_every_event_is_committed_whatever_the_reads_cut(tmp_path: Path) -> None:
    # 3 MiB events span several of the writer's 1 MiB reads; runs of small ones end and start mid-read.
    sizes = [3 * 1024 * 1024 if i % 400 == 7 else 100 + i % 97 for i in range(2000)]
    stream, bodies = events(sizes)
    code, err, rows = run_writer(tmp_path, CREATE + stream)
    assert code == 0, err
    assert rows == list(enumerate(bodies, 1))


def test_a_corrupt_stream_commits_what_came_before_and_ends_the_writer(tmp_path: Path) -> None:
    stream, bodies = events([200] * 50)
    garbage = b"\x00\x00\x00\x10\x09\x00" + b"z" * 16  # kind 9 does not exist
    after, _ = events([10] * 60)  # never read as frames: the stream has no resynchronisation point
    code, err, rows = run_writer(tmp_path, CREATE + stream + garbage + after)
    assert code == 0, err
    assert "corrupt request stream" in err and "unknown kind 9" in err
    assert rows == list(enumerate(bodies, 1))
