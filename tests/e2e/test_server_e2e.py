"""Start-up, keepalive policy and the authenticated /ws channel against a real gateway process."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import websockets

from support import ROOT, TOKEN, GatewayProcess, RpcClient, wait_for
from gateway.config import KNOBS


def healthz(gw: GatewayProcess) -> dict:
    with urllib.request.urlopen(gw.http("/healthz"), timeout=5) as resp:
        return json.loads(resp.read())


def raw_handshake(port: int, token: str = TOKEN) -> socket.socket:
    """Complete a WebSocket handshake on a raw socket that will then never answer a ping."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET /ws?token={token} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        assert chunk, "server closed during handshake"
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def raw_status(port: int, path: str, host: str) -> int:
    """Status code of a WebSocket handshake that sends exactly the given Host header."""
    key = base64.b64encode(os.urandom(16)).decode()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        while b"\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                break
            head += chunk
    return int(head.split()[1])


def peer_closed(sock: socket.socket) -> bool:
    """True once the server has closed the connection (EOF or reset); reads without answering pings."""
    sock.setblocking(False)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_ready_line_and_port_zero(gateway_factory, tmp_path) -> None:
    ready = tmp_path / "ready.json"
    gw = gateway_factory("--ready-file", str(ready))
    assert gw.port and gw.port > 0
    assert f"url=http://127.0.0.1:{gw.port}/" in gw.ready_line
    assert json.loads(ready.read_text()) == {"port": gw.port, "pid": gw.pid}

    async def connect() -> dict:
        async with RpcClient.connect(gw.url()) as client:
            return client.events[0]

    ready_event = asyncio.run(connect())
    assert ready_event["type"] == "gateway.ready"
    assert ready_event["payload"]["protocol"] == 1 and ready_event["payload"]["ping"] == {"interval": None,
                                                                                           "timeout": None}
    assert TOKEN in gw.stderr()  # the one start-up line with the dashboard URL


