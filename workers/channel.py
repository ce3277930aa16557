"""Frames on the pipes between the gateway and its worker processes.

Wire format of one frame (all integers big-endian)::

    u32 length      number of bytes that follow (kind .. body)
    u8  kind        1 = EVENT, 2 = CONTROL
    u8  name_len    length of name
    name            ASCII: the event type (EVENT) or the control operation (CONTROL)
    body            EVENT: the already-encoded JSON payload; CONTROL: a JSON object

EVENT frames carry their payload pre-encoded so that the gateway can wrap it in the JSON-RPC envelope by
concatenation, without ever decoding it (ARCHITECTURE: the loop only relays).  The codec here is pure:
``encode_frame`` and ``FrameDecoder.feed`` do no I/O, so they are tested with plain function calls.
The I/O endpoints (asyncio for the gateway, blocking for workers) are thin layers at the bottom.
"""

from __future__ import annotations

import asyncio
import enum
import json
import os
import struct
import threading
import weakref
from collections import deque
from collections.abc import AsyncIterator
from typing import Any, ClassVar, NamedTuple

from workers.encoding import encode_json  # re-exported: the one encoding of payloads and control bodies
from workers.read_budget import DEFAULT_READ_BUDGET_BYTES, DeferQueue, ReadBudget

_HEADER = struct.Struct(">IBB")
HEADER_SIZE = _HEADER.size  # 6
#: Largest frame accepted: a 64 KiB chunk of text can grow 6x when JSON escapes control characters.
MAX_FRAME_BYTES = 8 * 1024 * 1024


class Kind(enum.IntEnum):
    EVENT = 1
    CONTROL = 2


class ChannelError(Exception):
    """The byte stream on a pipe is not a valid frame sequence: the peer is broken and must be stopped."""


class Frame(NamedTuple):
    """One frame off a pipe (a named tuple: the gateway builds one per event, so it is cheap to make)."""

    kind: Kind
    name: str
    body: bytes

    def json(self) -> Any:
        """Decode a CONTROL body (small by construction; never call this on large EVENT payloads)."""
        return json.loads(self.body) if self.body else {}


def frame_head(kind: Kind, name: str, body_len: int) -> bytes:
    """Everything of a frame before its body (header and name).  ``name`` is ASCII, at most 255 bytes."""
    raw_name = name.encode("ascii")
    if len(raw_name) > 255:
        raise ValueError(f"frame name longer than 255 bytes: {name[:40]!r}...")
    length = 2 + len(raw_name) + body_len
    if length > MAX_FRAME_BYTES:
        raise ValueError(f"frame of {length} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")
    return _HEADER.pack(length, int(kind), len(raw_name)) + raw_name


def encode_frame(kind: Kind, name: str, body: bytes = b"") -> bytes:
    """Encode one frame.  ``name`` is ASCII, at most 255 bytes."""
    return frame_head(kind, name, len(body)) + body


def event_frame(event_type: str, payload: Any) -> bytes:
    """An EVENT frame: the payload encoded once, here in the worker, never again on the gateway's loop."""
    return encode_frame(Kind.EVENT, event_type, encode_json(payload))


def control_frame(op: str, body: Any | None = None) -> bytes:
    return encode_frame(Kind.CONTROL, op, encode_json(body if body is not None else {}))


