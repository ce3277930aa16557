"""Issue 13 section 5, slowloris: connections that send nothing or a partial request head are closed after
the head deadline, and connections still waiting for a head are capped (raw sockets, real gateway)."""

from __future__ import annotations

import asyncio
import socket
import time

from support import TOKEN, GatewayProcess, RpcClient, wait_for
from gateway.httpproto import pending_cap


def connect(gw: GatewayProcess) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", gw.port), timeout=5)
    sock.setblocking(False)
    return sock


def closed_by_server(sock: socket.socket) -> bool:
    try:
        while True:
            if not sock.recv(65536):
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_pending_cap_follows_the_fd_limit() -> None:
    assert pending_cap(64, 1024) == 64
    assert pending_cap(64, 128) == 32
    assert pending_cap(64, None) == 64
    assert pending_cap(64, 2) == 1


def test_silent_and_partial_heads_are_closed_after_the_deadline(gateway_factory) -> None:
    gw = gateway_factory("--handshake-timeout-s", "1")
    started = time.monotonic()  # before connecting: the server's deadline starts later than this
    silent = connect(gw)
    partial = connect(gw)
    partial.send(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgr")
    wait_for(lambda: closed_by_server(silent) and closed_by_server(partial), 15, 0.05,
             "the server to close the silent and the partial connection")
    assert time.monotonic() - started >= 0.9  # not closed at once: they had their 1 s deadline
    # A keep-alive connection that starts a second head and stalls is closed too.
    keep = connect(gw)
    keep.setblocking(True)
    keep.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert keep.recv(65536).startswith(b"HTTP/1.1 200")
    keep.setblocking(False)
    keep.send(b"GET /healthz HTTP/1.1\r\nHo")
    wait_for(lambda: closed_by_server(keep), 15, 0.05, "the server to close the stalled keep-alive request")
    for sock in (silent, partial, keep):
        sock.close()


async def test_full_heads_are_unaffected_by_the_deadline(gateway_factory) -> None:
    """A WebSocket that completed its handshake lives past the head deadline."""
    gw = gateway_factory("--handshake-timeout-s", "0.5")
    async with RpcClient.connect(gw.url()) as client:
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:  # observe it across 4 deadlines
            assert await client.call("gateway.ping") == {"ok": True}
            await asyncio.sleep(0.2)


async def test_pending_connections_are_capped_and_real_clients_still_get_in(gateway_factory) -> None:
    gw = gateway_factory("--max-pending-connections", "8", "--handshake-timeout-s", "60")
    hogs = [connect(gw) for _ in range(30)]
    try:
        # The oldest waiting connections were dropped to keep at most 8 waiting...
        wait_for(lambda: sum(closed_by_server(s) for s in hogs) >= 30 - 8, 15, 0.05,
                 "the server to drop all but 8 of the silent connections")
        # ...and a real client gets in at once, long before the 60 s deadline.
        async with RpcClient.connect(f"ws://127.0.0.1:{gw.port}/ws?token={TOKEN}") as client:
            assert await client.call("gateway.ping") == {"ok": True}
        assert "waiting for a request head" in gw.stderr()
    finally:
        for sock in hogs:
            sock.close()