def test_taken_port_is_a_one_line_error(gateway) -> None:
    proc = subprocess.run([sys.executable, "-m", "gateway", "serve", "--port", str(gateway.port)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "WORKER_GATEWAY_READY" not in proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(gateway.port) in lines[0] and "in use" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_no_auth_refused_on_public_bind() -> None:
    proc = subprocess.run([sys.executable, "-m", "gateway", "serve", "--host", "0.0.0.0", "--no-auth",
                           "--port", "0"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--no-auth" in proc.stderr and "Traceback" not in proc.stderr
    assert "WORKER_GATEWAY_READY" not in proc.stdout


def test_help_documents_every_flag_with_env_and_default() -> None:
    proc = subprocess.run([sys.executable, "-m", "gateway", "serve", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "COLUMNS": "400"})
    assert proc.returncode == 0
    for knob in KNOBS:
        assert knob.option in proc.stdout, knob.option
        assert knob.env in proc.stdout, knob.env
    assert proc.stdout.count("default") >= len(KNOBS)


def test_silent_peer_survives_on_loopback(gateway) -> None:
    sock = raw_handshake(gateway.port)
    try:
        deadline = time.monotonic() + 8.0
        while time.monotonic() < deadline:  # observe for 8 s: the server must not close it
            assert not peer_closed(sock), "the server closed a silent peer on a loopback bind"
            assert healthz(gateway)["connections"] == 1
            time.sleep(0.5)
    finally:
        sock.close()


def test_silent_peer_closed_when_ping_forced(gateway_factory) -> None:
    gw = gateway_factory("--ws-ping-interval", "1", "--ws-ping-timeout", "1")
    sock = raw_handshake(gw.port)
    try:
        started = time.monotonic()
        wait_for(lambda: peer_closed(sock), 6.0, 0.05, "the server to close the silent peer")
        assert time.monotonic() - started < 6.0
        wait_for(lambda: healthz(gw)["connections"] == 0, 2.0, what="server-side disconnect")
    finally:
        sock.close()


def test_vanished_peer_seen_at_once(gateway) -> None:
    sock = raw_handshake(gateway.port)
    wait_for(lambda: healthz(gateway)["connections"] == 1, 5.0)
    sock.close()
    wait_for(lambda: healthz(gateway)["connections"] == 0, 2.0, what="disconnect seen by the server")


def test_healthz_fields(gateway) -> None:
    body = healthz(gateway)
    assert body["status"] == "ok"
    for key in ("sessions", "workers", "loop_lag_ms", "uptime_s"):
        assert isinstance(body[key], (int, float)), key


async def expect_403(url: str, **kwargs) -> None:
    with pytest.raises(websockets.InvalidStatus) as exc:
        async with websockets.connect(url, **kwargs):
            pass
    assert exc.value.response.status_code == 403


async def test_handshake_rejections(gateway) -> None:
    base = f"ws://127.0.0.1:{gateway.port}/ws"
    await expect_403(base)
    await expect_403(base + "?token=wrong")
    await expect_403(base, additional_headers={"Authorization": "Bearer wrong"})
    await expect_403(base, subprotocols=["worker-gateway.v1", "worker-gateway.token.wrong"])
    await expect_403(base + f"?token={TOKEN}", origin="http://evil.example")
    await expect_403(base + f"?token={TOKEN}", origin=f"http://127.0.0.1:{gateway.port + 1}")
    # DNS rebinding: a loopback bind only answers requests that name a loopback host.
    assert raw_status(gateway.port, f"/ws?token={TOKEN}", host=f"rebind.example:{gateway.port}") == 403
    assert raw_status(gateway.port, f"/ws?token={TOKEN}", host=f"127.0.0.1:{gateway.port}") == 101
    # Two Host headers (the real one plus a forged one) are ambiguous and refused.
    await expect_403(base + f"?token={TOKEN}", additional_headers={"Host": f"rebind.example:{gateway.port}"})
    await expect_403(f"ws://127.0.0.1:{gateway.port}/pty/nope")


async def test_every_token_form_is_accepted(gateway) -> None:
    base = f"ws://127.0.0.1:{gateway.port}/ws"
    forms = [
        dict(uri=base + f"?token={TOKEN}"),
        dict(uri=base, additional_headers={"Authorization": f"Bearer {TOKEN}"}),
        dict(uri=base, subprotocols=["worker-gateway.v1", f"worker-gateway.token.{TOKEN}"]),
        dict(uri=base, additional_headers={"Cookie": f"wg_token={TOKEN}"}),
        dict(uri=base + f"?token={TOKEN}", origin=f"http://127.0.0.1:{gateway.port}"),
        dict(uri=base + f"?token={TOKEN}", origin="null"),
    ]
    for form in forms:
        async with websockets.connect(**form) as ws:
            first = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert first["params"]["type"] == "gateway.ready"
            if "subprotocols" in form:
                assert ws.subprotocol == "worker-gateway.v1"


@pytest.mark.parametrize("frame, code", [
    ("{bad json", -32700),
    ('"just a string"', -32600),
    ('{"id": 1, "method": "gateway.ping"}', -32600),
    ('{"jsonrpc": "2.0", "id": 1, "method": "nope.nothing"}', -32601),
    ('{"jsonrpc": "2.0", "id": 1, "method": "session.close", "params": {}}', -32602),
    ('{"jsonrpc": "2.0", "id": 1, "method": "session.close", "params": {"session_id": 5}}', -32602),
    ('{"jsonrpc": "2.0", "id": 1, "method": "gateway.info", "params": {"x": 1}}', -32602),
    ('{"jsonrpc": "2.0", "id": 1, "method": "session.close", "params": {"session_id": "nope"}}', 4001),
])
async def test_rpc_errors_keep_the_connection_usable(rpc_connect, frame: str, code: int) -> None:
    async with rpc_connect() as client:
        await client.send_raw(frame)
        await client.wait(lambda: any("error" in r for r in client.responses.values()), 10)
        key = next(k for k, r in client.responses.items() if "error" in r)
        error = client.responses.pop(key)["error"]
        assert error["code"] == code and error["message"]
        assert await client.call("gateway.ping") == {"ok": True}


async def test_binary_frame_gets_an_error(rpc_connect) -> None:
    async with rpc_connect() as client:
        await client.send_raw(b'{"jsonrpc":"2.0","id":1,"method":"gateway.ping"}')
        await client.wait(lambda: None in client.responses, 10)
        assert client.responses[None]["error"]["code"] == -32600
        assert await client.call("gateway.ping") == {"ok": True}


async def test_info_lists_agents_and_limits(rpc_connect) -> None:
    async with rpc_connect() as client:
        info = await client.call("gateway.info")
        assert info["protocol"] == 1 and info["default_agent"] == "echo"
        assert {"echo", "shell", "load"} <= set(info["agents"])
        assert info["limits"]["max_message_bytes"] == 1024 * 1024


async def test_oversize_frame_closes_1009(gateway) -> None:
    async with websockets.connect(gateway.url(), max_size=None) as ws:
        await ws.recv()
        with pytest.raises(websockets.ConnectionClosed) as exc:
            # The close can come while the 2 MiB are still being written: then send itself raises.
            await ws.send("x" * (2 * 1024 * 1024))
            for _ in range(10):
                await asyncio.wait_for(ws.recv(), 10)
        assert exc.value.rcvd is not None and exc.value.rcvd.code == 1009