class FrameDecoder:
    """Incremental decoder: ``feed`` bytes as they arrive, get back every complete frame.

    Raises :class:`ChannelError` on a corrupt header or an oversize length; after that the decoder is
    unusable (the stream has no resynchronisation point) and the peer must be stopped.
    """

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        self._buf = bytearray()
        self._max = max_frame_bytes
        self._broken: ChannelError | None = None

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[Frame]:
        if self._broken is not None:
            raise self._broken
        self._buf += data
        frames: list[Frame] = []
        buf = self._buf
        pos = 0
        while len(buf) - pos >= HEADER_SIZE:
            length, kind, name_len = _HEADER.unpack_from(buf, pos)
            if length > self._max or length < 2 + name_len:
                self._broken = ChannelError(
                    f"corrupt frame header: length {length}, name length {name_len} (limit {self._max})"
                )
                raise self._broken
            if kind not in (1, 2):
                self._broken = ChannelError(f"corrupt frame header: unknown kind {kind}")
                raise self._broken
            end = pos + 4 + length
            if len(buf) < end:
                break
            name_start = pos + HEADER_SIZE
            body_start = name_start + name_len
            try:
                name = bytes(buf[name_start:body_start]).decode("ascii")
            except UnicodeDecodeError:
                self._broken = ChannelError("corrupt frame: name is not ASCII")
                raise self._broken from None
            frames.append(Frame(Kind(kind), name, bytes(buf[body_start:end])))
            pos = end
        if pos:
            del buf[:pos]
        return frames

    def eof(self) -> None:
        """Call at end of stream: a partial frame left over means the peer died mid-write."""
        if self._buf:
            raise ChannelError(f"stream ended inside a frame ({len(self._buf)} bytes pending)")


#: A frame's kind byte -> its Kind (what is not in here is corrupt).
_KINDS = {int(k): k for k in Kind}


def _check_header(length: int, kind: int, name_len: int, limit: int) -> None:
    if length > limit or length < 2 + name_len:
        raise ChannelError(f"corrupt frame header: length {length}, name length {name_len} (limit {limit})")
    if kind not in (1, 2):
        raise ChannelError(f"corrupt frame header: unknown kind {kind}")


def _frame_at(buf: memoryview | bytearray, pos: int, name_len: int, kind: int, end: int) -> Frame:
    """The frame whose header starts at ``pos``; the body is the one copy of its bytes."""
    name_start = pos + HEADER_SIZE
    body_start = name_start + name_len
    try:
        name = str(buf[name_start:body_start], "ascii")
    except UnicodeDecodeError:
        raise ChannelError("corrupt frame: name is not ASCII") from None
    return Frame(_KINDS[kind], name, bytes(buf[body_start:end]))


class FrameScanner:
    """Incremental decoder for :class:`FrameReader`: parses frames in place from a view of a buffer the
    caller reuses (the loop's shared read buffer), copying out only each frame's body, and keeps just the
    bytes of a partial frame (its *carry*) between feeds.

    Like :class:`FrameDecoder`, a corrupt header or an oversize length is fatal (no resynchronisation),
    but the frames fed before it are still returned.  Nothing returned refers to the fed view.
    """

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        self._carry = bytearray()
        self._max = max_frame_bytes
        self._broken: ChannelError | None = None

    @property
    def buffered(self) -> int:
        """Bytes of a partial frame held until the rest arrives."""
        return len(self._carry)

    @property
    def error(self) -> ChannelError | None:
        """Set once the stream turned out corrupt; every later :meth:`feed` raises it."""
        return self._broken

    def feed(self, view: memoryview) -> list[Frame]:
        """Every frame completed by ``view`` (the view may be overwritten as soon as this returns).  On a
        corrupt stream: the frames before the corruption, with :attr:`error` set."""
        if self._broken is not None:
            raise self._broken
        frames: list[Frame] = []
        try:
            pos = self._complete_carry(view, frames) if self._carry else 0
            if pos < 0:  # all of the view went into the carry
                return frames
            pos = self._scan(view, pos, frames)
        except ChannelError as exc:
            self._broken = exc
            self._carry = bytearray()
            return frames
        if pos < len(view):
            self._carry = bytearray(view[pos:])
        return frames

    def eof(self) -> None:
        """Call at end of stream: a partial frame left over means the peer died mid-write."""
        if self._carry:
            raise ChannelError(f"stream ended inside a frame ({len(self._carry)} bytes pending)")

    def _complete_carry(self, view: memoryview, frames: list[Frame]) -> int:
        """Append to the carry from ``view``; returns where the frames after it start, or -1 when the
        carry took all of ``view`` and is still incomplete."""
        carry = self._carry
        pos = 0
        if len(carry) < HEADER_SIZE:
            take = min(HEADER_SIZE - len(carry), len(view))
            carry += view[:take]
            pos = take
            if len(carry) < HEADER_SIZE:
                return -1
        length, kind, name_len = _HEADER.unpack_from(carry, 0)
        _check_header(length, kind, name_len, self._max)
        total = 4 + length
        take = min(total - len(carry), len(view) - pos)
        carry += view[pos : pos + take]
        pos += take
        if len(carry) < total:
            return -1
        frames.append(_frame_at(carry, 0, name_len, kind, total))
        self._carry = bytearray()
        return pos

    def _scan(self, view: memoryview, pos: int, frames: list[Frame]) -> int:
        size = len(view)
        unpack = _HEADER.unpack_from
        limit = self._max
        while size - pos >= HEADER_SIZE:
            length, kind, name_len = unpack(view, pos)
            _check_header(length, kind, name_len, limit)
            end = pos + 4 + length
            if end > size:
                break
            frames.append(_frame_at(view, pos, name_len, kind, end))
            pos = end
        return pos


