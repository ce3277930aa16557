"""WebSocket framing for the raw benchmark client (RFC 6455), without I/O: the handshake request and its
check, masked client frames, and an incremental scanner that reads only frame headers.

Why: a client that decodes every frame in Python (``websockets``) caps what a benchmark can see at its own
per-frame cost.  The scanner looks at the 2 to 14 header bytes of each frame, keeps small payloads whole
(responses, ``turn.complete``, control frames) and only a short prefix of big ones (enough to read the
event type), and skips the rest of a big payload without copying it.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import os
import struct
from dataclasses import dataclass

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#: Payloads up to this size are kept whole; bigger ones only their first ``PREFIX_KEEP`` bytes.
KEEP_WHOLE = 4096
PREFIX_KEEP = 96
_MAX_HEADER = 14


class Opcode(enum.IntEnum):
    CONTINUATION = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA


class FrameError(ValueError):
    """The byte stream is not a valid server-to-client WebSocket stream."""


@dataclass(frozen=True, slots=True)
class Frame:
    """One frame seen by the scanner: ``head`` is the whole payload when ``length <= keep_whole``, else its
    first ``PREFIX_KEEP`` bytes; ``wire`` is the frame's size on the wire (header + payload)."""

    opcode: int
    fin: bool
    length: int
    head: bytes
    wire: int

    @property
    def whole(self) -> bool:
        return len(self.head) == self.length


# Handshake ---------------------------------------------------------------------------------------------------
def handshake_request(host: str, port: int, target: str, key: str, headers: dict[str, str] | None = None) -> bytes:
    """The HTTP/1.1 Upgrade request (``target`` is the path with its query, e.g. ``/ws?token=T``)."""
    lines = [f"GET {target} HTTP/1.1", f"Host: {host}:{port}", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def new_key() -> str:
    return base64.b64encode(os.urandom(16)).decode("ascii")


def accept_value(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + _GUID).digest()).decode("ascii")


def check_handshake_response(response: bytes, key: str) -> None:
    """Raise ``FrameError`` unless ``response`` (status line and headers, up to the blank line) accepts the
    upgrade for ``key``."""
    text = response.decode("latin-1")
    status, _, rest = text.partition("\r\n")
    parts = status.split(" ", 2)
    if len(parts) < 2 or parts[1] != "101":
        raise FrameError(f"handshake refused: {status!r}")
    headers = {}
    for line in rest.split("\r\n"):
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    if headers.get("sec-websocket-accept") != accept_value(key):
        raise FrameError("handshake: wrong Sec-WebSocket-Accept")


# Client frames -----------------------------------------------------------------------------------------------
def client_frame(opcode: int, payload: bytes, mask: bytes | None = None) -> bytes:
    """One unfragmented masked frame (clients must mask, RFC 6455 5.3)."""
    mask = os.urandom(4) if mask is None else mask
    n = len(payload)
    first = 0x80 | opcode
    if n < 126:
        header = struct.pack("!BB", first, 0x80 | n)
    elif n < 1 << 16:
        header = struct.pack("!BBH", first, 0x80 | 126, n)
    else:
        header = struct.pack("!BBQ", first, 0x80 | 127, n)
    return header + mask + apply_mask(payload, mask)


def apply_mask(payload: bytes, mask: bytes) -> bytes:
    """XOR with the 4-byte mask, as one big-integer operation (fast enough for requests)."""
    if not payload:
        return b""
    n = len(payload)
    repeated = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(n, "big")


def payload_length(buf: bytes | bytearray, pos: int, end: int) -> tuple[int, int] | None:
    """(payload length, header bytes before the payload or its mask) of the frame at ``pos`` (RFC 6455 5.2:
    7 bits, or 126 then 16, or 127 then 64), or None while its length bytes are not all in ``buf`` yet."""
    if end - pos < 2:
        return None
    length = buf[pos + 1] & 0x7F
    if length == 126:
        return (int.from_bytes(buf[pos + 2:pos + 4], "big"), 4) if end - pos >= 4 else None
    if length == 127:
        return (int.from_bytes(buf[pos + 2:pos + 10], "big"), 10) if end - pos >= 10 else None
    return length, 2


# Server frames -----------------------------------------------------------------------------------------------
class FrameScanner:
    """Incremental: ``feed`` each chunk read from the socket, get the frames seen in it, in order.

    A big frame is reported as soon as its header and prefix are in (its remaining payload is skipped as it
    arrives); a small one once it is complete.  Between chunks it keeps at most one partial header or small
    payload (``carry``) and a count of bytes to skip.
    """

    def __init__(self, keep_whole: int = KEEP_WHOLE, prefix_keep: int = PREFIX_KEEP) -> None:
        if prefix_keep > keep_whole:
            raise ValueError("prefix_keep must not exceed keep_whole")
        self.keep_whole = keep_whole
        self.prefix_keep = prefix_keep
        self._carry = b""
        self._skip = 0

    @property
    def pending(self) -> int:
        """Bytes held back (carry) or still to skip: 0 exactly on a frame boundary."""
        return len(self._carry) + self._skip

    def feed(self, data: bytes) -> list[Frame]:
        out: list[Frame] = []
        pos, end = 0, len(data)
        if self._skip:
            taken = min(self._skip, end)
            self._skip -= taken
            pos = taken
        if self._carry and pos < end:
            carry = self._carry
            joined = carry + data[pos:pos + self.keep_whole + _MAX_HEADER]
            unit = self._unit(joined, 0, len(joined))
            if unit is None:
                self._carry = joined
                return out
            frame, used, skip = unit
            out.append(frame)
            self._carry = b""
            pos += used - len(carry)
            if skip:
                taken = min(skip, end - pos)
                pos += taken
                self._skip = skip - taken
        while pos < end and not self._skip:
            unit = self._unit(data, pos, end)
            if unit is None:
                self._carry = data[pos:]
                break
            frame, used, skip = unit
            out.append(frame)
            pos += used
            if skip:
                taken = min(skip, end - pos)
                pos += taken
                self._skip = skip - taken
        return out

    def _unit(self, buf: bytes, pos: int, end: int) -> tuple[Frame, int, int] | None:
        """The frame starting at ``pos``: (frame, bytes used for its header and head, payload bytes left
        to skip), or None when the header or the head is not all in ``buf`` yet."""
        if end - pos < 2:
            return None
        b0, b1 = buf[pos], buf[pos + 1]
        if b1 & 0x80:
            raise FrameError("a server frame must not be masked")
        if b0 & 0x70:
            raise FrameError("reserved bits set (no extension was negotiated)")
        sized = payload_length(buf, pos, end)
        if sized is None:
            return None
        length, header = sized
        opcode = b0 & 0x0F
        if opcode >= 0x8 and (length > 125 or not b0 & 0x80):
            raise FrameError("control frames must be unfragmented and at most 125 bytes")
        keep = length if length <= self.keep_whole else self.prefix_keep
        start = pos + header
        if end - start < keep:
            return None
        return (Frame(opcode, bool(b0 & 0x80), length, bytes(buf[start:start + keep]), header + length),
                header + keep, length - keep)
