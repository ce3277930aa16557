"""The pipe-hop floor: what any relay that keeps the worker's pipe hop costs, with nothing else in it.

The gateway's one rule puts every byte a session streams through a pipe from a worker process before it
reaches the socket.  This server does only that, as cheaply as Python on uvloop can: a producer process
writes length-prefixed, fully built event frames into a pipe (one ``write`` per frame, as a worker does);
the server reads the pipe in 1 MiB ``readv`` calls, copies each frame's bytes out once, and writes every
frame of a read with one ``writelines`` of WebSocket frame headers and payloads, pausing the pipe while the
transport is over its high-water mark.  No envelope, no seq, no UTF-8 check, no replay buffer, no store,
no JSON-RPC: the gateway does all of those on top, so its rate is at most this one's.

It speaks the bare endpoint's protocol (``bench.baseline_app``): after ``gateway.ready`` (whose payload
carries the producer's pid, for CPU accounting) the client sends ``{"count": n, "chunk_kb": k,
"turn_id": t}`` (or ``"delta_bytes"`` instead of ``chunk_kb``) and gets ``n`` frames, then
``turn.complete``.  ``python -m bench.floor_app --port 0`` prints ``FLOOR_READY port=N``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import struct
import subprocess
import sys

from bench.baseline_app import _chunk_text
from bench.wsframes import accept_value, apply_mask, payload_length
from gateway import rpc, wsframes
from workers.encoding import encode_json

READY_PREFIX = "FLOOR_READY"
READ_BYTES = 1 << 20
_LEN = struct.Struct("!I")
_ASK = struct.Struct("!II")  # count, frame length: what the server tells the producer per transfer
_END = _LEN.pack(0)  # a zero-length frame: the transfer is done


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _read_exactly(stream: object, n: int) -> bytes | None:
    data = stream.read(n)  # type: ignore[attr-defined]
    return data if len(data) == n else None


def produce() -> int:
    """The producer: per request on stdin (count, length, frame), ``count`` frames on stdout, then the end."""
    stdin, out = sys.stdin.buffer, sys.stdout.fileno()
    while (head := _read_exactly(stdin, _ASK.size)) is not None:
        count, length = _ASK.unpack(head)
        event = _read_exactly(stdin, length)
        if event is None:
            return 1
        frame = _LEN.pack(length) + event
        for _ in range(count):
            _write_all(out, frame)
        _write_all(out, _END)
    return 0


def _event(ask: dict[str, object], turn_id: str) -> bytes:
    if "delta_bytes" in ask:
        payload = {"turn_id": turn_id, "text": "x" * int(ask["delta_bytes"])}  # type: ignore[call-overload]
        return rpc.wrap_event("message.delta", encode_json(payload), "sfloor", 1)
    size = int(ask["chunk_kb"]) * 1024  # type: ignore[call-overload]
    payload = {"turn_id": turn_id, "text": _chunk_text("floor", size, []), "redactions": 0}
    return rpc.wrap_event("tool.output", encode_json(payload), "sfloor", 1)


class FloorProtocol(asyncio.Protocol):
    """One connection: the handshake by hand, then transfers relayed from this connection's producer."""

    def __init__(self, buffer: bytearray) -> None:
        self.buffer = buffer  # the loop's one read buffer
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.request = b""
        self.upgraded = False
        self.incoming = b""
        self.producer: subprocess.Popen[bytes] | None = None
        self.pipe_fd = -1
        self.reading = False
        self.paused = False
        self.carry = b""
        self.turn_id = ""

    # Client side -------------------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        if not self.upgraded:
            self.request += data
            head, sep, rest = self.request.partition(b"\r\n\r\n")
            if sep:
                self._upgrade(head)
                self.incoming = rest
        else:
            self.incoming += data
        if self.upgraded:
            self._client_frames()

    def _upgrade(self, head: bytes) -> None:
        assert self.transport is not None
        key = next((line.split(b":", 1)[1].strip().decode() for line in head.split(b"\r\n")
                    if line.lower().startswith(b"sec-websocket-key:")), "")
        self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                             b"Sec-WebSocket-Accept: " + accept_value(key).encode() + b"\r\n\r\n")
        self.upgraded = True
        r, w = os.pipe()
        self.producer = subprocess.Popen([sys.executable, "-m", "bench.floor_app", "--producer"],
                                         stdin=subprocess.PIPE, stdout=w)
        os.close(w)
        self.pipe_fd = r
        ready = encode_json({"version": "floor", "producer_pid": self.producer.pid})
        self.transport.write(wsframes.text_frame(rpc.wrap_event("gateway.ready", ready, "sfloor", 0)))

    def _client_frames(self) -> None:
        """Masked client frames (RFC 6455 5.2): text starts a transfer, ping is answered, close ends."""
        assert self.transport is not None
        data = self.incoming
        while (sized := payload_length(data, 0, len(data))) is not None:
            opcode, (n, pos) = data[0] & 0x0F, sized
            if len(data) < pos + 4 + n:
                break
            payload = apply_mask(data[pos + 4 : pos + 4 + n], data[pos : pos + 4])
            data = data[pos + 4 + n :]
            if opcode == 1:
                self._start(json.loads(payload))
            elif opcode == 9:
                self.transport.write(bytes((0x8A, len(payload))) + payload)
            elif opcode == 8:
                self.transport.write(b"\x88\x02" + payload[:2])
                self.transport.close()
                break
        self.incoming = data

    def _start(self, ask: dict[str, object]) -> None:
        assert self.producer is not None and self.producer.stdin is not None
        self.turn_id = str(ask["turn_id"])
        event = _event(ask, self.turn_id)
        self.producer.stdin.write(_ASK.pack(int(ask["count"]), len(event)) + event)  # type: ignore[call-overload]
        self.producer.stdin.flush()
        self._read_pipe(True)

    def connection_lost(self, exc: Exception | None) -> None:
        self._read_pipe(False)
        if self.pipe_fd >= 0:
            os.close(self.pipe_fd)
            self.pipe_fd = -1
        if self.producer is not None:
            assert self.producer.stdin is not None
            self.producer.stdin.close()  # its loop ends at EOF (or its next write fails: the pipe is closed)
            self.loop.run_in_executor(None, self.producer.wait)

    # Flow control ------------------------------------------------------------------------------------------
    def pause_writing(self) -> None:
        self.paused = True
        self._read_pipe(False)

    def resume_writing(self) -> None:
        self.paused = False
        if self.turn_id:
            self._read_pipe(True)

    def _read_pipe(self, on: bool) -> None:
        if on and not self.reading and not self.paused and self.pipe_fd >= 0:
            self.loop.add_reader(self.pipe_fd, self._readable)
            self.reading = True
        elif not on and self.reading:
            self.loop.remove_reader(self.pipe_fd)
            self.reading = False

    # The relay ---------------------------------------------------------------------------------------------
    def _readable(self) -> None:
        assert self.transport is not None
        n = os.readv(self.pipe_fd, [self.buffer])
        if n == 0:  # the producer died: nothing more will come
            self._read_pipe(False)
            return
        data: bytes | memoryview = self.carry + self.buffer[:n] if self.carry else memoryview(self.buffer)[:n]
        size, pos, frames, done = len(data), 0, [], False
        while size - pos >= 4:
            length = _LEN.unpack_from(data, pos)[0]
            if length == 0:
                pos, done = pos + 4, True
                break
            if pos + 4 + length > size:
                break
            frames.append(bytes(data[pos + 4 : pos + 4 + length]))
            pos += 4 + length
        self.carry = bytes(data[pos:])
        if frames:
            self.transport.writelines(wsframes.text_frame_parts(frames))
        if done:
            complete = encode_json({"turn_id": self.turn_id, "status": "ok"})
            self.transport.write(wsframes.text_frame(rpc.wrap_event("turn.complete", complete, "sfloor", 2)))
            self.turn_id = ""
            self._read_pipe(False)


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    buffer = bytearray(READ_BYTES)
    server = await loop.create_server(lambda: FloorProtocol(buffer), host, port)
    print(f"{READY_PREFIX} port={server.sockets[0].getsockname()[1]}", flush=True)
    await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floor_app", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--producer", action="store_true", help="run as a connection's producer (internal)")
    args = parser.parse_args(argv)
    if args.producer:
        return produce()
    import uvloop

    uvloop.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
