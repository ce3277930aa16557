"""A byte-counting benchmark client: the WebSocket handshake by hand on a plain asyncio transport, frames
counted from their headers (``bench.wsframes``), so the gateway's capacity is not hidden behind the Python
``websockets`` client's per-frame cost.

It speaks just enough of the protocol for the benchmarks: JSON-RPC requests as masked text frames, the
responses and the few small events it needs (``gateway.ready``, ``turn.complete``) parsed, every other event
only counted (type read from the envelope prefix), pings answered with pongs.  Same interface as
``bench.wsclient.BenchClient`` for what the relay and scale benchmarks use.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.parse

from bench.wsclient import EVENT_PREFIX, RpcSide, _fail
from bench.wsframes import (FrameError, FrameScanner, Opcode, check_handshake_response, client_frame,
                            handshake_request, new_key)

_PARSED_PREFIXES = tuple(EVENT_PREFIX + kind + b'"' for kind in
                         (b"turn.complete", b"gateway.ready", b"session.closed", b"worker.exited"))


class _Protocol(asyncio.Protocol):
    def __init__(self, client: RawClient) -> None:
        self.client = client

    def data_received(self, data: bytes) -> None:
        self.client._on_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client._on_lost(repr(exc) if exc else "eof")


class RawClient(RpcSide):
    """One connection; see the module docstring.  ``open`` does the handshake and waits for ``gateway.ready``."""

    def __init__(self) -> None:
        super().__init__()
        self._scanner = FrameScanner()
        self._transport: asyncio.Transport | None = None
        self._writer: asyncio.StreamWriter | None = None  # kept: dropping it may close the transport
        self._message_head = b""  # first fragment of a fragmented message

    @classmethod
    async def open(cls, url: str, *, timeout: float = 30.0) -> RawClient:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "ws" or not parts.hostname:
            raise ValueError(f"only ws:// URLs: {url!r}")
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        reader, writer = await asyncio.wait_for(asyncio.open_connection(parts.hostname, parts.port or 80), timeout)
        key = new_key()
        try:
            writer.write(handshake_request(parts.hostname, parts.port or 80, target, key))
            response = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
            check_handshake_response(response, key)
        except BaseException:
            writer.transport.abort()  # no half-open socket left behind by a refused handshake
            raise
        client = cls()
        leftover = bytes(reader._buffer)  # noqa: SLF001 - frames that arrived with the response
        reader._buffer.clear()  # noqa: SLF001
        transport = writer.transport
        protocol = _Protocol(client)
        transport.set_protocol(protocol)
        client._transport = transport  # type: ignore[assignment]
        client._writer = writer
        if leftover:
            client._on_data(leftover)
        if transport.is_closing():
            client._on_lost("closed during the handshake")
        transport.resume_reading()
        await asyncio.wait_for(asyncio.shield(client.ready), timeout)
        return client

    @property
    def closed(self) -> bool:
        return self.closed_at is not None

    # Receiving ---------------------------------------------------------------------------------------------
    def _on_data(self, data: bytes) -> None:
        try:
            frames = self._scanner.feed(data)
        except FrameError as exc:
            self._on_lost(f"protocol error: {exc}")
            if self._transport is not None:
                self._transport.abort()
            return
        c = self.counters
        now = time.perf_counter()
        for f in frames:
            if self.closed_at is not None:
                return  # nothing after a close frame counts (RFC 6455 5.5.1)
            opcode = f.opcode
            if opcode == Opcode.TEXT or opcode == Opcode.CONTINUATION:
                c.frames += 1
                c.bytes += f.length
                head = f.head
                if opcode == Opcode.CONTINUATION:
                    head = self._message_head
                elif not f.fin:
                    self._message_head = head
                if head.startswith(EVENT_PREFIX):
                    c.event_bytes += f.length
                    if opcode == Opcode.TEXT:
                        c.events += 1
                        if c.first_event_at is None:
                            c.first_event_at = now
                    c.last_event_at = now
                    if f.fin and opcode == Opcode.TEXT and f.whole and head.startswith(_PARSED_PREFIXES):
                        self._on_event(json.loads(head)["params"])
                elif f.fin and opcode == Opcode.TEXT and f.whole:
                    message = json.loads(head)
                    future = self._pending.pop(message.get("id"), None)
                    if future is not None and not future.done():
                        future.set_result(message)
            elif opcode == Opcode.PING:
                self._send(Opcode.PONG, f.head)
            elif opcode == Opcode.CLOSE:
                code = int.from_bytes(f.head[:2], "big") if len(f.head) >= 2 else 1005
                self._send(Opcode.CLOSE, f.head[:2])
                self._on_lost(str(code))
                if self._transport is not None:
                    self._transport.close()

    def _on_lost(self, reason: str) -> None:
        if self.closed_at is not None:
            return
        self.closed_at = time.perf_counter()
        self.close_reason = reason
        failure = ConnectionError(f"connection closed ({reason})")
        for future in [*self._pending.values(), *self._turns.values(), self.ready]:
            _fail(future, failure)

    # Sending -----------------------------------------------------------------------------------------------
    def _send(self, opcode: int, payload: bytes) -> None:
        if self._transport is None or self._transport.is_closing():
            raise ConnectionError(f"connection closed ({self.close_reason or 'closing'})")
        self._transport.write(client_frame(opcode, payload))

    async def send_text(self, text: str) -> None:
        self._send(Opcode.TEXT, text.encode())

    async def close(self) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        try:
            self._send(Opcode.CLOSE, (1000).to_bytes(2, "big"))
        except ConnectionError:
            pass
        try:
            await asyncio.wait_for(_until(lambda: self.closed), 5)
        except asyncio.TimeoutError:
            pass
        transport.close()
        self._on_lost("closed by the client")


async def _until(predicate) -> None:  # type: ignore[no-untyped-def]
    """Wait for ``predicate`` (the close handshake finishing), polling a short interval."""
    while not predicate():
        await asyncio.sleep(0.01)
