"""The connection's write path over a real uvicorn server and a real ``websockets`` client, in one process:
the coalesced path (the gateway's protocol class offers a frame sink) and the fallback (uvicorn's own
protocol class: one ``send_text`` per frame) must deliver the same frames, settle what was sent, bound
what they buffer, and detect a peer that stopped reading."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import pytest
import uvicorn
import websockets
from support import async_wait_for
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket

from gateway.config import Config
from gateway.connection import Connection
from gateway.wsproto import protocol_class

PATHS = ["coalesced", "fallback"]


class Script:
    """What the app does on a connection: ``run(conn)`` after ``conn.start()``; results are kept here."""

    def __init__(self) -> None:
        self.conns: list[Connection] = []
        self.settled: list[int] = []
        self.done = asyncio.Event()
        self.bytes_sent = 0  # what the connection reports as handed to the socket (its on_sent callback)

    def on_sent(self, nbytes: int) -> None:
        self.bytes_sent += nbytes

    async def run(self, conn: Connection) -> None:
        raise NotImplementedError


@contextlib.asynccontextmanager
async def serve(path: str, script: Script, max_buffered: int = 4 << 20,
                stall_timeout: float | None = None, sndbuf: int | None = None) -> AsyncIterator[str]:
    async def endpoint(websocket: WebSocket) -> None:
        await websocket.accept()
        conn = Connection(websocket, max_buffered, on_sent=script.on_sent, stall_timeout=stall_timeout)
        script.conns.append(conn)
        conn.start()
        try:
            await script.run(conn)
        finally:
            script.done.set()
            await conn.aclose()

    app = Starlette(routes=[WebSocketRoute("/ws", endpoint)])
    ws = protocol_class(Config(host="127.0.0.1")) if path == "coalesced" else "websockets-sansio"
    config = uvicorn.Config(app, ws=ws, lifespan="off", log_level="warning", ws_per_message_deflate=False,
                            ws_ping_interval=None)
    server = uvicorn.Server(config)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if sndbuf is not None:  # accepted sockets inherit it: the kernel then takes a big write in pieces
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
    await async_wait_for(lambda: server.started, 10, what="uvicorn started")
    try:
        yield f"ws://127.0.0.1:{port}/ws"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 20)
        sock.close()


class SendAll(Script):
    """Queue every frame synchronously (so one batch can take them all), then wait for the client."""

    def __init__(self, frames: list[str | bytes]) -> None:
        super().__init__()
        self.frames = frames

    async def run(self, conn: Connection) -> None:
        for seq, frame in enumerate(self.frames, 1):
            conn.send(frame, self.settled.append, seq)
        while (await conn.websocket.receive())["type"] != "websocket.disconnect":
            pass  # until the client hangs up


FRAMES: list[str | bytes] = [
    '{"a":"short str"}',
    b'{"b":"bytes"}',
    "x" * 125,
    b"y" * 126,
    "z" * 65535,
    b"w" * 65536,
    '{"text":"héllo ✓ 🚀"}'.encode(),
    '{"text":"lone \ud800 surrogate"}',  # a peer's string that is not valid Unicode: replaced, not fatal
    *(b'{"n":%d}' % i for i in range(50)),
]


def expected_text(frame: str | bytes) -> str:
    if isinstance(frame, bytes):
        return frame.decode()
    return frame.encode("utf-8", "replace").decode()


@pytest.mark.parametrize("path", PATHS)
async def test_frames_arrive_unchanged_in_order_and_are_settled(path: str) -> None:
    script = SendAll(FRAMES)
    async with serve(path, script) as url, websockets.connect(url, max_size=None) as client:
        received = [await asyncio.wait_for(client.recv(), 10) for _ in FRAMES]
        assert received == [expected_text(f) for f in FRAMES]
        await async_wait_for(lambda: script.settled and script.settled[-1] == len(FRAMES), 10, what="settled")
        (conn,) = script.conns
        assert conn.fast_path is (path == "coalesced")
    assert script.settled == sorted(script.settled)
    if path == "coalesced":
        # Queued before the sender ran, well under one batch's bound: written and settled in one go.
        assert script.settled == [len(FRAMES)]
    else:
        assert script.settled == list(range(1, len(FRAMES) + 1))


class ReplyThenEvents(Script):
    """A reply on an idle connection, then events and replies mixed: the reply is handed to the socket
    before ``send`` returns (no turn of the loop for the sender task); a reply sent while events wait in
    the queue goes after them."""

    def __init__(self) -> None:
        super().__init__()
        self.reply_sent_at_once = False

    async def run(self, conn: Connection) -> None:
        conn.send('{"reply":0}')
        self.reply_sent_at_once = self.bytes_sent == len('{"reply":0}')
        for seq in range(1, 21):
            conn.send(b'{"event":%d}' % seq, self.settled.append, seq)
            if seq % 5 == 0:
                conn.send('{"reply":%d}' % seq)
        while (await conn.websocket.receive())["type"] != "websocket.disconnect":
            pass


@pytest.mark.parametrize("path", PATHS)
async def test_a_reply_on_an_idle_connection_goes_out_at_once_and_never_overtakes_queued_events(path: str) -> None:
    script = ReplyThenEvents()
    async with serve(path, script) as url, websockets.connect(url, max_size=None) as client:
        received = [await asyncio.wait_for(client.recv(), 10) for _ in range(25)]
    expected = ['{"reply":0}']
    for seq in range(1, 21):
        expected.append(f'{{"event":{seq}}}')
        if seq % 5 == 0:
            expected.append(f'{{"reply":{seq}}}')
    assert received == expected
    assert script.reply_sent_at_once is (path == "coalesced")  # the fallback always goes through send_text


class Interleaved(Script):
    """Two sessions' events alternating on one connection, each with its own settler."""

    def __init__(self, count: int) -> None:
        super().__init__()
        self.count = count
        self.by_session: dict[str, list[int]] = {"a": [], "b": []}

    async def run(self, conn: Connection) -> None:
        for seq in range(1, self.count + 1):
            for name, settled in self.by_session.items():
                conn.send(b'{"s":"%s","seq":%d}' % (name.encode(), seq), settled.append, seq)
        while (await conn.websocket.receive())["type"] != "websocket.disconnect":
            pass


