"""One socket's view of a terminal: the replay snapshot taken at attach, then live bytes (no I/O here)."""

from __future__ import annotations

import asyncio

from starlette.websockets import WebSocket


class Attachment:
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
        self.client_gone = False  # the client's disconnect was received

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
