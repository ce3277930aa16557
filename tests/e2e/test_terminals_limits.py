"""Terminals under pressure, against a real gateway: many attaches keep the loop responsive, attaches are
rate-limited, ``/pty`` sockets count in ``max_connections``, and a terminal whose input is backed up and
whose client vanished is still reaped (issue 13 sections 4 and 5)."""

from __future__ import annotations

import asyncio
import json
import sys
import urllib.request
from collections.abc import Callable

import pytest
import websockets

from support import GatewayProcess, RpcClient
from gateway.wire import SUBPROTOCOL, CloseCode

pytestmark = [pytest.mark.timeout(180),
              pytest.mark.skipif(sys.platform == "win32", reason="pseudo-terminals are POSIX only")]

#: About 1.2 MB of cursor addressing (the costly case for query stripping), then a marker, then idle.
FULL_SCREEN = [sys.executable, "-c",
               "import sys, time\n"
               "sys.stdout.write(''.join(f'\\x1b[{i % 24 + 1};{i % 80 + 1}Hx\\x1b[6n' for i in range(90000)))\n"
               "sys.stdout.write('DONE-' + 'OUTPUT\\n'); sys.stdout.flush(); time.sleep(600)"]


def connect_pty(gw: GatewayProcess, opened: dict, **kwargs):  # type: ignore[no-untyped-def]
    return websockets.connect(gw.url(opened["path"]), subprotocols=[SUBPROTOCOL], max_size=None, **kwargs)


async def read_until(ws, marker: bytes, timeout: float = 60.0) -> bytes:  # type: ignore[no-untyped-def]
    data = b""
    async with asyncio.timeout(timeout):
        while marker not in data:
            data += await ws.recv()
    return data


async def healthz(gw: GatewayProcess) -> dict:
    def get() -> dict:
        with urllib.request.urlopen(gw.http("/healthz"), timeout=10) as response:
            return json.loads(response.read())

    return await asyncio.to_thread(get)


async def close_code_of(ws) -> int | None:  # type: ignore[no-untyped-def]
    try:
        async with asyncio.timeout(10):
            while True:
                await ws.recv()
    except websockets.ConnectionClosed as exc:
        return exc.rcvd.code if exc.rcvd is not None else None


async def test_many_concurrent_attaches_keep_the_loop_responsive(gateway_factory: Callable[..., GatewayProcess]) -> None:
    gw = gateway_factory("--terminal-attach-burst", "1000", "--max-connections", "1000")
    async with RpcClient.connect(gw.url()) as client:
        opened = await client.call("terminal.open", argv=FULL_SCREEN)
        async with connect_pty(gw, opened, compression=None) as first:
            await read_until(first, b"DONE-OUTPUT")

        async def attach_and_read_replay() -> int:
            """The replay's size, or 0 when a later attach superseded this one first (4409)."""
            try:
                async with connect_pty(gw, opened, compression=None) as ws:
                    replay = await read_until(ws, b"DONE-OUTPUT", timeout=120)
                    assert b"\x1b[6n" not in replay
                    return len(replay)
            except websockets.ConnectionClosed as exc:
                assert exc.rcvd is not None and exc.rcvd.code == CloseCode.TERMINAL_SUPERSEDED, exc
                return 0

        attaches = [asyncio.create_task(attach_and_read_replay()) for _ in range(60)]
        worst = 0.0
        while not all(t.done() for t in attaches):
            worst = max(worst, (await healthz(gw))["loop_lag_ms"])
            await asyncio.wait(attaches, timeout=0.2)
        sizes = [t.result() for t in attaches]
        worst = max(worst, (await healthz(gw))["loop_lag_ms"])
        assert max(sizes) > 500_000 and all(size == 0 or size > 500_000 for size in sizes)  # whole replays
        assert worst < 500, worst  # a generous bound: it only has to stay far from a freeze


async def test_attaches_beyond_the_rate_are_closed_with_1013(gateway_factory: Callable[..., GatewayProcess]) -> None:
    gw = gateway_factory("--terminal-attach-burst", "2", "--terminal-attach-rate-per-s", "0.1")
    async with RpcClient.connect(gw.url()) as client:
        opened = await client.call("terminal.open", argv=["sleep", "600"])
        for _ in range(2):
            async with connect_pty(gw, opened):
                pass
        async with connect_pty(gw, opened) as third:
            assert await close_code_of(third) == CloseCode.TRY_AGAIN_LATER
            assert "terminal_attach_rate_per_s" in (third.close_reason or "")


async def test_pty_sockets_count_in_max_connections(gateway_factory: Callable[..., GatewayProcess]) -> None:
    gw = gateway_factory("--max-connections", "2")
    async with RpcClient.connect(gw.url()) as client:
        opened = await client.call("terminal.open", argv=["sleep", "600"])
        async with connect_pty(gw, opened) as view:
            async with connect_pty(gw, opened) as extra:
                assert await close_code_of(extra) == CloseCode.TRY_AGAIN_LATER
            async with websockets.connect(gw.url()) as ws:
                first = json.loads(await ws.recv())
                assert first["error"]["code"] == 4029
            assert view.state is websockets.protocol.State.OPEN
        async with connect_pty(gw, opened) as again:  # the slot is free once the view is gone
            await asyncio.sleep(0)
            assert again.state is websockets.protocol.State.OPEN


async def test_vanished_client_with_backed_up_input_is_reaped(gateway_factory: Callable[..., GatewayProcess]) -> None:
    gw = gateway_factory("--terminal-input-stall-s", "0.5", "--terminal-grace-s", "0.5")
    async with RpcClient.connect(gw.url()) as client:
        opened = await client.call("terminal.open", argv=["sleep", "600"])  # never reads its input
        ws = await connect_pty(gw, opened)
        for _ in range(8):
            await ws.send(b"k" * 65536)  # far more than the PTY and the gateway's input buffer hold
        ws.transport.abort()  # vanish without a close frame
        ws.transport.close()

        async def listed() -> list:
            return (await client.call("terminal.list"))["terminals"]

        deadline = asyncio.get_running_loop().time() + 30
        while await listed():
            assert asyncio.get_running_loop().time() < deadline, "the terminal was never reaped"
            await asyncio.sleep(0.1)
