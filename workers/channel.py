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
from collections import deque
from dataclasses import dataclass
from typing import Any

from workers.encoding import encode_json  # re-exported: the one encoding of payloads and control bodies

_HEADER = struct.Struct(">IBB")
HEADER_SIZE = _HEADER.size  # 6
#: Largest frame accepted: a 64 KiB chunk of text can grow 6x when JSON escapes control characters.
MAX_FRAME_BYTES = 8 * 1024 * 1024


class Kind(enum.IntEnum):
    EVENT = 1
    CONTROL = 2


class ChannelError(Exception):
    """The byte stream on a pipe is not a valid frame sequence: the peer is broken and must be stopped."""


@dataclass(frozen=True, slots=True)
class Frame:
    kind: Kind
    name: str
    body: bytes

    def json(self) -> Any:
        """Decode a CONTROL body (small by construction; never call this on large EVENT payloads)."""
        return json.loads(self.body) if self.body else {}


def encode_frame(kind: Kind, name: str, body: bytes = b"") -> bytes:
    """Encode one frame.  ``name`` is ASCII, at most 255 bytes."""
    raw_name = name.encode("ascii")
    if len(raw_name) > 255:
        raise ValueError(f"frame name longer than 255 bytes: {name[:40]!r}...")
    length = 2 + len(raw_name) + len(body)
    if length > MAX_FRAME_BYTES:
        raise ValueError(f"frame of {length} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")
    return _HEADER.pack(length, int(kind), len(raw_name)) + raw_name + body


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


# --------------------------------------------------------------------------------------------------------
# Gateway side: asyncio endpoints.  Reading is bounded: when the consumer falls behind, the transport stops
# reading the pipe, the pipe fills, and the worker blocks in write().  Nothing is dropped, memory stays flat.
# --------------------------------------------------------------------------------------------------------

#: Default bound of decoded-but-unconsumed bytes held by one :class:`FrameReader`.
DEFAULT_MAX_QUEUED_BYTES = 1024 * 1024
#: Default bound of decoded-but-unconsumed frames (many tiny frames cost more than their bytes).
DEFAULT_MAX_QUEUED_FRAMES = 1024
#: Default bound of control bytes a :class:`FrameWriter` buffers for a peer that does not read.
DEFAULT_MAX_WRITE_BUFFER = 8 * 1024 * 1024


class FrameReader:
    """Async iterator over the frames arriving on a pipe; ends at EOF, raises :class:`ChannelError` on a
    corrupt stream (after yielding the frames decoded before it).

    At most ``max_queued_bytes`` / ``max_queued_frames`` (plus one pipe read) are held; past that the
    transport pauses reading and resumes once the consumer has drained half.  Single consumer.
    """

    def __init__(
        self, *, max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES, max_queued_frames: int = DEFAULT_MAX_QUEUED_FRAMES
    ) -> None:
        if max_queued_bytes < 1 or max_queued_frames < 1:
            raise ValueError("queue bounds must be positive")
        self._max_bytes = max_queued_bytes
        self._max_frames = max_queued_frames
        self._frames: deque[Frame] = deque()
        self._queued_bytes = 0
        self._decoder = FrameDecoder()
        self._transport: asyncio.ReadTransport | None = None
        self._paused = False
        self._done = False
        self._error: ChannelError | None = None
        self._waiter: asyncio.Future[None] | None = None

    @property
    def queued_bytes(self) -> int:
        """Bytes decoded and waiting for the consumer (bounded; exposed for tests and metrics)."""
        return self._queued_bytes

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def at_eof(self) -> bool:
        """True once the stream has ended and every queued frame was consumed."""
        return self._done and not self._frames

    def close(self) -> None:
        """Stop reading; frames already queued are still yielded, then iteration ends."""
        if self._transport is not None:
            self._transport.close()
        self._finish(None)

    def __aiter__(self) -> FrameReader:
        return self

    async def __anext__(self) -> Frame:
        while True:
            if self._frames:
                frame = self._frames.popleft()
                self._queued_bytes -= _cost(frame)
                self._maybe_resume()
                return frame
            if self._error is not None:
                raise self._error
            if self._done:
                raise StopAsyncIteration
            if self._waiter is not None:
                raise RuntimeError("FrameReader has a single consumer; another task is already waiting")
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    # -- called by _ReaderProtocol --------------------------------------------------------------------

    def _connected(self, transport: asyncio.ReadTransport) -> None:
        self._transport = transport

    def _data(self, data: bytes) -> None:
        try:
            frames = self._decoder.feed(data)
        except ChannelError as exc:
            self._finish(exc)
            if self._transport is not None:
                self._transport.close()
            return
        if not frames:
            return
        self._frames.extend(frames)
        self._queued_bytes += sum(_cost(f) for f in frames)
        if not self._paused and self._over_limit() and self._transport is not None:
            self._transport.pause_reading()
            self._paused = True
        self._wake()

    def _eof(self) -> None:
        try:
            self._decoder.eof()
        except ChannelError as exc:
            self._finish(exc)
            return
        self._finish(None)

    def _lost(self, exc: Exception | None) -> None:
        if exc is not None and not self._done:
            err = ChannelError(f"pipe read failed: {exc}")
            err.__cause__ = exc
            self._finish(err)
        else:
            self._finish(None)

    def _finish(self, error: ChannelError | None) -> None:
        if not self._done:
            self._done = True
            self._error = error
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _over_limit(self) -> bool:
        return self._queued_bytes >= self._max_bytes or len(self._frames) >= self._max_frames

    def _maybe_resume(self) -> None:
        if self._paused and self._queued_bytes <= self._max_bytes // 2 and len(self._frames) <= self._max_frames // 2:
            self._paused = False
            if self._transport is not None and not self._done:
                self._transport.resume_reading()


def _cost(frame: Frame) -> int:
    return HEADER_SIZE + len(frame.name) + len(frame.body)


class _ReaderProtocol(asyncio.Protocol):
    def __init__(self, reader: FrameReader) -> None:
        self._reader = reader

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._reader._connected(transport)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        self._reader._data(data)

    def eof_received(self) -> bool:
        self._reader._eof()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._reader._lost(exc)


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
        if self.closed:
            return False
        assert self._transport is not None
        if self._transport.get_write_buffer_size() + len(data) > self._max_buffer:
            raise ChannelError(f"peer is not reading: more than {self._max_buffer} bytes of frames pending")
        self._transport.write(data)
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
    fd: int, *, max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES, max_queued_frames: int = DEFAULT_MAX_QUEUED_FRAMES
) -> FrameReader:
    """Wrap the read end ``fd`` of a pipe (ownership passes to the reader) in a :class:`FrameReader`."""
    loop = asyncio.get_running_loop()
    reader = FrameReader(max_queued_bytes=max_queued_bytes, max_queued_frames=max_queued_frames)
    pipe = _pipe_file(loop, fd, "rb")
    try:
        await loop.connect_read_pipe(lambda: _ReaderProtocol(reader), pipe)
    except BaseException:
        pipe.close()
        if not pipe.closefd:  # no transport took the fd over
            os.close(fd)
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
        self.send(event_frame(event_type, payload))

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
