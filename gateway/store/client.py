"""The gateway side of the session store: a non-blocking handle on the writer process.

:class:`EventStore` lives on the gateway's event loop and never touches the database: every call becomes
a frame on the writer's pipe (``gateway/store/pipe.py``), and answers come back on a second pipe, read by
one pump task.  Writes (``create_session``, ``append``, ``put_state``...) return at once; the writer
commits them in groups and reports each commit through ``on_durable``, which is what lets the gateway
send an event to a client only once it is on disk.  Reads are awaited and come in bounded pieces.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.config import Config, store_state_dir
from gateway.store import pipe
from gateway.store.errors import StoreCorrupt, StoreError
from gateway.store.lock import acquire_lock, prepare_state_dir
from gateway.store.pipe import StoreOp
from gateway.store.sqlite_writer import check_session_fields, database_path
from workers.channel import (
    ChannelError,
    Frame,
    FrameReader,
    FrameWriter,
    Kind,
    control_frame,
    open_frame_reader,
    open_frame_writer,
)

logger = logging.getLogger("worker_gateway.store")

#: Bytes of requests the gateway buffers for a writer that is behind; past it ``append`` raises
#: :class:`StoreError` (the caller's backpressure on ``pending_bytes`` should stop it well before).
DEFAULT_MAX_WRITE_BUFFER = 64 * 1024 * 1024
#: Capacity asked for the request pipe (see ``_widen_pipe``).
PIPE_BYTES = 1024 * 1024
#: Frames queued within one loop iteration go to the pipe in one write at its end (one syscall and one
#: copy for a whole burst of events, not one per event); a burst this large is written at once.
OUTBOX_FLUSH_BYTES = 1024 * 1024


class EventStore:
    """The durable event log, agent state and session table of one gateway.  Create with :meth:`open`."""

    def __init__(
        self,
        *,
        state_dir: Path,
        lock_fd: int,
        process: subprocess.Popen[bytes],
        reader: FrameReader,
        writer: FrameWriter,
        on_durable: Callable[[dict[str, int]], None],
        on_health: Callable[[str | None], None] | None,
        request_timeout_s: float,
    ) -> None:
        self.state_dir = state_dir
        self.path = database_path(state_dir)
        self._lock_fd: int | None = lock_fd
        self._process = process
        self._reader = reader
        self._writer = writer
        self._on_durable = on_durable
        self._on_health = on_health
        self._request_timeout_s = request_timeout_s
        self._health: str | None = None
        self._ids = itertools.count(1)
        self._requests: dict[int, _Request] = {}
        self._unacked: dict[str, deque[tuple[int, int]]] = {}
        self._pending_bytes = 0
        self._outbox: list[bytes] = []
        self._outbox_bytes = 0
        self._flush_scheduled = False
        self._closing = False
        self._closed = False
        self._pump_task: asyncio.Task[None] | None = None
        self._exit_task: asyncio.Task[int] = asyncio.ensure_future(_wait_exit(process))

    # -- opening and closing ---------------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        state_dir: Path,
        *,
        on_durable: Callable[[dict[str, int]], None],
        on_health: Callable[[str | None], None] | None = None,
        retention_s: float,
        max_bytes: int,
        open_timeout_s: float = 30.0,
        request_timeout_s: float = 60.0,
        max_write_buffer: int = DEFAULT_MAX_WRITE_BUFFER,
        maintenance_every_s: float = 5.0,
        _max_page_count: int | None = None,
    ) -> EventStore:
        """Lock ``state_dir`` (:class:`StoreLocked`), start the writer, wait until it has the database
        open (:class:`StoreCorrupt` for a damaged file, :class:`StoreError` otherwise).

        ``_max_page_count`` is a test hook: the database refuses to grow past that many pages, which is
        how the tests fill the "disk"."""
        state_dir = prepare_state_dir(Path(state_dir))
        lock_fd = acquire_lock(state_dir)
        return await cls._start(
            state_dir,
            lock_fd,
            on_durable=on_durable,
            on_health=on_health,
            retention_s=retention_s,
            max_bytes=max_bytes,
            open_timeout_s=open_timeout_s,
            request_timeout_s=request_timeout_s,
            max_write_buffer=max_write_buffer,
            maintenance_every_s=maintenance_every_s,
            max_page_count=_max_page_count,
        )

    @classmethod
    async def from_config(
        cls,
        config: Config,
        *,
        on_durable: Callable[[dict[str, int]], None],
        on_health: Callable[[str | None], None] | None = None,
    ) -> EventStore | None:
        """The store a ``serve`` run asks for: None with ``--no-state``, else opened on ``--state-dir``
        (or the default) with the retention and size cap of ``config``."""
        state_dir = store_state_dir(config)
        if state_dir is None:
            return None
        return await cls.open(
            Path(state_dir),
            on_durable=on_durable,
            on_health=on_health,
            retention_s=config.retention_days * 86400.0,
            max_bytes=config.store_max_bytes,
        )

    @classmethod
    async def _start(
        cls,
        state_dir: Path,
        lock_fd: int,
        *,
        on_durable: Callable[[dict[str, int]], None],
        on_health: Callable[[str | None], None] | None,
        retention_s: float,
        max_bytes: int,
        open_timeout_s: float,
        request_timeout_s: float,
        max_write_buffer: int,
        maintenance_every_s: float,
        max_page_count: int | None,
    ) -> EventStore:
        """Start the writer; ``lock_fd`` is owned from here on (closed on every failure path)."""
        try:
            req_r, req_w = os.pipe()
        except BaseException:
            os.close(lock_fd)
            raise
        try:
            ans_r, ans_w = os.pipe()
        except BaseException:
            for fd in (lock_fd, req_r, req_w):
                os.close(fd)
            raise
        argv = [
            sys.executable,
            "-m",
            "gateway.store.writer_main",
            "--db",
            str(database_path(state_dir)),
            "--read-fd",
            str(req_r),
            "--write-fd",
            str(ans_w),
            "--lock-fd",
            str(lock_fd),
            "--parent-pid",
            str(os.getpid()),
            "--retention-s",
            repr(float(retention_s)),
            "--max-bytes",
            str(int(max_bytes)),
            "--maintenance-every-s",
            repr(float(maintenance_every_s)),
        ]
        if max_page_count is not None:
            argv += ["--max-page-count", str(int(max_page_count))]
        try:
            process = subprocess.Popen(  # noqa: ASYNC220 - once, at start-up, before the server accepts anyone
                argv, pass_fds=(req_r, ans_w, lock_fd), stdin=subprocess.DEVNULL, start_new_session=True, close_fds=True
            )
        except BaseException:
            for fd in (lock_fd, req_r, req_w, ans_r, ans_w):
                os.close(fd)
            raise
        _widen_pipe(req_w)
        os.close(req_r)  # only the writer holds these ends now: its death is our EOF, ours its EOF
        os.close(ans_w)
        try:
            reader = await open_frame_reader(ans_r, max_queued_bytes=8 * 1024 * 1024, max_queued_frames=4096)
        except BaseException:
            os.close(req_w)  # EOF: the writer exits
            await asyncio.shield(_wait_exit(process))
            os.close(lock_fd)
            raise
        try:
            writer = await open_frame_writer(req_w, max_buffer=max_write_buffer)
        except BaseException:
            reader.close()
            await asyncio.shield(_wait_exit(process))
            os.close(lock_fd)
            raise
        store = cls(
            state_dir=state_dir,
            lock_fd=lock_fd,
            process=process,
            reader=reader,
            writer=writer,
            on_durable=on_durable,
            on_health=on_health,
            request_timeout_s=request_timeout_s,
        )
        try:
            async with asyncio.timeout(open_timeout_s):  # keeps a cancel (3.11's wait_for may lose one)
                first = await _first_frame(reader)
        except TimeoutError:
            await store._abort()
            raise StoreError(f"the store writer did not open {store.path} within {open_timeout_s:g} s") from None
        except BaseException:
            await store._abort()
            raise
        if first is None or first.name != StoreOp.READY:
            await store._abort()
            if first is None:
                raise StoreError(f"the store writer exited before opening {store.path} (see its message above)")
            info = first.json()
            if info.get("kind") == "corrupt":
                raise StoreCorrupt(info["message"], info["path"])
            raise StoreError(info.get("message", f"the store writer could not open {store.path}"))
        store._pump_task = asyncio.ensure_future(store._pump())
        return store

    async def close(self, timeout_s: float = 30.0) -> None:
        """Commit what is queued, stop the writer, release the state directory.  While writes fail (disk
        full) the writer makes one last attempt, then exits saying how much it could not write."""
        if self._closed:
            return
        self._closing = True
        try:
            if not self._writer.closed and not self._exit_task.done():
                with contextlib.suppress(StoreError, TimeoutError):
                    await asyncio.wait_for(self._request(StoreOp.CLOSE, {}), timeout_s)
        finally:
            await self._abort()

    async def _abort(self) -> None:
        """End the writer (politely: EOF makes it commit and exit; SIGKILL after a deadline)."""
        self._closing = True
        with contextlib.suppress(ChannelError):
            self._flush()  # queued appends reach the writer, which commits them at EOF
        self._writer.close()
        try:
            await asyncio.wait_for(asyncio.shield(self._exit_task), 10.0)
        except TimeoutError:
            logger.error("store writer %d did not exit; killing it", self._process.pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._process.pid, signal.SIGKILL)
            await self._exit_task
        if self._pump_task is not None:
            # The writer is gone, so its answer pipe ends: let the pump read what it still holds.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._pump_task), 5.0)
        self._reader.close()
        if self._pump_task is not None:
            with contextlib.suppress(Exception):
                await self._pump_task
        self._fail_requests(StoreError("the store is closed"))
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        self._closed = True

    async def __aenter__(self) -> EventStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- state -----------------------------------------------------------------------------------------

    @property
    def health(self) -> str | None:
        """None while writes work; else why they do not (disk full, I/O error, the writer is gone)."""
        return self._health

    @property
    def pending_bytes(self) -> int:
        """Frame bytes appended but not yet durable: the gateway's backpressure signal for the store."""
        return self._pending_bytes

    @property
    def writer_pid(self) -> int:
        return self._process.pid

    # -- writes (queued, non-blocking) -----------------------------------------------------------------

    def create_session(self, meta: dict[str, Any]) -> None:
        """Store a new session (at ``session.create``).  ``meta`` needs ``session_id``; known columns
        (status, title, agent, cwd, created_at, last_active) are columns, the rest is kept as JSON."""
        check_session_fields(meta, creating=True)
        self._send(control_frame(StoreOp.CREATE_SESSION, {"meta": meta}))

    def update_session(self, session_id: str, **fields: Any) -> None:
        """Change a stored session's status, title, last_active, closed_reason... (``status="closed"``
        also stamps ``closed_at``, which starts its retention period; any other status clears it)."""
        check_session_fields(fields, creating=False)
        self._send(control_frame(StoreOp.UPDATE_SESSION, {"session_id": session_id, "fields": fields}))

    def append(self, session_id: str, seq: int, event_type: str, frame: bytes) -> None:
        """Queue one encoded event; ``on_durable`` reports it once committed.  Seqs per session ascend."""
        self._check_open()
        head = pipe.encode_append_head(session_id, seq, event_type, len(frame))
        self._outbox.append(head)
        self._outbox.append(frame)  # the event's own bytes, written as they are (no join)
        self._queued(len(head) + len(frame))
        self._unacked.setdefault(session_id, deque()).append((seq, len(frame)))
        self._pending_bytes += len(frame)

    def put_state(self, session_id: str, through_seq: int, state: bytes) -> None:
        """Save the agent's snapshot (JSON bytes) as of ``through_seq``; the newest one wins."""
        self._send(pipe.encode_put_state(session_id, through_seq, state))

    def _send(self, data: bytes) -> None:
        self._check_open()
        self._outbox.append(data)
        self._queued(len(data))

    def _check_open(self) -> None:
        if self._closing or self._writer.closed or self._exit_task.done():
            raise StoreError(self._health or "the store is closed")

    def _queued(self, nbytes: int) -> None:
        """Frames were added to the outbox: write it at the end of this loop iteration (or now, if big)."""
        self._outbox_bytes += nbytes
        if self._outbox_bytes >= OUTBOX_FLUSH_BYTES:
            try:
                self._flush()
            except ChannelError as exc:
                raise StoreError(f"the store writer is not keeping up: {exc}") from exc
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_soon)

    def _flush(self) -> None:
        """Write the outbox to the pipe, in order.  A writer that stopped reading (ChannelError) ends the
        store: what was queued is never acknowledged, hence never sent to a client."""
        if not self._outbox:
            return
        parts, nbytes = self._outbox, self._outbox_bytes
        self._outbox = []
        self._outbox_bytes = 0
        try:
            self._writer.write_parts(parts, nbytes)
        except ChannelError:
            self._set_health("the store writer is not keeping up")
            self._writer.close()
            raise

    def _flush_soon(self) -> None:
        self._flush_scheduled = False
        try:
            self._flush()
        except ChannelError as exc:
            logger.error("store: %s; nothing more can be made durable", exc)

    # -- requests (awaited; answered by the writer off the loop) ---------------------------------------

    async def get_state(self, session_id: str) -> bytes | None:
        request = await self._request(StoreOp.GET_STATE, {"session_id": session_id})
        return request.state

    async def read_events(
        self, session_id: str, after_seq: int, *, max_events: int, max_bytes: int
    ) -> list[tuple[int, bytes]]:
        """Stored events with seq > ``after_seq``, in order: at most ``max_events`` and about ``max_bytes``
        (always at least one when any exists).  An empty list means there is nothing after ``after_seq``."""
        if max_events < 1 or max_bytes < 1:
            raise ValueError("max_events and max_bytes must be positive")
        request = await self._request(
            StoreOp.READ_EVENTS,
            {"session_id": session_id, "after_seq": int(after_seq), "max_events": max_events, "max_bytes": max_bytes},
        )
        return request.rows

    async def get_session(self, session_id: str) -> dict[str, Any] | None:
        """One stored session (closed ones too: ``session.resume`` reopens them), or None."""
        request = await self._request(StoreOp.GET_SESSION, {"session_id": session_id})
        return request.value

    async def list_sessions(self, *, limit: int, include_closed: bool) -> list[dict[str, Any]]:
        """Stored sessions, newest activity first, each with ``last_seq`` and ``turn_running``."""
        request = await self._request(StoreOp.LIST_SESSIONS, {"limit": int(limit), "include_closed": include_closed})
        return list(request.value)

    async def recover(self) -> list[dict[str, Any]]:
        """At start: the sessions that were not closed at the last run, with ``last_seq`` and
        ``turn_running`` (a ``turn.start`` without its ``turn.complete``)."""
        request = await self._request(StoreOp.RECOVER, {})
        return list(request.value)

    async def delete_session(self, session_id: str) -> bool:
        """Remove a session, its state and (in batches, in the background) its events; True if it existed."""
        request = await self._request(StoreOp.DELETE_SESSION, {"session_id": session_id})
        return bool(request.value)

    async def claim(self, gateway_id: str) -> int:
        """Take ownership of the store for ``gateway_id``; returns the new fencing epoch (it grows by one
        at every claim, so a stale owner's writes can later be refused)."""
        request = await self._request(StoreOp.CLAIM, {"gateway_id": gateway_id})
        return int(request.value)

    async def _request(self, op: StoreOp, body: dict[str, Any]) -> _Request:
        if self._writer.closed or self._exit_task.done():
            raise StoreError(self._health or "the store is closed")
        request_id = next(self._ids)
        request = _Request(asyncio.get_running_loop().create_future())
        self._requests[request_id] = request
        try:
            self._outbox.append(control_frame(op, {**body, "id": request_id}))
            self._flush()  # after every write queued before it: a read sees them
            await asyncio.wait_for(asyncio.shield(request.done), self._request_timeout_s)
        except ChannelError as exc:
            raise StoreError(f"the store writer is not keeping up: {exc}") from exc
        except TimeoutError:
            raise StoreError(f"the store writer did not answer {op} within {self._request_timeout_s:g} s") from None
        finally:
            self._requests.pop(request_id, None)
        return request

    # -- answers ---------------------------------------------------------------------------------------

    async def _pump(self) -> None:
        try:
            async for frame in self._reader:
                self._dispatch(frame)
        except ChannelError as exc:
            logger.error("store: corrupt answer stream from the writer: %s", exc)
        finally:
            if not self._closing:
                code = self._process.poll()
                self._set_health(f"the store writer exited unexpectedly (exit status {code})")
                logger.error("store: %s; nothing more can be made durable", self._health)
            self._fail_requests(StoreError(self._health or "the store is closed"))

    def _dispatch(self, frame: Frame) -> None:
        if frame.kind is Kind.EVENT:
            if frame.name == StoreOp.ROW:
                request_id, seq, data = pipe.decode_row(frame.body)
                if (request := self._requests.get(request_id)) is not None:
                    request.rows.append((seq, data))
            elif frame.name == StoreOp.STATE_ROW:
                request_id, state = pipe.decode_state_row(frame.body)
                if (request := self._requests.get(request_id)) is not None:
                    request.state = state
            return
        body = frame.json()
        if frame.name == StoreOp.DURABLE:
            self._acknowledge(body)
            _call(self._on_durable, body)
        elif frame.name == StoreOp.HEALTH:
            self._set_health(body.get("reason"))
        elif frame.name == StoreOp.RESULT:
            request = self._requests.get(int(body.get("id", 0)))
            if request is None or request.done.done():
                return
            if body.get("ok"):
                request.value = body.get("value")
                request.done.set_result(None)
            else:
                request.done.set_exception(StoreError(f"store: {body.get('error')}"))

    def _acknowledge(self, durable: dict[str, int]) -> None:
        for session_id, seq in durable.items():
            queue = self._unacked.get(session_id)
            while queue and queue[0][0] <= seq:
                self._pending_bytes -= queue.popleft()[1]
            if queue is not None and not queue:
                del self._unacked[session_id]

    def _set_health(self, reason: str | None) -> None:
        if reason == self._health:
            return
        self._health = reason
        if self._on_health is not None:
            _call(self._on_health, reason)

    def _fail_requests(self, error: StoreError) -> None:
        for request in self._requests.values():
            if not request.done.done():
                request.done.set_exception(error)
                request.done.exception()  # mark retrieved: its awaiter may already be gone