# --------------------------------------------------------------------------------------------------------
# Gateway side: asyncio endpoints.  Reading is bounded: when the consumer falls behind, the reader stops
# reading the pipe, the pipe fills, and the worker blocks in write().  Nothing is dropped, memory stays flat.
# --------------------------------------------------------------------------------------------------------

#: Default bound of decoded-but-unconsumed bytes held by one :class:`FrameReader`.
DEFAULT_MAX_QUEUED_BYTES = 1024 * 1024
#: Default bound of decoded-but-unconsumed frames (many tiny frames cost more than their bytes).
DEFAULT_MAX_QUEUED_FRAMES = 1024
#: Default bound of control bytes a :class:`FrameWriter` buffers for a peer that does not read.
DEFAULT_MAX_WRITE_BUFFER = 8 * 1024 * 1024
#: The read buffer all readers of one loop share (one read fills it, frames are parsed from it in place).
SHARED_READ_BUFFER_BYTES = 1024 * 1024
#: The smallest read a reader near its queue bound still makes (bounds are "queued bytes plus one read").
_MIN_READ_BYTES = 64 * 1024


class ReaderState(enum.Enum):
    READING = "reading"  # registered with the loop's selector
    PAUSED = "paused"  # its queue is over a bound: not registered until the consumer drains half
    DEFERRED = "deferred"  # this loop iteration's read budget is spent: waits in LoopReads' queue
    DONE = "done"  # EOF, error or close(): the fd is closed


