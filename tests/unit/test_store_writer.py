"""SqliteWriter: the store's SQL, group commit, reads and retention, driven by plain calls (no process)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from gateway.store import pipe
from gateway.store.pipe import StoreOp
from gateway.store.sqlite_writer import (
    DatabaseOpenError, OpenFailure, SqliteWriter, database_path, open_database)
from workers.channel import Frame, FrameDecoder, Kind, control_frame


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def frames(data: bytes | list[bytes]) -> list[Frame]:
    return FrameDecoder().feed(b"".join(data) if isinstance(data, list) else data)


def submit(writer: SqliteWriter, data: bytes) -> None:
    for frame in frames(data):
        writer.submit(frame)


def controls(out: list[bytes], name: StoreOp) -> list[Any]:
    return [f.json() for f in frames(out) if f.kind is Kind.CONTROL and f.name == name]


def make(tmp_path: Path, clock: Clock | None = None, **kw: Any) -> SqliteWriter:
    conn = open_database(database_path(tmp_path), max_page_count=kw.pop("max_page_count", None))
    kw.setdefault("retention_s", 3600.0)
    kw.setdefault("max_bytes", 1 << 30)
    return SqliteWriter(conn, clock=clock or Clock(), **kw)


def append(writer: SqliteWriter, sid: str, seqs: range, etype: str = "message.delta", size: int = 10) -> None:
    for seq in seqs:
        submit(writer, pipe.encode_append(sid, seq, etype, b"%d:" % seq + b"x" * size))


def request(writer: SqliteWriter, op: StoreOp, **body: Any) -> tuple[Any, list[Frame]]:
    submit(writer, control_frame(op, {"id": 7, **body}))
    out = frames(writer.commit())
    result = [f.json() for f in out if f.name == StoreOp.RESULT]
    assert len(result) == 1 and result[0]["id"] == 7, out
    assert result[0]["ok"], result[0]
    return result[0]["value"], [f for f in out if f.kind is Kind.EVENT]


def read_all(writer: SqliteWriter, sid: str, after: int = 0) -> list[int]:
    _count, rows = request(writer, StoreOp.READ_EVENTS, session_id=sid, after_seq=after, max_events=10**6,
                           max_bytes=1 << 30)
    return [pipe.decode_row(r.body)[1] for r in rows]


def test_one_commit_acknowledges_the_highest_seq_of_each_session(tmp_path: Path) -> None:
    writer = make(tmp_path)
    append(writer, "a", range(1, 6))
    append(writer, "b", range(1, 3))
    out = writer.commit()
    assert controls(out, StoreOp.DURABLE) == [{"a": 5, "b": 2}]
    assert not writer.has_work
    assert writer.commit() == []  # nothing queued: no empty acknowledgement


def test_batch_is_full_at_the_row_bound(tmp_path: Path) -> None:
    writer = make(tmp_path, max_batch_rows=100)
    append(writer, "a", range(1, 100))
    assert not writer.batch_full
    append(writer, "a", range(100, 101))
    assert writer.batch_full
    writer.commit()
    assert not writer.batch_full


def test_batch_is_full_at_the_byte_bound(tmp_path: Path) -> None:
    writer = make(tmp_path, max_batch_bytes=64 * 1024)
    append(writer, "a", range(1, 3), size=40 * 1024)
    assert writer.batch_full and writer.queued_bytes >= 64 * 1024


def test_frames_are_stored_byte_identical_and_read_in_order(tmp_path: Path) -> None:
    writer = make(tmp_path)
    payloads = {seq: json.dumps({"seq": seq, "text": "é\u2028\x00" * seq}).encode() for seq in range(1, 30)}
    for seq, data in payloads.items():
        submit(writer, pipe.encode_append("a", seq, "message.delta", data))
    writer.commit()
    _count, rows = request(writer, StoreOp.READ_EVENTS, session_id="a", after_seq=0, max_events=100,
                           max_bytes=1 << 20)
    assert [pipe.decode_row(r.body)[1:] for r in rows] == list(payloads.items())


def test_read_is_bounded_by_events_and_bytes_but_returns_at_least_one(tmp_path: Path) -> None:
    writer = make(tmp_path)
    append(writer, "a", range(1, 51), size=1000)
    count, rows = request(writer, StoreOp.READ_EVENTS, session_id="a", after_seq=10, max_events=5, max_bytes=1 << 20)
    assert count == 5 and [pipe.decode_row(r.body)[1] for r in rows] == [11, 12, 13, 14, 15]
    count, rows = request(writer, StoreOp.READ_EVENTS, session_id="a", after_seq=0, max_events=100, max_bytes=3000)
    assert count == 2
    count, rows = request(writer, StoreOp.READ_EVENTS, session_id="a", after_seq=0, max_events=100, max_bytes=1)
    assert count == 1  # larger than the bound, still returned: a reader is never stuck
    assert request(writer, StoreOp.READ_EVENTS, session_id="a", after_seq=50, max_events=9, max_bytes=9)[0] == 0


def test_a_read_sees_the_writes_sent_before_it(tmp_path: Path) -> None:
    writer = make(tmp_path)
    append(writer, "a", range(1, 4))  # not committed yet
    assert read_all(writer, "a") == [1, 2, 3]


def test_repeated_seq_keeps_the_stored_frame(tmp_path: Path) -> None:
    writer = make(tmp_path)
    submit(writer, pipe.encode_append("a", 1, "message.delta", b"first"))
    writer.commit()
    submit(writer, pipe.encode_append("a", 1, "message.delta", b"second"))
    assert controls(writer.commit(), StoreOp.DURABLE) == [{"a": 1}]
    _count, rows = request(writer, StoreOp.READ_EVENTS, session_id="a", after_seq=0, max_events=9, max_bytes=99)
    assert [pipe.decode_row(r.body)[2] for r in rows] == [b"first"]


def test_state_newest_wins(tmp_path: Path) -> None:
    writer = make(tmp_path)
    assert request(writer, StoreOp.GET_STATE, session_id="a")[0] is False
    submit(writer, pipe.encode_put_state("a", 3, b'{"turns": 1}'))
    submit(writer, pipe.encode_put_state("a", 9, b'{"turns": 2}'))
    found, rows = request(writer, StoreOp.GET_STATE, session_id="a")
    assert found is True and [pipe.decode_state_row(r.body)[1] for r in rows] == [b'{"turns": 2}']


def test_sessions_listed_newest_activity_first_with_meta_and_last_seq(tmp_path: Path) -> None:
    writer = make(tmp_path)
    for n, sid in enumerate(("old", "mid", "new")):
        submit(writer, control_frame(StoreOp.CREATE_SESSION, {"meta": {
            "session_id": sid, "agent": "echo", "last_active": 100.0 + n, "close_on_disconnect": n == 1}}))
    append(writer, "mid", range(1, 8))
    submit(writer, control_frame(StoreOp.UPDATE_SESSION, {"session_id": "old", "fields": {
        "status": "closed", "closed_reason": "client", "options": {"k": 1}}}))
    listed, _ = request(writer, StoreOp.LIST_SESSIONS, limit=10, include_closed=True)
    assert [s["session_id"] for s in listed] == ["new", "mid", "old"]
    mid, old = listed[1], listed[2]
    assert mid["last_seq"] == 7 and mid["close_on_disconnect"] is True and mid["agent"] == "echo"
    assert old["status"] == "closed" and old["closed_reason"] == "client" and old["options"] == {"k": 1}
    assert old["closed_at"] is not None
    assert [s["session_id"] for s in request(writer, StoreOp.LIST_SESSIONS, limit=10, include_closed=False)[0]] \
        == ["new", "mid"]
    assert len(request(writer, StoreOp.LIST_SESSIONS, limit=1, include_closed=True)[0]) == 1


def test_recover_reports_live_sessions_and_open_turns(tmp_path: Path) -> None:
    writer = make(tmp_path)
    for sid in ("done", "running", "closed"):
        submit(writer, control_frame(StoreOp.CREATE_SESSION, {"meta": {"session_id": sid}}))
    append(writer, "done", range(1, 2), "turn.start")
    append(writer, "done", range(2, 3), "turn.complete")
    append(writer, "running", range(1, 2), "turn.start")
    append(writer, "running", range(2, 5), "message.delta")
    submit(writer, control_frame(StoreOp.UPDATE_SESSION, {"session_id": "closed", "fields": {"status": "closed"}}))
    live, _ = request(writer, StoreOp.RECOVER)
    by_id = {s["session_id"]: s for s in live}
    assert set(by_id) == {"done", "running"}
    assert by_id["running"]["turn_running"] is True and by_id["running"]["last_seq"] == 4
    assert by_id["done"]["turn_running"] is False and by_id["done"]["last_seq"] == 2


def test_delete_hides_at_once_and_purges_events_in_batches(tmp_path: Path) -> None:
    writer = make(tmp_path, purge_batch_rows=10)
    submit(writer, control_frame(StoreOp.CREATE_SESSION, {"meta": {"session_id": "a"}}))
    append(writer, "a", range(1, 36))
    submit(writer, pipe.encode_put_state("a", 35, b"{}"))
    writer.commit()
    assert request(writer, StoreOp.DELETE_SESSION, session_id="a")[0] is True
    assert read_all(writer, "a") == []
    assert request(writer, StoreOp.GET_STATE, session_id="a")[0] is False
    assert request(writer, StoreOp.LIST_SESSIONS, limit=9, include_closed=True)[0] == []
    steps = 0
    while writer.maintenance_step():
        steps += 1
        assert steps < 100
    assert steps >= 4  # 35 rows in batches of 10
    conn = writer._conn
    assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 0
    assert conn.execute("SELECT count(*) FROM purge").fetchone()[0] == 0
    assert request(writer, StoreOp.DELETE_SESSION, session_id="a")[0] is False


def test_closed_sessions_expire_after_the_retention_period(tmp_path: Path) -> None:
    clock = Clock()
    writer = make(tmp_path, clock, retention_s=100.0, maintenance_every_s=1.0)
    for sid in ("closed", "live"):
        submit(writer, control_frame(StoreOp.CREATE_SESSION, {"meta": {"session_id": sid}}))
        append(writer, sid, range(1, 4))
    submit(writer, control_frame(StoreOp.UPDATE_SESSION, {"session_id": "closed", "fields": {"status": "closed"}}))
    writer.commit()
    clock.now += 50
    while writer.maintenance_step():
        pass
    assert len(request(writer, StoreOp.LIST_SESSIONS, limit=9, include_closed=True)[0]) == 2
    clock.now += 51
    while writer.maintenance_step():
        pass
    assert [s["session_id"] for s in request(writer, StoreOp.LIST_SESSIONS, limit=9, include_closed=True)[0]] \
        == ["live"]
    assert read_all(writer, "closed") == [] and read_all(writer, "live") == [1, 2, 3]


def test_size_cap_evicts_oldest_closed_sessions_first(tmp_path: Path) -> None:
    clock = Clock()
    writer = make(tmp_path, clock, max_bytes=25_000, maintenance_every_s=0.0)
    for n, sid in enumerate(("closed-old", "live-old", "closed-new")):
        submit(writer, control_frame(StoreOp.CREATE_SESSION, {"meta": {"session_id": sid}}))
        append(writer, sid, range(1, 11), size=1000)  # ~10 kB each, 30 kB in all
        if sid.startswith("closed"):
            submit(writer, control_frame(StoreOp.UPDATE_SESSION, {"session_id": sid, "fields": {
                "status": "closed", "closed_at": clock.now + n}}))
    writer.commit()
    while writer.maintenance_step():
        pass
    kept = {s["session_id"] for s in request(writer, StoreOp.LIST_SESSIONS, limit=9, include_closed=True)[0]}
    assert kept == {"live-old", "closed-new"}
    assert read_all(writer, "closed-old") == []


def test_size_cap_with_only_live_sessions_trims_their_oldest_events(tmp_path: Path) -> None:
    writer = make(tmp_path, max_bytes=5_000, maintenance_every_s=0.0, purge_batch_rows=3)
    append(writer, "live", range(1, 11), size=1000)
    writer.commit()
    while writer.maintenance_step():
        pass
    seqs = read_all(writer, "live")
    assert seqs == list(range(seqs[0], 11)) and seqs[0] > 1  # newest kept, contiguous
    stored = writer._conn.execute("SELECT bytes FROM sessions WHERE session_id='live'").fetchone()[0]
    assert stored <= 5_000


def test_failed_commit_acknowledges_nothing_and_retries_the_same_writes(tmp_path: Path) -> None:
    writer = make(tmp_path, max_page_count=40)
    append(writer, "a", range(1, 3))
    assert controls(writer.commit(), StoreOp.DURABLE) == [{"a": 2}]
    append(writer, "a", range(3, 400), size=20000)  # ~8 MB: far past 40 pages of 64 KiB
    out = writer.commit()
    assert controls(out, StoreOp.DURABLE) == []
    [health] = controls(out, StoreOp.HEALTH)
    assert "full" in health["reason"] and writer.health == health["reason"]
    assert writer.has_work  # kept, not dropped
    assert read_all(writer, "a") == [1, 2]  # reads still answered, from what is committed
    assert controls(writer.commit(), StoreOp.HEALTH) == []  # the same failure is reported once
    writer._conn.execute("PRAGMA max_page_count=1000000")  # space returns
    out = writer.commit()
    assert controls(out, StoreOp.HEALTH) == [{"reason": None}]
    assert controls(out, StoreOp.DURABLE) == [{"a": 399}]
    assert read_all(writer, "a") == list(range(1, 400))


def test_claim_epoch_grows_by_one_and_persists(tmp_path: Path) -> None:
    writer = make(tmp_path)
    assert request(writer, StoreOp.CLAIM, gateway_id="g1")[0] == 1
    assert request(writer, StoreOp.CLAIM, gateway_id="g2")[0] == 2
    writer.close()
    assert request(make(tmp_path), StoreOp.CLAIM, gateway_id="g1")[0] == 3


def test_a_bad_request_gets_an_error_answer_not_a_crash(tmp_path: Path) -> None:
    writer = make(tmp_path)
    submit(writer, control_frame(StoreOp.READ_EVENTS, {"id": 3, "session_id": "a"}))
    [result] = controls(writer.commit(), StoreOp.RESULT)
    assert result["id"] == 3 and result["ok"] is False and result["error"]
    with pytest.raises(ValueError):
        writer.submit(Frame(Kind.CONTROL, "no_such_op", b"{}"))


def test_a_corrupt_file_is_refused_untouched_with_the_recovery_command(tmp_path: Path) -> None:
    path = database_path(tmp_path)
    garbage = b"this is not an sqlite database\n" * 200
    path.write_bytes(garbage)
    with pytest.raises(DatabaseOpenError) as err:
        open_database(path)
    assert err.value.kind is OpenFailure.CORRUPT
    assert str(path) in err.value.message and ".recover" in err.value.message
    assert path.read_bytes() == garbage


def test_database_uses_wal_and_full_sync(tmp_path: Path) -> None:
    conn = open_database(database_path(tmp_path))
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    conn.close()
    # The file is a plain SQLite database other tools can read (backups, inspection).
    with sqlite3.connect(database_path(tmp_path)) as other:
        assert {"sessions", "events", "state"} <= {r[0] for r in other.execute("SELECT name FROM sqlite_master")}


@pytest.mark.parametrize("body", [
    {"meta": {"agent": "echo"}},  # no session_id
    {"meta": {"session_id": "a", "title": {"not": "a column value"}}},
    {"meta": {"session_id": "a", "last_active": True}},
    {"meta": "not an object"},
])
def test_a_session_row_that_could_never_commit_is_refused_before_it_is_queued(tmp_path: Path,
                                                                              body: dict) -> None:
    writer = make(tmp_path)
    with pytest.raises(ValueError):
        writer.submit(frames(control_frame(StoreOp.CREATE_SESSION, body))[0])
    append(writer, "a", range(1, 3))
    assert controls(writer.commit(), StoreOp.DURABLE) == [{"a": 2}]  # the writes behind it still commit


def test_truncated_append_is_a_value_error(tmp_path: Path) -> None:
    writer = make(tmp_path)
    with pytest.raises(ValueError):
        writer.submit(Frame(Kind.EVENT, StoreOp.APPEND, b"\x00"))


def test_reopening_a_closed_session_ends_its_retention_clock(tmp_path: Path) -> None:
    writer = make(tmp_path)
    submit(writer, control_frame(StoreOp.CREATE_SESSION, {"meta": {"session_id": "a"}}))
    submit(writer, control_frame(StoreOp.UPDATE_SESSION, {"session_id": "a", "fields": {"status": "closed"}}))
    [row] = request(writer, StoreOp.LIST_SESSIONS, limit=9, include_closed=True)[0]
    assert row["closed_at"] is not None
    submit(writer, control_frame(StoreOp.UPDATE_SESSION, {"session_id": "a", "fields": {"status": "idle"}}))
    [row] = request(writer, StoreOp.LIST_SESSIONS, limit=9, include_closed=True)[0]
    assert row["status"] == "idle" and row["closed_at"] is None


@given(sid=st.text(min_size=1, max_size=40), seq=st.integers(0, 2**63), etype=st.text(max_size=30),
       data=st.binary(max_size=2000))
def test_pipe_bodies_round_trip(sid: str, seq: int, etype: str, data: bytes) -> None:
    assume(len(etype.encode()) <= 255)
    [f] = frames(pipe.encode_append(sid, seq, etype, data))
    assert (f.kind, f.name) == (Kind.EVENT, StoreOp.APPEND)
    assert pipe.decode_append(f.body) == (sid, seq, etype, data)
    [f] = frames(pipe.encode_put_state(sid, seq, data))
    assert pipe.decode_put_state(f.body) == (sid, seq, data)
    [f] = frames(pipe.encode_row(7, seq, data))
    assert pipe.decode_row(f.body) == (7, seq, data)
    [f] = frames(pipe.encode_state_row(9, data))
    assert pipe.decode_state_row(f.body) == (9, data)