def _call(callback: Callable[[Any], None], value: Any) -> None:
    """Run a user callback; its exception is logged, never allowed to stop the pump that serves all."""
    try:
        callback(value)
    except Exception:
        logger.exception("store: callback %r failed", callback)


class _Request:
    __slots__ = ("done", "rows", "state", "value")

    def __init__(self, done: asyncio.Future[None]) -> None:
        self.done = done
        self.value: Any = None
        self.rows: list[tuple[int, bytes]] = []
        self.state: bytes | None = None


def _widen_pipe(fd: int) -> None:
    """Give the request pipe up to 1 MiB (Linux; the default is 64 KiB).  One group commit takes what
    the pipe holds while the previous one syncs, so the pipe's size bounds the rows per fsync."""
    try:
        import fcntl
    except ImportError:
        return
    setpipe = getattr(fcntl, "F_SETPIPE_SZ", None)
    if setpipe is None:
        return
    for size in (PIPE_BYTES, 256 * 1024):
        try:
            fcntl.fcntl(fd, setpipe, size)
            return
        except OSError:
            continue  # above /proc/sys/fs/pipe-max-size: try smaller, else keep the default


async def _first_frame(reader: FrameReader) -> Frame | None:
    async for frame in reader:
        return frame
    return None


async def _wait_exit(process: subprocess.Popen[bytes]) -> int:
    """Await the writer's exit without blocking the loop (a pidfd), then reap it."""
    loop = asyncio.get_running_loop()
    try:
        pidfd = os.pidfd_open(process.pid)
    except ProcessLookupError:
        return process.wait()
    exited: asyncio.Future[None] = loop.create_future()
    loop.add_reader(pidfd, _resolve, exited)
    try:
        await exited
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)
    return process.wait()


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
