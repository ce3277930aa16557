"""The SQLite side of the store: schema, group commit, reads, retention.  Driven by ``writer_main``.

``SqliteWriter`` owns the only connection to the database file (nothing else ever opens it: POSIX locks
are per process, and a second connection from elsewhere is how hermes corrupted its ``state.db``).  It
does no pipe I/O: the process loop feeds it decoded frames (:meth:`submit`), asks it to commit
(:meth:`commit`) and sends the frames it returns, so its batching and SQL are tested with plain calls.

Writes are queued and applied in pipe order in one transaction per commit (group commit: the loop commits
whatever is queued, at most ``max_batch_rows`` rows or ``max_batch_bytes`` bytes at a time).  Requests are
answered after the commit that follows them, so a read sees every write sent before it.  A commit that
fails (disk full, I/O error) is rolled back and *kept*: nothing is acknowledged, the health reason is
reported, and the next commit retries the same writes.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import os
import sqlite3
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.store import pipe
from gateway.store.pipe import StoreOp
from gateway.wire import EventType
from workers.channel import Frame, Kind, control_frame

logger = logging.getLogger("worker_gateway.store")

DB_NAME = "store.db"
SCHEMA_VERSION = 1
CLOSED = "closed"
#: Session columns that ``update_session`` sets directly; any other field is merged into ``meta``.
SESSION_COLUMNS = ("status", "title", "agent", "cwd", "created_at", "last_active", "closed_at", "closed_reason")
#: Page size of a NEW database (SQLite's default is 4096).  A 64 KiB event on 4 KiB pages is a chain of 16
#: overflow pages, each its own WAL frame (header, checksum) and copied again by the checkpoint; on 64 KiB
#: pages it is one leaf cell plus one overflow page.  Measured (docs/store.md): the writer commits 64 KiB
#: events ~1.5-2x faster and 1 KiB events no slower.  An existing database keeps the page size it has.
NEW_DB_PAGE_SIZE = 65536
#: WAL bytes after which the writer checkpoints, *between* commits (:meth:`SqliteWriter.checkpoint`): the
#: acknowledgement of a commit is sent before the checkpoint runs, not after it (SQLite's own
#: autocheckpoint runs inside the COMMIT that crosses its bound, delaying that commit's DURABLE).
CHECKPOINT_BYTES = 16 * 1024 * 1024
#: SQLite's autocheckpoint stays on as a safety net only (WAL written by retention, an estimate that fell
#: short), at this bound; ``wal_autocheckpoint`` is in pages, so it is derived from the page size.
AUTOCHECKPOINT_BYTES = 4 * CHECKPOINT_BYTES
#: Pages a commit is counted to add to the WAL besides its rows' bytes (the events, index and sessions
#: b-tree pages it dirties): the estimate that decides when to checkpoint.
_PAGES_PER_COMMIT = 3
_OPS = {op.value: op for op in StoreOp}
_TURN_OPEN = {EventType.TURN_START.value: 1, EventType.TURN_COMPLETE.value: 0}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    session_id    TEXT PRIMARY KEY,
    status        TEXT NOT NULL DEFAULT 'idle',
    title         TEXT,
    agent         TEXT,
    cwd           TEXT,
    created_at    REAL NOT NULL,
    last_active   REAL NOT NULL,
    closed_at     REAL,
    closed_reason TEXT,
    last_seq      INTEGER NOT NULL DEFAULT 0,
    bytes         INTEGER NOT NULL DEFAULT 0,
    turn_running  INTEGER NOT NULL DEFAULT 0,
    meta          TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS events (
    session_id TEXT NOT NULL,
    seq        INTEGER NOT NULL,
    type       TEXT NOT NULL,
    frame      BLOB NOT NULL,
    UNIQUE (session_id, seq)
);
CREATE TABLE IF NOT EXISTS state (
    session_id  TEXT PRIMARY KEY,
    through_seq INTEGER NOT NULL,
    state       BLOB NOT NULL,
    saved_at    REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS purge (session_id TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS owner (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    gateway_id TEXT,
    epoch      INTEGER NOT NULL
);
"""