class LoopReads:
    """What the pipe readers of one event loop share: the read buffer and the per-iteration read budget
    (plus the same budget for relaying: the sessions' readers of frames spend it, :meth:`spend_relay`).

    One buffer per loop, not per reader: a read fills it, the frames are copied out before the callback
    returns, so no two readers ever hold it at once (and 64 sessions cost 1 MiB, not 64).  The budget is
    reset by a ``call_soon`` callback scheduled on the first read of an iteration; readers turned away are
    served, longest-waiting first, by that same callback at the start of the next iteration."""

    _by_loop: ClassVar[weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopReads]] = weakref.WeakKeyDictionary()

    def __init__(self, loop: asyncio.AbstractEventLoop, budget_bytes: int) -> None:
        # Weak: this object is the value of a WeakKeyDictionary keyed by the loop; a strong reference
        # back would keep every loop (and its 1 MiB buffer) alive forever.
        self._loop = weakref.ref(loop)
        self.buffer = memoryview(bytearray(SHARED_READ_BUFFER_BYTES))
        self.budget = ReadBudget(budget_bytes)
        self.relay = ReadBudget(budget_bytes)
        self.deferred: DeferQueue[FrameReader] = DeferQueue()
        self.deferrals = 0  # readers turned away so far (a loop that often spends its budget shows here)
        self._reset_scheduled = False

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop, budget_bytes: int | None = None) -> LoopReads:
        """The loop's shared state (created on first use); ``budget_bytes`` resizes its budget."""
        reads = cls._by_loop.get(loop)
        if reads is None:
            reads = cls._by_loop[loop] = cls(loop, budget_bytes or DEFAULT_READ_BUDGET_BYTES)
        elif budget_bytes is not None and budget_bytes != reads.budget.per_iteration:
            reads.budget.resize(budget_bytes)
            reads.relay.resize(budget_bytes)
        return reads

    @property
    def relay_spent(self) -> bool:
        """Whether this iteration's relay budget is spent: a session relaying a backlog yields until the
        next iteration, so the frames queued while sessions waited for room (up to each reader's bound)
        are not all relayed in one turn of the loop when the room comes back."""
        return self.relay.exhausted

    @property
    def relay_left(self) -> int:
        """Bytes of frames the sessions may still relay in this iteration."""
        return self.relay.remaining

    def spend_relay(self, n: int) -> None:
        """Count ``n`` bytes of frames a session relayed in this iteration."""
        self.relay.charge(n)
        self._schedule_reset()

    def grant(self, want: int) -> int:
        """Bytes a reader may read now (0: defer it); charge what it actually read with :meth:`charge`."""
        return self.budget.grant(want)

    def charge(self, n: int) -> None:
        self.budget.charge(n)
        self._schedule_reset()

    def defer(self, reader: FrameReader) -> None:
        self.deferrals += 1
        self.deferred.add(reader)
        self._schedule_reset()

    def _schedule_reset(self) -> None:
        loop = self._loop()
        if not self._reset_scheduled and loop is not None:
            self._reset_scheduled = True
            loop.call_soon(self._new_iteration)

    def _new_iteration(self) -> None:
        self._reset_scheduled = False
        self.budget.reset()
        self.relay.reset()
        while self.deferred and not self.budget.exhausted:
            reader = self.deferred.pop()
            if reader is not None:
                reader._undefer()
        if self.deferred:
            self._schedule_reset()


