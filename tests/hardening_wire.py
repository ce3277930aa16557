"""A minimal RFC 6455 client on a raw socket, for the hardening tests.

``websockets`` (rightly) refuses to send what a compliant client never sends (invalid UTF-8 in a text
frame), and always answers pings; these tests need both: frames with arbitrary opcode and payload, and a
peer that completes the handshake, owns a session, and then stops reading (a half-open connection).
Everything waits with a deadline.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import time
from typing import Any

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def encode_client_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """One masked client frame (clients must mask, RFC 6455 section 5.3)."""
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 1 << 16:
        head += bytes([0x80 | 126]) + struct.pack(">H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack(">Q", n)
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


class RawWebSocket:
    """A WebSocket client that does only what the test tells it to (never answers pings by itself)."""

    def __init__(self, port: int, token: str, path: str = "/ws", timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {path}?token={token} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                           "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        buf = b""
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in buf:
            assert time.monotonic() < deadline, "no handshake response"
            chunk = self.sock.recv(4096)
            assert chunk, "server closed during the handshake"
            buf += chunk
        head, _, self._buf = buf.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head

    def close(self) -> None:
        self.sock.close()

    def send_frame(self, opcode: int, payload: bytes, fin: bool = True) -> None:
        self.sock.sendall(encode_client_frame(opcode, payload, fin))

    def send_text(self, text: str) -> None:
        self.send_frame(OP_TEXT, text.encode())

    def send_json(self, obj: Any) -> None:
        self.send_text(json.dumps(obj))

    def recv_frame(self, timeout: float = 10.0) -> tuple[int, bytes]:
        """The next server frame as (opcode, payload); raises EOFError when the server closed the socket."""
        deadline = time.monotonic() + timeout
        while True:
            frame = self._parse()
            if frame is not None:
                return frame
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no frame within {timeout}s")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                continue
            except ConnectionError as exc:
                raise EOFError(str(exc)) from None
            if not chunk:
                raise EOFError("server closed the connection")
            self._buf += chunk

    def recv_json(self, timeout: float = 10.0) -> dict[str, Any]:
        """The next text frame as JSON, skipping pings (which this client deliberately leaves unanswered)."""
        deadline = time.monotonic() + timeout
        while True:
            opcode, payload = self.recv_frame(max(0.01, deadline - time.monotonic()))
            if opcode == OP_TEXT:
                return json.loads(payload)
            if opcode == OP_CLOSE:
                raise EOFError(f"close frame {payload[:2].hex()} {payload[2:]!r}")

    def call(self, method: str, params: dict[str, Any] | None = None, request_id: int = 1,
             timeout: float = 30.0) -> dict[str, Any]:
        """Send a request and return its response, dropping events that arrive before it."""
        msg: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": method}
        if params is not None:
            msg["params"] = params
        self.send_json(msg)
        deadline = time.monotonic() + timeout
        while True:
            msg = self.recv_json(max(0.01, deadline - time.monotonic()))
            if msg.get("id") == request_id and ("result" in msg or "error" in msg):
                return msg

    def close_code(self, timeout: float = 10.0) -> int | None:
        """Read until the server's close frame (its code) or EOF (None)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                opcode, payload = self.recv_frame(max(0.01, deadline - time.monotonic()))
            except EOFError:
                return None
            if opcode == OP_CLOSE:
                return struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else 1005

    def _parse(self) -> tuple[int, bytes] | None:
        buf = self._buf
        if len(buf) < 2:
            return None
        opcode = buf[0] & 0x0F
        n = buf[1] & 0x7F
        pos = 2
        if n == 126:
            if len(buf) < 4:
                return None
            n = struct.unpack(">H", buf[2:4])[0]
            pos = 4
        elif n == 127:
            if len(buf) < 10:
                return None
            n = struct.unpack(">Q", buf[2:10])[0]
            pos = 10
        if buf[1] & 0x80:  # servers never mask; tolerate it anyway
            pos += 4
        if len(buf) < pos + n:
            return None
        self._buf = buf[pos + n:]
        return opcode, buf[pos:pos + n]