def check_session_fields(fields: Any, *, creating: bool) -> None:
    """Refuse session fields SQLite could not store as columns (ValueError), so that no queued write can
    fail every commit.  Fields that are not columns are kept as JSON and may be any JSON value."""
    if not isinstance(fields, dict):
        raise ValueError("session fields must be an object")
    if creating and not isinstance(fields.get("session_id"), str):
        raise ValueError("a new session needs a string session_id")
    for name in SESSION_COLUMNS:
        value = fields.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (str, int, float))):
            raise ValueError(f"session field {name!r} must be a string or a number, got {type(value).__name__}")


class OpenFailure(enum.Enum):
    CORRUPT = "corrupt"
    ERROR = "error"


class DatabaseOpenError(Exception):
    """The database could not be opened; ``kind`` says whether the file itself is bad."""

    def __init__(self, kind: OpenFailure, path: Path, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.path = path
        self.message = message


def recovery_command(path: Path) -> str:
    """What a user runs to salvage a corrupt file (sqlite3 >= 3.29)."""
    return f'sqlite3 {path} ".recover" | sqlite3 {path.with_name(path.name + ".recovered")}'


def open_database(path: Path, *, max_page_count: int | None = None) -> sqlite3.Connection:
    """Open (or create) the database in WAL mode with ``synchronous=FULL`` and the schema.

    A file that exists but is not a valid database raises :class:`DatabaseOpenError` (CORRUPT): it is the
    user's data, so it is never deleted or recreated.  ``max_page_count`` is a test hook that makes the
    file "full" at a small size."""
    existed = path.exists() and path.stat().st_size > 0
    try:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise DatabaseOpenError(OpenFailure.ERROR, path, f"cannot open {path}: {exc}") from exc
    try:
        if not existed:  # only before the first page is written; an existing file keeps its own
            conn.execute(f"PRAGMA page_size={NEW_DB_PAGE_SIZE}")
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise sqlite3.OperationalError(f"journal_mode is {mode!r}, WAL was refused")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=OFF")
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        conn.execute(f"PRAGMA wal_autocheckpoint={max(1, AUTOCHECKPOINT_BYTES // page_size)}")
        if existed:
            # Reading the schema touches the header and the schema b-tree: a damaged file fails here.
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        conn.executescript(_SCHEMA)
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        if max_page_count is not None:
            conn.execute(f"PRAGMA max_page_count={int(max_page_count)}")
    except sqlite3.DatabaseError as exc:
        conn.close()
        text = str(exc)
        corrupt = existed and (
            not isinstance(exc, sqlite3.OperationalError) or "malformed" in text or "not a database" in text
        )
        if corrupt:
            raise DatabaseOpenError(
                OpenFailure.CORRUPT,
                path,
                f"the session store {path} is corrupt ({exc}). It was left untouched. Stop the gateway, "
                f"recover it with: {recovery_command(path)} , then move the recovered file into place "
                f"(or move {path} away to start empty).",
            ) from exc
        raise DatabaseOpenError(OpenFailure.ERROR, path, f"cannot open {path}: {exc}") from exc
    return conn


@dataclass
class _Batch:
    """Writes queued since the last successful commit, in pipe order."""

    ops: list[tuple[StoreOp, Any]] = field(default_factory=list)
    rows: int = 0
    nbytes: int = 0

    def add(self, op: StoreOp, value: Any, nbytes: int) -> None:
        self.ops.append((op, value))
        self.rows += 1
        self.nbytes += nbytes


class SqliteWriter:
    """Schema, batching, reads and retention over one connection; returns the frames to send back."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        *,
        retention_s: float,
        max_bytes: int,
        max_batch_rows: int = 1024,
        max_batch_bytes: int = 8 * 1024 * 1024,
        purge_batch_rows: int = 2000,
        maintenance_every_s: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._conn = conn
        self._retention_s = retention_s
        self._max_bytes = max_bytes
        self._max_batch_rows = max_batch_rows
        self._max_batch_bytes = max_batch_bytes
        self._purge_batch_rows = purge_batch_rows
        self._maintenance_every_s = maintenance_every_s
        self._clock = clock
        self._batch = _Batch()
        self._requests: list[tuple[StoreOp, dict[str, Any]]] = []
        self._health: str | None = None
        self._next_maintenance = 0.0
        self._purging: set[str] = {r[0] for r in conn.execute("SELECT session_id FROM purge")}
        self._page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
        self._wal_bytes = 0  # estimated WAL bytes written since the last checkpoint
        self._db_fd = _open_for_advice(conn)

    # -- feeding ---------------------------------------------------------------------------------------

    @property
    def health(self) -> str | None:
        return self._health

    @property
    def batch_full(self) -> bool:
        """The loop should commit now rather than read more."""
        return self._batch.rows >= self._max_batch_rows or self._batch.nbytes >= self._max_batch_bytes

    @property
    def queued_bytes(self) -> int:
        return self._batch.nbytes

    @property
    def queued_writes(self) -> int:
        """Writes (rows) waiting for a commit: after a failed commit, the ones held for the retry."""
        return self._batch.rows

    @property
    def has_work(self) -> bool:
        return bool(self._batch.ops or self._requests)

    def submit(self, frame: Frame) -> None:
        """Queue one frame from the gateway (a write or a request).  Raises ValueError on a bad frame,
        before it is queued: a write that could never commit must not block the ones behind it."""
        try:
            self._submit(frame)
        except (struct.error, IndexError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"malformed {frame.name!r} frame: {exc}") from exc

    def _submit(self, frame: Frame) -> None:
        if frame.name == StoreOp.APPEND and frame.kind is Kind.EVENT:  # the hot path: one per event
            row = pipe.decode_append(frame.body)
            batch = self._batch
            batch.ops.append((StoreOp.APPEND, row))
            batch.rows += 1
            batch.nbytes += len(row[3])
            return
        op = _OPS.get(frame.name)
        if op is None:
            raise ValueError(f"unknown store operation {frame.name!r}")
        if frame.kind is Kind.EVENT:
            if op is StoreOp.PUT_STATE:
                sid, through, state = pipe.decode_put_state(frame.body)
                self._batch.add(op, (sid, through, state), len(state))
            else:
                raise ValueError(f"unexpected EVENT frame {frame.name!r}")
            return
        body = frame.json()
        if op is StoreOp.CREATE_SESSION:
            check_session_fields(body["meta"], creating=True)
            self._batch.add(op, body, 0)
        elif op is StoreOp.UPDATE_SESSION:
            if not isinstance(body["session_id"], str):
                raise ValueError("session_id must be a string")
            check_session_fields(body["fields"], creating=False)
            self._batch.add(op, body, 0)
        else:
            self._requests.append((op, body))

    # -- committing ------------------------------------------------------------------------------------

    def commit(self) -> list[bytes]:
        """Commit the queued writes in one transaction, then answer the queued requests.

        Returns the frames for the gateway: DURABLE (highest committed seq per session), HEALTH when it
        changes, the answers.  On failure the writes stay queued for the next call."""
        out: list[bytes] = []
        if self._batch.ops:
            try:
                durable = self._apply(self._batch.ops)
            except sqlite3.Error as exc:
                self._rollback()
                out.extend(self._set_health(_reason(exc)))
            else:
                self._wal_bytes += self._batch.nbytes + _PAGES_PER_COMMIT * self._page_size
                self._batch = _Batch()
                out.extend(self._set_health(None))
                if durable:
                    out.append(control_frame(StoreOp.DURABLE, durable))
        out.extend(self.answer_requests())
        return out

    @property
    def checkpoint_due(self) -> bool:
        """The WAL has grown by about :data:`CHECKPOINT_BYTES` since the last checkpoint."""
        return self._wal_bytes >= CHECKPOINT_BYTES

    def checkpoint(self) -> None:
        """Copy the WAL into the database (PASSIVE: never waits, there is no other connection anyway), so
        the WAL restarts from its beginning at the next commit instead of growing.  Run by the loop after
        a commit's answers are sent, or when idle.  A failure is left for the next one (the WAL is durable
        on its own: a checkpoint is never needed for safety).

        Then the database file's pages leave the page cache (``POSIX_FADV_DONTNEED``; they are clean: the
        checkpoint synced them).  The log is written once and rarely read back, and kept cached it grows
        the page cache by every byte streamed, each page new memory; dropped, the next checkpoint reuses
        the freed pages.  Measured (docs/store.md), on a VM whose memory is backed on first touch: 69-82
        instead of 104-198 us of writer CPU per 64 KiB event."""
        if not self._wal_bytes:
            return
        try:
            busy, _, _ = self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as exc:
            logger.warning("store: checkpoint failed (will retry): %s", exc)
            return
        self._wal_bytes = 0
        if self._db_fd is not None and not busy:
            with contextlib.suppress(OSError):
                os.posix_fadvise(self._db_fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def answer_requests(self) -> list[bytes]:
        """Answer the queued requests from what is committed (also while writes fail)."""
        out: list[bytes] = []
        requests, self._requests = self._requests, []
        for op, body in requests:
            out.extend(self._answer(op, body))
        return out

    def _apply(self, ops: list[tuple[StoreOp, Any]]) -> dict[str, int]:
        conn = self._conn
        now = self._clock()
        durable: dict[str, int] = {}
        stats: dict[str, list[int]] = {}  # session -> [max seq, bytes, turn state (-1 = unchanged)]
        rows: list[tuple[str, int, str, bytes]] = []
        conn.execute("BEGIN IMMEDIATE")
        for op, value in ops:
            if op is StoreOp.APPEND:
                rows.append(value)
                sid, seq, event_type, data = value
                st = stats.get(sid)
                if st is None:
                    st = stats[sid] = [0, 0, -1]
                if seq > st[0]:
                    st[0] = seq
                st[1] += len(data)
                if event_type in _TURN_OPEN:
                    st[2] = _TURN_OPEN[event_type]
                continue
            if rows:
                self._insert_events(rows)
                rows = []
            if op is StoreOp.PUT_STATE:
                sid, through, state = value
                conn.execute(
                    "INSERT INTO state (session_id, through_seq, state, saved_at) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT(session_id) DO UPDATE SET through_seq=excluded.through_seq, "
                    "state=excluded.state, saved_at=excluded.saved_at",
                    (sid, through, state, now),
                )
            elif op is StoreOp.CREATE_SESSION:
                self._create_session(value.get("meta") or {}, now)
            elif op is StoreOp.UPDATE_SESSION:
                self._update_session(value["session_id"], value.get("fields") or {})
        if rows:
            self._insert_events(rows)
        for sid, (max_seq, nbytes, turn) in stats.items():
            conn.execute(
                "INSERT INTO sessions (session_id, created_at, last_active, last_seq, bytes, turn_running) "
                "VALUES (?, ?, ?, ?, ?, MAX(?, 0)) ON CONFLICT(session_id) DO UPDATE SET "
                "last_seq=MAX(last_seq, excluded.last_seq), bytes=bytes+excluded.bytes, "
                "turn_running=CASE WHEN ? < 0 THEN turn_running ELSE ? END",
                (sid, now, now, max_seq, nbytes, turn, turn, turn),
            )
            durable[sid] = max_seq
        conn.execute("COMMIT")
        return durable

    def _insert_events(self, rows: list[tuple[str, int, str, bytes]]) -> None:
        before = self._conn.total_changes
        # A duplicate (session, seq) keeps the row already stored: the gateway resent what was committed.
        self._conn.executemany(
            "INSERT INTO events (session_id, seq, type, frame) VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING", rows
        )
        skipped = len(rows) - (self._conn.total_changes - before)
        if skipped:
            logger.warning("store: %d appended events repeated a stored (session, seq) and were ignored", skipped)

    def _create_session(self, meta: dict[str, Any], now: float) -> None:
        sid = str(meta["session_id"])
        if sid in self._purging:
            self._purge_all(sid)
        cols = {c: meta[c] for c in SESSION_COLUMNS if c in meta}
        cols.setdefault("created_at", now)
        cols.setdefault("last_active", now)
        extra = {k: v for k, v in meta.items() if k not in SESSION_COLUMNS and k != "session_id"}
        names = ["session_id", *cols, "meta"]
        values = [sid, *cols.values(), json.dumps(extra)]
        updates = ", ".join(f"{c}=excluded.{c}" for c in names[1:])
        self._conn.execute(
            f"INSERT INTO sessions ({', '.join(names)}) VALUES ({', '.join('?' * len(names))}) "
            f"ON CONFLICT(session_id) DO UPDATE SET {updates}",
            values,
        )

    def _update_session(self, sid: str, fields: dict[str, Any]) -> None:
        cols = {c: fields[c] for c in SESSION_COLUMNS if c in fields}
        if "status" in cols and "closed_at" not in cols:  # closing starts retention; reopening ends it
            cols["closed_at"] = self._clock() if cols["status"] == CLOSED else None
        extra = {k: v for k, v in fields.items() if k not in SESSION_COLUMNS}
        sets = [f"{c}=?" for c in cols]
        values: list[Any] = list(cols.values())
        if extra:
            sets.append("meta=json_patch(meta, ?)")
            values.append(json.dumps(extra))
        if sets:
            self._conn.execute(f"UPDATE sessions SET {', '.join(sets)} WHERE session_id=?", (*values, sid))

    def _rollback(self) -> None:
        try:
            self._conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # SQLite already rolled the transaction back (it does on SQLITE_FULL in some paths)

    def _set_health(self, reason: str | None) -> list[bytes]:
        if reason == self._health:
            return []
        self._health = reason
        if reason is None:
            logger.warning("store: writes work again")
        else:
            logger.error("store: writes fail, nothing is acknowledged until they work again: %s", reason)
        return [control_frame(StoreOp.HEALTH, {"reason": reason})]

    # -- requests --------------------------------------------------------------------------------------

    def _answer(self, op: StoreOp, body: dict[str, Any]) -> list[bytes]:
        request_id = int(body.get("id", 0))
        out: list[bytes] = []
        try:
            value = self._request(op, body, request_id, out)
        except (sqlite3.Error, KeyError, TypeError, ValueError) as exc:
            return [control_frame(StoreOp.RESULT, {"id": request_id, "ok": False, "error": _reason(exc)})]
        out.append(control_frame(StoreOp.RESULT, {"id": request_id, "ok": True, "value": value}))
        return out

    def _request(self, op: StoreOp, body: dict[str, Any], request_id: int, out: list[bytes]) -> Any:
        conn = self._conn
        if op is StoreOp.READ_EVENTS:
            sid = body["session_id"]
            if sid in self._purging:
                return 0
            max_events, max_bytes = int(body["max_events"]), int(body["max_bytes"])
            count = size = 0
            cursor = conn.execute(
                "SELECT seq, frame FROM events WHERE session_id=? AND seq>? ORDER BY seq LIMIT ?",
                (sid, int(body["after_seq"]), max(1, max_events)),
            )
            for seq, frame in cursor:
                if count and size + len(frame) > max_bytes:
                    break  # always at least one event, so a reader can never be stuck on a large one
                out.append(pipe.encode_row(request_id, seq, frame))
                count += 1
                size += len(frame)
            cursor.close()
            return count
        if op is StoreOp.GET_STATE:
            row = conn.execute("SELECT state FROM state WHERE session_id=?", (body["session_id"],)).fetchone()
            if row is None:
                return False
            out.append(pipe.encode_state_row(request_id, row[0]))
            return True
        if op is StoreOp.GET_SESSION:
            cursor = conn.execute("SELECT * FROM sessions WHERE session_id=?", (body["session_id"],))
            row = cursor.fetchone()
            return None if row is None else _session_dict(cursor.description, row)
        if op is StoreOp.LIST_SESSIONS:
            where = "" if body.get("include_closed") else f"WHERE status != '{CLOSED}'"
            cursor = conn.execute(
                f"SELECT * FROM sessions {where} ORDER BY last_active DESC, rowid DESC LIMIT ?", (int(body["limit"]),)
            )
            return [_session_dict(cursor.description, row) for row in cursor]
        if op is StoreOp.RECOVER:
            cursor = conn.execute(f"SELECT * FROM sessions WHERE status != '{CLOSED}' ORDER BY last_active DESC")
            return [_session_dict(cursor.description, row) for row in cursor]
        if op is StoreOp.DELETE_SESSION:
            sid = body["session_id"]
            conn.execute("BEGIN IMMEDIATE")
            try:
                existed = conn.execute("DELETE FROM sessions WHERE session_id=?", (sid,)).rowcount > 0
                conn.execute("DELETE FROM state WHERE session_id=?", (sid,))
                conn.execute("INSERT OR IGNORE INTO purge (session_id) VALUES (?)", (sid,))
                conn.execute("COMMIT")
            except sqlite3.Error:
                self._rollback()
                raise
            self._purging.add(sid)  # its events go in batches (maintenance_step), reads see none now
            return existed
        if op is StoreOp.CLAIM:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute(
                    "INSERT INTO owner (id, gateway_id, epoch) VALUES (1, ?, 1) ON CONFLICT(id) DO UPDATE "
                    "SET gateway_id=excluded.gateway_id, epoch=epoch+1",
                    (str(body["gateway_id"]),),
                )
                epoch = conn.execute("SELECT epoch FROM owner WHERE id=1").fetchone()[0]
                conn.execute("COMMIT")
            except sqlite3.Error:
                self._rollback()
                raise
            return epoch
        if op is StoreOp.CLOSE:
            return True
        raise ValueError(f"unknown store operation {op!r}")

    # -- retention -------------------------------------------------------------------------------------

    def maintenance_due(self) -> bool:
        return bool(self._purging) or self._clock() >= self._next_maintenance

    def maintenance_step(self) -> bool:
        """One small retention transaction: purge a batch of a deleted or expired session's events, or
        (every ``maintenance_every_s``) expire closed sessions by age and evict oldest-first over the size
        cap.  Returns True while more work is left.  Never VACUUMs: freed pages are reused."""
        try:
            if self._purging:
                return self._purge_step() or bool(self._purging)
            if self._clock() < self._next_maintenance:
                return False
            self._next_maintenance = self._clock() + self._maintenance_every_s
            return self._expire()
        except sqlite3.Error as exc:
            self._rollback()
            logger.warning("store: retention step failed (will retry): %s", exc)
            return False

    def _purge_step(self) -> bool:
        sid = next(iter(self._purging))
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        deleted = conn.execute(
            "DELETE FROM events WHERE rowid IN (SELECT rowid FROM events WHERE session_id=? LIMIT ?)",
            (sid, self._purge_batch_rows),
        ).rowcount
        done = deleted < self._purge_batch_rows
        if done:
            conn.execute("DELETE FROM purge WHERE session_id=?", (sid,))
        conn.execute("COMMIT")
        if done:
            self._purging.discard(sid)
        return True

    def _purge_all(self, sid: str) -> None:
        """Inside a transaction: a session id is reused while its old events still wait for purging."""
        self._conn.execute("DELETE FROM events WHERE session_id=?", (sid,))
        self._conn.execute("DELETE FROM purge WHERE session_id=?", (sid,))
        self._purging.discard(sid)

    def _expire(self) -> bool:
        conn = self._conn
        cutoff = self._clock() - self._retention_s
        doomed = [
            r[0]
            for r in conn.execute(
                f"SELECT session_id FROM sessions WHERE status='{CLOSED}' AND COALESCE(closed_at, last_active) < ?",
                (cutoff,),
            )
        ]
        total = conn.execute("SELECT COALESCE(SUM(bytes), 0) FROM sessions").fetchone()[0]
        total -= sum(
            r[0]
            for r in conn.execute(
                "SELECT bytes FROM sessions WHERE session_id IN (SELECT value FROM json_each(?))", (json.dumps(doomed),)
            )
        )
        if total > self._max_bytes:
            for sid, nbytes in conn.execute(
                f"SELECT session_id, bytes FROM sessions WHERE status='{CLOSED}' "
                "ORDER BY COALESCE(closed_at, last_active), rowid"
            ):
                if total <= self._max_bytes:
                    break
                if sid not in doomed:
                    doomed.append(sid)
                    total -= nbytes
        trimmed = False
        if doomed:
            self._move_to_purge(doomed)
        elif total > self._max_bytes:
            trimmed = self._trim_oldest_events()
        return bool(doomed) or trimmed

    def _move_to_purge(self, session_ids: list[str]) -> None:
        conn = self._conn
        ids = json.dumps(session_ids)
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT OR IGNORE INTO purge (session_id) SELECT value FROM json_each(?)", (ids,))
        conn.execute("DELETE FROM sessions WHERE session_id IN (SELECT value FROM json_each(?))", (ids,))
        conn.execute("DELETE FROM state WHERE session_id IN (SELECT value FROM json_each(?))", (ids,))
        conn.execute("COMMIT")
        self._purging.update(session_ids)
        logger.info("store: retention removes %d closed session(s)", len(session_ids))

    def _trim_oldest_events(self) -> bool:
        """Only live sessions are left and they exceed the cap: drop the oldest events (a resume from
        before them gets ``replay.truncated``) rather than refusing new ones."""
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        rows = conn.execute(
            "SELECT rowid, session_id, length(frame) FROM events ORDER BY rowid LIMIT ?", (self._purge_batch_rows,)
        ).fetchall()
        per_session: dict[str, int] = {}
        for _rowid, sid, size in rows:
            per_session[sid] = per_session.get(sid, 0) + size
        conn.executemany("DELETE FROM events WHERE rowid=?", [(r[0],) for r in rows])
        conn.executemany(
            "UPDATE sessions SET bytes=MAX(0, bytes-?) WHERE session_id=?", [(n, s) for s, n in per_session.items()]
        )
        conn.execute("COMMIT")
        if rows:
            self._next_maintenance = 0.0  # check the cap again at the next step
        return bool(rows)

    def close(self) -> None:
        try:
            self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error:
            pass
        self._conn.close()
        if self._db_fd is not None:
            os.close(self._db_fd)
            self._db_fd = None


def _open_for_advice(conn: sqlite3.Connection) -> int | None:
    """A read-only fd on the database file, for page-cache advice (None for an in-memory database)."""
    path = next((row[2] for row in conn.execute("PRAGMA database_list") if row[1] == "main"), "")
    if not path:
        return None
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


def _session_dict(description: Any, row: tuple[Any, ...]) -> dict[str, Any]:
    record = dict(zip((d[0] for d in description), row, strict=False))
    meta = json.loads(record.pop("meta") or "{}")
    record["turn_running"] = bool(record["turn_running"])
    return {**meta, **record}


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, sqlite3.Error) and "full" in text:
        return f"disk full: {text}"
    if isinstance(exc, sqlite3.Error) and ("I/O" in text or "disk I/O" in text):
        return f"I/O error: {text}"
    return text


def database_path(state_dir: Path) -> Path:
    return Path(os.fspath(state_dir)) / DB_NAME
