"""gateway/terminals.py end to end: TerminalRegistry behind a real uvicorn server on 127.0.0.1, driven by
real ``websockets`` clients, with real shells on real pseudo-terminals."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import psutil
import pytest
import uvicorn
import websockets
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute

import pty_bridge
from gateway import rpc
from gateway.config import Config
from gateway.terminals import OUT_HIGH_WATER, TerminalRegistry
from support import async_wait_for
from worker_helpers import kept_child

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="pseudo-terminals are POSIX only")

BASH = shutil.which("bash")
SHELL = [BASH, "--norc", "--noprofile", "-i"] if BASH else ["/bin/sh", "-i"]


def live(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
    return out


class Server:
    """A tiny app with just the /pty route, served by a real uvicorn.Server in the test's loop."""

    def __init__(self, registry: TerminalRegistry, port: int) -> None:
        self.registry = registry
        self.port = port

    def url(self, terminal_id: str) -> str:
        return f"ws://127.0.0.1:{self.port}/pty/{terminal_id}"


@pytest.fixture
async def server_factory() -> AsyncIterator[Callable[..., Any]]:
    started: list[tuple[uvicorn.Server, asyncio.Task[None], TerminalRegistry]] = []

    async def start(**overrides: Any) -> Server:
        registry = TerminalRegistry(Config(watchdog_poll_s=0.05, worker_nice=0, **overrides))
        app = Starlette(routes=[WebSocketRoute("/pty/{terminal_id}", registry.pty_endpoint)])
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="off", log_level="warning",
                                               ws_ping_interval=None, ws_ping_timeout=None))
        task = asyncio.create_task(server.serve())
        started.append((server, task, registry))
        await async_wait_for(lambda: server.started or task.done(), 10.0, what="uvicorn to start")
        port = server.servers[0].sockets[0].getsockname()[1]
        return Server(registry, port)

    yield start
    for server, task, registry in started:
        await registry.close_all()
        server.should_exit = True
        await asyncio.wait_for(task, 10.0)


@pytest.fixture
async def server(server_factory: Callable[..., Any]) -> Server:
    return await server_factory()


