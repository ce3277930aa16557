"""The gateway behind a real nginx (Debian's, installed by ``make test``), on loopback only.

Each test starts its own nginx (a temp prefix and config, one process with ``master_process off``, killed
by pid at teardown) in front of a real gateway that serves under ``/gw`` (docs/deployment.md has the same
``location`` block).  Skipped, saying why, when nginx is not installed.
"""

from __future__ import annotations

import asyncio
import http.client
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest
import websockets

from support import TOKEN, GatewayProcess, RpcClient, wait_for
from edge_helpers import StoppableClient, active, wait_detached, wait_reaped
from gateway.auth import cookie_name

NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.path.exists(p)), None)
pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (make test installs Debian's nginx "
                                                     "when run as root with apt-get)")

#: The location block of docs/deployment.md, for a gateway on GW_PORT served under /gw/.
LOCATION = """
    location /gw/ {
        proxy_pass http://127.0.0.1:GW_PORT/;
        proxy_http_version 1.1;
        proxy_set_header Upgrade $http_upgrade;
        proxy_set_header Connection $connection_upgrade;
        proxy_set_header Host 127.0.0.1:GW_PORT;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        proxy_set_header X-Forwarded-Proto $scheme;
        proxy_read_timeout 1h;
        proxy_send_timeout 1h;
        proxy_buffering off;
    }
"""

CONFIG = """
daemon off;
master_process off;
worker_processes 1;
pid PREFIX/nginx.pid;
error_log PREFIX/error.log info;
events { worker_connections 256; }
http {
    access_log PREFIX/access.log;
    client_body_temp_path PREFIX/client_body;
    proxy_temp_path PREFIX/proxy;
    fastcgi_temp_path PREFIX/fastcgi;
    uwsgi_temp_path PREFIX/uwsgi;
    scgi_temp_path PREFIX/scgi;
    map $http_upgrade $connection_upgrade { default upgrade; '' close; }
    server {
        listen 127.0.0.1:NGINX_PORT;
LOCATION
    }
}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Nginx:
    proc: subprocess.Popen[bytes]
    port: int
    prefix: Path

    def url(self, path: str, scheme: str = "ws") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str, headers: dict[str, str] | None = None) -> http.client.HTTPResponse:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        resp.body = resp.read()  # type: ignore[attr-defined]
        conn.close()
        return resp

    def error_log(self) -> str:
        path = self.prefix / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""


def _serving(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture
def nginx_factory(tmp_path: Path) -> Iterator[Callable[..., Nginx]]:
    """``start(gw, port)``: an nginx on 127.0.0.1:port in front of ``gw``, stopped by pid at teardown."""
    started: list[Nginx] = []

    def start(gw: GatewayProcess, port: int, read_timeout: str = "1h") -> Nginx:
        assert NGINX is not None
        prefix = tmp_path / f"nginx-{len(started)}"
        prefix.mkdir()
        location = LOCATION.replace("_timeout 1h", f"_timeout {read_timeout}")
        conf = (CONFIG.replace("LOCATION", location).replace("PREFIX", str(prefix))
                .replace("NGINX_PORT", str(port)).replace("GW_PORT", str(gw.port)))
        (prefix / "nginx.conf").write_text(conf)
        proc = subprocess.Popen([NGINX, "-p", str(prefix), "-c", str(prefix / "nginx.conf"),
                                 "-e", str(prefix / "error.log")],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        server = Nginx(proc, port, prefix)
        started.append(server)
        wait_for(lambda: proc.poll() is not None or _serving(port), 15, what="nginx to listen")
        assert proc.poll() is None, f"nginx did not start: {server.error_log()[-2000:]}"
        return server

    yield start
    for server in started:
        if server.proc.poll() is None:
            server.proc.send_signal(signal.SIGTERM)
            try:
                server.proc.wait(10)
            except subprocess.TimeoutExpired:
                server.proc.kill()
                server.proc.wait(5)


@pytest.fixture
def behind_nginx(gateway_factory, nginx_factory) -> Callable[..., tuple[GatewayProcess, Nginx]]:
    """A gateway under /gw behind nginx, with nginx's origin allowed (the page's Origin is the proxy's,
    while nginx rewrites Host to the gateway's loopback address)."""

    def make(*args: str, read_timeout: str = "1h") -> tuple[GatewayProcess, Nginx]:
        port = free_port()
        gw = gateway_factory("--root-path", "/gw", "--allow-origin", f"http://127.0.0.1:{port}", *args)
        return gw, nginx_factory(gw, port, read_timeout)

    return make


async def handshake(url: str, **kwargs) -> tuple[int, str]:
    """(101, "") for an accepted handshake, else the status and body of the refusal."""
    try:
        async with websockets.connect(url, **kwargs):
            return 101, ""
    except websockets.InvalidStatus as exc:
        return exc.response.status_code, exc.response.body.decode(errors="replace")