class FrameReader:
    """Async iterator over the frames arriving on a pipe; ends at EOF, raises :class:`ChannelError` on a
    corrupt stream (after yielding the frames decoded before it).  :meth:`batches` hands out every frame
    queued at once instead.

    Push mode: the loop calls the reader when the pipe is readable; it reads as much as the loop's budget
    and its own bound allow into the loop's shared buffer (:class:`LoopReads`), in one syscall, and parses
    the frames there.  At most ``max_queued_bytes`` / ``max_queued_frames`` (plus one read) are held,
    counting a batch handed out until the next one is asked for; past that the reader stops reading and
    resumes once the consumer has drained half.  Single consumer.  Owns ``fd`` and closes it exactly once.
    """

    def __init__(
        self,
        fd: int,
        loop: asyncio.AbstractEventLoop,
        *,
        max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES,
        max_queued_frames: int = DEFAULT_MAX_QUEUED_FRAMES,
        read_budget_bytes: int | None = None,
    ) -> None:
        if max_queued_bytes < 1 or max_queued_frames < 1:
            raise ValueError("queue bounds must be positive")
        self._fd = fd
        self._loop = loop
        self._reads = LoopReads.of(loop, read_budget_bytes)
        self._max_bytes = max_queued_bytes
        self._max_frames = max_queued_frames
        self._frames: deque[Frame] = deque()
        self._queued_bytes = 0  # bytes in _frames
        self._held_bytes = 0  # bytes of the last batch handed out, released when the next is asked for
        self._held_frames = 0
        self._scanner = FrameScanner()
        self._state = ReaderState.DONE
        self._error: ChannelError | None = None
        self._waiter: asyncio.Future[None] | None = None

    def _start(self) -> None:
        """Register with the loop (the fd is made non-blocking here)."""
        os.set_blocking(self._fd, False)
        self._loop.add_reader(self._fd, self._on_readable)
        self._state = ReaderState.READING

    @property
    def queued_bytes(self) -> int:
        """Bytes decoded and waiting for the consumer (bounded; exposed for tests and metrics)."""
        return self._queued_bytes

    @property
    def state(self) -> ReaderState:
        return self._state

    @property
    def paused(self) -> bool:
        return self._state is ReaderState.PAUSED

    @property
    def at_eof(self) -> bool:
        """True once the stream has ended and every queued frame was consumed."""
        return self._state is ReaderState.DONE and not self._frames

    def close(self) -> None:
        """Stop reading and close the fd; frames already queued are still yielded, then iteration ends."""
        self._finish(None)

    # -- consumer side ----------------------------------------------------------------------------------

    def __aiter__(self) -> FrameReader:
        return self

    async def __anext__(self) -> Frame:
        self._release_held()
        while True:
            if self._frames:
                frame = self._frames.popleft()
                self._queued_bytes -= _cost(frame)
                self._maybe_resume()
                return frame
            await self._wait_for_frames()

    def batches(self) -> AsyncIterator[list[Frame]]:
        """Every queued frame at once, as a non-empty list per step, until EOF (or the error)."""
        return _Batches(self)

    async def next_batch(self) -> list[Frame]:
        """All frames queued now (waiting for at least one); ``[]`` at EOF.  The batch counts against the
        bounds until the next call, so a consumer working through it still holds the worker back."""
        self._release_held()
        while not self._frames:
            try:
                await self._wait_for_frames()
            except StopAsyncIteration:
                return []
        batch = list(self._frames)
        self._frames.clear()
        self._held_bytes, self._queued_bytes = self._queued_bytes, 0
        self._held_frames = len(batch)
        return batch

    async def _wait_for_frames(self) -> None:
        if self._error is not None:
            raise self._error
        if self._state is ReaderState.DONE:
            raise StopAsyncIteration
        if self._waiter is not None:
            raise RuntimeError("FrameReader has a single consumer; another task is already waiting")
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _release_held(self) -> None:
        if self._held_frames:
            self._held_bytes = self._held_frames = 0
            self._maybe_resume()

    # -- loop side --------------------------------------------------------------------------------------

    def _on_readable(self) -> None:
        if self._state is not ReaderState.READING:
            return  # a callback already queued when an earlier one in this iteration paused or closed us
        room = self._max_bytes - self._queued_bytes - self._held_bytes
        buffer = self._reads.buffer
        granted = self._reads.grant(min(len(buffer), max(room, _MIN_READ_BYTES)))
        if not granted:
            self._loop.remove_reader(self._fd)
            self._state = ReaderState.DEFERRED
            self._reads.defer(self)
            return
        self._read(buffer[:granted])

    def _undefer(self) -> None:
        """Called by :class:`LoopReads` at the start of an iteration with budget to spare."""
        if self._state is not ReaderState.DEFERRED:
            return
        self._state = ReaderState.READING
        self._loop.add_reader(self._fd, self._on_readable)
        self._on_readable()

    def _read(self, view: memoryview) -> None:
        try:
            n = os.readv(self._fd, [view])
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            err = ChannelError(f"pipe read failed: {exc}")
            err.__cause__ = exc
            self._finish(err)
            return
        if n == 0:
            try:
                self._scanner.eof()
            except ChannelError as exc:
                self._finish(exc)
                return
            self._finish(None)
            return
        self._reads.charge(n)
        frames = self._scanner.feed(view[:n])
        if frames:
            self._frames.extend(frames)
            self._queued_bytes += sum(_cost(f) for f in frames)
            if self._state is ReaderState.READING and self._over_limit():
                self._loop.remove_reader(self._fd)
                self._state = ReaderState.PAUSED
            self._wake()
        if self._scanner.error is not None:  # the frames before the corruption are still delivered
            self._finish(self._scanner.error)

    def _finish(self, error: ChannelError | None) -> None:
        """End the stream (first call wins): unregister, close the fd once, wake the consumer."""
        if self._fd >= 0:
            if self._state is ReaderState.READING:
                self._loop.remove_reader(self._fd)
            elif self._state is ReaderState.DEFERRED:
                self._reads.deferred.discard(self)
            self._state = ReaderState.DONE
            if self._error is None:
                self._error = error
            if self._fd >= 0:
                fd, self._fd = self._fd, -1
                os.close(fd)
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _over_limit(self) -> bool:
        return (
            self._queued_bytes + self._held_bytes >= self._max_bytes
            or len(self._frames) + self._held_frames >= self._max_frames
        )

    def _maybe_resume(self) -> None:
        if (
            self._state is ReaderState.PAUSED
            and self._queued_bytes + self._held_bytes <= self._max_bytes // 2
            and len(self._frames) + self._held_frames <= self._max_frames // 2
        ):
            self._state = ReaderState.READING
            self._loop.add_reader(self._fd, self._on_readable)