class View:
    """A websockets client on /pty/{id} that accumulates the bytes it receives."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.data = bytearray()

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, url: str, **kwargs: Any) -> AsyncIterator[View]:
        async with websockets.connect(url, subprotocols=["worker-gateway.v1"], **kwargs) as ws:
            yield cls(ws)

    async def send(self, text: str) -> None:
        await self.ws.send(text.encode())

    async def expect(self, pattern: bytes, timeout: float = 10.0) -> re.Match[bytes]:
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, bytes(self.data))
            if match:
                return match
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{pattern!r} not received within {timeout}s; got {bytes(self.data[-300:])!r}")
            try:
                message = await asyncio.wait_for(self.ws.recv(), remaining)
            except asyncio.TimeoutError:
                continue
            assert isinstance(message, bytes), f"terminal output must be binary, got {message!r}"
            self.data += message

    async def closed_with(self, timeout: float = 10.0) -> int | None:
        """Read until the server closes; return the close code."""
        deadline = time.monotonic() + timeout
        with contextlib.suppress(websockets.ConnectionClosed):
            while time.monotonic() < deadline:
                message = await asyncio.wait_for(self.ws.recv(), deadline - time.monotonic())
                self.data += message if isinstance(message, bytes) else message.encode()
        assert self.ws.close_code is not None or self.ws.state.name == "CLOSED", "still open"
        return self.ws.close_code


async def open_terminal(registry: TerminalRegistry, tmp_path: Path, **params: Any) -> dict[str, Any]:
    params.setdefault("cwd", str(tmp_path))
    return await registry.open(params)


# Acceptance --------------------------------------------------------------------------------------------


async def test_typed_input_is_echoed_by_the_default_shell(server: Server, tmp_path: Path) -> None:
    opened = await open_terminal(server.registry, tmp_path)
    assert opened["path"] == f"/pty/{opened['terminal_id']}" and opened["pid"] > 0
    assert server.registry.count == 1
    async with View.connect(server.url(opened["terminal_id"])) as view:
        assert view.ws.subprotocol == "worker-gateway.v1"
        await view.send("echo hello-pty\n")
        await view.expect(rb"[\r\n]hello-pty\r\n")


async def test_resize_by_rpc_and_by_text_frame_reaches_stty(server: Server, tmp_path: Path) -> None:
    opened = await open_terminal(server.registry, tmp_path, argv=SHELL, cols=100, rows=30)
    tid = opened["terminal_id"]
    async with View.connect(server.url(tid)) as view:
        await view.send("stty size\n")
        await view.expect(rb"[\r\n]30 100\r\n")
        assert await server.registry.resize({"terminal_id": tid, "cols": 123, "rows": 45}) == {"ok": True}
        await view.send("stty size\n")
        await view.expect(rb"[\r\n]45 123\r\n")
        await view.ws.send('{"type": "resize", "cols": 5000, "rows": 0}')
        await view.send("stty size\n")
        await view.expect(rb"[\r\n]1 2000\r\n")


async def test_reconnect_replays_output_without_terminal_queries(server: Server, tmp_path: Path) -> None:
    opened = await open_terminal(server.registry, tmp_path, argv=SHELL)
    url = server.url(opened["terminal_id"])
    async with View.connect(url) as first:
        await first.send(r"printf 'before\033[6nmid\033[cafter\033]11;?\007end\n'" + "\n")
        await first.expect(rb"before\x1b\[6nmid\x1b\[cafter\x1b\]11;\?\x07end")  # live: queries intact
    async with View.connect(url) as second:
        await second.expect(rb"beforemidafterend")
        assert b"\x1b[6n" not in second.data and b"\x1b[c" not in second.data and b"\x1b]11;?" not in second.data
        await second.send("echo still-alive\n")
        await second.expect(rb"[\r\n]still-alive\r\n")


async def test_background_job_is_gone_after_terminal_close(server: Server, tmp_path: Path) -> None:
    opened = await open_terminal(server.registry, tmp_path, argv=SHELL)
    async with View.connect(server.url(opened["terminal_id"])) as view:
        await view.send("sleep 300 & echo BG=$!\n")
        bg = int((await view.expect(rb"BG=(\d+)")).group(1))
        pgid = os.getpgid(bg)
        assert os.getsid(bg) == opened["pid"]
        result = await server.registry.close({"terminal_id": opened["terminal_id"]})
        assert result == {"closed": True}
        assert live([bg, opened["pid"]]) == []
        assert [p for p in psutil.process_iter() if _pgid(p.pid) == pgid and live([p.pid])] == []
        assert await view.closed_with() == 4410
    assert server.registry.count == 0
    assert await server.registry.close({"terminal_id": opened["terminal_id"]}) == {"closed": True}


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


# Socket semantics --------------------------------------------------------------------------------------


async def test_a_second_connection_supersedes_the_first_with_4409(server: Server, tmp_path: Path) -> None:
    opened = await open_terminal(server.registry, tmp_path, argv=SHELL)
    url = server.url(opened["terminal_id"])
    async with View.connect(url) as first:
        await first.send("echo one\n")
        await first.expect(rb"[\r\n]one\r\n")
        async with View.connect(url) as second:
            assert await first.closed_with() == 4409
            await second.send("echo two\n")
            await second.expect(rb"[\r\n]two\r\n")


async def test_program_exit_delivers_its_last_output_then_closes_4410(server: Server, tmp_path: Path) -> None:
    opened = await open_terminal(server.registry, tmp_path, argv=["/bin/sh", "-c", "read line; echo got-$line"])
    async with View.connect(server.url(opened["terminal_id"])) as view:
        await view.send("ping\n")
        assert await view.closed_with() == 4410
        assert b"got-ping" in view.data
    assert server.registry.count == 0
    async with View.connect(server.url(opened["terminal_id"])) as late:
        assert await late.closed_with() == 4410


async def test_unknown_terminal_is_closed_with_4404(server: Server) -> None:
    async with View.connect(server.url("no-such-terminal")) as view:
        assert await view.closed_with() == 4404


async def test_dropped_socket_closes_the_terminal_after_the_grace(server_factory: Callable[..., Any],
                                                                 tmp_path: Path) -> None:
    server = await server_factory(terminal_grace_s=0.3)
    opened = await open_terminal(server.registry, tmp_path, argv=SHELL)
    async with View.connect(server.url(opened["terminal_id"])) as view:
        await view.send("echo attached\n")
        await view.expect(rb"[\r\n]attached\r\n")
    dropped = time.monotonic()
    await async_wait_for(lambda: server.registry.count == 0, 5.0, what="the terminal to be closed after its grace")
    assert time.monotonic() - dropped >= 0.3
    assert live([opened["pid"]]) == []


async def test_slow_socket_pauses_reading_and_the_program_blocks(server: Server, tmp_path: Path) -> None:
    opened = await open_terminal(server.registry, tmp_path, argv=["yes", "x" * 100])
    tid = opened["terminal_id"]
    # A small receive buffer (which also turns off loopback autotuning, up to 32 MiB here) keeps the
    # bytes in flight small, so the socket is "slow" after a few MiB instead of after tens.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.port))
    # No permessage-deflate: `yes` output compresses ~1000:1, which would hide gigabytes in a few sockets.
    async with View.connect(server.url(tid), max_queue=1, sock=sock, compression=None) as view:
        await view.expect(b"x" * 100)  # flowing; from now on the client reads nothing
        state = await async_wait_for(lambda: (s := server.registry.describe(tid))["reader"] == "paused" and s,
                                     15.0, what="the registry to stop reading the master fd")
        assert state["outbound_bytes"] <= OUT_HIGH_WATER + 65536
        program = kept_child(opened["pid"])  # the terminal's pid is its keeper's; `yes` is the child
        await async_wait_for(lambda: program.status() == psutil.STATUS_SLEEPING, 5.0, what="yes to block in write()")
        buffered = server.registry.describe(tid)["outbound_bytes"]
        for _ in range(10):  # stays bounded while nobody reads
            await asyncio.sleep(0.02)
            assert server.registry.describe(tid)["outbound_bytes"] == buffered
        received = 0
        deadline = time.monotonic() + 15.0
        while server.registry.describe(tid)["reader"] != "active":  # reading again once the client catches up
            assert time.monotonic() < deadline, "reading never resumed"
            received += len(await asyncio.wait_for(view.ws.recv(), 5.0))
        assert received > 0
        await server.registry.close({"terminal_id": tid})
        assert await view.closed_with() == 4410  # reading to the end: no close handshake stuck behind data


# RPC handlers ------------------------------------------------------------------------------------------


async def test_open_beyond_the_limit_is_4029_naming_the_limit(server_factory: Callable[..., Any],
                                                              tmp_path: Path) -> None:
    server = await server_factory(max_terminals=2)
    for _ in range(2):
        await open_terminal(server.registry, tmp_path, argv=["sleep", "60"])
    with pytest.raises(rpc.RpcError) as err:
        await open_terminal(server.registry, tmp_path, argv=["sleep", "60"])
    assert err.value.code == rpc.LIMIT_REACHED and "limit is 2" in err.value.message


async def test_open_with_bad_argv_or_cwd_is_invalid_params(server: Server, tmp_path: Path) -> None:
    for params in ({"argv": ["/nonexistent/program"]}, {"argv": []}, {"cwd": str(tmp_path / "missing")},
                   {"argv": ["sh", "-c", "echo a\0b"]}, {"argv": ["s\0h"]}, {"cwd": str(tmp_path) + "\0x"}):
        with pytest.raises(rpc.RpcError) as err:
            await open_terminal(server.registry, tmp_path, **params)
        assert err.value.code == rpc.INVALID_PARAMS, params
    assert server.registry.count == 0


async def test_list_shows_each_running_terminal_and_whether_it_is_attached(server: Server, tmp_path: Path) -> None:
    first = await open_terminal(server.registry, tmp_path, argv=SHELL, cols=100, rows=30)
    second = await open_terminal(server.registry, tmp_path, argv=["sleep", "60"])
    listed = server.registry.list_terminals()["terminals"]
    assert [t["terminal_id"] for t in listed] == [first["terminal_id"], second["terminal_id"]]
    assert {k: listed[0][k] for k in ("pid", "path", "cols", "rows", "attached")} == {
        "pid": first["pid"], "path": first["path"], "cols": 100, "rows": 30, "attached": False}
    assert listed[0]["created_at"] <= listed[1]["created_at"] <= time.time()
    async with View.connect(server.url(first["terminal_id"])):
        await async_wait_for(lambda: server.registry.list_terminals()["terminals"][0]["attached"], 5.0, what="attached")
    await server.registry.close({"terminal_id": second["terminal_id"]})
    assert [t["terminal_id"] for t in server.registry.list_terminals()["terminals"]] == [first["terminal_id"]]


async def test_unknown_terminal_id_is_4001(server: Server) -> None:
    for call in (server.registry.resize({"terminal_id": "nope", "cols": 10, "rows": 10}),
                 server.registry.close({"terminal_id": "nope"})):
        with pytest.raises(rpc.RpcError) as err:
            await call
        assert err.value.code == rpc.NOT_FOUND


async def test_windows_answers_4010(monkeypatch: pytest.MonkeyPatch) -> None:
    registry = TerminalRegistry(Config())
    monkeypatch.setattr(sys, "platform", "win32")
    with pytest.raises(rpc.RpcError) as err:
        await registry.open({})
    assert err.value.code == rpc.NOT_SUPPORTED and "Windows" in err.value.message


async def test_close_all_ends_every_terminal_and_the_warden(server: Server, tmp_path: Path) -> None:
    opened = [await open_terminal(server.registry, tmp_path, argv=SHELL) for _ in range(3)]
    warden = server.registry._warden
    assert warden is not None
    await server.registry.close_all()
    assert server.registry.count == 0
    assert live([o["pid"] for o in opened] + [warden.pid]) == []
    assert all(pty_bridge.session_processes(o["pid"]) == [] for o in opened)
