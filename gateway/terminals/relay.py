"""The ``/pty/{terminal_id}`` socket relay: the replay, then live output out; keystrokes and resizes in."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from starlette.websockets import WebSocket

from gateway.terminals.pty_side import InputStalled, Terminal
from gateway.terminals.view import Attachment

SEND_CHUNK = 64 * 1024
#: Seconds to deliver the last output before the 4410 close, and to close a superseded socket.
DRAIN_TIMEOUT_S = 5.0
SUPERSEDE_TIMEOUT_S = 1.0
#: Close code for a view whose program stopped reading its input (the client may be gone already).
CLOSE_INPUT_STALLED = 1011


async def relay(term: Terminal, view: Attachment, input_stall_s: float) -> None:
    """Relay until the client leaves or the view is closed (superseded, program exited, input stalled)."""
    sender = asyncio.create_task(_send_output(term, view))
    receiver = asyncio.create_task(_receive_input(term, view, input_stall_s))
    closing = asyncio.create_task(view.closing.wait())
    tasks = (sender, receiver, closing)
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        if view.close_code is not None and not sender.done() and not receiver.done():
            timeout = DRAIN_TIMEOUT_S if view.drain else SUPERSEDE_TIMEOUT_S
            await asyncio.wait((sender, receiver), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        client_left = view.client_gone
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    if view.close_code is not None and not client_left:
        await close_quietly(view.websocket, view.close_code, view.close_reason)


async def _send_output(term: Terminal, view: Attachment) -> None:
    ws = view.websocket
    replay, view.replay = view.replay, b""
    for start in range(0, len(replay), SEND_CHUNK):
        if view.close_code is not None and not view.drain:
            return
        await ws.send_bytes(replay[start : start + SEND_CHUNK])
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


async def _receive_input(term: Terminal, view: Attachment, input_stall_s: float) -> None:
    try:
        await _receive(term, view, input_stall_s)
    except InputStalled as exc:  # a client that is gone cannot be told; one that is there gets 1011
        view.request_close(CLOSE_INPUT_STALLED, str(exc), drain=False)


async def _receive(term: Terminal, view: Attachment, input_stall_s: float) -> None:
    while True:
        message = await view.websocket.receive()
        if message["type"] == "websocket.disconnect":
            view.client_gone = True
            return
        data = message.get("bytes")
        text = message.get("text")
        if data is not None:
            await term.write_input(data, input_stall_s)
        elif text is not None:
            control = _control_message(text)
            if control is None:
                await term.write_input(text.encode("utf-8"), input_stall_s)
            elif control.get("type") == "resize":
                cols, rows = control.get("cols"), control.get("rows")
                if isinstance(cols, int) and isinstance(rows, int) and _is_int(cols) and _is_int(rows):
                    term.pty.resize(cols, rows)


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


async def close_quietly(websocket: WebSocket, code: int, reason: str) -> None:
    """Close with ``code``; a peer that is already gone (or too slow to take a close frame) is not an error."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(websocket.close(code, reason[:120]), 2.0)
