"""A terminal's PTY fd side: reading the master into the replay and the attached view, writing keystrokes.

The master fd is read non-blocking on the event loop (``loop.add_reader``: no thread per terminal) into a
replay (the last 1 MiB, terminal queries removed as it arrives: ``queries.QueryStripper``) and into the
outbound buffer of the one attached view.  Memory stays bounded both ways: a slow view past a high-water
mark makes the terminal stop reading the master fd (the program blocks in ``write``); keystrokes go
through a bounded non-blocking writer, and a program that does not read them for
``config.terminal_input_stall_s`` has its view dropped (every wait has a deadline).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import time
from typing import Any

from starlette.websockets import WebSocket

from gateway import wire
from gateway.terminals.queries import QueryStripper
from gateway.terminals.view import Attachment
from pty_bridge import PtyProcess

CLOSE_SUPERSEDED = wire.CloseCode.TERMINAL_SUPERSEDED
REPLAY_BYTES = 1024 * 1024
_READ_CHUNK = 65536
#: Outbound bytes buffered for a socket before the master fd stops being read, and the level to resume at.
OUT_HIGH_WATER = 256 * 1024
OUT_LOW_WATER = 64 * 1024
#: Keystroke bytes buffered for a program that does not read its input before the relay stops receiving.
INPUT_MAX = 64 * 1024


class InputStalled(Exception):
    """The program has not taken any keystroke for the input stall deadline."""


class TerminalState(enum.Enum):
    RUNNING = "running"
    CLOSING = "closing"  # teardown in progress: output is drained or discarded, input dropped
    CLOSED = "closed"


class ReaderState(enum.Enum):
    ACTIVE = "active"  # the master fd is registered with the loop
    PAUSED = "paused"  # the attached socket is slow: the program blocks until it catches up
    DONE = "done"  # EOF (no slave left open) or the fd is closed


class Terminal:
    """A PTY and the loop-side I/O on its master fd."""

    def __init__(self, terminal_id: str, pty: PtyProcess, loop: asyncio.AbstractEventLoop) -> None:
        self.id = terminal_id
        self.pty = pty
        self.created_at = time.time()
        self.state = TerminalState.RUNNING
        self.attachment: Attachment | None = None
        self.grace: asyncio.TimerHandle | None = None
        self.teardown: asyncio.Task[None] | None = None
        self.eof = asyncio.Event()
        self._loop = loop
        self._replay = QueryStripper(REPLAY_BYTES)  # cleaned as output arrives: attaching costs a copy
        self._input = bytearray()
        self._input_space = asyncio.Event()
        self._input_space.set()
        self._writer_registered = False
        loop.add_reader(pty.master_fd, self._on_readable)
        self.reader = ReaderState.ACTIVE

    # Output ----------------------------------------------------------------------------------------------
    def resume_reading(self) -> None:
        if self.reader is ReaderState.PAUSED:
            self._loop.add_reader(self.pty.master_fd, self._on_readable)
            self.reader = ReaderState.ACTIVE

    def _pause_reading(self) -> None:
        if self.reader is ReaderState.ACTIVE:
            self._loop.remove_reader(self.pty.master_fd)
            self.reader = ReaderState.PAUSED

    def _on_readable(self) -> None:
        # A PTY hands out at most a few KiB per read: gather several, so that a flood of output costs one
        # wake-up of the sender and one WebSocket frame per ~64 KiB rather than per read.
        chunks: list[bytes] = []
        size = 0
        at_eof = False
        while size < _READ_CHUNK:
            try:
                chunk = os.read(self.pty.master_fd, _READ_CHUNK - size)
            except BlockingIOError:
                break
            except OSError:  # EIO: every slave fd is closed
                chunk = b""
            if not chunk:
                at_eof = True
                break
            chunks.append(chunk)
            size += len(chunk)
        if chunks:
            self._take_output(b"".join(chunks))
        if at_eof and self.reader is not ReaderState.DONE:
            if self.reader is ReaderState.ACTIVE:
                self._loop.remove_reader(self.pty.master_fd)
            self.reader = ReaderState.DONE
            self.eof.set()

    def _take_output(self, data: bytes) -> None:
        self._replay.feed(data)
        view = self.attachment
        if view is None or view.close_code is not None:
            return
        if len(view.pending) < OUT_HIGH_WATER:
            view.push(data)
        # else: only while closing (reading was not paused): the rest of a dying program's output is dropped
        if len(view.pending) >= OUT_HIGH_WATER and self.state is TerminalState.RUNNING:
            self._pause_reading()

    def sent_some(self, view: Attachment) -> None:
        """Called by a view's sender after taking bytes off its buffer: resume below the low-water mark."""
        if view is self.attachment and len(view.pending) <= OUT_LOW_WATER:
            self.resume_reading()

    def replay_bytes(self) -> bytes:
        return self._replay.snapshot()

    # Input -----------------------------------------------------------------------------------------------
    async def write_input(self, data: bytes, stall_s: float) -> None:
        """Queue keystrokes; while the buffer is full, wait for the program to take some, at most
        ``stall_s`` seconds at a time (then :class:`InputStalled`: the relay drops the view)."""
        while len(self._input) >= INPUT_MAX and self.state is TerminalState.RUNNING:
            self._input_space.clear()
            try:
                await asyncio.wait_for(self._input_space.wait(), stall_s)
            except TimeoutError:
                raise InputStalled(f"the program has not read its input for {stall_s:g} s") from None
        if self.state is not TerminalState.RUNNING or not data:
            return
        self._input += data
        self._flush_input()

    def _flush_input(self) -> None:
        try:
            fd = self.pty.master_fd
        except ValueError:
            self._input.clear()
            fd = -1
        while self._input and fd >= 0:
            try:
                written = os.write(fd, self._input)
            except BlockingIOError:
                break
            except OSError:  # EIO: the program is gone; its input goes nowhere
                self._input.clear()
                break
            del self._input[:written]
        if self._input and not self._writer_registered:
            self._loop.add_writer(fd, self._flush_input)
            self._writer_registered = True
        elif not self._input and self._writer_registered:
            self._loop.remove_writer(fd)
            self._writer_registered = False
        if len(self._input) < INPUT_MAX:
            self._input_space.set()

    # Views -----------------------------------------------------------------------------------------------
    def attach(self, websocket: WebSocket) -> Attachment:
        """Make ``websocket`` the terminal's view; a previous view is closed with 4409."""
        previous = self.attachment
        view = Attachment(websocket, self.replay_bytes())
        self.attachment = view
        if previous is not None:
            previous.request_close(CLOSE_SUPERSEDED, "superseded by a newer connection to this terminal", drain=False)
        self.cancel_grace()
        self.resume_reading()
        return view

    def detach(self, view: Attachment) -> bool:
        """Forget ``view`` if it is still the current one; True when the terminal is now unattended."""
        if self.attachment is not view:
            return False
        self.attachment = None
        self.resume_reading()
        return True

    def cancel_grace(self) -> None:
        if self.grace is not None:
            self.grace.cancel()
            self.grace = None

    def stop_io(self) -> None:
        """Unregister the fd from the loop (before it is closed) and release blocked input writers."""
        with contextlib.suppress(ValueError):
            fd = self.pty.master_fd
            if self.reader is ReaderState.ACTIVE:
                self._loop.remove_reader(fd)
            if self._writer_registered:
                self._loop.remove_writer(fd)
        self.reader = ReaderState.DONE
        self._writer_registered = False
        self._input.clear()
        self._input_space.set()

    def describe(self) -> dict[str, Any]:
        view = self.attachment
        return {
            "terminal_id": self.id,
            "pid": self.pty.pid,
            "state": self.state.value,
            "reader": self.reader.value,
            "cols": self.pty.cols,
            "rows": self.pty.rows,
            "attached": view is not None,
            "outbound_bytes": len(view.pending) if view is not None else 0,
            "input_bytes": len(self._input),
        }
