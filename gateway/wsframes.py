"""WebSocket server frames built from bytes, without I/O: what the coalesced write path puts on the socket.

A server's frames are never masked (RFC 6455 section 5.1), so a text frame is a 2, 4 or 10 byte header
followed by the payload unchanged.  The sender writes ``[header, payload, header, payload, ...]`` in one
``transport.writelines``: the payload (an event's UTF-8 bytes, built once) is never copied into a frame.
Same bytes as ``websockets.frames.Frame(Opcode.TEXT, payload).serialize(mask=False)`` (the unit test
compares them).
"""

from __future__ import annotations

import struct
from typing import Protocol

#: FIN + text opcode.
_FIN_TEXT = 0x81
_LEN16 = struct.Struct("!BBH")
_LEN64 = struct.Struct("!BBQ")
#: Single-byte headers for the short payloads (token deltas are most of the traffic by count).
_SHORT_HEADERS = tuple(bytes((_FIN_TEXT, n)) for n in range(126))


def text_header(length: int) -> bytes:
    """The header of a final, unmasked text frame carrying ``length`` payload bytes."""
    if length < 126:
        return _SHORT_HEADERS[length]
    if length < 65536:
        return _LEN16.pack(_FIN_TEXT, 126, length)
    if length >= 1 << 63:
        raise ValueError(f"frame payload too large: {length} bytes")
    return _LEN64.pack(_FIN_TEXT, 127, length)


def text_frame(payload: bytes) -> bytes:
    """One whole text frame (a copy of ``payload``; the sender uses :func:`text_header` to avoid it)."""
    return text_header(len(payload)) + payload


#: The ASGI scope extension under which the gateway's WebSocket protocol offers a :class:`FrameSink`.
SCOPE_EXTENSION = "worker_gateway.frame_sink"


class FrameSink(Protocol):
    """The protocol's side of the coalesced write path (``gateway.wsproto`` implements it)."""

    @property
    def open(self) -> bool:
        """Data frames may still be sent: no close frame was sent or received, the socket is there."""
        ...

    @property
    def paused(self) -> bool:
        """The transport asked for a pause (its buffer is over the high-water mark)."""
        ...

    def buffered(self) -> int:
        """Bytes written but still in the transport's buffer (the kernel did not take them yet)."""
        ...

    def limit_buffer(self, high: int) -> None:
        """Pause writing above ``high`` buffered bytes (only ever lowers the transport's mark)."""
        ...

    async def wait_writable(self) -> None:
        """Until the transport resumes writing (or the connection is lost)."""
        ...

    def write_text(self, payloads: list[bytes]) -> int:
        """Write one text frame per payload in one ``writelines``; returns the payload bytes written."""
        ...


def text_frame_parts(payloads: list[bytes]) -> list[bytes]:
    """``[header, payload, header, payload, ...]`` for one ``writelines`` (no payload copied)."""
    parts: list[bytes] = []
    append = parts.append
    for payload in payloads:
        append(text_header(len(payload)))
        append(payload)
    return parts
