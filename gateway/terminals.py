"""Terminals: the ``terminal.*`` methods and the ``/pty/{terminal_id}`` byte relay (PROTOCOL section 6).

``TerminalRegistry`` owns every terminal of the gateway.  Each terminal's PTY master is read non-blocking
on the event loop (``loop.add_reader``: no thread per terminal) into a replay ring (the last 1 MiB) and into
the outbound buffer of the one attached socket.  Memory stays bounded both ways:

- output: when the socket is slow and its outbound buffer passes a high-water mark, the registry stops
  reading the master fd (``remove_reader``); the PTY fills and the program blocks in ``write`` until the
  socket catches up.  With no socket attached, output only feeds the replay ring (old bytes drop out).
- input: keystroke frames go through a bounded non-blocking writer (``loop.add_writer``); when the program
  does not read its input, the relay stops receiving from the socket.

A terminal outlives a dropped socket for ``config.terminal_grace_s`` and is then closed.  Every ending
(``terminal.close``, the process exiting, grace expiry, shutdown) goes through one idempotent teardown that
ends the terminal's whole session (``pty_bridge.PtyProcess.terminate``) before ``terminal.close`` answers.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import json
import logging
import os
import secrets
import sys
import time
from typing import Any, Coroutine

from starlette.websockets import WebSocket

from gateway import rpc, wire
from gateway.config import Config
from pty_bridge import (
    DEFAULT_COLS,
    DEFAULT_ROWS,
    PtyProcess,
    Warden,
    default_argv,
    strip_terminal_queries,
)
from workers.process import describe_exit

logger = logging.getLogger("worker_gateway.terminals")

SUBPROTOCOL = wire.SUBPROTOCOL
CLOSE_UNKNOWN = wire.CloseCode.TERMINAL_NOT_FOUND
CLOSE_SUPERSEDED = wire.CloseCode.TERMINAL_SUPERSEDED
CLOSE_EXITED = wire.CloseCode.TERMINAL_EXITED

REPLAY_BYTES = 1024 * 1024
_READ_CHUNK = 65536
SEND_CHUNK = 64 * 1024
#: Outbound bytes buffered for a socket before the master fd stops being read, and the level to resume at.
OUT_HIGH_WATER = 256 * 1024
OUT_LOW_WATER = 64 * 1024
#: Keystroke bytes buffered for a program that does not read its input before the relay stops receiving.
INPUT_MAX = 64 * 1024
#: A terminal that was never connected waits at least this long for its first socket, whatever the grace.
FIRST_CONNECT_S = 60.0
#: Seconds to deliver the last output before the 4410 close, and to close a superseded socket.
DRAIN_TIMEOUT_S = 5.0
SUPERSEDE_TIMEOUT_S = 1.0
#: Seconds to collect the final output of a program once it exited (or was ended).
_FINAL_OUTPUT_S = 0.25
#: Exited terminal ids remembered, so that ``terminal.close`` stays idempotent and a late view gets 4410.
_EXITED_MEMORY = 256


class TerminalState(enum.Enum):
    RUNNING = "running"
    CLOSING = "closing"  # teardown in progress: output is drained or discarded, input dropped
    CLOSED = "closed"


class ReaderState(enum.Enum):
    ACTIVE = "active"  # the master fd is registered with the loop
    PAUSED = "paused"  # the attached socket is slow: the program blocks until it catches up
    DONE = "done"  # EOF (no slave left open) or the fd is closed


class _Attachment:
    """One socket's view of a terminal: the replay snapshot taken at attach, then live bytes."""

    def __init__(self, websocket: WebSocket, replay: bytes) -> None:
        self.websocket = websocket
        self.replay = replay
        self.pending = bytearray()
        self.wake = asyncio.Event()
        self.closing = asyncio.Event()
        self.close_code: int | None = None
        self.close_reason = ""
        self.drain = True

    def push(self, data: bytes) -> None:
        self.pending += data
        self.wake.set()

    def request_close(self, code: int, reason: str, drain: bool) -> None:
        """Close this view with ``code``: after its pending output (``drain``) or at once."""
        if self.close_code is not None:
            return
        self.close_code, self.close_reason, self.drain = code, reason, drain
        if not drain:
            self.pending.clear()
        self.closing.set()
        self.wake.set()