@pytest.mark.parametrize("path", PATHS)
async def test_interleaved_sessions_are_each_settled_once_per_batch(path: str) -> None:
    script = Interleaved(40)
    async with serve(path, script) as url, websockets.connect(url, max_size=None) as client:
        received = [await asyncio.wait_for(client.recv(), 10) for _ in range(80)]
        assert received == [f'{{"s":"{n}","seq":{seq}}}' for seq in range(1, 41) for n in "ab"]
        await async_wait_for(lambda: all(s and s[-1] == 40 for s in script.by_session.values()), 10,
                             what="both settled")
    for settled in script.by_session.values():
        assert settled == ([40] if path == "coalesced" else list(range(1, 41)))


class Flood(Script):
    """Push 64 KiB frames whenever the budget has room; record the most ever held outbound."""

    def __init__(self) -> None:
        super().__init__()
        self.peak_outbound = 0
        self.sent = 0

    async def run(self, conn: Connection) -> None:
        chunk = b'{"p":"' + b"q" * 65_000 + b'"}'
        while conn.is_open:
            if conn.has_room:
                self.sent += 1
                conn.send(chunk, self.settled.append, self.sent)
                self.peak_outbound = max(self.peak_outbound, conn.outbound_bytes)
            else:
                await asyncio.wait_for(conn.wait_for_room(), 30)
            if self.sent % 8 == 0:
                await asyncio.sleep(0)


@pytest.mark.parametrize("path", PATHS)
async def test_a_peer_that_stops_reading_is_bounded_then_detected(path: str) -> None:
    script = Flood()
    budget = 512 * 1024
    async with serve(path, script, max_buffered=budget, stall_timeout=1.0) as url:
        # A raw socket that completes the handshake, then never reads again.
        host, port = url.removeprefix("ws://").split("/")[0].split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 101")
        try:
            await async_wait_for(lambda: script.conns, 10, what="the connection")
            (conn,) = script.conns
            await asyncio.wait_for(asyncio.shield(conn.stalled), 60)
            assert not conn.is_open
        finally:
            writer.transport.abort()
    # What the app held for this connection stayed within its budget (plus the one frame that crossed it).
    assert script.peak_outbound < budget + 70_000
    assert script.settled == sorted(script.settled) and script.sent > budget // 65_000


class OneHugeReply(Script):
    """One frame far larger than the budget (an ``events.since`` page can be 8 MiB against a 4 MiB budget),
    with a drain listener registered, as a session that stopped pumping would have."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self.drained = asyncio.Event()

    async def run(self, conn: Connection) -> None:
        conn.add_drain_listener("session", self.drained.set)
        conn.send(b'"' + b"x" * self.size + b'"', self.settled.append, 1)
        while (await conn.websocket.receive())["type"] != "websocket.disconnect":
            pass


@pytest.mark.parametrize("path", PATHS)
async def test_the_budget_reopens_once_the_client_has_read_a_reply_larger_than_it(path: str) -> None:
    script = OneHugeReply(2 * 1024 * 1024)
    async with serve(path, script, max_buffered=512 * 1024, sndbuf=32 * 1024) as url:
        host, port = url.removeprefix("ws://").split("/")[0].split(":")
        client_sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        client_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
        client_sock.connect((host, int(port)))
        client_sock.setblocking(False)
        async with websockets.connect(url, sock=client_sock, max_size=None) as client:
            message = await asyncio.wait_for(client.recv(), 30)
            assert len(message) == script.size + 2
            (conn,) = script.conns
            # Before the fix the transport drained with nothing queued and nobody looked again: the room
            # stayed closed (the receive loop waits on it) and the drain listeners were never called.
            await asyncio.wait_for(conn.wait_for_room(), 10)
            await asyncio.wait_for(script.drained.wait(), 10)
            assert conn.has_room and script.settled == [1]