class _Batches:
    """``async for batch in reader.batches()`` without an async generator (nothing to finalize when the
    consumer stops early)."""

    def __init__(self, reader: FrameReader) -> None:
        self._reader = reader

    def __aiter__(self) -> _Batches:
        return self

    async def __anext__(self) -> list[Frame]:
        batch = await self._reader.next_batch()
        if not batch:
            raise StopAsyncIteration
        return batch


def _cost(frame: Frame) -> int:
    return HEADER_SIZE + len(frame.name) + len(frame.body)


class FrameWriter:
    """Non-blocking writer of small frames (control operations) to a pipe.

    Writes never block the loop: asyncio buffers them.  The buffer is bounded by ``max_buffer``: a peer
    that stops reading control frames altogether is broken, and the write raises :class:`ChannelError`.
    """

    def __init__(self, *, max_buffer: int = DEFAULT_MAX_WRITE_BUFFER) -> None:
        self._max_buffer = max_buffer
        self._transport: asyncio.WriteTransport | None = None
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed or self._transport is None or self._transport.is_closing()

    def write(self, data: bytes) -> bool:
        """Queue ``data`` (one or more encoded frames); False when the pipe is already closed."""
        return self.write_parts([data], len(data))

    def write_parts(self, parts: list[bytes], nbytes: int) -> bool:
        """Queue ``b"".join(parts)`` (``nbytes`` long) without joining them first: with uvloop the
        transport writes them as one iovec array, copying nothing.  False when the pipe is already closed."""
        if self.closed:
            return False
        assert self._transport is not None
        if self._transport.get_write_buffer_size() + nbytes > self._max_buffer:
            raise ChannelError(f"peer is not reading: more than {self._max_buffer} bytes of frames pending")
        self._transport.writelines(parts)
        return True

    def close(self) -> None:
        self._closed = True
        if self._transport is not None:
            self._transport.close()

    def _connected(self, transport: asyncio.WriteTransport) -> None:
        self._transport = transport

    def _lost(self) -> None:
        self._closed = True


class _WriterProtocol(asyncio.BaseProtocol):
    def __init__(self, writer: FrameWriter) -> None:
        self._writer = writer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._writer._connected(transport)  # type: ignore[arg-type]

    def connection_lost(self, exc: Exception | None) -> None:
        self._writer._lost()


def _pipe_file(loop: asyncio.AbstractEventLoop, fd: int, mode: str) -> Any:
    """A file object for ``connect_*_pipe`` that leaves exactly one owner of ``fd``.

    The stdlib loop closes a pipe by closing the file object, so the file must own the fd.  uvloop hands
    the fd to libuv, which closes it, and then closes the file object too: an owning file would close the
    same number a second time, by then possibly another thread's new pipe or a client's socket."""
    owns_fd = not type(loop).__module__.startswith("uvloop")
    return open(fd, mode, buffering=0, closefd=owns_fd)