class _Terminal:
    """A PTY and the loop-side I/O on its master fd."""

    def __init__(self, terminal_id: str, pty: PtyProcess, loop: asyncio.AbstractEventLoop) -> None:
        self.id = terminal_id
        self.pty = pty
        self.created_at = time.time()
        self.state = TerminalState.RUNNING
        self.attachment: _Attachment | None = None
        self.grace: asyncio.TimerHandle | None = None
        self.teardown: asyncio.Task[None] | None = None
        self.eof = asyncio.Event()
        self._loop = loop
        self._replay = bytearray()
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
        self._replay += data
        if len(self._replay) > 2 * REPLAY_BYTES:  # trim in bulk: one memmove per MiB, not one per read
            del self._replay[:-REPLAY_BYTES]
        view = self.attachment
        if view is None or view.close_code is not None:
            return
        if len(view.pending) < OUT_HIGH_WATER:
            view.push(data)
        # else: only while closing (reading was not paused): the rest of a dying program's output is dropped
        if len(view.pending) >= OUT_HIGH_WATER and self.state is TerminalState.RUNNING:
            self._pause_reading()

    def sent_some(self, view: _Attachment) -> None:
        """Called by a view's sender after taking bytes off its buffer: resume below the low-water mark."""
        if view is self.attachment and len(view.pending) <= OUT_LOW_WATER:
            self.resume_reading()

    def replay_bytes(self) -> bytes:
        return strip_terminal_queries(bytes(self._replay[-REPLAY_BYTES:]))

    # Input -----------------------------------------------------------------------------------------------
    async def write_input(self, data: bytes) -> None:
        while len(self._input) >= INPUT_MAX and self.state is TerminalState.RUNNING:
            self._input_space.clear()
            await self._input_space.wait()
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
    def attach(self, websocket: WebSocket) -> _Attachment:
        """Make ``websocket`` the terminal's view; a previous view is closed with 4409."""
        previous = self.attachment
        view = _Attachment(websocket, self.replay_bytes())
        self.attachment = view
        if previous is not None:
            previous.request_close(CLOSE_SUPERSEDED, "superseded by a newer connection to this terminal",
                                   drain=False)
        self.cancel_grace()
        self.resume_reading()
        return view

    def detach(self, view: _Attachment) -> bool:
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
            "terminal_id": self.id, "pid": self.pty.pid, "state": self.state.value, "reader": self.reader.value,
            "cols": self.pty.cols, "rows": self.pty.rows, "attached": view is not None,
            "outbound_bytes": len(view.pending) if view is not None else 0, "input_bytes": len(self._input),
        }


