"""Terminals: the ``terminal.*`` methods and the ``/pty/{terminal_id}`` byte relay (PROTOCOL section 6).

``TerminalRegistry`` owns every terminal of the gateway (this module: the methods, the lifecycle, the
limits); ``pty_side`` is one terminal's PTY fd side, ``relay`` the ``/pty`` socket relay, ``view`` one
socket's view, ``queries`` the pure parser that keeps replays free of terminal queries.  Each terminal's PTY master is read non-blocking
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
import logging
import os
import secrets
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from starlette.websockets import WebSocket

from gateway import rpc, wire
from gateway.config import Config
from gateway.ratelimit import TokenBucket
from gateway.terminals.pty_side import Terminal, TerminalState
from gateway.terminals.relay import close_quietly, relay
from pty_bridge import DEFAULT_COLS, DEFAULT_ROWS, PtyProcess, Warden, default_argv
from workers.process import describe_exit

logger = logging.getLogger("worker_gateway.terminals")

SUBPROTOCOL = wire.SUBPROTOCOL
CLOSE_UNKNOWN = wire.CloseCode.TERMINAL_NOT_FOUND
CLOSE_EXITED = wire.CloseCode.TERMINAL_EXITED
CLOSE_TRY_AGAIN = wire.CloseCode.TRY_AGAIN_LATER
#: A terminal that was never connected waits at least this long for its first socket, whatever the grace.
FIRST_CONNECT_S = 60.0
#: Seconds to collect the final output of a program once it exited (or was ended).
_FINAL_OUTPUT_S = 0.25
#: Exited terminal ids remembered, so that ``terminal.close`` stays idempotent and a late view gets 4410.
_EXITED_MEMORY = 256


class TerminalRegistry:
    """Every terminal of one gateway: ``terminal.open/resize/close`` handlers and the ``/pty`` endpoint."""

    def __init__(self, config: Config, other_connections: Callable[[], int] = lambda: 0) -> None:
        """``other_connections``: how many ``/ws`` connections are open (they share ``max_connections``)."""
        self._config = config
        self._other_connections = other_connections
        self._attach_bucket = TokenBucket(config.terminal_attach_rate_per_s, config.terminal_attach_burst)
        self.sockets = 0  # open /pty sockets, counted in max_connections
        self._terminals: dict[str, Terminal] = {}
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
            raise rpc.RpcError(
                rpc.NOT_SUPPORTED,
                "terminals are not supported on Windows: it has no "
                "pseudo-terminals that this gateway can drive; run the gateway on Linux or macOS",
            )
        if self._closed:
            raise rpc.RpcError(rpc.INTERNAL_ERROR, "the gateway is shutting down; no new terminals")
        limit = self._config.max_terminals
        if len(self._terminals) + self._opening >= limit:
            raise rpc.RpcError(
                rpc.LIMIT_REACHED,
                f"too many terminals: the limit is {limit} (max_terminals); close one with terminal.close first",
                {"limit": "max_terminals"},
            )
        argv = params.get("argv")
        if argv is not None and (not argv or not argv[0]):
            raise rpc.RpcError(
                rpc.INVALID_PARAMS,
                "param 'argv' of terminal.open must name a program (a non-empty list); omit it for the user's shell",
                {"param": "argv"},
            )
        if argv is not None and any("\0" in arg for arg in argv):
            raise rpc.RpcError(
                rpc.INVALID_PARAMS,
                "param 'argv' of terminal.open has an argument with a NUL "
                "character, which no program can receive; remove it",
                {"param": "argv"},
            )
        if "\0" in (params.get("cwd") or ""):
            raise rpc.RpcError(rpc.INVALID_PARAMS, "param 'cwd' of terminal.open has a NUL character", {"param": "cwd"})
        argv = list(argv) if argv else default_argv()
        cwd = os.path.expanduser(params.get("cwd") or "~")
        if not os.path.isdir(cwd):
            raise rpc.RpcError(
                rpc.INVALID_PARAMS, f"param 'cwd' of terminal.open is not a directory: {cwd!r}", {"param": "cwd"}
            )
        self._opening += 1
        try:
            await self._ensure_warden()
            pty = await PtyProcess.spawn(
                argv,
                cwd=cwd,
                cols=params.get("cols", DEFAULT_COLS),
                rows=params.get("rows", DEFAULT_ROWS),
                nice=self._config.worker_nice,
            )
        except (FileNotFoundError, PermissionError, NotADirectoryError) as exc:
            raise rpc.RpcError(
                rpc.INVALID_PARAMS, f"cannot start {argv[0]!r}: {exc.strerror or exc}", {"param": "argv"}
            ) from None
        except OSError as exc:
            raise rpc.RpcError(rpc.WORKER_START_FAILED, f"cannot start the terminal: {exc}") from None
        finally:
            self._opening -= 1
        terminal_id = secrets.token_hex(8)
        term = Terminal(terminal_id, pty, asyncio.get_running_loop())
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
        return {
            "terminals": [
                {
                    "terminal_id": t.id,
                    "pid": t.pty.pid,
                    "path": f"/pty/{t.id}",
                    "cols": t.pty.cols,
                    "rows": t.pty.rows,
                    "attached": t.attachment is not None,
                    "created_at": t.created_at,
                }
                for t in sorted(self._terminals.values(), key=lambda t: t.created_at)
                if t.state is TerminalState.RUNNING
            ]
        }

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
        await asyncio.gather(
            *(self._teardown(t, "the gateway is shutting down") for t in list(self._terminals.values())),
            return_exceptions=True,
        )
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

        ``/pty`` sockets count in ``max_connections`` with the ``/ws`` ones, and attaches are rate-limited
        gateway-wide; over either limit the socket is closed with 1013 (try again later) and a reason.
        """
        offered = websocket.scope.get("subprotocols") or []
        await websocket.accept(subprotocol=SUBPROTOCOL if SUBPROTOCOL in offered else None)
        limit = self._config.max_connections
        if self._other_connections() + self.sockets >= limit:
            await close_quietly(websocket, CLOSE_TRY_AGAIN, f"connection limit reached: max_connections={limit}")
            return
        if not self._attach_bucket.take():
            await close_quietly(
                websocket,
                CLOSE_TRY_AGAIN,
                "too many terminal attaches: retry in a moment "
                f"(terminal_attach_rate_per_s={self._config.terminal_attach_rate_per_s:g})",
            )
            return
        self.sockets += 1
        try:
            await self._serve_socket(websocket)
        finally:
            self.sockets -= 1

    async def _serve_socket(self, websocket: WebSocket) -> None:
        terminal_id = str(websocket.path_params.get("terminal_id", ""))
        term = self._terminals.get(terminal_id)
        if term is None or term.state is TerminalState.CLOSED:
            if terminal_id in self._exited:
                await close_quietly(websocket, CLOSE_EXITED, "the terminal's process has exited")
            else:
                await close_quietly(websocket, CLOSE_UNKNOWN, "no such terminal")
            return
        view = term.attach(websocket)
        try:
            await relay(term, view, self._config.terminal_input_stall_s)
        finally:
            if term.detach(view) and term.state is TerminalState.RUNNING:
                self._start_grace(term, self._config.terminal_grace_s)

    async def _ensure_warden(self) -> None:
        async with self._warden_lock:
            if self._warden is not None or self._closed:
                return
            try:
                self._warden = await Warden.start(self._config.watchdog_poll_s)
            except OSError as exc:  # best effort: every normal path still ends terminals
                logger.warning(
                    "could not start the terminal warden (%s); terminals will not be ended if the gateway is killed",
                    exc,
                )

    def _start_grace(self, term: Terminal, delay: float) -> None:
        term.cancel_grace()
        term.grace = asyncio.get_running_loop().call_later(
            delay, lambda: self._spawn(self._teardown(term, f"no connection for {delay:g} s"))
        )

    async def _watch_exit(self, term: Terminal) -> None:
        code = await term.pty.wait()
        await self._teardown(term, f"the terminal's process exited ({describe_exit(code)})")

    async def _teardown(self, term: Terminal, reason: str) -> None:
        """The one way a terminal ends; concurrent and repeated calls share the first one's work."""
        if term.teardown is None:
            term.teardown = asyncio.create_task(self._end(term, reason))
        await asyncio.shield(term.teardown)

    async def _end(self, term: Terminal, reason: str) -> None:
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

    def _get(self, terminal_id: str) -> Terminal:
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


async def _wait_event(event: asyncio.Event, timeout: float) -> None:
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(event.wait(), timeout)