async def open_frame_reader(
    fd: int,
    *,
    max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES,
    max_queued_frames: int = DEFAULT_MAX_QUEUED_FRAMES,
    read_budget_bytes: int | None = None,
) -> FrameReader:
    """Wrap the read end ``fd`` of a pipe (ownership passes to the reader, which closes it exactly once)
    in a :class:`FrameReader`.  ``read_budget_bytes`` sets the loop-wide per-iteration read budget
    (:class:`LoopReads`; the last value given wins)."""
    loop = asyncio.get_running_loop()
    reader = FrameReader(
        fd,
        loop,
        max_queued_bytes=max_queued_bytes,
        max_queued_frames=max_queued_frames,
        read_budget_bytes=read_budget_bytes,
    )
    try:
        reader._start()
    except BaseException:
        reader.close()
        raise
    return reader


async def open_frame_writer(fd: int, *, max_buffer: int = DEFAULT_MAX_WRITE_BUFFER) -> FrameWriter:
    """Wrap the write end ``fd`` of a pipe (ownership passes to the writer) in a :class:`FrameWriter`."""
    loop = asyncio.get_running_loop()
    writer = FrameWriter(max_buffer=max_buffer)
    pipe = _pipe_file(loop, fd, "wb")
    try:
        await loop.connect_write_pipe(lambda: _WriterProtocol(writer), pipe)
    except BaseException:
        pipe.close()
        if not pipe.closefd:  # no transport took the fd over
            os.close(fd)
        raise
    return writer


# --------------------------------------------------------------------------------------------------------
# Worker side: blocking endpoint.  Several threads send (the turn, the cancel reader); one thread receives.
# A blocked write is the backpressure the gateway applies, so it is deliberately not timed out.
# --------------------------------------------------------------------------------------------------------

_READ_SIZE = 256 * 1024


class BlockingChannel:
    """Blocking frame endpoint over two pipe fds (owned: :meth:`close` closes them)."""

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self._read_fd = read_fd
        self._write_fd = write_fd
        self._decoder = FrameDecoder()
        self._pending: deque[Frame] = deque()
        self._send_lock = threading.Lock()
        self._eof = False

    def send(self, data: bytes) -> None:
        """Write encoded frame bytes whole (thread-safe).  Raises ``BrokenPipeError`` when the gateway is
        gone."""
        view = memoryview(data)
        with self._send_lock:
            while view:
                written = os.write(self._write_fd, view)
                view = view[written:]

    def send_event(self, event_type: str, payload: Any) -> None:
        """One EVENT frame, its head and its body written together (``writev``: the body is not copied
        into a frame first, which for a 64 KiB event was two copies of it)."""
        body = encode_json(payload)
        head = frame_head(Kind.EVENT, event_type, len(body))
        with self._send_lock:
            written = os.writev(self._write_fd, [head, body])
            if written < len(head) + len(body):  # a pipe writes all of it unless a signal cut it short
                view = memoryview(head + body)[written:]
                while view:
                    view = view[os.write(self._write_fd, view) :]

    def send_control(self, op: str, body: Any | None = None) -> None:
        self.send(control_frame(op, body))

    def recv(self) -> Frame | None:
        """Next frame, or None at EOF.  Raises :class:`ChannelError` on a corrupt stream.  One reader."""
        while not self._pending:
            if self._eof:
                return None
            data = os.read(self._read_fd, _READ_SIZE)
            if not data:
                self._eof = True
                self._decoder.eof()
                return None
            self._pending.extend(self._decoder.feed(data))
        return self._pending.popleft()

    def close(self) -> None:
        for fd in (self._read_fd, self._write_fd):
            try:
                os.close(fd)
            except OSError:
                pass