class TerminalRegistry:
    """Every terminal of one gateway: ``terminal.open/resize/close`` handlers and the ``/pty`` endpoint."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._terminals: dict[str, _Terminal] = {}
        self._exited: collections.OrderedDict[str, int | None] = collections.OrderedDict()
        self._opening = 0
        self._closed = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._warden: Warden | None = None
        self._warden_lock = asyncio.Lock()

    @property
    def count(self) -> int:
        """Open terminals (a terminal being torn down still counts until its session is gone)."""
        return len(self._terminals)

    def describe(self, terminal_id: str) -> dict[str, Any]:
        """A terminal's I/O state (for metrics, debugging and tests)."""
        return self._get(terminal_id).describe()

    # JSON-RPC handlers (params already validated against rpc.METHOD_PARAMS) -------------------------------
    async def open(self, params: dict[str, Any]) -> dict[str, Any]:
        if sys.platform == "win32":
            raise rpc.RpcError(rpc.NOT_SUPPORTED, "terminals are not supported on Windows: it has no "
                               "pseudo-terminals that this gateway can drive; run the gateway on Linux or macOS")
        if self._closed:
            raise rpc.RpcError(rpc.INTERNAL_ERROR, "the gateway is shutting down; no new terminals")
        limit = self._config.max_terminals
        if len(self._terminals) + self._opening >= limit:
            raise rpc.RpcError(rpc.LIMIT_REACHED, f"too many terminals: the limit is {limit} (max_terminals); "
                               "close one with terminal.close first", {"limit": "max_terminals"})
        argv = params.get("argv")
        if argv is not None and (not argv or not argv[0]):
            raise rpc.RpcError(rpc.INVALID_PARAMS, "param 'argv' of terminal.open must name a program "
                               "(a non-empty list); omit it for the user's shell", {"param": "argv"})
        if argv is not None and any("\0" in arg for arg in argv):
            raise rpc.RpcError(rpc.INVALID_PARAMS, "param 'argv' of terminal.open has an argument with a NUL "
                               "character, which no program can receive; remove it", {"param": "argv"})
        if "\0" in (params.get("cwd") or ""):
            raise rpc.RpcError(rpc.INVALID_PARAMS, "param 'cwd' of terminal.open has a NUL character",
                               {"param": "cwd"})
        argv = list(argv) if argv else default_argv()
        cwd = os.path.expanduser(params.get("cwd") or "~")
        if not os.path.isdir(cwd):
            raise rpc.RpcError(rpc.INVALID_PARAMS, f"param 'cwd' of terminal.open is not a directory: {cwd!r}",
                               {"param": "cwd"})
        self._opening += 1
        try:
            await self._ensure_warden()
            pty = await PtyProcess.spawn(argv, cwd=cwd, cols=params.get("cols", DEFAULT_COLS),
                                         rows=params.get("rows", DEFAULT_ROWS), nice=self._config.worker_nice)
        except (FileNotFoundError, PermissionError, NotADirectoryError) as exc:
            raise rpc.RpcError(rpc.INVALID_PARAMS, f"cannot start {argv[0]!r}: {exc.strerror or exc}",
                               {"param": "argv"}) from None
        except OSError as exc:
            raise rpc.RpcError(rpc.WORKER_START_FAILED, f"cannot start the terminal: {exc}") from None
        finally:
            self._opening -= 1
        terminal_id = secrets.token_hex(8)
        term = _Terminal(terminal_id, pty, asyncio.get_running_loop())
        self._terminals[terminal_id] = term
        if self._warden is not None:
            self._warden.watch(pty.pid)
        self._spawn(self._watch_exit(term))
        self._start_grace(term, max(self._config.terminal_grace_s, FIRST_CONNECT_S))
        if self._closed:  # close_all() ran while this one was starting
            await self._teardown(term, "the gateway is shutting down")
            raise rpc.RpcError(rpc.INTERNAL_ERROR, "the gateway is shutting down; no new terminals")
        return {"terminal_id": terminal_id, "pid": pty.pid, "path": f"/pty/{terminal_id}"}

    def list_terminals(self) -> dict[str, Any]:
        """``terminal.list``: the running terminals, oldest first, so a reloaded page can find its own."""
        return {"terminals": [
            {"terminal_id": t.id, "pid": t.pty.pid, "path": f"/pty/{t.id}", "cols": t.pty.cols,
             "rows": t.pty.rows, "attached": t.attachment is not None, "created_at": t.created_at}
            for t in sorted(self._terminals.values(), key=lambda t: t.created_at)
            if t.state is TerminalState.RUNNING]}

    async def resize(self, params: dict[str, Any]) -> dict[str, Any]:
        self._get(params["terminal_id"]).pty.resize(params["cols"], params["rows"])
        return {"ok": True}

    async def close(self, params: dict[str, Any]) -> dict[str, Any]:
        """Answer once every process of the terminal's session is gone.  Idempotent for a terminal that
        already exited or was closed (recently)."""
        terminal_id = params["terminal_id"]
        term = self._terminals.get(terminal_id)
        if term is None and terminal_id in self._exited:
            return {"closed": True}
        if term is None:
            raise self._not_found(terminal_id)
        await self._teardown(term, "the terminal was closed")
        return {"closed": True}

    async def close_all(self) -> None:
        """Shutdown: end every terminal (in parallel), then the warden.  Idempotent."""
        self._closed = True
        await asyncio.gather(*(self._teardown(t, "the gateway is shutting down")
                               for t in list(self._terminals.values())), return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._warden is not None:
            warden, self._warden = self._warden, None
            await warden.close()

    # The /pty/{terminal_id} endpoint -----------------------------------------------------------------------
    async def pty_endpoint(self, websocket: WebSocket) -> None:
        """Relay one socket to a terminal; called once the handshake's auth checks passed.

        The handshake is always accepted (with the ``worker-gateway.v1`` subprotocol when offered) so that
        the outcome can carry a close code: an unknown terminal id is closed with 4404 right after accept
        (4410 if that terminal exited recently).  Otherwise: the replay (the last 1 MiB, terminal queries
        removed) as binary frames, then live output.  Binary frames in are keystrokes; a text frame that is
        a JSON object with a ``type`` is a control message (``resize``; other types are ignored), any other
        text frame is taken as UTF-8 keystrokes.  A newer connection closes this one with 4409; the
        program's exit (or ``terminal.close``, or shutdown) closes it with 4410 after the last output.
        """
        offered = websocket.scope.get("subprotocols") or []
        await websocket.accept(subprotocol=SUBPROTOCOL if SUBPROTOCOL in offered else None)
        terminal_id = str(websocket.path_params.get("terminal_id", ""))
        term = self._terminals.get(terminal_id)
        if term is None or term.state is TerminalState.CLOSED:
            if terminal_id in self._exited:
                await _close_quietly(websocket, CLOSE_EXITED, "the terminal's process has exited")
            else:
                await _close_quietly(websocket, CLOSE_UNKNOWN, "no such terminal")
            return
        view = term.attach(websocket)
        try:
            await self._relay(term, view)
        finally:
            if term.detach(view) and term.state is TerminalState.RUNNING:
                self._start_grace(term, self._config.terminal_grace_s)

    async def _relay(self, term: _Terminal, view: _Attachment) -> None:
        sender = asyncio.create_task(self._send_output(term, view))
        receiver = asyncio.create_task(self._receive_input(term, view))
        closing = asyncio.create_task(view.closing.wait())
        tasks = (sender, receiver, closing)
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if view.close_code is not None and not sender.done() and not receiver.done():
                timeout = DRAIN_TIMEOUT_S if view.drain else SUPERSEDE_TIMEOUT_S
                await asyncio.wait((sender, receiver), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            client_left = receiver.done()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if view.close_code is not None and not client_left:
            await _close_quietly(view.websocket, view.close_code, view.close_reason)

    async def _send_output(self, term: _Terminal, view: _Attachment) -> None:
        ws = view.websocket
        replay, view.replay = view.replay, b""
        for start in range(0, len(replay), SEND_CHUNK):
            if view.close_code is not None and not view.drain:
                return
            await ws.send_bytes(replay[start:start + SEND_CHUNK])
        while True:
            if view.pending:
                chunk = bytes(view.pending[:SEND_CHUNK])
                del view.pending[:SEND_CHUNK]
                term.sent_some(view)
                await ws.send_bytes(chunk)
                continue
            if view.close_code is not None:
                return
            view.wake.clear()
            await view.wake.wait()

    async def _receive_input(self, term: _Terminal, view: _Attachment) -> None:
        while True:
            message = await view.websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            data = message.get("bytes")
            text = message.get("text")
            if data is not None:
                await term.write_input(data)
            elif text is not None:
                control = _control_message(text)
                if control is None:
                    await term.write_input(text.encode("utf-8"))
                elif control.get("type") == "resize":
                    cols, rows = control.get("cols"), control.get("rows")
                    if _is_int(cols) and _is_int(rows):
                        term.pty.resize(cols, rows)

    # Lifecycle ----------------------------------------------------------------------------------------------
    async def _ensure_warden(self) -> None:
        async with self._warden_lock:
            if self._warden is not None or self._closed:
                return
            try:
                self._warden = await Warden.start(self._config.watchdog_poll_s)
            except OSError as exc:  # best effort: every normal path still ends terminals
                logger.warning("could not start the terminal warden (%s); terminals will not be ended if "
                               "the gateway is killed", exc)

    def _start_grace(self, term: _Terminal, delay: float) -> None:
        term.cancel_grace()
        term.grace = asyncio.get_running_loop().call_later(
            delay, lambda: self._spawn(self._teardown(term, f"no connection for {delay:g} s")))

    async def _watch_exit(self, term: _Terminal) -> None:
        code = await term.pty.wait()
        await self._teardown(term, f"the terminal's process exited ({describe_exit(code)})")

    async def _teardown(self, term: _Terminal, reason: str) -> None:
        """The one way a terminal ends; concurrent and repeated calls share the first one's work."""
        if term.teardown is None:
            term.teardown = asyncio.create_task(self._end(term, reason))
        await asyncio.shield(term.teardown)

    async def _end(self, term: _Terminal, reason: str) -> None:
        term.state = TerminalState.CLOSING
        term.cancel_grace()
        code = term.pty.returncode
        try:
            term.resume_reading()  # keep draining so a dying program is not stuck writing to a full PTY
            if code is not None:  # exited by itself: collect what it wrote last
                await _wait_event(term.eof, _FINAL_OUTPUT_S)
            code = await term.pty.terminate()
            await _wait_event(term.eof, _FINAL_OUTPUT_S)
        finally:  # even if cancelled: closing the master hangs up whatever is left
            term.stop_io()
            term.pty.close_master()
            if self._warden is not None:
                self._warden.forget(term.pty.pid)
            term.state = TerminalState.CLOSED
            self._terminals.pop(term.id, None)
            self._exited[term.id] = code
            while len(self._exited) > _EXITED_MEMORY:
                self._exited.popitem(last=False)
            if term.attachment is not None:
                term.attachment.request_close(CLOSE_EXITED, reason, drain=True)

    def _get(self, terminal_id: str) -> _Terminal:
        term = self._terminals.get(terminal_id)
        if term is None or term.state is not TerminalState.RUNNING:
            raise self._not_found(terminal_id)
        return term

    def _not_found(self, terminal_id: str) -> rpc.RpcError:
        shown = terminal_id if len(terminal_id) <= 64 else terminal_id[:64] + "..."
        if terminal_id in self._exited:
            return rpc.RpcError(rpc.NOT_FOUND, f"terminal {shown} has exited", {"terminal_id": terminal_id})
        return rpc.RpcError(rpc.NOT_FOUND, f"terminal not found: {shown!r}", {"terminal_id": terminal_id})

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("terminal task failed", exc_info=task.exception())


def _control_message(text: str) -> dict[str, Any] | None:
    """A text frame that is a JSON object with a ``type`` is a control message; anything else is typing."""
    stripped = text.strip()
    if not (stripped.startswith("{") and stripped.endswith("}")) or len(stripped) > 4096:
        return None
    try:
        obj = json.loads(stripped)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) and isinstance(obj.get("type"), str) else None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)



async def _wait_event(event: asyncio.Event, timeout: float) -> None:
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(event.wait(), timeout)


async def _close_quietly(websocket: WebSocket, code: int, reason: str) -> None:
    """Close with ``code``; a peer that is already gone (or too slow to take a close frame) is not an error."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(websocket.close(code, reason[:120]), 2.0)
