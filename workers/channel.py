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

import enum
import json
import struct
from dataclasses import dataclass
from typing import Any

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


def encode_json(obj: Any) -> bytes:
    """Compact JSON bytes, the one encoding used for payloads and control bodies."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def event_frame(event_type: str, payload: Any) -> bytes:
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
                    f"corrupt frame header: length {length}, name length {name_len} (limit {self._max})")
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