async def test_dashboard_and_ws_work_through_nginx_under_a_prefix(behind_nginx) -> None:
    gw, nginx = behind_nginx()
    page = nginx.get(f"/gw/?token={TOKEN}")
    assert page.status == 200 and b"<html" in page.body
    set_cookie = page.getheader("Set-Cookie")
    assert set_cookie.startswith(cookie_name(gw.port) + "=") and "Path=/gw/" in set_cookie
    cookie = set_cookie.split(";")[0]
    assert nginx.get("/gw/static/js/main.js", {"Cookie": cookie}).status == 200
    assert nginx.get("/gw/static/style.css", {"Cookie": cookie}).status == 200
    # The page's socket: its own Origin, the cookie, through nginx.  The default keepalive for this
    # proxied connection is 20 s / 20 s (nginx adds X-Forwarded-For), read from gateway.ready.
    async with RpcClient.connect(nginx.url("/gw/ws"), additional_headers={"Cookie": cookie},
                                 origin=nginx.origin) as client:
        assert client.events[0]["payload"]["ping"] == {"interval": 20.0, "timeout": 20.0}
        session = await client.call("session.create")
        done = await client.run_turn(session["session_id"], "hello through nginx")
        assert done["status"] == "ok"
        terminal = await client.call("terminal.open", argv=["/bin/cat"])
        # A terminal's socket goes through the same prefix.
        async with websockets.connect(nginx.url("/gw" + terminal["path"]), additional_headers={"Cookie": cookie},
                                      origin=nginx.origin) as pty:
            await pty.send(b"ping-through-nginx\n")
            seen = b""
            while b"ping-through-nginx" not in seen:
                seen += await asyncio.wait_for(pty.recv(), 10)
        await client.call("terminal.close", terminal_id=terminal["terminal_id"])
    # A refusal through nginx says why, and the gateway's log names the real client (X-Forwarded-For, as
    # extended by nginx, trusted because nginx connects from loopback).
    status, body = await handshake(nginx.url("/gw/ws"), origin="http://evil.example",
                                   additional_headers={"X-Forwarded-For": "203.0.113.77"})
    assert status == 403 and "origin check failed" in body
    wait_for(lambda: "handshake rejected" in gw.stderr(), 10, what="the rejection log line")
    assert "from 203.0.113.77:" in next(l for l in gw.stderr().splitlines() if "handshake rejected" in l)


async def test_default_policy_behind_nginx_without_flags(behind_nginx) -> None:
    gw, nginx = behind_nginx()
    async with RpcClient.connect(nginx.url(f"/gw/ws?token={TOKEN}")) as client:
        assert client.events[0]["payload"]["ping"] == {"interval": 20.0, "timeout": 20.0}
    async with RpcClient.connect(gw.url()) as direct:  # the loopback rule still holds next to it
        assert direct.events[0]["payload"]["ping"] == {"interval": None, "timeout": None}


async def test_stopped_client_behind_nginx_is_detached_then_reaped(behind_nginx) -> None:
    """Short explicit pings (1 s / 1 s) for test speed; the grace is 1.5 s."""
    gw, nginx = behind_nginx("--ws-ping-interval", "1", "--ws-ping-timeout", "1", "--grace-s", "1.5")
    client = StoppableClient(nginx.url(f"/gw/ws?token={TOKEN}"))
    try:
        sid = client.hello["session_id"]
        assert client.hello["ping"] == {"interval": 1.0, "timeout": 1.0}
        client.stop()
        await wait_detached(gw, sid, within=12.0)  # interval + timeout + a margin for a loaded machine
        await wait_reaped(gw, sid, within=15.0)
        assert "aborting the connection" in gw.stderr()
    finally:
        client.kill()


async def test_silent_direct_client_is_kept_next_to_nginx(behind_nginx) -> None:
    """Default policy: a stopped direct loopback client keeps its session for longer than a proxied one
    would need to be dropped with the short pings above."""
    gw, _ = behind_nginx("--grace-s", "1.5")
    client = StoppableClient(gw.url())
    try:
        sid = client.hello["session_id"]
        client.stop()
        until = time.monotonic() + 6.0
        while time.monotonic() < until:
            assert (await active(gw))[sid]["attached"], "a silent direct loopback client lost its session"
            await asyncio.sleep(0.5)
    finally:
        client.kill()


async def idle_terminal_lifetime(gw: GatewayProcess, nginx: Nginx, observe_s: float) -> float | None:
    """Open a terminal, attach to it through nginx, stay idle, and return when that socket was closed
    (None: still open).  The control connection is direct, so nginx's timeout does not cut it."""
    async with RpcClient.connect(gw.url()) as client:
        terminal = await client.call("terminal.open", argv=["/bin/cat"])
        loop = asyncio.get_running_loop()
        opened = loop.time()
        try:
            async with websockets.connect(nginx.url(f"/gw{terminal['path']}?token={TOKEN}"), ping_interval=None) as pty:
                while loop.time() - opened < observe_s:
                    try:
                        await asyncio.wait_for(pty.recv(), observe_s - (loop.time() - opened))
                    except asyncio.TimeoutError:
                        return None
            return None
        except websockets.ConnectionClosed:
            return loop.time() - opened
        finally:
            await client.call("terminal.close", terminal_id=terminal["terminal_id"])


async def test_nginx_read_timeout_cuts_idle_sockets_only_without_the_ping(behind_nginx) -> None:
    """nginx closes an upgraded connection on which the gateway sent nothing for proxy_read_timeout (60 s
    by default; 2 s here).  With the ping off (explicit 'none') an idle terminal is cut; with a ping
    shorter than the timeout its frames keep the socket open (docs/deployment.md)."""
    gw, nginx = behind_nginx("--ws-ping-interval", "none", "--ws-ping-timeout", "none", read_timeout="2s")
    closed_after = await idle_terminal_lifetime(gw, nginx, observe_s=10.0)
    assert closed_after is not None and closed_after >= 1.5, closed_after
    gw, pinged = behind_nginx("--ws-ping-interval", "0.5", "--ws-ping-timeout", "5", read_timeout="2s")
    assert await idle_terminal_lifetime(gw, pinged, observe_s=5.0) is None
